"""Exact tiling against diffusers' blended tiling, on the same full-size random-weight Wan 2.1 VAE.

    python benchmarks/tiling.py                 # CPU, reduced size (128x192, a few minutes)
    python benchmarks/tiling.py --device cuda   # 720p and 1080p

For each tile size: decode time, peak memory (host RSS growth on CPU, max_memory_allocated on
CUDA) and the max abs error against the same method's untiled output. streamdec's tiles are in
latent pixels and exact; diffusers' `enable_tiling()` blends overlapping tiles (its default is
256 px tiles with a 192 px stride; here the same 4:3 tile/stride proportion at each size).
Each run is a fresh process. Results: docs/benchmarks/tiling-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from _harness import ROOT, build_models, latents_for, machine, measured, run_in_process, save_results, summary


def run(method: str, tile: int, size, frames: int, device: str, dtype: str, save: Path) -> dict:
    """tile: latent pixels; 0 = untiled. Saves the video (fp32) so errors can be taken later."""
    import streamdec

    reference, ours = build_models(device, streamdec.vae.resolve_dtype(dtype))
    z = latents_for(frames, size, device)
    videos = []  # kept out of the measure's result, saved after the clock stops

    def work() -> dict:
        if method == "streamdec":
            video = torch.stack(list(streamdec.decode_frames(ours, z, normalized=False, as_tensor=True, tile=tile or None)), 1)
        else:
            if tile:
                ratio = reference.spatial_compression_ratio
                reference.enable_tiling(tile_sample_min_height=tile * ratio, tile_sample_min_width=tile * ratio,
                                        tile_sample_stride_height=tile * ratio * 3 // 4,
                                        tile_sample_stride_width=tile * ratio * 3 // 4)  # fmt: skip
            with torch.no_grad():
                video = reference.decode(z).sample[0].float().cpu()
        videos.append(video)
        return {"method": method, "tile": tile}

    result = measured(device, work)
    torch.save(videos.pop(), save)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, tile, h, w, frames, dtype, save = args.worker
        print(json.dumps(run(method, int(tile), (int(h), int(w)), int(frames), args.device, dtype, Path(save))))
        return

    if args.device == "cpu":
        configs = [("cpu-128x192-fp32", (16, 24), 5, "fp32", [8, 12])]
    else:
        configs = [("720p-bf16", (90, 160), 9, "bf16", [16, 32, 48]), ("1080p-bf16", (135, 240), 9, "bf16", [16, 32, 48])]
    results = {"machine": machine(args.device), "device": args.device, "configs": []}
    work = Path(tempfile.mkdtemp())
    for name, size, frames, dtype, tiles in configs:
        print(f"== {name}, {frames} frames", flush=True)
        runs = []
        for method in ("streamdec", "diffusers"):
            for tile in [0, *tiles]:
                save = work / f"{method}-{tile}.pt"
                cmd = [sys.executable, __file__, "--device", args.device, "--worker", method, str(tile), *map(str, size),
                       str(frames), dtype, str(save)]  # fmt: skip
                run_ = run_in_process(cmd, method=method, tile=tile)
                if "error" not in run_:
                    untiled = torch.load(work / f"{method}-0.pt")
                    run_["max_abs_error_vs_untiled"] = (torch.load(save) - untiled).abs().max().item()
                runs.append(run_)
                print(f"   {method:9s} tile {tile or 'none':>4}: " + describe(run_), flush=True)
        results["configs"].append({"name": name, "size": size, "frames": frames, "dtype": dtype, "runs": runs})
    save_results(results, args.out, "tiling")


def describe(run: dict) -> str:
    if "error" in run:
        return summary(run)
    return summary(run) + f", max error vs untiled {run['max_abs_error_vs_untiled']:.2e}"


if __name__ == "__main__":
    main()
