"""Peak memory and time against video length for Open-Sora-Plan's VAEs: streamdec's stream next to
the reference's untiled decode (the whole latent through the decoder at once, which is what
Open-Sora-Plan runs unless tiling is on), on the same full-size random-weight decoder.

    python benchmarks/opensora_plan.py                 # CPU, 128x128 frames, 33 to 129 frames
    python benchmarks/opensora_plan.py --device cuda   # 512x512 (the 65-frame case of 1x4x17x64x64)

- causalvae: the released v1.2 CausalVAE. streamdec runs the reference's tiled decode (6-latent
  windows every 4, 512-pixel tiles); the untiled decode's output differs from it (GroupNorm spans
  the clip), as it does in the reference.
- wfvae: Open-Sora-Plan v1.3's WF-VAE (8 latent channels). streamdec's stream equals the untiled
  decode.

Both sides turn every frame into uint8 as a user writing a video would; streamdec keeps none. Peak
memory: host RSS growth (CPU) or torch.cuda.max_memory_allocated (CUDA). One fresh process per run.
Results: docs/benchmarks/opensora-plan-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from _harness import ROOT, machine, measured, run_in_process, save_results, summary


def build(family: str, device: str, dtype: torch.dtype):
    """A released-size decoder with random weights (no download here), loaded like a checkpoint."""
    import streamdec
    from streamdec.families.opensora_plan import CausalVAEConfig, CausalVAEDecoder
    from streamdec.families.wfvae import WFVAEConfig, WFVAEDecoder

    torch.manual_seed(0)
    module = CausalVAEDecoder(CausalVAEConfig()) if family == "causalvae" else WFVAEDecoder(WFVAEConfig())
    weights = {}
    for name, p in module.state_dict().items():  # the names are the official checkpoints'
        weights[name] = torch.randn_like(p) / p[0].numel() ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p)
    path = Path(tempfile.mkdtemp()) / f"{family}.safetensors"
    save_file(weights, path)
    return streamdec.load_vae(path, device=device, dtype=dtype)


def run(family: str, method: str, frames: int, size, device: str, dtype: str) -> dict:
    import streamdec
    from streamdec.frames import to_uint8

    vae = build(family, device, streamdec.vae.resolve_dtype(dtype))
    z = torch.randn(1, vae.latent_channels, (frames - 1) // 4 + 1, *size, generator=torch.Generator().manual_seed(1))
    z = z.to(device=device, dtype=vae.dtype)

    def work() -> dict:
        if method == "streamdec":
            count = sum(1 for _ in streamdec.decode_frames(vae, z, normalized=False))
        else:
            with torch.inference_mode():
                count = len(to_uint8(vae.decoder(z)).cpu().numpy())
        return {"family": family, "method": method, "frames": count}

    return measured(device, work)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", default="causalvae,wfvae")
    parser.add_argument("--lengths", help="video lengths in frames (1 + 4k)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        family, method, frames, h, w, dtype = args.worker
        print(json.dumps(run(family, method, int(frames), (int(h), int(w)), args.device, dtype)))
        return

    cpu = args.device == "cpu"
    size, dtype = ((16, 16), "fp32") if cpu else ((64, 64), "bf16")
    lengths = [int(n) for n in (args.lengths or ("33,65,129" if cpu else "65,129,257")).split(",")]
    results = {"machine": machine(args.device), "device": args.device, "size": size, "dtype": dtype, "runs": []}
    for family in args.families.split(","):
        print(f"== {family}, latents {size[0]}x{size[1]} -> {size[0] * 8}x{size[1] * 8}, {dtype}", flush=True)
        for frames in lengths:
            for method in ("streamdec", "untiled"):
                cmd = [sys.executable, __file__, "--device", args.device, "--worker", family, method, str(frames),
                       *map(str, size), dtype]  # fmt: skip
                run_ = run_in_process(cmd, family=family, method=method, frames=frames)
                results["runs"].append(run_)
                print(f"   {frames:4d} frames {method:9s}: " + summary(run_), flush=True)
    save_results(results, args.out, "opensora-plan")


if __name__ == "__main__":
    main()
