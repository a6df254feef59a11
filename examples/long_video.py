"""Decode a ten-minute video in a fixed memory budget, into a file and into ffmpeg.

Ten minutes at 16 fps is 9,601 frames (2,401 latent frames). With `max_vram=8` streamdec picks the
offload mode and exact tiles that keep the decode under 8 GiB, whatever the length; the mp4 is
written fragmented, so it is playable at every moment, even if the run is killed. The second video
goes to ffmpeg through a pipe (y4m), for whatever ffmpeg does next.

    python examples/long_video.py --vae Wan2.1_VAE.pth --latents long.safetensors -o long.mp4
    python examples/long_video.py -o long.mp4 --minutes 0.5       # generated latents, demo VAE
"""

from __future__ import annotations

import argparse
import shutil
import subprocess

import torch

import streamdec
from streamdec.demo import demo_latents, demo_vae


def latents_for(vae, minutes: float, size: tuple[int, int], fps: float = 16) -> torch.Tensor:
    """Generated stand-in latents for a video of `minutes` (use your model's instead)."""
    latent_frames = round(minutes * 60 * fps / vae.temporal_ratio) + 1
    z = demo_latents(latent_frames, *size, generator=torch.Generator().manual_seed(0))
    return torch.cat([z] * (vae.latent_channels // z.shape[0]), dim=0)


def to_ffmpeg(vae, latents, output: str, max_vram: float | None) -> int:
    """Pipe the frames into `ffmpeg -i - OUTPUT` (y4m over stdin)."""
    ffmpeg = subprocess.Popen(["ffmpeg", "-v", "error", "-y", "-i", "-", "-c:v", "libx264", output],
                              stdin=subprocess.PIPE)  # fmt: skip
    try:
        written = streamdec.decode_to_file(vae, latents, ffmpeg.stdin, format="y4m", max_vram=max_vram, progress=False)
    finally:
        ffmpeg.stdin.close()
    if ffmpeg.wait() != 0:
        raise RuntimeError(f"ffmpeg failed on {output}")
    return written


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="VAE checkpoint (default: the random-weight demo VAE)")
    parser.add_argument("--latents", help="latent file (default: generated)")
    parser.add_argument("-o", "--output", default="long.mp4")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the generated latents")
    parser.add_argument("--size", default="24x32", help="latent height x width of the generated latents")
    parser.add_argument("--max-vram", type=float, default=8.0, help="GiB the decode may use (0: no limit)")
    args = parser.parse_args(argv)

    max_vram = args.max_vram or None
    vae = streamdec.load_vae(args.vae, max_vram=max_vram) if args.vae else demo_vae()
    if args.latents:
        latents = streamdec.latents.read_latents(args.latents)
    else:
        latents = latents_for(vae, args.minutes, tuple(int(s) for s in args.size.split("x")))
    counts = {"file": streamdec.decode_to_file(vae, latents, args.output, max_vram=max_vram)}
    print(f"{counts['file']} frames in {args.output}")
    if shutil.which("ffmpeg"):
        piped = args.output.rsplit(".", 1)[0] + "-ffmpeg.mp4"
        counts["ffmpeg"] = to_ffmpeg(vae, latents, piped, max_vram)
        print(f"{counts['ffmpeg']} frames through ffmpeg into {piped}")
    else:
        print("ffmpeg is not installed: skipped the pipe")
    return counts


if __name__ == "__main__":
    main()
