"""MiniMax-H3 video VAEs for the tests: diffusers' AutoencoderKLMiniMaxH3 (the reference) with random
weights, and its weights written in the official checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLMiniMaxH3
from safetensors.torch import save_file

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
LATENT = 4


def random_minimax(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 64) -> AutoencoderKLMiniMaxH3:
    """A small MiniMax-H3 VAE (the released 4x16x16 compression and 64-wide heads, 2 layers, a small
    encoder) with random weights, norm gains, biases and layer scales, and random latent statistics."""
    torch.manual_seed(seed)
    model = AutoencoderKLMiniMaxH3(
        latent_channels=LATENT, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        spatial_downsample_factors=(2, 2, 2, 2), temporal_downsample_factors=(1, 2, 2, 1), norm_num_groups=4,
        decoder_num_layers=layers, decoder_num_attention_heads=heads, decoder_attention_head_dim=head_dim,
        decoder_ffn_mult=2, latents_mean=tuple(torch.randn(LATENT).tolist()),
        latents_std=tuple((0.5 + torch.rand(LATENT)).tolist()),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or ".scale" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias") or "register_tokens" in name:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() > 1 else torch.randn_like(p))
    return model


def reference_decode(model: AutoencoderKLMiniMaxH3, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' decode of normalized latents (C, T, h, w) as the pipeline post-processes it, in
    [-1, 1] unclamped: (3, F, H, W)."""
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        sample = model.decode(latents[None] * std + mean).sample
    return (2 * (sample * IMAGENET_STD + IMAGENET_MEAN) - 1)[0]


def official_state_dict(model: AutoencoderKLMiniMaxH3) -> dict[str, torch.Tensor]:
    """The model's tensors as the official checkpoint names them: the inverse of diffusers'
    convert_minimax_h3_to_diffusers.py (fused to_qkv interleaved per head, ff.w1 as [gate; value],
    x_embedder, to_out without .0, ff.w1/w2, and the decoder's unused mask token)."""
    heads, head_dim = model.config.decoder_num_attention_heads, model.config.decoder_attention_head_dim
    state, out = model.state_dict(), {"decoder.mask_token": torch.zeros(1, 1, heads * head_dim)}
    for key, value in state.items():
        if ".attn.to_q." in key:
            q, k, v = (state[key.replace(".to_q.", f".to_{x}.")] for x in "qkv")
            per_head = [t.reshape(heads, head_dim, *t.shape[1:]) for t in (q, k, v)]
            fused = torch.cat(per_head, dim=1).reshape(3 * heads * head_dim, *q.shape[1:])
            out[key.replace(".to_q.", ".to_qkv.")] = fused.contiguous()
        elif ".attn.to_k." in key or ".attn.to_v." in key:
            continue
        elif ".ff.net.0.proj." in key:
            value_half, gate = value.chunk(2, dim=0)
            out[key.replace(".ff.net.0.proj.", ".ff.w1.")] = torch.cat([gate, value_half]).contiguous()
        else:
            key = key.replace("decoder.proj_in.", "decoder.x_embedder.").replace(".attn.to_out.0.", ".attn.to_out.")
            out[key.replace(".ff.net.2.", ".ff.w2.")] = value.contiguous()
    return out


def official_config(model: AutoencoderKLMiniMaxH3) -> dict:
    """The original config.json beside the official weights (`video_vae/source/`), in its own names."""
    c = model.config
    return {"z_channels": c.latent_channels, "embed_dim": c.latent_channels, "use_vit_decoder": True,
            "vit_decoder_kwargs": {"num_layers": c.decoder_num_layers, "heads": c.decoder_num_attention_heads,
                                   "dim_head": c.decoder_attention_head_dim, "rope_theta": c.decoder_rope_theta,
                                   "rope_dim_ratio": c.decoder_rope_dim_ratio},
            "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std)}  # fmt: skip


def save_official(model: AutoencoderKLMiniMaxH3, root: Path) -> dict:
    """The official layout: `source/` with config.json and model.safetensors, and the bare file."""
    source = root / "video_vae" / "source"
    source.mkdir(parents=True)
    save_file(official_state_dict(model), source / "model.safetensors")
    (source / "config.json").write_text(json.dumps(official_config(model)))
    return {"official-folder": source, "official-file": source / "model.safetensors"}
