"""Decoding across processes on torch.distributed: each process (rank) decodes a band of rows.

A family with exact spatial tiling (Wan 2.1, Wan 2.2, HunyuanVideo-1.5) is spatially local everywhere
but in named whole-frame layers, so every frame can be cut into horizontal bands of latent rows, one
per rank (unequal where the rows do not divide), each decoded through the family's own stream with
its own StreamState:

- A convolution that looks at neighbouring rows (kernel height > 1) first gets the rows it reads
  from the neighbouring ranks (`halo` rows above and below, point-to-point with `batch_isend_irecv`).
  It then runs as always, padding included, and the rows that its padding spoiled at the band's
  inner edges are cropped from its output. At the frame's true top and bottom nothing is added, so
  the padding there (zeros or replicate) is the single-process one. No rank computes another's rows.
  The causal caches hold the haloed band, the same rows in every chunk, so any chunking stays exact.
- A whole-frame layer (the mid-block attention, at latent resolution) gets the whole frame (an
  all-gather of the bands), runs on it as in one process, its state included (HunyuanVideo-1.5's
  kept keys and values are the whole frame's on every rank), and keeps its own band's rows.
- Each decoded piece's bands go to rank 0 (as uint8 on the device, 4x fewer bytes than float32;
  as float with `as_tensor`), which hands out whole frames to the usual sinks; the other ranks hand
  out nothing and hold only their band and caches.

The hooks doing this (forward pre-hooks and forward hooks on those modules) are installed around
each decoder call and removed after it, so a VAE is never rewired. Every rank must push the same
latents in the same chunks. Offload and max_vram apply per rank: each process loads its VAE and
plans for its own band.
"""

from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import StreamdecError, one_line
from .frames import to_uint8
from .tiling import Blended

# The layers that need the whole frame, per family (module names in the decoder). A family not
# named here is refused: its layers have not been checked to be spatially local.
WHOLE_FRAME_LAYERS = {
    "wan2.1": ("decoder.mid_block.attentions.0",),
    "wan2.2": ("decoder.mid_block.attentions.0",),
    "hunyuanvideo1.5": ("decoder.mid_block.attentions.0",),
}
HALO_TAG, OUTPUT_TAG = 1, 2  # point-to-point tags: a conv's halo rows, a piece's band for rank 0
ROWS = -2  # the height dimension of every conv input and output ((N, C, H, W) and (B, C, T, H, W))


class DistributedError(StreamdecError):
    """A distributed decode cannot start or go on (a bad group or frame, a process that stopped)."""


def check_group(group, vae) -> None:
    """Refuse, in one line each, a group that is not an initialized process group and a family whose
    frame cannot be split into bands."""
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError("group= needs an initialized torch.distributed process group "
                               "(torch.distributed.init_process_group, or launch with torchrun); "
                               "leave group=None to decode in one process")  # fmt: skip
    if not isinstance(group, dist.ProcessGroup):
        raise DistributedError(f"group must be a torch.distributed ProcessGroup (torch.distributed.group.WORLD "
                               f"for the default one), not {group!r}")  # fmt: skip
    family = vae.family_spec
    if family.name not in WHOLE_FRAME_LAYERS:
        names = ", ".join(WHOLE_FRAME_LAYERS)
        raise DistributedError(f"the {family.title} cannot be decoded across processes: that needs exact spatial "
                               f"tiling ({names}); decode it in one process (group=None)")  # fmt: skip
    if dist.get_backend(group) == "gloo" and vae.device.type == "cuda":
        raise DistributedError("a gloo process group cannot exchange CUDA tensors; init the group with "
                               "backend='nccl' for a VAE on the GPU")  # fmt: skip


def split_rows(rows: int, ranks: int) -> list[int]:
    """Latent rows per rank, top band first: as equal as they go, the first bands one row taller."""
    if rows < ranks:
        raise DistributedError(f"a frame of {rows} latent rows cannot be split among {ranks} processes "
                               f"(each needs a row at least); decode it with at most {rows} processes")  # fmt: skip
    base, extra = divmod(rows, ranks)
    return [base + (r < extra) for r in range(ranks)]


def column_tile(tile, band_rows: int, frame_rows: int):
    """The exact tiles a rank can use: tiles must not cut a band across its height (every rank must
    run the same tiles for the halo exchange to pair up), so a tile becomes a column of the band's
    whole height, narrowed where the band is taller than the tile to keep the tile's area. The
    same on every rank (`band_rows`: the tallest band's)."""
    if tile is None:
        return None
    if isinstance(tile, Blended):
        raise DistributedError("blended tiles cannot be split across processes; use exact tiles (tile=N) or none")
    height, width = tile
    return frame_rows, width if band_rows <= height else max(1, height * width // band_rows)


class Bands:
    """This rank's part of the frame (`rows`: latent rows per rank), and the exchanges between the
    ranks' bands over `group`. Only `_run`, `_all_gather` and `barrier` talk to the other ranks (a dry
    run that counts bytes without sending them overrides them, and `agree`)."""

    def __init__(self, rows: list[int], rank: int, group=None):
        self.group, self.rows, self.rank, self.ranks = group, rows, rank, len(rows)
        self.start = sum(rows[:rank])
        self.sent = Counter()  # bytes this rank sent, by kind: halo, whole-frame, output

    def own(self, z: torch.Tensor) -> torch.Tensor:
        """This rank's rows of latents (…, h, w)."""
        return z[..., self.start : self.start + self.rows[self.rank], :]

    def scale(self, x: torch.Tensor) -> int:
        """How many rows of `x` (a band at some resolution) one latent row has become."""
        ratio, rest = divmod(x.shape[ROWS], self.rows[self.rank])
        if rest:
            raise DistributedError(f"a band of {self.rows[self.rank]} latent rows became {x.shape[ROWS]} rows, "
                                   "not a whole multiple (a layer changed the band's height unevenly)")  # fmt: skip
        return ratio

    def with_halo(self, x: torch.Tensor, halo: int) -> tuple[torch.Tensor, int, int]:
        """`x` grown by `halo` rows from the band above and below (none at the frame's edges), and how
        many rows were added at the top and the bottom."""
        if x.shape[ROWS] < halo:
            raise DistributedError(f"a band of {x.shape[ROWS]} rows cannot lend the {halo} rows a neighbour's "
                                   "convolution needs; decode with fewer processes")  # fmt: skip
        above = below = None
        ops = []
        shape = list(x.shape)
        shape[ROWS] = halo
        if self.rank > 0:
            above = x.new_empty(shape)
            ops += self._swap(x.narrow(ROWS, 0, halo), above, self.rank - 1)
        if self.rank < self.ranks - 1:
            below = x.new_empty(shape)
            ops += self._swap(x.narrow(ROWS, x.shape[ROWS] - halo, halo), below, self.rank + 1)
        if not ops:
            return x, 0, 0
        self._run(ops)
        shape[ROWS] = x.shape[ROWS] + sum(t.shape[ROWS] for t in (above, below) if t is not None)
        grown = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))  # x's: channels-last stays
        torch.cat([t for t in (above, x, below) if t is not None], dim=ROWS, out=grown)
        return grown, halo if above is not None else 0, halo if below is not None else 0

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The whole frame from every rank's band `x` (all-gather; bands padded to the tallest)."""
        scale = self.scale(x)
        tallest = max(self.rows) * scale
        padded = x
        if x.shape[ROWS] < tallest:
            pad = list(x.shape)
            pad[ROWS] = tallest - x.shape[ROWS]
            padded = torch.cat([x, x.new_zeros(pad)], dim=ROWS)
        padded = padded.contiguous()  # the plain layout on the wire, whatever the decoder's
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        self.sent["whole-frame"] += _nbytes(padded) * (self.ranks - 1)
        self._all_gather(parts, padded)
        return torch.cat([p.narrow(ROWS, 0, n * scale) for p, n in zip(parts, self.rows)], dim=ROWS)

    def own_rows(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole frame (at any resolution)."""
        scale = whole.shape[ROWS] // sum(self.rows)
        return _dense(whole.narrow(ROWS, self.start * scale, self.rows[self.rank] * scale))

    def to_first(self, x: torch.Tensor, dim: int) -> torch.Tensor | None:
        """Every rank's band `x` joined along `dim` on rank 0 (None on the others)."""
        scale = x.shape[dim] // self.rows[self.rank]
        x = x.contiguous()
        if self.rank != 0:
            self.sent["output"] += _nbytes(x)
            self._run([(dist.isend, x, 0, OUTPUT_TAG)])
            return None
        parts = [x]
        for r in range(1, self.ranks):
            shape = list(x.shape)
            shape[dim] = self.rows[r] * scale
            parts.append(x.new_empty(shape))
        self._run([(dist.irecv, p, r, OUTPUT_TAG) for r, p in enumerate(parts) if r > 0])
        return torch.cat(parts, dim=dim)

    def _swap(self, mine: torch.Tensor, theirs: torch.Tensor, peer: int) -> list:
        mine = mine.contiguous()
        self.sent["halo"] += _nbytes(mine)
        return [(dist.isend, mine, peer, HALO_TAG), (dist.irecv, theirs, peer, HALO_TAG)]

    def _run(self, ops: list) -> None:
        """Point-to-point sends and receives, (isend or irecv, tensor, peer's rank in the group, tag)."""
        with _peers_alive(self):
            p2p = [dist.P2POp(op, t, group=self.group, group_peer=peer, tag=tag) for op, t, peer, tag in ops]
            for work in dist.batch_isend_irecv(p2p):
                work.wait()

    def agree(self, what: str, values: list[int], device: torch.device) -> None:
        """Refuse to go on unless every rank has the same `values`: a rank whose calls differ from the
        others' would pair its exchanges with the wrong ones (gloo aborts the process; NCCL hangs)."""
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(self.ranks)]
        self._all_gather(parts, mine)
        others = [p.tolist() for p in parts]
        if any(o != values for o in others):
            raise DistributedError(f"the ranks disagree on {what} ({', '.join(f'rank {r}: {o}' for r, o in enumerate(others))}); "
                                   "every rank must push the same latents in the same chunks with the same settings")  # fmt: skip

    def _all_gather(self, parts: list[torch.Tensor], mine: torch.Tensor) -> None:
        with _peers_alive(self):
            dist.all_gather(parts, mine, group=self.group)

    def barrier(self) -> None:
        with _peers_alive(self):
            dist.barrier(group=self.group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format `x` is laid out in (a decoder may run channels-last on the CPU)."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _dense(view: torch.Tensor) -> torch.Tensor:
    """A cropped view as a tensor of its own, in the layout it had (the layers after may rely on it)."""
    return view.clone(memory_format=torch.preserve_format)


@contextmanager
def _peers_alive(bands: Bands):
    """A failed exchange means another rank stopped (or cannot be reached): say so in one line."""
    try:
        yield
    except RuntimeError as err:  # torch's DistBackendError and gloo's errors are RuntimeErrors
        cause = re.sub(r"^\[[^\]]*\]\s*", "", one_line(err)).split(". ")[0]  # gloo's: no source path, first sentence
        raise DistributedError(f"rank {bands.rank} of {bands.ranks}: another process of the distributed decode "
                               f"stopped or cannot be reached ({cause}); the decode cannot go on without it") from err  # fmt: skip


class BandHooks:
    """The hooks that make a decoder decode this rank's band: halo rows for each convolution that
    reads neighbouring rows, the whole frame for each whole-frame layer. `installed()` puts them on
    for one decoder call and takes them off after it; `check_ran()` then says if one did not run."""

    def __init__(self, decoder: nn.Module, family: str, bands: Bands):
        self.bands = bands
        modules = dict(decoder.named_modules())
        self.whole_frame = [modules[name] for name in WHOLE_FRAME_LAYERS[family]]
        inside = {m for layer in self.whole_frame for m in layer.modules()}
        self.halos = {m: _halo(name, m) for name, m in modules.items()
                      if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.kernel_size[ROWS] > 1 and m not in inside}  # fmt: skip
        self.added: dict[nn.Module, tuple[int, int]] = {}
        self.ran: set[nn.Module] = set()

    @contextmanager
    def installed(self):
        handles = []
        for conv in self.halos:
            handles += [conv.register_forward_pre_hook(self._grow), conv.register_forward_hook(self._crop)]
        for layer in self.whole_frame:
            handles += [layer.register_forward_pre_hook(self._gather), layer.register_forward_hook(self._keep_own)]
        self.ran.clear()
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.added.clear()

    def check_ran(self) -> None:
        missed = [m for m in [*self.halos, *self.whole_frame] if m not in self.ran]
        if missed:  # a module run other than through its call (its hooks): its rows would be wrong
            raise DistributedError(f"{len(missed)} layers of the decoder ran without their distributed hooks "
                                   f"(e.g. {type(missed[0]).__name__}); this decoder cannot be split into bands (a bug)")  # fmt: skip

    def _grow(self, conv: nn.Module, args: tuple):
        grown, top, bottom = self.bands.with_halo(args[0], self.halos[conv])
        self.added[conv] = (top, bottom)
        return (grown, *args[1:])

    def _crop(self, conv: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        top, bottom = self.added.pop(conv)
        self.ran.add(conv)
        if out.shape[ROWS] != args[0].shape[ROWS]:
            raise DistributedError(f"a {type(conv).__name__} changes the frame's height ({args[0].shape[ROWS]} -> "
                                   f"{out.shape[ROWS]} rows); it cannot be split into bands")  # fmt: skip
        if not top and not bottom:
            return out
        return _dense(out.narrow(ROWS, top, out.shape[ROWS] - top - bottom))

    def _gather(self, layer: nn.Module, args: tuple):
        return (self.bands.whole(args[0]), *args[1:])

    def _keep_own(self, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        self.ran.add(layer)
        return self.bands.own_rows(out)


def _halo(name: str, conv: nn.Conv2d | nn.Conv3d) -> int:
    """Rows a stride-1, height-preserving conv reads above and below each output row."""
    k, s, d = conv.kernel_size[ROWS], conv.stride[ROWS], conv.dilation[ROWS]
    if s != 1 or k % 2 == 0:
        raise DistributedError(f"the decoder's {name} (kernel height {k}, stride {s}) cannot be split into bands")
    return (k - 1) // 2 * d


class BandStream:
    """A family's stream (streamdec.streams) run on this rank's band, handing out whole pieces on rank 0.

    `push(z)` takes the whole frame's latents (every rank the same) and decodes this rank's rows;
    rank 0 yields each piece whole, (1, 3, T, H, W) in [-1, 1]: gathered as uint8 and turned back
    into the floats that make the same uint8 frames (`exact=False`), or gathered as they are
    (`exact=True`, for float output); the other ranks yield nothing."""

    def __init__(self, stream, hooks: BandHooks, exact: bool, frames_per_call: int = 1):
        self.stream, self.hooks, self.bands, self.exact = stream, hooks, hooks.bands, exact
        self.frames_per_call = frames_per_call

    def push(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        self.bands.agree("the chunk pushed (channels, latent frames, rows, columns; latent frames a call)",
                         [*z.shape[1:], self.frames_per_call], z.device)  # fmt: skip
        yield from self._whole(self.stream.push(self.bands.own(z)))

    def close(self) -> Iterator[torch.Tensor]:
        yield from self._whole(self.stream.close())
        self.bands.barrier()  # no rank leaves (and closes its connections) while another still reads

    def _whole(self, pieces: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        while True:
            with self.hooks.installed():  # on for one decoder call: between pieces the VAE is as it was
                piece = next(pieces, None)
            if piece is None:
                return
            self.hooks.check_ran()
            if self.exact:
                whole = self.bands.to_first(piece, dim=ROWS)
            else:  # (T, H, W, 3) uint8 frames; rows are dim 1
                whole = self.bands.to_first(to_uint8(piece), dim=1)
                if whole is not None:  # exactly the floats whose uint8 frames these are
                    whole = whole.permute(3, 0, 1, 2)[None].float().div_(127.5).sub_(1.0)
            del piece
            if whole is not None:
                yield whole


def open_band_stream(vae, group, latent_size: tuple[int, int], plan_for, exact: bool):
    """This rank's plan and stream for frames of `latent_size`. `plan_for(size)`: the plan the
    decoder would make for a frame of `size` (the band, grown by the halo its convolutions take)."""
    from dataclasses import replace

    check_group(group, vae)
    bands = Bands(split_rows(latent_size[0], dist.get_world_size(group)), dist.get_rank(group), group)
    # every rank plans for the tallest band (grown by a conv's halo), so all run the same tiles
    tallest = max(bands.rows) + 2
    plan = plan_for((tallest, latent_size[1]))
    plan = replace(plan, tile=column_tile(vae.family_spec.effective_tile(plan.tile), tallest, latent_size[0]))
    stream = vae.family_spec.open_stream(vae.decoder, plan)
    bands.barrier()  # every rank is here: NCCL wants a collective before the first point-to-point exchange
    bands.agree("the frame's size in latent pixels", list(latent_size), vae.device)
    return plan, BandStream(stream, BandHooks(vae.decoder, vae.family_spec.name, bands), exact, plan.frames_per_call)


def from_environment(device):
    """For a process that torchrun (or another env:// launcher) started as one of several: join the
    process group (NCCL on GPUs, gloo on the CPU) and pick this rank's GPU. Returns (device, group),
    or (device, None) when the process runs alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, None
    from .vae import resolve_device

    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)  # fmt: skip
    return device, dist.group.WORLD
