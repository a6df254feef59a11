"""The schedule-replay stream: decoders whose norms span a whole decoder call.

HunyuanVideo and Open-Sora-Plan's CausalVAE normalize over the whole time axis of each call, so a
chunk's output depends on every latent in the call, and no carried state reproduces a one-shot
decode. Their references decode overlapping temporal windows instead; the stream replays exactly
that schedule as the latents arrive, decoding each window the moment its last latent frame has come
and handing out its frames once no later window can touch them.

A window of `latents` latent frames starts every `stride`; consecutive windows overlap by
`latents - stride`. Of the overlap, a later window drops the frames of its first latents (`context`,
frames the window before has already given: 1 + r(context - 1) frames, the first latent giving one)
and cross-fades the frames of the next `blend` latents in from the end of the window before (linear,
over r * blend frames). Each window hands out its frames up to where the next window's own frames
begin (r * stride frames, the first window 1 + r(stride + context - 1)); the rest wait, as the
source of the next window's fade. How the reference ends:

- "strided" (diffusers): windows keep starting every stride until the latents run out;
- "rest" (Open-Sora-Plan): one last window from the next start to the end, if it holds latents no
  window has decoded yet.

Memory: the latents of one window, and r * blend frames of the last window's end.

Some references cut the latents into consecutive calls that do not overlap and carry a conv cache
from one call to the next instead (CogVideoX, KVAE-3D): `CarriedReplayStream` replays those `Calls`
with one StreamState carried through them. Nothing overlaps, so each call's frames are final when it
returns. Memory: the state (fixed per layer) and the latents of one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..state import StreamState
from ..tiling import BlendedTiles, blend

ENDINGS = ("strided", "rest")


@dataclass(frozen=True)
class Windows:
    latents: int  # latent frames a window decodes
    stride: int  # latent frames between window starts
    blend: int = 0  # overlapping latents whose frames are cross-faded; the rest of the overlap is context
    ending: str = "strided"

    def __post_init__(self):
        most = self.latents - self.blend - 1  # a window must overlap the next by a context latent at least
        if not 0 < self.stride <= most:
            raise ValueError(f"window stride must be in 1..{most} for windows of {self.latents} latents that blend "
                             f"{self.blend}, not {self.stride}")  # fmt: skip
        if self.ending not in ENDINGS:
            raise ValueError(f"ending must be one of {ENDINGS}, not {self.ending!r}")

    @property
    def context(self) -> int:
        return self.latents - self.stride - self.blend


class ScheduleReplayStream:
    """`decode(z)` decodes latents in one shot; `tiles` (BlendedTiles or None) splits each window's
    frame as the reference does."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], windows: Windows, temporal_ratio: int,
                 tiles: BlendedTiles | None = None):  # fmt: skip
        self.decode = decode
        self.windows = windows
        self.ratio = temporal_ratio
        self.tiles = tiles
        self.pending: torch.Tensor | None = None  # latents from the next window's start on
        self.tail: torch.Tensor | None = None  # the last window's frames past what it handed out
        self.windows_done = 0
        self.frames_in = 0

    def push(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        self.pending = z if self.pending is None else torch.cat([self.pending, z], dim=2)
        self.frames_in += z.shape[2]
        size, stride = self.windows.latents, self.windows.stride
        while self.pending.shape[2] >= size:
            yield from self._window(self.pending[:, :, :size])
            self.pending = self.pending[:, :, stride:]

    def close(self) -> Iterator[torch.Tensor]:
        pending, self.pending = self.pending, None
        if self.windows.ending == "strided":
            while pending is not None and pending.shape[2] > 0:
                yield from self._window(pending[:, :, : self.windows.latents])
                pending = pending[:, :, self.windows.stride :]
        elif pending is not None and pending.shape[2] > (self.windows.context if self.windows_done else 0):
            yield from self._window(pending)
        self.tail = None

    def state_dict(self, names: dict) -> dict:
        """Where the replay stands, as plain data: for resuming it."""
        return {"pending": self.pending, "tail": self.tail, "windows_done": self.windows_done, "frames_in": self.frames_in}

    def load_state_dict(self, data: dict, modules: dict, device: torch.device) -> None:
        self.pending, self.tail = (None if t is None else t.to(device) for t in (data["pending"], data["tail"]))
        self.windows_done, self.frames_in = data["windows_done"], data["frames_in"]

    def _window(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        first = self.windows_done == 0
        video = self._decode(z)
        self.windows_done += 1
        r, w = self.ratio, self.windows
        if not first:
            video = video[:, :, 1 + r * (w.context - 1) :]
            if self.tail is not None:
                blend(self.tail, video, r * w.blend, dim=2)
        keep = 1 + r * (w.stride + w.context - 1) if first else r * w.stride
        self.tail = video[:, :, keep:].clone() if w.blend and video.shape[2] > keep else None
        if video.shape[2]:
            yield video[:, :, :keep]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        if self.tiles is not None and self.tiles.applies(h, w, long_video=self.frames_in >= self.windows.latents):
            return self.tiles.decode(lambda piece, key: self.decode(piece), z)
        return self.decode(z)


@dataclass(frozen=True)
class Calls:
    """A reference's cut into consecutive decoder calls: `first` latents, then `size` each; at the
    end, one call of whatever is left."""

    first: int
    size: int

    def __post_init__(self):
        if self.first < 1 or self.size < 1:
            raise ValueError(f"calls must take 1 latent frame or more, not {self.first} and {self.size}")


class CarriedReplayStream:
    """`decode(z, state)` decodes one call of the reference, continuing the conv caches kept in
    `state`; the stream replays `calls` as the latents arrive, one StreamState carried through them.
    `tiles` (BlendedTiles or None) splits each call as the reference's tiled decode does, each tile
    carrying its own state (the reference runs the whole schedule per tile)."""

    def __init__(self, decode: Callable[[torch.Tensor, StreamState], torch.Tensor], calls: Calls,
                 tiles: BlendedTiles | None = None):  # fmt: skip
        self.decode = decode
        self.calls = calls
        self.tiles = tiles
        self.state = StreamState()
        self.pending: torch.Tensor | None = None  # latents of the call not yet complete
        self.calls_done = 0

    def push(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        self.pending = z if self.pending is None else torch.cat([self.pending, z], dim=2)
        while self.pending is not None and self.pending.shape[2] >= self._next_size():
            size = self._next_size()
            call = self.pending[:, :, :size]
            self.pending = self.pending[:, :, size:] if self.pending.shape[2] > size else None
            yield self._call(call)

    def close(self) -> Iterator[torch.Tensor]:
        pending, self.pending = self.pending, None
        if pending is not None:
            yield self._call(pending)
        self.state = StreamState()  # the caches are not needed any more

    def state_dict(self, names: dict) -> dict:
        """The caches, the latents of the call not yet complete and the calls made: for resuming."""
        return {"state": self.state.to_dict(names), "pending": self.pending, "calls_done": self.calls_done}

    def load_state_dict(self, data: dict, modules: dict, device: torch.device) -> None:
        self.state = StreamState.from_dict(data["state"], modules, device)
        self.pending = None if data["pending"] is None else data["pending"].to(device)
        self.calls_done = data["calls_done"]

    def _next_size(self) -> int:
        return self.calls.first if self.calls_done == 0 else self.calls.size

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        self.calls_done += 1
        if self.tiles is not None and self.tiles.applies(*z.shape[-2:]):
            return self.tiles.decode(lambda piece, key: self.decode(piece, self.state.tile(key)), z)
        return self.decode(z, self.state)
