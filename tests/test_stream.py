"""The streaming API: bad latents, the push/close protocol, and flat memory (no frame kept)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import streamdec

from helpers.wan import LATENT_SHAPE


@pytest.fixture(scope="module")
def vae(checkpoints):
    return streamdec.load_vae(checkpoints["diffusers-folder"], device="cpu")


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(4, 3, 5, 7), "have 4 channels .* takes 16"),
        (torch.randn(16, 5, 7), r"3 dimensions\); expected \(C, T, h, w\)"),
        (torch.randn(1, 1, 16, 3, 5, 7), "6 dimensions"),
        (torch.randn(2, 16, 3, 5, 7), "batch of 2 videos"),
        (torch.randn(16, 0, 5, 7), "no frames"),
        (torch.full((16, 2, 5, 7), float("nan")), "NaN or infinite"),
        (torch.tensor([[[[float("inf")]]]]).expand(16, 1, 1, 1), "NaN or infinite"),
        (torch.zeros(16, 2, 5, 7, dtype=torch.int64), "dtype torch.int64"),
        (np.zeros((16, 2, 5, 7), dtype=np.int32), "dtype int32"),
    ],
    ids=["channels", "rank3", "rank6", "batch", "T=0", "nan", "inf", "int", "numpy-int"],
)
def test_bad_latents_raise_value_error(vae, bad, message):
    with pytest.raises(ValueError, match=message) as err:
        streamdec.decode_frames(vae, bad)  # raised on the call, before any frame
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):
        streamdec.StreamDecoder(vae).push(bad)


def test_latents_of_wrong_type(vae):
    with pytest.raises(TypeError, match="torch tensor or a numpy array, not list"):
        streamdec.decode_frames(vae, [[1.0]])


def test_chunks_must_keep_their_frame_size(vae):
    decoder = streamdec.StreamDecoder(vae)
    decoder.push(torch.randn(16, 1, 5, 7))
    with pytest.raises(ValueError, match="latent chunk is 5x8 but earlier chunks of this stream were 5x7"):
        decoder.push(torch.randn(16, 1, 5, 8))


def test_push_after_close(vae):
    decoder = streamdec.StreamDecoder(vae)
    assert len(decoder.push(torch.randn(16, 2, 5, 7))) == 5
    assert decoder.close() == []
    with pytest.raises(RuntimeError, match="closed"):
        decoder.push(torch.randn(16, 1, 5, 7))


def test_push_returns_frames_as_they_become_final(vae, latents):
    decoder = streamdec.StreamDecoder(vae)
    counts = [len(decoder.push(latents[:, t : t + 1])) for t in range(LATENT_SHAPE[1])]
    assert counts == [1, 4, 4, 4, 4]
    assert decoder.frames_in == 5 and decoder.frames_out == 17


def test_generator_keeps_no_frame_it_has_yielded(vae, latents):
    """Each yielded frame must be freed once the caller drops it, while decoding goes on."""
    frames = streamdec.decode_frames(vae, latents)
    previous = None
    count = 0
    for frame in frames:
        if previous is not None:
            gc.collect()
            assert previous() is None, f"frame {count - 1} is still referenced after it was yielded"
        previous = weakref.ref(frame)
        count += 1
        del frame
    assert count == 17


def test_state_is_fixed_size(vae):
    """Between chunks the decoder keeps only its per-layer caches, the same size at every step."""
    decoder = streamdec.StreamDecoder(vae)
    sizes = []
    for _ in range(6):
        decoder.push(torch.randn(16, 1, 5, 7))
        sizes.append(decoder.stream.state.nbytes())
    assert len(set(sizes[1:])) == 1  # the first step holds one frame of history where later hold two
    assert sizes[0] < sizes[1]
