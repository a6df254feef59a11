"""KVAE-3D: the replayed calls (5 latent frames, then 4 each, the conv caches carried) equal diffusers'
AutoencoderKLKVAEVideo.decode through every load path (diffusers folder, Kandinsky's own weights,
a live object) and chunking, with the reference's short last call (T = 4k + 2 gives 3 frames fewer);
memory does not grow with the length; offload and max_vram plans change nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLKVAEVideo
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streamdec
from streamdec import memory
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.errors import StreamdecError
from streamdec.families.kvae3d import KVAE3DConfig, KVAE3DDecoder
from streamdec.frames import to_uint8
from streamdec.memory import MemoryTrace, estimate_peak
from streamdec.stream import StreamDecoder

from helpers.kvae3d import official_config, official_state_dict, random_kvae3d, reference
from helpers.video import assert_equal_video, stream_video

SHAPE = (4, 10, 2, 3)  # (C, T, h, w): calls of 5, 4 and 1 latent frames -> 34 frames of 16x24 (not 37)


@pytest.fixture(scope="module")
def model():
    return random_kvae3d()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(71))


@pytest.fixture(scope="module")
def expected(model, latents):
    return reference(model, latents[None])


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("kvae3d")
    paths = {"live-object": model}
    model.save_pretrained(root / "KVAE-3D-1.0" / "diffusers")  # the Hub repository's diffusers/ subfolder
    paths["diffusers-folder"] = root / "KVAE-3D-1.0" / "diffusers"
    official = root / "KVAE-3D-1.0"  # its root: Kandinsky's CachedCausalVAE, saved by PyTorchModelHubMixin
    save_file(official_state_dict(model), official / "model.safetensors")
    (official / "config.json").write_text(json.dumps(official_config(model)))
    paths["official-folder"] = official
    paths["official-file"] = official / "model.safetensors"
    return paths


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["official-folder"], device="cpu")


@pytest.fixture(scope="module")
def ours(vae, latents):
    """The stream's own output, for the bit-identity of offload modes and plans."""
    return stream_video(vae, latents, [SHAPE[1]])


def test_released_sizes():
    """The released decoder: diffusers' names and shapes (368 M parameters)."""
    with torch.device("meta"):
        ours = KVAE3DDecoder(KVAE3DConfig()).state_dict()
        theirs = AutoencoderKLKVAEVideo().state_dict()
    decoder_side = {k: tuple(v.shape) for k, v in theirs.items() if k.startswith("decoder.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == decoder_side
    assert round(sum(np.prod(s) for s in decoder_side.values()) / 1e6) == 368


def test_reference_output_is_not_saturated(expected):
    assert expected.shape == (3, 34, 16, 24)
    assert (expected.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize("path", ["live-object", "diffusers-folder", "official-folder", "official-file"])
def test_every_load_path_equals_diffusers(layouts, path, latents, expected):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert (vae.family, vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == ("kvae3d", 4, 4, 8)
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True))
    assert len(frames) == vae.frames_for(SHAPE[1]) == 34
    assert_equal_video(torch.stack(frames, dim=1), expected)


@pytest.mark.parametrize("chunks", [[1] * 10, [10], [4, 6], [5, 5], [9, 1]], ids=lambda c: "+".join(map(str, c)))
def test_every_chunking_equals_diffusers(vae, latents, expected, chunks):
    assert_equal_video(stream_video(vae, latents, chunks), expected)


@settings(max_examples=3, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SHAPE[1] - 1), max_size=3))
def test_random_chunkings(vae, latents, expected, cuts):
    bounds = [0, *sorted(cuts), SHAPE[1]]
    assert_equal_video(stream_video(vae, latents, [b - a for a, b in zip(bounds, bounds[1:])]), expected)


@pytest.mark.parametrize("length, frames", [(1, 1), (3, 9), (6, 18), (7, 25)])
def test_every_length_equals_diffusers(vae, model, latents, length, frames):
    """One call (1, 3), a last call of one latent frame (6: 18 frames, 3 fewer than 4T - 3) and of two (7)."""
    video = stream_video(vae, latents[:, :length], [length])
    assert video.shape[1] == frames == vae.frames_for(length)
    assert_equal_video(video, reference(model, latents[None, :, :length]))


def test_frames_come_out_as_calls_complete(vae, latents):
    stream = StreamDecoder(vae)
    assert [len(stream.push(latents[:, t : t + 1])) for t in range(SHAPE[1])] == [0, 0, 0, 0, 17, 0, 0, 0, 16, 0]
    assert len(stream.close()) == 1  # the reference's last call of one latent frame: one frame


def test_uint8_frames_within_one_level(vae, latents, expected):
    frames = np.stack(list(streamdec.decode_frames(vae, latents))).astype(np.int16)
    reference_frames = ((expected + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(frames - reference_frames).max() <= 1


@pytest.mark.parametrize(
    "tile, reason", [(8, "it normalizes with GroupNorm over whole frames"), ("blended", "its reference has no tiling")]
)
def test_tiles_are_refused(vae, tile, reason):
    with pytest.raises(StreamdecError, match=f"cannot be decoded in tiles: {reason}.*; use tile=None$"):
        StreamDecoder(vae, tile=tile)


# ---------------------------------------------------------------------------- offload, memory


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_give_identical_output(layouts, latents, ours, mode):
    offloaded = streamdec.load_vae(layouts["official-folder"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, latents, [3, 7]), ours)


def test_max_vram_plans_keep_the_output(layouts, vae, latents, ours):
    size = SHAPE[-2:]
    block, none = estimate_peak(vae, size, offload="block"), estimate_peak(vae, size, offload="none")
    budget = (block + none) / 2 / memory.PLAN_MARGIN / memory.GIB
    tight = streamdec.load_vae(layouts["official-folder"], device="cpu", max_vram=budget)
    stream = StreamDecoder(tight)
    stream.start(size)
    assert (stream.plan.offload, stream.plan.tile) == ("block", None)
    assert torch.equal(stream_video(tight, latents, [1, 9], tile="auto"), ours)


def traced(vae, frames: int, size=SHAPE[-2:]) -> tuple[int, int]:
    """A real CPU decode of `frames` latent frames, pushed one at a time, under a MemoryTrace: its
    peak, and the bytes the stream holds between pushes at the end (caches, pending latents)."""
    trace = MemoryTrace()
    with trace:
        stream = StreamDecoder(vae)
        for _ in range(frames):
            for video in stream.decode_videos(torch.randn(1, vae.latent_channels, 1, *size)):
                to_uint8(video)
                del video
        held = stream.stream.state.nbytes()
        for video in stream.close_videos():
            del video
    return trace.peak, held


@pytest.fixture(scope="module")
def traced9(vae):
    return traced(vae, 9)


def test_memory_does_not_grow_with_the_length(vae, traced9):
    """Only the caches (two frames per causal conv) and one call are held: 9 and 13 latent frames
    (whole calls of 5, then 4) peak at exactly the same bytes and hold the same state."""
    (peak9, held9), (peak13, held13) = traced9, traced(vae, 13)
    assert held9 == held13 > 0
    assert peak9 == peak13


def test_estimate_equals_a_real_decode_of_as_many_frames(vae, traced9):
    assert vae.family_spec.steady_latents == 9
    assert estimate_peak(vae, SHAPE[-2:]) - memory.weight_bytes(vae, "none") == traced9[0]


# ---------------------------------------------------------------------------- bad input


def test_missing_tensor_is_named_as_the_file_names_it(model, tmp_path):
    state = official_state_dict(model)
    del state["decoder.up.1.block.0.norm2.norm_layer.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"KVAE-3D VAE, official layout\) lacks 1 decoder tensors: "
                                              r"decoder\.up\.1\.block\.0\.norm2\.norm_layer\.bias"):  # fmt: skip
        streamdec.load_vae(tmp_path / "model.safetensors", device="cpu")


def test_cogvideox_sat_names_are_not_taken_for_kvae(model, tmp_path):
    """Both write `decoder.mid.block_1`; only KVAE's spatial norms hold a plain `conv_y.weight`."""
    from helpers.cogvideox import random_cogvideox, sat_state_dict

    save_file(sat_state_dict(random_cogvideox()), tmp_path / "sat.safetensors")
    assert streamdec.load_vae(tmp_path / "sat.safetensors", device="cpu").family == "cogvideox"


def test_cli_info_and_decode(layouts, latents, tmp_path, capsys):
    assert main(["info", str(layouts["official-folder"])]) == 0
    info = capsys.readouterr().out
    assert "kvae3d" in info and "5 -> 17, 6 -> 18" in info  # the reference's own frame counts, not 1 + 4(T-1)
    torch.save(latents, tmp_path / "z.pt")
    out = tmp_path / "out.mkv"
    assert main(["decode", str(tmp_path / "z.pt"), "--vae", str(layouts["diffusers-folder"]), "-o", str(out),
                 "--codec", "ffv1", "--quiet"]) == 0  # fmt: skip
    assert streamdec.decode_to_file(streamdec.load_vae(layouts["official-file"], device="cpu"), latents,
                                    tmp_path / "api.mkv", codec="ffv1", progress=False) == 34  # fmt: skip
