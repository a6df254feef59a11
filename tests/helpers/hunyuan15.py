"""HunyuanVideo-1.5 VAEs for the tests: diffusers' AutoencoderKLHunyuanVideo15 (the reference) with random
weights, and its weights under the names of Tencent's code (the official vae/ folder, ComfyUI's file)."""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKLHunyuanVideo15

SMALL = dict(block_out_channels=(16, 16, 32, 32, 32), latent_channels=8, layers_per_block=1)

# diffusers name -> the official one, written out from diffusers' conversion script
# (scripts/convert_hunyuan_video1_5_to_diffusers.py), in the other direction
_TO_OFFICIAL = [
    (r"^decoder\.mid_block\.resnets\.0\.", "decoder.mid.block_1."),
    (r"^decoder\.mid_block\.resnets\.1\.", "decoder.mid.block_2."),
    (r"^decoder\.mid_block\.attentions\.0\.to_([qkv])\.", r"decoder.mid.attn_1.\1."),
    (r"^decoder\.mid_block\.attentions\.0\.", "decoder.mid.attn_1."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.\1.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample."),
]


def random_hunyuan15(seed: int = 0, **sizes) -> AutoencoderKLHunyuanVideo15:
    """A small diffusers HunyuanVideo-1.5 VAE with random weights, norm gains and biases."""
    torch.manual_seed(seed)
    model = AutoencoderKLHunyuanVideo15(**{**SMALL, **sizes}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights (encoder too) with the decoder under the official names."""
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in _TO_OFFICIAL:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone().contiguous()
    return out


def official_config(model) -> dict:
    """config.json of the official vae/ folder (Tencent's AutoencoderKLConv3D)."""
    cfg = model.config
    return {"_class_name": "AutoencoderKLConv3D", "in_channels": 3, "out_channels": 3,
            "latent_channels": cfg.latent_channels, "block_out_channels": list(cfg.block_out_channels),
            "layers_per_block": cfg.layers_per_block, "ffactor_spatial": 16, "ffactor_temporal": 4,
            "scaling_factor": cfg.scaling_factor}  # fmt: skip


def reference(model, z: torch.Tensor, tiling: dict | None = None) -> torch.Tensor:
    """diffusers' decode of normalized latents (1, C, T, h, w), as the pipeline does (z / scaling
    factor) -> (3, F, H, W), clamped as frames are."""
    model.use_tiling = False
    if tiling:
        model.enable_tiling(**tiling)
    try:
        with torch.no_grad():
            return model.decode(z / model.config.scaling_factor).sample[0].clamp(-1, 1)
    finally:
        model.use_tiling = False
