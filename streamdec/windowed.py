"""Windowed streaming, for decoders whose output cannot be carried exactly from chunk to chunk
(HunyuanVideo and Open-Sora-Plan's CausalVAE normalize over the whole time axis of their input).
Each stream runs its family's reference schedule as the latents arrive.

HunyuanVideo (`WindowedStream`):

The reference (diffusers' default framewise decoding) decodes overlapping temporal windows of
`window + 1` latent frames every `window_stride` latent frames, drops each later window's first
frame, blends each window's first frames linearly with the end of the window before, and keeps
`window_stride * temporal_ratio` frames per window (one more for the first). A kept frame is
never touched by a later window, so it is final as soon as its window is decoded: `WindowedStream`
decodes each window the moment its latents have arrived and hands its kept frames out, holding
only the latents of the next window and the previous window's last frames.

Open-Sora-Plan CausalVAE (`ContextWindowStream`): windows of 6 latent frames every 4; a later
window's first 2 latents are context only and their frames are dropped, with no blending.

Spatial tiling is the reference's too (`tiled_decode`): tiles of `tile` latent pixels every
`tile_stride`, each decoded on its own and blended linearly into its upper and left neighbours.
That is an approximation of the untiled decode (the reference's own), not an exact split.
"""

from __future__ import annotations

from typing import Callable

import torch


def blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Fade from the end of `a` into the start of `b` over `extent` positions along `dim`,
    in place in `b` (the references' blend_t / blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1] * b.dim()
    shape[dim] = extent
    weight = (torch.arange(extent, dtype=torch.float64) / extent).to(b.dtype).to(b.device).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - weight) + head * weight)
    return b


def decode_blended_tiles(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: tuple[int, int],
                         stride: tuple[int, int], ratio: int) -> torch.Tensor:  # fmt: skip
    """The reference's spatially tiled decode of latents `z` (B, C, T, h, w)."""
    h, w = z.shape[-2:]
    (th, tw), (sh, sw) = tile, stride
    above, rows = None, []
    for y in range(0, h, sh):
        row = []
        for x in range(0, w, sw):
            piece = decode(z[..., y : y + th, x : x + tw])
            if above is not None:
                blend(above[len(row)], piece, (th - sh) * ratio, dim=3)
            if row:
                blend(row[-1], piece, (tw - sw) * ratio, dim=4)
            row.append(piece)
        rows.append(torch.cat([p[..., : sh * ratio, : sw * ratio] for p in row], dim=4))
        above = row
    return torch.cat(rows, dim=3)[..., : h * ratio, : w * ratio]


class WindowedStream:
    """Latent chunks in, final video pieces (B, 3, frames, H, W) out, on the reference's schedule.

    `decoder(z)` decodes latents in one shot. `window`, `window_stride`: temporal windows in
    latent frames (diffusers: tile_sample_min_num_frames / 4 = 4 and tile_sample_stride_num_frames
    / 4 = 3). `tile`, `tile_stride`: spatial tiles in latent pixels, or None for none (diffusers'
    enable_tiling() defaults: 32 and 24)."""

    def __init__(self, decoder: Callable[[torch.Tensor], torch.Tensor], temporal_ratio: int, spatial_ratio: int,
                 window: int = 4, window_stride: int = 3, tile: tuple[int, int] | None = None,
                 tile_stride: tuple[int, int] | None = None):  # fmt: skip
        if not 0 < window_stride <= window:
            raise ValueError(f"window_stride must be in 1..window ({window}), not {window_stride}")
        self.decoder = decoder
        self.temporal_ratio, self.spatial_ratio = temporal_ratio, spatial_ratio
        self.window, self.window_stride = window, window_stride
        self.tile = tile
        self.tile_stride = tile_stride or (tile and tuple(t - t // 4 for t in tile))
        self.pending: torch.Tensor | None = None  # latents from the next window's start on
        self.windows_done = 0
        self.tail: torch.Tensor | None = None  # the end of the last window, to blend the next into
        self.frames_in = 0
        self.frames_out = 0

    def push(self, z: torch.Tensor) -> list[torch.Tensor]:
        self.pending = z if self.pending is None else torch.cat([self.pending, z], dim=2)
        self.frames_in += z.shape[2]
        out = []
        while self.pending.shape[2] >= self.window + 1:
            out.append(self._next_window())
        return out

    def close(self) -> list[torch.Tensor]:
        """Decode the windows that start before the end of the latents (the last ones short)."""
        out = []
        while self.pending is not None and self.pending.shape[2] > 0:
            out.append(self._next_window())
        self.pending = self.tail = None
        return [piece for piece in out if piece.shape[2]]

    def _next_window(self) -> torch.Tensor:
        first = self.windows_done == 0
        video = self._decode(self.pending[:, :, : self.window + 1])
        self.pending = self.pending[:, :, self.window_stride :]
        self.windows_done += 1
        if not first:
            video = video[:, :, 1:]  # the window's own first frame: a latent the last window had
            blend(self.tail, video, (self.window - self.window_stride) * self.temporal_ratio, dim=2)
        keep = self.window_stride * self.temporal_ratio + (1 if first else 0)
        overlap = min((self.window - self.window_stride) * self.temporal_ratio, video.shape[2])
        self.tail = video.narrow(2, video.shape[2] - overlap, overlap).clone()
        total = self.temporal_ratio * (self.frames_in - 1) + 1  # the video so far cannot be longer
        kept = video[:, :, : max(0, min(keep, total - self.frames_out))]
        self.frames_out += kept.shape[2]
        return kept

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        if self.tile is not None and (h > self.tile[0] or w > self.tile[1]):
            return decode_blended_tiles(self.decoder, z, self.tile, self.tile_stride, self.spatial_ratio)
        return self.decoder(z)


class ContextWindowStream:
    """Latent chunks in, final video pieces out, on Open-Sora-Plan CausalVAE's tiled decode schedule.

    The reference (`CausalVAEModel.tiled_decode`) cuts the latents into windows of `window` frames
    starting every `stride`; a window after the first drops the frames of its first
    `window - stride` latents (context its predecessor has already decoded). The last window is
    either the clipped next one or, where that would leave latents out, one from the next start to
    the end. Every window is decoded in spatial tiles of `tile` latent pixels overlapping by
    `overlap` of a tile (its `tiled_decode2d`) once the video is longer than `window - 1` latents or
    the frame larger than a tile; shorter clips of small frames are decoded whole, as there."""

    def __init__(self, decoder: Callable[[torch.Tensor], torch.Tensor], temporal_ratio: int, spatial_ratio: int,
                 window: int = 6, stride: int = 4, tile: tuple[int, int] | None = None, overlap: float = 0.125):  # fmt: skip
        tile = tile or (64, 64)  # the reference's 512-pixel tiles
        if any((t * overlap) % 1 for t in tile):
            raise ValueError(f"tile must be a multiple of {round(1 / overlap)} latent pixels for the "
                             f"reference's {overlap:g} tile overlap, not {tile[0]}x{tile[1]}")  # fmt: skip
        self.decoder = decoder
        self.temporal_ratio, self.spatial_ratio = temporal_ratio, spatial_ratio
        self.window, self.stride = window, stride
        self.tile = tile
        self.tile_stride = tuple(int(t * (1 - overlap)) for t in tile)
        self.pending: torch.Tensor | None = None  # latents from the next window's start on
        self.windows_done = 0
        self.frames_in = 0

    def push(self, z: torch.Tensor) -> list[torch.Tensor]:
        self.pending = z if self.pending is None else torch.cat([self.pending, z], dim=2)
        self.frames_in += z.shape[2]
        out = []
        while self.pending.shape[2] >= self.window:
            out.append(self._decode_window(self.pending[:, :, : self.window]))
            self.pending = self.pending[:, :, self.stride :]
        return out

    def close(self) -> list[torch.Tensor]:
        """Decode the last window if it has latents no window has decoded yet."""
        pending, self.pending = self.pending, None
        context = self.window - self.stride
        if pending is None or pending.shape[2] <= (0 if self.windows_done == 0 else context):
            return []
        return [self._decode_window(pending)]

    def _decode_window(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        if self.frames_in >= self.window or h > self.tile[0] or w > self.tile[1]:
            video = decode_blended_tiles(self.decoder, z, self.tile, self.tile_stride, self.spatial_ratio)
        else:
            video = self.decoder(z)
        if self.windows_done:
            video = video[:, :, 1 + (self.window - self.stride - 1) * self.temporal_ratio :]
        self.windows_done += 1
        return video
