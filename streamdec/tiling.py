"""Exact spatial tiling for causal decoders.

A decoder that supports it splits into `decode_global` (layers that need the whole frame, such as
Wan's mid-block attention; run once per chunk at latent resolution) and `decode_local` (layers
where an output pixel depends only on latent pixels within `local_halo` of it). The local part
runs tile by tile on the tile grown by the halo (clipped at the frame's edges), and the halo is
cropped away. Pixels whose whole receptive field lies inside the grown tile are computed from
exactly the same values as in an untiled decode, so the output equals it; each tile keeps its own
temporal caches in a child StreamState, and a tile's caches are wrong only where its outputs are
cropped away, so that stays true chunk after chunk.

The tiles' caches together are larger than an untiled decode's (each tile caches its halo too),
so on a GPU they would undo what tiling saves. There `HostParking` keeps each tile's caches in
pinned host memory between its turns: the device holds the global part's caches and one tile's.
The price is copying each tile's caches to the device and back once per latent frame; the copies
are queued on the compute stream, so they need no synchronization.
"""

from __future__ import annotations

import torch
from torch import nn

from .state import StreamState


def parse_tile(tile) -> tuple[int, int] | str | None:
    """None, "auto", an int, or (height, width), in latent pixels."""
    if tile is None or tile == "auto":
        return tile
    if isinstance(tile, int) and not isinstance(tile, bool):
        tile = (tile, tile)
    if (isinstance(tile, (tuple, list)) and len(tile) == 2 and all(isinstance(t, int) for t in tile)
            and min(tile) >= 1):  # fmt: skip
        return int(tile[0]), int(tile[1])
    raise ValueError(f"tile must be a positive number of latent pixels, (height, width), None or 'auto', not {tile!r}")


def supports_tiling(decoder: nn.Module) -> bool:
    return all(hasattr(decoder, a) for a in ("decode_global", "decode_local", "local_halo"))


def tile_spans(size: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


def parks_caches(device: torch.device) -> bool:
    """Whether tiles park their caches off `device`: anywhere but the CPU, which is the host."""
    return device.type != "cpu"


class HostParking:
    """Where a tile's caches wait between its turns: (pinned) host memory, off the device."""

    def __init__(self, device: torch.device):
        self.device = device

    def store(self, state: StreamState) -> None:
        state.to("cpu", non_blocking=True)  # non_blocking from CUDA: into pinned memory

    def fetch(self, state: StreamState) -> None:
        state.to(self.device, non_blocking=True)


def decode_tiled(decoder: nn.Module, z: torch.Tensor, state: StreamState, tile: tuple[int, int],
                 ratio: int, parking=None, one_per_shape: bool = False) -> torch.Tensor:  # fmt: skip
    """The decoder's output for `z`, computed tile by tile; equal to `decoder(z, state)`.
    `parking` (a HostParking, or None to keep them on the device) holds the tiles' caches.
    `one_per_shape`: decode only the first tile of each shape, leaving the rest of the output
    unwritten; for memory estimates, since with parked caches such tiles use the same memory."""
    features = decoder.decode_global(z, state)
    h, w = features.shape[-2:]
    halo = decoder.local_halo
    video = None
    shapes_seen = set()
    for y0, y1 in tile_spans(h, tile[0]):
        for x0, x1 in tile_spans(w, tile[1]):
            gy0, gy1, gx0, gx1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
            shape = (y0 - gy0, gy1 - y1, x0 - gx0, gx1 - x1, y1 - y0, x1 - x0)
            if one_per_shape and shape in shapes_seen:
                continue
            shapes_seen.add(shape)
            tile_state = state.tile((y0, x0))
            if parking is not None:
                parking.fetch(tile_state)
            piece = decoder.decode_local(features[..., gy0:gy1, gx0:gx1], tile_state)
            if parking is not None:
                parking.store(tile_state)
            if video is None:
                video = piece.new_empty((*piece.shape[:3], h * ratio, w * ratio))
            video[..., y0 * ratio : y1 * ratio, x0 * ratio : x1 * ratio] = piece[
                ..., (y0 - gy0) * ratio : (y1 - gy0) * ratio, (x0 - gx0) * ratio : (x1 - gx0) * ratio
            ]
            del piece  # before the next tile is decoded, not after
    return video
