"""diffusers pipelines: stream a pipeline's latents through its own VAE, normalized as it normalizes them.

    latents = pipe(prompt, ..., output_type="latent").frames     # (videos, C, T, h, w)
    streamdec.pipelines.to_file(pipe, latents, "video.mp4", fps=16)
    for frame in streamdec.pipelines.frames(pipe, latents): ...

A diffusers video pipeline asked for `output_type="latent"` returns the latents as its transformer
made them, before the de-normalization it applies ahead of `vae.decode` (Wan: `z * std + mean` with
the VAE config's statistics; HunyuanVideo and others: `z / scaling_factor`). streamdec reads the same
constants from the pipeline's VAE, so these latents go in as they are.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import load_vae
from .errors import StreamdecError
from .stream import decode_frames, decode_to_file
from .vae import VAE

_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline VAE module -> streamdec VAE


def from_pipeline(pipe, device=None, dtype=None, **load_options) -> VAE:
    """streamdec's VAE for `pipe.vae` (on its device, in its dtype, unless given), loaded once per
    pipeline VAE and reused."""
    module = getattr(pipe, "vae", None)
    if not isinstance(module, torch.nn.Module):
        raise StreamdecError(f"{type(pipe).__name__} has no vae to decode with; pass a diffusers pipeline")
    weight = next(module.parameters())
    device = device or getattr(pipe, "_execution_device", None) or weight.device
    key = (str(device), str(dtype or weight.dtype), tuple(sorted(load_options.items())))
    loaded = _LOADED.setdefault(module, {})
    if key not in loaded:
        loaded[key] = load_vae(module, device=device, dtype=dtype or weight.dtype, **load_options)
    return loaded[key]


def frames(pipe, latents, video: int = 0, **decode_options) -> Iterator:
    """The frames of video `video` of a pipeline's latents (`output_type="latent"`), streamed;
    `decode_options` as streamdec.decode_frames takes them."""
    return decode_frames(from_pipeline(pipe), _one_video(latents, video), normalized=True, **decode_options)


def to_file(pipe, latents, path, **file_options) -> int:
    """Stream a pipeline's latents (`output_type="latent"`) into a video file; `file_options` as
    streamdec.decode_to_file takes them. Several videos (a batch) go to `path` with _1, _2, ... before
    its extension, the first to `path` itself. Returns the frames written (all videos')."""
    vae = from_pipeline(pipe)
    count = _videos(latents)
    written = 0
    for i in range(count):
        target = path if i == 0 or not isinstance(path, (str, os.PathLike)) else _numbered(Path(path), i)
        written += decode_to_file(vae, _one_video(latents, i), target, normalized=True, **file_options)
    return written


def _videos(latents) -> int:
    return latents.shape[0] if getattr(latents, "dim", lambda: 0)() == 5 else 1


def _one_video(latents, i: int):
    if not isinstance(latents, torch.Tensor):
        raise StreamdecError(f"pipeline latents must be a torch tensor (output_type='latent'), not {type(latents).__name__}")
    if latents.dim() == 5:
        if not 0 <= i < latents.shape[0]:
            raise StreamdecError(f"the latents hold {latents.shape[0]} videos; there is no video {i}")
        return latents[i]
    return latents


def _numbered(path: Path, i: int) -> Path:
    return path.with_name(f"{path.stem}_{i}{path.suffix}")
