"""HunyuanVideo-1.5 VAE: the carried stream (conv caches and the mid attention's keys and values)
equals diffusers' whole-clip AutoencoderKLHunyuanVideo15.decode through every load path and
chunking; exact tiles equal the untiled decode; blended tiles equal enable_tiling(); the keys and
values are the only state that grows, and off the CPU they leave the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo15
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streamdec
from streamdec import memory
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.families.hunyuan15 import Hunyuan15Config, Hunyuan15Decoder, up_path_halo
from streamdec.frames import to_uint8
from streamdec.memory import MemoryTrace, estimate_peak
from streamdec.stream import StreamDecoder
from streamdec.tiling import Blended

from helpers.hunyuan import random_hunyuan
from helpers.hunyuan15 import official_config, official_state_dict, random_hunyuan15, reference
from helpers.layouts import diffusers_layouts
from helpers.memory import meta_peak
from helpers.video import assert_equal_video, stream_video

SHAPE = (8, 6, 3, 5)  # (C, T, h, w) -> 21 frames of 48x80
TILED = (8, 3, 12, 14)  # frames larger than the 8-latent test tiles


@pytest.fixture(scope="module")
def model():
    return random_hunyuan15()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(51))


@pytest.fixture(scope="module")
def expected(model, latents):
    return reference(model, latents[None])


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan15")
    paths = diffusers_layouts(model, root, "HunyuanVideo15Pipeline")
    official = root / "official" / "vae"  # HunyuanVideo-1.5's ckpts/vae: Tencent's names, its own config
    official.mkdir(parents=True)
    save_file(official_state_dict(model), official / "diffusion_pytorch_model.safetensors")
    (official / "config.json").write_text(json.dumps(official_config(model)))
    paths["official-folder"] = official
    paths["single-file"] = root / "hunyuanvideo15_vae.safetensors"  # ComfyUI's: the same names, one file
    save_file(official_state_dict(model), paths["single-file"])
    return paths


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["official-folder"], device="cpu")


def test_released_sizes():
    """The released decoder: diffusers' names and shapes, 871 M parameters, a 14-latent-pixel halo."""
    with torch.device("meta"):
        ours = Hunyuan15Decoder(Hunyuan15Config()).state_dict()
        theirs = AutoencoderKLHunyuanVideo15().state_dict()
    decoder_side = {k: tuple(v.shape) for k, v in theirs.items() if k.startswith("decoder.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == decoder_side
    assert round(sum(np.prod(s) for s in decoder_side.values()) / 1e6) == 871
    assert up_path_halo(Hunyuan15Config()) == 14


def test_reference_output_is_not_saturated(expected):
    assert expected.shape == (3, 21, 48, 80)
    assert (expected.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize("path", ["live-object", "diffusers-folder", "diffusers-pipeline", "official-folder", "single-file"])
def test_every_load_path_equals_diffusers(layouts, path, latents, expected):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert (vae.family, vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == ("hunyuanvideo1.5", 8, 4, 16)
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True))
    assert len(frames) == vae.frames_for(SHAPE[1]) == 21
    assert_equal_video(torch.stack(frames, dim=1), expected)


def test_comfyui_half_precision_single_file(model, latents, tmp_path):
    """ComfyUI ships the VAE in fp16; decoded in fp32 it equals diffusers on the same rounded weights."""
    half = {k: v.half() for k, v in official_state_dict(model).items()}
    save_file(half, tmp_path / "hunyuanvideo15_vae_fp16.safetensors")
    rounded = random_hunyuan15()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    vae = streamdec.load_vae(tmp_path / "hunyuanvideo15_vae_fp16.safetensors", device="cpu")
    assert vae.stored_dtype == torch.float16
    assert_equal_video(stream_video(vae, latents, [6]), reference(rounded, latents[None]))


@pytest.mark.parametrize("chunks", [[1] * 6, [6], [2, 4], [5, 1]], ids=lambda c: "+".join(map(str, c)))
def test_every_chunking_equals_diffusers(vae, latents, expected, chunks):
    assert_equal_video(stream_video(vae, latents, chunks), expected)


@settings(max_examples=6, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SHAPE[1] - 1), max_size=4))
def test_random_chunkings(vae, latents, expected, cuts):
    bounds = [0, *sorted(cuts), SHAPE[1]]
    assert_equal_video(stream_video(vae, latents, [b - a for a, b in zip(bounds, bounds[1:])]), expected)


@pytest.mark.parametrize("frames_per_call, chunks", [(2, [6]), (3, [1, 5]), (6, [6])])
def test_several_latent_frames_per_call(vae, latents, expected, frames_per_call, chunks):
    assert_equal_video(stream_video(vae, latents, chunks, frames_per_call=frames_per_call), expected)


def test_attention_is_frame_causal(model, vae, latents, expected):
    """Not vacuous: the attention sees earlier frames (dropping them changes the output), and no later
    ones (a frame's output does not change when later latents do)."""
    changed = latents.clone()
    changed[:, 3:] = torch.randn_like(changed[:, 3:])
    other = reference(model, changed[None])
    assert (other[:, :9] - expected[:, :9]).abs().max() < 1e-4  # frames of latents 0-2 do not see latent 3
    assert (other[:, 9:] - expected[:, 9:]).abs().max() > 0.01
    stream = StreamDecoder(vae, as_tensor=True)
    first = torch.stack(stream.push(latents[:, :3]), dim=1)
    assert_equal_video(first, expected[:, :9])  # final as soon as decoded: nothing waits for later latents


def test_frames_come_out_as_each_latent_frame_is_pushed(vae, latents):
    stream = StreamDecoder(vae)
    assert [len(stream.push(latents[:, t : t + 1])) for t in range(SHAPE[1])] == [1, 4, 4, 4, 4, 4]
    assert stream.close() == []


def test_uint8_frames_within_one_level(vae, latents, expected):
    frames = np.stack(list(streamdec.decode_frames(vae, latents))).astype(np.int16)
    reference_frames = ((expected + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(frames - reference_frames).max() <= 1


# ---------------------------------------------------------------------------- tiles


@pytest.fixture(scope="module")
def tiled_latents():
    return torch.randn(TILED, generator=torch.Generator().manual_seed(52))


@pytest.fixture(scope="module")
def untiled(vae, tiled_latents):
    return stream_video(vae, tiled_latents, [3])


def test_untiled_large_frame_equals_diffusers(model, tiled_latents, untiled):
    assert_equal_video(untiled, reference(model, tiled_latents[None]))


@pytest.mark.parametrize("tile, chunks", [(5, [1, 2]), ((4, 6), [3]), ((12, 7), [1, 1, 1]), (32, [2, 1])],
                         ids=["5", "4x6", "12x7", "larger-than-frame"])  # fmt: skip
def test_exact_tiles_equal_untiled(vae, tiled_latents, untiled, tile, chunks):
    assert_equal_video(stream_video(vae, tiled_latents, chunks, tile=tile), untiled)


def test_a_smaller_halo_would_show(vae, tiled_latents, untiled, monkeypatch):
    """Not vacuous: with the halo cut short the tiles differ. The far edge of the reach weighs
    little in this random network (a halo 1 short errs by ~1e-6), so 3 short is what the equality
    tests' 1e-4 can see."""
    monkeypatch.setattr(vae.decoder, "local_halo", vae.decoder.local_halo - 1)
    assert (stream_video(vae, tiled_latents, [3], tile=4) - untiled).abs().max() > 0
    monkeypatch.setattr(vae.decoder, "local_halo", vae.decoder.local_halo - 2)
    assert (stream_video(vae, tiled_latents, [3], tile=4) - untiled).abs().max() > 1e-4


@pytest.mark.parametrize("overlap", [0.25, 0.125], ids=["enable_tiling", "official-pipeline"])
@pytest.mark.parametrize("chunks", [[3], [1, 1, 1]], ids=["whole", "one-per-push"])
def test_blended_tiles_equal_enable_tiling(model, vae, tiled_latents, untiled, overlap, chunks):
    """diffusers' enable_tiling() at a test size (128-pixel tiles: 8 latents) and the given overlap."""
    tiling = dict(tile_sample_min_height=128, tile_sample_min_width=128, tile_latent_min_height=8,
                  tile_latent_min_width=8, tile_overlap_factor=overlap)  # fmt: skip
    expected = reference(model, tiled_latents[None], tiling=tiling)
    assert (expected - untiled).abs().max() > 0.01  # blending does change the picture
    assert_equal_video(stream_video(vae, tiled_latents, chunks, tile=Blended((8, 8), overlap)), expected)


def test_blended_defaults_are_the_references(vae):
    assert vae.family_spec.effective_tile(Blended()) == Blended((16, 16), 0.25)
    assert vae.family_spec.effective_tile(Blended(overlap=0.125)) == Blended((16, 16), 0.125)
    stream = StreamDecoder(vae, tile="blended:0.125")
    stream.start((20, 30))
    assert stream.plan.tile == Blended((16, 16), 0.125)
    assert "blended tiles of 16x16 latent pixels, overlap 0.125" in stream.plan.describe()


@pytest.mark.parametrize("bad, message", [(Blended(overlap=0.3), "does not split 16x16-pixel tiles evenly"),
                                          (Blended(overlap=1.5), "does not split"), ("blended:x", "tile must be")])  # fmt: skip
def test_bad_blended_tiles(vae, bad, message):
    with pytest.raises(ValueError, match=message):
        StreamDecoder(vae, tile=bad)


# ---------------------------------------------------------------------------- offload, memory


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_give_identical_output(layouts, vae, latents, mode):
    offloaded = streamdec.load_vae(layouts["official-folder"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, latents, [2, 4]), stream_video(vae, latents, [2, 4]))


def test_max_vram_plans_keep_the_output(layouts, vae, latents):
    size = SHAPE[-2:]
    block, none = estimate_peak(vae, size, offload="block"), estimate_peak(vae, size, offload="none")
    budget = (block + none) / 2 / memory.PLAN_MARGIN / memory.GIB
    tight = streamdec.load_vae(layouts["official-folder"], device="cpu", max_vram=budget)
    stream = StreamDecoder(tight)
    stream.start(size)
    assert (stream.plan.offload, stream.plan.tile) == ("block", None)
    assert torch.equal(stream_video(tight, latents, [1, 5], tile="auto"), stream_video(vae, latents, [1, 5]))


def traced(vae, frames: int, size=SHAPE[-2:]) -> tuple[int, int]:
    """A real CPU decode of `frames` latent frames under a MemoryTrace: its peak, and the bytes held
    at the end (the stream's state) before close."""
    trace = MemoryTrace()
    with trace:
        stream = StreamDecoder(vae)
        for _ in range(frames):
            for video in stream.decode_videos(torch.randn(1, vae.latent_channels, 1, *size)):
                to_uint8(video)
                del video
        held = stream.stream.state.nbytes()
    return trace.peak, held


def test_only_the_keys_and_values_grow(vae):
    """On the CPU (nothing to park on) a longer video holds exactly its keys and values more: two
    tensors of tokens x channels (fp32 here) per latent frame; nothing else grows."""
    tokens, channels = SHAPE[2] * SHAPE[3], vae.config.block_out_channels[-1]
    per_frame = 2 * tokens * channels * 4
    (peak4, held4), (peak10, held10) = traced(vae, 4), traced(vae, 10)
    assert held10 - held4 == 6 * per_frame
    assert peak10 - peak4 == 6 * per_frame


def test_off_the_cpu_the_device_stays_flat(vae):
    """Parked on the host (what happens on a GPU), the keys and values leave the device: the device
    peak is the same for 4 and 12 latent frames. Not parked, it grows by them."""
    assert meta_peak(vae, 4, SHAPE[-2:], park=True) == meta_peak(vae, 12, SHAPE[-2:], park=True)
    assert meta_peak(vae, 12, SHAPE[-2:], park=False) > meta_peak(vae, 4, SHAPE[-2:], park=False)


def test_estimate_equals_a_real_decode_of_as_many_frames(vae):
    estimated = estimate_peak(vae, SHAPE[-2:]) - memory.weight_bytes(vae, "none")
    assert estimated == traced(vae, vae.family_spec.steady_latents)[0]


@pytest.mark.cuda
def test_cuda_keys_and_values_wait_on_the_host(layouts, latents, expected):
    vae = streamdec.load_vae(layouts["official-folder"], device="cuda")
    stream = StreamDecoder(vae, as_tensor=True)
    frames = stream.push(latents[:, :4])
    kept = [t for blocks in stream.stream.state.kept.values() for block in blocks for t in block]
    assert kept and all(t.device.type == "cpu" and t.is_pinned() for t in kept)
    video = torch.stack(frames + stream.push(latents[:, 4:]) + stream.close(), dim=1)
    assert_equal_video(video, expected)


# ---------------------------------------------------------------------------- bad input


def test_detection_tells_the_versions_apart(layouts, tmp_path):
    v1 = random_hunyuan()
    v1.save_pretrained(tmp_path / "v1")
    assert streamdec.load_vae(tmp_path / "v1", device="cpu").family == "hunyuanvideo"
    assert streamdec.load_vae(layouts["diffusers-folder"], device="cpu").family == "hunyuanvideo1.5"


def test_latents_of_another_model(vae):
    with pytest.raises(ValueError, match="have 16 channels .* takes 8"):
        streamdec.decode_frames(vae, torch.randn(16, 3, 3, 5))


def test_missing_tensor_is_named_as_the_file_names_it(model, tmp_path):
    state = official_state_dict(model)
    del state["decoder.mid.attn_1.k.bias"]
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"HunyuanVideo-1.5 VAE, official layout\) lacks 1 decoder tensors: "
                                              r"decoder\.mid\.attn_1\.k\.bias"):  # fmt: skip
        streamdec.load_vae(tmp_path / "vae.safetensors", device="cpu")


def test_mismatched_shapes(model, tmp_path):
    state = official_state_dict(model)
    state["decoder.up.0.block.1.conv2.conv.weight"] = state["decoder.up.0.block.1.conv2.conv.weight"][:, :, :1].contiguous()
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"1 tensors of the wrong shape: decoder\.up\.0\.block\.1\.conv2\.conv\.weight"):
        streamdec.load_vae(tmp_path / "vae.safetensors", device="cpu")


def test_cli_info_and_decode(layouts, latents, tmp_path, capsys):
    assert main(["info", str(layouts["official-folder"])]) == 0
    assert "hunyuanvideo1.5" in capsys.readouterr().out
    torch.save(latents, tmp_path / "z.pt")
    out = tmp_path / "out.mkv"
    assert main(["decode", str(tmp_path / "z.pt"), "--vae", str(layouts["single-file"]), "-o", str(out),
                 "--codec", "ffv1", "--tile", "2", "--quiet"]) == 0  # fmt: skip
    assert streamdec.decode_to_file(streamdec.load_vae(layouts["single-file"], device="cpu"), latents,
                                    tmp_path / "api.mkv", codec="ffv1", progress=False) == 21  # fmt: skip
