"""VAE families: the contract a family implements, and the registry that finds one from checkpoint keys.

A family is one decoder architecture. It knows how to recognise its checkpoints (and in which key
layout they are written), how to rename their tensors to its decoder's parameter names, how to read
its sizes off the tensors, how to build the decoder, and how to run it as a stream (`open_stream`).
Every module in this package is imported by the registry; a class decorated with `@register` is a
family. Adding one is one file here (see docs/architecture.md, "Adding a family").
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from enum import Enum
from typing import ClassVar

from torch import nn

from ..errors import StreamdecError
from ..plan import Plan
from ..tiling import Blended, BlendedTiles


class LayoutError(StreamdecError):
    """The tensors do not form a decoder streamdec knows."""


class Strategy(Enum):
    """How a family's decoder is streamed (streamdec.streams)."""

    CARRIED = "carried state"  # CarriedStream: any chunking equals a one-shot decode
    REPLAY = "schedule replay"  # ScheduleReplayStream: the reference's windows, replayed


class Tiling(Enum):
    """What `tile=` means for a family."""

    NONE = "none"  # no spatial tiling
    EXACT = "exact"  # tiles equal to the untiled decode: memory plans may choose them
    REFERENCE = "reference"  # the reference's blended tiles: they change the output, so only the caller chooses them


class Family(ABC):
    name: ClassVar[str]  # public id, e.g. "wan2.1"
    title: ClassVar[str]  # for messages, e.g. "Wan 2.1 VAE"
    temporal_ratio: ClassVar[int]
    spatial_ratio: ClassVar[int]
    diffusers_class: ClassVar[str]  # the diffusers (or reference) model class of this family
    strategy: ClassVar[Strategy]
    tiling: ClassVar[Tiling] = Tiling.NONE
    default_tile: ClassVar[tuple[int, int] | None] = None  # the reference's own tiles, where it always tiles
    reference_tiles: ClassVar[Blended | None] = None  # the reference's enable_tiling(): size and overlap
    lookahead: ClassVar[int] = 0  # latent frames a carried stream waits for before a latent frame's video is final
    # keyword options of a decode (load_vae, decode_frames, StreamDecoder, decode_to_file), name -> default;
    # the stream reads them from Plan.decode (LTX: decode_timestep, decode_noise_scale, seed)
    decode_options: ClassVar[dict[str, object]] = {}

    @property
    def steady_latents(self) -> int:
        """Latent frames after which a stream's memory use repeats itself (memory estimates decode
        this many): the first (special), the second (the first that time upsamplers double), then
        one in steady state, after any lookahead."""
        return 3 + self.lookahead

    # -- checkpoints

    @abstractmethod
    def detect_layout(self, keys) -> str | None:
        """The key layout ("official", "diffusers", ...) if these keys are this family's, else None."""

    @abstractmethod
    def rename_map(self, keys, layout: str) -> dict[str, str]:
        """checkpoint key -> decoder parameter name, for the decoder tensors among `keys`."""

    @abstractmethod
    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        """decoder parameter name -> checkpoint key, to name missing tensors as the file would."""

    @abstractmethod
    def is_unused_key(self, key: str) -> bool:
        """A checkpoint tensor the decoder does not read (the encoder's, or a stored constant)."""

    @abstractmethod
    def config(self, shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None):
        """The decoder's hyper-parameters, read off the (renamed) tensor shapes and config.json.
        Its `z_dim`, `latents_mean` and `latents_std` are the latents' channels and statistics."""

    def read_constants(self, config, layout: str, read):
        """`config` completed with constants the checkpoint stores as tensors (latent statistics);
        `read(key)` gives a checkpoint tensor by its name, or None where there is none."""
        return config

    def check_decode_options(self, options: dict) -> dict:
        """The decode options given, checked against those this family declares."""
        unknown = sorted(set(options) - set(self.decode_options))
        if unknown:
            takes = ", ".join(self.decode_options) or "none"
            raise StreamdecError(f"the {self.title} takes no decode option {', '.join(unknown)} (it takes: {takes})")
        for name, value in options.items():
            default = self.decode_options[name]
            kind = int if isinstance(default, int) and not isinstance(default, bool) else float
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or (kind is int and not isinstance(value, int)) or value != value):  # fmt: skip
                raise StreamdecError(f"{name} must be a {'whole ' if kind is int else ''}number, not {value!r}")
        return dict(options)

    # -- decoding

    @abstractmethod
    def build(self, config) -> nn.Module:
        """The decoder, with `offload_blocks()`: the modules holding all its weights, in the order they run."""

    @abstractmethod
    def open_stream(self, decoder: nn.Module, plan: Plan):
        """A stream (streamdec.streams) that runs `decoder` as `plan` says."""

    def effective_tile(self, tile: tuple[int, int] | Blended | None) -> tuple[int, int] | Blended | None:
        """The tiles a stream will use for `tile=` (latent pixels, a Blended with the reference's size
        and overlap filled in, or None); raises StreamdecError for tiles this family cannot take."""
        if isinstance(tile, Blended):
            return self._blended(tile)
        if tile is not None and self.tiling is Tiling.NONE:
            raise StreamdecError(f"the {self.title} decoder cannot be tiled exactly; use tile=None")
        return tile if tile is not None else self.default_tile

    def _blended(self, tile: Blended) -> Blended:
        reference = self.reference_tiles
        if reference is None:
            raise StreamdecError(f"the {self.title}'s reference has no blended tiling; use tile=N for exact tiles, or None")
        size = tile.size or reference.size
        overlap = reference.overlap if tile.overlap is None else tile.overlap
        ratio = self.spatial_ratio
        if not 0 < overlap < 1 or any(int(s * (1 - overlap)) * ratio != s * ratio - int(s * ratio * overlap) for s in size):
            raise StreamdecError(f"a blended overlap of {overlap:g} does not split {size[0]}x{size[1]}-pixel tiles evenly; "
                                 f"use the reference's {reference.overlap:g}, or 0.125")  # fmt: skip
        return Blended(size, overlap)

    def blended_tiles(self, tile: Blended, long_videos: bool = False) -> BlendedTiles:
        """The reference's tiled decode for a resolved Blended (from `effective_tile`)."""
        stride = tuple(int(s * (1 - tile.overlap)) for s in tile.size)
        return BlendedTiles(tile.size, stride, self.spatial_ratio, long_videos)

    def frames_out(self, latent_frames: int, first_chunk: bool) -> int:
        """Video frames from this many latent frames: temporal_ratio each, but the stream's first
        latent frame gives a single frame (the rule of every causal video VAE here)."""
        return self.temporal_ratio * latent_frames - (self.temporal_ratio - 1 if first_chunk else 0)


_REGISTRY: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make `cls` a family streamdec detects and loads."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"two families are named {cls.name!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def all_families() -> list[Family]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return list(_REGISTRY.values())


def detect(keys) -> tuple[Family, str]:
    """The family and key layout of a checkpoint, from its tensor names."""
    keys = set(keys)
    found = [(family, layout) for family in all_families() if (layout := family.detect_layout(keys)) is not None]
    if len(found) == 1:
        return found[0]
    if found:
        names = " and ".join(f.title for f, _ in found)
        raise LayoutError(f"the tensors fit both the {names}, which streamdec cannot tell apart (a bug: please report it)")
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    raise LayoutError(
        f"not a VAE checkpoint streamdec knows (it holds {len(keys)} tensors, e.g. {sample}); "
        f"supported: {', '.join(f.title for f in all_families())}"
    )


def by_name(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    raise LayoutError(f"unknown VAE family {name!r}; known: {', '.join(f.name for f in all_families())}")
