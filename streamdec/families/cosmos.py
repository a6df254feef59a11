"""Cosmos tokenizer CV8x8x8 decoder (NVIDIA Cosmos-1.0; diffusers `AutoencoderKLCosmos`).

Streaming strategy: carried state, with an attention cache. Every convolution is factorized into a
spatial (1x3x3, zero-padded) and a temporal (3x1x1) one, causal with the first frame repeated in front;
every norm is a GroupNorm with one group over a single frame. The mid block's attention is spatial
within each frame, then temporal per pixel and causal (each pixel of frame t sees that pixel in frames
0..t). So the stream carries the temporal convolutions' last two input frames and the temporal
attention's keys and values of every frame so far (`StreamState.keep`: 2 x pixels x 512 channels per
latent frame, 13 MB at 480p in bf16); off the CPU those wait in pinned host memory and visit the
device one frame at a time, and each query frame meets them with a running softmax.

The time upsampler of the reference doubles every frame of a call of more than one frame and drops
the first copy, and leaves a one-frame call alone, so the whole-clip decode turns the first frame into
one frame and every later one into two. The stream does that whatever the chunking: the stream's first
frame once (`state.first_time`), every later frame twice, so one latent frame per push equals the
whole-clip decode. The inverse Haar unpatch makes 4 frames of every frame on its own and the reference
drops the first 3 of the clip; the stream drops them from its first output. T latent frames give
8T - 7 frames.

No spatial tiling: every block normalizes over the whole frame (GroupNorm, one group) and the mid
block attends over the whole frame, so no part of the decoder is spatially local.

Shape of the decoder (released sizes, 16 latent channels, RGB out):

    post_quant_conv   1x1x1 conv 16 -> 16
    conv_in           1x3x3 + 3x1x1 conv 16 -> 512
    mid_block         resnet, spatial attention, temporal causal attention, resnet (512)
    up_blocks.0       3 resnets (512)
    up_blocks.1       3 resnets (512), upsample: time x2, space x2 (repeat, conv, plus the repeat)
    up_blocks.2       3 resnets (512 -> 256)
    norm_out, SiLU, conv_out 1x3x3 + 3x1x1 conv 256 -> 192, inverse Haar (2 levels) -> RGB at 4x4x4

The module names are diffusers'; NVIDIA's checkpoint names (the state dict of its `autoencoder.jit`
or `decoder.jit`: `decoder.mid.attn_1.0.q.conv3d`, `decoder.up.I.block.J.conv1.0.conv3d`, ...) are renamed.
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
from ..layers import CausalConv3d, Conv3d, attend_in_blocks, per_frame
from ..plan import Plan
from ..state import StreamState
from ..streams import CarriedStream
from . import Family, LayoutError, Strategy, register

SIGMA_DATA = 0.5  # the Cosmos-1.0 pipelines de-normalize with std / sigma_data of their EDM scheduler


@dataclass(frozen=True)
class UpBlockSpec:
    cin: int
    cout: int
    resnets: int
    attention: bool
    temporal_up: bool
    spatial_up: bool


@dataclass(frozen=True)
class CosmosConfig:
    """Decoder hyper-parameters; the defaults are the released CV8x8x8 tokenizer."""

    latent_channels: int = 16
    width: int = 512  # conv_in and the mid block
    up: tuple[UpBlockSpec, ...] = (UpBlockSpec(512, 512, 3, False, False, False),
                                   UpBlockSpec(512, 512, 3, False, True, True),
                                   UpBlockSpec(512, 256, 3, False, False, False))  # fmt: skip
    patch_size: int = 4
    # per channel, or per channel and latent frame (C x F, the released statistics: 16 x 16)
    stats_mean: tuple[float, ...] | None = None
    stats_std: tuple[float, ...] | None = None
    sigma_data: float = SIGMA_DATA

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return self.stats_mean if self.stats_mean is not None else (0.0,) * self.latent_channels

    @property
    def latents_std(self) -> tuple[float, ...]:
        std = self.stats_std if self.stats_std is not None else (1.0,) * self.latent_channels
        return tuple(s / self.sigma_data for s in std)

    @property
    def temporal_ratio(self) -> int:
        return self.patch_size * 2 ** sum(b.temporal_up for b in self.up)

    @property
    def spatial_ratio(self) -> int:
        return self.patch_size * 2 ** sum(b.spatial_up for b in self.up)


def spatial_conv(cin: int, cout: int) -> CausalConv3d:
    return CausalConv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))


def temporal_conv(channels: int) -> CausalConv3d:
    """3x1x1, the first frame repeated twice in front, as the reference pads."""
    return CausalConv3d(channels, channels, (3, 1, 1), time_pad="replicate")


class Projection(nn.Module):
    """A 3x3x3 conv factorized: 1x3x3 in space, then 3x1x1 in time."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_s = spatial_conv(cin, cout)
        self.conv_t = temporal_conv(cout)

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self.conv_t(self.conv_s(x), state)


class FrameNorm(nn.Module):
    """GroupNorm with one group over each frame on its own."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self.norm, x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = FrameNorm(cin)
        self.conv1 = Projection(cin, cout)
        self.norm2 = FrameNorm(cout)
        self.conv2 = Projection(cout, cout)
        self.conv_shortcut = Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), state)
        h = self.conv2(F.silu(self.norm2(h)), state)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head attention's weights: a frame norm, 1x1x1 q, k, v and output convs (diffusers'
    CosmosCausalAttention); the two kinds differ in which tokens meet."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = FrameNorm(dim)
        self.to_q, self.to_k, self.to_v = Conv3d(dim, dim, 1), Conv3d(dim, dim, 1), Conv3d(dim, dim, 1)
        self.to_out = nn.ModuleList([Conv3d(dim, dim, 1)])

    def qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        """q, k, v as (B, T, H*W, C)."""
        normed = self.norm(x)
        return [conv(normed).flatten(3).permute(0, 2, 3, 1) for conv in (self.to_q, self.to_k, self.to_v)]

    def out(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](tokens.permute(0, 3, 1, 2).reshape(x.shape)).add_(x)


class SpatialAttention(Attention):
    """Every pixel of a frame attends to every pixel of the same frame."""

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.out(F.scaled_dot_product_attention(q, k, v), x)


class TemporalAttention(Attention):
    """Each pixel attends to the same pixel in its own and every earlier frame. The keys and values of
    each frame are kept in the StreamState; a query frame meets them one frame at a time."""

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        q, k, v = self.qkv(x)
        scale = q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        for i in range(q.shape[1]):
            state.keep(self, k[:, i], v[:, i])
            out[:, i] = attend_per_pixel(q[:, i], state.blocks(self, x.device), scale)
        return self.out(out, x)


def attend_per_pixel(q: torch.Tensor, blocks, scale: float) -> torch.Tensor:
    """softmax over frames of (q . k_f) * scale, weighting v_f, separately at each pixel: q (B, P, C)
    against the kept (k_f, v_f) of each frame; each pixel is a batch of one query and one key per frame."""
    b, p, c = q.shape

    def per_pixel(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b * p, 1, c)

    out = attend_in_blocks(per_pixel(q), ((per_pixel(k), per_pixel(v)) for k, v in blocks), scale)
    return out.view(b, p, c)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim), ResnetBlock(dim, dim)])
        self.attentions = nn.ModuleList([SpatialAttention(dim)])
        self.temp_attentions = nn.ModuleList([TemporalAttention(dim)])

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = self.resnets[0](x, state)
        x = self.attentions[0](x, state)
        x = self.temp_attentions[0](x, state)
        return self.resnets[1](x, state)


class Upsample(nn.Module):
    """Time x2 (the stream's first frame once), then a causal 3x1x1 conv plus its input; space x2
    (nearest), then a 1x3x3 conv plus its input; then a 1x1x1 conv."""

    def __init__(self, dim: int, temporal: bool, spatial: bool):
        super().__init__()
        self.conv1 = temporal_conv(dim) if temporal else None
        self.conv2 = spatial_conv(dim, dim) if spatial else None
        self.conv3 = Conv3d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.conv1 is not None:
            x = x.repeat_interleave(2, dim=2)
            if state.first_time(self):  # the reference's whole clip: its first frame is not doubled
                x = x[:, :, 1:]
            x = self.conv1(x, state).add_(x)
        if self.conv2 is not None:
            x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
            x = self.conv2(x).add_(x)
        return self.conv3(x)


class UpBlock(nn.Module):
    def __init__(self, spec: UpBlockSpec):
        super().__init__()
        widths = [spec.cin] + [spec.cout] * spec.resnets
        self.resnets = nn.ModuleList([ResnetBlock(widths[i], widths[i + 1]) for i in range(spec.resnets)])
        self.attentions = nn.ModuleList(
            [SpatialAttention(spec.cout) for _ in range(spec.resnets)] if spec.attention else []
        )
        self.temp_attentions = nn.ModuleList([TemporalAttention(spec.cout) for _ in range(spec.resnets)]
                                             if spec.attention else [])  # fmt: skip
        moves = spec.temporal_up or spec.spatial_up
        self.upsamplers = nn.ModuleList([Upsample(spec.cout, spec.temporal_up, spec.spatial_up)]) if moves else None

    def layers(self) -> list[nn.Module]:
        steps = []
        for i, resnet in enumerate(self.resnets):
            steps.append(resnet)
            if len(self.attentions):
                steps += [self.attentions[i], self.temp_attentions[i]]
        return steps + (list(self.upsamplers) if self.upsamplers is not None else [])


def inverse_haar(x: torch.Tensor) -> torch.Tensor:
    """One level of the reference's inverse 3-D Haar transform (rescaled by sqrt(8)): 8 sub-bands of
    g channels -> g channels at twice the frames, rows and columns. Output (2t+i, 2y+j, 2x+k) is the sum
    over bands (a, b, c) (channel blocks 4a + 2b + c; 0 low, 1 high) of the band times (-1)^(ai+bj+ck);
    each frame becomes two frames on its own."""
    b, c, t, h, w = x.shape
    signs = torch.tensor([[(-1) ** bin(band & out).count("1") for band in range(8)] for out in range(8)],
                         dtype=x.dtype, device=x.device)  # fmt: skip
    y = torch.einsum("ob,nbgthw->nogthw", signs, x.view(b, 8, c // 8, t, h, w))
    y = y.view(b, 2, 2, 2, c // 8, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return y.reshape(b, c // 8, 2 * t, 2 * h, 2 * w)


class Decoder3d(nn.Module):
    def __init__(self, config: CosmosConfig):
        super().__init__()
        self.conv_in = Projection(config.latent_channels, config.width)
        self.mid_block = MidBlock(config.width)
        self.up_blocks = nn.ModuleList([UpBlock(spec) for spec in config.up])
        last = config.up[-1].cout
        self.norm_out = FrameNorm(last)
        self.conv_out = Projection(last, 3 * config.patch_size**3)


class CosmosDecoder(nn.Module):
    """De-normalized latents (B, 16, t, h, w) -> video in [-1, 1] (B, 3, frames, 8h, 8w), unclamped,
    continuing the stream in `state`: 8 frames per latent frame, 1 for the stream's first."""

    def __init__(self, config: CosmosConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = Conv3d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder3d(config)

    def forward(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        x = d.conv_in(self.post_quant_conv(z), state)
        x = d.mid_block(x, state)
        for block in d.up_blocks:
            for layer in block.layers():
                x = layer(x, state)
        x = d.conv_out(F.silu(d.norm_out(x)), state)
        for _ in range(int(math.log2(self.config.patch_size))):
            x = inverse_haar(x)
        if state.first_time(self):  # the reference drops the first patch_size - 1 frames of the clip
            x = x[:, :, self.config.patch_size - 1 :]
        return x

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        blocks = [self.post_quant_conv, d.conv_in, d.mid_block]
        for block in d.up_blocks:
            blocks += block.layers()
        return blocks + [d.norm_out, d.conv_out]


# ---------------------------------------------------------------------------- checkpoints

# NVIDIA's names -> diffusers', in order (diffusers' scripts/convert_cosmos_to_diffusers.py, VAE_KEYS_RENAME_DICT;
# the up levels are renumbered separately: NVIDIA's up.N runs last-first).
_OFFICIAL_RENAMES = [
    (".block.", ".resnets."), ("upsample.", "upsamplers.0."),
    ("mid.block_1.", "mid_block.resnets.0."), ("mid.attn_1.0.", "mid_block.attentions.0."),
    ("mid.attn_1.1.", "mid_block.temp_attentions.0."), ("mid.block_2.", "mid_block.resnets.1."),
    (".q.conv3d.", ".to_q."), (".k.conv3d.", ".to_k."), (".v.conv3d.", ".to_v."),
    (".proj_out.conv3d.", ".to_out.0."), (".0.conv3d.", ".conv_s."), (".1.conv3d.", ".conv_t."),
    ("conv1.conv3d.", "conv1."), ("conv2.conv3d.", "conv2."), ("conv3.conv3d.", "conv3."),
    ("nin_shortcut.conv3d.", "conv_shortcut."), ("post_quant_conv.conv3d.", "post_quant_conv."),
]  # fmt: skip
_OFFICIAL_UP = re.compile(r"decoder\.up\.(\d+)\.(block|attn|upsample)\.")
_OFFICIAL_ATTN = re.compile(r"(up_blocks\.\d+)\.attn\.(\d+)\.([01])\.")


def official_to_diffusers(key: str, levels: int) -> str:
    """An NVIDIA decoder key -> diffusers' name; `levels`: how many `decoder.up.N` there are."""
    key = _OFFICIAL_UP.sub(lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.{m.group(2)}.", key)
    key = _OFFICIAL_ATTN.sub(
        lambda m: f"{m.group(1)}.{('attentions', 'temp_attentions')[int(m.group(3))]}.{m.group(2)}.", key
    )
    for old, new in _OFFICIAL_RENAMES:
        key = key.replace(old, new)
    return key


def _official_levels(keys) -> int:
    return len({m.group(1) for k in keys if (m := _OFFICIAL_UP.match(k))})


def config_from_shapes(shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None) -> CosmosConfig:
    """The decoder's structure from its tensors (diffusers names): widths, resnets, which up blocks
    attend and which upsample in time (a conv1) or space (a conv2); the statistics from config.json."""
    cfg = diffusers_config or {}
    try:
        latent = shapes["post_quant_conv.weight"][0]
        width = shapes["decoder.conv_in.conv_s.weight"][0]
        up, cin = [], width
        for i in range(count_indexed(shapes, "decoder.up_blocks")):
            prefix = f"decoder.up_blocks.{i}"
            n = count_indexed(shapes, f"{prefix}.resnets")
            cout = shapes[f"{prefix}.resnets.{n - 1}.conv2.conv_s.weight"][0]
            up.append(UpBlockSpec(cin, cout, n, f"{prefix}.attentions.0.to_q.weight" in shapes,
                                  f"{prefix}.upsamplers.0.conv1.weight" in shapes,
                                  f"{prefix}.upsamplers.0.conv2.weight" in shapes))  # fmt: skip
            cin = cout
        patch = round((shapes["decoder.conv_out.conv_s.weight"][0] / 3) ** (1 / 3))
    except KeyError as err:
        raise LayoutError(f"no Cosmos decoder tensor {err}") from None
    if cfg.get("patch_type", "haar") != "haar":
        raise LayoutError(
            f"the decoder unpatches with {cfg['patch_type']!r}; streamdec decodes Cosmos' haar tokenizers"
        )
    config = CosmosConfig(latent_channels=latent, width=width, up=tuple(up), patch_size=patch,
                          stats_mean=_stats(cfg.get("latents_mean")), stats_std=_stats(cfg.get("latents_std")))  # fmt: skip
    if (config.temporal_ratio, config.spatial_ratio) != (8, 8):
        raise LayoutError(f"the decoder upsamples {config.temporal_ratio}x in time and {config.spatial_ratio}x in space; "
                          "streamdec decodes the 8x8x8 Cosmos tokenizer (CV8x8x8)")  # fmt: skip
    if config.stats_mean is not None and len(config.stats_mean) % latent:
        raise LayoutError(f"config.json has {len(config.stats_mean)} latents_mean values for {latent} channels")
    return config


def _stats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


@register
class Cosmos(Family):
    name = "cosmos"
    title = "Cosmos tokenizer (CV8x8x8)"
    temporal_ratio = 8
    spatial_ratio = 8
    diffusers_class = "AutoencoderKLCosmos"
    strategy = Strategy.CARRIED

    # diffusers' folders: `decoder.mid_block.temp_attentions.0`; NVIDIA's (the state dict of its
    # autoencoder.jit / decoder.jit): `decoder.mid.attn_1.1.q.conv3d`.
    def detect_layout(self, keys) -> str | None:
        if "decoder.mid_block.temp_attentions.0.to_q.weight" in keys and "decoder.conv_in.conv_s.weight" in keys:
            return "diffusers"
        if "decoder.mid.attn_1.1.q.conv3d.weight" in keys and "decoder.conv_in.0.conv3d.weight" in keys:
            return "official"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        wanted = [k for k in keys if k.startswith(("decoder.", "post_quant_conv.")) and not self.is_unused_key(k)]
        if layout == "official":
            levels = _official_levels(keys)
            return {k: official_to_diffusers(k, levels) for k in wanted}
        return {k: k for k in wanted}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        if layout == "diffusers":
            return {k: k for k in internal_keys}
        levels = len({k.split(".")[2] for k in internal_keys if k.startswith("decoder.up_blocks.")})
        return {k: _diffusers_to_official(k, levels) for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:  # the encoder's, and the wavelet constants NVIDIA stores
        return key.startswith(("encoder.", "quant_conv.")) or key.endswith(("wavelets", "_arange", "patch_size_buffer"))

    def config(self, shapes, diffusers_config: dict | None) -> CosmosConfig:
        return config_from_shapes(shapes, diffusers_config)

    def build(self, config: CosmosConfig) -> CosmosDecoder:
        return CosmosDecoder(config)

    def effective_tile(self, tile):
        if tile is not None:
            raise StreamdecError(f"the {self.title} cannot be tiled: every block normalizes each frame over the whole "
                                 "frame (GroupNorm) and its mid block attends over it, so tiles would change the picture; "
                                 "use tile=None")  # fmt: skip
        return None

    def open_stream(self, decoder: CosmosDecoder, plan: Plan) -> CarriedStream:
        self.effective_tile(plan.tile)
        return CarriedStream(decoder, park=plan.park, frames_per_call=plan.frames_per_call)


_TO_OFFICIAL = [
    (r"\.upsamplers\.0\.conv(\d)\.", r".upsample.conv\1.conv3d."), (r"\.conv_s\.", ".0.conv3d."),
    (r"\.conv_t\.", ".1.conv3d."), (r"\.conv_shortcut\.", ".nin_shortcut.conv3d."), (r"\.to_([qkv])\.", r".\1.conv3d."),
    (r"\.to_out\.0\.", ".proj_out.conv3d."), (r"mid_block\.resnets\.0\.", "mid.block_1."),
    (r"mid_block\.resnets\.1\.", "mid.block_2."), (r"mid_block\.attentions\.0\.", "mid.attn_1.0."),
    (r"mid_block\.temp_attentions\.0\.", "mid.attn_1.1."), (r"\.attentions\.(\d+)\.", r".attn.\1.0."),
    (r"\.temp_attentions\.(\d+)\.", r".attn.\1.1."), (r"\.resnets\.", ".block."),
    (r"^post_quant_conv\.", "post_quant_conv.conv3d."),
]  # fmt: skip


def _diffusers_to_official(key: str, levels: int) -> str:
    """diffusers' name -> NVIDIA's (to name missing tensors as the file would)."""
    for pattern, repl in _TO_OFFICIAL:
        key = re.sub(pattern, repl, key)
    return re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", key)
