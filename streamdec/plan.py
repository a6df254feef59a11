"""Plan: how one video is decoded, as a value handed to the family's stream.

A plan is made per stream, from the caller's settings or by the memory planner under a budget
(`streamdec.memory.plan_decode`); the stream reads it and never changes it, and nothing else is
rewired to apply it: the offload mode is applied per chunk by the VAE's offloader, the tiles by the
stream itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tiling import Blended

GIB = 2**30


@dataclass(frozen=True)
class Plan:
    offload: str = "none"  # "none", "model" or "block": which weights are on the device during a chunk
    tile: tuple[int, int] | Blended | None = None  # tiles in latent pixels (height, width), the reference's; None: none
    # state that waits in (pinned) host memory between uses, off the CPU: tile caches, attention keys
    park: bool = False
    # latent frames per decoder call (carried streams): more is faster where frames are small, and
    # activations grow with it
    frames_per_call: int = 1
    # Decode only the first tile of each shape, leaving the rest of the frame unwritten. Only memory
    # estimates set it: with parked caches, tiles of one shape need the same memory.
    sample_tiles: bool = False
    # the family's decode options (Family.decode_options) given for this video, as (name, value) pairs
    decode: tuple[tuple[str, object], ...] = ()
    peak_bytes: int | None = None  # the estimated device peak, weights included, where a budget was planned for
    # the video's length in latent frames, where known: a family whose reference cuts the latents by
    # their number (CogVideoX: by its parity) needs it to replay that cut from the first push
    latent_frames: int | None = None
    offload_group: int = 1  # "block": blocks moved (and prefetched) together (streamdec.offload)

    def describe(self) -> str:
        if isinstance(self.tile, Blended):
            tiles = self.tile.describe()
        else:
            tiles = "untiled" if self.tile is None else f"tiles of {self.tile[0]}x{self.tile[1]} latent pixels"
        peak = "" if self.peak_bytes is None else f", about {self.peak_bytes / GIB:.2f} GiB"
        calls = "" if self.frames_per_call == 1 else f", {self.frames_per_call} latent frames a call"
        group = f" in groups of {self.offload_group}" if self.offload == "block" and self.offload_group > 1 else ""
        return f"offload {self.offload}{group}, {tiles}{calls}{peak}"


# Output pixels a decoder call aims at when the caller leaves frames_per_call to streamdec. Below it,
# per-call costs and convolutions of a few hundred latent pixels leave the machine idle, so several
# latent frames go in one call; above it more frames a call only grow the activations (measured on
# the CPU, full-size Wan 2.1: one latent frame a call is as fast as seven from 192x192 up).
CALL_PIXELS = 2**17
MAX_CALL_FRAMES = 8


def calls_for(vae, latent_size: tuple[int, int]) -> int:
    """Latent frames per decoder call for frames of `latent_size`: as many as keep a call's output
    under CALL_PIXELS (at most MAX_CALL_FRAMES), one from 192x192 (Wan) up."""
    pixels = vae.temporal_ratio * latent_size[0] * latent_size[1] * vae.spatial_ratio**2
    return max(1, min(MAX_CALL_FRAMES, CALL_PIXELS // pixels))
