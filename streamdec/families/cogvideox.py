"""CogVideoX VAE decoder (CogVideoX 1.0 and 1.5, ConsisID and the other CogVideoX pipelines).

Streaming strategy: schedule replay, with the conv caches carried. Every norm is a GroupNorm over a
whole decoder call (conditioned on the latents: a "spatial norm"), so a frame's output depends on the
other frames of its call and only a copy of the reference's cut is exact. diffusers decodes in calls
of 2 latent frames, the first call taking 2 + (T mod 2), and carries each causal conv's last two
input frames from call to call. `streamdec.streams.replay.CarriedReplayStream` replays those calls
as the latents arrive, with the caches in a StreamState; each call's frames are final when it
returns. The first call's size needs the video's length (its parity): StreamDecoder's
`latent_frames` (decode_frames, decode_to_file and the CLI know it).

A call of n latent frames gives 4n video frames when n is even and 1 + 4(n - 1) when n is odd (the
upsamplers and spatial norms treat an odd call's first frame apart), so a video of T latent frames
has 4T frames for even T (what diffusers returns) and 4T - 3 for odd T, the released lengths.

What the reference wastes and streamdec does not copy: its kernel-1 convs (the spatial norms'
`conv_y`, `conv_b`) keep a clone of their whole input as a "cache" that is never read, ~60 clones of
the latent-conditioning map per call.

Spatial tiles: only the reference's blended ones (`tile="blended"`, diffusers' `enable_tiling()`:
30 x 45 latent tiles, overlaps 1/6 of a tile in height and 1/5 in width), each tile carrying its own
caches. Exact tiles are impossible: GroupNorm's statistics span the whole frame.

Shape of the decoder (released sizes, 16 latent channels, RGB out):

    conv_in         causal 3x3x3 conv 16 -> 512
    mid_block       2 resnets (512)
    up_blocks.0     4 resnets (512), upsample time x2 and space x2 (2-D conv)
    up_blocks.1     4 resnets (512 -> 256), upsample time x2 and space x2
    up_blocks.2     4 resnets (256), upsample space x2
    up_blocks.3     4 resnets (256 -> 128)
    norm_out (spatial norm), SiLU, conv_out   causal 3x3x3 conv 128 -> 3

Every resnet normalizes with a spatial norm: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq the call's
latents resized (nearest) to f. Convs pad time by repeating the first frame (then the cache) and
space with zeros. Module names are diffusers' (`AutoencoderKLCogVideoX`); the official SAT
checkpoint (`vae/3d-vae.pt`: `decoder.mid.block_1`, `decoder.up.I.block.J` with I counted from
the full-resolution end, `nin_shortcut`, `upsample`) is renamed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StreamdecError
from ..keys import count_indexed
from ..layers import Conv3d, WrappedCausalConv3d, per_frame
from ..plan import Plan
from ..state import StreamState
from ..streams import Calls, CarriedReplayStream
from ..tiling import Blended, BlendedTiles
from . import Family, LayoutError, Strategy, Tiling, register

SCALING_FACTOR = 1.15258426  # diffusers' default (CogVideoX-2B); 5B, 1.5 and ConsisID say 0.7 in config.json
REFERENCE_TILE = (30, 45)  # enable_tiling(): sample_height // 2 = 240 and sample_width // 2 = 360 pixels
REFERENCE_OVERLAP = (1 / 6, 1 / 5)  # tile_overlap_factor_height, tile_overlap_factor_width


@dataclass(frozen=True)
class CogVideoXConfig:
    """Decoder hyper-parameters; the defaults are the released CogVideoX VAE."""

    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)  # the encoder's order, as diffusers
    layers_per_block: int = 3
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    post_quant_conv: bool = False
    scaling_factor: float = SCALING_FACTOR

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return (0.0,) * self.latent_channels

    @property
    def latents_std(self) -> tuple[float, ...]:  # the pipelines decode latents / scaling_factor
        return (1.0 / self.scaling_factor,) * self.latent_channels

    def up_blocks(self) -> list[tuple[int, int, bool | None]]:
        """(in, out, upsampler doubles time, or None without one) for each up block."""
        widths = list(reversed(self.block_out_channels))
        temporal = int(math.log2(self.temporal_compression_ratio))
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append((cin, cout, (i < temporal) if i < len(widths) - 1 else None))
            cin = cout
        return blocks


def causal_conv(cin: int, cout: int, kernel: int = 3) -> WrappedCausalConv3d:
    """Time padded with the first frame (then the carried cache), space with zeros, as the reference."""
    return WrappedCausalConv3d(cin, cout, kernel, padding=kernel // 2, time_pad="replicate")


def resize_latents(zq: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The call's latents resized (nearest) to a feature map of `size` (T, H, W); with an odd T > 1
    the first frame apart, as the reference does."""
    t = size[0]
    if t > 1 and t % 2 == 1:
        first = F.interpolate(zq[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(zq[:, :, 1:], size=(t - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(zq, size=tuple(size))


class SpatialNorm(nn.Module):
    """GroupNorm of the features, scaled and shifted by 1x1 convs of the latents."""

    def __init__(self, channels: int, latent_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_y = causal_conv(latent_channels, channels, 1)  # kernel 1: nothing to carry
        self.conv_b = causal_conv(latent_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = resize_latents(zq, f.shape[-3:])
        return self.norm_layer(f).mul_(self.conv_y(zq)).add_(self.conv_b(zq))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, latent_channels: int, groups: int):
        super().__init__()
        self.norm1 = SpatialNorm(cin, latent_channels, groups)
        self.conv1 = causal_conv(cin, cout)
        self.norm2 = SpatialNorm(cout, latent_channels, groups)
        self.conv2 = causal_conv(cout, cout)
        self.conv_shortcut = Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor, state: StreamState) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)), state)
        h = self.conv2(F.silu(self.norm2(h, zq)), state)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Upsample(nn.Module):
    """Nearest 2x in space (and in time, where the block doubles it), then a 2-D conv per frame. An
    odd call's first frame is not doubled in time, so n frames become 1 + 2(n - 1); an even call's
    2n."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        if self.temporal and t > 1 and t % 2 == 1:
            first = F.interpolate(x[:, :, 0], scale_factor=2.0).unsqueeze(2)
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
        elif self.temporal and t > 1:
            x = F.interpolate(x, scale_factor=2.0)
        else:
            x = per_frame(lambda frames: F.interpolate(frames, scale_factor=2.0), x)
        return per_frame(self.conv, x)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_resnets: int, latent_channels: int, groups: int, temporal):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, latent_channels, groups) for i in range(num_resnets)]
        )
        self.upsamplers = nn.ModuleList([Upsample(cout, temporal)]) if temporal is not None else None


class MidBlock(nn.Module):
    def __init__(self, channels: int, latent_channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, latent_channels, groups) for _ in range(2)])


class Decoder3d(nn.Module):
    def __init__(self, config: CogVideoXConfig):
        super().__init__()
        blocks, z, groups = config.up_blocks(), config.latent_channels, config.norm_num_groups
        self.conv_in = causal_conv(z, blocks[0][0])
        self.mid_block = MidBlock(blocks[0][0], z, groups)
        self.up_blocks = nn.ModuleList(
            [UpBlock(cin, cout, config.layers_per_block + 1, z, groups, temporal) for cin, cout, temporal in blocks]
        )
        self.norm_out = SpatialNorm(blocks[-1][1], z, groups)
        self.conv_out = causal_conv(blocks[-1][1], 3)


class CogVideoXDecoder(nn.Module):
    """One call of the reference: de-normalized latents (B, 16, n, h, w) -> video in [-1, 1]
    (B, 3, 4n or 1 + 4(n - 1), 8h, 8w), unclamped, continuing the conv caches kept in `state`."""

    def __init__(self, config: CogVideoXConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = (
            Conv3d(config.latent_channels, config.latent_channels, 1) if config.post_quant_conv else None
        )
        self.decoder = Decoder3d(config)

    def forward(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = d.conv_in(z, state)
        for resnet in d.mid_block.resnets:
            x = resnet(x, z, state)
        for block in d.up_blocks:
            for resnet in block.resnets:
                x = resnet(x, z, state)
            if block.upsamplers is not None:
                x = block.upsamplers[0](x)
        return d.conv_out(F.silu(d.norm_out(x, z)), state)

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        blocks = ([self.post_quant_conv] if self.post_quant_conv is not None else []) + [d.conv_in]
        blocks += list(d.mid_block.resnets)
        for up in d.up_blocks:
            blocks += list(up.resnets) + (list(up.upsamplers) if up.upsamplers is not None else [])
        return blocks + [d.norm_out, d.conv_out]


# ---------------------------------------------------------------------------- checkpoints

_SAT_FIXED = {
    "decoder.mid.block_1.": "decoder.mid_block.resnets.0.",
    "decoder.mid.block_2.": "decoder.mid_block.resnets.1.",
}
_SAT_UP = re.compile(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)")
_DIFFUSERS_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)")


def sat_to_diffusers(key: str, up_blocks: int) -> str:
    """An official SAT decoder key -> diffusers' name. SAT numbers its up levels from the
    full-resolution end (`up.0` runs last), diffusers in the order they run."""
    for old, new in _SAT_FIXED.items():
        if key.startswith(old):
            return (new + key[len(old) :]).replace("nin_shortcut.", "conv_shortcut.")
    m = _SAT_UP.fullmatch(key)
    if m is None:
        return key  # conv_in, norm_out, conv_out: the same names
    level, part, resnet, rest = m.groups()
    block = up_blocks - 1 - int(level)
    if part == "upsample":
        return f"decoder.up_blocks.{block}.upsamplers.0.{rest}"
    return f"decoder.up_blocks.{block}.resnets.{resnet}.{rest.replace('nin_shortcut.', 'conv_shortcut.')}"


def diffusers_to_sat(key: str, up_blocks: int) -> str:
    for old, new in _SAT_FIXED.items():
        if key.startswith(new):
            return (old + key[len(new) :]).replace("conv_shortcut.", "nin_shortcut.")
    m = _DIFFUSERS_UP.fullmatch(key)
    if m is None:
        return key
    block, part, resnet, rest = m.groups()
    level = up_blocks - 1 - int(block)
    if part == "upsamplers.0":
        return f"decoder.up.{level}.upsample.{rest}"
    return f"decoder.up.{level}.block.{resnet}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"


def config_from_shapes(shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None) -> CogVideoXConfig:
    """The decoder's sizes from its tensors (diffusers names), the rest from config.json."""
    cfg = diffusers_config or {}
    try:
        latent = shapes["decoder.conv_in.conv.weight"][1]
        n_blocks = count_indexed(shapes, "decoder.up_blocks")
        widths = [shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in range(n_blocks)]
        num_res = count_indexed(shapes, "decoder.up_blocks.0.resnets")
    except KeyError as err:
        raise LayoutError(f"no CogVideoX decoder tensor {err}") from None
    config = CogVideoXConfig(
        latent_channels=latent, block_out_channels=tuple(reversed(widths)), layers_per_block=num_res - 1,
        norm_num_groups=int(cfg.get("norm_num_groups") or 32),
        temporal_compression_ratio=int(cfg.get("temporal_compression_ratio") or 4),
        post_quant_conv="post_quant_conv.weight" in shapes,
        scaling_factor=float(cfg.get("scaling_factor") or SCALING_FACTOR),
    )  # fmt: skip
    if n_blocks != 4 or config.temporal_compression_ratio != 4:
        raise LayoutError(f"the decoder has {n_blocks} up blocks and {config.temporal_compression_ratio}x time "
                          "compression; streamdec decodes the 4x8x8 CogVideoX VAE (4 up blocks)")  # fmt: skip
    if any(w % config.norm_num_groups for w in widths):
        raise LayoutError(f"the decoder's widths {widths} do not split into {config.norm_num_groups} norm groups")
    return config


@register
class CogVideoX(Family):
    name = "cogvideox"
    title = "CogVideoX VAE"
    temporal_ratio = 4
    spatial_ratio = 8
    diffusers_class = "AutoencoderKLCogVideoX"
    strategy = Strategy.REPLAY
    tiling = Tiling.REFERENCE
    reference_tiles = Blended(REFERENCE_TILE)  # overlaps per axis: REFERENCE_OVERLAP
    steady_latents = 5  # a first call of 3 (the larger first call), then one of 2 with the caches

    # diffusers' folders (and ConsisID's, CogVideoX 1.5's) name the decoder as diffusers does; SAT's
    # 3d-vae.pt as the official code (`decoder.mid.block_1`, a spatial norm's `conv_y.conv`). KVAE-3D's
    # checkpoints also say `decoder.mid.block_1` but hold `conv_y.weight` (a plain conv).
    def detect_layout(self, keys) -> str | None:
        if "decoder.mid_block.resnets.0.norm1.conv_y.conv.weight" in keys:
            return "diffusers"
        if "decoder.mid.block_1.norm1.conv_y.conv.weight" in keys:
            return "sat"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        decoder_keys = [k for k in keys if k.startswith(("decoder.", "post_quant_conv."))]
        if layout == "sat":
            up_blocks = count_indexed(keys, "decoder.up") if any(k.startswith("decoder.up.") for k in keys) else 4
            return {k: sat_to_diffusers(k, up_blocks) for k in decoder_keys}
        return {k: k for k in decoder_keys}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        if layout == "sat":
            up_blocks = count_indexed(internal_keys, "decoder.up_blocks")
            return {k: diffusers_to_sat(k, up_blocks) for k in internal_keys}
        return {k: k for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith(("encoder.", "quant_conv.", "loss."))  # SAT keeps its training loss's too

    def config(self, shapes, diffusers_config: dict | None) -> CogVideoXConfig:
        return config_from_shapes(shapes, diffusers_config)

    def build(self, config: CogVideoXConfig) -> CogVideoXDecoder:
        return CogVideoXDecoder(config)

    def frames_out(self, latent_frames: int, first_chunk: bool) -> int:
        if first_chunk:  # a whole video: its first call takes 2 + T mod 2 latents
            return 4 * latent_frames - (3 if latent_frames % 2 else 0)
        return super().frames_out(latent_frames, first_chunk)

    def effective_tile(self, tile):
        if tile is not None and not isinstance(tile, Blended):
            raise StreamdecError(f"the {self.title} normalizes with GroupNorm over whole frames, so no tiling can equal "
                                 "its untiled decode; use tile='blended' for its reference's enable_tiling() tiles, "
                                 "or None")  # fmt: skip
        return super().effective_tile(tile)

    def _blended(self, tile: Blended) -> Blended:
        """The reference's overlaps differ by axis (1/6 of a tile's height, 1/5 of its width); a
        Blended without an overlap means those."""
        size = tile.size or self.reference_tiles.size
        for s, overlap in zip(size, self._overlaps(tile)):
            if not 0 < overlap < 1 or int(s * (1 - overlap)) * self.spatial_ratio != s * self.spatial_ratio - int(
                    s * self.spatial_ratio * overlap):  # fmt: skip
                raise StreamdecError(f"a blended overlap of {overlap:g} does not split {size[0]}x{size[1]}-pixel tiles "
                                     "evenly; leave it to the reference's (1/6 and 1/5), or try 0.25")  # fmt: skip
        return Blended(size, tile.overlap)

    def blended_tiles(self, tile: Blended, long_videos: bool = False) -> BlendedTiles:
        stride = tuple(int(s * (1 - overlap)) for s, overlap in zip(tile.size, self._overlaps(tile)))
        return BlendedTiles(tile.size, stride, self.spatial_ratio)

    @staticmethod
    def _overlaps(tile: Blended) -> tuple[float, float]:
        return REFERENCE_OVERLAP if tile.overlap is None else (tile.overlap, tile.overlap)

    def open_stream(self, decoder: CogVideoXDecoder, plan: Plan) -> CarriedReplayStream:
        if plan.latent_frames is None:
            raise StreamdecError(f"the {self.title}'s reference cuts the latents by the parity of their number (its "
                                 "first call takes 2 + T mod 2): give the video's length, "
                                 "StreamDecoder(vae, latent_frames=T)")  # fmt: skip
        tile = self.effective_tile(plan.tile)
        tiles = self.blended_tiles(tile) if tile is not None else None
        return CarriedReplayStream(decoder, Calls(first=2 + plan.latent_frames % 2, size=2), tiles)
