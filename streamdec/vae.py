"""The loaded VAE: a family's decoder with its weights, device, precision and latent statistics."""

from __future__ import annotations

import torch
from torch import nn

from .families import Family

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32  # the references decode in fp32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use fp32, bf16 or fp16")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but this machine has no CUDA GPU (or torch has no CUDA build)")
    return device


class VAE:
    """What `load_vae` returns. `decoder(latents, state)` maps de-normalized latents to video."""

    def __init__(self, family: Family, config, decoder: nn.Module, device: torch.device, dtype: torch.dtype,
                 stored_dtype: torch.dtype, source: str, offloader=None, max_vram: float | None = None,
                 offload_request: str | None = None):  # fmt: skip
        self.family_spec = family
        self.config = config
        self.decoder = decoder
        self.device = device
        self.dtype = dtype
        self.stored_dtype = stored_dtype
        self.source = source
        self.offloader = offloader  # a streamdec.offload.Offloader, or None: weights stay on the device
        self.max_vram = max_vram  # GiB of device memory a decode may peak at (streamdec.memory), or None
        # the offload mode asked for; "auto": the one max_vram's plan picks for each video
        self.offload_request = offload_request or self.offload
        self.plans: dict = {}  # max_vram plans made so far, by frame size (streamdec.memory)
        shape = (1, -1, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=device).view(shape)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32, device=device).view(shape)

    @property
    def family(self) -> str:
        return self.family_spec.name

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    @property
    def temporal_ratio(self) -> int:
        return self.family_spec.temporal_ratio

    @property
    def spatial_ratio(self) -> int:
        return self.family_spec.spatial_ratio

    @property
    def offload(self) -> str:
        return "none" if self.offloader is None else self.offloader.mode

    def set_offload(self, mode: str) -> None:
        """Switch the offload mode (a max_vram plan does, per video); the output is the same."""
        from .offload import attach

        if mode == self.offload:
            return
        if self.offloader is not None:
            self.offloader.remove()  # every weight back in its resting CPU copy
            self.offloader = None
        if mode == "none":
            self.decoder.to(self.device)
        else:
            self.offloader = attach(self.decoder, self.decoder.offload_blocks(), self.device, mode)

    def num_parameters(self) -> int:
        offloader = self.offloader
        if offloader is not None:  # released weights are placeholders: count the resting copies
            return sum(t.numel() for t in offloader.rest.values())
        return sum(p.numel() for p in self.decoder.parameters())

    def frames_for(self, latent_frames: int) -> int:
        """Video frames a whole latent sequence of this length decodes to."""
        return self.family_spec.frames_out(latent_frames, first_chunk=True)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as the diffusion model makes them -> latents as the decoder takes them."""
        return z.float() * self.latents_std + self.latents_mean

    def __repr__(self) -> str:
        return (f"VAE(family={self.family!r}, latent_channels={self.latent_channels}, device={self.device}, "
                f"dtype={self.dtype}, source={self.source!r})")  # fmt: skip
