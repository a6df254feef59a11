"""Tiny diffusers video pipelines with random weights, built offline: no tokenizer or text encoder
(prompt embeddings are given directly), a one-layer transformer, a small random VAE."""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)

from .hunyuan import random_hunyuan
from .wan import random_wan

TEXT_DIM = 32


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=16, out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32).eval()  # fmt: skip
    return WanPipeline(tokenizer=None, text_encoder=None, vae=random_wan(seed=seed), transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip


def wan_call(num_videos: int = 1, seed: int = 0) -> dict:
    """Arguments for a tiny WanPipeline call: 9 frames of 48x64, two steps, no guidance."""
    embeds = torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return dict(prompt_embeds=embeds, guidance_scale=1.0, num_frames=9, height=48, width=64, num_inference_steps=2,
                num_videos_per_prompt=num_videos, generator=torch.Generator().manual_seed(seed))  # fmt: skip


def tiny_hunyuan_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """HunyuanVideo: a windowed family's pipeline (its VAE decodes in overlapping windows)."""
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                                 num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
                                                 pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()  # fmt: skip
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                transformer=transformer, vae=random_hunyuan(seed=seed),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))  # fmt: skip


def hunyuan_call(seed: int = 0) -> dict:
    """21 frames (6 latent frames: two of the VAE's windows) of 32x48, two steps."""
    gen = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 6, 16, generator=gen), pooled_prompt_embeds=torch.randn(1, 8, generator=gen),
                prompt_attention_mask=torch.ones(1, 6, dtype=torch.long), num_frames=21, height=32, width=48,
                num_inference_steps=2, generator=torch.Generator().manual_seed(seed))  # fmt: skip
