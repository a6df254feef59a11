"""Wan 2.1 / 2.2 VAEs for the tests: diffusers' AutoencoderKLWan (the reference) with random weights,
saved in every checkpoint layout streamdec reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

from streamdec.families.wan import diffusers_to_official

LOAD_PATHS = ["official-pth", "official-safetensors", "diffusers-folder", "diffusers-pipeline", "live-object"]
LATENT_SHAPE = (16, 5, 5, 7)  # (C, T, h, w): odd, non-square
DATA = Path(__file__).parents[1] / "data"
WAN22_STATS = json.loads((DATA / "wan22_latent_stats.json").read_text())


def wan22_config(base_dim: int) -> dict:
    """diffusers' AutoencoderKLWan arguments for a Wan 2.2 VAE (its `vae22_diffusers_config`)
    whose encoder and decoder are `base_dim` wide."""
    return dict(base_dim=base_dim, decoder_base_dim=base_dim, z_dim=48, is_residual=True, in_channels=12,
                out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                latents_mean=WAN22_STATS["latents_mean"], latents_std=WAN22_STATS["latents_std"])  # fmt: skip


def random_wan(base_dim: int = 8, seed: int = 0, num_res_blocks: int = 2, version: str = "2.1"):
    """A diffusers AutoencoderKLWan with random weights, random norm gains and biases."""
    torch.manual_seed(seed)
    config = wan22_config(base_dim) if version == "2.2" else dict(base_dim=base_dim, z_dim=16)
    model = diffusers.AutoencoderKLWan(num_res_blocks=num_res_blocks, **config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def reference_decode(model, z: torch.Tensor) -> torch.Tensor:
    """diffusers' decode of de-normalized latents (1, C, T, h, w) -> (1, 3, F, H, W) in [-1, 1]."""
    with torch.no_grad():
        return model.decode(z).sample


def denormalize(model, z: torch.Tensor) -> torch.Tensor:
    """What the diffusers Wan pipeline does before `vae.decode`."""
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    return z / (1.0 / std) + mean


_ENCODER_TO_OFFICIAL = [  # diffusers encoder names -> official ones, for realistic full checkpoints
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),  # Wan 2.2
    (r"^quant_conv\.", "conv1."),
    (r"^encoder\.conv_in\.", "encoder.conv1."),
    (r"^encoder\.mid_block\.resnets\.0\.", "encoder.middle.0."),
    (r"^encoder\.mid_block\.attentions\.0\.", "encoder.middle.1."),
    (r"^encoder\.mid_block\.resnets\.1\.", "encoder.middle.2."),
    (r"^encoder\.norm_out\.", "encoder.head.0."),
    (r"^encoder\.conv_out\.", "encoder.head.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
]
_RESNET_LEAVES = [
    (r"\.norm1\.", ".residual.0."),
    (r"\.conv1\.", ".residual.2."),
    (r"\.norm2\.", ".residual.3."),
    (r"\.conv2\.", ".residual.6."),
    (r"\.conv_shortcut\.", ".shortcut."),
]


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the official names (Wan2.1_VAE.pth, Wan2.2_VAE.pth), encoder included."""
    state = model.state_dict()
    decoder_names = diffusers_to_official(state.keys())
    # Wan 2.2 nests the encoder's layers per block, its downsampler after the residual blocks
    downsampler = rf"encoder.downsamples.\1.downsamples.{model.config.num_res_blocks}."
    encoder_names = [(r"^encoder\.down_blocks\.(\d+)\.downsampler\.", downsampler)] + _ENCODER_TO_OFFICIAL
    official = {}
    for key, value in state.items():
        new = decoder_names.get(key)
        if new is None:
            resnet = ".down_blocks." in key or ".resnets." in key
            new = key
            for pattern, repl in encoder_names + (_RESNET_LEAVES if resnet else []):
                new = re.sub(pattern, repl, new)
        official[new] = value.clone()
    return official


def save_layouts(model, root: Path, official_name: str, pipeline_class: str) -> dict:
    """`model`'s weights saved in every layout streamdec reads, keyed by load path."""
    official = official_state_dict(model)
    paths = {}
    paths["official-pth"] = root / f"{official_name}.pth"
    torch.save(official, paths["official-pth"])
    paths["official-safetensors"] = root / f"{official_name}.safetensors"
    save_file({k: v.contiguous() for k, v in official.items()}, paths["official-safetensors"])
    folder = root / "diffusers-vae"
    model.save_pretrained(folder)
    paths["diffusers-folder"] = folder
    pipeline = root / "pipeline"
    model.save_pretrained(pipeline / "vae")
    index = {"_class_name": pipeline_class, "vae": ["diffusers", "AutoencoderKLWan"]}
    (pipeline / "model_index.json").write_text(json.dumps(index))
    paths["diffusers-pipeline"] = pipeline
    paths["live-object"] = model
    return paths
