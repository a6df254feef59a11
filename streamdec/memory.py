"""Device-memory estimates and the plan that keeps a decode under a budget (`max_vram`).

The peak is not guessed from a formula: the decoder is run for real on the "meta" device, where
tensors have shapes but no data, through the same StreamDecoder code a decode uses, while
`MemoryTrace` counts the bytes of every tensor storage alive at each step. Weights are added by
the offload mode: all of them for "none" and "model" (a chunk decodes with the whole decoder on
the device), the two largest blocks for "block" (the running one and the prefetched next).

What the trace cannot see: convolution workspaces of cuDNN and the caching allocator's rounding
and fragmentation. `PLAN_MARGIN` leaves room for them.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .tiling import parks_caches, supports_tiling

GIB = 2**30
PLAN_MARGIN = 0.9  # plan to this share of the budget; the rest is for what the trace cannot see
TILE_CHOICES = (64, 48, 32, 24, 16, 12, 8)  # latent pixels, largest (fewest halo repeats) first


class MemoryTrace(TorchDispatchMode):
    """Counts the bytes of tensor storages created while it is active and still alive; `peak` is
    the most at any moment. Storages made before it started (weights) are not counted, nor those
    it is told to `forget` (moved to the host), until they are `recount`ed."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()  # tensors may die in another thread (frames in a writer queue)
        self.users: dict[int, int] = {}  # storage -> tensors alive that use it
        self.sizes: dict[int, int] = {}  # storage -> bytes, for the counted ones
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        with self.lock:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    key = _key(t)
                    if key in inputs and key not in self.users:
                        continue  # a view of a storage made before the trace (a weight)
                    if key not in self.users:
                        self.users[key] = 0
                        self._count(key, t.untyped_storage().nbytes())
                    self.users[key] += 1
                    weakref.finalize(t, self._release, key)
        return out

    def forget(self, tensors) -> None:
        with self.lock:
            for t in tensors:
                self.now -= self.sizes.pop(_key(t), 0)

    def recount(self, tensors) -> None:
        with self.lock:
            for t in tensors:
                key = _key(t)
                if key in self.users and key not in self.sizes:
                    self._count(key, t.untyped_storage().nbytes())

    def _count(self, key: int, nbytes: int) -> None:
        self.sizes[key] = nbytes
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def _release(self, key: int) -> None:
        with self.lock:
            self.users[key] -= 1
            if self.users[key] == 0:
                del self.users[key]
                self.now -= self.sizes.pop(key, 0)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class TracedParking:
    """Tile caches parked on the host, as seen by a MemoryTrace: off the device between turns."""

    def __init__(self, trace: MemoryTrace):
        self.trace = trace

    def store(self, state) -> None:
        self.trace.forget(state.tensors())

    def fetch(self, state) -> None:
        self.trace.recount(state.tensors())


@dataclass(frozen=True)
class Plan:
    offload: str  # "none", "model" or "block"
    tile: tuple[int, int] | None  # latent pixels, None: untiled
    peak_bytes: int  # estimated device peak, weights included

    def describe(self) -> str:
        tiles = "untiled" if self.tile is None else f"tiles of {self.tile[0]}x{self.tile[1]} latent pixels"
        return f"offload {self.offload}, {tiles}, about {self.peak_bytes / GIB:.2f} GiB"


def weight_bytes(vae, offload: str) -> int:
    """Weights on the device while a chunk decodes."""
    size = torch.finfo(vae.dtype).bits // 8
    if offload != "block":
        return vae.num_parameters() * size
    blocks = sorted((sum(p.numel() for p in _rest_params(vae, b)) for b in vae.decoder.offload_blocks()), reverse=True)
    return sum(blocks[:2]) * size


def _rest_params(vae, block) -> list[torch.Tensor]:
    offloader = vae.offloader  # released weights are placeholders: measure the resting copies
    return [offloader.rest[p] if offloader is not None else p for p in block.parameters()]


def estimate_peak(vae, latent_size: tuple[int, int], latent_frames: int | None = None, offload: str = "none",
                  tile=None, park: bool | None = None) -> int:  # fmt: skip
    """Device bytes at the peak of decoding `latent_frames` latent frames (default: enough to reach
    the steady state) of `latent_size` with these settings: weights plus the caches, activations
    and output of a run on the meta device. `park`: tile caches wait on the host between their
    turns (what happens off the CPU; the default there)."""
    return weight_bytes(vae, offload) + _traced_peak(vae, tuple(latent_size), latent_frames, tile, park)


def _traced_peak(vae, latent_size, latent_frames, tile, park) -> int:
    from .stream import StreamDecoder
    from .vae import VAE

    if park is None:
        park = parks_caches(vae.device)
    with torch.device("meta"):
        decoder = vae.family_spec.build(vae.config)
    decoder = decoder.to(vae.dtype).eval().requires_grad_(False)
    meta = VAE(vae.family_spec, vae.config, decoder, torch.device("meta"), vae.dtype, vae.stored_dtype, vae.source)
    frames = _frames_to_trace(vae, latent_frames)
    trace = MemoryTrace()
    with torch.inference_mode(), trace:
        stream = StreamDecoder(meta, tile=tile)
        stream.start(latent_size, frames)
        if park and stream.tile is not None:
            stream.parking = TracedParking(trace)
            stream.one_tile_per_shape = True  # parked tiles of one shape need the same memory
        else:
            stream.parking = None
        z = torch.empty((1, vae.latent_channels, 1, *latent_size), device="meta")
        for _ in range(frames):  # one latent frame per push, as decode_frames does
            _hand_over(stream.decode_videos(z))
        _hand_over(stream.close_videos())
    return trace.peak


def _frames_to_trace(vae, latent_frames: int | None) -> int:
    """Latent frames an estimate decodes: the video's, up to the family's steady state."""
    steady = vae.family_spec.steady_latents
    return steady if latent_frames is None else min(latent_frames, steady)


def _hand_over(videos) -> None:
    """What StreamDecoder does with each decoded piece on the device: make uint8 frames of it
    (copied to the host from there) and let go of it before the next piece is decoded."""
    from .stream import to_uint8

    for video in videos:
        if video is not None:
            to_uint8(video)
        del video


def tile_choices(vae, latent_size: tuple[int, int]) -> list:
    """The tilings a plan may pick: untiled, then exact tiles smaller than the frame, largest
    first. Only exact tiling is ever picked: a plan must not change the output."""
    if vae.family_spec.strategy != "causal" or not supports_tiling(vae.decoder):
        return [None]
    return [None] + [(t, t) for t in TILE_CHOICES if t < max(latent_size)]


def plan_decode(vae, latent_size: tuple[int, int], latent_frames: int | None = None, tile="auto") -> Plan:
    """The fastest settings whose estimated peak fits `vae.max_vram` (less the margin): weights on
    the device before block offload (prefetched, it costs little), untiled before tiled (tiles
    recompute their halos), large tiles before small. A `tile` other than "auto" and an offload mode
    named at load are kept. Raises BudgetError naming the smallest budget that would do."""
    key = (tuple(latent_size), _frames_to_trace(vae, latent_frames), tile, vae.max_vram, vae.offload_request)
    if key not in vae.plans:  # videos of one size are common: plan each size once
        vae.plans[key] = _plan(vae, tuple(latent_size), latent_frames, tile)
    return vae.plans[key]


def _plan(vae, latent_size: tuple[int, int], latent_frames: int | None, tile) -> Plan:
    usable = vae.max_vram * GIB * PLAN_MARGIN
    offloads = ("none", "block") if vae.offload_request == "auto" else (vae.offload_request,)
    tiles = tile_choices(vae, latent_size) if tile == "auto" else [tile]
    tried = []
    for choice in tiles:
        traced = _traced_peak(vae, latent_size, latent_frames, choice, None)
        for offload in offloads:
            plan = Plan(offload, choice, traced + weight_bytes(vae, offload))
            if plan.peak_bytes <= usable:
                return plan
            tried.append(plan)
    best = min(tried, key=lambda p: p.peak_bytes)
    h, w = latent_size
    ratio = vae.spatial_ratio
    needed = _round_up(best.peak_bytes / PLAN_MARGIN / GIB)
    raise BudgetError(
        f"max_vram {vae.max_vram:g} GiB is too little to decode {w * ratio}x{h * ratio} video with the "
        f"{vae.family_spec.title}: the smallest budget that would do is about {needed:g} GiB ({best.describe()}); "
        f"raise max_vram{_what_else(vae, tile)}"
    )


def _round_up(gib: float) -> float:
    """To two significant digits, upwards: a budget that is enough, in few digits."""
    step = 10 ** (math.floor(math.log10(gib)) - 1)
    return round(math.ceil(gib / step) * step, 12)


def _what_else(vae, tile) -> str:
    hints = []
    if vae.offload_request not in ("auto", "block"):
        hints.append("load with offload='block' or 'auto'")
    if tile != "auto" and len(tile_choices(vae, (2**16, 2**16))) > 1:
        hints.append("let tile='auto' choose tiles")
    if vae.dtype == torch.float32:
        hints.append("decode in bf16")
    return "".join(f", or {h}" for h in hints)


class BudgetError(ValueError):
    """No settings keep the decode under max_vram."""
