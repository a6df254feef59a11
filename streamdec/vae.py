"""The loaded VAE: a family's decoder with its weights, device, precision and latent statistics."""

from __future__ import annotations

import torch
from torch import nn

from .errors import StreamdecError
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
    raise StreamdecError(f"unsupported dtype {dtype!r}; use fp32, bf16 or fp16")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise StreamdecError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise StreamdecError(f"streamdec decodes on cpu or cuda, not {device}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamdecError(f"device {device} asked for, but this machine has no CUDA GPU (or torch has no CUDA build)")
    return device


def check_max_vram(max_vram) -> float | None:
    if max_vram is not None and (isinstance(max_vram, bool) or not isinstance(max_vram, (int, float))
                                 or not 0 < max_vram < float("inf")):  # fmt: skip
        raise StreamdecError(f"max_vram must be a positive number of GiB, like 20, not {max_vram!r}")
    return max_vram


class VAE:
    """What `load_vae` returns. `decoder` is the family's nn.Module; `family_spec.open_stream` runs it.

    `offload` is the mode named at load: "none", "model", "block", or "auto" (weights rest on the
    host and each stream's max_vram plan picks the mode of its chunks; see streamdec.offload).
    `decode_options`: the family's decode options (`Family.decode_options`) named at load, the
    defaults of every decode with this VAE."""

    def __init__(self, family: Family, config, decoder: nn.Module, device: torch.device, dtype: torch.dtype,
                 stored_dtype: torch.dtype, source: str, offloader=None, max_vram: float | None = None,
                 offload: str = "none", decode_options: dict | None = None):  # fmt: skip
        self.family_spec = family
        self.config = config
        self.decoder = decoder
        self.device = device
        self.dtype = dtype
        self.stored_dtype = stored_dtype
        self.source = source
        self.offloader = offloader  # a streamdec.offload.Offloader, or None: weights stay on the device
        self.max_vram = check_max_vram(max_vram)  # GiB a decode may peak at (streamdec.memory), or None
        self.offload = offload
        self.decode_options = dict(decode_options or {})  # the family's decode options named at load (defaults)
        self.plans: dict = {}  # a cache of the max_vram plans made so far (streamdec.memory)
        shape = (1, config.z_dim, -1, 1, 1)  # per channel, or per channel and latent frame (Cosmos)
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

    def set_offload(self, mode: str) -> None:
        """Load the weights for another offload mode ("none", "model" or "block"); the output is the same."""
        from .offload import MODES, attach

        if mode not in MODES:
            raise StreamdecError(f"unknown offload mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == self.offload:
            return
        if self.offloader is not None:
            self.offloader.remove()  # every weight back in its resting CPU copy
            self.offloader = None
        if mode == "none":
            self.decoder.to(self.device)
        else:
            self.offloader = attach(self.decoder, self.decoder.offload_blocks(), self.device, mode)
        self.offload = mode

    def num_parameters(self) -> int:
        offloader = self.offloader
        if offloader is not None:  # released weights are placeholders: count the resting copies
            return sum(t.numel() for t in offloader.rest.values())
        return sum(p.numel() for p in self.decoder.parameters())

    def frames_for(self, latent_frames: int) -> int:
        """Video frames a whole latent sequence of this length decodes to."""
        return self.family_spec.frames_out(latent_frames, first_chunk=True)

    def denormalize(self, z: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """Latents as the diffusion model makes them -> latents as the decoder takes them. `first_frame`:
        the latent frame `z` starts at in its video, for statistics given per latent frame."""
        mean, std = self.latents_mean, self.latents_std
        if mean.shape[2] > 1:
            end = first_frame + z.shape[2]
            if end > mean.shape[2]:
                raise StreamdecError(f"the {self.family_spec.title}'s latent statistics cover {mean.shape[2]} latent "
                                     f"frames, and this is latent frame {end}; de-normalize the latents yourself and "
                                     "pass normalized=False")  # fmt: skip
            mean, std = mean[:, :, first_frame:end], std[:, :, first_frame:end]
        return z.float() * std + mean

    def prepare(self, z: torch.Tensor, normalized: bool, first_frame: int = 0) -> torch.Tensor:
        """Checked latents -> latents as the decoder takes them: on its device, de-normalized (if
        `normalized`), in its dtype. Memory estimates run this too, so they count what it allocates."""
        z = z.to(self.device, non_blocking=True)
        z = self.denormalize(z, first_frame) if normalized else z.float()
        return z.to(self.dtype)

    def __repr__(self) -> str:
        return (f"VAE(family={self.family!r}, latent_channels={self.latent_channels}, device={self.device}, "
                f"dtype={self.dtype}, source={self.source!r})")  # fmt: skip
