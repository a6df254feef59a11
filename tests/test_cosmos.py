"""Cosmos tokenizer CV8x8x8: the carried stream (conv caches and the temporal attention's keys and values)
equals diffusers' whole-clip AutoencoderKLCosmos.decode through every load path and chunking, one
latent frame per push included (the reference's upsampler doubles time only in calls of several
frames); tiles are refused; the keys and values are the only state that grows, and off the CPU they
leave the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCosmos
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streamdec
from streamdec import memory
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.errors import StreamdecError
from streamdec.families.cosmos import CosmosConfig, CosmosDecoder
from streamdec.frames import to_uint8
from streamdec.memory import MemoryTrace, estimate_peak
from streamdec.stream import StreamDecoder

from helpers.cosmos import converted_name, official_state_dict, random_cosmos, reference
from helpers.layouts import diffusers_layouts
from helpers.memory import meta_peak
from helpers.video import assert_equal_video, stream_video

SHAPE = (16, 4, 3, 5)  # (C, T, h, w) -> 25 frames of 24x40


@pytest.fixture(scope="module")
def model():
    return random_cosmos()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(71))


@pytest.fixture(scope="module")
def expected(model, latents):
    return reference(model, latents[None])


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cosmos")
    paths = diffusers_layouts(model, root, "CosmosTextToWorldPipeline")
    paths["nvidia-safetensors"] = root / "autoencoder.safetensors"  # autoencoder.jit's state dict, saved
    save_file(official_state_dict(model), paths["nvidia-safetensors"])
    paths["nvidia-pt"] = root / "autoencoder.pt"
    torch.save(official_state_dict(model), paths["nvidia-pt"])
    return paths


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["nvidia-safetensors"], device="cpu")


def test_released_sizes():
    """The released decoder: diffusers' names and shapes (post_quant_conv and decoder), 63 M parameters."""
    with torch.device("meta"):
        ours = CosmosDecoder(CosmosConfig()).state_dict()
        theirs = AutoencoderKLCosmos().state_dict()
    decoder_side = {k: tuple(v.shape) for k, v in theirs.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert {k: tuple(v.shape) for k, v in ours.items()} == decoder_side
    assert round(sum(np.prod(s) for s in decoder_side.values()) / 1e6) == 63


def test_official_names_are_what_diffusers_converts(model):
    state = model.state_dict()
    official = official_state_dict(model)
    decoder_side = [k for k in official if k.startswith(("decoder.", "post_quant_conv.")) and "unpatcher" not in k]
    assert sorted(converted_name(k) for k in decoder_side) == sorted(
        k for k in state if k.startswith(("decoder.", "post_quant_conv."))
    )


def test_reference_output_is_not_saturated(expected):
    assert expected.shape == (3, 25, 24, 40)
    assert (expected.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize(
    "path", ["live-object", "diffusers-folder", "diffusers-pipeline", "nvidia-safetensors", "nvidia-pt"]
)
def test_every_load_path_equals_diffusers(layouts, path, latents, expected):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert (vae.family, vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == ("cosmos", 16, 8, 8)
    frames = list(streamdec.decode_frames(vae, latents, normalized=False, as_tensor=True))
    assert len(frames) == vae.frames_for(SHAPE[1]) == 25
    assert_equal_video(torch.stack(frames, dim=1), expected)


def test_normalized_latents_as_the_pipeline_denormalizes_them(model, layouts, latents):
    """The released statistics are per channel and latent frame (16 x 16); the pipeline divides the std
    by its scheduler's sigma_data (0.5). Chunked, each chunk takes its own frames' statistics."""
    vae = streamdec.load_vae(layouts["diffusers-folder"], device="cpu")
    assert_equal_video(stream_video(vae, latents, [1, 3]), reference(model, latents[None], normalized=True))


def test_statistics_cover_16_latent_frames(layouts):
    stream = StreamDecoder(streamdec.load_vae(layouts["diffusers-folder"], device="cpu"))
    stream.push(torch.randn(16, 16, 1, 1))
    with pytest.raises(
        StreamdecError, match="statistics cover 16 latent frames, .* latent frame 17; .*normalized=False"
    ):
        stream.push(torch.randn(16, 1, 1, 1))


@pytest.mark.parametrize("chunks", [[1] * 4, [4], [2, 2], [1, 3], [3, 1]], ids=lambda c: "+".join(map(str, c)))
def test_every_chunking_equals_diffusers(vae, latents, expected, chunks):
    assert_equal_video(stream_video(vae, latents, chunks, normalized=False), expected)


@settings(max_examples=5, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SHAPE[1] - 1), max_size=3))
def test_random_chunkings(vae, latents, expected, cuts):
    bounds = [0, *sorted(cuts), SHAPE[1]]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    assert_equal_video(stream_video(vae, latents, chunks, normalized=False), expected)


@pytest.mark.parametrize("frames_per_call, chunks", [(2, [4]), (3, [1, 3]), (4, [4])])
def test_several_latent_frames_per_call(vae, latents, expected, frames_per_call, chunks):
    assert_equal_video(stream_video(vae, latents, chunks, normalized=False, frames_per_call=frames_per_call), expected)


def test_one_latent_frame(model, vae, latents):
    """One latent frame: the reference's upsampler leaves a one-frame call alone, and the unpatch keeps 1 of 4."""
    assert_equal_video(stream_video(vae, latents[:, :1], [1], normalized=False), reference(model, latents[None, :, :1]))


def test_single_frame_calls_would_differ_in_the_reference(model, latents, expected):
    """Not vacuous: diffusers itself, fed one latent frame per call, would not double time after the first."""
    with torch.no_grad():
        first = model.decode(latents[None, :, :1]).sample
        second = model.decode(latents[None, :, 1:2]).sample
    assert first.shape[2] == second.shape[2] == 1  # 8 frames expected for the second latent frame


def test_temporal_attention_is_causal_and_not_vacuous(model, vae, latents, expected):
    changed = latents.clone()
    changed[:, 2:] = torch.randn_like(changed[:, 2:])
    other = reference(model, changed[None])
    assert (other[:, :9] - expected[:, :9]).abs().max() < 1e-4  # frames of latents 0-1 do not see latent 2
    assert (other[:, 9:] - expected[:, 9:]).abs().max() > 0.01
    stream = StreamDecoder(vae, normalized=False, as_tensor=True)
    assert_equal_video(torch.stack(stream.push(latents[:, :2]), dim=1), expected[:, :9])  # final when decoded


def test_up_blocks_that_attend(latents):
    """A decoder with attention in its first up block too (attention_resolutions=(64,)): each of those
    temporal attentions keeps its own keys and values."""
    model = random_cosmos(seed=3, attention_resolutions=(64,))
    assert len(model.decoder.up_blocks[0].temp_attentions) == 2
    vae = streamdec.load_vae(model, device="cpu")
    z = latents[:, :3, :2, :3]
    assert_equal_video(stream_video(vae, z, [1, 1, 1], normalized=False), reference(model, z[None]))


def test_frames_come_out_as_each_latent_frame_is_pushed(vae, latents):
    stream = StreamDecoder(vae, normalized=False)
    assert [len(stream.push(latents[:, t : t + 1])) for t in range(SHAPE[1])] == [1, 8, 8, 8]
    assert stream.close() == []


def test_uint8_frames_within_one_level(vae, latents, expected):
    frames = np.stack(list(streamdec.decode_frames(vae, latents, normalized=False))).astype(np.int16)
    reference_frames = ((expected + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(frames - reference_frames).max() <= 1


# ---------------------------------------------------------------------------- tiles, offload, memory


@pytest.mark.parametrize("tile", [4, (3, 4), "blended"])
def test_tiles_are_refused_with_the_reason(vae, tile):
    with pytest.raises(StreamdecError, match="normalizes each frame over the whole frame .*tile=None"):
        StreamDecoder(vae, tile=tile)


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_give_identical_output(layouts, vae, latents, mode):
    offloaded = streamdec.load_vae(layouts["nvidia-safetensors"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, latents, [1, 3], normalized=False),
                       stream_video(vae, latents, [1, 3], normalized=False))  # fmt: skip


def test_max_vram_plans_keep_the_output(layouts, vae, latents):
    size = SHAPE[-2:]
    block, none = estimate_peak(vae, size, offload="block"), estimate_peak(vae, size, offload="none")
    budget = (block + none) / 2 / memory.PLAN_MARGIN / memory.GIB
    tight = streamdec.load_vae(layouts["nvidia-safetensors"], device="cpu", max_vram=budget)
    stream = StreamDecoder(tight)
    stream.start(size)
    assert (stream.plan.offload, stream.plan.tile) == ("block", None)
    assert torch.equal(stream_video(tight, latents, [2, 2], tile="auto", normalized=False),
                       stream_video(vae, latents, [2, 2], normalized=False))  # fmt: skip


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


def test_only_the_keys_and_values_grow(vae):
    """On the CPU (nothing to park on) a longer video holds exactly its keys and values more: two
    tensors of pixels x channels (fp32 here) per latent frame; nothing else grows."""
    per_frame = 2 * SHAPE[2] * SHAPE[3] * vae.config.width * 4
    (peak4, held4), (peak10, held10) = traced(vae, 4), traced(vae, 10)
    assert held10 - held4 == 6 * per_frame
    assert peak10 - peak4 == 6 * per_frame


def test_off_the_cpu_the_device_stays_flat(vae):
    assert meta_peak(vae, 4, SHAPE[-2:], park=True) == meta_peak(vae, 12, SHAPE[-2:], park=True)
    assert meta_peak(vae, 12, SHAPE[-2:], park=False) > meta_peak(vae, 4, SHAPE[-2:], park=False)


def test_estimate_equals_a_real_decode_of_as_many_frames(vae):
    estimated = estimate_peak(vae, SHAPE[-2:]) - memory.weight_bytes(vae, "none")
    assert estimated == traced(vae, vae.family_spec.steady_latents)[0]


@pytest.mark.cuda
def test_cuda_keys_and_values_wait_on_the_host(layouts, latents, expected):
    vae = streamdec.load_vae(layouts["nvidia-safetensors"], device="cuda")
    stream = StreamDecoder(vae, normalized=False, as_tensor=True)
    frames = stream.push(latents[:, :2])
    kept = [t for blocks in stream.stream.state.kept.values() for block in blocks for t in block]
    assert kept and all(t.device.type == "cpu" and t.is_pinned() for t in kept)
    video = torch.stack(frames + stream.push(latents[:, 2:]) + stream.close(), dim=1)
    assert_equal_video(video, expected)


# ---------------------------------------------------------------------------- bad input


def test_latents_of_another_model(vae):
    with pytest.raises(ValueError, match="have 12 channels .* takes 16"):
        streamdec.decode_frames(vae, torch.randn(12, 3, 3, 5))


def test_missing_tensor_is_named_as_the_file_names_it(model, tmp_path):
    state = official_state_dict(model)
    del state["decoder.up.1.upsample.conv1.conv3d.bias"]
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"official layout\) lacks 1 decoder tensors: "
                                              r"decoder\.up\.1\.upsample\.conv1\.conv3d\.bias"):  # fmt: skip
        streamdec.load_vae(tmp_path / "vae.safetensors", device="cpu")


def test_mismatched_shapes(model, tmp_path):
    state = official_state_dict(model)
    key = "decoder.mid.attn_1.1.q.conv3d.weight"
    state[key] = state[key][:, :4].contiguous()
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(
        CheckpointError, match=r"1 tensors of the wrong shape: decoder\.mid\.attn_1\.1\.q\.conv3d\.weight"
    ):
        streamdec.load_vae(tmp_path / "vae.safetensors", device="cpu")


def test_another_tokenizer_is_refused(tmp_path):
    other = random_cosmos(temporal_compression_ratio=4)  # CV4x8x8
    other.save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="upsamples 4x in time and 8x in space; .*CV8x8x8"):
        streamdec.load_vae(tmp_path / "vae", device="cpu")


def test_cli_info_and_decode(layouts, latents, tmp_path, capsys):
    assert main(["info", str(layouts["nvidia-pt"])]) == 0
    assert "cosmos" in capsys.readouterr().out
    torch.save(latents, tmp_path / "z.pt")
    assert main(["decode", str(tmp_path / "z.pt"), "--vae", str(layouts["diffusers-folder"]), "-o",
                 str(tmp_path / "out.mkv"), "--codec", "ffv1", "--quiet"]) == 0  # fmt: skip
    assert streamdec.decode_to_file(streamdec.load_vae(layouts["nvidia-pt"], device="cpu"), latents,
                                    tmp_path / "api.mkv", codec="ffv1", progress=False) == 25  # fmt: skip
