"""CogVideoX VAEs for the tests: diffusers' AutoencoderKLCogVideoX (the reference) with random weights,
and its weights under the official SAT names (CogVideoX's `vae/3d-vae.pt`)."""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKLCogVideoX

SMALL = dict(block_out_channels=(32, 32, 64, 64), latent_channels=4, layers_per_block=1, norm_num_groups=32)

# diffusers name -> SAT's, the other way round from diffusers' scripts/convert_cogvideox_to_diffusers.py
# (`up.I` -> `up_blocks.(3 - I)`, `block.` -> `resnets.`, `upsample` -> `upsamplers.0`, `nin_shortcut`
# -> `conv_shortcut`, `decoder.mid.block_1` -> `decoder.mid_block.resnets.0`)
_TO_SAT = [
    (r"^(en|de)coder\.mid_block\.resnets\.0\.", r"\1coder.mid.block_1."),
    (r"^(en|de)coder\.mid_block\.resnets\.1\.", r"\1coder.mid.block_2."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")


def random_cogvideox(seed: int = 0, **sizes) -> AutoencoderKLCogVideoX:
    """A small diffusers CogVideoX VAE with random weights, norm gains and biases."""
    torch.manual_seed(seed)
    model = AutoencoderKLCogVideoX(**{**SMALL, **sizes}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_layer" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def sat_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights under SAT's names, as 3d-vae.pt holds them (under "state_dict"),
    with a training loss's tensor beside them."""
    out = {}
    for key, value in model.state_dict().items():
        m = _UP.match(key)
        if m:
            part = "block" if m.group(2) == "resnets" else "upsample"
            key = f"decoder.up.{3 - int(m.group(1))}.{part}." + key[m.end() :]
        for pattern, repl in _TO_SAT:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone().contiguous()
    out["loss.logvar"] = torch.zeros(())
    return out


def reference(model, z: torch.Tensor, tiling: dict | None = None) -> torch.Tensor:
    """diffusers' decode of normalized latents (1, C, T, h, w), as the pipelines do (z / scaling
    factor) -> (3, F, H, W), clamped as frames are."""
    model.use_tiling = False
    if tiling is not None:
        model.enable_tiling(**tiling)
    try:
        with torch.no_grad():
            return model.decode(z / model.config.scaling_factor).sample[0].clamp(-1, 1)
    finally:
        model.use_tiling = False


def stream_video(vae, latents, chunks, tile=None, normalized=True, latent_frames=None) -> torch.Tensor:
    """Push `latents` (C, T, h, w) through a StreamDecoder told the video's length, in chunks of the
    given lengths; the video as one (3, F, H, W) float32 tensor."""
    import streamdec

    total = sum(chunks) if latent_frames is None else latent_frames
    decoder = streamdec.StreamDecoder(vae, normalized=normalized, as_tensor=True, tile=tile, latent_frames=total)
    frames, start = [], 0
    for n in chunks:
        frames += decoder.push(latents[:, start : start + n])
        start += n
    return torch.stack(frames + decoder.close(), dim=1)
