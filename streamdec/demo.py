"""The built-in demo: a Wan 2.1 decoder of the released shape with random weights (at a reduced
width, so it runs on a laptop CPU), and smooth, moving latents to feed it. No download needed;
the video shows the machinery (streaming, encoding), not a trained model's pictures."""

from __future__ import annotations

import math

import torch

from .families.wan import Wan21, WanConfig
from .layers import compile_norms, prepare_layout
from .vae import VAE, resolve_device, resolve_dtype


def demo_vae(width: int = 16, device=None, dtype=None, seed: int = 0, compile: bool = False) -> VAE:
    if width < 1:
        raise ValueError(f"--width must be a positive number of channels, not {width}")
    family, config = Wan21(), WanConfig(base_dim=width)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = family.build(config)
        with torch.no_grad():
            for name, p in decoder.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.05 * torch.randn_like(p))
    decoder = decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    prepare_layout(decoder, device)
    if compile:
        compile_norms(decoder)
    return VAE(family, config, decoder, device, dtype, torch.float32, f"random-weight demo decoder (width {width})")


def demo_latents(frames: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(16, frames, height, width) normalized latents: per channel, a few plane waves drifting in time."""
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"the demo needs at least one latent frame of at least 1x1, not {frames}x{height}x{width}")
    t = torch.arange(frames).view(-1, 1, 1).float()
    y = torch.arange(height).view(1, -1, 1).float()
    x = torch.arange(width).view(1, 1, -1).float()
    channels = []
    for _ in range(16):
        kx, ky, speed, phase = (torch.rand(4, generator=generator) * torch.tensor([0.4, 0.4, 0.6, 2 * math.pi])).tolist()
        channels.append(torch.sin(kx * x + ky * y + speed * t + phase).expand(frames, height, width))
    return torch.stack(channels)
