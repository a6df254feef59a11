"""Time and memory against video length: streamdec's replayed calls next to diffusers' own decode, for
the CogVideoX VAE (`AutoencoderKLCogVideoX`) and KVAE-3D (`AutoencoderKLKVAEVideo`), on full-size
random-weight decoders.

    python benchmarks/cogvideox_kvae.py                 # CPU, 16x24 frames, fp32 (minutes)
    python benchmarks/cogvideox_kvae.py --device cuda   # 480p, bf16

Both sides decode the same latents and turn every frame into uint8, as a user writing a video would;
streamdec hands each frame out and keeps none. Memory: the peak bytes of all torch tensors the
decode makes (streamdec.memory.MemoryTrace: caches, activations, the decoded video, frames; not the
weights built before), which is exact and repeatable where host RSS moves with the allocators; also
host RSS growth, and on CUDA torch.cuda.max_memory_allocated. Times are taken under the trace (the
same small per-operation cost on both sides). Each run is a fresh process.
Results: docs/benchmarks/cogvideox-kvae-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _harness import ROOT, machine, measured, run_in_process, save_results, summary, traced_decode

FAMILIES = {"cogvideox": "AutoencoderKLCogVideoX", "kvae3d": "AutoencoderKLKVAEVideo"}
LATENTS = {"cogvideox": (3, 7, 11), "kvae3d": (5, 9, 13)}  # odd CogVideoX lengths: the released 4T - 3 frames


def build_models(family: str, device: str, dtype: torch.dtype):
    """The same random released-size decoder for both sides (norm gains and biases random too)."""
    import diffusers

    import streamdec

    torch.manual_seed(0)
    reference = getattr(diffusers, FAMILIES[family])().eval()  # released sizes; weights random (no download)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm_layer" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ours = streamdec.load_vae(reference, device=device, dtype=dtype)
    return reference.to(device=device, dtype=dtype), ours


def run(family: str, method: str, latent_frames: int, size, device: str, dtype: str) -> dict:
    import streamdec

    reference, ours = build_models(family, device, streamdec.vae.resolve_dtype(dtype))
    z = torch.randn(1, 16, latent_frames, *size, generator=torch.Generator().manual_seed(1))
    z = z.to(device=device, dtype=ours.dtype)
    if method == "streamdec":
        del reference  # each side holds only what it needs

    def work() -> dict:
        count, peak = traced_decode(ours if method == "streamdec" else reference, z)  # the side this process kept
        return {"family": family, "method": method, "latent_frames": latent_frames, "frames": count,
                "tensor_peak_bytes": peak}  # fmt: skip

    return measured(device, work)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", default="cogvideox,kvae3d")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        family, method, latent_frames, h, w, dtype = args.worker
        print(json.dumps(run(family, method, int(latent_frames), (int(h), int(w)), args.device, dtype)))
        return

    cpu = args.device == "cpu"
    size, dtype = ((2, 3), "fp32") if cpu else ((60, 90), "bf16")
    results = {"machine": machine(args.device), "device": args.device, "size": size, "dtype": dtype, "runs": []}
    for family in args.families.split(","):
        print(f"== {FAMILIES[family]}, latents {size[0]}x{size[1]} -> {size[0] * 8}x{size[1] * 8}, {dtype}", flush=True)
        for latent_frames in LATENTS[family]:
            for method in ("streamdec", "diffusers"):
                cmd = [sys.executable, __file__, "--device", args.device, "--worker", family, method,
                       str(latent_frames), *map(str, size), dtype]  # fmt: skip
                run_ = run_in_process(cmd, family=family, method=method, latent_frames=latent_frames)
                results["runs"].append(run_)
                peak = run_.get("tensor_peak_bytes")
                extra = f", tensors {peak / 2**20:8.1f} MiB" if peak is not None else ""
                print(f"   {latent_frames:3d} latents ({run_.get('frames', '?')} frames) {method:9s}: "
                      + summary(run_) + extra, flush=True)  # fmt: skip
    save_results(results, args.out, "cogvideox-kvae")


if __name__ == "__main__":
    main()
