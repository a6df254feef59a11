"""Wan video VAE decoders: Wan 2.1 (also used by Wan 2.2-A14B, SkyReels-V2, Self-Forcing, ...)
and the Wan 2.2 high-compression VAE of TI2V-5B, built from the same blocks.

Streaming strategy: carried state. Every temporal convolution is a CausalConv3d, so a video frame
is final the moment it is produced and any chunking of the latents gives the same output as
the reference's one-latent-frame-at-a-time decode. Tiles are exact (streamdec.tiling).

Shape of the decoder (released sizes, latent h x w, 16 channels in, RGB out):

    post_quant_conv   1x1x1 conv, 16 -> 16
    conv_in           causal 3x3x3 conv, 16 -> 384
    mid_block         residual, per-frame spatial attention, residual (384)
    up_blocks.0       3 residual (384), upsampler: time x2, space x2, 384 -> 192
    up_blocks.1       3 residual (192 -> 384, 384, 384), upsampler: time x2, space x2
    up_blocks.2       3 residual (192), upsampler: space x2, 192 -> 96
    up_blocks.3       3 residual (96)
    norm_out, SiLU, conv_out   causal 3x3x3 conv, 96 -> 3

Wan 2.2 (`Wan2.2_VAE.pth`; diffusers `is_residual=True`) differs in four ways: 48 latent channels;
a decoder 256 wide whose upsamplers keep their width; a parameter-free `DupUp3D` shortcut around
every upsampling block; and 12 output channels that `unpatchify` folds into 2x2 pixels, so space
is compressed 16x in all:

    conv_in 48 -> 1024, mid_block (1024)
    up_blocks.0/1     3 residual (1024), upsampler time x2, space x2, + DupUp3D shortcut
    up_blocks.2       3 residual (1024 -> 512, 512, 512), upsampler space x2, + DupUp3D shortcut
    up_blocks.3       3 residual (512 -> 256, 256, 256)
    norm_out, SiLU, conv_out 256 -> 12, unpatchify -> RGB at 16h x 16w

The module names are diffusers' (`AutoencoderKLWan`), so a diffusers state dict loads as is;
the official checkpoint names (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, ComfyUI) are renamed by
`official_to_diffusers`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..keys import count_indexed
from ..layers import CausalConv3d, NearestUpsample2x, RMSNorm, channels_last, per_frame
from ..plan import Plan
from ..state import StreamState
from ..streams import CarriedStream
from ..tiling import ExactTiler
from . import Family, LayoutError, Strategy, Tiling, register

# Per-channel latent statistics of the released Wan 2.1 VAE (official `WanVAE`, diffusers config).
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip
# The same for the Wan 2.2 VAE (official `Wan2_2_VAE`, diffusers `vae22_diffusers_config`).
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)  # fmt: skip
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)  # fmt: skip


@dataclass(frozen=True)
class WanConfig:
    """Decoder hyper-parameters; the defaults are the released Wan 2.1 VAE, `WAN22` the Wan 2.2 one."""

    base_dim: int = 96  # the decoder's (diffusers `decoder_base_dim`)
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)  # per up block, deepest first
    residual: bool = False  # Wan 2.2: DupUp3D shortcuts around the up blocks, no channel halving
    patch_size: int = 1  # Wan 2.2: 2, the decoder's output pixels are 2x2 patches
    latents_mean: tuple[float, ...] = field(default=WAN21_MEAN, repr=False)
    latents_std: tuple[float, ...] = field(default=WAN21_STD, repr=False)

    @property
    def out_channels(self) -> int:
        return 3 * self.patch_size**2

    def block_channels(self) -> list[tuple[int, int, str | None]]:
        """(in, out, upsampler) for each up block; the upsampler is "3d", "2d" or None."""
        dims = [self.base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not self.residual:
                cin //= 2  # each Wan 2.1 upsampler halves the channels
            last = i == len(self.dim_mult) - 1
            up = None if last else ("3d" if self.temporal_upsample[i] else "2d")
            blocks.append((cin, cout, up))
        return blocks


WAN22 = WanConfig(base_dim=256, z_dim=48, residual=True, patch_size=2, latents_mean=WAN22_MEAN,
                  latents_std=WAN22_STD)  # fmt: skip


# ---------------------------------------------------------------------------- blocks


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x, state)
        x = self.conv1(self.norm1(x, silu=True), state)
        x = self.conv2(self.norm2(x, silu=True), state)
        return x.add_(shortcut)


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame; no attention across time."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        return x + per_frame(self._attend, x)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([FrameAttention(dim)])

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = self.resnets[0](x, state)
        x = self.attentions[0](x, state)
        return self.resnets[1](x, state)


class Upsampler(nn.Module):
    """Optionally doubles time (a causal conv emitting two frames per frame), then doubles
    space (nearest, then a 3x3 conv). The first frame of the stream is not doubled in time:
    the reference decodes the first latent frame to a single video frame."""

    def __init__(self, dim: int, out_dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, out_dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def _double_time(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        parts = []
        if state.first_time(self):
            parts.append(x[:, :, :1])
            x = x[:, :, 1:]
        if x.shape[2]:
            y = self.time_conv(x, state)
            b, c2, t, h, w = y.shape
            # channels [0, C) give frame 2i, channels [C, 2C) frame 2i+1; written into a tensor
            # of y's layout (channels-last on the CPU), so the layers after keep it
            layout = torch.channels_last_3d if y.is_contiguous(memory_format=torch.channels_last_3d) else None
            doubled = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=y.dtype, device=y.device,
                                  memory_format=layout or torch.contiguous_format)  # fmt: skip
            doubled.unflatten(2, (t, 2)).copy_(y.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5))
            parts.append(doubled)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_time(x, state)
        return per_frame(self.resample, x)


class UpBlock(nn.Module):
    """Wan 2.1: residual blocks, then an upsampler that halves the channels."""

    def __init__(self, cin: int, cout: int, num_resnets: int, upsampler: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_resnets)])
        self.upsamplers = None
        if upsampler is not None:
            self.upsamplers = nn.ModuleList([Upsampler(cout, cout // 2, temporal=upsampler == "3d")])

    def layers(self) -> list[nn.Module]:
        return list(self.resnets) + (list(self.upsamplers) if self.upsamplers is not None else [])

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x, state)
        return x


class DupUp3D(nn.Module):
    """Wan 2.2's parameter-free shortcut around an upsampling block: each input channel is
    repeated, and the copies are laid out as the factor_t frames and factor_s x factor_s pixels
    that the input position becomes. Like the upsampler beside it, it turns the stream's first
    frame into a single frame (the reference drops the first factor_t - 1 copies)."""

    def __init__(self, cin: int, cout: int, factor_t: int, factor_s: int):
        super().__init__()
        self.cout, self.factor_t, self.factor_s = cout, factor_t, factor_s
        self.repeats = cout * factor_t * factor_s**2 // cin

    def add_to(self, out: torch.Tensor, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        """out += the shortcut of x. Added through a strided view of the copies, so the shortcut
        is never laid out as a separate output-sized tensor."""
        b, _, t, h, w = x.shape
        ft, fs, c = self.factor_t, self.factor_s, self.cout
        copies = x.repeat_interleave(self.repeats, dim=1).view(b, c, ft, fs, fs, t, h, w)
        copies = copies.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c, t, ft, h, fs, w, fs)
        rest = out
        if state.first_time(self):  # the first frame's last copy only
            out[:, :, :1] += copies[:, :, :1, ft - 1 :].reshape(b, c, 1, h * fs, w * fs)
            rest, copies, t = out[:, :, 1:], copies[:, :, 1:], t - 1
        rest.view(b, c, t, ft, h, fs, w, fs).add_(copies)
        return out


class ResidualUpBlock(nn.Module):
    """Wan 2.2: residual blocks and an upsampler that keeps the width, plus a DupUp3D shortcut
    from the block's input to its output."""

    def __init__(self, cin: int, cout: int, num_resnets: int, upsampler: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_resnets)])
        self.upsampler = self.avg_shortcut = None
        if upsampler is not None:
            temporal = upsampler == "3d"
            self.upsampler = Upsampler(cout, cout, temporal=temporal)
            self.avg_shortcut = DupUp3D(cin, cout, factor_t=2 if temporal else 1, factor_s=2)

    def layers(self) -> list[nn.Module]:
        return list(self.resnets) + ([self.upsampler] if self.upsampler is not None else [])

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        block_input = x  # the residual blocks do not write into their input
        for layer in self.layers():
            x = layer(x, state)
        if self.avg_shortcut is not None:
            x = self.avg_shortcut.add_to(x, block_input, state)
        return x


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C*p*p, T, H, W) -> (B, C, T, H*p, W*p); channel c*p*p + j*p + i holds the pixel at row
    offset i and column offset j of each patch (the references' order)."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


class Decoder3d(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        blocks = config.block_channels()
        top = blocks[0][0]
        up_block = ResidualUpBlock if config.residual else UpBlock
        self.conv_in = CausalConv3d(config.z_dim, top, 3, padding=1)
        self.mid_block = MidBlock(top)
        self.up_blocks = nn.ModuleList(
            [up_block(cin, cout, config.num_res_blocks + 1, up) for cin, cout, up in blocks]
        )
        self.norm_out = RMSNorm(blocks[-1][1])
        self.conv_out = CausalConv3d(blocks[-1][1], config.out_channels, 3, padding=1)


class WanDecoder(nn.Module):
    """De-normalized latents (B, z_dim, t, h, w) -> video in [-1, 1] (B, 3, frames, H, W),
    unclamped. Parameter names are those of diffusers' AutoencoderKLWan (decoder side).

    For exact spatial tiling the decoder is two parts: `decode_global` (up to the mid block, whose
    attention spans the whole frame; cheap, at latent resolution) and `decode_local` (the
    upsampling stages and the head, where every output pixel depends only on latent pixels
    within `local_halo` of it)."""

    channels_last = True  # on the CPU: activations and convolution weights (streamdec.layers.channels_last)

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.local_halo = up_path_halo(config)

    def decode_global(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        z = channels_last(z)  # kept by every layer after it
        return d.mid_block(d.conv_in(self.post_quant_conv(z, state), state), state)

    def decode_local(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        for block in d.up_blocks:
            x = block(x, state)
        x = d.conv_out(d.norm_out(x, silu=True), state)
        return unpatchify(x, self.config.patch_size)

    def forward(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self.decode_local(self.decode_global(z, state), state)

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        blocks = [self.post_quant_conv, d.conv_in, d.mid_block]
        for up in d.up_blocks:
            blocks += up.layers()
        return blocks + [d.norm_out, d.conv_out]


def up_path_halo(config: WanConfig) -> int:
    """How far (in latent pixels) an output pixel of `decode_local` can see: the spatial reach of
    its 3x3 convolutions, walked back from the output one scale at a time (rounding up at each
    2x upsampling, which maps output pixel i to input pixel i // 2). Wan 2.2's shortcuts and
    unpatchify map a pixel to the one under it, so they add nothing."""
    reach = 1  # conv_out, at the output scale
    for _, _, upsampler in reversed(config.block_channels()):
        if upsampler is not None:
            reach = math.ceil((reach + 1) / 2)  # the upsampler's 3x3 conv, then back through nearest 2x
        reach += 2 * (config.num_res_blocks + 1)  # two 3x3 convs per residual block
    return reach


# ---------------------------------------------------------------------------- checkpoints

_OFFICIAL_FIXED = {
    "conv2.": "post_quant_conv.",
    "decoder.conv1.": "decoder.conv_in.",
    "decoder.middle.0.": "decoder.mid_block.resnets.0.",
    "decoder.middle.1.": "decoder.mid_block.attentions.0.",
    "decoder.middle.2.": "decoder.mid_block.resnets.1.",
    "decoder.head.0.": "decoder.norm_out.",
    "decoder.head.2.": "decoder.conv_out.",
}
_RESIDUAL_LEAVES = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_INVERSE_FIXED = {v: k for k, v in _OFFICIAL_FIXED.items()}
_INVERSE_LEAVES = {v: k for k, v in _RESIDUAL_LEAVES.items()}
_OFFICIAL_UPSAMPLE = re.compile(r"decoder\.upsamples\.(\d+)\.(.*)")  # Wan 2.1: numbered flat
_OFFICIAL_NESTED = re.compile(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.*)")  # Wan 2.2: per block
_DIFFUSERS_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0|upsampler)\.(.*)")


def _swap(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _is_upsampler_leaf(rest: str) -> bool:
    return rest.startswith(("resample.", "time_conv."))


def _fixed_to_diffusers(key: str) -> str:
    new = _swap(key, _OFFICIAL_FIXED)
    if ".mid_block.resnets." in new:
        head, rest = new.split(".mid_block.resnets.", 1)
        index, rest = rest.split(".", 1)
        new = f"{head}.mid_block.resnets.{index}." + _swap(rest, _RESIDUAL_LEAVES)
    return new


def _fixed_to_official(key: str) -> str:
    if ".mid_block.resnets." in key:
        head, rest = key.split(".mid_block.resnets.", 1)
        index, rest = rest.split(".", 1)
        return _swap(f"{head}.mid_block.resnets.{index}.", _INVERSE_FIXED) + _swap(rest, _INVERSE_LEAVES)
    return _swap(key, _INVERSE_FIXED)


def is_nested_official(keys) -> bool:
    """Whether official keys nest the up path per block, as Wan 2.2's do."""
    return any(_OFFICIAL_NESTED.fullmatch(k) for k in keys)


def official_to_diffusers(keys) -> dict[str, str]:
    """Rename map for the decoder keys of an official Wan checkpoint.

    Wan 2.1 numbers its up-path layers flat (`decoder.upsamples.N`), an upsampler ending each
    block; Wan 2.2 nests them (`decoder.upsamples.I.upsamples.J`), J after the residual blocks
    being the upsampler, which diffusers names `up_blocks.I.upsampler`."""
    keys = [k for k in keys if k.startswith(("decoder.", "conv2."))]
    if is_nested_official(keys):
        return {key: _nested_to_diffusers(key) for key in keys}
    rests: dict[int, list[str]] = {}
    for key in keys:
        if m := _OFFICIAL_UPSAMPLE.fullmatch(key):
            rests.setdefault(int(m.group(1)), []).append(m.group(2))
    upsampler_at = {n for n, leaves in rests.items() if any(_is_upsampler_leaf(r) for r in leaves)}
    position, block, resnet = {}, 0, 0
    for n in sorted(rests):
        if n in upsampler_at:
            position[n] = f"decoder.up_blocks.{block}.upsamplers.0."
            block, resnet = block + 1, 0
        else:
            position[n] = f"decoder.up_blocks.{block}.resnets.{resnet}."
            resnet += 1
    renames = {}
    for key in keys:
        if m := _OFFICIAL_UPSAMPLE.fullmatch(key):
            n, rest = int(m.group(1)), m.group(2)
            renames[key] = position[n] + (rest if n in upsampler_at else _swap(rest, _RESIDUAL_LEAVES))
        else:
            renames[key] = _fixed_to_diffusers(key)
    return renames


def _nested_to_diffusers(key: str) -> str:
    m = _OFFICIAL_NESTED.fullmatch(key)
    if m is None:
        return _fixed_to_diffusers(key)
    block, layer, rest = m.groups()
    if _is_upsampler_leaf(rest):
        return f"decoder.up_blocks.{block}.upsampler.{rest}"
    return f"decoder.up_blocks.{block}.resnets.{layer}." + _swap(rest, _RESIDUAL_LEAVES)


def diffusers_to_official(keys) -> dict[str, str]:
    """The inverse of `official_to_diffusers`, for the decoder keys of a diffusers checkpoint
    (all of them: the official numbering counts the layers)."""
    keys = [k for k in keys if k.startswith(("decoder.", "post_quant_conv."))]
    matches = [m for k in keys if (m := _DIFFUSERS_UP.fullmatch(k))]
    # each block's resnets in numeric order, then its upsampler
    order = sorted({(int(m.group(1)), m.group(3) is None, int(m.group(3) or 0), m.group(2)) for m in matches})
    nested = any(layer == "upsampler" for *_, layer in order)
    flat, in_block, count = {}, {}, Counter()
    for n, (block, *_, layer) in enumerate(order):
        flat[(block, layer)], in_block[(block, layer)] = n, count[block]
        count[block] += 1
    renames = {}
    for key in keys:
        m = _DIFFUSERS_UP.fullmatch(key)
        if m is None:
            renames[key] = _fixed_to_official(key)
            continue
        block, layer, rest = int(m.group(1)), m.group(2), m.group(4)
        if layer.startswith("resnets"):
            rest = _swap(rest, _INVERSE_LEAVES)
        where = f"{block}.upsamples.{in_block[(block, layer)]}" if nested else f"{flat[(block, layer)]}"
        renames[key] = f"decoder.upsamples.{where}.{rest}"
    return renames


def config_from_shapes(shapes: dict[str, tuple[int, ...]], mean, std) -> WanConfig:
    """Read the decoder's sizes off its tensors (diffusers names), so fine-tuned or reduced
    variants load from a bare state dict. Only products base_dim*mult shape the network, so
    base_dim is taken as the gcd of the stage widths."""
    try:
        z_dim = shapes["post_quant_conv.weight"][0]
        n_blocks = count_indexed(shapes, "decoder.up_blocks")
        widths = [shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_blocks)]
        num_res = count_indexed(shapes, "decoder.up_blocks.0.resnets")
    except KeyError as err:
        raise LayoutError(f"no Wan decoder tensor {err}") from None
    residual = is_wan22(shapes)
    conv_out = shapes.get("decoder.conv_out.weight") or shapes.get("decoder.conv_out.bias")
    out_channels = conv_out[0] if conv_out else 3 * (4 if residual else 1)  # if missing, the error names it
    patch = math.isqrt(out_channels // 3)
    if 3 * patch**2 != out_channels:
        raise LayoutError(f"the decoder gives {out_channels} channels, which are not RGB patches (3 x p x p)")
    if len(mean) != z_dim or len(std) != z_dim:
        raise LayoutError(f"the decoder takes {z_dim} latent channels but its latent statistics have {len(mean)}")
    base = math.gcd(*widths)
    upsampler = "upsampler" if residual else "upsamplers.0"
    temporal = tuple(any(k.startswith(f"decoder.up_blocks.{i}.{upsampler}.time_conv.") for k in shapes)
                     for i in range(n_blocks - 1))  # fmt: skip
    return WanConfig(
        base_dim=base,
        z_dim=z_dim,
        dim_mult=tuple(w // base for w in reversed(widths)),
        num_res_blocks=num_res - 1,
        temporal_upsample=temporal,
        residual=residual,
        patch_size=patch,
        latents_mean=tuple(mean),
        latents_std=tuple(std),
    )


def is_wan22(keys) -> bool:
    """Wan 2.2 checkpoints nest the official up path per block; diffusers names its upsampler
    `up_blocks.I.upsampler` (Wan 2.1: `upsamplers.0`)."""
    return is_nested_official(keys) or any(re.match(r"decoder\.up_blocks\.\d+\.upsampler\.", k) for k in keys)


@register
class Wan21(Family):
    name = "wan2.1"
    title = "Wan 2.1 VAE"
    temporal_ratio = 4
    spatial_ratio = 8
    diffusers_class = "AutoencoderKLWan"
    strategy = Strategy.CARRIED
    tiling = Tiling.EXACT
    latents_mean, latents_std = WAN21_MEAN, WAN21_STD  # unless a diffusers config says otherwise
    residual = False  # whether its checkpoints are Wan 2.2's (`is_wan22`)

    def detect_layout(self, keys) -> str | None:
        if is_wan22(keys) != self.residual:
            return None
        if "decoder.middle.0.residual.0.gamma" in keys:
            return "official"
        if "decoder.mid_block.resnets.0.norm1.gamma" in keys and "decoder.conv_in.weight" in keys:
            return "diffusers"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        if layout == "official":
            return official_to_diffusers(keys)
        return {k: k for k in keys if k.startswith(("decoder.", "post_quant_conv."))}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        if layout == "official":
            return diffusers_to_official(internal_keys)
        return {k: k for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith(("encoder.", "quant_conv.", "conv1."))

    def config(self, shapes, diffusers_config: dict | None) -> WanConfig:
        cfg = diffusers_config or {}
        mean, std = cfg.get("latents_mean") or self.latents_mean, cfg.get("latents_std") or self.latents_std
        return config_from_shapes(shapes, mean, std)

    def build(self, config: WanConfig) -> WanDecoder:
        return WanDecoder(config)

    def open_stream(self, decoder: WanDecoder, plan: Plan) -> CarriedStream:
        tiler = None
        if plan.tile is not None:
            tiler = ExactTiler(decoder, plan.tile, self.spatial_ratio, park=plan.park, sample=plan.sample_tiles)
        return CarriedStream(decoder, tiler=tiler, frames_per_call=plan.frames_per_call)


@register
class Wan22(Wan21):
    """The Wan 2.2 TI2V-5B VAE: the same decoding rules, 48 channels, 16x spatial compression."""

    name = "wan2.2"
    title = "Wan 2.2 VAE"
    spatial_ratio = 16
    latents_mean, latents_std = WAN22_MEAN, WAN22_STD
    residual = True
