"""Mochi VAEs for the tests: diffusers' AutoencoderKLMochi (the reference) with random weights, its
decoder under genmo's names (genmo's decoder.safetensors), and genmo's decoding rule replayed on it."""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKLMochi

# Small widths (GroupNorm takes 32 groups, so multiples of 32), one or two resnets per block; the
# released expansions (time x1, x2, x3 and space x2 each).
SMALL = dict(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 64, 64),
             layers_per_block=(1, 1, 2, 1, 1), add_attention_block=(False, False, False, False, False))  # fmt: skip


def random_mochi(seed: int = 0, **sizes) -> AutoencoderKLMochi:
    """A small diffusers Mochi VAE with random weights, norm gains and biases."""
    torch.manual_seed(seed)
    model = AutoencoderKLMochi(**{**SMALL, **sizes}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def genmo_state_dict(model) -> dict[str, torch.Tensor]:
    """The decoder's weights under genmo's names (its decoder.safetensors: no prefix), written from
    diffusers' conversion script (scripts/convert_mochi_to_diffusers.py), in the other direction."""
    up_blocks = len(model.decoder.up_blocks)
    stack = {"norm1.norm_layer": 0, "conv1.conv": 2, "norm2.norm_layer": 3, "conv2.conv": 5}
    out = {}
    for key, value in model.decoder.state_dict().items():
        m = re.fullmatch(r"(block_in|block_out|up_blocks\.(\d+))\.resnets\.(\d+)\.(\w+\.\w+)\.(weight|bias)", key)
        if key.startswith("conv_in."):
            name = key.replace("conv_in.", "blocks.0.0.")
        elif key.startswith("proj_out."):
            name = key.replace("proj_out.", "output_proj.")
        elif re.fullmatch(r"up_blocks\.\d+\.proj\.\w+", key):
            block = int(key.split(".")[1])
            name = f"blocks.{block + 1}.proj.{key.rsplit('.', 1)[1]}"
        else:
            where, up, index, layer, kind = m.groups()
            tail = f"stack.{stack[layer]}.{kind}"
            name = {"block_in": f"blocks.0.{int(index) + 1}.{tail}",
                    "block_out": f"blocks.{up_blocks + 1}.{index}.{tail}"}.get(where)  # fmt: skip
            name = name or f"blocks.{int(up) + 1}.blocks.{index}.{tail}"
        out[name] = value.clone().contiguous()
    return out


def denormalize(model, z: torch.Tensor) -> torch.Tensor:
    """What MochiPipeline does to its latents before vae.decode."""
    cfg = model.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return z * std / cfg.scaling_factor + mean


def reference(model, z: torch.Tensor) -> torch.Tensor:
    """diffusers' decode of normalized latents (1, C, T, h, w), de-normalized as the pipeline does
    -> (3, F, H, W), clamped as frames are."""
    with torch.no_grad():
        return model.decode(denormalize(model, z)).sample[0].clamp(-1, 1)


def genmo_rule(model, z: torch.Tensor) -> torch.Tensor:
    """The same weights decoded by genmo's rule: each upsampler drops its first t - 1 frames
    (genmo's DepthToSpaceTime), nothing is trimmed at the end. Written on diffusers' blocks, whose
    depth-to-space lays channels out as genmo's rearrange does."""
    d = model.decoder
    with torch.no_grad():
        x, _ = d.block_in(d.conv_in(denormalize(model, z)))
        for up in d.up_blocks:
            x, _ = up(x)
            x = x[:, :, up.temporal_expansion - 1 :]
        x, _ = d.block_out(x)
        x = d.proj_out(d.nonlinearity(x).permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
    return x[0].clamp(-1, 1)
