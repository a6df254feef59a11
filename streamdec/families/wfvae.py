"""WF-VAE decoder (Open-Sora-Plan v1.3, PKU-YuanGroup/WF-VAE).

Streaming strategy: carried state with a lookahead of one latent frame. Every norm is a LayerNorm over
channels and the mid attention is per frame, so nothing mixes frames except causal convolutions
(carried in the StreamState) and the one time upsampler, whose odd output frames interpolate
towards the next latent frame (`TimeSpaceUpsample`): those wait for it, or for the end of the
stream. The output equals a one-shot decode of the whole clip.

The decoder works in Haar wavelet space. Shape of the decoder (base width b, energy-flow width e;
the released v1.3 model has b = 128, e = 128, 8 latent channels):

    conv_in       causal 3x3x3 conv, latent -> 4b
    mid           resnet, per-frame attention, resnet (4b -> 4b + e)
      connect_l2  on the last e channels: resnet, 2-D conv -> 24: inverse 3-D Haar -> RGB at 2x
    up2           resnets (4b), time x2 + space x2, resnet (4b -> 4b + e)
      connect_l1  on the last e channels: resnet, 2-D conv -> 12 (+ the l2 image on the first 3):
                  inverse 2-D Haar -> RGB at 4x
    up1           resnets (4b -> 2b), space x2, resnet (2b)
    layer         2 resnets (2b -> b)
    norm_out (LayerNorm), SiLU, conv_out (2-D, b -> 24) (+ the l1 image on the first 3):
                  inverse 3-D Haar -> RGB at 8x in space, 4x in time

Each inverse 3-D Haar transform doubles the frames and drops the stream's first (1 + 4(T - 1)
frames in all). The module names are the reference's, as its checkpoints store them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..keys import count_indexed
from ..layers import per_frame
from ..plan import Plan
from ..state import StreamState
from ..streams import CarriedStream
from . import Family, LayoutError, Strategy, register
from .opensora_plan import SCALING_FACTOR, FrameAttention, ResnetBlock3D, TimeSpaceUpsample, causal_conv, make_norm

HAAR_3D = 0.3536  # the reference's (rounded) 1/(2*sqrt(2))


@dataclass(frozen=True)
class WFVAEConfig:
    """Decoder hyper-parameters; the defaults are Open-Sora-Plan v1.3's WF-VAE (WFVAEModel_D8_4x8x8)."""

    latent_dim: int = 8
    base_channels: int = 128
    num_resblocks: int = 2
    energy_flow_hidden_size: int = 128
    connect_res_layer_num: int = 1
    use_attention: bool = True
    t_interpolation: str = "trilinear"
    scale: tuple[float, ...] = (SCALING_FACTOR,) * 8
    shift: tuple[float, ...] = (0.0,) * 8

    @property
    def z_dim(self) -> int:
        return self.latent_dim

    @property
    def latents_mean(self) -> tuple[float, ...]:  # the reference decodes z / scale + shift
        return self.shift

    @property
    def latents_std(self) -> tuple[float, ...]:
        return tuple(1.0 / s for s in self.scale)


def _haar_3d(device, dtype) -> torch.Tensor:
    """The 8 synthesis kernels (2x2x2, over t, h, w), in the order of the coefficient groups."""
    signs = [
        [[[1, 1], [1, 1]], [[1, 1], [1, 1]]], [[[1, -1], [1, -1]], [[1, -1], [1, -1]]],
        [[[1, 1], [-1, -1]], [[1, 1], [-1, -1]]], [[[1, -1], [-1, 1]], [[1, -1], [-1, 1]]],
        [[[1, 1], [1, 1]], [[-1, -1], [-1, -1]]], [[[1, -1], [1, -1]], [[-1, 1], [-1, 1]]],
        [[[1, 1], [-1, -1]], [[-1, -1], [1, 1]]], [[[1, -1], [-1, 1]], [[-1, 1], [1, -1]]],
    ]  # fmt: skip
    return (torch.tensor(signs) * HAAR_3D).to(device=device, dtype=dtype)


def _haar_2d(device, dtype) -> torch.Tensor:
    signs = [[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]], [[1, -1], [-1, 1]]]
    return (torch.tensor(signs) / 2).to(device=device, dtype=dtype)


def inverse_haar_3d(coeffs: torch.Tensor, state: StreamState | None, key: nn.Module) -> torch.Tensor:
    """(B, 8c, T, H, W) wavelet coefficients -> (B, c, 2T, 2H, 2W), less the stream's first frame.
    Each input frame makes two output frames on its own (kernel = stride = 2), so chunks are exact."""
    b, c8, t, h, w = coeffs.shape
    bands = coeffs.view(b, 8, c8 // 8, t, h, w)
    out = torch.einsum("bkcthw,kpqr->bctphqwr", bands, _haar_3d(coeffs.device, coeffs.dtype))
    out = out.reshape(b, c8 // 8, 2 * t, 2 * h, 2 * w)
    first = state is None or state.first_time(key)
    return out[:, :, 1:] if first else out


def inverse_haar_2d(coeffs: torch.Tensor) -> torch.Tensor:
    """(B, 4c, T, H, W) -> (B, c, T, 2H, 2W), frame by frame."""
    b, c4, t, h, w = coeffs.shape
    bands = coeffs.view(b, 4, c4 // 4, t, h, w)
    out = torch.einsum("bkcthw,kpq->bcthpwq", bands, _haar_2d(coeffs.device, coeffs.dtype))
    return out.reshape(b, c4 // 4, t, 2 * h, 2 * w)


class FrameUpsample(nn.Module):
    """Nearest x2 in space and a 2-D conv, frame by frame (the reference's Upsample)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        return per_frame(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class EnergyFlow(nn.ModuleList):
    """A wavelet side branch: resnets, then a 2-D conv to wavelet coefficients."""

    def __init__(self, dim: int, out: int, num_resnets: int):
        super().__init__([*(ResnetBlock3D(dim, dim, "layernorm") for _ in range(num_resnets)),
                          nn.Conv2d(dim, out, 3, padding=1)])  # fmt: skip

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        *resnets, conv = self
        for resnet in resnets:
            x = resnet(x, state)
        return per_frame(conv, x)


class Decoder(nn.Module):
    def __init__(self, config: WFVAEConfig):
        super().__init__()
        b, e, n = config.base_channels, config.energy_flow_hidden_size, config.num_resblocks
        self.energy_flow_hidden_size = e
        self.conv_in = causal_conv(config.latent_dim, 4 * b, 3, padding=1)
        mid = [ResnetBlock3D(4 * b, 4 * b, "layernorm"), ResnetBlock3D(4 * b, 4 * b + e, "layernorm")]
        if config.use_attention:
            mid.insert(1, FrameAttention(4 * b, "layernorm"))
        self.mid = nn.ModuleList(mid)
        self.up2 = nn.ModuleList([*(ResnetBlock3D(4 * b, 4 * b, "layernorm") for _ in range(n)),
                                  TimeSpaceUpsample(4 * b, config.t_interpolation),
                                  ResnetBlock3D(4 * b, 4 * b + e, "layernorm")])  # fmt: skip
        self.up1 = nn.ModuleList([*(ResnetBlock3D(4 * b if i == 0 else 2 * b, 2 * b, "layernorm") for i in range(n)),
                                  FrameUpsample(2 * b), ResnetBlock3D(2 * b, 2 * b, "layernorm")])  # fmt: skip
        self.layer = nn.ModuleList([ResnetBlock3D(2 * b, b, "layernorm"), ResnetBlock3D(b, b, "layernorm")])
        self.connect_l1 = EnergyFlow(e, 12, config.connect_res_layer_num)
        self.connect_l2 = EnergyFlow(e, 24, config.connect_res_layer_num)
        self.norm_out = make_norm("layernorm", b)
        self.conv_out = nn.Conv2d(b, 24, 3, padding=1)


class WFVAEDecoder(nn.Module):
    """De-normalized latents (B, C, T, h, w) -> video in [-1, 1], unclamped.

    `decoder(z, state)` continues the stream in `state` and returns the frames that are final:
    those of every latent frame so far but the last latent's final pair, which wait for the next
    latent frame or `finish(state)`. Without a state it decodes `z` in one shot (1 + 4(T-1) frames)."""

    def __init__(self, config: WFVAEConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)

    def forward(self, z: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        d = self.decoder
        e = d.energy_flow_hidden_size
        h = d.conv_in(z, state)
        for block in d.mid:
            h = block(h, state)
        l2 = inverse_haar_3d(d.connect_l2(h[:, -e:], state), state, d.connect_l2)
        h = h[:, :-e]
        for block in d.up2[:-1]:
            h = block(h, state)
        if state is not None:  # the l2 image runs ahead of the time upsampler: queue it
            l2 = state.align(d.connect_l2, l2, h.shape[2])
        return self._after_upsampler(h, l2, state)

    def finish(self, state: StreamState) -> torch.Tensor | None:
        """The stream has ended: the frames that waited for a next latent frame, if any."""
        d = self.decoder
        h = d.up2[-2](None, state)  # through its forward, so offload hooks see it run
        if h is None:
            return None
        return self._after_upsampler(h, state.align(d.connect_l2, None, h.shape[2]), state)

    def _after_upsampler(self, h: torch.Tensor, l2: torch.Tensor, state: StreamState | None) -> torch.Tensor:
        d = self.decoder
        e = d.energy_flow_hidden_size
        h = d.up2[-1](h, state)
        l1 = d.connect_l1(h[:, -e:], state)
        l1[:, :3] += l2
        l1 = inverse_haar_2d(l1)
        h = h[:, :-e]
        for block in [*d.up1, *d.layer]:
            h = block(h, state)
        h = per_frame(d.conv_out, F.silu(d.norm_out(h)))
        h[:, :3] += l1
        return inverse_haar_3d(h, state, d.conv_out)

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        return [d.conv_in, *d.mid, d.connect_l2, *d.up2, d.connect_l1, *d.up1, *d.layer, d.norm_out, d.conv_out]


# ---------------------------------------------------------------------------- checkpoints


def wfvae_config(shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None) -> WFVAEConfig:
    """The decoder's sizes from its tensors; scale, shift and interpolation from config.json."""
    cfg = diffusers_config or {}
    try:
        latent, base4 = shapes["decoder.conv_in.conv.weight"][1], shapes["decoder.conv_in.conv.weight"][0]
        e = shapes["decoder.connect_l2.0.conv1.conv.weight"][0]
        up2 = count_indexed(shapes, "decoder.up2")
        connect = count_indexed(shapes, "decoder.connect_l2")
    except KeyError as err:
        raise LayoutError(f"no WF-VAE decoder tensor {err}") from None
    if "decoder.mid.0.norm1.norm.weight" not in shapes:
        raise LayoutError(
            "this WF-VAE normalizes with GroupNorm, whose statistics span the whole clip, so it cannot be "
            "streamed exactly; streamdec decodes the LayerNorm WF-VAEs (the released ones)"
        )
    if not any(re.fullmatch(rf"decoder\.up1\.{up2 - 2}\.conv\.weight", k) for k in shapes):
        raise LayoutError("this WF-VAE upsamples 8x in time (Open-Sora-Plan v1.5); streamdec decodes the 4x ones")
    config = WFVAEConfig(
        latent_dim=latent, base_channels=base4 // 4, num_resblocks=up2 - 2, energy_flow_hidden_size=e,
        connect_res_layer_num=connect - 1, use_attention="decoder.mid.1.q.conv.weight" in shapes,
        t_interpolation=cfg.get("t_interpolation") or "trilinear",
        scale=_per_channel(cfg.get("scale"), SCALING_FACTOR, latent, "scale"),
        shift=_per_channel(cfg.get("shift"), 0.0, latent, "shift"),
    )  # fmt: skip
    if config.t_interpolation not in ("trilinear", "nearest"):
        raise LayoutError(f"t_interpolation {config.t_interpolation!r} is not one streamdec decodes (trilinear, nearest)")
    return config


def _per_channel(values, default: float, channels: int, name: str) -> tuple[float, ...]:
    """One value per latent channel. The released configs list 4 equal values for any number of
    channels; equal values stand for all channels."""
    values = [default] if values is None else [float(v) for v in values]
    if len(values) == channels:
        return tuple(values)
    if len(set(values)) == 1:
        return (values[0],) * channels
    raise LayoutError(f"config.json gives {len(values)} different {name} values for {channels} latent channels")


@register
class WFVAE(Family):
    name = "wfvae"
    title = "WF-VAE"
    temporal_ratio = 4
    spatial_ratio = 8
    diffusers_class = "WFVAEModel"
    strategy = Strategy.CARRIED
    lookahead = 1  # latent frames a stream waits for before the last one's frames are final

    # Released as a folder: config.json with diffusion_pytorch_model.safetensors, or a .ckpt with
    # the model's state dict (or its EMA copy). The names are the model's own.
    def detect_layout(self, keys) -> str | None:
        if "decoder.connect_l2.0.conv1.conv.weight" in keys and "decoder.conv_in.conv.weight" in keys:
            return "official"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        return {k: k for k in keys if k.startswith("decoder.") and not self._is_constant(k)}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        return {k: k for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith("encoder.") or self._is_constant(key)

    @staticmethod
    def _is_constant(key: str) -> bool:
        # the inverse wavelet transforms store their fixed kernels; the decoder makes its own
        return key.startswith("decoder.inverse_wavelet_transform_")

    def config(self, shapes, diffusers_config: dict | None) -> WFVAEConfig:
        return wfvae_config(shapes, diffusers_config)

    def build(self, config: WFVAEConfig) -> WFVAEDecoder:
        return WFVAEDecoder(config)

    def open_stream(self, decoder: WFVAEDecoder, plan: Plan) -> CarriedStream:
        return CarriedStream(decoder, finish=decoder.finish, frames_per_call=plan.frames_per_call)
