"""The carried-state stream: causal decoders whose state moves from chunk to chunk.

The decoder is a function of (latents, state) that continues the stream kept in the StreamState and
returns the frames that are final (Wan, WF-VAE). One latent frame goes through the decoder per call,
as the references do, so activations stay the size of one latent frame's output whatever the chunk
length. A decoder with a lookahead holds some frames back until later latents arrive; `finish`
returns them at the end. With an `ExactTiler` each call is decoded tile by tile, equal to untiled.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..state import StreamState

Decode = Callable[[torch.Tensor, StreamState], torch.Tensor]


class CarriedStream:
    def __init__(self, decode: Decode, finish: Callable[[StreamState], torch.Tensor | None] | None = None,
                 tiler=None):  # fmt: skip
        self.decode = decode
        self.finish = finish  # a lookahead decoder's end of stream: the frames it held back, or None
        self.tiler = tiler  # a streamdec.tiling.ExactTiler, or None: untiled
        self.state: StreamState | None = StreamState()

    def push(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        for t in range(z.shape[2]):
            one = z[:, :, t : t + 1]
            yield self.decode(one, self.state) if self.tiler is None else self.tiler.decode(one, self.state)

    def close(self) -> Iterator[torch.Tensor]:
        state, self.state = self.state, None  # the caches go with the stream
        if self.finish is not None and state is not None:
            video = self.finish(state)
            if video is not None:
                yield video
