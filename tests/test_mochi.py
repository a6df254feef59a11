"""Mochi VAE: the carried stream equals diffusers' whole-clip AutoencoderKLMochi.decode (which trims the
first 5 frames at the end) through every load path and chunking; it is not genmo's rule (frames dropped
after each upsampler); tiles are refused (per-frame GroupNorm); memory does not grow with the video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLMochi
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streamdec
from streamdec import memory
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.errors import StreamdecError
from streamdec.families.mochi import MochiConfig, MochiDecoder
from streamdec.frames import to_uint8
from streamdec.memory import MemoryTrace, estimate_peak
from streamdec.stream import StreamDecoder

from helpers.layouts import diffusers_layouts
from helpers.mochi import genmo_rule, genmo_state_dict, random_mochi, reference
from helpers.video import assert_equal_video, stream_video

SHAPE = (12, 4, 3, 5)  # (C, T, h, w) -> 19 frames of 24x40


@pytest.fixture(scope="module")
def model():
    return random_mochi()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(61))


@pytest.fixture(scope="module")
def expected(model, latents):
    return reference(model, latents[None])


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("mochi")
    paths = diffusers_layouts(model, root, "MochiPipeline")
    paths["genmo-decoder"] = root / "decoder.safetensors"  # genmo's weights/decoder.safetensors
    save_file(genmo_state_dict(model), paths["genmo-decoder"])
    paths["comfyui"] = root / "mochi_vae.safetensors"  # genmo's names under decoder. (and the encoder's)
    combined = {f"decoder.{k}": v for k, v in genmo_state_dict(model).items()}
    combined.update({f"encoder.{k}": v.clone().contiguous() for k, v in model.encoder.state_dict().items()})
    save_file(combined, paths["comfyui"])
    return paths


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["genmo-decoder"], device="cpu")


def test_released_sizes():
    """The released decoder: diffusers' names and shapes, 363 M parameters."""
    with torch.device("meta"):
        ours = MochiDecoder(MochiConfig()).state_dict()
        theirs = AutoencoderKLMochi().state_dict()
    decoder_side = {k: tuple(v.shape) for k, v in theirs.items() if k.startswith("decoder.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == decoder_side
    assert round(sum(np.prod(s) for s in decoder_side.values()) / 1e6) == 363


def test_reference_output_is_not_saturated(expected):
    assert expected.shape == (3, 19, 24, 40)
    assert (expected.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize("path", ["live-object", "diffusers-folder", "diffusers-pipeline", "genmo-decoder", "comfyui"])
def test_every_load_path_equals_diffusers(layouts, path, latents, expected):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert (vae.family, vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == ("mochi", 12, 6, 8)
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True))
    assert len(frames) == vae.frames_for(SHAPE[1]) == 19
    assert_equal_video(torch.stack(frames, dim=1), expected)


def test_latent_statistics_come_from_config_json(model, latents, tmp_path):
    """A diffusers folder's own latents_mean / latents_std / scaling_factor de-normalize, as MochiPipeline does."""
    other = random_mochi(latents_mean=tuple(torch.linspace(-0.5, 0.5, 12).tolist()), latents_std=(2.0,) * 12,
                         scaling_factor=0.7)  # fmt: skip
    other.load_state_dict(model.state_dict())
    other.save_pretrained(tmp_path / "vae")
    vae = streamdec.load_vae(tmp_path / "vae", device="cpu")
    assert_equal_video(stream_video(vae, latents, [2, 2]), reference(other, latents[None]))


@pytest.mark.parametrize("chunks", [[1] * 4, [4], [2, 2], [1, 3], [3, 1]], ids=lambda c: "+".join(map(str, c)))
def test_every_chunking_equals_diffusers(vae, latents, expected, chunks):
    assert_equal_video(stream_video(vae, latents, chunks), expected)


@settings(max_examples=5, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SHAPE[1] - 1), max_size=3))
def test_random_chunkings(vae, latents, expected, cuts):
    bounds = [0, *sorted(cuts), SHAPE[1]]
    assert_equal_video(stream_video(vae, latents, [b - a for a, b in zip(bounds, bounds[1:])]), expected)


@pytest.mark.parametrize("frames_per_call, chunks", [(2, [4]), (3, [1, 3]), (4, [4])])
def test_several_latent_frames_per_call(vae, latents, expected, frames_per_call, chunks):
    assert_equal_video(stream_video(vae, latents, chunks, frames_per_call=frames_per_call), expected)


def test_one_latent_frame(model, vae, latents):
    """One latent frame: diffusers makes 6 frames and keeps the last; so does the stream."""
    assert_equal_video(stream_video(vae, latents[:, :1], [1]), reference(model, latents[None, :, :1]))


def test_frames_come_out_as_each_latent_frame_is_pushed(vae, latents):
    stream = StreamDecoder(vae)
    assert [len(stream.push(latents[:, t : t + 1])) for t in range(SHAPE[1])] == [1, 6, 6, 6]
    assert stream.close() == []


def test_uint8_frames_within_one_level(vae, latents, expected):
    frames = np.stack(list(streamdec.decode_frames(vae, latents))).astype(np.int16)
    reference_frames = ((expected + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(frames - reference_frames).max() <= 1


def test_genmo_rule_differs_and_is_not_followed(model, vae, latents, expected):
    """genmo's decoder drops frames after each upsampler instead of 5 at the end: as many frames, but
    its later layers see another first frame, so every frame differs here (most near the start).
    The stream follows diffusers, the reference."""
    genmo = genmo_rule(model, latents[None])
    assert genmo.shape == expected.shape
    per_frame = (genmo - expected).abs().amax(dim=(0, 2, 3))
    assert per_frame[0] > 0.1 and per_frame[:6].min() > per_frame[-1]
    assert (stream_video(vae, latents, [1] * 4) - genmo).abs().max() > 0.1


# ---------------------------------------------------------------------------- tiles, offload, memory


@pytest.mark.parametrize("tile", [4, (3, 4), "blended"])
def test_tiles_are_refused_with_the_reason(vae, tile):
    with pytest.raises(StreamdecError, match="normalizes each frame with GroupNorm over the whole frame, .*tile=None"):
        StreamDecoder(vae, tile=tile)


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_give_identical_output(layouts, vae, latents, mode):
    offloaded = streamdec.load_vae(layouts["genmo-decoder"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, latents, [1, 3]), stream_video(vae, latents, [1, 3]))


def test_max_vram_plans_keep_the_output(layouts, vae, latents):
    size = SHAPE[-2:]
    block, none = estimate_peak(vae, size, offload="block"), estimate_peak(vae, size, offload="none")
    budget = (block + none) / 2 / memory.PLAN_MARGIN / memory.GIB
    tight = streamdec.load_vae(layouts["genmo-decoder"], device="cpu", max_vram=budget)
    stream = StreamDecoder(tight)
    stream.start(size)
    assert (stream.plan.offload, stream.plan.tile) == ("block", None)
    assert torch.equal(stream_video(tight, latents, [2, 2], tile="auto"), stream_video(vae, latents, [2, 2]))


def traced(vae, frames: int) -> tuple[int, int]:
    """A real CPU decode of `frames` latent frames under a MemoryTrace: its peak, and the bytes the
    stream's state holds at the end."""
    trace = MemoryTrace()
    with trace:
        stream = StreamDecoder(vae)
        for _ in range(frames):
            for video in stream.decode_videos(torch.randn(1, vae.latent_channels, 1, *SHAPE[-2:])):
                to_uint8(video)
                del video
        held = stream.stream.state.nbytes()
    return trace.peak, held


def test_memory_does_not_grow_with_the_video(vae):
    """The state is two input frames per causal conv, whatever the length; the peak is the same for
    4 and 12 latent frames, and the estimate (a meta-device run) equals the real decode's."""
    (peak4, held4), (peak12, held12) = traced(vae, 4), traced(vae, 12)
    assert held4 == held12 > 0
    assert peak4 == peak12
    assert estimate_peak(vae, SHAPE[-2:]) - memory.weight_bytes(vae, "none") == peak4


# ---------------------------------------------------------------------------- bad input


def test_latents_of_another_model(vae):
    with pytest.raises(ValueError, match="have 16 channels .* takes 12"):
        streamdec.decode_frames(vae, torch.randn(16, 3, 3, 5))


def test_missing_tensor_is_named_as_the_file_names_it(model, tmp_path):
    state = genmo_state_dict(model)
    del state["blocks.2.blocks.1.stack.3.bias"]
    save_file(state, tmp_path / "decoder.safetensors")
    with pytest.raises(CheckpointError, match=r"Mochi VAE, official layout\) lacks 1 decoder tensors: "
                                              r"blocks\.2\.blocks\.1\.stack\.3\.bias"):  # fmt: skip
        streamdec.load_vae(tmp_path / "decoder.safetensors", device="cpu")


def test_mismatched_shapes(model, tmp_path):
    state = genmo_state_dict(model)
    state["blocks.4.0.stack.5.weight"] = state["blocks.4.0.stack.5.weight"][:, :, :1].contiguous()
    save_file(state, tmp_path / "decoder.safetensors")
    with pytest.raises(CheckpointError, match=r"1 tensors of the wrong shape: blocks\.4\.0\.stack\.5\.weight"):
        streamdec.load_vae(tmp_path / "decoder.safetensors", device="cpu")


def test_another_decoder_shape_is_refused(tmp_path):
    other = random_mochi(temporal_expansions=(1, 2, 2))
    other.save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="upsamples 4x in time .* streamdec decodes the 6x8x8 Mochi VAE"):
        streamdec.load_vae(tmp_path / "vae", device="cpu")


def test_cli_info_and_decode(layouts, latents, tmp_path, capsys):
    assert main(["info", str(layouts["comfyui"])]) == 0
    assert "mochi" in capsys.readouterr().out
    torch.save(latents, tmp_path / "z.pt")
    out = tmp_path / "out.mkv"
    assert main(["decode", str(tmp_path / "z.pt"), "--vae", str(layouts["genmo-decoder"]), "-o", str(out),
                 "--codec", "ffv1", "--quiet"]) == 0  # fmt: skip
    assert streamdec.decode_to_file(streamdec.load_vae(layouts["comfyui"], device="cpu"), latents,
                                    tmp_path / "api.mkv", codec="ffv1", progress=False) == 19  # fmt: skip
