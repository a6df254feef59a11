"""CogVideoX VAE: the replayed calls (2 latent frames each, the first 2 + T mod 2, the conv caches
carried) equal diffusers' AutoencoderKLCogVideoX.decode through every load path (diffusers folders,
CogVideoX 1.5's config, SAT's 3d-vae.pt, a live object) and chunking; blended tiles equal
enable_tiling(); memory does not grow with the length; offload and max_vram plans change nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from hypothesis import given, settings
from hypothesis import strategies as st

import streamdec
from streamdec import memory
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.errors import StreamdecError
from streamdec.families.cogvideox import CogVideoXConfig, CogVideoXDecoder
from streamdec.frames import to_uint8
from streamdec.memory import MemoryTrace, estimate_peak
from streamdec.stream import StreamDecoder
from streamdec.tiling import Blended

from helpers.cogvideox import random_cogvideox, reference, sat_state_dict, stream_video
from helpers.layouts import diffusers_layouts
from helpers.video import assert_equal_video

SHAPE = (4, 5, 2, 3)  # (C, T, h, w): odd T, calls of 3 and 2 latents -> 17 frames of 16x24
EVEN = 4  # latent frames of an even video: calls of 2 and 2 -> 16 frames


@pytest.fixture(scope="module")
def model():
    return random_cogvideox()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(61))


@pytest.fixture(scope="module")
def expected(model, latents):
    return reference(model, latents[None])


@pytest.fixture(scope="module")
def expected_even(model, latents):
    return reference(model, latents[None, :, :EVEN])


@pytest.fixture(scope="module")
def ours(vae, latents):
    """The stream's own output, for the bit-identity of offload modes and plans."""
    return stream_video(vae, latents, [5])


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox")
    paths = diffusers_layouts(model, root, "CogVideoXPipeline")
    paths["sat"] = root / "vae" / "3d-vae.pt"  # the SAT release: {"state_dict": ...}, encoder and loss too
    paths["sat"].parent.mkdir()
    torch.save({"state_dict": sat_state_dict(model)}, paths["sat"])
    return paths


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["diffusers-folder"], device="cpu")


def test_released_sizes():
    """The released decoder: diffusers' names and shapes (123 M parameters)."""
    with torch.device("meta"):
        ours = CogVideoXDecoder(CogVideoXConfig()).state_dict()
        theirs = AutoencoderKLCogVideoX().state_dict()
    decoder_side = {k: tuple(v.shape) for k, v in theirs.items() if k.startswith("decoder.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == decoder_side
    assert round(sum(np.prod(s) for s in decoder_side.values()) / 1e6) == 123


def test_reference_output_is_not_saturated(expected):
    assert expected.shape == (3, 17, 16, 24)
    assert (expected.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize("path", ["live-object", "diffusers-folder", "diffusers-pipeline", "sat"])
def test_every_load_path_equals_diffusers(layouts, path, latents, expected):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert (vae.family, vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == ("cogvideox", 4, 4, 8)
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True))
    assert len(frames) == vae.frames_for(SHAPE[1]) == 17
    assert_equal_video(torch.stack(frames, dim=1), expected)


def test_cogvideox_15_config(latents, tmp_path):
    """CogVideoX 1.5's (and 5B's, ConsisID's) VAE: the same decoder, its config.json's scaling factor
    0.7 (invert_scale_latents only concerns the image-to-video pipeline's encoding)."""
    model = random_cogvideox(seed=3, scaling_factor=0.7, invert_scale_latents=True)
    model.save_pretrained(tmp_path / "vae")
    vae = streamdec.load_vae(tmp_path / "vae", device="cpu")
    assert vae.config.scaling_factor == 0.7
    assert_equal_video(stream_video(vae, latents, [2, 3]), reference(model, latents[None]))


def test_sat_checkpoint_without_config_decodes_raw_latents(layouts, latents, expected):
    """3d-vae.pt carries no scaling factor (2B and 5B share the file); raw latents need none."""
    vae = streamdec.load_vae(layouts["sat"], device="cpu")
    assert_equal_video(stream_video(vae, latents / 1.15258426, [5], normalized=False), expected)


@pytest.mark.parametrize("chunks", [[1] * 5, [5], [2, 3], [3, 2], [4, 1]], ids=lambda c: "+".join(map(str, c)))
def test_every_chunking_equals_diffusers(vae, latents, expected, chunks):
    assert_equal_video(stream_video(vae, latents, chunks), expected)


@pytest.mark.parametrize("chunks", [[1] * 4, [4], [3, 1]], ids=lambda c: "+".join(map(str, c)))
def test_even_lengths_equal_diffusers(vae, latents, expected_even, chunks):
    """An even video: calls of 2 from the start, and 4T frames, as diffusers returns."""
    assert expected_even.shape[1] == 16 == vae.frames_for(EVEN)
    assert_equal_video(stream_video(vae, latents[:, :EVEN], chunks), expected_even)


@settings(max_examples=3, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SHAPE[1] - 1), max_size=3))
def test_random_chunkings(vae, latents, expected, cuts):
    bounds = [0, *sorted(cuts), SHAPE[1]]
    assert_equal_video(stream_video(vae, latents, [b - a for a, b in zip(bounds, bounds[1:])]), expected)


@pytest.mark.parametrize("length", [1, 2])
def test_short_videos_equal_diffusers(vae, model, latents, length):
    assert_equal_video(stream_video(vae, latents[:, :length], [length]), reference(model, latents[None, :, :length]))


def test_the_length_decides_the_cut(expected, expected_even):
    """Not vacuous: the first frames of 4 and 5 latent frames differ (their first calls hold 2 and 3
    latents, normalized together), which is why the stream needs the length."""
    assert (expected[:, :8] - expected_even[:, :8]).abs().max() > 0.01


def test_frames_come_out_as_calls_complete(vae, latents):
    stream = StreamDecoder(vae, latent_frames=SHAPE[1])
    assert [len(stream.push(latents[:, t : t + 1])) for t in range(SHAPE[1])] == [0, 0, 9, 0, 8]
    assert stream.close() == []


def test_uint8_frames_within_one_level(vae, latents, expected):
    frames = np.stack(list(streamdec.decode_frames(vae, latents))).astype(np.int16)
    reference_frames = ((expected + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(frames - reference_frames).max() <= 1


def test_a_push_stream_needs_the_length(vae, latents):
    stream = StreamDecoder(vae)
    with pytest.raises(StreamdecError, match=r"parity .* StreamDecoder\(vae, latent_frames=T\)$"):
        stream.push(latents[:, :1])
    stream.start(SHAPE[-2:], SHAPE[1])  # a refused start settles nothing: it can still be started
    assert len(stream.push(latents)) == 17
    with pytest.raises(StreamdecError, match="told the video has latent_frames=5, but 6 have been pushed"):
        stream.push(latents[:, :1])
    with pytest.raises(StreamdecError, match="latent_frames must be"):
        StreamDecoder(vae, latent_frames=0)


# ---------------------------------------------------------------------------- tiles

TILED = (4, 4, 7, 6)  # (C, T, h, w): larger than the 6x5-latent test tiles (48x40 pixels): 4 tiles


@pytest.fixture(scope="module")
def tiled_latents():
    return torch.randn(TILED, generator=torch.Generator().manual_seed(62))


@pytest.fixture(scope="module")
def tiled_expected(model, tiled_latents):
    """enable_tiling() at a test size (48x40-pixel tiles) with its own overlaps (1/6 of the height,
    1/5 of the width)."""
    tiled = reference(model, tiled_latents[None], tiling=dict(tile_sample_min_height=48, tile_sample_min_width=40))
    assert (tiled - reference(model, tiled_latents[None])).abs().max() > 0.01  # blending changes the picture
    return tiled


@pytest.mark.parametrize("chunks", [[4], [1, 1, 1, 1]], ids=["whole", "one-per-push"])
def test_blended_tiles_equal_enable_tiling(vae, tiled_latents, tiled_expected, chunks):
    """Each tile replays the calls (2 and 2) with its own caches, and every call's tiles are blended."""
    assert_equal_video(stream_video(vae, tiled_latents, chunks, tile=Blended((6, 5))), tiled_expected)


def test_blended_defaults_are_the_references(vae):
    spec = vae.family_spec
    assert spec.effective_tile(Blended()) == Blended((30, 45))
    tiles = spec.blended_tiles(spec.effective_tile(Blended()))
    assert (tiles.tile, tiles.stride) == ((30, 45), (25, 36))  # 240x360-pixel tiles, blends of 40 and 72 pixels
    stream = StreamDecoder(vae, tile="blended", latent_frames=3)
    stream.start((40, 60))
    assert "blended tiles of 30x45 latent pixels" in stream.plan.describe()


def test_exact_tiles_are_refused(vae):
    with pytest.raises(StreamdecError, match=r"GroupNorm over whole frames, so no tiling can equal .* tile='blended'"):
        StreamDecoder(vae, tile=8)


def test_uneven_blended_overlap_is_refused(vae):
    with pytest.raises(StreamdecError, match="does not split 30x45-pixel tiles evenly"):
        StreamDecoder(vae, tile="blended:0.3")


# ---------------------------------------------------------------------------- offload, memory


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_give_identical_output(layouts, latents, ours, mode):
    offloaded = streamdec.load_vae(layouts["diffusers-folder"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, latents, [2, 3]), ours)


def test_max_vram_plans_keep_the_output(layouts, vae, latents, ours):
    size = SHAPE[-2:]
    block, none = estimate_peak(vae, size, offload="block"), estimate_peak(vae, size, offload="none")
    budget = (block + none) / 2 / memory.PLAN_MARGIN / memory.GIB
    tight = streamdec.load_vae(layouts["diffusers-folder"], device="cpu", max_vram=budget)
    stream = StreamDecoder(tight, latent_frames=SHAPE[1])
    stream.start(size)
    assert (stream.plan.offload, stream.plan.tile) == ("block", None)
    assert torch.equal(stream_video(tight, latents, [1, 4], tile="auto"), ours)


def traced(vae, frames: int, size=SHAPE[-2:]) -> tuple[int, int]:
    """A real CPU decode of `frames` latent frames, pushed one at a time, under a MemoryTrace: its
    peak, and the bytes the stream holds between pushes at the end (caches, pending latents)."""
    trace = MemoryTrace()
    with trace:
        stream = StreamDecoder(vae, latent_frames=frames)
        for _ in range(frames):
            for video in stream.decode_videos(torch.randn(1, vae.latent_channels, 1, *size)):
                to_uint8(video)
                del video
        held = stream.stream.state.nbytes()
        for video in stream.close_videos():
            del video
    return trace.peak, held


@pytest.fixture(scope="module")
def traced5(vae):
    return traced(vae, 5)


def test_memory_does_not_grow_with_the_length(vae, traced5):
    """Only the caches (two frames per causal conv) and one call are held: 5 and 11 latent frames
    (the same first call) peak at exactly the same bytes and hold the same state."""
    (peak5, held5), (peak11, held11) = traced5, traced(vae, 11)
    assert held5 == held11 > 0
    assert peak5 == peak11


def test_estimate_equals_a_real_decode_of_as_many_frames(vae, traced5):
    assert vae.family_spec.steady_latents == 5
    assert estimate_peak(vae, SHAPE[-2:]) - memory.weight_bytes(vae, "none") == traced5[0]


# ---------------------------------------------------------------------------- bad input


def test_missing_tensor_is_named_as_the_file_names_it(model, tmp_path):
    state = sat_state_dict(model)
    del state["decoder.up.0.block.1.conv2.conv.bias"]
    torch.save({"state_dict": state}, tmp_path / "3d-vae.pt")
    with pytest.raises(CheckpointError, match=r"CogVideoX VAE, sat layout\) lacks 1 decoder tensors: "
                                              r"decoder\.up\.0\.block\.1\.conv2\.conv\.bias"):  # fmt: skip
        streamdec.load_vae(tmp_path / "3d-vae.pt", device="cpu")


def test_widths_that_do_not_split_into_norm_groups(tmp_path):
    random_cogvideox(block_out_channels=(8, 8, 16, 16), norm_num_groups=4).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "norm_num_groups": 32}))
    with pytest.raises(CheckpointError, match="do not split into 32 norm groups"):
        streamdec.load_vae(tmp_path / "vae", device="cpu")


def test_cli_info_and_decode(layouts, latents, tmp_path, capsys):
    assert main(["info", str(layouts["sat"])]) == 0
    info = capsys.readouterr().out
    assert "cogvideox" in info and "2 -> 8, 3 -> 9, 4 -> 16" in info  # the reference's own frame counts, not 1 + 4(T-1)
    torch.save(latents, tmp_path / "z.pt")
    out = tmp_path / "out.mkv"
    assert main(["decode", str(tmp_path / "z.pt"), "--vae", str(layouts["diffusers-folder"]), "-o", str(out),
                 "--codec", "ffv1", "--quiet"]) == 0  # fmt: skip
    assert streamdec.decode_to_file(streamdec.load_vae(layouts["diffusers-folder"], device="cpu"), latents,
                                    tmp_path / "api.mkv", codec="ffv1", progress=False) == 17  # fmt: skip
