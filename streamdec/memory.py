"""Device-memory estimates and the plan that keeps a decode under a budget (`max_vram`).

The peak is not guessed from a formula: the family's stream is run for real on the "meta" device,
where tensors have shapes but no data, through the same code a decode uses (the VAE's latent
preparation, the stream, the uint8 conversion of each piece), while `MemoryTrace` counts the bytes
of every tensor storage alive on the device at each step. Weights are added by the offload mode:
all of them for "none" and "model" (a chunk decodes with the whole decoder on the device), the two
largest blocks for "block" (the running one and the prefetched next), or the two largest groups
where a decoder's blocks move in groups (`offload_groups`: a ViT's layers; see `group_choices`).

What the trace cannot see: convolution workspaces of cuDNN and the caching allocator's rounding
and fragmentation. `PLAN_MARGIN` leaves room for them.

This module uses the streams (streamdec.streams, through `Family.open_stream`); the streams never
use it: a plan is a value (streamdec.plan) handed to them.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import StreamdecError
from .families import Tiling
from .frames import to_uint8
from .plan import GIB, Plan
from .tiling import parks_caches
from .vae import VAE

PLAN_MARGIN = 0.9  # plan to this share of the budget; the rest is for what the trace cannot see
# Offload groups are made this large where the budget allows: each copy then lasts milliseconds, so
# the fixed cost of a transfer (a wait, an event, the hooks) is small beside it, while the first
# group of a chunk, whose copy nothing hides, stays small.
GROUP_BYTES = 512 * 2**20
TILE_CHOICES = (64, 48, 32, 24, 16, 12, 8)  # latent pixels, largest (fewest halo repeats) first


class MemoryTrace(TorchDispatchMode):
    """Counts the bytes of tensor storages created while it is active and still alive; `peak` is
    the most at any moment. Storages made before it started (weights) are not counted, and with a
    `device`, only storages on it are (copies parked on the host are not); without one, every
    storage but those on the meta device (a memory plan made inside the trace has no data).

    On the meta device a copy to the host cannot be made (meta tensors have no data): it is given a
    stand-in, a CPU tensor of the right shape over one element, which takes no memory and copies
    back to the meta device as an ordinary tensor would."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device).type
        self.lock = threading.Lock()  # tensors may die in another thread (frames in a writer queue)
        self.users: dict[int, int] = {}  # storage -> tensors alive that use it
        self.sizes: dict[int, int] = {}  # storage -> bytes, for the counted ones
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _COPIES and args[0].is_meta and _target_device(args, kwargs) == "cpu":
            dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), args[0].dtype)
            return torch.zeros((), dtype=dtype).expand(args[0].shape)
        out = func(*args, **kwargs)
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        with self.lock:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and self._counts(t.device.type):
                    key = _key(t)
                    if key in inputs and key not in self.users:
                        continue  # a view of a storage made before the trace (a weight)
                    if key not in self.users:
                        self.users[key] = 0
                        self._count(key, t.untyped_storage().nbytes())
                    self.users[key] += 1
                    weakref.finalize(t, self._release, key)
        return out

    def _counts(self, device_type: str) -> bool:
        return device_type == self.device if self.device is not None else device_type != "meta"

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


_COPIES = (torch.ops.aten.to, torch.ops.aten._to_copy)


def _target_device(args, kwargs: dict) -> str | None:
    """The device a `to` / `_to_copy` call copies to, if it names one."""
    device = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, torch.device)), None)
    return None if device is None else torch.device(device).type


def weight_bytes(vae, offload: str, group: int = 1) -> int:
    """Weights on the device while a chunk decodes; "block" with `group` blocks moved together."""
    size = torch.finfo(vae.dtype).bits // 8
    if offload != "block":
        return vae.num_parameters() * size
    return sum(sorted(_group_sizes(vae, group), reverse=True)[:2]) * size


def _group_sizes(vae, group: int) -> list[int]:
    """Parameters in each offload group of `group` consecutive blocks (as streamdec.offload groups them)."""
    blocks = [sum(p.numel() for p in _rest_params(vae, b)) for b in vae.decoder.offload_blocks()]
    return [sum(blocks[i : i + group]) for i in range(0, len(blocks), group)]


def group_choices(vae, offload: str) -> list[int]:
    """The offload group sizes a plan may pick, best first: 1 for decoders that do not group. For
    those that do, the smallest group of GROUP_BYTES or more, then smaller ones (for smaller budgets)."""
    if offload != "block" or not getattr(vae.decoder, "offload_groups", False):
        return [1]
    size = torch.finfo(vae.dtype).bits // 8
    blocks = len(vae.decoder.offload_blocks())
    enough = next((g for g in range(1, blocks + 1) if max(_group_sizes(vae, g)) * size >= GROUP_BYTES), blocks)
    return list(range(min(enough, max(1, blocks // 2)), 0, -1))


def _rest_params(vae, block) -> list[torch.Tensor]:
    offloader = vae.offloader  # released weights are placeholders: measure the resting copies
    return [offloader.rest[p] if offloader is not None else p for p in block.parameters()]


def estimate_peak(vae, latent_size: tuple[int, int], latent_frames: int | None = None, offload: str = "none",
                  tile=None, park: bool | None = None, frames_per_call: int = 1) -> int:  # fmt: skip
    """Device bytes at the peak of decoding `latent_frames` latent frames (default: enough to reach
    the steady state) of `latent_size` with these settings: weights plus the caches, activations
    and output of a run on the meta device. `park`: tile caches and kept keys wait on the host
    between uses (what happens off the CPU; the default there)."""
    weights = weight_bytes(vae, offload, group_choices(vae, offload)[0])
    return weights + _traced_peak(vae, tuple(latent_size), latent_frames, tile, park, frames_per_call, offload)


def _traced_peak(vae, latent_size, latent_frames, tile, park, frames_per_call: int = 1, offload: str = "none") -> int:
    park = parks_caches(vae.device) if park is None else park
    tile = vae.family_spec.effective_tile(tile)
    # parked tiles of one shape need the same memory: decoding one of each shape gives the peak
    frames = _frames_to_trace(vae, latent_frames, frames_per_call)
    plan = Plan(offload, tile=tile, park=park, sample_tiles=park and tile is not None, frames_per_call=frames_per_call,
                latent_frames=frames)  # the traced video is this long  # fmt: skip
    return traced_peak(vae, latent_size, frames, plan)


def traced_peak(vae, latent_size: tuple[int, int], latent_frames: int, plan: Plan) -> int:
    """The device peak, weights left out, of the family's stream decoding `latent_frames` latent
    frames of `latent_size` under `plan`, pushed as decode_frames pushes them and closed, run on the
    meta device (a copy of the decoder there: shapes, no data)."""
    family = vae.family_spec
    with torch.device("meta"):
        decoder = family.build(vae.config)
    decoder = decoder.to(vae.dtype).eval().requires_grad_(False)
    meta = VAE(family, vae.config, decoder, torch.device("meta"), vae.dtype, vae.stored_dtype, vae.source)
    step = plan.frames_per_call
    trace = MemoryTrace(device="meta")
    with torch.inference_mode(), trace:
        stream = family.open_stream(decoder, plan)
        for start in range(0, latent_frames, step):  # pushes as decode_frames makes them
            z = torch.empty((1, vae.latent_channels, min(step, latent_frames - start), *latent_size), device="meta")
            _hand_over(stream.push(meta.prepare(z, normalized=True)))
            del z
        _hand_over(stream.close())
    return trace.peak


def _frames_to_trace(vae, latent_frames: int | None, frames_per_call: int = 1) -> int:
    """Latent frames an estimate decodes: the video's, up to the family's steady state (that many
    decoder calls)."""
    steady = vae.family_spec.steady_latents * frames_per_call
    return steady if latent_frames is None else min(latent_frames, steady)


def _hand_over(videos) -> None:
    """What StreamDecoder does with each decoded piece on the device: make uint8 frames of it
    (copied to the host from there) and let go of it before the next piece is decoded."""
    for video in videos:
        to_uint8(video)
        del video


def tile_choices(vae, latent_size: tuple[int, int]) -> list:
    """The tilings a plan may pick: untiled, then exact tiles smaller than the frame, largest
    first. Only exact tiling is ever picked: a plan must not change the output (a family whose
    reference tiles keeps its reference's tiles)."""
    family = vae.family_spec
    if family.tiling is not Tiling.EXACT:
        return [family.effective_tile(None)]
    return [None] + [(t, t) for t in TILE_CHOICES if t < max(latent_size)]


def plan_decode(vae, latent_size: tuple[int, int], latent_frames: int | None = None, tile="auto",
                max_vram: float | None = None, frames_per_call: int = 1) -> Plan:  # fmt: skip
    """The fastest settings whose estimated peak fits `max_vram` (default: the VAE's) less the
    margin: weights on the device before block offload (prefetched, it costs little), untiled before
    tiled (tiles recompute their halos), large tiles before small. A `tile` other than "auto" and an
    offload mode named at load are kept. Raises BudgetError naming the smallest budget that would do."""
    max_vram = vae.max_vram if max_vram is None else max_vram
    latent_size = tuple(int(s) for s in latent_size)
    key = (latent_size, _frames_to_trace(vae, latent_frames, frames_per_call), tile, max_vram, vae.offload, frames_per_call)
    if key not in vae.plans:  # videos of one size are common: plan each size once
        vae.plans[key] = _plan(vae, latent_size, latent_frames, tile, max_vram, frames_per_call)
    return vae.plans[key]


def _plan(vae, latent_size: tuple[int, int], latent_frames: int | None, tile, max_vram: float,
          frames_per_call: int) -> Plan:  # fmt: skip
    usable = max_vram * GIB * PLAN_MARGIN
    offloads = ("none", "block") if vae.offload == "auto" else (vae.offload,)
    tiles = tile_choices(vae, latent_size) if tile == "auto" else [vae.family_spec.effective_tile(tile)]
    park = parks_caches(vae.device)
    tried = []
    # a family whose stream runs differently per offload mode (MiniMax-H3 batches its tiles under
    # "block", so the weights pass once per batch of tiles) is traced per mode; the others once per tiling
    per_mode = getattr(vae.family_spec, "stream_reads_offload", False)
    for choice in tiles:
        traced = {}
        for offload in offloads:
            key = offload if per_mode else None
            if key not in traced:
                traced[key] = _traced_peak(vae, latent_size, latent_frames, choice, None, frames_per_call, offload)
            for group in group_choices(vae, offload):
                plan = Plan(offload, choice, park, frames_per_call=frames_per_call, offload_group=group,
                            peak_bytes=traced[key] + weight_bytes(vae, offload, group))  # fmt: skip
                if plan.peak_bytes <= usable:
                    return plan
                tried.append(plan)
    best = min(tried, key=lambda p: p.peak_bytes)
    h, w = latent_size
    ratio = vae.spatial_ratio
    needed = _round_up(best.peak_bytes / PLAN_MARGIN / GIB)
    raise BudgetError(
        f"max_vram {max_vram:g} GiB is too little to decode {w * ratio}x{h * ratio} video with the "
        f"{vae.family_spec.title}: the smallest budget that would do is about {needed:g} GiB ({best.describe()}); "
        f"raise max_vram{_what_else(vae, tile)}"
    )


def _round_up(gib: float) -> float:
    """To two significant digits, upwards: a budget that is enough, in few digits."""
    step = 10 ** (math.floor(math.log10(gib)) - 1)
    return round(math.ceil(gib / step) * step, 12)


def _what_else(vae, tile) -> str:
    hints = []
    if vae.offload not in ("auto", "block"):
        hints.append("load with offload='block' or 'auto'")
    if tile != "auto" and len(tile_choices(vae, (2**16, 2**16))) > 1:
        hints.append("let tile='auto' choose tiles")
    if vae.dtype == torch.float32:
        hints.append("decode in bf16")
    return "".join(f", or {h}" for h in hints)


class BudgetError(StreamdecError):
    """No settings keep the decode under max_vram."""
