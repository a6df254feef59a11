"""Exact spatial tiling: tiled output equals the untiled decode (and diffusers), for tile sizes that
divide the frame and ones that do not, under any chunking."""

from __future__ import annotations

import pytest
import torch

import streamdec
from streamdec.families.wan import WanConfig, up_path_halo
from streamdec.tiling import tile_spans

from helpers.video import assert_equal_video, stream_video
from helpers.wan import denormalize, official_state_dict, random_wan, reference_decode

# One residual block per stage (halo 5) keeps the many-tile cases fast; the frame is large
# enough against the halo that inner tiles really are cut out of it. One case below runs the
# released block counts (halo 13).
SHAPE = (16, 3, 14, 18)


@pytest.fixture(scope="module")
def model():
    return random_wan(base_dim=4, seed=11, num_res_blocks=0)


@pytest.fixture(scope="module")
def vae(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiling") / "vae.pth"
    torch.save(official_state_dict(model), path)
    return streamdec.load_vae(path, device="cpu")


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def untiled(vae, latents):
    return stream_video(vae, latents, [3], tile=None)


def test_halo_of_the_released_decoder():
    assert up_path_halo(WanConfig()) == 13
    assert up_path_halo(WanConfig(num_res_blocks=0)) == 5


def test_untiled_equals_diffusers(model, untiled, latents):
    assert_equal_video(untiled, reference_decode(model, denormalize(model, latents[None]))[0])


@pytest.mark.parametrize(
    "tile, chunks",
    [(7, [3]), ((7, 6), [1, 2]), (5, [3]), ((4, 9), [2, 1]), ((14, 3), [1, 1, 1]), (32, [3])],
    ids=["7-divides-rows", "7x6-divides-chunked", "5-does-not-divide", "4x9", "14x3-per-frame", "larger-than-frame"],
)
def test_tiled_equals_untiled(vae, latents, untiled, tile, chunks):
    assert_equal_video(stream_video(vae, latents, chunks, tile), untiled)


def test_a_smaller_halo_would_show(vae, latents, untiled, monkeypatch):
    """The equality above is not vacuous: cutting the halo short changes the output."""
    monkeypatch.setattr(vae.decoder, "local_halo", vae.decoder.local_halo - 2)
    err = (stream_video(vae, latents, [1, 2], 5) - untiled).abs().max().item()
    assert err > 1e-4  # the equality tests' tolerance


def test_released_block_counts(latents):
    """halo 13: the released decoder's depth, on a frame big enough for inner tiles."""
    model = random_wan(base_dim=4, seed=13)
    z = torch.randn(16, 2, 30, 34, generator=torch.Generator().manual_seed(14))
    vae = streamdec.load_vae(model, device="cpu")
    reference = reference_decode(model, denormalize(model, z[None]))[0]
    assert_equal_video(stream_video(vae, z, [1, 1], (15, 17)), reference)


def test_each_tile_keeps_its_own_caches(vae, latents):
    decoder = streamdec.StreamDecoder(vae, tile=8)
    decoder.push(latents[:, :1])
    state = decoder.stream.state
    assert len(state.tiles) == len(tile_spans(14, 8)) * len(tile_spans(18, 8)) == 6
    assert state.history  # the global part's caches stay in the parent


def test_decode_frames_and_file_take_tile(vae, latents, untiled, tmp_path):
    frames = list(streamdec.decode_frames(vae, latents, tile=(7, 9)))
    expected = ((untiled.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert all((abs(f.astype(int) - e.astype(int))).max() <= 1 for f, e in zip(frames, expected))
    assert streamdec.decode_to_file(vae, latents, tmp_path / "t.mkv", codec="ffv1", tile=8, progress=False) == 9


@pytest.mark.parametrize("bad", [0, -3, "big", (4,), (4, 0), 2.5, True])
def test_bad_tile_sizes(vae, latents, bad):
    with pytest.raises(ValueError, match="tile must be a positive number of latent pixels"):
        streamdec.decode_frames(vae, latents, tile=bad)
