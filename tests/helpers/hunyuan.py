"""HunyuanVideo VAEs for the tests: diffusers' AutoencoderKLHunyuanVideo (the reference) with random weights."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLHunyuanVideo


def random_hunyuan(seed: int = 0, layers_per_block: int = 1) -> AutoencoderKLHunyuanVideo:
    """A small diffusers HunyuanVideo VAE (widths 32..64, the released 32 norm groups) with random
    weights, norm gains and biases."""
    torch.manual_seed(seed)
    model = AutoencoderKLHunyuanVideo(block_out_channels=(32, 32, 64, 64), layers_per_block=layers_per_block).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model
