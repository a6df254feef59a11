"""Spatial tiling: exact tiles for causal decoders, the references' blended tiles for the others.

Exact (`ExactTiler`). A decoder that supports it splits into `decode_global` (layers that need the
whole frame, such as Wan's mid-block attention; run once per chunk at latent resolution) and
`decode_local` (layers where an output pixel depends only on latent pixels within `local_halo` of
it). The local part runs tile by tile on the tile grown by the halo (clipped at the frame's edges),
and the halo is cropped away. Pixels whose whole receptive field lies inside the grown tile are
computed from exactly the same values as in an untiled decode, so the output equals it; each tile
keeps its own temporal caches in a child StreamState, and a tile's caches are wrong only where its
outputs are cropped away, so that stays true chunk after chunk.

The tiles' caches together are larger than an untiled decode's (each tile caches its halo too), so
on a GPU they would undo what tiling saves. There `HostParking` keeps each tile's caches in pinned
host memory between its turns: the device holds the global part's caches and one tile's. The price
is copying each tile's caches to the device and back once per latent frame; the copies are queued
on the compute stream, so they need no synchronization.

Blended (`BlendedTiles`): the references' `tiled_decode`: tiles every `stride`, each decoded on its
own and faded linearly into its upper and left neighbours. An approximation of the untiled decode
(the reference's own), not an exact split. `tile="blended"` (a `Blended` value) asks for the
reference's `enable_tiling()`, with its tile size and overlap unless given. A causal decoder's
reference decodes each tile over the whole clip, so each tile streams with its own state
(`BlendedTiler`) and each chunk's tiles are blended: the reference's tiled decode, streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .state import StreamState


@dataclass(frozen=True)
class Blended:
    """The reference's blended tiles (its `enable_tiling()`): `size` in latent pixels and `overlap`, the
    share of a tile shared with its neighbour; None: the reference's own."""

    size: tuple[int, int] | None = None
    overlap: float | None = None

    def describe(self) -> str:
        size = "" if self.size is None else f" of {self.size[0]}x{self.size[1]} latent pixels"
        overlap = "" if self.overlap is None else f", overlap {self.overlap:g}"
        return f"the reference's blended tiles{size}{overlap}"


def parse_tile(tile) -> tuple[int, int] | Blended | str | None:
    """None, "auto", an int, (height, width) in latent pixels, a Blended, or "blended" / "blended:OVERLAP"."""
    if tile is None or tile == "auto" or isinstance(tile, Blended):
        return tile
    if isinstance(tile, str) and tile.lower().startswith("blended"):
        _, _, overlap = tile.partition(":")
        try:
            return Blended(overlap=float(overlap) if overlap else None)
        except ValueError:
            pass
    if isinstance(tile, int) and not isinstance(tile, bool):
        tile = (tile, tile)
    if (isinstance(tile, (tuple, list)) and len(tile) == 2 and all(isinstance(t, int) and not isinstance(t, bool)
                                                                     for t in tile) and min(tile) >= 1):  # fmt: skip
        return int(tile[0]), int(tile[1])
    raise ValueError(f"tile must be a positive number of latent pixels, (height, width), 'blended', None or 'auto', "
                     f"not {tile!r}")  # fmt: skip


def tile_spans(size: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


def parks_caches(device: torch.device) -> bool:
    """Whether tiles park their caches off `device`: anywhere but the CPU, which is the host."""
    return torch.device(device).type != "cpu"


# ---------------------------------------------------------------------------- exact


class SplitDecoder(Protocol):
    """What a decoder offers to be tiled exactly."""

    local_halo: int  # latent pixels an output pixel of decode_local can see, on each side

    def decode_global(self, z: torch.Tensor, state: StreamState) -> torch.Tensor: ...

    def decode_local(self, x: torch.Tensor, state: StreamState) -> torch.Tensor: ...


class HostParking:
    """Where a tile's caches wait between its turns: (pinned) host memory, off the device."""

    def store(self, state: StreamState) -> None:
        state.to("cpu", non_blocking=True)  # non_blocking from CUDA: into pinned memory

    def fetch(self, state: StreamState, device: torch.device) -> None:
        state.to(device, non_blocking=True)


class ExactTiler:
    """Decodes one chunk tile by tile, equal to `decoder(z, state)`. `tile`: latent pixels (h, w);
    `park`: tile caches wait on the host between turns; `sample`: decode only the first tile of each
    shape (the rest of the frame is left unwritten), for memory estimates."""

    def __init__(self, decoder: SplitDecoder, tile: tuple[int, int], ratio: int, park: bool = False,
                 sample: bool = False):  # fmt: skip
        self.decoder, self.tile, self.ratio, self.sample = decoder, tile, ratio, sample
        self.parking = HostParking() if park else None

    def decode(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        decoder, ratio = self.decoder, self.ratio
        features = decoder.decode_global(z, state)
        h, w = features.shape[-2:]
        halo = decoder.local_halo
        video = None
        shapes_seen = set()
        for y0, y1 in tile_spans(h, self.tile[0]):
            for x0, x1 in tile_spans(w, self.tile[1]):
                gy0, gy1, gx0, gx1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
                shape = (y0 - gy0, gy1 - y1, x0 - gx0, gx1 - x1, y1 - y0, x1 - x0)
                if self.sample and shape in shapes_seen:
                    continue
                shapes_seen.add(shape)
                tile_state = state.tile((y0, x0))
                if self.parking is not None:
                    self.parking.fetch(tile_state, features.device)
                piece = decoder.decode_local(features[..., gy0:gy1, gx0:gx1], tile_state)
                if self.parking is not None:
                    self.parking.store(tile_state)
                if video is None:
                    video = piece.new_empty((*piece.shape[:3], h * ratio, w * ratio))
                video[..., y0 * ratio : y1 * ratio, x0 * ratio : x1 * ratio] = piece[
                    ..., (y0 - gy0) * ratio : (y1 - gy0) * ratio, (x0 - gx0) * ratio : (x1 - gx0) * ratio
                ]
                del piece  # before the next tile is decoded, not after
        return video


# ---------------------------------------------------------------------------- blended


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


@dataclass(frozen=True)
class BlendedTiles:
    """The reference's spatially tiled decode: `tile` latent pixels every `stride`, each tile's
    overlap with its upper and left neighbours blended. The reference tiles a frame larger than a
    tile; with `long_videos` (Open-Sora-Plan) also every window of a video longer than one window."""

    tile: tuple[int, int]
    stride: tuple[int, int]
    ratio: int  # spatial compression
    long_videos: bool = False

    def applies(self, h: int, w: int, long_video: bool = False) -> bool:
        return h > self.tile[0] or w > self.tile[1] or (self.long_videos and long_video)

    def decode(self, decode: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """`decode(piece, (y, x))` decodes the tile of latents `piece` that starts at (y, x)."""
        h, w = z.shape[-2:]
        (th, tw), (sh, sw), ratio = self.tile, self.stride, self.ratio
        above, rows = None, []
        for y in range(0, h, sh):
            row = []
            for x in range(0, w, sw):
                piece = decode(z[..., y : y + th, x : x + tw], (y, x))
                if above is not None:
                    blend(above[len(row)], piece, (th - sh) * ratio, dim=3)
                if row:
                    blend(row[-1], piece, (tw - sw) * ratio, dim=4)
                row.append(piece)
            rows.append(torch.cat([p[..., : sh * ratio, : sw * ratio] for p in row], dim=4))
            above = row
        return torch.cat(rows, dim=3)[..., : h * ratio, : w * ratio]


class BlendedTiler:
    """The reference's blended tiles for a carried decoder: each tile streams through the whole
    decoder with its own state, as the reference decodes each tile over the whole clip, and every
    chunk's tiles are blended; a frame no larger than a tile is decoded whole."""

    def __init__(self, decoder: Callable[[torch.Tensor, StreamState], torch.Tensor], tiles: BlendedTiles):
        self.decoder, self.tiles = decoder, tiles

    def decode(self, z: torch.Tensor, state: StreamState) -> torch.Tensor:
        if not self.tiles.applies(*z.shape[-2:]):
            return self.decoder(z, state)
        return self.tiles.decode(lambda piece, key: self.decoder(piece, state.tile(key)), z)
