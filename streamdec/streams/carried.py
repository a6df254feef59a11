"""The carried-state stream: causal decoders whose state moves from chunk to chunk.

The decoder is a function of (latents, state) that continues the stream kept in the StreamState and
returns the frames that are final (Wan, WF-VAE, HunyuanVideo-1.5). At most `frames_per_call` latent
frames go through the decoder per call (one by default, as the references do), so activations stay
the size of that many latent frames' output whatever the chunk length; the output is the same for
any number. A decoder with a lookahead holds some frames back until later latents
arrive; `finish` returns them at the end (one piece, or an iterator of pieces where a long lookahead
ends in several steps). With an `ExactTiler` each call is decoded tile by tile,
equal to untiled; with a `BlendedTiler`, as the reference's blended tiles (each tile its own stream).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..state import StreamState

Decode = Callable[[torch.Tensor, StreamState], torch.Tensor]


class CarriedStream:
    def __init__(self, decode: Decode, finish: Callable[[StreamState], torch.Tensor | None] | None = None,
                 tiler=None, park: bool = False, frames_per_call: int = 1):  # fmt: skip
        self.decode = decode
        self.frames_per_call = frames_per_call
        self.finish = finish  # a lookahead decoder's end of stream: the frames it held back, or None
        self.tiler = tiler  # a streamdec.tiling ExactTiler or BlendedTiler, or None: untiled
        self.state: StreamState | None = StreamState(park)  # park: what grows waits on the host

    def push(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        for t in range(0, z.shape[2], self.frames_per_call):
            part = z[:, :, t : t + self.frames_per_call]
            yield self.decode(part, self.state) if self.tiler is None else self.tiler.decode(part, self.state)

    def state_dict(self, names: dict) -> dict:
        """What the stream carries, as plain data (see StreamState.to_dict): for resuming it."""
        return {"state": self.state.to_dict(names)}

    def load_state_dict(self, data: dict, modules: dict, device: torch.device) -> None:
        parks_tiles = getattr(self.tiler, "parking", None) is not None
        self.state = StreamState.from_dict(data["state"], modules, device, park=self.state.park,
                                           tiles_device=torch.device("cpu") if parks_tiles else None)  # fmt: skip

    def close(self) -> Iterator[torch.Tensor]:
        state, self.state = self.state, None  # the caches go with the stream
        if self.finish is not None and state is not None:
            video = self.finish(state)
            if isinstance(video, torch.Tensor):
                yield video
            elif video is not None:  # an iterator of pieces (a long lookahead ends in several steps)
                yield from video
