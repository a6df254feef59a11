"""Cosmos tokenizers for the tests: diffusers' AutoencoderKLCosmos (the reference) with random weights,
and its weights under NVIDIA's names (the state dict of the Cosmos-Tokenizer's autoencoder.jit)."""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKLCosmos

# Small widths, 2 resnets per up block; the released structure otherwise (patch 4, one up block that
# doubles time and space, attention in the mid block only).
SMALL = dict(encoder_block_out_channels=(8, 16, 16, 16), decode_block_out_channels=(16, 32, 32, 32), num_layers=1)

# diffusers' scripts/convert_cosmos_to_diffusers.py (VAE_KEYS_RENAME_DICT): NVIDIA's name -> diffusers',
# substrings replaced in this order.
CONVERTER_RENAMES = [
    ("down.0", "down_blocks.0"), ("down.1", "down_blocks.1"), ("down.2", "down_blocks.2"),
    ("up.0", "up_blocks.2"), ("up.1", "up_blocks.1"), ("up.2", "up_blocks.0"), (".block.", ".resnets."),
    ("downsample", "downsamplers.0"), ("upsample", "upsamplers.0"), ("mid.block_1", "mid_block.resnets.0"),
    ("mid.attn_1.0", "mid_block.attentions.0"), ("mid.attn_1.1", "mid_block.temp_attentions.0"),
    ("mid.block_2", "mid_block.resnets.1"), (".q.conv3d", ".to_q"), (".k.conv3d", ".to_k"), (".v.conv3d", ".to_v"),
    (".proj_out.conv3d", ".to_out.0"), (".0.conv3d", ".conv_s"), (".1.conv3d", ".conv_t"), ("conv1.conv3d", "conv1"),
    ("conv2.conv3d", "conv2"), ("conv3.conv3d", "conv3"), ("nin_shortcut.conv3d", "conv_shortcut"),
    ("quant_conv.conv3d", "quant_conv"), ("post_quant_conv.conv3d", "post_quant_conv"),
]  # fmt: skip


def random_cosmos(seed: int = 0, **sizes) -> AutoencoderKLCosmos:
    """A small diffusers Cosmos tokenizer with random weights, norm gains and biases."""
    torch.manual_seed(seed)
    model = AutoencoderKLCosmos(**{**SMALL, **sizes}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm." in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        model.decoder.conv_out.conv_t.weight.mul_(0.3)  # keep most of the picture inside [-1, 1]
    return model


def converted_name(official: str) -> str:
    """What diffusers' converter makes of an NVIDIA name."""
    for old, new in CONVERTER_RENAMES:
        official = official.replace(old, new)
    return official


def official_name(key: str, levels: int = 3) -> str:
    """NVIDIA's name of a diffusers decoder-side key (written from the converter, in the other direction
    and checked against it by the tests; the up blocks as NVIDIA numbers them, last-first)."""
    rules = [
        (r"\.upsamplers\.0\.conv(\d)\.", r".upsample.conv\1.conv3d."), (r"\.conv_s\.", ".0.conv3d."),
        (r"\.conv_t\.", ".1.conv3d."), (r"\.conv_shortcut\.", ".nin_shortcut.conv3d."),
        (r"\.to_([qkv])\.", r".\1.conv3d."), (r"\.to_out\.0\.", ".proj_out.conv3d."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1.0."), (r"mid_block\.temp_attentions\.0\.", "mid.attn_1.1."),
        (r"\.resnets\.", ".block."), (r"^post_quant_conv\.", "post_quant_conv.conv3d."),
        (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}."),
    ]  # fmt: skip
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The decoder side (post_quant_conv, decoder) under NVIDIA's names, with the wavelet constants its
    jit state dict also holds; the encoder side under diffusers' names (the decoder never reads it)."""
    out = {}
    for key, value in model.state_dict().items():
        decoder_side = key.startswith(("decoder.", "post_quant_conv."))
        out[official_name(key) if decoder_side else key] = value.clone().contiguous()
    out["decoder.unpatcher3d.wavelets"] = torch.tensor([0.7071067811865476, 0.7071067811865476])
    out["decoder.unpatcher3d._arange"] = torch.arange(2)
    return out


def denormalize(model, z: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """What CosmosTextToWorldPipeline does to its latents before vae.decode (statistics per channel and
    latent frame, std over the scheduler's sigma_data)."""
    cfg = model.config
    if cfg.latents_mean is None:
        return z / sigma_data
    t = z.shape[2]
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.latent_channels, -1, 1, 1)[:, :, :t]
    std = torch.tensor(cfg.latents_std).view(1, cfg.latent_channels, -1, 1, 1)[:, :, :t]
    return z * std / sigma_data + mean


def reference(model, z: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """diffusers' decode of latents (1, C, T, h, w) (de-normalized first as the pipeline does, if
    `normalized`) -> (3, F, H, W), clamped as frames are."""
    with torch.no_grad():
        return model.decode(denormalize(model, z) if normalized else z).sample[0].clamp(-1, 1)
