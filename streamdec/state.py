"""StreamState: everything a decode remembers from one chunk to the next.

The decoder modules are pure functions of (weights, input, state). All the memory of a
stream lives here, keyed by the module that owns it:

- `history`: the last input frames of each causal temporal convolution, a fixed number
  of frames per layer (kernel size - 1), so the state never grows with the video length.
- `started`: the layers that have already seen the first frame of the stream, for the
  layers that treat that frame specially (Wan's temporal upsampler lets it pass through).
- `ahead`: frames a branch produced before the branch it joins could use them (WF-VAE's
  wavelet branches run half a latent frame ahead of its delayed main path); a frame or two.
- `kept`: what a layer keeps of every frame so far, block by block (the keys and values of a
  frame-causal attention, HunyuanVideo-1.5's): the one state that grows with the video. With
  `park` (off the CPU) the blocks wait in pinned host memory and visit the device one at a time.

A decoder works on one StreamState per independent stream; spatial tiling keeps a child state
per tile (`tile(key)`), since each tile's layers see only that tile's past.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class StreamState:
    def __init__(self, park: bool = False) -> None:
        self.park = park
        self.history: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()
        self.ahead: dict[nn.Module, torch.Tensor] = {}
        self.kept: dict[nn.Module, list[tuple[torch.Tensor, ...]]] = {}
        self.tiles: dict[tuple, StreamState] = {}

    def with_history(self, layer: nn.Module, x: torch.Tensor, frames: int, first: str = "zeros") -> torch.Tensor:
        """Prepend `layer`'s last `frames` input frames to `x` (before the stream starts: zeros, or
        with first="replicate" copies of the first frame), and remember the last `frames` frames of
        the result for the next chunk."""
        past = self.history.get(layer)
        if past is None and first == "replicate":
            full = torch.cat([x[:, :, :1].expand(-1, -1, frames, -1, -1), x], dim=2)
        elif past is None:
            full = F.pad(x, (0, 0, 0, 0, frames, 0))
        else:
            full = torch.cat([past.to(x.dtype), x], dim=2)
        # clone: a slice would keep the whole chunk alive through its storage.
        self.history[layer] = full[:, :, -frames:].clone()
        return full

    def first_time(self, layer: nn.Module) -> bool:
        """True exactly once per layer: the first time it is asked."""
        if layer in self.started:
            return False
        self.started.add(layer)
        return True

    def align(self, branch: nn.Module, frames: torch.Tensor | None, wanted: int) -> torch.Tensor:
        """Queue `branch`'s new frames (if any) behind those it produced earlier; take the first `wanted`."""
        queued = self.ahead.get(branch)
        if frames is not None:
            queued = frames if queued is None else torch.cat([queued, frames], dim=2)
        self.ahead[branch] = queued[:, :, wanted:]
        return queued[:, :, :wanted]

    def keep(self, layer: nn.Module, *block: torch.Tensor) -> None:
        """Keep a block of tensors for `layer` for the rest of the stream (in host memory with `park`)."""
        if self.park:
            block = tuple(t.to("cpu", non_blocking=True) for t in block)  # from CUDA: into pinned memory
        self.kept.setdefault(layer, []).append(block)

    def blocks(self, layer: nn.Module, device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
        """`layer`'s kept blocks in order, each on `device` while it is being used."""
        for block in self.kept.get(layer, []):
            yield tuple(t.to(device, non_blocking=True) for t in block)

    def tile(self, key: tuple) -> "StreamState":
        """The state of one spatial tile, created empty on first use."""
        if key not in self.tiles:
            self.tiles[key] = StreamState(self.park)
        return self.tiles[key]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "StreamState":
        self.history = {k: v.to(device, non_blocking=non_blocking) for k, v in self.history.items()}
        self.ahead = {k: v.to(device, non_blocking=non_blocking) for k, v in self.ahead.items()}
        self.kept = {k: [tuple(t.to(device, non_blocking=non_blocking) for t in b) for b in v]
                     for k, v in self.kept.items()}  # fmt: skip
        for child in self.tiles.values():
            child.to(device, non_blocking)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds, its tiles' included."""
        own = [*self.history.values(), *self.ahead.values(), *(t for v in self.kept.values() for b in v for t in b)]
        return own + [t for child in self.tiles.values() for t in child.tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to_dict(self, names: dict[nn.Module, str]) -> dict:
        """The state as plain data (tensors, names, keys), for `torch.save`: modules are named by
        `names` (the decoder's `named_modules`), so a new decoder of the same shape can take it back."""
        return {
            "history": {names[m]: t for m, t in self.history.items()},
            "started": sorted(names[m] for m in self.started),
            "ahead": {names[m]: t for m, t in self.ahead.items()},
            "kept": {names[m]: blocks for m, blocks in self.kept.items()},
            "tiles": {key: child.to_dict(names) for key, child in self.tiles.items()},
        }

    @classmethod
    def from_dict(cls, data: dict, modules: dict[str, nn.Module], device: torch.device, park: bool = False,
                  tiles_device: torch.device | None = None) -> "StreamState":  # fmt: skip
        """The state `to_dict` wrote, on `device`; kept blocks on the host with `park`, and tiles'
        states on `tiles_device` (default `device`): the host where a tiler parks them between turns."""
        state = cls(park)
        host = torch.device("cpu")
        state.history = {modules[n]: _placed(t, device) for n, t in data["history"].items()}
        state.started = {modules[n] for n in data["started"]}
        state.ahead = {modules[n]: _placed(t, device) for n, t in data["ahead"].items()}
        state.kept = {modules[n]: [tuple(_placed(t, host if park else device) for t in b) for b in blocks]
                      for n, blocks in data["kept"].items()}  # fmt: skip
        tiles_device = device if tiles_device is None else tiles_device
        state.tiles = {tuple(key): cls.from_dict(child, modules, tiles_device, park)
                       for key, child in data["tiles"].items()}  # fmt: skip
        return state


def _placed(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; on the host, pinned where CUDA is there to read it (as `keep` leaves it)."""
    if device.type == "cpu" and torch.cuda.is_available():
        return t.to("cpu").pin_memory()
    return t.to(device)
