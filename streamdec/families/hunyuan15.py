"""HunyuanVideo-1.5 VAE decoder.

Streaming strategy: carried state, with an attention cache. Every convolution is causal (the first
frame repeated in front, the border replicated in space), every norm is an RMS norm over channels
at one position, and the one attention (in the mid block) is frame-causal: the tokens of frame t
attend to every token of frames 0..t. So the stream carries the convolutions' caches and the
attention's keys and values of every frame so far (`StreamState.keep`): the one state that grows,
by 2 x tokens x channels per latent frame (4 KiB per token in bf16: 6.5 MB per latent frame at 480p,
14.7 MB at 720p). Off the CPU those wait in pinned host memory, and attention runs one query frame
against them block by block with a running softmax, so the device holds one frame's keys at a time
and never the (tokens x tokens) mask the reference builds. Any chunking equals the reference's
whole-clip decode.

Everything after the mid block is spatially local, so tiles are exact (`decode_global` is conv_in
and the mid block at latent resolution, `decode_local` the up path with a halo of `local_halo`).
`tile="blended"` is the reference's `enable_tiling()` instead (256-pixel tiles, overlap 0.25; the
official pipeline uses 0.125), streamed tile by tile.

Shape of the decoder (released sizes, 32 latent channels, RGB out):

    conv_in        causal 3x3x3 conv 32 -> 1024, plus the latents repeated 32 times over channels
    mid_block      resnet, frame-causal attention over all tokens so far, resnet (1024)
    up_blocks.0    3 resnets (1024), upsample: time x2, space x2 (conv to 8 x 1024, depth to space)
    up_blocks.1    3 resnets (1024), upsample: time x2, space x2 -> 512
    up_blocks.2    3 resnets (512), upsample: space x2 -> 256
    up_blocks.3    3 resnets (256), upsample: space x2 -> 128
    up_blocks.4    3 resnets (128)
    norm_out (RMS), SiLU, conv_out   causal 3x3x3 conv 128 -> 3

Each upsampler adds a parameter-free shortcut: its input's channels repeated and laid out as the
pixels (and frames) they become. Its first frame of the stream becomes one frame, as in the
reference. The module names are diffusers' (`AutoencoderKLHunyuanVideo15`); the official and ComfyUI
checkpoints (`decoder.mid.attn_1.q`, `decoder.up.I.block.J`) are renamed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..keys import count_indexed
from ..layers import RMSNorm, WrappedCausalConv3d, attend_in_blocks
from ..plan import Plan
from ..state import StreamState
from ..streams import CarriedStream
from ..tiling import Blended, BlendedTiler, ExactTiler
from . import Family, LayoutError, Strategy, Tiling, register

SCALING_FACTOR = 1.03682  # diffusion latents = VAE latents * this (no shift)


@dataclass(frozen=True)
class Hunyuan15Config:
    """Decoder hyper-parameters; the defaults are the released HunyuanVideo-1.5 VAE."""

    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)  # the encoder's order, as diffusers
    layers_per_block: int = 2
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 4
    scaling_factor: float = SCALING_FACTOR

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return (0.0,) * self.latent_channels

    @property
    def latents_std(self) -> tuple[float, ...]:  # the pipeline decodes latents / scaling_factor
        return (1.0 / self.scaling_factor,) * self.latent_channels

    def up_blocks(self) -> list[tuple[int, int, int | None, bool]]:
        """(in, out, upsampler's out or None, upsampler doubles time) for each up block."""
        widths = list(reversed(self.block_out_channels))
        space, time = int(math.log2(self.spatial_compression_ratio)), int(math.log2(self.temporal_compression_ratio))
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            up = widths[i + 1] if i < space else None
            blocks.append((cin, cout, up, i < time))
            cin = up if up is not None else cout
        return blocks


def causal_conv(cin: int, cout: int) -> WrappedCausalConv3d:
    """3x3x3, the first frame repeated in front and the border replicated, as the reference pads."""
    return WrappedCausalConv3d(cin, cout, 3, padding=1, time_pad="replicate", spatial_pad="replicate")


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = causal_conv(cin, cout)
        self.norm2 = RMSNorm(cout)
        self.conv2 = causal_conv(cout, cout)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(self.norm1(x, silu=True), state)
        x = self.conv2(self.norm2(x, silu=True), state)
        return x.add_(shortcut)


class FrameCausalAttention(nn.Module):
    """Single-head attention, the tokens of each frame attending to those of every frame up to its
    own. The keys and values of past frames are kept in the StreamState, a block per frame, and a
    query frame meets them one block at a time, its softmax accumulated as it goes (in fp32)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_q = nn.Conv3d(dim, dim, 1)
        self.to_k = nn.Conv3d(dim, dim, 1)
        self.to_v = nn.Conv3d(dim, dim, 1)
        self.proj_out = nn.Conv3d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        b, c, t, h, w = x.shape
        normed = self.norm(x)

        def tokens(conv: nn.Conv3d) -> torch.Tensor:  # (B, T, H*W, C)
            return conv(normed).flatten(3).permute(0, 2, 3, 1)

        q, k, v = tokens(self.to_q), tokens(self.to_k), tokens(self.to_v)
        out = torch.empty_like(q)
        for i in range(t):  # frame by frame: frame i sees the frames kept so far and itself
            state.keep(self, k[:, i], v[:, i])
            out[:, i] = attend_in_blocks(q[:, i], state.blocks(self, x.device), c**-0.5)
        out = out.permute(0, 3, 1, 2).reshape(b, c, t, h, w)
        return self.proj_out(out).add_(x)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim), ResnetBlock(dim, dim)])
        self.attentions = nn.ModuleList([FrameCausalAttention(dim)])

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = self.resnets[0](x, state)
        x = self.attentions[0](x, state)
        return self.resnets[1](x, state)


def depth_to_space(x: torch.Tensor, rt: int) -> torch.Tensor:
    """(B, rt*2*2*C, T, H, W) -> (B, C, rt*T, 2H, 2W); channel ((i*2 + j)*2 + k)*C + c goes to frame
    offset i, row offset j, column offset k (the reference's layout)."""
    b, packed, t, h, w = x.shape
    c = packed // (rt * 4)
    x = x.view(b, rt, 2, 2, c, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(b, c, t * rt, h * 2, w * 2)


class Upsample(nn.Module):
    """A causal conv to 4 (8 with time) times the output channels, laid out as pixels (and frames),
    plus the input laid out the same way. The stream's first frame becomes one frame: the first
    half of its doubled channels."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        self.factor = 8 if temporal else 4
        self.conv = causal_conv(cin, cout * self.factor)
        self.temporal = temporal
        self.repeats = self.factor * cout // cin

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        h = self.conv(x, state)
        if not self.temporal:
            return depth_to_space(h, 1).add_(depth_to_space(x.repeat_interleave(self.repeats, dim=1), 1))
        parts = []
        if state.first_time(self):
            first = depth_to_space(h[:, :, :1], 1)
            shortcut = depth_to_space(x[:, :, :1], 1).repeat_interleave(self.repeats // 2, dim=1)
            parts.append(first[:, : first.shape[1] // 2] + shortcut)
            h, x = h[:, :, 1:], x[:, :, 1:]
        if h.shape[2]:
            parts.append(depth_to_space(h, 2).add_(depth_to_space(x, 2).repeat_interleave(self.repeats, dim=1)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_resnets: int, up: int | None, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Upsample(cout, up, temporal)]) if up is not None else None

    def layers(self) -> list[nn.Module]:
        return list(self.resnets) + (list(self.upsamplers) if self.upsamplers is not None else [])


class Decoder3d(nn.Module):
    def __init__(self, config: Hunyuan15Config):
        super().__init__()
        blocks = config.up_blocks()
        top = blocks[0][0]
        self.repeat = top // config.latent_channels
        self.conv_in = causal_conv(config.latent_channels, top)
        self.mid_block = MidBlock(top)
        self.up_blocks = nn.ModuleList(
            [UpBlock(cin, cout, config.layers_per_block + 1, up, temporal) for cin, cout, up, temporal in blocks]
        )
        last = blocks[-1][2] or blocks[-1][1]
        self.norm_out = RMSNorm(last)
        self.conv_out = causal_conv(last, 3)


class Hunyuan15Decoder(nn.Module):
    """De-normalized latents (B, 32, t, h, w) -> video in [-1, 1] (B, 3, frames, 16h, 16w), unclamped,
    continuing the stream in `state`."""

    def __init__(self, config: Hunyuan15Config):
        super().__init__()
        self.config = config
        self.decoder = Decoder3d(config)
        self.local_halo = up_path_halo(config)

    def decode_global(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        x = d.conv_in(z, state).add_(z.repeat_interleave(d.repeat, dim=1))
        return d.mid_block(x, state)

    def decode_local(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        for block in d.up_blocks:
            for layer in block.layers():
                x = layer(x, state)
        return d.conv_out(d.norm_out(x, silu=True), state)

    def forward(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self.decode_local(self.decode_global(z, state), state)

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        blocks = [d.conv_in, d.mid_block]
        for up in d.up_blocks:
            blocks += up.layers()
        return blocks + [d.norm_out, d.conv_out]


def up_path_halo(config: Hunyuan15Config) -> int:
    """How far (in latent pixels) an output pixel of `decode_local` can see, walked back from the
    output: +1 per 3x3 conv; an upsampler's conv runs before its depth to space, which maps output
    pixel p to p // 2, so the reach halves (rounding up) and then grows by its conv's 1."""
    reach = 1  # conv_out
    for _, _, up, _ in reversed(config.up_blocks()):
        if up is not None:
            reach = math.ceil(reach / 2) + 1
        reach += 2 * (config.layers_per_block + 1)  # two 3x3 convs per resnet
    return reach


# ---------------------------------------------------------------------------- checkpoints

_OFFICIAL_FIXED = {
    "decoder.mid.block_1.": "decoder.mid_block.resnets.0.",
    "decoder.mid.block_2.": "decoder.mid_block.resnets.1.",
    "decoder.mid.attn_1.q.": "decoder.mid_block.attentions.0.to_q.",
    "decoder.mid.attn_1.k.": "decoder.mid_block.attentions.0.to_k.",
    "decoder.mid.attn_1.v.": "decoder.mid_block.attentions.0.to_v.",
    "decoder.mid.attn_1.": "decoder.mid_block.attentions.0.",  # norm, proj_out
}
_OFFICIAL_UP = re.compile(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)")


def official_to_diffusers(key: str) -> str:
    """An official (or ComfyUI) decoder key -> diffusers' name."""
    for old, new in _OFFICIAL_FIXED.items():
        if key.startswith(old):
            return (new + key[len(old) :]).replace(".nin_shortcut.", ".conv_shortcut.")
    m = _OFFICIAL_UP.fullmatch(key)
    if m is None:
        return key  # conv_in, norm_out, conv_out: the same names
    block, part, resnet, rest = m.groups()
    if part == "upsample":
        return f"decoder.up_blocks.{block}.upsamplers.0.{rest}"
    return f"decoder.up_blocks.{block}.resnets.{resnet}.{rest.replace('nin_shortcut.', 'conv_shortcut.')}"


def config_from_shapes(shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None) -> Hunyuan15Config:
    """The decoder's sizes from its tensors (diffusers names), the scaling factor from config.json."""
    cfg = diffusers_config or {}
    try:
        latent = shapes["decoder.conv_in.conv.weight"][1]
        n_blocks = count_indexed(shapes, "decoder.up_blocks")
        widths = [shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in range(n_blocks)]
        num_res = count_indexed(shapes, "decoder.up_blocks.0.resnets")
    except KeyError as err:
        raise LayoutError(f"no HunyuanVideo-1.5 decoder tensor {err}") from None
    space = sum(f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.weight" in shapes for i in range(n_blocks))
    time = sum(shapes.get(f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.weight", (0,))[0] == 8 * widths[min(i + 1, n_blocks - 1)]
               for i in range(n_blocks))  # fmt: skip
    config = Hunyuan15Config(
        latent_channels=latent, block_out_channels=tuple(reversed(widths)), layers_per_block=num_res - 1,
        spatial_compression_ratio=2**space, temporal_compression_ratio=2**time,
        scaling_factor=float(cfg.get("scaling_factor") or SCALING_FACTOR),
    )  # fmt: skip
    if (2**space, 2**time) != (16, 4) or widths[0] % latent:
        raise LayoutError(f"the decoder upsamples {2**time}x in time and {2**space}x in space from {latent} channels; "
                          "streamdec decodes the 4x16x16 HunyuanVideo-1.5 VAE")  # fmt: skip
    return config


@register
class HunyuanVideo15(Family):
    name = "hunyuanvideo1.5"
    title = "HunyuanVideo-1.5 VAE"
    temporal_ratio = 4
    spatial_ratio = 16
    diffusers_class = "AutoencoderKLHunyuanVideo15"
    strategy = Strategy.CARRIED
    tiling = Tiling.EXACT
    reference_tiles = Blended((16, 16), 0.25)  # enable_tiling(): 256-pixel tiles; the official pipeline: 0.125

    # diffusers' folders name it as diffusers does; the official vae/ folder and ComfyUI's single
    # file use the names of Tencent's code (decoder.mid.attn_1.q, decoder.up.I.block.J). Both store
    # RMS-norm gains ("gamma"), which HunyuanVideo v1 (GroupNorm) and Open-Sora-Plan do not.
    def detect_layout(self, keys) -> str | None:
        if "decoder.mid_block.attentions.0.norm.gamma" in keys and "decoder.conv_in.conv.weight" in keys:
            return "diffusers"
        if "decoder.mid.attn_1.norm.gamma" in keys and "decoder.conv_in.conv.weight" in keys:
            return "official"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        decoder_keys = [k for k in keys if k.startswith("decoder.")]
        if layout == "official":
            return {k: official_to_diffusers(k) for k in decoder_keys}
        return {k: k for k in decoder_keys}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        if layout == "diffusers":
            return {k: k for k in internal_keys}
        official = _official_names(internal_keys)
        return {k: official.get(k, k) for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith("encoder.")

    def config(self, shapes, diffusers_config: dict | None) -> Hunyuan15Config:
        return config_from_shapes(shapes, diffusers_config)

    def build(self, config: Hunyuan15Config) -> Hunyuan15Decoder:
        return Hunyuan15Decoder(config)

    def open_stream(self, decoder: Hunyuan15Decoder, plan: Plan) -> CarriedStream:
        tile, tiler = self.effective_tile(plan.tile), None
        if isinstance(tile, Blended):
            tiler = BlendedTiler(decoder, self.blended_tiles(tile))
        elif tile is not None:
            tiler = ExactTiler(decoder, tile, self.spatial_ratio, park=plan.park, sample=plan.sample_tiles)
        return CarriedStream(decoder, tiler=tiler, park=plan.park, frames_per_call=plan.frames_per_call)


def _official_names(internal_keys) -> dict[str, str]:
    """diffusers name -> official name, for the names an official checkpoint can have."""
    inverse = {}
    for key in internal_keys:
        for old, new in _OFFICIAL_FIXED.items():
            if key.startswith(new):
                inverse[key] = old + key[len(new) :]
                break
        else:
            m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
            if m:
                block, part, resnet, rest = m.groups()
                where = "upsample" if part == "upsamplers.0" else f"block.{resnet}"
                inverse[key] = f"decoder.up.{block}.{where}.{rest}".replace("conv_shortcut.", "nin_shortcut.")
    return inverse
