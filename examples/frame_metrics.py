"""Measure every frame of a video without ever holding the video.

decode_frames yields one numpy frame at a time; keep what you measure, drop the frame. Here: each
frame's mean brightness and how much it differs from the one before (a crude flicker measure), for
a video of any length in the memory of one frame.

    python examples/frame_metrics.py --vae Wan2.1_VAE.pth --latents video.safetensors
    python examples/frame_metrics.py                              # generated latents, demo VAE
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import streamdec
from streamdec.demo import demo_latents, demo_vae


def metrics(vae, latents) -> list[dict]:
    rows, previous = [], None
    for i, frame in enumerate(streamdec.decode_frames(vae, latents)):
        current = frame.astype(np.float32)
        change = None if previous is None else float(np.abs(current - previous).mean())
        rows.append({"frame": i, "brightness": float(current.mean()), "change": change})
        previous = current  # one frame back is all that is kept
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="VAE checkpoint (default: the random-weight demo VAE)")
    parser.add_argument("--latents", help="latent file (default: generated)")
    parser.add_argument("--frames", type=int, default=9, help="latent frames of the generated latents")
    args = parser.parse_args(argv)
    vae = streamdec.load_vae(args.vae) if args.vae else demo_vae()
    if args.latents:
        latents = streamdec.latents.read_latents(args.latents)
    else:
        z = demo_latents(args.frames, 24, 32, generator=torch.Generator().manual_seed(0))
        latents = torch.cat([z] * (vae.latent_channels // z.shape[0]), dim=0)
    rows = metrics(vae, latents)
    for row in rows:
        change = "" if row["change"] is None else f", changed by {row['change']:.2f}"
        print(f"frame {row['frame']:5d}: brightness {row['brightness']:6.2f}{change}")
    flicker = max((r["change"] for r in rows[1:]), default=0.0)
    print(f"{len(rows)} frames; largest change between neighbours {flicker:.2f}")
    return rows


if __name__ == "__main__":
    main()
