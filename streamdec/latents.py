"""Latents in: validation of tensors and arrays, and reading latent files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .checkpoints import CheckpointError, read_torch_file
from .errors import one_line


def as_latents(latents, channels: int, what: str = "latents") -> torch.Tensor:
    """Check `latents` and return them as a (1, C, T, h, w) tensor (no copy where possible).

    Accepts a torch tensor or a numpy array shaped (C, T, h, w) or (1, C, T, h, w). Raises a
    ValueError (TypeError for a wrong type) whose message says what is wrong."""
    if isinstance(latents, np.ndarray):
        if not (np.issubdtype(latents.dtype, np.floating)):
            raise ValueError(f"{what} have dtype {latents.dtype}; expected floating point values")
        latents = torch.from_numpy(latents)
    elif not isinstance(latents, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or a numpy array, not {type(latents).__name__}")
    if not latents.is_floating_point():
        raise ValueError(f"{what} have dtype {latents.dtype}; expected floating point values")
    shape = tuple(latents.shape)
    if latents.dim() == 5:
        if shape[0] != 1:
            raise ValueError(
                f"{what} hold a batch of {shape[0]} videos {shape}; decode one video at a time, e.g. latents[i]"
            )
    elif latents.dim() == 4:
        latents = latents.unsqueeze(0)
    else:
        raise ValueError(
            f"{what} have shape {shape} ({latents.dim()} dimensions); expected (C, T, h, w) or (1, C, T, h, w)"
        )
    _, c, t, h, w = latents.shape
    if c != channels:
        raise ValueError(
            f"{what} have {c} channels (shape {shape}) but this VAE takes {channels}; "
            "they were made for another model, or their axes are in another order (expected C before T)"
        )
    if t == 0:
        raise ValueError(f"{what} have no frames (T = 0 in shape {shape})")
    if h == 0 or w == 0:
        raise ValueError(f"{what} have an empty frame size {h}x{w} (shape {shape})")
    if not bool(torch.isfinite(latents).all()):
        bad = int((~torch.isfinite(latents)).sum())
        raise ValueError(f"{what} contain {bad} NaN or infinite values; the diffusion run that made them diverged")
    return latents


def read_latents(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """Read a latent tensor from .safetensors (one tensor, the key `latents`, or `key`),
    .pt/.pth (a tensor, or a dict holding one) or .npy. Raises ValueError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latent file {path} does not exist" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".safetensors", ".pt", ".pth", ".bin"):
        raise ValueError(f"latent file {path} has an unknown type {suffix!r}; use .safetensors, .pt, .pth or .npy")
    try:
        if suffix == ".npy":
            tensors = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = read_torch_file(path, "latent file")
    except CheckpointError:
        raise
    except Exception as err:  # corrupt files raise anything from pickle, zipfile, numpy or safetensors
        raise ValueError(f"cannot read latent file {path}: {one_line(err)}") from None
    return _pick_tensor(tensors, key, path)


def _pick_tensor(obj, key: str | None, path: Path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise ValueError(f"{path} holds a single tensor, not a dict; drop --key")
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{path} has no tensor named {key!r}; it has: {', '.join(sorted(tensors)[:8])}")
        return tensors[key]
    if "latents" in tensors:
        return tensors["latents"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    names = ", ".join(sorted(tensors)[:8]) or "none"
    raise ValueError(f"{path} holds several tensors ({names}) and none is named 'latents'; choose one with --key")

