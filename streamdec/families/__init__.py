"""VAE families and their detection from checkpoint keys.

A Family knows one decoder architecture: how to recognise its checkpoints (and in which key
layout they are written), how to rename their tensors to the module names of its decoder,
how to read its sizes off the tensors, and how many video frames a chunk of latents gives.
"""

from __future__ import annotations

from torch import nn


class LayoutError(ValueError):
    """The tensors do not form a decoder streamdec knows."""


class Family:
    name: str  # public id, e.g. "wan2.1"
    title: str  # for messages, e.g. "Wan 2.1 VAE"
    temporal_ratio: int
    spatial_ratio: int
    diffusers_class: str  # the diffusers model class of this family
    # "causal": the decoder carries its state in a StreamState, any chunking is exact;
    # "windowed": it decodes whole windows of latents, on the reference's overlapping schedule.
    strategy = "causal"
    lookahead = 0  # latent frames a causal stream waits for before a latent frame's video is final

    @property
    def steady_latents(self) -> int:
        """Latent frames after which a stream's memory use repeats itself (memory estimates decode
        this many): the first (special), the second (the first that time upsamplers double), then
        one in steady state, after any lookahead."""
        return 3 + self.lookahead

    def detect_layout(self, keys) -> str | None:
        """The key layout ("official", "diffusers", ...) if these keys are this family's."""
        raise NotImplementedError

    def rename_map(self, keys, layout: str) -> dict[str, str]:
        """checkpoint key -> decoder parameter name, for the decoder tensors among `keys`."""
        raise NotImplementedError

    def source_name_map(self, layout: str, internal_keys) -> dict[str, str]:
        """decoder parameter name -> checkpoint key, to name missing tensors as the file would."""
        raise NotImplementedError

    def is_unused_key(self, key: str) -> bool:
        """A checkpoint tensor the decoder does not read (the encoder's, or a stored constant)."""
        raise NotImplementedError

    def config(self, shapes: dict[str, tuple[int, ...]], diffusers_config: dict | None):
        raise NotImplementedError

    def build(self, config) -> nn.Module:
        """The decoder: module(latents, state) -> video in [-1, 1], unclamped (module(latents) for
        a windowed family)."""
        raise NotImplementedError

    def window_stream(self, decoder: nn.Module, tile):
        """A windowed family's stream: its reference's window schedule around `decoder`."""
        raise NotImplementedError

    def frames_out(self, latent_frames: int, first_chunk: bool) -> int:
        """Video frames from this many latent frames: temporal_ratio each, but the stream's first
        latent frame gives a single frame (the rule of every causal video VAE here)."""
        return self.temporal_ratio * latent_frames - (self.temporal_ratio - 1 if first_chunk else 0)


def _families() -> list[Family]:
    from .hunyuan import HunyuanVideo
    from .opensora_plan import CausalVAE
    from .wan import Wan21, Wan22
    from .wfvae import WFVAE

    return [Wan21(), Wan22(), HunyuanVideo(), WFVAE(), CausalVAE()]


def detect(keys) -> tuple[Family, str]:
    """The family and key layout of a checkpoint, from its tensor names."""
    keys = set(keys)
    for family in _families():
        layout = family.detect_layout(keys)
        if layout is not None:
            return family, layout
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    raise LayoutError(
        f"not a VAE checkpoint streamdec knows (it holds {len(keys)} tensors, e.g. {sample}); "
        f"supported: {', '.join(f.title for f in _families())}"
    )


def by_name(name: str) -> Family:
    for family in _families():
        if family.name == name:
            return family
    raise LayoutError(f"unknown VAE family {name!r}; known: {', '.join(f.name for f in _families())}")
