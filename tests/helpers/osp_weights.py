"""Random weights for the Open-Sora-Plan VAEs, made the same way by the tests and by
`tests/data/osp/make_reference.py`, which decoded them with the official code.

The weights are drawn in sorted key order from one seeded generator, so a key list (the official
model's, in `tests/data/osp/*_keys.txt`) and a seed give the same tensors everywhere. The fixed
wavelet kernels WF-VAE stores beside its weights are not drawn; the reference file holds them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

DATA = Path(__file__).parents[1] / "data" / "osp"


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    """`name`_keys.txt: "key shape" per line, shape as comma-separated sizes (empty for a scalar)."""
    shapes = {}
    for line in (DATA / f"{name}_keys.txt").read_text().splitlines():
        key, _, shape = line.partition(" ")
        shapes[key] = tuple(int(s) for s in shape.split(",") if s)
    return shapes


def is_constant(key: str) -> bool:
    """WF-VAE's Haar wavelet kernels: fixed tensors, stored (encoder and decoder) but never trained."""
    return "wavelet_transform" in key


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        if is_constant(key):
            continue
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen)
        if len(shape) >= 2:  # conv / linear weights: unit-variance outputs
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("mix_factor"):
            out[key] = noise
        elif key.endswith("weight"):  # norm gains around 1
            out[key] = 1 + 0.1 * noise
        else:  # biases
            out[key] = 0.05 * noise
    return out
