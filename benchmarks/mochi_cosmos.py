"""Mochi and Cosmos (CV8x8x8): streamdec's carried streams next to diffusers' whole-clip decode on the
same full-size random-weight decoders (Mochi 363 M parameters, Cosmos 63 M).

    python benchmarks/mochi_cosmos.py                      # both parts (CPU)
    python benchmarks/mochi_cosmos.py --skip-time          # the memory part only (deterministic, ~1 min)

1. Device memory against length, traced on the meta device in bf16 (shapes, no data; weights
   included): diffusers' `decode` of the whole clip at 480p and 720p, and streamdec's stream as
   `max_vram` plans estimate it for a GPU (Cosmos' temporal keys and values parked on the host),
   plus what those keys and values hold on the host at the end. Deterministic.
2. Time and traced tensor memory against length on this machine (small frames, fp32), each run a
   fresh process, every frame turned into uint8 as a user writing a video would. The tensor memory is
   MemoryTrace's peak (every tensor storage alive at once, weights excluded): deterministic, unlike
   the time, which on a shared machine varies from run to run.

Results: docs/benchmarks/mochi-cosmos-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _harness import GIB, ROOT, machine, run_in_process, save_results, traced_decode

FAMILIES = {
    # name: (diffusers class, latent channels, temporal ratio, latent sizes at 480p / 720p, lengths)
    "mochi": ("AutoencoderKLMochi", 12, 6, {"480p": (60, 106), "720p": (90, 160)}, (31, 85, 163)),
    "cosmos": ("AutoencoderKLCosmos", 16, 8, {"480p": (60, 104), "720p": (90, 160)}, (33, 121)),
}
SMALL = (4, 6)  # latent pixels of the time part: 32x48 frames


def latent_frames(family: str, frames: int) -> int:
    return (frames - 1) // FAMILIES[family][2] + 1


def meta_vae(family_name: str, dtype: torch.dtype):
    """streamdec's VAE for a released-size decoder on the meta device, estimated as for a GPU."""
    from streamdec.families import by_name
    from streamdec.vae import VAE

    family = by_name(family_name)
    config = family.config(_released_shapes(family_name), None)
    with torch.device("meta"):
        decoder = family.build(config).to(dtype)
    vae = VAE(family, config, decoder, torch.device("meta"), dtype, dtype, f"random full-size {family_name}")
    vae.device = torch.device("cuda")  # what grows is parked on the host
    return vae


def _released_shapes(family_name: str) -> dict:
    model = _diffusers_model(family_name, "meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_model(family_name: str, device: str):
    import diffusers

    with torch.device(device):
        return getattr(diffusers, FAMILIES[family_name][0])().eval()


def diffusers_peak(family_name: str, size, frames: int, dtype: torch.dtype) -> int:
    from streamdec.memory import MemoryTrace

    model = _diffusers_model(family_name, "meta").to(dtype)
    weights = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.startswith(("encoder.", "quant_conv."))
    )
    trace = MemoryTrace(device="meta")
    with torch.no_grad(), trace:
        z = torch.empty(
            1, FAMILIES[family_name][1], latent_frames(family_name, frames), *size, device="meta", dtype=dtype
        )
        video = model.decode(z).sample
        del video, z
    return trace.peak + weights


def device_memory(dtype: torch.dtype) -> list[dict]:
    from streamdec import memory

    rows = []
    for name, (_, _, _, sizes, lengths) in FAMILIES.items():
        vae = meta_vae(name, dtype)
        width = getattr(vae.config, "width", 0)  # Cosmos: the temporal attention's channels
        for resolution, size in sizes.items():
            ours = memory.estimate_peak(vae, size)
            kv_per_latent = 2 * size[0] * size[1] * width * torch.finfo(dtype).bits // 8
            for frames in lengths:
                start = time.perf_counter()
                theirs = diffusers_peak(name, size, frames, dtype)
                row = {"family": name, "resolution": resolution, "frames": frames,
                       "diffusers_gib": round(theirs / GIB, 2), "streamdec_gib": round(ours / GIB, 2),
                       "host_keys_values_gib": round(latent_frames(name, frames) * kv_per_latent / GIB, 3),
                       "trace_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
                rows.append(row)
                print(f"   {name} {resolution} {frames:4d} frames: diffusers {row['diffusers_gib']:7.2f} GiB, "
                      f"streamdec {row['streamdec_gib']:6.2f} GiB (+ {row['host_keys_values_gib']:.3f} GiB on the host)",
                      flush=True)  # fmt: skip
    return rows


def run(family_name: str, method: str, frames: int) -> dict:
    """One timed decode in this process: time and the traced peak of tensor memory (weights excluded)."""
    import streamdec

    torch.manual_seed(0)
    reference = _diffusers_model(family_name, "cpu")  # released sizes; weights random (no download here)
    ours = streamdec.load_vae(reference, device="cpu")
    z = torch.randn(1, FAMILIES[family_name][1], latent_frames(family_name, frames), *SMALL,
                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    start = time.perf_counter()
    count, peak = traced_decode(ours if method == "streamdec" else reference, z)  # the side this process kept
    return {"family": family_name, "method": method, "frames": count, "seconds": round(time.perf_counter() - start, 2),
            "traced_peak_mib": round(peak / 2**20, 2)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        family, method, frames = args.worker
        print(json.dumps(run(family, method, int(frames))))
        return

    results = {"machine": machine("cpu") + "; shared with other jobs while measured (times vary run to run)",
               "device": "cpu"}  # fmt: skip
    print("== device memory, traced on the meta device, bf16", flush=True)
    results["device_memory"] = device_memory(torch.bfloat16)
    if not args.skip_time:
        results.update(size=SMALL, dtype="fp32", runs=[])
        print(f"== time and traced tensor memory, latents {SMALL[0]}x{SMALL[1]} -> {SMALL[0] * 8}x{SMALL[1] * 8}, fp32")
        for family, (_, _, ratio, _, _) in FAMILIES.items():
            for frames in (1 + 2 * ratio, 1 + 8 * ratio):
                for method in ("streamdec", "diffusers"):
                    cmd = [sys.executable, __file__, "--worker", family, method, str(frames)]
                    result = run_in_process(cmd, family=family, method=method, frames=frames)
                    results["runs"].append(result)
                    print(f"   {family} {frames:3d} frames {method:9s}: {result}", flush=True)
    save_results(results, args.out, "mochi-cosmos")


if __name__ == "__main__":
    main()
