"""Plan: how one video is decoded, as a value handed to the family's stream.

A plan is made per stream, from the caller's settings or by the memory planner under a budget
(`streamdec.memory.plan_decode`); the stream reads it and never changes it, and nothing else is
rewired to apply it: the offload mode is applied per chunk by the VAE's offloader, the tiles by the
stream itself.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Plan:
    offload: str = "none"  # "none", "model" or "block": which weights are on the device during a chunk
    tile: tuple[int, int] | None = None  # spatial tiles in latent pixels (height, width); None: untiled
    park_tiles: bool = False  # tiles' caches wait in (pinned) host memory between turns: off the CPU
    # Decode only the first tile of each shape, leaving the rest of the frame unwritten. Only memory
    # estimates set it: with parked caches, tiles of one shape need the same memory.
    sample_tiles: bool = False
    peak_bytes: int | None = None  # the estimated device peak, weights included, where a budget was planned for

    def describe(self) -> str:
        tiles = "untiled" if self.tile is None else f"tiles of {self.tile[0]}x{self.tile[1]} latent pixels"
        peak = "" if self.peak_bytes is None else f", about {self.peak_bytes / GIB:.2f} GiB"
        return f"offload {self.offload}, {tiles}{peak}"
