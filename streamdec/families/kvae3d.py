"""KVAE-3D (Kandinsky's video VAE, KVAE 1.0) decoder.

Streaming strategy: schedule replay, with the conv caches carried. Every norm is a GroupNorm over a
whole decoder call (conditioned on the latents: a "spatial norm"), so only a copy of the reference's
cut is exact. The reference (diffusers `AutoencoderKLKVAEVideo.decode`, as Kandinsky's own
`CachedCausalVAE.decode`) decodes segments of 16 video frames: a first call of 5 latent frames, then
4 each, the last call taking what is left, and carries every causal conv's last two input frames
from call to call. `streamdec.streams.replay.CarriedReplayStream` replays those calls as the latents
arrive; each call's frames are final when it returns. The cut does not depend on the length.

A quirk of the reference, matched: its temporal upsamplers double time only when a call has more
than one frame, so a last call of a single latent frame (T = 4k + 2, T >= 6) gives 1 video frame, not
4: such videos have 4T - 6 frames instead of 4T - 3 (T = 6: 18, not 21). Its first call treats the
first frame apart (not doubled in time, its own resize of the latents in the spatial norms), as
every causal VAE's first latent frame gives one video frame.

No spatial tiling: the reference has none (its `enable_tiling()` changes nothing), and GroupNorm's
statistics span the whole frame, so no tiling could equal the untiled decode.

Shape of the decoder (released sizes, 16 latent channels, RGB out):

    conv_in         causal 3x3x3 conv 16 -> 1024
    mid.block_1/2   resnets (1024)
    up.3            3 resnets (1024), upsample time x2 and space x2
    up.2            3 resnets (1024 -> 512), upsample time x2 and space x2
    up.1            3 resnets (512 -> 256), upsample space x2
    up.0            3 resnets (256 -> 128)
    norm_out (spatial norm), SiLU, conv_out   causal 3x3x3 conv 128 -> 3

`up.I` run from the last to `up.0`. Every resnet normalizes with a spatial norm, GroupNorm(f) *
conv_y(zq) + conv_b(zq), zq the latents of the call resized (nearest) to f. Convs pad time by
repeating the first frame (then the cache) and space by replicating the border. An upsampler repeats
each frame twice (the stream's first once) plus a causal (3,1,1) conv of that, then nearest 2x in
space plus a reflect-padded (1,3,3) conv, then a 1x1x1 conv. Module names are diffusers'; Kandinsky's
own checkpoints (`kandinskylab/KVAE-3D-1.0`, the `CachedCausalVAE` weights) name a spatial norm's
GroupNorm `norm_layer` where diffusers nests it as `norm_layer.norm_layer`, and are renamed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StreamdecError
from ..keys import count_indexed
from ..layers import Conv3d, WrappedCausalConv3d, conv3d
from ..plan import Plan
from ..state import StreamState
from ..streams import Calls, CarriedReplayStream
from ..tiling import Blended
from . import Family, LayoutError, Strategy, register

GROUPS = 32  # every GroupNorm of the reference
FIRST_CALL, CALL = 5, 4  # latent frames: diffusers' seg_len 16 -> 17 frames, then 16


@dataclass(frozen=True)
class KVAE3DConfig:
    """Decoder hyper-parameters; the defaults are the released KVAE-3D 1.0."""

    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    temporal_compress_times: int = 4

    @property
    def z_dim(self) -> int:
        return self.z_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:  # the latents are decoded as they are
        return (0.0,) * self.z_channels

    @property
    def latents_std(self) -> tuple[float, ...]:
        return (1.0,) * self.z_channels

    def levels(self) -> list[tuple[int, int, bool | None]]:
        """(in, out, upsampler doubles time, or None without one) for each level `up.I`, in the
        order they run (the last level first)."""
        temporal = int(math.log2(self.temporal_compress_times))
        n, cin, out = len(self.ch_mult), self.ch * self.ch_mult[-1], []
        for level in reversed(range(n)):
            cout = self.ch * self.ch_mult[level]
            out.append((cin, cout, (level >= n - temporal) if level else None))
            cin = cout
        return out


def causal_conv(cin: int, cout: int, kernel=3) -> WrappedCausalConv3d:
    """Time padded with the first frame (then the carried cache), space by replicating the border."""
    padding = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
    return WrappedCausalConv3d(cin, cout, kernel, padding=padding, time_pad="replicate", spatial_pad="replicate")


class ReflectConv3d(nn.Conv3d):
    """A (1,3,3) conv padded in space by reflection (nn.Conv3d's padding_mode="reflect")."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, (1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(self, F.pad(x, (1, 1, 1, 1, 0, 0), mode="reflect"))


class SpatialNorm(nn.Module):
    """GroupNorm of the features, scaled and shifted by 1x1 convs of the call's latents resized to
    them; on the stream's first call the first frame is resized apart."""

    def __init__(self, channels: int, z_channels: int):
        super().__init__()
        self.norm_layer = GroupNorm(channels)
        self.conv_y = Conv3d(z_channels, channels, 1)
        self.conv_b = Conv3d(z_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, first: bool) -> torch.Tensor:
        t, h, w = f.shape[-3:]
        if first and zq.shape[2] > 1:
            head = F.interpolate(zq[:, :, :1], size=(1, h, w))
            zq = torch.cat([head, F.interpolate(zq[:, :, 1:], size=(t - 1, h, w))], dim=2)
        else:  # the first call's single frame: the same resize
            zq = F.interpolate(zq, size=(t, h, w))
        return self.norm_layer(f).mul_(self.conv_y(zq)).add_(self.conv_b(zq))


class GroupNorm(nn.Module):
    """nn.GroupNorm kept as `.norm_layer`, where diffusers stores it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(GROUPS, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_layer(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, z_channels: int):
        super().__init__()
        self.norm1 = SpatialNorm(cin, z_channels)
        self.conv1 = causal_conv(cin, cout)
        self.norm2 = SpatialNorm(cout, z_channels)
        self.conv2 = causal_conv(cout, cout)
        self.nin_shortcut = Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor, first: bool, state: StreamState) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq, first)), state)
        h = self.conv2(F.silu(self.norm2(h, zq, first)), state)
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class Upsample(nn.Module):
    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.spatial_conv = ReflectConv3d(channels)
        self.temporal_conv = causal_conv(channels, channels, (3, 1, 1)) if temporal else None
        self.linear = Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor, first: bool, state: StreamState) -> torch.Tensor:
        if self.temporal_conv is not None:
            if x.shape[2] > 1:  # a call of one frame is not doubled (the reference's quirk)
                x = x.repeat_interleave(2, dim=2)
                if first:  # the stream's first frame stays one frame
                    x = x[:, :, 1:]
            x = self.temporal_conv(x, state).add_(x)
        b, c, t, h, w = x.shape
        x = F.interpolate(x.transpose(1, 2).reshape(b, t * c, h, w), scale_factor=2, mode="nearest")
        x = x.view(b, t, c, 2 * h, 2 * w).transpose(1, 2)
        return self.linear(self.spatial_conv(x).add_(x))


class Level(nn.Module):
    def __init__(self, cin: int, cout: int, num_resnets: int, z_channels: int, temporal):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, z_channels) for i in range(num_resnets)])
        if temporal is not None:
            self.upsample = Upsample(cout, temporal)


class Mid(nn.Module):
    def __init__(self, channels: int, z_channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, z_channels)
        self.block_2 = ResnetBlock(channels, channels, z_channels)


class Decoder3d(nn.Module):
    def __init__(self, config: KVAE3DConfig):
        super().__init__()
        levels, z = config.levels(), config.z_channels
        self.conv_in = causal_conv(z, levels[0][0])
        self.mid = Mid(levels[0][0], z)
        # stored as the reference stores them: up.0 is the full-resolution level, which runs last
        self.up = nn.ModuleList(
            [Level(cin, cout, config.num_res_blocks + 1, z, temporal) for cin, cout, temporal in reversed(levels)]
        )
        self.norm_out = SpatialNorm(levels[-1][1], z)
        self.conv_out = causal_conv(levels[-1][1], 3)


class KVAE3DDecoder(nn.Module):
    """One call of the reference: latents (B, 16, n, h, w) -> video in [-1, 1] (B, 3, frames, 8h,
    8w), unclamped, continuing the conv caches kept in `state`."""

    def __init__(self, config: KVAE3DConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder3d(config)

    def forward(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        first = state.first_time(self)
        x = d.conv_in(z, state)
        x = d.mid.block_2(d.mid.block_1(x, z, first, state), z, first, state)
        for level in reversed(d.up):
            for resnet in level.block:
                x = resnet(x, z, first, state)
            if hasattr(level, "upsample"):
                x = level.upsample(x, first, state)
        return d.conv_out(F.silu(d.norm_out(x, z, first)), state)

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        blocks = [d.conv_in, d.mid.block_1, d.mid.block_2]
        for level in reversed(d.up):
            blocks += list(level.block) + ([level.upsample] if hasattr(level, "upsample") else [])
        return blocks + [d.norm_out, d.conv_out]


# ---------------------------------------------------------------------------- checkpoints

_NESTED = ".norm_layer.norm_layer."  # diffusers' spatial norms: KVAECachedGroupNorm around nn.GroupNorm
_FLAT = ".norm_layer."  # Kandinsky's: CachedGroupNorm is the nn.GroupNorm


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> KVAE3DConfig:
    """The decoder's sizes from its tensors (diffusers names): the levels' widths, resnets and which
    upsamplers double time."""
    try:
        z = shapes["decoder.conv_in.conv.weight"][1]
        n = count_indexed(shapes, "decoder.up")
        widths = [shapes[f"decoder.up.{i}.block.0.conv1.conv.weight"][0] for i in range(n)]
        num_res = count_indexed(shapes, "decoder.up.0.block")
    except KeyError as err:
        raise LayoutError(f"no KVAE-3D decoder tensor {err}") from None
    temporal = sum(f"decoder.up.{i}.upsample.temporal_conv.conv.weight" in shapes for i in range(n))
    ch = widths[0]
    if any(w % ch for w in widths) or any(w % GROUPS for w in widths):
        raise LayoutError(
            f"the decoder's widths {widths} are not multiples of its first ({ch}) and of {GROUPS} norm groups"
        )
    if n != 4 or temporal != 2:
        raise LayoutError(f"the decoder upsamples {2**temporal}x in time and {2 ** (n - 1)}x in space; streamdec "
                          "decodes the 4x8x8 KVAE-3D")  # fmt: skip
    return KVAE3DConfig(z_channels=z, ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=num_res - 1,
                        temporal_compress_times=2**temporal)  # fmt: skip


@register
class KVAE3D(Family):
    name = "kvae3d"
    title = "KVAE-3D VAE"
    temporal_ratio = 4
    spatial_ratio = 8
    diffusers_class = "AutoencoderKLKVAEVideo"
    strategy = Strategy.REPLAY
    steady_latents = FIRST_CALL + CALL  # the first call, then one that repeats with the caches

    # diffusers' folder (KVAE-3D-1.0's `diffusers/` subfolder) nests a spatial norm's GroupNorm as
    # `norm_layer.norm_layer`; Kandinsky's own weights (the repository's root, CachedCausalVAE) do not.
    # A spatial norm's plain `conv_y.weight` tells both from CogVideoX's SAT names (`conv_y.conv`).
    def detect_layout(self, keys) -> str | None:
        if "decoder.mid.block_1.norm1.conv_y.weight" not in keys:
            return None
        if "decoder.mid.block_1.norm1.norm_layer.norm_layer.weight" in keys:
            return "diffusers"
        if "decoder.mid.block_1.norm1.norm_layer.weight" in keys:
            return "official"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        decoder_keys = [k for k in keys if k.startswith("decoder.")]
        if layout == "official":
            return {k: k.replace(_FLAT, _NESTED) for k in decoder_keys}
        return {k: k for k in decoder_keys}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        if layout == "official":
            return {k: k.replace(_NESTED, _FLAT) for k in internal_keys}
        return {k: k for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith("encoder.")

    def config(self, shapes, diffusers_config: dict | None) -> KVAE3DConfig:
        return config_from_shapes(shapes)

    def build(self, config: KVAE3DConfig) -> KVAE3DDecoder:
        return KVAE3DDecoder(config)

    def frames_out(self, latent_frames: int, first_chunk: bool) -> int:
        frames = super().frames_out(latent_frames, first_chunk)
        if first_chunk and latent_frames >= FIRST_CALL + 1 and (latent_frames - FIRST_CALL) % CALL == 1:
            return frames - (self.temporal_ratio - 1)  # a last call of one latent frame gives one frame
        return frames

    def effective_tile(self, tile):
        if tile is not None:
            which = "its reference has no tiling (enable_tiling() changes nothing)" if isinstance(tile, Blended) else (
                "it normalizes with GroupNorm over whole frames, so no tiling can equal its untiled decode")  # fmt: skip
            raise StreamdecError(f"the {self.title} cannot be decoded in tiles: {which}; use tile=None")
        return None

    def open_stream(self, decoder: KVAE3DDecoder, plan: Plan) -> CarriedReplayStream:
        self.effective_tile(plan.tile)
        return CarriedReplayStream(decoder, Calls(first=FIRST_CALL, size=CALL))
