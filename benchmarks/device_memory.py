"""Device memory of the full-size Wan 2.1 decoder at 480p, 720p and 1080p, streamdec against
diffusers, as traced on the meta device (no GPU needed; minutes on a CPU).

    python benchmarks/device_memory.py

Both decoders run for real on the "meta" device, where tensors have shapes but no data, under
streamdec.memory.MemoryTrace, which counts the bytes of every tensor alive at each step: the peak
of what torch would allocate on a GPU for the same decode, weights included. It is an estimate
(it leaves out cuDNN workspaces and the caching allocator's rounding; see docs/benchmarks) made the
same way for both, so the two compare. This is also how streamdec plans a decode under `max_vram`.

Rows: diffusers `decode` untiled and with `enable_tiling()` (its defaults) at two lengths;
streamdec untiled and with exact tiles (caches parked on the host between turns, as on a GPU),
and the plans `max_vram` picks for a 24 GiB card and for 8 GiB left beside a diffusion model.
Results: docs/benchmarks/device-memory-meta.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from _harness import GIB, ROOT, save_results

SIZES = {"480p": (60, 104), "720p": (90, 160), "1080p": (135, 240)}  # latent pixels (832x480 is Wan's 480p)
LENGTHS = (21, 81)  # video frames
TILES = (64, 32, 16)  # latent pixels
BUDGETS = (24, 8)  # GiB


def random_vae(dtype: torch.dtype):
    """streamdec's VAE for a full-size Wan 2.1 decoder (the estimates need no weight values)."""
    from streamdec.families import by_name
    from streamdec.families.wan import WanConfig
    from streamdec.vae import VAE

    family, config = by_name("wan2.1"), WanConfig()  # the released sizes
    with torch.device("meta"):
        decoder = family.build(config).to(dtype)
    vae = VAE(family, config, decoder, torch.device("meta"), dtype, dtype, "random full-size Wan 2.1")
    vae.device = torch.device("cuda")  # estimate as for a GPU: tile caches parked on the host
    return vae


def diffusers_peak(size, frames: int, dtype: torch.dtype, tiling: bool) -> int:
    from diffusers import AutoencoderKLWan

    from streamdec.memory import MemoryTrace

    with torch.device("meta"):
        model = AutoencoderKLWan()
    model = model.to(dtype).eval()
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(("encoder", "quant_conv")))
    if tiling:
        model.enable_tiling()
    trace = MemoryTrace(device="meta")
    with torch.no_grad(), trace:
        z = torch.empty(1, 16, (frames - 1) // 4 + 1, *size, device="meta", dtype=dtype)
        video = model.decode(z).sample
        del video, z
    return trace.peak + weights


def measure(dtype: torch.dtype) -> list[dict]:
    from streamdec import memory

    vae = random_vae(dtype)
    rows = []

    def add(name: str, size_name: str, peak: int, seconds: float, **extra) -> None:
        rows.append({"resolution": size_name, "method": name, "peak_gib": round(peak / GIB, 3),
                     "estimate_seconds": round(seconds, 1), **extra})  # fmt: skip
        print(f"   {size_name:5s} {name:42s} {peak / GIB:7.2f} GiB   ({seconds:.1f} s)", flush=True)

    for size_name, size in SIZES.items():
        for frames in LENGTHS:
            for tiling in (False, True):
                start = time.perf_counter()
                peak = diffusers_peak(size, frames, dtype, tiling)
                add(f"diffusers {'enable_tiling()' if tiling else 'untiled'}, {frames} frames", size_name, peak,
                    time.perf_counter() - start, frames=frames)  # fmt: skip
        for tile in (None, *TILES):
            start = time.perf_counter()
            peak = memory.estimate_peak(vae, size, tile=None if tile is None else (tile, tile))
            add(f"streamdec {'untiled' if tile is None else f'tile {tile}'}, any length", size_name, peak,
                time.perf_counter() - start, tile=tile)  # fmt: skip
        for budget in BUDGETS:
            vae.max_vram, vae.offload = budget, "auto"
            start = time.perf_counter()
            try:
                plan = memory.plan_decode(vae, size)
                add(f"streamdec max_vram={budget}: {plan.offload}, {plan.tile and plan.tile[0] or 'untiled'}",
                    size_name, plan.peak_bytes, time.perf_counter() - start, max_vram=budget,
                    offload=plan.offload, tile=plan.tile and plan.tile[0])  # fmt: skip
            except memory.BudgetError as err:
                rows.append({"resolution": size_name, "method": f"streamdec max_vram={budget}", "error": str(err)})
                print(f"   {size_name:5s} max_vram={budget}: {err}", flush=True)
            vae.max_vram = None
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", help="bf16 (default) or fp32")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = parser.parse_args(argv)
    from streamdec.vae import resolve_dtype

    results = {"device": "meta", "method": "MemoryTrace on the meta device (estimated device peak, weights included)",
               "dtype": args.dtype, "rows": measure(resolve_dtype(args.dtype))}  # fmt: skip
    save_results(results, args.out, "device-memory")


if __name__ == "__main__":
    main()
