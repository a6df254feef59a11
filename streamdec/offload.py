"""Weight offloading: decoder weights rest in (pinned) CPU memory and visit the execution device
only while they are needed. Numerics are unchanged by any mode.

- "model": the whole decoder is onloaded when a chunk starts and released when it ends, so the GPU
  is free for the diffusion model between chunks.
- "block": each block (residual block, upsampler, mid block, head layers) is onloaded just before
  it runs and released after. On CUDA, the hook of block i starts copying the block expected next
  on a side stream, so transfers overlap compute; at most two blocks are resident at once.
  Grouped ("block" with `group` > 1, for decoders of many small equal blocks such as a ViT's
  layers): blocks move `group` consecutive ones at a time (in the order `attach` was given them),
  onloaded as one when the group's first block runs and released after its last, while the whole
  next group is copied on the side stream: one wait per group instead of per block, and a copy long
  enough to hide behind a whole group's compute. At most two groups are resident at once.
- "none", on an offloaded VAE (one loaded for `max_vram` to choose): onloaded as for "model", and
  kept on the device after the chunk.

Blocks get accelerate `ModelHook`s (`add_hook_to_module`); one `Offloader` per decoder owns the
resting copies and decides what is resident. The mode is not a setting of the decoder: each chunk
is decoded inside `session(mode)`, with the mode of its stream's plan, so streams with different
plans can share one VAE. Released parameters hold a zero-size placeholder, so they take no device
memory. The block that follows another is learned as the decoder runs (tiled decoding repeats the
upsampling blocks per tile), so prefetch follows the real order.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from torch import nn

MODES = ("none", "model", "block")


class BlockHook(ModelHook):
    """Tells the offloader when its block starts and ends."""

    def __init__(self, offloader: "Offloader"):
        self.offloader = offloader

    def pre_forward(self, module, *args, **kwargs):
        self.offloader.before(module)
        return args, kwargs

    def post_forward(self, module, output):
        self.offloader.after(module)
        return output


class Offloader:
    """`mode`: the mode named at load, used outside a session (a decoder called directly)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown offload mode {mode!r}; use one of {', '.join(MODES)}")
        self.blocks, self.device, self.mode = blocks, torch.device(device), mode
        self.session_mode: str | None = None  # the mode of the chunk being decoded
        self.group = 1  # blocks moved together in "block" mode (the session's)
        self.units: dict[int, dict[nn.Module, tuple[nn.Module, ...]]] = {}  # group size -> block -> its group
        self.cuda = self.device.type == "cuda"
        pin = self.cuda and torch.cuda.is_available()
        # The resting copy of every weight: pinned CPU memory, so copies can be asynchronous.
        self.rest = {p: (p.detach().cpu().pin_memory() if pin else p.detach().cpu()) for b in blocks for p in _params(b)}
        self.resident: set[nn.Module] = set()
        self.arriving: dict[nn.Module, torch.cuda.Event] = {}
        self.successor: dict[nn.Module, nn.Module] = {}
        self.previous: nn.Module | None = None
        self.side_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copy_streams: set = set()  # the streams weights were copied on (for tests)
        self.block_bytes = {b: sum(p.numel() * p.element_size() for p in _params(b)) for b in blocks}
        self.peak_resident_bytes = 0
        self.transfers = 0  # groups (blocks, ungrouped) onloaded, prefetched or not
        self.waited_transfers = 0  # of which onloaded while the compute waited (not prefetched)
        for block in blocks:
            self._release(block)
            add_hook_to_module(block, BlockHook(self))

    # -- called by the hooks and the stream decoder

    @contextmanager
    def session(self, mode: str, group: int = 1):
        """Decode one chunk with the weights offloaded as `mode` says (in "block" mode, `group`
        blocks at a time); afterwards nothing is left on the device, except with "none"."""
        if mode not in MODES:
            raise ValueError(f"unknown offload mode {mode!r}; use one of {', '.join(MODES)}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"an offload group is 1 block or more, not {group!r}")
        if mode != "none":
            self.chunk_done()  # what a "none" chunk of another stream left resident
        self.session_mode, self.group = mode, group
        try:
            yield
        finally:
            self.session_mode, self.group = None, 1
            if mode != "none":
                self.chunk_done()

    @property
    def active_mode(self) -> str:
        return self.session_mode or self.mode

    def before(self, block: nn.Module) -> None:
        if self.previous is not None:
            self.successor[self.previous] = block
        if self.active_mode != "block":  # model, or none: the whole decoder
            missing = [b for b in self.blocks if b not in self.resident]
            if missing:
                self._onload(missing)
            self._wait_all()
        else:
            unit = self.unit(block)
            after_unit = self.successor.get(unit[-1])  # the block expected after the group's last
            nxt = () if after_unit is None else self.unit(after_unit)
            for b in list(self.resident):
                if b not in unit and b not in nxt:  # a wrong guess from last time
                    self._release(b)
            missing = [b for b in unit if b not in self.resident]
            if missing:
                self._onload(missing)
            for b in unit:
                self._wait(b)
            coming = [b for b in nxt if b not in self.resident]
            if coming:
                self._onload(coming, prefetch=True)
        self.peak_resident_bytes = max(self.peak_resident_bytes, sum(self.block_bytes[b] for b in self.resident))

    def after(self, block: nn.Module) -> None:
        self.previous = block
        unit = self.unit(block)
        if self.active_mode == "block" and block is unit[-1]:  # the group's last: the group is done
            for b in unit:
                self._release(b)

    def unit(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """The blocks that move with `block`: its group of the session's size."""
        if self.group == 1:
            return (block,)
        if self.group not in self.units:
            size = self.group
            groups = [tuple(self.blocks[i : i + size]) for i in range(0, len(self.blocks), size)]
            self.units[size] = {b: g for g in groups for b in g}
        return self.units[self.group][block]

    def chunk_done(self) -> None:
        """The chunk is decoded: give the device back (the next chunk may be a while)."""
        for b in list(self.resident):
            self._release(b)

    def remove(self) -> None:
        """Detach the hooks and leave every weight in its resting CPU copy."""
        for block in self.blocks:
            remove_hook_from_module(block)
            # accelerate leaves the original bound forward on the instance; drop it, so the
            # module is exactly as before (class forward, no instance attributes).
            vars(block).pop("forward", None)
            self._release(block, to_rest=True)

    # -- moving weights

    def _onload(self, blocks: list[nn.Module], prefetch: bool = False) -> None:
        """Start copying `blocks` (one group) to the device: on the side stream if `prefetch`."""
        self.transfers += 1
        self.waited_transfers += not prefetch
        if not self.cuda:
            for p in (p for b in blocks for p in _params(b)):
                p.data = self.rest[p]
        else:
            stream = self.side_stream if prefetch else torch.cuda.current_stream(self.device)
            self.copy_streams.add(stream)
            with torch.cuda.stream(stream):
                for p in (p for b in blocks for p in _params(b)):
                    p.data = self.rest[p].to(self.device, non_blocking=True)
            if prefetch:
                event = torch.cuda.Event()
                event.record(stream)
                self.arriving.update((b, event) for b in blocks)
        self.resident.update(blocks)

    def _wait(self, block: nn.Module) -> None:
        event = self.arriving.pop(block, None)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for p in _params(block):  # used on this stream: keep the memory until it is done
                p.data.record_stream(current)

    def _wait_all(self) -> None:
        for block in list(self.arriving):
            self._wait(block)

    def _release(self, block: nn.Module, to_rest: bool = False) -> None:
        self.arriving.pop(block, None)
        for p in _params(block):
            p.data = self.rest[p] if to_rest else _placeholder(self.rest[p])
        self.resident.discard(block)


def attach(decoder: nn.Module, blocks: list[nn.Module], device, mode: str) -> Offloader:
    """Attach offload hooks to `decoder`'s `blocks`, which must hold all its weights; `mode` is used
    outside sessions."""
    covered = {p for b in blocks for p in _params(b)}
    missing = [n for n, p in decoder.named_parameters() if p not in covered]
    if missing:
        raise ValueError(f"offload blocks leave out {len(missing)} parameters, e.g. {missing[0]}")
    return Offloader(blocks, device, mode)


def _params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def _placeholder(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype)
