"""HunyuanVideo VAE decoder (HunyuanVideo, Open-Sora 2.0, FramePack).

Streaming strategy: schedule replay. The decoder normalizes with GroupNorm over the whole time
axis of its input and its mid-block attention spans every frame, so a chunk's output depends on
the frames after it and no carried state reproduces a one-shot decode. The reference decodes
overlapping temporal windows instead and blends them (diffusers' default framewise decoding:
windows of 5 latents every 3, the frames of the 4th and 5th faded into the next window);
`streamdec.streams.replay` runs that schedule as the latents arrive. The decoder here is one
window's one-shot decode. Spatial tiles are the reference's blended ones (`enable_tiling()`).

Shape of the decoder (released sizes, latent h x w, 16 channels in, RGB out):

    post_quant_conv   1x1x1 conv, 16 -> 16
    conv_in           causal 3x3x3 conv (replicate padding), 16 -> 512
    mid_block         resnet, attention over all tokens (block-causal in time), resnet (512)
    up_blocks.0       3 resnets (512), upsample space x2
    up_blocks.1       3 resnets (512), upsample time x2, space x2
    up_blocks.2       3 resnets (512 -> 256), upsample time x2, space x2
    up_blocks.3       3 resnets (256 -> 128)
    conv_norm_out (GroupNorm 32), SiLU, conv_out   causal 3x3x3 conv, 128 -> 3

The module names are diffusers' (`AutoencoderKLHunyuanVideo`), which the official HunyuanVideo
and Open-Sora 2.0 checkpoints also use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..keys import count_indexed
from ..layers import Conv3d, WrappedCausalConv3d
from ..plan import Plan
from ..streams import ScheduleReplayStream, Windows
from ..tiling import Blended, BlendedTiles
from . import Family, LayoutError, Strategy, Tiling, register

SCALING_FACTOR = 0.476986  # diffusion latents = VAE latents * this (no shift)


@dataclass(frozen=True)
class HunyuanConfig:
    """Decoder hyper-parameters; the defaults are the released HunyuanVideo VAE."""

    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = SCALING_FACTOR

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return (0.0,) * self.latent_channels

    @property
    def latents_std(self) -> tuple[float, ...]:  # de-normalizing divides by the scaling factor
        return (1.0 / self.scaling_factor,) * self.latent_channels

    def block_channels(self) -> list[tuple[int, int, tuple[int, int, int] | None]]:
        """(in, out, upsampling factor (t, h, w) or None) for each up block: space doubles in the
        first three blocks, time in the two before the last (temporal ratio 4)."""
        widths = list(reversed(self.block_out_channels))
        n = len(widths)
        blocks = []
        for i, cout in enumerate(widths):
            space, time = i < 3, n - 3 <= i < n - 1
            factor = (2 if time else 1, 2 if space else 1, 2 if space else 1)
            blocks.append((widths[max(i - 1, 0)], cout, factor if space or time else None))
        return blocks


def causal_conv(cin: int, cout: int, kernel: int) -> WrappedCausalConv3d:
    """A causal conv padded in time by repeating the first frame and in space by replicating the
    border, as the references do."""
    return WrappedCausalConv3d(cin, cout, kernel, padding=kernel // 2, time_pad="replicate", spatial_pad="replicate")


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = causal_conv(cin, cout, 3)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = causal_conv(cout, cout, 3)
        self.conv_shortcut = causal_conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(F.silu(self.norm2(x)))
        return x.add_(shortcut)


class BlockCausalAttention(nn.Module):
    """Single-head attention over all the tokens of a window, each frame's tokens seeing those of
    its own and earlier frames. Computed one query frame at a time, so the (tokens x tokens) mask
    the references build is never made."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, T*H*W, C), frame-major
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        hw = h * w
        out = torch.cat(
            [F.scaled_dot_product_attention(q[:, i * hw : (i + 1) * hw], k[:, : (i + 1) * hw], v[:, : (i + 1) * hw])
             for i in range(t)],
            dim=1,
        )  # fmt: skip
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, t, h, w)
        return out.add_(x)


class MidBlock(nn.Module):
    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, groups), ResnetBlock(dim, dim, groups)])
        self.attentions = nn.ModuleList([BlockCausalAttention(dim, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Upsample(nn.Module):
    """Nearest upsampling by `factor` (t, h, w), then a causal conv; the first frame is upsampled in
    space only, so a window of T frames becomes 1 + factor_t * (T - 1)."""

    def __init__(self, dim: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = causal_conv(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = F.interpolate(x[:, :, 0], scale_factor=self.factor[1:], mode="nearest").unsqueeze(2)
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:].contiguous(), scale_factor=self.factor, mode="nearest")
            first = torch.cat([first, rest], dim=2)
        return self.conv(first)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_resnets: int, groups: int, factor):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Upsample(cout, factor)]) if factor is not None else None

    def layers(self) -> list[nn.Module]:
        return list(self.resnets) + (list(self.upsamplers) if self.upsamplers is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x)
        return x


class Decoder3d(nn.Module):
    def __init__(self, config: HunyuanConfig):
        super().__init__()
        groups = config.norm_num_groups
        blocks = config.block_channels()
        self.conv_in = causal_conv(config.latent_channels, blocks[0][0], 3)
        self.mid_block = MidBlock(blocks[0][0], groups)
        self.up_blocks = nn.ModuleList(
            [UpBlock(cin, cout, config.layers_per_block + 1, groups, up) for cin, cout, up in blocks]
        )
        self.conv_norm_out = nn.GroupNorm(groups, blocks[-1][1], eps=1e-6)
        self.conv_out = causal_conv(blocks[-1][1], 3, 3)


class HunyuanDecoder(nn.Module):
    """De-normalized latents (B, 16, T, h, w) -> video in [-1, 1] (B, 3, 1 + 4(T-1), 8h, 8w),
    unclamped, decoded in one shot (one window of the window schedule)."""

    def __init__(self, config: HunyuanConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = Conv3d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder3d(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        x = d.mid_block(d.conv_in(self.post_quant_conv(z)))
        for block in d.up_blocks:
            x = block(x)
        return d.conv_out(F.silu(d.conv_norm_out(x)))

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        blocks = [self.post_quant_conv, d.conv_in, d.mid_block]
        for up in d.up_blocks:
            blocks += up.layers()
        return blocks + [d.conv_norm_out, d.conv_out]


# ---------------------------------------------------------------------------- checkpoints


def config_from_shapes(shapes: dict[str, tuple[int, ...]], scaling_factor: float, groups: int) -> HunyuanConfig:
    """Read the decoder's sizes off its tensors (diffusers names)."""
    try:
        latent = shapes["post_quant_conv.weight"][0]
        n_blocks = count_indexed(shapes, "decoder.up_blocks")
        widths = [shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in range(n_blocks)]
        num_res = count_indexed(shapes, "decoder.up_blocks.0.resnets")
    except KeyError as err:
        raise LayoutError(f"no HunyuanVideo decoder tensor {err}") from None
    if n_blocks != 4:
        raise LayoutError(f"the decoder has {n_blocks} up blocks; the HunyuanVideo VAE has 4 (8x space, 4x time)")
    if any(w % groups for w in widths):
        raise LayoutError(f"the decoder's widths {widths} do not split into {groups} norm groups")
    return HunyuanConfig(latent_channels=latent, block_out_channels=tuple(reversed(widths)),
                         layers_per_block=num_res - 1, norm_num_groups=groups, scaling_factor=scaling_factor)  # fmt: skip


@register
class HunyuanVideo(Family):
    name = "hunyuanvideo"
    title = "HunyuanVideo VAE"
    temporal_ratio = 4
    spatial_ratio = 8
    diffusers_class = "AutoencoderKLHunyuanVideo"
    strategy = Strategy.REPLAY
    tiling = Tiling.REFERENCE
    steady_latents = 8  # two windows: 5 latents, then 3 more
    # diffusers' framewise decode: tile_sample_min_num_frames 16 (4 latents + the one before) every 12
    windows = Windows(latents=5, stride=3, blend=1)
    reference_tiles = Blended((32, 32), 0.25)  # enable_tiling(): 256-pixel tiles every 192

    # HunyuanVideo's `pytorch_model.pt`, Open-Sora 2.0's `hunyuan_vae.safetensors` and diffusers'
    # folders all use the same names; Tencent's loader also accepts them under a "vae." prefix.
    def detect_layout(self, keys) -> str | None:
        if "decoder.mid_block.attentions.0.group_norm.weight" in keys and "decoder.conv_in.conv.weight" in keys:
            return "official"
        if "vae.decoder.mid_block.attentions.0.group_norm.weight" in keys:
            return "prefixed"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        prefix = "vae." if layout == "prefixed" else ""
        wanted = (f"{prefix}decoder.", f"{prefix}post_quant_conv.")
        return {k: k[len(prefix) :] for k in keys if k.startswith(wanted)}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        prefix = "vae." if layout == "prefixed" else ""
        return {k: prefix + k for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.removeprefix("vae.").startswith(("encoder.", "quant_conv."))

    def config(self, shapes, diffusers_config: dict | None) -> HunyuanConfig:
        cfg = diffusers_config or {}
        scaling = cfg.get("scaling_factor") or SCALING_FACTOR
        return config_from_shapes(shapes, float(scaling), int(cfg.get("norm_num_groups") or 32))

    def build(self, config: HunyuanConfig) -> HunyuanDecoder:
        return HunyuanDecoder(config)

    def open_stream(self, decoder: HunyuanDecoder, plan: Plan) -> ScheduleReplayStream:
        tile, tiles = self.effective_tile(plan.tile), None
        if isinstance(tile, Blended):
            tiles = self.blended_tiles(tile)
        elif tile is not None:  # N latent pixels every 3/4 of N, as enable_tiling() at its defaults (32)
            tiles = BlendedTiles(tile, tuple(t - t // 4 for t in tile), self.spatial_ratio)
        return ScheduleReplayStream(decoder, self.windows, self.temporal_ratio, tiles)
