"""Shared fixtures: a small random-weight Wan 2.1 VAE (diffusers, the reference) saved in every
checkpoint layout streamdec reads; and the `cuda` marker, which skips its tests without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from helpers.wan import LATENT_SHAPE, denormalize, random_wan, reference_decode, save_layouts  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def wan_model():
    return random_wan()


@pytest.fixture(scope="session")
def latents():
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def reference_video(wan_model, latents):
    """diffusers' decode of the normalized `latents` (pipeline de-normalization, then decode)."""
    return reference_decode(wan_model, denormalize(wan_model, latents[None]))


@pytest.fixture(scope="session")
def checkpoints(wan_model, tmp_path_factory):
    """The reference weights saved in every layout, keyed by load path."""
    return save_layouts(wan_model, tmp_path_factory.mktemp("checkpoints"), "Wan2.1_VAE", "WanPipeline")
