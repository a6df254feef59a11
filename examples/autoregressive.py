"""Show frames while an autoregressive video model is still generating.

Autoregressive generators (Self-Forcing, CausVid, MAGI-style) hand over their latents a few frames at
a time. Push each chunk into a StreamDecoder and the frames that are final come back at once; here
they are written to a video file and each is summed up on the terminal as it arrives.

    python examples/autoregressive.py --vae Wan2.1_VAE.pth -o live.mp4
    python examples/autoregressive.py -o live.mp4            # no checkpoint: the random-weight demo VAE

`generate()` stands in for your model: swap in its chunks of latents (C, t, h, w).
"""

from __future__ import annotations

import argparse
import time

import torch

import streamdec
from streamdec.demo import demo_latents, demo_vae
from streamdec.sinks import FrameWriter, open_sink


def generate(chunks: int, frames_per_chunk: int, size: tuple[int, int], channels: int):
    """A stand-in generator: smooth latents, handed over `frames_per_chunk` latent frames at a time."""
    video = demo_latents(chunks * frames_per_chunk, *size, generator=torch.Generator().manual_seed(0))
    video = torch.cat([video] * (channels // video.shape[0]), dim=0)  # as many channels as the VAE takes
    for start in range(0, video.shape[1], frames_per_chunk):
        time.sleep(0.05)  # the model "thinking"
        yield video[:, start : start + frames_per_chunk]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="VAE checkpoint (default: the random-weight demo VAE)")
    parser.add_argument("-o", "--output", default="live.mp4")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--frames-per-chunk", type=int, default=3, help="latent frames per generator step")
    parser.add_argument("--size", default="24x32", help="latent height x width")
    args = parser.parse_args(argv)

    vae = streamdec.load_vae(args.vae) if args.vae else demo_vae()
    h, w = (int(s) for s in args.size.split("x"))
    stream = streamdec.StreamDecoder(vae)
    sink = open_sink(args.output, w * vae.spatial_ratio, h * vae.spatial_ratio, fps=16)
    shown = 0
    with FrameWriter(sink) as writer:
        for i, chunk in enumerate(generate(args.chunks, args.frames_per_chunk, (h, w), vae.latent_channels)):
            for frame in stream.push(chunk):  # final now: show it, write it, let it go
                writer.put(frame)
                shown += 1
            print(f"chunk {i}: {shown} frames so far, the last with mean colour {frame.mean(axis=(0, 1)).round(1)}")
        for frame in stream.close():
            writer.put(frame)
            shown += 1
    print(f"{shown} frames in {args.output}")
    return shown


if __name__ == "__main__":
    main()
