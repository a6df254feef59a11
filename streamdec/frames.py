"""Decoded video pieces on the device -> frames on the host.

A piece (1, 3, T, H, W) in [-1, 1] becomes uint8 RGB on the device (4x fewer bytes to copy than
float32) and is handed out frame by frame. Nothing here keeps a frame once it is handed out.

On the CPU the frames are views of the converted piece: no copy. From a GPU, the piece is copied
into a pinned host buffer taken from a HostRing (reused, not allocated per piece), the copy is
followed by a CUDA event, and the host waits on that event only when it needs the frames
(`HostPiece.frames()`), not on the whole stream.

Why a reused buffer never changes under a frame the caller holds: uint8 frames are numpy views of
the buffer's one root array (`_Buffer.array`). numpy points every view, and every view of a view,
at that root (its `base` chain stops at the first array that is not a view of an ndarray), and
everything else that shares the memory (memoryview, torch.from_numpy, np.asarray) holds a view or
the root. So while anything outside the ring can read the buffer, the root's reference count is
above the ring's own; the ring checks it before reuse and, if the buffer is still held, leaves it
to its holders (it is freed with its last frame) and pins a fresh one. A piece not yet handed out
holds the root too, so it is never overwritten either. (A raw pointer, `frame.ctypes.data`, is the
one way around this; as with any numpy array, it is valid only while the array is alive.)
float32 frames (`as_tensor`) are copied out of the buffer into ordinary tensors: torch shares a
tensor's memory below Python's reference counts, so nothing could tell when they are let go.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 RGB, round((clamp(x) + 1) * 127.5), on the same device."""
    scaled = (video.float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round_().to(torch.uint8)[0].permute(1, 2, 3, 0).contiguous()


def to_float_frames(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) -> (T, 3, H, W) float32 clamped to [-1, 1], on the same device."""
    return video.float().clamp(-1.0, 1.0)[0].transpose(0, 1).contiguous()


def to_host_uint8(video: torch.Tensor) -> list[np.ndarray]:
    """T numpy uint8 (H, W, 3) frames, on the host when this returns."""
    return host_piece(video).frames()


def to_host_tensors(video: torch.Tensor) -> list[torch.Tensor]:
    """(1, 3, T, H, W) -> T float32 CPU tensors (3, H, W), clamped to [-1, 1]."""
    return host_piece(video, as_tensor=True).frames()


def host_piece(video: torch.Tensor, as_tensor: bool = False) -> "HostPiece":
    """Start taking a decoded piece to the host; its frames come from `.frames()`. On the CPU the
    frames are ready at once; from a GPU the copy runs behind the work already queued, so more work
    can be queued before the frames are needed."""
    device_frames = to_float_frames(video) if as_tensor else to_uint8(video)
    if device_frames.device.type == "cpu":
        return HostPiece.ready(device_frames, as_tensor)
    return ring_for(device_frames.device).copy(device_frames, as_tensor)


class HostPiece:
    """One piece's frames on their way to the host."""

    def __init__(self, buffer: "_Buffer | None", shape, dtype, as_tensor: bool, tensor: torch.Tensor | None = None):
        self._buffer = buffer
        self._root = None if buffer is None else buffer.array  # holds the buffer while the piece is pending
        self._shape, self._dtype, self._as_tensor, self._tensor = tuple(shape), dtype, as_tensor, tensor

    @classmethod
    def ready(cls, frames: torch.Tensor, as_tensor: bool) -> "HostPiece":
        return cls(None, frames.shape, frames.dtype, as_tensor, tensor=frames)

    def frames(self) -> list:
        """The frames, waiting for the copy if it is still running. Once only: the piece lets go of them."""
        if self._tensor is not None:  # on the CPU: views of the converted piece
            tensor, self._tensor = self._tensor, None
            return list(tensor.unbind(0)) if self._as_tensor else list(tensor.numpy())
        if self._buffer is None:
            raise RuntimeError("this piece's frames have already been taken")
        buffer, root = self._buffer, self._root
        self._buffer = self._root = None
        buffer.wait()
        count = int(np.prod(self._shape))
        if self._as_tensor:  # copied out: see the module's docstring
            out = torch.empty(self._shape, dtype=self._dtype)
            out.copy_(buffer.view(self._shape, self._dtype))
            return list(out.unbind(0))
        return list(root[:count].reshape(self._shape))


class _Buffer:
    """A host buffer, its numpy root (what frames are views of), and the event its last copy recorded."""

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.array = self.tensor.numpy()
        self.event = None
        self._own_refs = self._refs()  # the ring's own: counted by the same code as every later check

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def held(self) -> bool:
        """Whether anything outside the ring still references the buffer (a frame, a pending piece)."""
        return self._refs() > self._own_refs

    def _refs(self) -> int:
        return sys.getrefcount(self.array)

    def view(self, shape, dtype: torch.dtype) -> torch.Tensor:
        count = int(np.prod(shape))
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        return self.tensor[:nbytes].view(dtype).view(shape)

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class HostRing:
    """Host buffers reused in turn for device -> host copies (pinned from a GPU).

    `take(nbytes)` returns a buffer nothing outside the ring holds, big enough, reusing one where it
    can; `copy(x)` copies a device tensor into one without waiting and returns its HostPiece.
    `allocations` counts the buffers made: a stream whose consumer lets frames go makes only as many
    as it holds at once, then reuses them. A consumer that keeps frames makes the ring pin new
    buffers (the kept ones go with the frames), never overwrite them. The ring keeps at most
    `slots` buffers between decodes (`release_host_buffers()` frees them)."""

    def __init__(self, slots: int = 6, pin: bool = True):
        if slots < 1:
            raise ValueError("a HostRing needs at least one slot")
        self.slots: list[_Buffer | None] = [None] * slots
        self.pin = pin
        self.allocations = 0
        self._next = 0
        self._lock = threading.Lock()  # streams in several threads may share a device's ring

    def take(self, nbytes: int) -> _Buffer:
        with self._lock:
            n = len(self.slots)
            for i in (self._next + k for k in range(n)):  # the oldest first: likeliest to be let go
                buffer = self.slots[i % n]
                if buffer is not None and buffer.nbytes >= nbytes and not buffer.held():
                    self._next = (i + 1) % n
                    return buffer
            # none fits: fill an empty slot, else replace a free one (too small), else the oldest (its
            # holders keep it alive; it is freed with them)
            empty = [j for j in range(n) if self.slots[j] is None]
            free = [j for j in range(n) if self.slots[j] is not None and not self.slots[j].held()]
            i = (empty or free or [self._next])[0]
            self._next = (i + 1) % n
            self.slots[i] = _Buffer(nbytes, self.pin)
            self.allocations += 1
            return self.slots[i]

    def copy(self, x: torch.Tensor, as_tensor: bool = False) -> HostPiece:
        """Copy `x` into a buffer behind the work queued on its device's current stream; the host
        waits for it only in `HostPiece.frames()`."""
        buffer = self.take(x.numel() * x.element_size())
        stream = torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None
        if stream is not None and buffer.event is not None:
            stream.wait_event(buffer.event)  # a previous copy into it (maybe from another stream) comes first
        buffer.view(x.shape, x.dtype).copy_(x, non_blocking=stream is not None)
        if stream is not None:
            buffer.event = torch.cuda.Event()
            buffer.event.record(stream)
        return HostPiece(buffer, x.shape, x.dtype, as_tensor)

    def release(self) -> None:
        """Let go of every buffer (those frames still hold stay alive with them)."""
        with self._lock:
            self.slots = [None] * len(self.slots)


_rings: dict[torch.device, HostRing] = {}


def ring_for(device: torch.device) -> HostRing:
    """The host ring this process uses for copies from `device`."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ring = _rings.get(device)
    if ring is None:
        ring = _rings.setdefault(device, HostRing(pin=device.type == "cuda"))
    return ring


def release_host_buffers() -> None:
    """Free the pinned buffers the host rings keep between decodes."""
    for ring in list(_rings.values()):
        ring.release()
