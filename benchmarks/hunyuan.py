"""Peak memory and time against video length: streamdec's replayed HunyuanVideo windows next to
diffusers' `AutoencoderKLHunyuanVideo.decode` (default framewise decoding) on the same full-size
random-weight decoder.

    python benchmarks/hunyuan.py                 # CPU, 64x96 frames, 17 to 49 frames (minutes)
    python benchmarks/hunyuan.py --device cuda   # 480p, 17 to 129 frames, bf16

Both sides decode the same latents and turn every frame into uint8, as a user writing a video
would; streamdec hands each frame out and keeps none. Peak memory: host RSS growth over the run
(CPU) or torch.cuda.max_memory_allocated (CUDA). Each run is a fresh process.
Results: docs/benchmarks/hunyuan-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _harness import ROOT, diffusers_frames, machine, measured, run_in_process, save_results, summary


def build_models(device: str, dtype: torch.dtype):
    """The same random released-size HunyuanVideo VAE for both sides."""
    from diffusers import AutoencoderKLHunyuanVideo

    import streamdec

    torch.manual_seed(0)
    reference = AutoencoderKLHunyuanVideo().eval()  # released sizes; weights random (no download here)
    ours = streamdec.load_vae(reference, device=device, dtype=dtype)
    return reference.to(device=device, dtype=dtype), ours


def run(method: str, frames: int, size, device: str, dtype: str) -> dict:
    import streamdec

    reference, ours = build_models(device, streamdec.vae.resolve_dtype(dtype))
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, *size, generator=torch.Generator().manual_seed(1))
    z = z.to(device=device, dtype=ours.dtype)

    def work() -> dict:
        if method == "streamdec":
            count = sum(1 for _ in streamdec.decode_frames(ours, z, normalized=False))
        else:
            count = len(diffusers_frames(reference, z))
        return {"method": method, "frames": count}

    return measured(device, work)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", help="video lengths in frames (1 + 4k)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, frames, h, w, dtype = args.worker
        print(json.dumps(run(method, int(frames), (int(h), int(w)), args.device, dtype)))
        return

    cpu = args.device == "cpu"
    size, dtype = ((8, 12), "fp32") if cpu else ((60, 104), "bf16")
    lengths = [int(n) for n in (args.lengths or ("17,33,49" if cpu else "17,49,97,129")).split(",")]
    results = {"machine": machine(args.device), "device": args.device, "size": size, "dtype": dtype, "runs": []}
    print(f"== HunyuanVideo VAE, latents {size[0]}x{size[1]} -> {size[0] * 8}x{size[1] * 8}, {dtype}", flush=True)
    for frames in lengths:
        for method in ("streamdec", "diffusers"):
            cmd = [sys.executable, __file__, "--device", args.device, "--worker", method, str(frames), *map(str, size),
                   dtype]  # fmt: skip
            run_ = run_in_process(cmd, method=method, frames=frames)
            results["runs"].append(run_)
            print(f"   {frames:4d} frames {method:9s}: " + summary(run_), flush=True)
    save_results(results, args.out, "hunyuan")


if __name__ == "__main__":
    main()
