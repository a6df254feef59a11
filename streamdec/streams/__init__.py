"""Streams: how a family's decoder is run over latents that arrive in chunks.

A stream takes checked, de-normalized latents already on the decoder's device and gives back video
pieces on that device, nothing else:

    push(z)   z: (1, C, t, h, w), any t >= 1  ->  an iterator of pieces (1, 3, frames, H, W) in
              [-1, 1], unclamped: every frame that is final now, in order
    close()   ->  an iterator of the pieces that were still waiting

Both are generators, so one piece is on the device at a time: the caller takes each piece off the
device before asking for the next, and consumes one push entirely before the next push. A family
builds its stream from its decoder and the video's Plan (`Family.open_stream`); the implementations:

- `CarriedStream` (`streams.carried`): causal decoders that carry their state (conv caches,
  first-frame flags, attention keys) from chunk to chunk in a StreamState, optionally with a
  lookahead (frames that wait for later latents) and exact spatial tiles. Any chunking equals a
  one-shot decode.
- `ScheduleReplayStream` (`streams.replay`): decoders whose norms span a whole call, so the output
  depends on how the reference cuts the latents; the reference's own windows (and blended spatial
  tiles) are replayed as the latents arrive; `CarriedReplayStream` replays references that cut the
  latents into consecutive calls carrying a conv cache (`Calls`).
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from .carried import CarriedStream
from .replay import Calls, CarriedReplayStream, ScheduleReplayStream, Windows


class Stream(Protocol):
    def push(self, z: torch.Tensor) -> Iterator[torch.Tensor]: ...

    def close(self) -> Iterator[torch.Tensor]: ...


__all__ = ["Stream", "CarriedStream", "ScheduleReplayStream", "Windows", "CarriedReplayStream", "Calls"]
