"""Open-Sora-Plan's VAEs: the building blocks of its `causalvideovae` code, and CausalVAE (v1.0-v1.2).

The blocks here are shared by CausalVAE (decoded one window at a time) and WF-VAE (streamed,
`streamdec.families.wfvae`). Every block with a temporal convolution takes an optional
StreamState: with one, the convolution continues the stream from the frames it cached; without,
it decodes its input in one shot, as the reference does.

CausalVAE's decoder (released v1.1/v1.2 sizes, 4 latent channels, RGB out):

    post_quant_conv   causal 1x1x1 conv, 4 -> 4
    decoder.conv_in   causal 3x3x3 conv, 4 -> 512
    decoder.mid       resnet, per-frame attention, resnet (512)
    decoder.up.3      3 resnets (512), upsample space x2 and time x2
    decoder.up.2      3 resnets (512), upsample space x2 and time x2
    decoder.up.1      3 resnets (512 -> 256), upsample space x2
    decoder.up.0      3 resnets (256 -> 128)
    decoder.norm_out (GroupNorm 32), SiLU, decoder.conv_out   causal 3x3x3 conv, 128 -> 3

Causal convolutions repeat the first frame in front (k-1 copies) and zero-pad in space. The time
upsamplers interpolate linearly (align_corners=False) between frames after the first, so frame
2i+1 of their output reads input frame i+1: a lookahead of one frame. CausalVAE normalizes with
GroupNorm over the whole time axis of its input, so its output depends on how the latents are cut;
its streaming strategy is therefore schedule replay: `ScheduleReplayStream` runs the reference's
tiled decode (windows of 6 latents every 4, the frames of each later window's 2 context latents
dropped, 512-pixel spatial tiles blended over 1/8) as the latents arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StreamdecError
from ..keys import count_indexed
from ..layers import WrappedCausalConv3d, per_frame
from ..plan import Plan
from ..state import StreamState
from ..streams import ScheduleReplayStream, Windows
from ..tiling import Blended
from . import Family, LayoutError, Strategy, Tiling, register

SCALING_FACTOR = 0.18215  # diffusion latents = VAE latents * this (Open-Sora-Plan's wrapper)
NORM_GROUPS = 32

# ---------------------------------------------------------------------------- shared blocks


def causal_conv(cin: int, cout: int, kernel, padding=0) -> WrappedCausalConv3d:
    """A 3-D convolution causal in time: k-1 copies of the stream's first frame in front of it, then
    the frames cached from the last chunk (or, without a state, the clip's own first frame). Spatial
    padding is zeros. Stored as `.conv`, as the reference's checkpoints name it."""
    return WrappedCausalConv3d(cin, cout, kernel, padding=padding, time_pad="replicate")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at every voxel: time-local, so a stream cut anywhere is exact."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "layernorm":
        return ChannelLayerNorm(channels)
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6)  # over (C/G, T, H, W): whole clips only


class ResnetBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.norm1 = make_norm(norm, cin)
        self.conv1 = causal_conv(cin, cout, 3, padding=1)
        self.norm2 = make_norm(norm, cout)
        self.conv2 = causal_conv(cout, cout, 3, padding=1)
        self.nin_shortcut = causal_conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), state)
        h = self.conv2(F.silu(self.norm2(h)), state)
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut)


class FrameAttention(nn.Module):
    """Single-head attention among the pixels of each frame (the reference's AttnBlock3DFix)."""

    def __init__(self, dim: int, norm: str):
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.q = causal_conv(dim, dim, 1)
        self.k = causal_conv(dim, dim, 1)
        self.v = causal_conv(dim, dim, 1)
        self.proj_out = causal_conv(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        normed = self.norm(x)

        def tokens(conv: WrappedCausalConv3d) -> torch.Tensor:  # (B*T, H*W, C)
            return conv(normed).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)

        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return self.proj_out(out).add_(x)


class TimeSpaceUpsample(nn.Module):
    """Time x2 (the first frame once), space x2 (bilinear), then a causal 3x3x3 conv: the
    reference's Spatial2xTime2x3DUpsample.

    In time, input frames 1..T-1 are interpolated linearly (align_corners=False): output 2i is
    0.25 * frame i-1 + 0.75 * frame i (frame 1 alone for the first), output 2i+1 is 0.75 * frame i
    + 0.25 * frame i+1 (the last frame alone at the clip's end). Streamed, output 2i+1 waits for
    frame i+1 or the end of the stream: a lookahead of one input frame."""

    def __init__(self, dim: int, t_interpolation: str = "trilinear"):
        super().__init__()
        self.conv = causal_conv(dim, dim, 3, padding=1)
        self.mode = t_interpolation
        # nearest in time: each frame twice, no lookahead needed (the same formulas with weight 0)
        self.weight = 0.25 if t_interpolation == "trilinear" else 0.0

    def forward(self, x: torch.Tensor | None, state: StreamState | None = None) -> torch.Tensor | None:
        """`x=None` ends the stream: the output frame still waiting for a next input frame, if any."""
        if state is None:
            return self.conv(self._space(time_upsample(x, self.mode)))
        if x is None:
            last = state.history.pop(self, None)
            return None if last is None else self.conv(self._space(self._odd(last, last)), state)
        return self.conv(self._space(self._time_streamed(x, state)), state)

    def _time_streamed(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        out = []
        for i in range(x.shape[2]):
            frame = x[:, :, i : i + 1]
            if state.first_time(self):
                out.append(frame)  # the stream's first frame: once, and no output waits on it
                continue
            last = state.history.get(self)
            if last is None:
                out.append(frame)  # frame 1 alone: the interpolation clamps at the clip's start
            else:
                out += [self._odd(last, frame), self._even(last, frame)]
            state.history[self] = frame.clone()
        return torch.cat(out, dim=2)

    def _even(self, before: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        return before * self.weight + frame * (1 - self.weight)

    def _odd(self, frame: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return frame * (1 - self.weight) + after * self.weight

    @staticmethod
    def _space(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear")


def time_upsample(x: torch.Tensor, mode: str = "trilinear") -> torch.Tensor:
    """Time x2 of the frames after the first, the first kept once (the reference's TimeUpsample2x)."""
    if x.shape[2] == 1:
        return x
    rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 1, 1), mode=mode)
    return torch.cat([x[:, :, :1], rest], dim=2)


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


# ---------------------------------------------------------------------------- CausalVAE


class SpaceUpsample(nn.Module):
    """Nearest x2 in space, then a causal 1x3x3 conv (the reference's SpatialUpsample2x)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = causal_conv(dim, dim, (1, 3, 3), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(per_frame(lambda f: F.interpolate(f, scale_factor=2.0, mode="nearest"), x))




class TimeUpsample(nn.Module):
    """TimeUpsample2x: no weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return time_upsample(x)


class MixedTimeUpsample(nn.Module):
    """TimeUpsample2x mixed with a causal conv of it, by a learned factor (TimeUpsampleRes2x)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = causal_conv(dim, dim, 3, padding=1)
        self.mix_factor = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = time_upsample(x)
        alpha = torch.sigmoid(self.mix_factor)
        return alpha * x + (1 - alpha) * self.conv(x)


SPACE_UPSAMPLERS = ("SpatialUpsample2x", "Spatial2xTime2x3DUpsample")
TIME_UPSAMPLERS = ("TimeUpsample2x", "TimeUpsampleRes2x")


@dataclass(frozen=True)
class CausalVAEConfig:
    """Decoder hyper-parameters; the defaults are the released Open-Sora-Plan v1.2 CausalVAE.
    `spatial_upsample` / `temporal_upsample` name each level's upsampler as the reference's
    config does (level 0 is the last to run); "" for none."""

    z_channels: int = 4
    embed_dim: int = 4
    hidden_size: int = 128
    hidden_size_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    spatial_upsample: tuple[str, ...] = ("", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample",
                                         "Spatial2xTime2x3DUpsample")  # fmt: skip
    temporal_upsample: tuple[str, ...] = ("", "", "", "")
    use_quant_layer: bool = True
    norm_type: str = "groupnorm"
    scaling_factor: float = SCALING_FACTOR

    @property
    def z_dim(self) -> int:
        return self.embed_dim if self.use_quant_layer else self.z_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return (0.0,) * self.z_dim

    @property
    def latents_std(self) -> tuple[float, ...]:
        return (1.0 / self.scaling_factor,) * self.z_dim

    def ratios(self) -> tuple[int, int]:
        """(temporal, spatial) upsampling of the whole decoder."""
        times = sum(s == "Spatial2xTime2x3DUpsample" for s in self.spatial_upsample) + sum(
            bool(t) for t in self.temporal_upsample
        )
        return 2**times, 2 ** sum(bool(s) for s in self.spatial_upsample)


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, config: CausalVAEConfig, space: str, time: str):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock3D(cin if i == 0 else cout, cout, config.norm_type) for i in range(config.num_res_blocks + 1)]
        )
        self.upsample = self.time_upsample = None
        if space == "SpatialUpsample2x":
            self.upsample = SpaceUpsample(cout)
        elif space:
            self.upsample = TimeSpaceUpsample(cout)
        if time == "TimeUpsampleRes2x":
            self.time_upsample = MixedTimeUpsample(cout)
        elif time:
            self.time_upsample = TimeUpsample()

    def layers(self) -> list[nn.Module]:
        return [*self.block, *(m for m in (self.upsample, self.time_upsample) if m is not None)]


class CausalVAEDecoder3d(nn.Module):
    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        widths = [config.hidden_size * m for m in config.hidden_size_mult]
        top = widths[-1]
        self.conv_in = causal_conv(config.z_channels, top, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock3D(top, top, config.norm_type)
        self.mid.attn_1 = FrameAttention(top, config.norm_type)
        self.mid.block_2 = ResnetBlock3D(top, top, config.norm_type)
        levels = {}
        cin = top
        for level in reversed(range(len(widths))):
            levels[level] = UpLevel(cin, widths[level], config, config.spatial_upsample[level],
                                    config.temporal_upsample[level])  # fmt: skip
            cin = widths[level]
        self.up = nn.ModuleList([levels[i] for i in range(len(widths))])
        self.norm_out = make_norm(config.norm_type, widths[0])
        self.conv_out = causal_conv(widths[0], 3, 3, padding=1)


class CausalVAEDecoder(nn.Module):
    """De-normalized latents (B, C, T, h, w) -> video in [-1, 1], decoded in one shot (one window
    of the window schedule, or one spatial tile of it), unclamped."""

    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        self.config = config
        if config.use_quant_layer:
            self.post_quant_conv = causal_conv(config.embed_dim, config.z_channels, 1)
        self.decoder = CausalVAEDecoder3d(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        if self.config.use_quant_layer:
            z = self.post_quant_conv(z)
        x = d.mid.block_2(d.mid.attn_1(d.mid.block_1(d.conv_in(z))))
        for level in reversed(d.up):
            for layer in level.layers():
                x = layer(x)
        return d.conv_out(F.silu(d.norm_out(x)))

    def offload_blocks(self) -> list[nn.Module]:
        """The layers in the order they run (the units weight offloading moves)."""
        d = self.decoder
        blocks = [self.post_quant_conv] if self.config.use_quant_layer else []
        blocks += [d.conv_in, d.mid.block_1, d.mid.attn_1, d.mid.block_2]
        for level in reversed(d.up):
            blocks += level.layers()
        return blocks + [d.norm_out, d.conv_out]


def causalvae_config(shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None) -> CausalVAEConfig:
    """The decoder's sizes from its tensors; the upsampler kinds from config.json where it exists
    (TimeUpsample2x has no weights to tell it by), else from the tensors."""
    cfg = diffusers_config or {}
    try:
        z_channels = shapes["decoder.conv_in.conv.weight"][1]
        n_levels = count_indexed(shapes, "decoder.up")
        widths = [shapes[f"decoder.up.{i}.block.0.conv1.conv.weight"][0] for i in range(n_levels)]
        blocks = count_indexed(shapes, "decoder.up.0.block")
    except KeyError as err:
        raise LayoutError(f"no CausalVAE decoder tensor {err}") from None
    if any(k.startswith("decoder.up.") and ".attn." in k for k in shapes):
        raise LayoutError("the decoder has attention in its up blocks (attn_resolutions), which streamdec does not build")
    space = list(cfg.get("decoder_spatial_upsample") or [_space_kind(shapes, i) for i in range(n_levels)])
    time = list(cfg.get("decoder_temporal_upsample") or [_time_kind(shapes, i) for i in range(n_levels)])
    for kind in space + time:
        if kind and kind not in SPACE_UPSAMPLERS + TIME_UPSAMPLERS:
            raise LayoutError(f"the decoder uses upsampler {kind!r}, which streamdec does not build")
    norm = cfg.get("norm_type") or "groupnorm"
    if norm == "groupnorm" and any(w % NORM_GROUPS for w in widths):
        raise LayoutError(f"the decoder's widths {widths} do not split into {NORM_GROUPS} norm groups")
    quant = "post_quant_conv.conv.weight" in shapes
    config = CausalVAEConfig(
        z_channels=z_channels, embed_dim=shapes["post_quant_conv.conv.weight"][1] if quant else z_channels,
        hidden_size=widths[0], hidden_size_mult=tuple(w // widths[0] for w in widths), num_res_blocks=blocks - 1,
        spatial_upsample=tuple(space), temporal_upsample=tuple(time), use_quant_layer=quant, norm_type=norm,
    )  # fmt: skip
    if config.ratios() != (4, 8):
        raise LayoutError(
            f"the decoder upsamples {config.ratios()[0]}x in time and {config.ratios()[1]}x in space; streamdec "
            "decodes the 4x8x8 CausalVAE (give the folder with config.json if its upsamplers have no weights)"
        )
    return config


def _space_kind(shapes, level: int) -> str:
    kernel = shapes.get(f"decoder.up.{level}.upsample.conv.conv.weight")
    if kernel is None:
        return ""
    return "SpatialUpsample2x" if kernel[2] == 1 else "Spatial2xTime2x3DUpsample"


def _time_kind(shapes, level: int) -> str:
    return "TimeUpsampleRes2x" if f"decoder.up.{level}.time_upsample.mix_factor" in shapes else ""


@register
class CausalVAE(Family):
    name = "causalvae"
    title = "Open-Sora-Plan CausalVAE"
    temporal_ratio = 4
    spatial_ratio = 8
    diffusers_class = "CausalVAEModel"
    strategy = Strategy.REPLAY
    tiling = Tiling.REFERENCE
    default_tile = (64, 64)  # the reference's 512-pixel tiles: it always tiles
    tile_overlap = 0.125
    reference_tiles = Blended(default_tile, tile_overlap)
    steady_latents = 10  # two windows: 6 latents, then 4 more
    # tiled_decode: windows of 6 latents every 4, the last the rest if it holds new latents
    windows = Windows(latents=6, stride=4, blend=0, ending="rest")

    # The released folders hold config.json with a .ckpt or diffusers safetensors; the names are
    # the model's own, with the encoder's beside them.
    def detect_layout(self, keys) -> str | None:
        if "decoder.mid.attn_1.q.conv.weight" in keys and "decoder.conv_in.conv.weight" in keys:
            return "official"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        return {k: k for k in keys if k.startswith(("decoder.", "post_quant_conv."))}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        return {k: k for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith(("encoder.", "quant_conv."))

    def config(self, shapes, diffusers_config: dict | None) -> CausalVAEConfig:
        return causalvae_config(shapes, diffusers_config)

    def build(self, config: CausalVAEConfig) -> CausalVAEDecoder:
        return CausalVAEDecoder(config)

    def effective_tile(self, tile: tuple[int, int] | Blended | None) -> Blended:
        """Always the reference's blended tiles; a size N means N latent pixels with its overlap."""
        tile = super().effective_tile(tile)
        if isinstance(tile, Blended):
            return tile
        if any((t * self.tile_overlap) % 1 for t in tile):
            raise StreamdecError(f"tile must be a multiple of {round(1 / self.tile_overlap)} latent pixels for the "
                                 f"reference's {self.tile_overlap:g} tile overlap, not {tile[0]}x{tile[1]}")  # fmt: skip
        return Blended(tile, self.tile_overlap)

    def open_stream(self, decoder: CausalVAEDecoder, plan: Plan) -> ScheduleReplayStream:
        tiles = self.blended_tiles(self.effective_tile(plan.tile), long_videos=True)
        return ScheduleReplayStream(decoder, self.windows, self.temporal_ratio, tiles)
