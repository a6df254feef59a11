"""MiniMax-H3 video VAE decoder: a ViT over latent tokens, decoded in the reference's windows and tiles.

Shape of the decoder (released sizes, 24 latent channels, RGB out, 4x time, 16x space):

    post_quant_conv   1x1x1 conv, 24 -> 24
    proj_in           linear 24 -> 2048: one token per latent voxel, then 4 learned register
                      tokens and one all-zero token (all at position 0)
    36 blocks         RMSNorm, attention (32 heads of 64, RMS-normed q/k, RoPE on 48 of 64 channels,
                      coordinates normalized to [-1, 1) over the call's T, h, w), x scale1;
                      RMSNorm, SwiGLU (8192), x scale2
    norm_out, proj_out  LayerNorm, linear 2048 -> 3 * 4 * 16 * 16: each token becomes a 4x16x16 patch

Streaming strategy: schedule replay. Attention is full over each call and RoPE is normalized to the
call's extent, so the output depends on how the reference cuts the latents; the stream replays that
cut. The reference (diffusers `AutoencoderKLMiniMaxH3.decode`) decodes temporal windows of 7 latents
every 5, each window in spatial tiles (256 px, overlaps of at least 64 px, blended linearly; on by
default: the released frames are the tiled ones). Of a window's 28 frames the first 3 are dropped,
so its first latent gives one frame; the frames of its first 5 latents go out (the first 5 of them
cross-faded in from the window before), those of the last 2 latents wait as the source of the next
window's fade, but for the first 3 frames of latent 5, which no one uses. A video's latents are
padded with copies of the last one to fill the last window, and the frames of the padding are cut.
So a video of T latents has 4T - 3 * ceil(T / 5) frames (T >= 3; the reference fails on shorter
ones), and each frame leaves 2 to 6 latents after its own latent arrives. Memory: one window's
latents and 5 frames of its end; the windows are always 7 latents, so nothing grows with length.

Offload: the decoder's blocks are its embedding, 36 equal layers of 67 M parameters and its head,
so "block" offload may move them in groups (`offload_groups`; the `max_vram` planner picks the
group size, streamdec.memory). With "block" offload a window's tiles are decoded 8 at a time (as the
official code's `stack_tiling`), so the weights cross to the device once per 8 tiles rather than once
per tile (a 720p window has 28); without it, one tile at a time, the least activation memory.

Spatial tiles (`tile=`): the default (`"auto"`, `None` or `"blended"`) is the reference's
`enable_tiling()` at its defaults, 16 latent pixels (256 px) overlapping by at least 4 (64 px).
`tile=N` (or (h, w)) is tiles of N latent pixels overlapping by at least N/4, `"blended:F"` another
overlap share. Untiled, as `disable_tiling()`: a tile at least as large as the latent frame (the
reference then decodes the whole frame, e.g. `tile=4096`). `tile=None` cannot mean untiled: streamdec
asks a family for its default tiles with None.

The decoder returns ImageNet-normalized RGB, as the reference; the stream hands out
`2 * (x * std + mean) - 1`, the [-1, 1] video streamdec's frames are made from (the pipeline's
`x * std + mean`, clamped to [0, 1], mapped to [-1, 1]).

Checkpoint layouts (the key mapping is diffusers' own `scripts/convert_minimax_h3_to_diffusers.py`):
- diffusers (`vae/` folder, live `AutoencoderKLMiniMaxH3`): `decoder.proj_in`, `attn.to_q/to_k/to_v`,
  `attn.to_out.0`, `ff.net.0.proj` holding [value; gate], `ff.net.2`.
- official (`video_vae/source/model.safetensors`): `decoder.x_embedder`, a fused `attn.to_qkv` whose
  rows are interleaved per head ([head 0: q k v, head 1: q k v, ...]), `attn.to_out`, `ff.w1`
  holding [gate; value], `ff.w2`; `decoder.mask_token` (training only) is not read. The decoder is
  built in the layout's own form (a fused projection split per head, the halves read in their
  order), so no tensor is rewritten at load. The head count is read from config.json
  (`vit_decoder_kwargs.heads`) where there is one, else the released head size of 64 is assumed.
  The released latent statistics live in `video_vae/config.json`, beside `source/`: without them
  (a bare file) the latents are taken as they are (mean 0, std 1, as diffusers' defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StreamdecError
from ..keys import count_indexed
from ..plan import Plan
from ..tiling import Blended, blend
from . import Family, LayoutError, Strategy, Tiling, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASED_HEAD_DIM = 64
# Tiles decoded in one call under "block" offload: the weights then cross once per 8 tiles, and a
# layer's compute on 8 tiles (about 6 ms on a current GPU at the released size, an estimate) outlasts
# the copy of the next layer's 134 MB (3-5 ms at 25-50 GB/s), for about 1 GiB of activations in bf16.
OFFLOAD_TILE_BATCH = 8

# The reference's temporal schedule (clip_length 17, token_drop 3, temporal ratio 4).
WINDOW = 7  # latents a window decodes (tokens_chunk_size 5 + token_overlap 2)
STRIDE = 5  # latents between window starts
TOKEN_DROP = 3  # the encoder dropped 3 latents per clip: the decoder pads to a whole number of windows by it
PRE_PADDING = 3  # frames dropped at each window's start: its first latent gives one frame
KEEP = 1 + 4 * (STRIDE - 1)  # frames a window hands out: those of its first 5 latents
FADE_START = 4 * STRIDE  # the next window's first frame (the last of latent 5); from here on: its fade source
FADE = 1 + 4 * (WINDOW - STRIDE - 1)  # frames cross-faded: the next window's first 2 latents'


# ---------------------------------------------------------------------------- the decoder


@dataclass(frozen=True)
class MiniMaxH3Config:
    """Decoder hyper-parameters; the defaults are the released MiniMax-H3 video VAE. `layout`:
    "official" builds the fused, per-head interleaved to_qkv and the [gate; value] ff.w1 of the
    official checkpoints, "diffusers" separate q/k/v and [value; gate]."""

    latent_channels: int = 24
    num_layers: int = 36
    num_heads: int = 32
    head_dim: int = 64
    num_register_tokens: int = 4
    ffn_dim: int = 8192
    rope_theta: float = 100.0
    rope_dim_ratio: float = 0.75
    norm_eps: float = 1e-5
    layout: str = "diffusers"
    latents_mean: tuple[float, ...] = (0.0,) * 24
    latents_std: tuple[float, ...] = (1.0,) * 24

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


class Attention(nn.Module):
    def __init__(self, config: MiniMaxH3Config):
        super().__init__()
        dim, self.heads, self.head_dim, self.eps = config.dim, config.num_heads, config.head_dim, config.norm_eps
        self.fused = config.layout == "official"
        if self.fused:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        else:
            self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.fused:  # rows [head 0: q k v, head 1: q k v, ...]
            q, k, v = self.to_qkv(x).view(b, n, self.heads, 3, self.head_dim).unbind(3)
        else:
            q, k, v = (proj(x).view(b, n, self.heads, self.head_dim) for proj in (self.to_q, self.to_k, self.to_v))
        q = rotate(F.rms_norm(q.float(), (self.head_dim,), eps=self.eps).to(q.dtype), cos, sin)
        k = rotate(F.rms_norm(k.float(), (self.head_dim,), eps=self.eps).to(k.dtype), cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] channels of each head (halves rotated), the rest passed."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotary, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    first, second = rotary.chunk(2, dim=-1)
    return torch.cat([rotary * cos + torch.cat([-second, first], dim=-1) * sin, rest], dim=-1)


class SwiGLU(nn.Module):
    """w2(value * silu(gate)) from one fused projection w1: [value; gate] in diffusers' checkpoints,
    [gate; value] in the official ones (`gate_first`)."""

    def __init__(self, dim: int, inner: int, gate_first: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * inner)
        self.w2 = nn.Linear(inner, dim)
        self.gate_first = gate_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.w1(x).chunk(2, dim=-1)
        value, gate = (second, first) if self.gate_first else (first, second)
        return self.w2(value * F.silu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, config: MiniMaxH3Config):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.RMSNorm(dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.scale1 = nn.Parameter(torch.zeros(dim))
        self.norm2 = nn.RMSNorm(dim, eps=config.norm_eps)
        self.ff = SwiGLU(dim, config.ffn_dim, gate_first=config.layout == "official")
        self.scale2 = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dtype = self.attn.to_out.weight.dtype  # the residual stream stays fp32, norms run in fp32
        x = x + self.attn(fp32_norm(self.norm1, x).to(dtype), cos, sin) * self.scale1.float()
        return x + self.ff(fp32_norm(self.norm2, x).to(dtype)) * self.scale2.float()


def fp32_norm(norm: nn.RMSNorm | nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A norm computed in fp32 whatever the weights' dtype, as the reference keeps its norms in fp32."""
    weight = norm.weight.float()
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x.float(), norm.normalized_shape, weight, norm.bias.float(), norm.eps)
    return F.rms_norm(x.float(), norm.normalized_shape, weight, norm.eps)


class TokenEmbed(nn.Module):
    """Latents -> tokens: post_quant_conv, proj_in per voxel, then the register tokens and a zero token."""

    def __init__(self, config: MiniMaxH3Config):
        super().__init__()
        c = config.latent_channels
        self.post_quant_conv = nn.Conv3d(c, c, 1)
        self.proj_in = nn.Linear(c, config.dim)
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.post_quant_conv(z)
        tokens = self.proj_in(z.flatten(2).transpose(1, 2)).float()  # (B, T*h*w, dim), frame-major
        registers = self.register_tokens.expand(z.shape[0], -1, -1).to(tokens.dtype)
        return torch.cat([tokens, registers, torch.zeros_like(tokens[:, :1])], dim=1)


class PatchHead(nn.Module):
    """Tokens -> pixels: LayerNorm, then each voxel's token becomes a 4x16x16 RGB patch."""

    def __init__(self, config: MiniMaxH3Config, ratios: tuple[int, int]):
        super().__init__()
        self.rt, self.rs = ratios
        self.norm_out = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.proj_out = nn.Linear(config.dim, 3 * self.rt * self.rs * self.rs)

    def forward(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        x = x[:, : t * h * w]  # the register and zero tokens give no pixels
        x = self.proj_out(fp32_norm(self.norm_out, x).to(self.proj_out.weight.dtype))
        b, rt, rs = x.shape[0], self.rt, self.rs
        x = x.view(b, t, h, w, 3, rt, rs, rs).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, 3, t * rt, h * rs, w * rs)


class MiniMaxH3Decoder(nn.Module):
    """De-normalized latents (B, C, T, h, w) -> ImageNet-normalized RGB (B, 3, 4T, 16h, 16w), one
    call of the reference's decoder (one tile of one window): full attention over all of it."""

    offload_groups = True  # its blocks (mostly transformer layers) may be offloaded in groups

    def __init__(self, config: MiniMaxH3Config):
        super().__init__()
        self.config = config
        self.embed = TokenEmbed(config)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.num_layers)])
        self.head = PatchHead(config, (MiniMaxH3.temporal_ratio, MiniMaxH3.spatial_ratio))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = z.shape
        x = self.embed(z)
        cos, sin = self.rope(t, h, w, x.shape[1], x.device)
        for block in self.transformer_blocks:
            x = block(x, cos, sin)
        return self.head(x, t, h, w)

    def rope(self, t: int, h: int, w: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, tokens, 1, rope_dim): each voxel's (t, h, w) normalized to [-1, 1) over the
        call, the extra tokens at 0."""
        grids = [2.0 * (torch.arange(0.5, n, dtype=torch.float32, device=device) / n) - 1.0 for n in (t, h, w)]
        positions = torch.stack(torch.meshgrid(*grids, indexing="ij"), dim=-1).flatten(0, 2)
        positions = torch.cat([positions, positions.new_zeros(tokens - positions.shape[0], 3)])
        rope_dim = int(self.config.head_dim * self.config.rope_dim_ratio)
        inv_freq = 1.0 / self.config.rope_theta ** torch.arange(0, 1, 6 / rope_dim, dtype=torch.float32, device=device)
        angles = (2.0 * math.pi * positions[None, :, :, None] * inv_freq).flatten(2, 3).tile(2).unsqueeze(2)
        return angles.cos(), angles.sin()

    def offload_blocks(self) -> list[nn.Module]:
        """The units weight offloading moves, in the order they run."""
        return [self.embed, *self.transformer_blocks, self.head]


# ---------------------------------------------------------------------------- the reference's tiles and windows


def split_tiles(length: int, tile: int, min_overlap: int) -> tuple[list[int], list[int]]:
    """The reference's `_split_tiles` in latent pixels: the fewest `tile`-long tiles covering
    `length` with overlaps of at least `min_overlap`, the slack spread over the overlaps in turn.
    (starts, overlaps); one tile of the whole length if it fits."""
    if tile >= length:
        return [0], []
    n = math.ceil(length / tile)
    while tile * n - min_overlap * (n - 1) < length:
        n += 1
    overlaps = [min_overlap] * (n - 1)
    for i in range(tile * n - sum(overlaps) - length):
        overlaps[i % (n - 1)] += 1
    starts = [0]
    for overlap in overlaps:
        starts.append(starts[-1] + tile - overlap)
    return starts, overlaps


@dataclass(frozen=True)
class ReferenceTiles:
    """The reference's tiled decode of one window: tiles of `size` latent pixels overlapping by at
    least `min_overlap`, each faded linearly into from the tile above and the tile to its left as
    they were decoded (not as blended), then cropped where the next tile takes over. `batch`: tiles
    decoded in one call (as the official code's `stack_tiling`), so that offloaded weights pass once
    per batch, not once per tile; 1: one at a time, the least memory."""

    size: tuple[int, int]
    min_overlap: tuple[int, int]
    ratio: int
    batch: int = 1

    def decode(self, decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        (ys, y_overlaps), (xs, x_overlaps) = (split_tiles(n, s, o) for n, s, o in zip((h, w), self.size, self.min_overlap))
        if len(ys) == len(xs) == 1:
            return decode(z)
        r, (th, tw) = self.ratio, self.size
        pieces = [z[..., y : y + th, x : x + tw] for y in ys for x in xs]
        batches = (torch.cat(pieces[i : i + self.batch]) for i in range(0, len(pieces), self.batch))
        # each batch decoded when the stitching reaches its first tile
        tiles = (tile for batch in batches for tile in decode(batch).split(z.shape[0]))
        rows, above = [], None
        for i in range(len(ys)):
            row, crops = [], []
            for j in range(len(xs)):
                tile = next(tiles)
                row.append(tile)
                out = tile.clone() if i or j else tile
                if i:
                    blend(above[j], out, y_overlaps[i - 1] * r, dim=-2)
                if j:
                    blend(row[j - 1], out, x_overlaps[j - 1] * r, dim=-1)
                bottom = out.shape[-2] - (y_overlaps[i] * r if i < len(ys) - 1 else 0)
                right = out.shape[-1] - (x_overlaps[j] * r if j < len(xs) - 1 else 0)
                crops.append(out[..., :bottom, :right])
            rows.append(torch.cat(crops, dim=-1))
            above = row
        return torch.cat(rows, dim=-2)


class WindowReplay:
    """The reference's temporal windows, replayed as latents arrive. `decode(z)` decodes one window of
    7 latents to its 25 frames (the first latent's one frame first), in [-1, 1]."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor]):
        self.decode = decode
        self.pending: torch.Tensor | None = None  # latents from the next window's start on
        self.tail: torch.Tensor | None = None  # the last window's end: the next window fades in from it
        self.windows_done = 0
        self.frames_in = 0
        self.frames_out = 0

    def push(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        self.pending = z if self.pending is None else torch.cat([self.pending, z], dim=2)
        self.frames_in += z.shape[2]
        while self.pending.shape[2] >= WINDOW:
            yield from self._hand_out(self._window(self.pending[:, :, :WINDOW]))
            self.pending = self.pending[:, :, STRIDE:]

    def close(self) -> Iterator[torch.Tensor]:
        pending, self.pending = self.pending, None
        total = self.frames_in
        if total < 3:
            raise StreamdecError(f"the MiniMax-H3 VAE decodes videos of 3 latent frames or more (its reference fails "
                                 f"on shorter ones), and this one has {total}; decode a longer video")  # fmt: skip
        pad = -(total + TOKEN_DROP) % STRIDE  # the reference repeats the last latent to fill its last window
        if pad:
            pending = torch.cat([pending, pending[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        wanted = frames_for(total)  # the padding's frames are cut off the end
        while pending.shape[2] >= WINDOW:
            yield from self._hand_out(self._window(pending[:, :, :WINDOW]), wanted)
            pending = pending[:, :, STRIDE:]
        tail, self.tail = self.tail, None
        yield from self._hand_out(tail, wanted)

    def state_dict(self, names: dict) -> dict:
        """Where the replay stands, as plain data: for resuming it."""
        return {"pending": self.pending, "tail": self.tail, "windows_done": self.windows_done,
                "frames_in": self.frames_in, "frames_out": self.frames_out}  # fmt: skip

    def load_state_dict(self, data: dict, modules: dict, device: torch.device) -> None:
        self.pending, self.tail = (None if t is None else t.to(device) for t in (data["pending"], data["tail"]))
        self.windows_done, self.frames_in, self.frames_out = data["windows_done"], data["frames_in"], data["frames_out"]

    def _window(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a window; its frames that are final now (the rest wait in `tail`)."""
        video = self.decode(z)
        if self.tail is not None:
            blend(self.tail, video, FADE, dim=2)
        self.windows_done += 1
        self.tail = video[:, :, FADE_START:].clone()
        return video[:, :, :KEEP]

    def _hand_out(self, piece: torch.Tensor | None, wanted: int | None = None) -> Iterator[torch.Tensor]:
        if piece is None:
            return
        keep = piece.shape[2] if wanted is None else min(piece.shape[2], wanted - self.frames_out)
        if keep > 0:
            self.frames_out += keep
            yield piece[:, :, :keep]


def frames_for(latent_frames: int) -> int:
    """Video frames of a whole latent video: 4 a latent, 1 for every 5th (a window's first)."""
    return 4 * latent_frames - 3 * math.ceil(latent_frames / STRIDE)


def to_signed(video: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized RGB -> [-1, 1]: 2 * (x * std + mean) - 1."""
    shape = (1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=video.device).view(shape)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=video.device).view(shape)
    return (video.float() * (2 * std) + (2 * mean - 1)).to(video.dtype)


# ---------------------------------------------------------------------------- checkpoints

# (checkpoint name piece, decoder name piece), applied in order; the inverse names missing tensors.
_DIFFUSERS_NAMES = [
    ("post_quant_conv.", "embed.post_quant_conv."), ("decoder.proj_in.", "embed.proj_in."),
    ("decoder.register_tokens", "embed.register_tokens"), ("decoder.norm_out.", "head.norm_out."),
    ("decoder.proj_out.", "head.proj_out."), ("decoder.transformer_blocks.", "transformer_blocks."),
    (".attn.to_out.0.", ".attn.to_out."), (".ff.net.0.proj.", ".ff.w1."), (".ff.net.2.", ".ff.w2."),
]  # fmt: skip
_OFFICIAL_NAMES = [
    ("post_quant_conv.", "embed.post_quant_conv."), ("decoder.x_embedder.", "embed.proj_in."),
    ("decoder.register_tokens", "embed.register_tokens"), ("decoder.norm_out.", "head.norm_out."),
    ("decoder.proj_out.", "head.proj_out."), ("decoder.transformer_blocks.", "transformer_blocks."),
]  # fmt: skip
_NAMES = {"diffusers": _DIFFUSERS_NAMES, "official": _OFFICIAL_NAMES}


def _rename(key: str, pairs, forward: bool = True) -> str:
    for old, new in pairs:
        if not forward:
            old, new = new, old
        if old in key and (key.startswith(old) or old.startswith(".")):
            key = key.replace(old, new, 1)
    return key


def _setting(cfg: dict, *names, default):
    """The first of `names` config.json sets (diffusers' names, then the official `vit_decoder_kwargs`)."""
    official = cfg.get("vit_decoder_kwargs") or {}
    for name in names:
        for source in (cfg, official):
            if source.get(name) is not None:
                return source[name]
    return default


def config_from_shapes(shapes: dict[str, tuple[int, ...]], cfg: dict) -> MiniMaxH3Config:
    try:
        latent = shapes["embed.post_quant_conv.weight"][0]
        dim = shapes["embed.proj_in.weight"][0]
        layers = count_indexed(shapes, "transformer_blocks")
        registers = shapes["embed.register_tokens"][1]
        ffn = shapes["transformer_blocks.0.ff.w2.weight"][1]
        patch = shapes["head.proj_out.weight"][0]
    except KeyError as err:
        raise LayoutError(f"no MiniMax-H3 decoder tensor {err}") from None
    official = "transformer_blocks.0.attn.to_qkv.weight" in shapes
    released = 3 * MiniMaxH3.temporal_ratio * MiniMaxH3.spatial_ratio**2
    if patch != released:
        raise LayoutError(f"the decoder's patches hold {patch} values; streamdec decodes MiniMax-H3's RGB 4x16x16 "
                          f"({released})")
    for name, value in (("spatial_downsample_factors", MiniMaxH3.spatial_ratio),
                        ("temporal_downsample_factors", MiniMaxH3.temporal_ratio)):  # fmt: skip
        if cfg.get(name) is not None and math.prod(cfg[name]) != value:
            raise LayoutError(f"the VAE's {name} {list(cfg[name])} do not multiply to {value}; streamdec decodes "
                              "MiniMax-H3's 4x16x16 compression")  # fmt: skip
    clip = _setting(cfg, "clip_length", "vae_clip_length", default=17)
    drop = _setting(cfg, "token_drop", "vae_token_drop", default=TOKEN_DROP)
    if (clip, drop) != (17, TOKEN_DROP):
        raise LayoutError(f"the VAE decodes clips of {clip} frames less {drop} latents; streamdec replays the released "
                          f"schedule (clip_length 17, token_drop {TOKEN_DROP})")  # fmt: skip
    heads = int(_setting(cfg, "decoder_num_attention_heads", "heads", default=dim // RELEASED_HEAD_DIM) or 1)
    ratio = float(_setting(cfg, "decoder_rope_dim_ratio", "rope_dim_ratio", default=0.75))
    head_dim = dim // heads
    if dim % heads or int(head_dim * ratio) % 6 or int(head_dim * ratio) == 0:
        raise LayoutError(f"the decoder's width {dim} does not split into {heads} heads whose rotary part "
                          f"({ratio:g} of each) splits over 3 axes; give the folder with its config.json")  # fmt: skip
    return MiniMaxH3Config(
        latent_channels=latent, num_layers=layers, num_heads=heads, head_dim=head_dim, num_register_tokens=registers,
        ffn_dim=ffn, rope_theta=float(_setting(cfg, "decoder_rope_theta", "rope_theta", default=100.0)),
        rope_dim_ratio=ratio, norm_eps=float(_setting(cfg, "decoder_norm_eps", default=1e-5)),
        layout="official" if official else "diffusers",
        latents_mean=tuple(float(v) for v in cfg.get("latents_mean") or (0.0,) * latent),
        latents_std=tuple(float(v) for v in cfg.get("latents_std") or (1.0,) * latent),
    )  # fmt: skip


@register
class MiniMaxH3(Family):
    name = "minimax-h3"
    title = "MiniMax-H3 VAE"
    temporal_ratio = 4
    spatial_ratio = 16
    diffusers_class = "AutoencoderKLMiniMaxH3"
    strategy = Strategy.REPLAY
    tiling = Tiling.REFERENCE
    reference_tiles = Blended((16, 16), 0.25)  # enable_tiling(): 256-pixel tiles, overlaps of 64 px at least
    steady_latents = WINDOW + STRIDE  # two windows
    stream_reads_offload = True  # with "block" offload its tiles are decoded in batches (memory plans trace it)

    def detect_layout(self, keys) -> str | None:
        if "decoder.register_tokens" not in keys:
            return None
        if "decoder.proj_in.weight" in keys and "decoder.transformer_blocks.0.attn.to_q.weight" in keys:
            return "diffusers"
        if "decoder.x_embedder.weight" in keys and "decoder.transformer_blocks.0.attn.to_qkv.weight" in keys:
            return "official"
        return None

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        wanted = ("decoder.", "post_quant_conv.")
        return {k: _rename(k, _NAMES[layout]) for k in keys if k.startswith(wanted) and not self.is_unused_key(k)}

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        return {k: _rename(k, reversed(_NAMES[layout]), forward=False) for k in internal_keys}

    def is_unused_key(self, key: str) -> bool:
        return key.startswith(("encoder.", "quant_conv.")) or key == "decoder.mask_token"

    def config(self, shapes, diffusers_config: dict | None) -> MiniMaxH3Config:
        return config_from_shapes(shapes, dict(diffusers_config or {}))

    def build(self, config: MiniMaxH3Config) -> MiniMaxH3Decoder:
        return MiniMaxH3Decoder(config)

    def frames_out(self, latent_frames: int, first_chunk: bool) -> int:
        return frames_for(latent_frames)

    def effective_tile(self, tile) -> Blended:
        """Always the reference's tiles (see the module's docstring); N latent pixels: tiles of N,
        overlapping by N/4 at least, as the reference's 64 of 256 px."""
        if tile is None:
            return self.reference_tiles
        if not isinstance(tile, Blended):
            tile = Blended(tuple(tile), self.reference_tiles.overlap)
        return self._blended(tile)

    def _blended(self, tile: Blended) -> Blended:
        size = tile.size or self.reference_tiles.size
        overlap = self.reference_tiles.overlap if tile.overlap is None else tile.overlap
        if any(not 1 <= s * overlap < s or (s * overlap) % 1 for s in size):
            raise StreamdecError(f"tiles of {size[0]}x{size[1]} latent pixels cannot overlap by {overlap:g} of a tile "
                                 "in whole latent pixels; use a tile size that is a multiple of 4, with the "
                                 "reference's overlap of 1/4")  # fmt: skip
        return Blended(tuple(size), overlap)

    def open_stream(self, decoder: MiniMaxH3Decoder, plan: Plan) -> WindowReplay:
        tile = self.effective_tile(plan.tile)
        overlaps = tuple(int(s * tile.overlap) for s in tile.size)
        batch = OFFLOAD_TILE_BATCH if plan.offload == "block" else 1
        tiles = ReferenceTiles(tile.size, overlaps, self.spatial_ratio, batch)

        def decode_window(z: torch.Tensor) -> torch.Tensor:
            return to_signed(tiles.decode(lambda piece: decoder(piece)[:, :, PRE_PADDING:], z))

        return WindowReplay(decode_window)
