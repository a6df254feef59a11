"""Generate with a diffusers pipeline, then stream its latents into a video file.

A pipeline's own decode returns the whole video at once (and the VAE's peak memory with it). Ask
it for latents instead and let streamdec decode them frame by frame, with the pipeline's own VAE
and normalization:

    python examples/diffusers_pipeline.py "a red fox in the snow" -o fox.mp4
    python examples/diffusers_pipeline.py "..." --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 81
"""

from __future__ import annotations

import argparse

from streamdec import pipelines


def load_pipeline(model: str):
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def run(pipe, output: str, fps: float = 16, **call) -> int:
    latents = pipe(output_type="latent", **call).frames  # the video stays as latents
    return pipelines.to_file(pipe, latents, output, fps=fps)  # its own VAE, its own normalization


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="video.mp4")
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    written = run(pipe, args.output, prompt=args.prompt, num_frames=args.frames, num_inference_steps=args.steps)
    print(f"{written} frames in {args.output}")
    return written


if __name__ == "__main__":
    main()
