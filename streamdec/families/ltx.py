"""LTX-2 and LTX-Video (0.9.x) VAE decoders: exact streaming of a non-causal decoder by lookahead.

Streaming strategy: carried state with a per-layer lookahead. The decoder has no attention and every
norm works at one position (an RMS norm over channels, a LayerNorm over channels), so frames mix only
in the temporal convolutions (kernel 3) and the upsamplers. The released decoders are non-causal: each
conv pads the clip with its first frame once in front and its last frame once behind, so output t
reads inputs t-1, t, t+1. Each conv is therefore streamed on its own (`TemporalConv`): it keeps its
last two input frames, gives out every output whose window is complete (one frame late), pads the
clip's start on its first frame and the clip's end when the stream ends. A residual's two branches
then run with different delays; the earlier one waits in `StreamState.align` until the other has the
same frames (counted from the clip's start). Each upsampler makes 2 frames of each (conv, depth to
space) and drops the clip's first, as the reference does. A frame leaves as soon as no later latent
frame can change it: `lookahead(config)` latent frames later (22 for the released LTX-2 and LTX-Video
0.9.5-0.9.8 decoders). `close()` ends the convs one at a time, in order, each pushing its last frame
through the layers after it, so the end of the clip, too, goes through in latent-frame-sized steps.
State: two frames per conv and up to two per residual: flat in the clip's length. Causal configs
(`decoder_causal=True`) take the same path with no lookahead.

Exact spatial tiles would need a halo as wide as the spatial reach (22 latent pixels, 704 video
pixels, the same walk as in time), so each tile would decode most of the frame: not offered.
`tile="blended"` is the reference's `enable_tiling()` (512-pixel tiles every 448, blended): each
tile streams with its own state and each piece's tiles are blended.

Decode options, as the pipelines use them (LTXPipeline, LTX2Pipeline): a decoder with timestep
conditioning (LTX-Video 0.9.1, 0.9.5-0.9.8) decodes at `decode_timestep` (default 0.0) and with the
latents mixed with Gaussian noise, `(1 - s) z + s n`, `s = decode_noise_scale` (default: the
timestep). The pipelines draw n for the whole clip from their generator; here it is drawn latent
frame by latent frame from a CPU generator seeded with `seed` (default 0), so it is reproducible and
the same for any chunking: equal to the pipelines' in distribution, not in values. LTX-Video mixes
the de-normalized latents, LTX-2 the normalized ones (here: the noise is de-normalized). LTX-Video
0.9.1 also adds noise inside its resnets (one spatial draw per layer, the same for every frame),
drawn in diffusers from the global generator; here it is drawn once per stream, in the reference's
order, from a generator on the decoder's device seeded with `seed`: equal to diffusers' decode run
right after `torch.manual_seed(seed)`.

Shape of the released LTX-2 decoder (128 latent channels; LTX-Video 0.9.5+ is the same shape):

    conv_in       3x3x3 conv 128 -> 1024
    mid_block     5 resnets (1024)
    up_blocks.i   upsampler (conv to 4096, depth to space x2 in time and space, drop the first
                  frame; plus its input laid out the same way, repeated) -> 512, 5 resnets ... three times
    norm_out (RMS), SiLU, conv_out 128 -> 48, depth to space 4x4 -> RGB at 32x space, 8x time

The module names are diffusers' (`AutoencoderKLLTX2Video`, `AutoencoderKLLTXVideo`), but for the
decoder's own last layers (`head`) and its timestep scale (`timestep`), which offloading moves as
blocks of their own. The official (ltx-core, LTX-Video) and ComfyUI files store the VAE under `vae.`
beside the transformer, with the decoder's blocks in one flat list (`decoder.up_blocks.N`,
`res_blocks`); only the decoder's tensors are read from them (safetensors are memory-mapped).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StreamdecError
from ..keys import count_indexed
from ..layers import conv3d
from ..plan import Plan
from ..state import StreamState
from ..streams import CarriedStream
from ..tiling import Blended, BlendedTiles
from . import Family, LayoutError, Strategy, Tiling, register

LTX2, LTX_VIDEO = "ltx2", "ltx-video"
UPSAMPLE_STRIDES = {"spatiotemporal": (2, 2, 2), "spatial": (1, 2, 2), "temporal": (2, 1, 1)}


@dataclass(frozen=True)
class LTXConfig:
    """Decoder hyper-parameters, in diffusers' order (the encoder's: the mid block's last); the
    defaults are the released LTX-2 VAE."""

    kind: str = LTX2  # LTX2 or LTX_VIDEO: the norm's formula, the shortcut conv, the noise's space
    latent_channels: int = 128
    block_out_channels: tuple[int, ...] = (256, 512, 1024)
    layers_per_block: tuple[int, ...] = (5, 5, 5, 5)
    spatio_temporal_scaling: tuple[bool, ...] = (True, True, True)
    upsample_type: tuple[str, ...] = ("spatiotemporal",) * 3
    upsample_residual: tuple[bool, ...] = (True, True, True)
    upsample_factor: tuple[int, ...] = (2, 2, 2)
    inject_noise: tuple[bool, ...] = (False, False, False, False)
    timestep_conditioning: bool = False
    patch_size: int = 4
    patch_size_t: int = 1
    resnet_norm_eps: float = 1e-6
    causal: bool = False
    spatial_padding: str = "reflect"  # LTX-2: reflect; LTX-Video: zeros
    scaling_factor: float = 1.0
    mean: tuple[float, ...] | None = None  # the checkpoint's latent statistics (read at load)
    std: tuple[float, ...] | None = None

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return self.mean if self.mean is not None else (0.0,) * self.latent_channels

    @property
    def latents_std(self) -> tuple[float, ...]:  # the pipelines decode z * std / scaling_factor + mean
        std = self.std if self.std is not None else (1.0,) * self.latent_channels
        return tuple(s / self.scaling_factor for s in std)

    def blocks(self) -> list[dict]:
        """Each up block as diffusers builds it (decoder order)."""
        n = len(self.block_out_channels)
        widths = tuple(reversed(self.block_out_channels))
        scaling, resnets = tuple(reversed(self.spatio_temporal_scaling)), tuple(reversed(self.layers_per_block))
        noise, residual = tuple(reversed(self.inject_noise)), tuple(reversed(self.upsample_residual))
        factor = tuple(reversed(self.upsample_factor))
        kinds = tuple(reversed(self.upsample_type))
        out, blocks = widths[0], []
        for i in range(n):
            cin, out = out // factor[i], widths[i] // factor[i]
            blocks.append(dict(cin=cin, cout=out, resnets=resnets[i + 1], noise=noise[i + 1],
                               up=UPSAMPLE_STRIDES[kinds[i]] if scaling[i] else None, residual=residual[i],
                               factor=factor[i]))  # fmt: skip
        return blocks

    @property
    def top_width(self) -> int:
        return self.block_out_channels[-1]

    @property
    def spatial_ratio(self) -> int:
        return self.patch_size * math.prod(b["up"][1] for b in self.blocks() if b["up"])

    @property
    def temporal_ratio(self) -> int:
        return self.patch_size_t * math.prod(b["up"][0] for b in self.blocks() if b["up"])


# ---------------------------------------------------------------------------- layers


class Context:
    """What one stream's decoder calls share: the timestep, how many convs the end of the stream has
    reached (`ended`), and the generator of in-decoder noise. None of it is per tile."""

    def __init__(self, timestep: float | None = None, seed: int = 0):
        self.timestep = timestep
        self.seed = seed
        self.ended = 0  # the first `ended` temporal convs (in running order) have seen the clip's end
        self.noise_generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":
            return None
        if self.noise_generator is None:
            self.noise_generator = torch.Generator(device).manual_seed(self.seed)
        return self.noise_generator


def empty_frames(x: torch.Tensor, channels: int | None = None, scale: tuple[int, int] = (1, 1)) -> torch.Tensor:
    b, c, _, h, w = x.shape
    return x.new_empty((b, channels or c, 0, h * scale[0], w * scale[1]))


class TemporalConv(nn.Module):
    """diffusers' LTX(2)VideoCausalConv3d (its weights in `.conv`), streamed: a kernel-3 conv that
    pads time with the first frame (twice in front if causal; once in front and the last frame once
    behind if not) and space with zeros or by reflection. It keeps its last two input frames and
    gives out every frame whose window is complete; the end of the stream (`ctx.ended` past its
    `order`) adds the last frame behind and gives out the rest. A kernel of 1 is pointwise."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, causal: bool = False, padding: str = "zeros"):
        super().__init__()
        self.kernel, self.causal, self.reflect = kernel, causal, padding == "reflect"
        pad = kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel, padding=(0, 0, 0) if self.reflect else (0, pad, pad))
        self.space_pad = (pad, pad, pad, pad, 0, 0)
        self.order = -1  # its place among the decoder's temporal convs (set by the decoder)

    def forward(self, x: torch.Tensor, state: StreamState, ctx: Context) -> torch.Tensor:
        if self.kernel > 1:
            x = self._windows(x, state, ctx)
        if x.shape[2] == 0:
            return empty_frames(x, self.conv.out_channels)
        if self.reflect and self.kernel > 1:
            x = F.pad(x, self.space_pad, mode="reflect")
        return conv3d(self.conv, x)

    def _windows(self, x: torch.Tensor, state: StreamState, ctx: Context) -> torch.Tensor:
        """The input frames whose windows are complete, with the frames before them."""
        past = state.history.pop(self, None)
        if past is None and x.shape[2]:  # the clip's first frame: pad in front
            past = x[:, :, :1].expand(-1, -1, self.kernel - 1 if self.causal else (self.kernel - 1) // 2, -1, -1)
        full = x if past is None else torch.cat([past.to(x.dtype), x], dim=2)
        if ctx.ended > self.order:  # the clip has ended: pad behind, nothing is kept
            if not self.causal and full.shape[2]:
                full = torch.cat([full, full[:, :, -1:].expand(-1, -1, (self.kernel - 1) // 2, -1, -1)], dim=2)
            return full if full.shape[2] >= self.kernel else full[:, :, :0]
        keep = self.kernel - 1
        if full.shape[2]:
            state.history[self] = full[:, :, -keep:].clone()  # clone: a slice keeps the whole chunk alive
        return full if full.shape[2] > keep else full[:, :, :0]


def rms_norm(x: torch.Tensor, kind: str, eps: float = 1e-8) -> torch.Tensor:
    """RMS over channels at each position, no gain: LTX-2's PerChannelRMSNorm (x / sqrt(...), in the
    input's dtype), LTX-Video's diffusers RMSNorm (x * rsqrt(...), computed in fp32)."""
    if kind == LTX2:
        return x / torch.sqrt(torch.mean(x**2, dim=1, keepdim=True) + eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=1, keepdim=True) + eps)).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers' sinusoidal Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """diffusers' TimestepEmbedding (linear, SiLU, linear), named as it is."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeEmbedder(nn.Module):
    """diffusers' PixArtAlphaCombinedTimestepSizeEmbeddings without size conditions: (B,) timesteps ->
    (B, dim, 1, 1, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(t.flatten()).to(dtype)).view(t.numel(), -1, 1, 1, 1)


class ResnetBlock(nn.Module):
    """norm, (timestep scale and shift), SiLU, conv, (spatial noise), twice, plus the input (through a
    LayerNorm and a 1x1 conv where the width changes). The input waits in the state until the convs'
    output catches up with it."""

    def __init__(self, cin: int, cout: int, config: LTXConfig, noise: bool, conditioned: bool):
        super().__init__()
        causal, padding, self.kind = config.causal, config.spatial_padding, config.kind
        self.conv1 = TemporalConv(cin, cout, 3, causal, padding)
        self.conv2 = TemporalConv(cout, cout, 3, causal, padding)
        self.norm3 = self.conv_shortcut = None
        if cin != cout:
            self.norm3 = nn.LayerNorm(cin, eps=config.resnet_norm_eps)
            # LTX-Video's shortcut is its causal conv of kernel 1 (weights in .conv), LTX-2's a plain conv
            self.conv_shortcut = nn.Conv3d(cin, cout, 1) if config.kind == LTX2 else TemporalConv(cin, cout, 1)
        self.per_channel_scale1 = nn.Parameter(torch.zeros(cin, 1, 1)) if noise else None
        self.per_channel_scale2 = nn.Parameter(torch.zeros(cin, 1, 1)) if noise else None
        self.scale_shift_table = nn.Parameter(torch.zeros(4, cin)) if conditioned else None

    def forward(self, x: torch.Tensor, state: StreamState, ctx: Context, temb: torch.Tensor | None) -> torch.Tensor:
        h = rms_norm(x, self.kind)
        if self.scale_shift_table is not None:
            temb = temb.unflatten(1, (4, -1)) + self.scale_shift_table[None, ..., None, None, None]
            shift1, scale1, shift2, scale2 = temb.unbind(dim=1)
            h = h * (1 + scale1) + shift1
        h = self.conv1(F.silu(h), state, ctx)
        if self.per_channel_scale1 is not None:
            h = h + (state.ahead[self.conv1] * self.per_channel_scale1)[None, :, None]
        h = rms_norm(h, self.kind)
        if self.scale_shift_table is not None:
            h = h * (1 + scale2) + shift2
        h = self.conv2(F.silu(h), state, ctx)
        if self.per_channel_scale2 is not None:
            h = h + (state.ahead[self.conv2] * self.per_channel_scale2)[None, :, None]
        shortcut = x
        if self.norm3 is not None:
            shortcut = self.norm3(shortcut.movedim(1, -1)).movedim(-1, 1)
            shortcut = self.shortcut(shortcut, state, ctx)
        return h + state.align(self, shortcut, h.shape[2])

    def shortcut(self, x: torch.Tensor, state: StreamState, ctx: Context) -> torch.Tensor:
        if isinstance(self.conv_shortcut, TemporalConv):
            return self.conv_shortcut(x, state, ctx)
        if x.shape[2] == 0:
            return empty_frames(x, self.conv_shortcut.out_channels)
        return conv3d(self.conv_shortcut, x)

    def noise_shapes(self, h: int, w: int) -> list[tuple]:
        """(key, shape) of the spatial noise this block adds, in the reference's order."""
        return [] if self.per_channel_scale1 is None else [(self.conv1, (h, w)), (self.conv2, (h, w))]


def depth_to_space(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """(B, C*st*sh*sw, T, H, W) -> (B, C, T*st, H*sh, W*sw), as diffusers' upsamplers lay it out."""
    b, c, t, h, w = x.shape
    st, sh, sw = stride
    x = x.reshape(b, c // (st * sh * sw), st, sh, sw, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // (st * sh * sw), t * st, h * sh, w * sw)


class Upsampler(nn.Module):
    """A conv to stride-product times the channels (over the upscale factor), laid out as frames and
    pixels, the clip's first (stride_t - 1) frames dropped; with `residual`, plus the input laid out
    the same way and repeated. The conv's output is a frame late: the residual waits for it."""

    def __init__(self, cin: int, stride: tuple[int, int, int], residual: bool, factor: int, config: LTXConfig):
        super().__init__()
        self.stride, self.residual = stride, residual
        self.repeats = math.prod(stride) // factor
        self.conv = TemporalConv(cin, cin * math.prod(stride) // factor, 3, config.causal, config.spatial_padding)

    def forward(self, x: torch.Tensor, state: StreamState, ctx: Context) -> torch.Tensor:
        h = self._drop_first(depth_to_space(self.conv(x, state, ctx), self.stride), state, self)
        if not self.residual:
            return h
        r = self._drop_first(depth_to_space(x, self.stride).repeat(1, self.repeats, 1, 1, 1), state, self.conv)
        return h + state.align(self, r, h.shape[2])

    def _drop_first(self, x: torch.Tensor, state: StreamState, key: nn.Module) -> torch.Tensor:
        if x.shape[2] and state.first_time(key):
            return x[:, :, self.stride[0] - 1 :]
        return x


class MidBlock(nn.Module):
    def __init__(self, dim: int, config: LTXConfig):
        super().__init__()
        cond = config.timestep_conditioning
        self.time_embedder = TimeEmbedder(dim * 4) if cond else None
        self.resnets = nn.ModuleList(
            [ResnetBlock(dim, dim, config, config.inject_noise[-1], cond) for _ in range(config.layers_per_block[-1])]
        )

    def forward(self, x: torch.Tensor, state: StreamState, ctx: Context, t: torch.Tensor | None) -> torch.Tensor:
        temb = None if self.time_embedder is None else self.time_embedder(t, x.dtype)
        for resnet in self.resnets:
            x = resnet(x, state, ctx, temb)
        return x


class UpBlock(nn.Module):
    """(a resnet changing the width), (an upsampler), resnets: diffusers' LTX(2)VideoUpBlock3d."""

    def __init__(self, spec: dict, config: LTXConfig):
        super().__init__()
        cin, cout, cond = spec["cin"], spec["cout"], config.timestep_conditioning
        self.time_embedder = TimeEmbedder(cin * 4) if cond else None
        self.conv_in = ResnetBlock(cin, cout, config, spec["noise"], cond) if cin != cout else None
        self.upsamplers = None
        if spec["up"] is not None:
            self.upsamplers = nn.ModuleList([Upsampler(cout * spec["factor"], spec["up"], spec["residual"],
                                                       spec["factor"], config)])  # fmt: skip
        self.resnets = nn.ModuleList(
            [ResnetBlock(cout, cout, config, spec["noise"], cond) for _ in range(spec["resnets"])]
        )

    def forward(self, x: torch.Tensor, state: StreamState, ctx: Context, t: torch.Tensor | None) -> torch.Tensor:
        if self.conv_in is not None:  # the reference gives it the timestep unembedded (no released model has one)
            x = self.conv_in(x, state, ctx, t)
        temb = None if self.time_embedder is None else self.time_embedder(t, x.dtype)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, state, ctx)
        for resnet in self.resnets:
            x = resnet(x, state, ctx, temb)
        return x


class TimestepScale(nn.Module):
    """The decoder's `timestep_scale_multiplier` (1000 as released)."""

    def __init__(self):
        super().__init__()
        self.multiplier = nn.Parameter(torch.tensor(1000.0))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.multiplier


class Head(nn.Module):
    """norm_out, (the last timestep scale and shift), SiLU, conv_out, and the patches laid out as pixels."""

    def __init__(self, dim: int, config: LTXConfig):
        super().__init__()
        self.kind, self.p, self.pt = config.kind, config.patch_size, config.patch_size_t
        cond = config.timestep_conditioning
        self.time_embedder = TimeEmbedder(dim * 2) if cond else None
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim)) if cond else None
        self.conv_out = TemporalConv(dim, 3 * self.p**2 * self.pt, 3, config.causal, config.spatial_padding)

    def forward(self, x: torch.Tensor, state: StreamState, ctx: Context, t: torch.Tensor | None) -> torch.Tensor:
        x = rms_norm(x, self.kind)
        if self.time_embedder is not None:
            temb = (
                self.time_embedder(t, x.dtype).unflatten(1, (2, -1))
                + self.scale_shift_table[None, ..., None, None, None]
            )
            shift, scale = temb.unbind(dim=1)
            x = x * (1 + scale) + shift
        x = self.conv_out(F.silu(x), state, ctx)
        b, c, frames, h, w = x.shape
        p, pt = self.p, self.pt
        # channel (c, t, a, b) -> frame t, row b, column a (the reference's unpatchify)
        x = x.reshape(b, c // (pt * p * p), pt, p, p, frames, h, w).permute(0, 1, 5, 2, 6, 4, 7, 3)
        return x.reshape(b, c // (pt * p * p), frames * pt, h * p, w * p)


class Decoder3d(nn.Module):
    def __init__(self, config: LTXConfig):
        super().__init__()
        top = config.top_width
        self.conv_in = TemporalConv(config.latent_channels, top, 3, config.causal, config.spatial_padding)
        self.timestep = TimestepScale() if config.timestep_conditioning else None
        self.mid_block = MidBlock(top, config)
        self.up_blocks = nn.ModuleList([UpBlock(spec, config) for spec in config.blocks()])
        self.head = Head(config.blocks()[-1]["cout"], config)


class LTXDecoder(nn.Module):
    """De-normalized latents (B, C, t, h, w) -> video in [-1, 1] (B, 3, frames, 32h, 32w), unclamped:
    `decoder(z, state, ctx)` continues the stream in `state` and returns the frames that are final."""

    def __init__(self, config: LTXConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder3d(config)
        self.temporal_convs = [m for m in self.decoder.modules() if isinstance(m, TemporalConv) and m.kernel > 1]
        for i, conv in enumerate(self.temporal_convs):  # modules() is the running order here
            conv.order = i
        self.lookahead = lookahead(config)

    def forward(self, z: torch.Tensor, state: StreamState, ctx: Context) -> torch.Tensor:
        d = self.decoder
        if state.first_time(self):
            self._draw_spatial_noise(z, state, ctx)
        t = None
        if d.timestep is not None:
            t = d.timestep(torch.full((z.shape[0],), float(ctx.timestep or 0.0), device=z.device, dtype=z.dtype))
        x = d.conv_in(z, state, ctx)
        x = d.mid_block(x, state, ctx, t)
        for block in d.up_blocks:
            x = block(x, state, ctx, t)
        return d.head(x, state, ctx, t)

    def _draw_spatial_noise(self, z: torch.Tensor, state: StreamState, ctx: Context) -> None:
        """LTX-Video 0.9.1's in-resnet noise: one (H, W) draw per noisy conv, in the reference's order,
        kept for the whole stream (the reference adds the same draw to every frame)."""
        h, w = z.shape[-2:]
        shapes = [s for r in self.decoder.mid_block.resnets for s in r.noise_shapes(h, w)]
        for block in self.decoder.up_blocks:
            if block.conv_in is not None:
                shapes += block.conv_in.noise_shapes(h, w)
            if block.upsamplers is not None:
                h, w = h * block.upsamplers[0].stride[1], w * block.upsamplers[0].stride[2]
            shapes += [s for r in block.resnets for s in r.noise_shapes(h, w)]
        for key, shape in shapes:
            generator = ctx.generator(z.device)
            if generator is None:
                state.ahead[key] = torch.zeros(shape, device=z.device, dtype=z.dtype)
            else:
                state.ahead[key] = torch.randn(shape, generator=generator, device=z.device, dtype=z.dtype)[None]

    def offload_blocks(self) -> list[nn.Module]:
        d = self.decoder
        blocks = [d.timestep] if d.timestep is not None else []
        blocks += [d.conv_in, *d.mid_block.resnets]
        if d.mid_block.time_embedder is not None:
            blocks.insert(len(blocks) - len(d.mid_block.resnets), d.mid_block.time_embedder)
        for up in d.up_blocks:
            parts = [up.conv_in, up.time_embedder, *(up.upsamplers or []), *up.resnets]
            blocks += [p for p in parts if p is not None]
        return blocks + [d.head]


def lookahead(config: LTXConfig) -> int:
    """Latent frames a stream waits for before a latent frame's video frames are final: walk back
    from a video frame through the layers, each non-causal conv reading one frame ahead, each
    upsampler mapping frame j (after its dropped first frames) to input (j + s - 1) // s."""
    if config.causal:
        return 0
    r = config.temporal_ratio
    return max(_reach(config, j, axis=0) - (j + r - 1) // r for j in range(40 * r, 41 * r))


def spatial_reach(config: LTXConfig) -> int:
    """Latent pixels an output pixel can see on either side (the halo exact tiles would need)."""
    ratio = config.spatial_ratio
    return max(_reach(config, j, axis=1) - j // ratio for j in range(40 * ratio, 41 * ratio))


def _reach(config: LTXConfig, j: int, axis: int) -> int:
    """The farthest latent index output index `j` depends on along time (axis 0) or space (1)."""
    ahead = 0 if axis == 0 and config.causal else 1  # a kernel-3 conv reads one ahead (space: always)
    j = j // (config.patch_size_t if axis == 0 else config.patch_size) + ahead  # unpatchify, conv_out
    for spec in reversed(config.blocks()):
        j += 2 * ahead * spec["resnets"]
        if spec["up"] is not None:
            s = spec["up"][0 if axis == 0 else 1]
            j = (j + s - 1) // s if axis == 0 else j // s
            j += ahead
        if spec["cin"] != spec["cout"]:
            j += 2 * ahead
    return j + 2 * ahead * config.layers_per_block[-1] + ahead  # mid block, conv_in


# ---------------------------------------------------------------------------- the stream


class LTXStream(CarriedStream):
    """The carried stream with the decode options: noise mixed into each latent frame, the
    timestep, blended reference tiles, and an end that flushes the lookahead conv by conv."""

    def __init__(self, decoder: LTXDecoder, plan: Plan, tiles: BlendedTiles | None, options: dict):
        super().__init__(self._decode, finish=self._finish, frames_per_call=plan.frames_per_call)
        self.decoder, self.tiles = decoder, tiles
        self.config = decoder.config
        self.ctx = Context(options["decode_timestep"], options["seed"])
        self.noise_scale = options["decode_noise_scale"] if self.config.timestep_conditioning else 0.0
        self.latent_noise = torch.Generator().manual_seed(options["seed"])  # CPU: the same draws on any device
        self.last: torch.Tensor | None = None  # an empty latent chunk of the stream's shape, for the end

    def _decode(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        self.last = z[:, :, :0]
        if self.noise_scale:
            z = self._mix_noise(z)
        return self._run(z, state)

    def _mix_noise(self, z: torch.Tensor) -> torch.Tensor:
        """(1 - s) z + s n, n drawn per latent frame in order; LTX-2's pipeline mixes normalized
        latents, so its noise is de-normalized here (n * std + mean)."""
        frames = [torch.randn((z.shape[0], z.shape[1], 1, *z.shape[-2:]), generator=self.latent_noise)
                  for _ in range(z.shape[2])]  # fmt: skip
        noise = torch.cat(frames, dim=2).to(z.device, torch.float32)
        if self.config.kind == LTX2:
            shape = (1, -1, 1, 1, 1)
            std = torch.tensor(self.config.latents_std, device=z.device).view(shape)
            noise = noise * std + torch.tensor(self.config.latents_mean, device=z.device).view(shape)
        s = self.noise_scale
        return ((1 - s) * z.float() + s * noise).to(z.dtype)

    def _run(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.tiles is None or not self.tiles.applies(*z.shape[-2:]):
            return self.decoder(z, state, self.ctx)
        return self.tiles.decode(lambda piece, key: self.decoder(piece, state.tile(key), self.ctx), z)

    def state_dict(self, names: dict) -> dict:
        raise StreamdecError(
            "an LTX stream cannot be saved to resume yet (its noise and end-of-clip steps are "
            "not saved); decode it without resuming"
        )

    def _finish(self, state: StreamState):
        """The clip's end, one conv at a time: each gives out its last frame, which goes through
        the layers after it (a latent frame's worth at most)."""
        if self.last is None or self.config.causal:
            return
        for _ in self.decoder.temporal_convs:
            self.ctx.ended += 1
            video = self._run(self.last, state)
            if video.shape[2]:
                yield video


# ---------------------------------------------------------------------------- checkpoints

OFFICIAL_PREFIXES = ("vae.", "")  # official and ComfyUI single files: the VAE beside the transformer
_TOP = {  # diffusers' names for the decoder's top-level parts -> streamdec's
    "decoder.timestep_scale_multiplier": "decoder.timestep.multiplier",
    "decoder.time_embedder.": "decoder.head.time_embedder.",
    "decoder.scale_shift_table": "decoder.head.scale_shift_table",
    "decoder.conv_out.": "decoder.head.conv_out.",
}
_OFFICIAL_TOP = {  # the official names of the same -> diffusers'
    "decoder.last_time_embedder.": "decoder.time_embedder.",
    "decoder.last_scale_shift_table": "decoder.scale_shift_table",
}
STATISTICS = {  # latent statistics: diffusers' buffer, the official per_channel_statistics
    "mean": ("latents_mean", "per_channel_statistics.mean-of-means"),
    "std": ("latents_std", "per_channel_statistics.std-of-means"),
}


def _rename(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def official_blocks(keys, prefix: str) -> dict[int, str]:
    """Official flat decoder block index -> diffusers' path. The flat list runs mid block, then per
    diffusers up block: (a width-changing resnet), (an upsampler), resnets."""
    paths, block, last = {0: "mid_block"}, -1, "resnets"
    n = count_indexed(keys, f"{prefix}decoder.up_blocks")
    for i in range(1, n):
        base = f"{prefix}decoder.up_blocks.{i}."
        if f"{base}conv.conv.weight" in keys:
            part = "upsamplers.0"
            block += last == "resnets"
        elif f"{base}conv1.conv.weight" in keys:
            part = "conv_in"
            block += 1
        else:
            part = "resnets"
            block += last == "resnets"
        paths[i] = f"up_blocks.{block}" + ("" if part == "resnets" else f".{part}")
        last = part
    return paths


def official_to_diffusers(key: str, paths: dict[int, str], kind: str) -> str:
    """An official decoder key (prefix removed) -> diffusers' name."""
    key = _rename(key, _OFFICIAL_TOP)
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(.*)", key)
    if m is not None:
        key = f"decoder.{paths[int(m.group(1))]}.{m.group(2).replace('res_blocks.', 'resnets.', 1)}"
    key = key.replace(".norm3.norm.", ".norm3.")
    if kind == LTX_VIDEO:  # diffusers keeps LTX-Video's 1x1 shortcut in a causal conv wrapper
        key = re.sub(r"\.conv_shortcut\.(weight|bias)$", r".conv_shortcut.conv.\1", key)
    return key


def ltx_kind(keys) -> tuple[str, str, str] | None:
    """(kind, layout, prefix) of an LTX VAE's keys, or None. LTX-2 and LTX-Video 0.9.5+ decoders have
    the same tensors; what tells them apart: LTX-2's files hold the audio VAE too, and every
    LTX-Video since 0.9.1 conditions its decoder on the timestep (LTX-2's does not), while 0.9.0's
    decoder has width-changing blocks."""
    found = None
    # diffusers' names are shared with CogVideoX's and HunyuanVideo's decoders; LTX's alone have
    # parameter-free norms in their resnets and no attention
    if ("decoder.mid_block.resnets.0.conv1.conv.weight" in keys and "decoder.conv_in.conv.weight" in keys
            and not any(k.startswith(("decoder.mid_block.resnets.0.norm1.", "decoder.mid_block.attentions.")) for k in keys)):  # fmt: skip
        found = ("diffusers", "")
    else:
        for prefix in OFFICIAL_PREFIXES:
            if f"{prefix}decoder.up_blocks.0.res_blocks.0.conv1.conv.weight" in keys:
                found = ("official", prefix)
                break
    if found is None:
        return None
    layout, prefix = found
    if any(k.startswith(("audio_vae.", "vocoder.")) for k in keys):
        return LTX2, layout, prefix
    conditioned = (f"{prefix}decoder.timestep_scale_multiplier" in keys
                   or f"{prefix}decoder.last_scale_shift_table" in keys or "decoder.scale_shift_table" in keys)  # fmt: skip
    old = any(re.fullmatch(r"decoder\.up_blocks\.\d+\.conv_in\.conv1\.conv\.weight", k) for k in keys) or any(
        re.fullmatch(rf"{re.escape(prefix)}decoder\.up_blocks\.\d+\.conv1\.conv\.weight", k) for k in keys
    )
    return (LTX_VIDEO if conditioned or old else LTX2), layout, prefix


def config_from_shapes(kind: str, shapes: dict[str, tuple[int, ...]], cfg: dict | None) -> LTXConfig:
    """The decoder's structure from its tensors (streamdec's names); what tensors cannot say (causal,
    padding, upsampler residuals, scaling factor) from config.json, else as released."""
    cfg = cfg or {}
    expected = {LTX2: "AutoencoderKLLTX2Video", LTX_VIDEO: "AutoencoderKLLTXVideo"}
    named = cfg.get("_class_name")
    if named in expected.values() and named != expected[kind]:
        raise LayoutError(f"config.json names {named}, but the tensors are an {expected[kind]}'s (timestep "
                          f"conditioning or block layout); check the folder")  # fmt: skip
    try:
        latent, top = shapes["decoder.conv_in.conv.weight"][1], shapes["decoder.conv_in.conv.weight"][0]
        mid = count_indexed(shapes, "decoder.mid_block.resnets")
        n = count_indexed(shapes, "decoder.up_blocks")
        out = shapes["decoder.head.conv_out.conv.weight"]
    except KeyError as err:
        raise LayoutError(f"no LTX decoder tensor {err}") from None
    widths, resnets, scaling, kinds, factors, noise = [], [], [], [], [], []
    width = top
    for i in range(n):
        base = f"decoder.up_blocks.{i}."
        resnets.append(count_indexed(shapes, f"{base}resnets"))
        cout = shapes.get(f"{base}conv_in.conv1.conv.weight", (width,))[0]
        up = shapes.get(f"{base}upsamplers.0.conv.conv.weight")
        after = shapes[f"{base}resnets.0.conv1.conv.weight"][0] if resnets[-1] else cout
        if up is None:
            scaling.append(False), kinds.append("spatiotemporal"), factors.append(1)
        else:
            product, factor = up[0] // after, up[1] // after
            kinds.append({8: "spatiotemporal", 4: "spatial", 2: "temporal"}.get(product, "?"))
            scaling.append(True), factors.append(factor)
            if kinds[-1] == "?":
                raise LayoutError(f"up block {i}'s upsampler multiplies the frames and pixels by {product}; "
                                  "streamdec knows 8 (time and space), 4 (space) and 2 (time)")  # fmt: skip
        widths.append(after * factors[-1])
        noise.append(f"{base}resnets.0.per_channel_scale1" in shapes)
        width = after
    patch = int(round((out[0] // 3) ** 0.5))
    residual = cfg.get("upsample_residual")  # diffusers' order, as config.json has it
    if residual is None:  # parameter-free: every release has a residual exactly where it upscales channels
        residual = tuple(f > 1 for f in reversed(factors))
    elif isinstance(residual, bool):
        residual = (residual,) * n
    config = LTXConfig(
        kind=kind, latent_channels=latent, block_out_channels=tuple(reversed(widths)),
        layers_per_block=tuple(reversed([mid, *resnets])), spatio_temporal_scaling=tuple(reversed(scaling)),
        upsample_type=tuple(reversed(kinds)), upsample_residual=tuple(residual)[:n],
        upsample_factor=tuple(reversed(factors)),
        inject_noise=tuple(reversed(["decoder.mid_block.resnets.0.per_channel_scale1" in shapes, *noise])),
        timestep_conditioning="decoder.head.scale_shift_table" in shapes, patch_size=patch,
        causal=bool(cfg.get("decoder_causal", cfg.get("is_causal", False))),
        spatial_padding=cfg.get("decoder_spatial_padding_mode") or ("reflect" if kind == LTX2 else "zeros"),
        scaling_factor=float(cfg.get("scaling_factor") or 1.0),
    )  # fmt: skip
    return config


class _LTXFamily(Family):
    kind: str
    temporal_ratio = 8
    spatial_ratio = 32
    strategy = Strategy.CARRIED
    tiling = Tiling.REFERENCE
    reference_tiles = Blended((16, 16), 0.125)  # enable_tiling(): 512-pixel tiles every 448
    lookahead = 22  # the released decoders' (the stream uses its config's: lookahead(config))
    decode_options = {"decode_timestep": 0.0, "decode_noise_scale": None, "seed": 0}

    def detect_layout(self, keys) -> str | None:
        found = ltx_kind(keys)
        return None if found is None or found[0] != self.kind else f"{found[1]}:{found[2]}"

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        form, prefix = layout.split(":")
        if form == "diffusers":
            return {k: _rename(k, _TOP) for k in keys if k.startswith("decoder.")}
        paths = official_blocks(keys, prefix)
        decoder_keys = [k for k in keys if k.startswith(f"{prefix}decoder.")]
        return {k: _rename(official_to_diffusers(k[len(prefix) :], paths, self.kind), _TOP) for k in decoder_keys}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        form, prefix = layout.split(":")
        inverse = {new: old for old, new in _TOP.items()}
        names = {k: _rename(k, inverse) for k in internal_keys}
        if form == "official":
            names = {k: f"{prefix}{v} (official name: under {prefix}decoder.up_blocks.N)" for k, v in names.items()}
        return names

    def is_unused_key(self, key: str) -> bool:
        for prefix in OFFICIAL_PREFIXES:
            if key.startswith(prefix) and not key[len(prefix) :].startswith("decoder."):
                return True
        return False

    def config(self, shapes, diffusers_config: dict | None) -> LTXConfig:
        return config_from_shapes(self.kind, shapes, diffusers_config)

    def read_constants(self, config: LTXConfig, layout: str, read) -> LTXConfig:
        """The latent statistics the checkpoint stores (diffusers' buffers, the official
        per_channel_statistics), where it stores them."""
        prefix = layout.split(":")[1]
        found = {}
        for field, names in STATISTICS.items():
            for name in names:
                tensor = read(f"{prefix}{name}")
                if tensor is not None:
                    if tensor.numel() != config.latent_channels:
                        raise LayoutError(
                            f"{prefix}{name} holds {tensor.numel()} values for {config.latent_channels} latent channels"
                        )
                    found[field] = tuple(float(v) for v in tensor.float().flatten())
                    break
        return replace(config, **found)

    def build(self, config: LTXConfig) -> LTXDecoder:
        return LTXDecoder(config)

    def effective_tile(self, tile):
        if tile is not None and not isinstance(tile, Blended):
            raise StreamdecError(
                f"the {self.title} cannot be tiled exactly: an output pixel depends on latent pixels up to 22 away "
                f"(704 video pixels), so every tile would decode most of the frame; use tile='blended' for the "
                f"reference's enable_tiling() (blended, not equal to the untiled decode), or None"
            )
        return super().effective_tile(tile)

    def open_stream(self, decoder: LTXDecoder, plan: Plan) -> LTXStream:
        tile = self.effective_tile(plan.tile)
        tiles = self.blended_tiles(tile) if isinstance(tile, Blended) else None
        options = {**self.decode_options, **dict(plan.decode)}
        if options["decode_noise_scale"] is None:
            options["decode_noise_scale"] = options["decode_timestep"]
        return LTXStream(decoder, plan, tiles, options)


@register
class LTX2Video(_LTXFamily):
    name = LTX2
    kind = LTX2
    title = "LTX-2 VAE"
    diffusers_class = "AutoencoderKLLTX2Video"


@register
class LTXVideo(_LTXFamily):
    name = LTX_VIDEO
    kind = LTX_VIDEO
    title = "LTX-Video VAE"
    diffusers_class = "AutoencoderKLLTXVideo"
