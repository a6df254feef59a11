"""Mochi 1 VAE decoder (genmo; diffusers `AutoencoderKLMochi`).

Streaming strategy: carried state. Every convolution is causal (the first frame repeated in front,
the border replicated in space), every norm is a GroupNorm over one frame (32 groups over C x H x W),
the upsamplers are a per-position Linear laid out as pixels and frames, and there is no attention.
So a frame is final the moment it is decoded and any chunking equals diffusers' whole-clip decode:
each CausalConv3d carries its last two input frames.

diffusers' decode runs the whole clip (every latent frame becomes 6 frames) and then trims the first
5 frames of the result. The stream decodes the same 6 frames per latent frame, through the same
layers, and trims the same 5 frames of its first output (`state.first_time`): a video of T latent
frames has 6T - 5 frames, as the reference's. genmo's own decoder differs: it drops frames after
each upsampler instead (2 after the 3x one, 1 after the 2x one), so its later layers see fewer copies
of the first frame and its first frames differ from diffusers'; streamdec follows diffusers.

No spatial tiling: the GroupNorms of every block normalize over the whole frame, so no part of the
decoder is spatially local and tiles cannot equal the untiled decode.

Shape of the decoder (released sizes, 12 latent channels, RGB out):

    conv_in        1x1x1 conv 12 -> 768
    block_in       3 resnets (768)
    up_blocks.0    6 resnets (768), Linear to 512 x 3 x 2 x 2: time x3, space x2
    up_blocks.1    4 resnets (512), Linear to 256 x 2 x 2 x 2: time x2, space x2
    up_blocks.2    3 resnets (256), Linear to 128 x 1 x 2 x 2: space x2
    block_out      3 resnets (128)
    SiLU, proj_out Linear 128 -> 3

A resnet is GroupNorm, SiLU, causal 3x3x3 conv, GroupNorm, SiLU, causal 3x3x3 conv, plus its input.
The module names are diffusers'; genmo's `decoder.safetensors` (`blocks.0.{i+1}.stack.{0,2,3,5}`,
`blocks.{b+1}.blocks.{i}.stack.*`, `blocks.{b+1}.proj`, `blocks.4.{i}.stack.*`, `output_proj`) is renamed.
"""

from __future__ import annotations

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
from ..streams import CarriedStream
from . import Family, LayoutError, Strategy, register

# Per-channel latent statistics of the released VAE (diffusers' config, genmo's vae_stats).
MOCHI_MEAN = (-0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
              0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
              -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285)  # fmt: skip
MOCHI_STD = (0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
             0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
             0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041)  # fmt: skip


@dataclass(frozen=True)
class MochiConfig:
    """Decoder hyper-parameters; the defaults are the released Mochi 1 VAE."""

    latent_channels: int = 12
    block_out_channels: tuple[int, ...] = (128, 256, 512, 768)  # diffusers' decoder_block_out_channels
    layers_per_block: tuple[int, ...] = (3, 3, 4, 6, 3)  # block_out, up blocks (last first), block_in
    temporal_expansions: tuple[int, ...] = (1, 2, 3)  # the encoder's order: up block i uses [-i - 1]
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    latents_mean_per_channel: tuple[float, ...] = MOCHI_MEAN
    latents_std_per_channel: tuple[float, ...] = MOCHI_STD
    scaling_factor: float = 1.0

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return self.latents_mean_per_channel

    @property
    def latents_std(self) -> tuple[float, ...]:  # the pipeline decodes z * std / scaling_factor + mean
        return tuple(s / self.scaling_factor for s in self.latents_std_per_channel)

    @property
    def temporal_ratio(self) -> int:
        return _product(self.temporal_expansions)

    @property
    def spatial_ratio(self) -> int:
        return _product(self.spatial_expansions)

    def up_blocks(self) -> list[tuple[int, int, int, int, int]]:
        """(in, out, resnets, time factor, space factor) of each up block, in the order they run."""
        widths, n = self.block_out_channels, len(self.block_out_channels) - 1
        return [(widths[-i - 1], widths[-i - 2], self.layers_per_block[-i - 2], self.temporal_expansions[-i - 1],
                 self.spatial_expansions[-i - 1]) for i in range(n)]  # fmt: skip


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


class FrameGroupNorm(nn.Module):
    """GroupNorm (32 groups) over each frame on its own: (C, H, W) of one frame, never across frames."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self.norm_layer, x)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(channels)
        self.conv1 = causal_conv(channels)
        self.norm2 = FrameGroupNorm(channels)
        self.conv2 = causal_conv(channels)

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), state)
        h = self.conv2(F.silu(self.norm2(h)), state)
        return h.add_(x)


def causal_conv(channels: int) -> WrappedCausalConv3d:
    """3x3x3, the first frame repeated in front and the border replicated, as the reference pads."""
    return WrappedCausalConv3d(channels, channels, 3, padding=1, time_pad="replicate", spatial_pad="replicate")


class ResnetStack(nn.Module):
    """block_in and block_out: resnets only (diffusers' MochiMidBlock3D without attention)."""

    def __init__(self, channels: int, count: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels) for _ in range(count)])


class UpBlock(nn.Module):
    """Resnets, then a Linear over channels to out x t x s x s, laid out as t frames of s x s pixels."""

    def __init__(self, cin: int, cout: int, count: int, time: int, space: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin) for _ in range(count)])
        self.proj = nn.Linear(cin, cout * time * space * space)
        self.time, self.space = time, space

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """proj and depth to space: channel ((c*t + i)*s + j)*s + k goes to frame offset i, row j, column k."""
        h = linear_over_channels(self.proj, x)
        b, _, t, hh, ww = h.shape
        st, s = self.time, self.space
        h = h.view(b, -1, st, s, s, t, hh, ww).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return h.reshape(b, -1, t * st, hh * s, ww * s)


def linear_over_channels(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class Decoder3d(nn.Module):
    def __init__(self, config: MochiConfig):
        super().__init__()
        widths = config.block_out_channels
        self.conv_in = Conv3d(config.latent_channels, widths[-1], 1)
        self.block_in = ResnetStack(widths[-1], config.layers_per_block[-1])
        self.up_blocks = nn.ModuleList([UpBlock(*spec) for spec in config.up_blocks()])
        self.block_out = ResnetStack(widths[0], config.layers_per_block[0])
        self.proj_out = nn.Linear(widths[0], 3)


class MochiDecoder(nn.Module):
    """De-normalized latents (B, 12, t, h, w) -> video in [-1, 1] (B, 3, frames, 8h, 8w), unclamped,
    continuing the stream in `state`: 6 frames per latent frame, 1 for the stream's first."""

    def __init__(self, config: MochiConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder3d(config)

    def forward(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        x = d.conv_in(z)
        for resnet in d.block_in.resnets:
            x = resnet(x, state)
        for up in d.up_blocks:
            for resnet in up.resnets:
                x = resnet(x, state)
            x = up.unfold(x)
        for resnet in d.block_out.resnets:
            x = resnet(x, state)
        video = linear_over_channels(d.proj_out, F.silu(x))
        if state.first_time(self):  # diffusers trims the first temporal_ratio - 1 frames of the clip
            video = video[:, :, self.config.temporal_ratio - 1 :]
        return video

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run: each up block's proj alone."""
        d = self.decoder
        blocks = [d.conv_in, *d.block_in.resnets]
        for up in d.up_blocks:
            blocks += [*up.resnets, up.proj]
        return blocks + [*d.block_out.resnets, d.proj_out]


# ---------------------------------------------------------------------------- checkpoints

_STACK = {"0": "norm1.norm_layer", "2": "conv1.conv", "3": "norm2.norm_layer", "5": "conv2.conv"}
_RESNET_OF = {v: k for k, v in _STACK.items()}
_GENMO = re.compile(r"blocks\.(\d+)\.(?:blocks\.)?(\d+)\.stack\.(\d)\.(weight|bias)")


def genmo_to_diffusers(key: str, up_blocks: int) -> str:
    """A key of genmo's Decoder (its `decoder.safetensors`, without a prefix) -> diffusers' name
    (without `decoder.`). genmo's blocks.0 is conv_in then block_in's resnets, blocks.1..n the up
    blocks, blocks.n+1 block_out; a resnet's `stack` holds norm, SiLU, conv, norm, SiLU, conv."""
    if key.startswith("blocks.0.0."):
        return "conv_in." + key[len("blocks.0.0.") :]
    if key.startswith("output_proj."):
        return "proj_out." + key[len("output_proj.") :]
    m = re.fullmatch(r"blocks\.(\d+)\.proj\.(weight|bias)", key)
    if m:
        return f"up_blocks.{int(m.group(1)) - 1}.proj.{m.group(2)}"
    m = _GENMO.fullmatch(key)
    if m is None or m.group(3) not in _STACK:
        return key  # not a decoder tensor: reported as unexpected
    block, index, layer, kind = int(m.group(1)), int(m.group(2)), _STACK[m.group(3)], m.group(4)
    if block == 0:
        return f"block_in.resnets.{index - 1}.{layer}.{kind}"
    if block <= up_blocks:
        return f"up_blocks.{block - 1}.resnets.{index}.{layer}.{kind}"
    return f"block_out.resnets.{index}.{layer}.{kind}"


def diffusers_to_genmo(key: str, up_blocks: int) -> str:
    """diffusers' decoder name (without `decoder.`) -> genmo's."""
    if key.startswith("conv_in."):
        return "blocks.0.0." + key[len("conv_in.") :]
    if key.startswith("proj_out."):
        return "output_proj." + key[len("proj_out.") :]
    m = re.fullmatch(r"up_blocks\.(\d+)\.proj\.(weight|bias)", key)
    if m:
        return f"blocks.{int(m.group(1)) + 1}.proj.{m.group(2)}"
    m = re.fullmatch(r"(block_in|block_out|up_blocks\.(\d+))\.resnets\.(\d+)\.(\w+\.\w+)\.(weight|bias)", key)
    if m is None:
        return key
    where, up, index, layer, kind = m.groups()
    stack = f"stack.{_RESNET_OF[layer]}.{kind}"
    if where == "block_in":
        return f"blocks.0.{int(index) + 1}.{stack}"
    if where == "block_out":
        return f"blocks.{up_blocks + 1}.{index}.{stack}"
    return f"blocks.{int(up) + 1}.blocks.{index}.{stack}"


def _genmo_up_blocks(keys) -> int:
    return sum(1 for k in keys if re.fullmatch(r"(decoder\.)?blocks\.\d+\.proj\.weight", k))


def config_from_shapes(shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None) -> MochiConfig:
    """The decoder's sizes from its tensors (diffusers names); the expansions and latent statistics
    from config.json where there is one (genmo's files have none: the released values)."""
    cfg = diffusers_config or {}
    try:
        latent = shapes["decoder.conv_in.weight"][1]
        n_up = count_indexed(shapes, "decoder.up_blocks")
        widths = [shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in range(n_up)]
        widths.append(shapes["decoder.block_out.resnets.0.conv1.conv.weight"][0])
        counts = [count_indexed(shapes, "decoder.block_out.resnets")]
        counts += [count_indexed(shapes, f"decoder.up_blocks.{i}.resnets") for i in reversed(range(n_up))]
        counts.append(count_indexed(shapes, "decoder.block_in.resnets"))
        proj = [shapes[f"decoder.up_blocks.{i}.proj.weight"][0] // widths[i + 1] for i in range(n_up)]
    except KeyError as err:
        raise LayoutError(f"no Mochi decoder tensor {err}") from None
    space = tuple(cfg.get("spatial_expansions") or (2,) * n_up)
    time = tuple(cfg.get("temporal_expansions") or reversed([p // space[-i - 1] ** 2 for i, p in enumerate(proj)]))
    config = MochiConfig(
        latent_channels=latent, block_out_channels=tuple(reversed(widths)), layers_per_block=tuple(counts),
        temporal_expansions=time, spatial_expansions=space,
        latents_mean_per_channel=tuple(cfg.get("latents_mean") or MOCHI_MEAN),
        latents_std_per_channel=tuple(cfg.get("latents_std") or MOCHI_STD),
        scaling_factor=float(cfg.get("scaling_factor") or 1.0),
    )  # fmt: skip
    made = [time[-i - 1] * space[-i - 1] ** 2 for i in range(n_up)]
    if (config.temporal_ratio, config.spatial_ratio) != (6, 8) or made != proj or len(config.latents_mean) != latent:
        raise LayoutError(f"the decoder upsamples {config.temporal_ratio}x in time and {config.spatial_ratio}x in "
                          f"space from {latent} channels; streamdec decodes the 6x8x8 Mochi VAE")  # fmt: skip
    return config


@register
class Mochi(Family):
    name = "mochi"
    title = "Mochi VAE"
    temporal_ratio = 6
    spatial_ratio = 8
    diffusers_class = "AutoencoderKLMochi"
    strategy = Strategy.CARRIED

    # diffusers' folders name it as diffusers does (`decoder.block_in.resnets.0.norm1.norm_layer`);
    # genmo's decoder.safetensors holds the decoder alone under its own names (`blocks.0.1.stack.0`),
    # also found under `decoder.` in files that hold the encoder too.
    def detect_layout(self, keys) -> str | None:
        if "decoder.block_in.resnets.0.norm1.norm_layer.weight" in keys and "decoder.up_blocks.0.proj.weight" in keys:
            return "diffusers"
        if "blocks.0.1.stack.0.weight" in keys and "output_proj.weight" in keys:
            return "official"
        if "decoder.blocks.0.1.stack.0.weight" in keys and "decoder.output_proj.weight" in keys:
            return "official-prefixed"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        if layout == "diffusers":
            return {k: k for k in keys if k.startswith("decoder.")}
        prefix = "decoder." if layout == "official-prefixed" else ""
        n_up = _genmo_up_blocks(keys)
        return {k: "decoder." + genmo_to_diffusers(k[len(prefix) :], n_up) for k in keys
                if k.startswith(prefix) and not self.is_unused_key(k)}  # fmt: skip

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        if layout == "diffusers":
            return {k: k for k in internal_keys}
        prefix = "decoder." if layout == "official-prefixed" else ""
        n_up = sum(1 for k in internal_keys if re.fullmatch(r"decoder\.up_blocks\.\d+\.proj\.weight", k))
        return {k: prefix + diffusers_to_genmo(k[len("decoder.") :], n_up) for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith("encoder.")

    def config(self, shapes, diffusers_config: dict | None) -> MochiConfig:
        return config_from_shapes(shapes, diffusers_config)

    def build(self, config: MochiConfig) -> MochiDecoder:
        return MochiDecoder(config)

    def effective_tile(self, tile):
        if tile is not None:
            raise StreamdecError(f"the {self.title} cannot be tiled: every block normalizes each frame with GroupNorm "
                                 "over the whole frame, so tiles would change the picture; use tile=None")  # fmt: skip
        return None

    def open_stream(self, decoder: MochiDecoder, plan: Plan) -> CarriedStream:
        self.effective_tile(plan.tile)
        return CarriedStream(decoder, park=plan.park, frames_per_call=plan.frames_per_call)
