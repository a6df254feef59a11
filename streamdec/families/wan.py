"""Wan 2.1 video VAE decoder (Wan 2.1, Wan 2.2-A14B, SkyReels-V2, Self-Forcing, ...).

Streaming strategy: causal. Every temporal convolution is a CausalConv3d, so a video frame
is final the moment it is produced and any chunking of the latents gives the same output as
the reference's one-latent-frame-at-a-time decode.

Shape of the decoder (released sizes, latent h x w, 16 channels in, RGB out):

    post_quant_conv   1x1x1 conv, 16 -> 16
    conv_in           causal 3x3x3 conv, 16 -> 384
    mid_block         residual, per-frame spatial attention, residual (384)
    up_blocks.0       3 residual (384), upsampler: time x2, space x2, 384 -> 192
    up_blocks.1       3 residual (192 -> 384, 384, 384), upsampler: time x2, space x2
    up_blocks.2       3 residual (192), upsampler: space x2, 192 -> 96
    up_blocks.3       3 residual (96)
    norm_out, SiLU, conv_out   causal 3x3x3 conv, 96 -> 3

The module names are diffusers' (`AutoencoderKLWan`), so a diffusers state dict loads as is;
the official checkpoint names (`Wan2.1_VAE.pth`, ComfyUI) are renamed by `official_to_diffusers`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CausalConv3d, NearestUpsample2x, RMSNorm, per_frame
from ..state import StreamState
from . import Family, LayoutError

# Per-channel latent statistics of the released Wan 2.1 VAE (official `WanVAE`, diffusers config).
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip


@dataclass(frozen=True)
class WanConfig:
    """Decoder hyper-parameters; the defaults are the released Wan 2.1 VAE."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)  # per up block, deepest first
    latents_mean: tuple[float, ...] = field(default=WAN21_MEAN, repr=False)
    latents_std: tuple[float, ...] = field(default=WAN21_STD, repr=False)

    def block_channels(self) -> list[tuple[int, int, str | None]]:
        """(in, out, upsampler) for each up block; the upsampler is "3d", "2d" or None."""
        dims = [self.base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # each Wan 2.1 upsampler halves the channels
            last = i == len(self.dim_mult) - 1
            up = None if last else ("3d" if self.temporal_upsample[i] else "2d")
            blocks.append((cin, cout, up))
        return blocks


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
        x = self.conv1(F.silu(self.norm1(x), inplace=True), state)
        x = self.conv2(F.silu(self.norm2(x), inplace=True), state)
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
            # channels [0, C) give frame 2i, channels [C, 2C) frame 2i+1
            parts.append(y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_time(x, state)
        return per_frame(self.resample, x)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_resnets: int, upsampler: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_resnets)])
        self.upsamplers = None
        if upsampler is not None:
            self.upsamplers = nn.ModuleList([Upsampler(cout, cout // 2, temporal=upsampler == "3d")])

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, state)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, state)
        return x


class Decoder3d(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        blocks = config.block_channels()
        top = blocks[0][0]
        self.conv_in = CausalConv3d(config.z_dim, top, 3, padding=1)
        self.mid_block = MidBlock(top)
        self.up_blocks = nn.ModuleList(
            [UpBlock(cin, cout, config.num_res_blocks + 1, up) for cin, cout, up in blocks]
        )
        self.norm_out = RMSNorm(blocks[-1][1])
        self.conv_out = CausalConv3d(blocks[-1][1], 3, 3, padding=1)


class WanDecoder(nn.Module):
    """De-normalized latents (B, z_dim, t, h, w) -> video in [-1, 1] (B, 3, frames, 8h, 8w),
    unclamped. Parameter names are those of diffusers' AutoencoderKLWan (decoder side).

    For exact spatial tiling the decoder is two parts: `decode_global` (up to the mid block, whose
    attention spans the whole frame; cheap, at latent resolution) and `decode_local` (the
    upsampling stages and the head, where every output pixel depends only on latent pixels
    within `local_halo` of it)."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.local_halo = up_path_halo(config)

    def decode_global(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        return d.mid_block(d.conv_in(self.post_quant_conv(z, state), state), state)

    def decode_local(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        d = self.decoder
        for block in d.up_blocks:
            x = block(x, state)
        return d.conv_out(F.silu(d.norm_out(x), inplace=True), state)

    def forward(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self.decode_local(self.decode_global(z, state), state)

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        d = self.decoder
        blocks = [self.post_quant_conv, d.conv_in, d.mid_block]
        for up in d.up_blocks:
            blocks += list(up.resnets) + (list(up.upsamplers) if up.upsamplers is not None else [])
        return blocks + [d.norm_out, d.conv_out]


def up_path_halo(config: WanConfig) -> int:
    """How far (in latent pixels) an output pixel of `decode_local` can see: the spatial reach of
    its 3x3 convolutions, walked back from the output one scale at a time (rounding up at each
    2x upsampling, which maps output pixel i to input pixel i // 2)."""
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
_OFFICIAL_UPSAMPLE = re.compile(r"decoder\.upsamples\.(\d+)\.(.*)")
_DIFFUSERS_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)")


def _swap(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _is_upsampler_leaf(rest: str) -> bool:
    return rest.startswith(("resample.", "time_conv."))


def official_to_diffusers(keys) -> dict[str, str]:
    """Rename map for the decoder keys of an official Wan 2.1 checkpoint. The official decoder
    numbers its up-path layers flat (`decoder.upsamples.N`); an upsampler ends each block."""
    keys = [k for k in keys if k.startswith(("decoder.", "conv2."))]
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
        m = _OFFICIAL_UPSAMPLE.fullmatch(key)
        if m:
            n, rest = int(m.group(1)), m.group(2)
            new = position[n] + (rest if n in upsampler_at else _swap(rest, _RESIDUAL_LEAVES))
        else:
            new = _swap(key, _OFFICIAL_FIXED)
            if ".mid_block.resnets." in new:
                head, rest = new.split(".mid_block.resnets.", 1)
                index, rest = rest.split(".", 1)
                new = f"{head}.mid_block.resnets.{index}." + _swap(rest, _RESIDUAL_LEAVES)
        renames[key] = new
    return renames


def diffusers_to_official(keys) -> dict[str, str]:
    """The inverse of `official_to_diffusers`, for the decoder keys of a diffusers checkpoint."""
    keys = [k for k in keys if k.startswith(("decoder.", "post_quant_conv."))]
    layers = sorted({(int(m.group(1)), m.group(2)) for k in keys if (m := _DIFFUSERS_UP.fullmatch(k))},
                    key=lambda bl: (bl[0], bl[1].startswith("upsamplers"), int(bl[1].split(".")[1])))
    flat = {layer: n for n, layer in enumerate(layers)}
    inverse_fixed = {v: k for k, v in _OFFICIAL_FIXED.items()}
    inverse_leaves = {v: k for k, v in _RESIDUAL_LEAVES.items()}
    renames = {}
    for key in keys:
        m = _DIFFUSERS_UP.fullmatch(key)
        if m:
            block, layer, rest = int(m.group(1)), m.group(2), m.group(4)
            if layer.startswith("resnets"):
                rest = _swap(rest, inverse_leaves)
            new = f"decoder.upsamples.{flat[(block, layer)]}.{rest}"
        elif ".mid_block.resnets." in key:
            head, rest = key.split(".mid_block.resnets.", 1)
            index, rest = rest.split(".", 1)
            new = _swap(f"{head}.mid_block.resnets.{index}.", inverse_fixed) + _swap(rest, inverse_leaves)
        else:
            new = _swap(key, inverse_fixed)
        renames[key] = new
    return renames


def config_from_shapes(shapes: dict[str, tuple[int, ...]], mean=None, std=None) -> WanConfig:
    """Read the decoder's sizes off its tensors (diffusers names), so fine-tuned or reduced
    variants load from a bare state dict. Only products base_dim*mult shape the network, so
    base_dim is taken as the gcd of the stage widths."""
    try:
        z_dim = shapes["post_quant_conv.weight"][0]
        n_blocks = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up_blocks."))
        widths = [shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_blocks)]
    except (KeyError, ValueError) as err:
        raise LayoutError(f"no Wan decoder tensor {err}") from None
    num_res = sum(1 for k in shapes if re.fullmatch(r"decoder\.up_blocks\.0\.resnets\.\d+\.conv1\.weight", k))
    base = math.gcd(*widths)
    temporal = tuple(f"decoder.up_blocks.{i}.upsamplers.0.time_conv.weight" in shapes for i in range(n_blocks - 1))
    return WanConfig(
        base_dim=base,
        z_dim=z_dim,
        dim_mult=tuple(w // base for w in reversed(widths)),
        num_res_blocks=num_res - 1,
        temporal_upsample=temporal,
        latents_mean=tuple(mean) if mean is not None else WAN21_MEAN,
        latents_std=tuple(std) if std is not None else WAN21_STD,
    )


class Wan21(Family):
    name = "wan2.1"
    title = "Wan 2.1 VAE"
    temporal_ratio = 4
    spatial_ratio = 8
    diffusers_class = "AutoencoderKLWan"

    def detect_layout(self, keys) -> str | None:
        if "decoder.upsamples.0.upsamples.0.residual.0.gamma" in keys or "decoder.up_blocks.0.upsampler.resample.1.weight" in keys:
            raise LayoutError(
                "this is a Wan 2.2 (TI2V-5B) VAE, which streamdec does not decode yet; use a Wan 2.1 VAE "
                "(Wan2.1_VAE.pth), which Wan 2.2-A14B also uses"
            )
        if "decoder.middle.0.residual.0.gamma" in keys:
            return "official"
        if "decoder.mid_block.resnets.0.norm1.gamma" in keys:
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

    def is_encoder_key(self, key: str) -> bool:
        return key.startswith(("encoder.", "quant_conv.", "conv1."))

    def config(self, shapes, diffusers_config: dict | None) -> WanConfig:
        cfg = diffusers_config or {}
        if cfg.get("is_residual") or cfg.get("patch_size"):
            raise LayoutError("this is a Wan 2.2 (TI2V-5B) VAE, which streamdec does not decode yet")
        return config_from_shapes(shapes, cfg.get("latents_mean"), cfg.get("latents_std"))

    def build(self, config: WanConfig) -> WanDecoder:
        return WanDecoder(config)

    def frames_out(self, latent_frames: int, first_chunk: bool) -> int:
        return self.temporal_ratio * latent_frames - (self.temporal_ratio - 1 if first_chunk else 0)
