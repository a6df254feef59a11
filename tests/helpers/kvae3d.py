"""KVAE-3D VAEs for the tests: diffusers' AutoencoderKLKVAEVideo (the reference) with random weights,
and its weights under the names of Kandinsky's own code (kandinskylab/kvae, CachedCausalVAE)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLKVAEVideo

SMALL = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4)


def random_kvae3d(seed: int = 0, **sizes) -> AutoencoderKLKVAEVideo:
    """A small diffusers KVAE-3D with random weights, norm gains and biases."""
    torch.manual_seed(seed)
    model = AutoencoderKLKVAEVideo(**{**SMALL, **sizes}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_layer" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights as Kandinsky's CachedCausalVAE names them: its GroupNorm is the
    `norm_layer` itself, where diffusers wraps it (`norm_layer.norm_layer`)."""
    return {k.replace(".norm_layer.norm_layer.", ".norm_layer."): v.clone().contiguous()
            for k, v in model.state_dict().items()}  # fmt: skip


def official_config(model) -> dict:
    """config.json beside Kandinsky's weights (huggingface_hub's PyTorchModelHubMixin saves the
    CachedCausalVAE's `config` argument)."""
    cfg = model.config
    params = dict(ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                  temporal_compress_times=cfg.temporal_compress_times)  # fmt: skip
    return {"model": {"encoder_params": {**params, "in_channels": 3, "double_z": True},
                      "decoder_params": {**params, "out_ch": 3}},
            "common": {"experiment_name": "kvae_3d_test"}}  # fmt: skip


def reference(model, z: torch.Tensor) -> torch.Tensor:
    """diffusers' decode of latents (1, C, T, h, w) -> (3, F, H, W), clamped as frames are."""
    with torch.no_grad():
        return model.decode(z).sample[0].clamp(-1, 1)
