"""Weight offloading: streamdec's modes against diffusers' offloading, on the same full-size
random-weight Wan 2.1 decoder.

    python benchmarks/offload.py                 # CPU: the hooks' cost, reduced size (minutes)
    python benchmarks/offload.py --device cuda   # 480p and 720p, bf16

For each streamdec mode (none, model, block): decode time, peak `max_memory_allocated` on CUDA,
and the most weight bytes the offloader had on the device at once. On CUDA the same decode by
diffusers' `AutoencoderKLWan.decode` with the offloading diffusers pipelines apply: model offload
(`enable_model_cpu_offload`: accelerate's `cpu_offload_with_hook`), sequential offload
(`enable_sequential_cpu_offload`: accelerate's `cpu_offload`, per submodule, no prefetch) and
group offloading (`enable_group_offload`, block level, on a side stream). On the CPU there is no
device to offload to: every mode still attaches its hooks and moves its placeholders, so the run
shows what the mechanism costs, and diffusers' offloading (which needs an accelerator) is skipped.
Each run is a fresh process. Results: docs/benchmarks/offload-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _harness import ROOT, build_models, latents_for, machine, measured, run_in_process, save_results, summary

STREAMDEC_MODES = ("none", "model", "block")
DIFFUSERS_MODES = ("diffusers-none", "diffusers-model-offload", "diffusers-sequential-offload", "diffusers-group-offload")


def run(method: str, size, frames: int, device: str, dtype: str) -> dict:
    import streamdec

    dtype_ = streamdec.vae.resolve_dtype(dtype)
    reference, _ = build_models("cpu", dtype_)  # weights rest on the host; each method moves them
    decoder_bytes = sum(p.numel() * p.element_size() for n, p in reference.named_parameters()
                        if n.startswith(("decoder.", "post_quant_conv.")))  # fmt: skip
    z = latents_for(frames, size, device)
    if method in STREAMDEC_MODES:
        vae = streamdec.load_vae(reference, device=device, dtype=dtype_, offload=method)
        del reference

        def work() -> dict:
            count = sum(1 for _ in streamdec.decode_frames(vae, z, normalized=False))
            resident = vae.offloader.peak_resident_bytes if vae.offloader else sum(
                p.numel() * p.element_size() for p in vae.decoder.parameters())
            return {"method": method, "frames": count, "peak_resident_weight_bytes": resident}
    else:
        prepare_diffusers(reference, method, device)

        def work() -> dict:
            with torch.no_grad():
                count = reference.decode(z).sample.shape[2]
            return {"method": method, "frames": count}

    return {**measured(device, work), "decoder_weight_bytes": decoder_bytes}


def prepare_diffusers(model, method: str, device: str) -> None:
    from accelerate import cpu_offload, cpu_offload_with_hook

    if method == "diffusers-none":
        model.to(device)
    elif method == "diffusers-model-offload":
        cpu_offload_with_hook(model, torch.device(device))
    elif method == "diffusers-sequential-offload":
        cpu_offload(model, torch.device(device))
    else:
        model.enable_group_offload(torch.device(device), offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=True)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, h, w, frames, dtype = args.worker
        print(json.dumps(run(method, (int(h), int(w)), int(frames), args.device, dtype)))
        return

    if args.device == "cpu":
        configs, methods = [("cpu-256x384-fp32", (32, 48), 9, "fp32")], STREAMDEC_MODES
    else:
        configs = [("480p-bf16", (60, 104), 17, "bf16"), ("720p-bf16", (90, 160), 17, "bf16")]
        methods = STREAMDEC_MODES + DIFFUSERS_MODES
    results = {"machine": machine(args.device), "device": args.device, "configs": []}
    for name, size, frames, dtype in configs:
        print(f"== {name}, {frames} frames", flush=True)
        runs = []
        for method in methods:
            cmd = [sys.executable, __file__, "--device", args.device, "--worker", method, *map(str, size), str(frames), dtype]
            run_ = run_in_process(cmd, method=method)
            runs.append(run_)
            print(f"   {method:30s} " + describe(run_), flush=True)
        results["configs"].append({"name": name, "size": size, "frames": frames, "dtype": dtype, "runs": runs})
    save_results(results, args.out, "offload")


def describe(run: dict) -> str:
    text = summary(run)
    if "peak_resident_weight_bytes" in run:
        text += (f", weights on the device at most {run['peak_resident_weight_bytes'] / 2**20:.1f} of "
                 f"{run['decoder_weight_bytes'] / 2**20:.1f} MiB")  # fmt: skip
    return text


if __name__ == "__main__":
    main()
