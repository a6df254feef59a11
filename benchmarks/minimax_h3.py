"""MiniMax-H3 VAE: grouped weight offload for its ViT decoder, and streamdec's decode against diffusers'.

    python benchmarks/minimax_h3.py                 # CPU figures (a few minutes)
    python benchmarks/minimax_h3.py --device cuda   # adds the full-size GPU timings (unverified: no GPU here)

CPU, full size (2.42 B parameters, built on the meta device: no weights, no compute): the offload
blocks, the weight bytes two resident groups take for each group size, and what the `max_vram`
planner picks for 720p in bf16 at several budgets (traced on the meta device, as every plan is).

CPU, measured (a reduced decoder: the released head size and 4x16x16 patches, 512 wide, 8 layers;
256x384 px, fp32): for each offload group size, the hook calls, the groups moved (and how many of
those the compute waited for: not prefetched), the most weight bytes on the device at once and the
time, against the decoder resident and against diffusers' default (tiled) `decode` of the same
weights. On the CPU there is no device to move weights to: the hooks and the bookkeeping run, the
copies do not, so the times show the mechanism's cost, not a transfer's.

GPU (only with CUDA): the full-size decoder in bf16, random weights, 720p, 12 latents (2 windows):
resident against block offload with the group the planner picks where two groups fit, the target
being at most 10% slower. Each run is a fresh process, repeated (--repeat, 2) and the fastest kept.
Results: docs/benchmarks/minimax-h3-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from _harness import GIB, ROOT, machine, run_in_process, save_results

SMALL = dict(decoder_num_layers=8, decoder_num_attention_heads=8, decoder_attention_head_dim=64)
SMALL_SIZE, SMALL_FRAMES = (16, 24), 12  # latent pixels (256x384 px: 2 tiles), latent frames (2 windows)
GPU_SIZE, GPU_FRAMES = (45, 80), 12  # 720p
BUDGETS_GIB = (1.5, 2, 3, 6, 24)


def build_reference(config: dict, seed: int = 0):
    """diffusers' AutoencoderKLMiniMaxH3 with random weights (no download here): a small encoder, the
    decoder as `config` says."""
    from diffusers import AutoencoderKLMiniMaxH3

    torch.manual_seed(seed)
    model = AutoencoderKLMiniMaxH3(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                   spatial_downsample_factors=(2, 2, 2, 2), temporal_downsample_factors=(1, 2, 2, 1),
                                   **config).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".scale" in name:
                p.fill_(0.1)
            elif p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


def full_size_offload() -> dict:
    """Offload blocks, group bytes and plans of the released decoder, from the meta device."""
    import streamdec
    from streamdec import memory
    from streamdec.families import by_name
    from streamdec.families.minimax_h3 import MiniMaxH3Config
    from streamdec.vae import VAE

    family = by_name("minimax-h3")
    config = MiniMaxH3Config()
    with torch.device("meta"):
        decoder = family.build(config).to(torch.bfloat16)
    vae = VAE(family, config, decoder, torch.device("cpu"), torch.bfloat16, torch.bfloat16, "meta", offload="auto",
              max_vram=24.0)  # fmt: skip
    blocks = decoder.offload_blocks()
    groups = {g: {"groups": len(memory._group_sizes(vae, g)), "two_groups_bytes": memory.weight_bytes(vae, "block", g)}
              for g in (1, 2, 4, 6, 9, 12, 18)}  # fmt: skip
    plans = []
    for budget in BUDGETS_GIB:
        try:
            plan = memory.plan_decode(vae, GPU_SIZE, GPU_FRAMES, max_vram=budget)
            plans.append({"max_vram_gib": budget, "offload": plan.offload, "offload_group": plan.offload_group,
                          "peak_gib": plan.peak_bytes / GIB, "plan": plan.describe()})  # fmt: skip
        except streamdec.StreamdecError as err:
            plans.append({"max_vram_gib": budget, "error": str(err)})
    return {"decoder_parameters": vae.num_parameters(), "weight_bytes_bf16": memory.weight_bytes(vae, "none"),
            "offload_blocks": len(blocks), "group_choices": memory.group_choices(vae, "block"),
            "by_group_size": groups, "plans_720p_12_latents_bf16": plans}  # fmt: skip


def run(method: str, device: str) -> dict:
    """One measured decode in this process: "diffusers", "resident", or "group-N" (block offload, N blocks
    a group); on CUDA "planned" (block offload as the max_vram planner picks it for two groups)."""
    import streamdec
    from streamdec import memory
    from streamdec.plan import Plan

    full = device.startswith("cuda")
    dtype = torch.bfloat16 if full else torch.float32
    reference = build_reference({} if full else SMALL)
    size, frames = (GPU_SIZE, GPU_FRAMES) if full else (SMALL_SIZE, SMALL_FRAMES)
    z = torch.randn(1, 24, frames, *size, generator=torch.Generator().manual_seed(1))
    result = {"method": method}
    if method == "diffusers":
        reference = reference.to(device=device, dtype=dtype)
        z = z.to(device, dtype)

        def work():
            with torch.no_grad():
                return reference.decode(z).sample.shape[2]
    else:
        offload = "none" if method == "resident" else "block"
        vae = streamdec.load_vae(reference, device=device, dtype=dtype, offload=offload)
        del reference
        group = 1
        if method.startswith("group-"):
            group = int(method.split("-")[1])
        elif method == "planned":  # a budget with room for the activations and two groups of the planner's choice
            peak = memory.estimate_peak(vae, size, frames, offload="block")  # with the planner's first group choice
            budget = peak / memory.PLAN_MARGIN / GIB * 1.01
            plan = memory.plan_decode(vae, size, frames, max_vram=budget)
            group = plan.offload_group
            result.update(max_vram_gib=budget, plan=plan.describe())
        result["offload_group"] = group

        def work():
            decoder = streamdec.StreamDecoder(vae)
            decoder.start(size, frames)
            decoder.plan = Plan(offload, decoder.plan.tile, offload_group=group)
            count = sum(p.shape[2] for p in decoder.decode_videos(z)) + sum(p.shape[2] for p in decoder.close_videos())
            return count

        if vae.offloader is not None:
            hooks = {"calls": 0}
            before = vae.offloader.before

            def counted(block):
                hooks["calls"] += 1
                before(block)

            vae.offloader.before = counted
    if full:
        work()  # warm up: kernels, allocator, the offloader's learned order
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if method != "diffusers" and vae.offloader is not None:
            vae.offloader.transfers = vae.offloader.waited_transfers = 0
            hooks["calls"] = 0
    start = time.perf_counter()
    result["frames"] = work()
    if full:
        torch.cuda.synchronize()
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    result["seconds"] = time.perf_counter() - start
    if method != "diffusers" and vae.offloader is not None:
        o = vae.offloader
        result.update(hook_calls=hooks["calls"], groups_moved=o.transfers, groups_waited_for=o.waited_transfers,
                      peak_resident_weight_bytes=o.peak_resident_bytes)  # fmt: skip
    elif method == "resident":
        result["peak_resident_weight_bytes"] = sum(p.numel() * p.element_size() for p in vae.decoder.parameters())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measured decode; the fastest is kept")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run(args.worker, args.device)))
        return
    results = {"machine": machine(args.device), "device": args.device}
    print("== full size (meta device): offload groups and plans", flush=True)
    results["full_size"] = full_size_offload()
    for row in results["full_size"]["plans_720p_12_latents_bf16"]:
        print(f"   max_vram {row['max_vram_gib']:>4} GiB: {row.get('plan') or row['error'][:100]}", flush=True)
    methods = ["diffusers", "resident", "group-1", "group-2", "group-3", "group-5"]
    if args.device.startswith("cuda"):
        methods = ["diffusers", "resident", "planned", "group-1"]
    small = f"{SMALL_SIZE[0] * 16}x{SMALL_SIZE[1] * 16} px, {SMALL_FRAMES} latents"
    name = "full size, 720p, 12 latents, bf16" if args.device.startswith("cuda") else (
        f"reduced decoder (512 wide, 8 layers), {small}, fp32")  # fmt: skip
    print(f"== measured: {name}", flush=True)
    # each method `repeat` times, taking turns so that all see the same load, the fastest kept: on a
    # shared machine other work only adds time
    tries = {method: [] for method in methods}
    results["load_average_before"] = os.getloadavg()
    for _ in range(args.repeat):
        for method in methods:
            cmd = [sys.executable, __file__, "--device", args.device, "--worker", method]
            tries[method].append(run_in_process(cmd, method=method))
    results["load_average_after"] = os.getloadavg()
    runs = []
    for method in methods:
        run_ = min(tries[method], key=lambda r: r.get("seconds", float("inf")))
        run_["all_seconds"] = [r.get("seconds") for r in tries[method]]
        runs.append(run_)
        print(f"   {method:10s} {describe(run_)}", flush=True)
    resident = next((r["seconds"] for r in runs if r["method"] == "resident" and "seconds" in r), None)
    for r in runs:
        if resident and "seconds" in r:
            r["time_vs_resident"] = r["seconds"] / resident
    results["measured"] = {"name": name, "runs": runs}
    save_results(results, args.out, "minimax-h3")


def describe(run_: dict) -> str:
    if run_.get("error"):
        return f"FAILED ({run_['error']})"
    text = f"{run_['seconds']:7.2f} s, {run_['frames']} frames"
    if "groups_moved" in run_:
        text += (f", {run_['hook_calls']} hook calls, {run_['groups_moved']} groups moved "
                 f"({run_['groups_waited_for']} waited for)")  # fmt: skip
    if "peak_resident_weight_bytes" in run_:
        text += f", weights on the device at most {run_['peak_resident_weight_bytes'] / 2**20:.1f} MiB"
    if "gpu_peak_bytes" in run_:
        text += f", GPU peak {run_['gpu_peak_bytes'] / GIB:.2f} GiB"
    return text


if __name__ == "__main__":
    main()
