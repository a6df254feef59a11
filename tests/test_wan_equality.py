"""The core promise: streamdec's Wan 2.1 decode equals diffusers' AutoencoderKLWan.decode, through
every load path and every chunking of the latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streamdec

from helpers.video import assert_equal_video, stream_video
from helpers.wan import LATENT_SHAPE, LOAD_PATHS, denormalize, official_state_dict, random_wan, reference_decode


def test_reference_output_is_not_saturated(reference_video):
    # Otherwise the clamp would hide differences and the equality tests would prove little.
    assert (reference_video.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize("path", LOAD_PATHS)
def test_every_load_path_equals_diffusers(path, checkpoints, latents, reference_video):
    vae = streamdec.load_vae(checkpoints[path], device="cpu")
    assert vae.family == "wan2.1"
    assert (vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == (16, 4, 8)
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True))
    assert len(frames) == 1 + 4 * (LATENT_SHAPE[1] - 1)
    assert_equal_video(torch.stack(frames, dim=1), reference_video[0])


@pytest.fixture(scope="module")
def vae(checkpoints):
    return streamdec.load_vae(checkpoints["official-pth"], device="cpu")


@pytest.mark.parametrize(
    "chunks", [[1, 1, 1, 1, 1], [5], [2, 3], [1, 4], [3, 1, 1], [4, 1]], ids=lambda c: "+".join(map(str, c))
)
def test_every_chunking_equals_diffusers(vae, latents, reference_video, chunks):
    assert_equal_video(stream_video(vae, latents, chunks), reference_video[0])


@settings(max_examples=12, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=LATENT_SHAPE[1] - 1)))
def test_random_chunkings_equal_diffusers(vae, latents, reference_video, cuts):
    bounds = [0, *sorted(cuts), LATENT_SHAPE[1]]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    assert_equal_video(stream_video(vae, latents, chunks), reference_video[0])


@pytest.mark.parametrize("frames_per_call, chunks", [(2, [5]), (3, [2, 3]), (5, [1, 4]), (8, [5])])
def test_several_latent_frames_per_call_equal_diffusers(vae, latents, reference_video, frames_per_call, chunks):
    assert_equal_video(stream_video(vae, latents, chunks, frames_per_call=frames_per_call), reference_video[0])
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True, frames_per_call=frames_per_call, tile=(3, 4)))
    assert_equal_video(torch.stack(frames, dim=1), reference_video[0])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_frames_per_call(vae, bad):
    with pytest.raises(ValueError, match="frames_per_call must be a whole number of latent frames, 1 or more"):
        streamdec.StreamDecoder(vae, frames_per_call=bad)


def test_chunk_of_batch_shape_and_numpy_chunks(vae, latents, reference_video):
    decoder = streamdec.StreamDecoder(vae, as_tensor=True)
    frames = decoder.push(latents[None, :, :2]) + decoder.push(latents[:, 2:].numpy()) + decoder.close()
    assert_equal_video(torch.stack(frames, dim=1), reference_video[0])


def test_uint8_frames_within_one_level(vae, latents, reference_video):
    frames = list(streamdec.decode_frames(vae, latents))
    assert all(f.dtype == np.uint8 and f.shape == (40, 56, 3) for f in frames)
    ours = np.stack(frames).astype(np.int16)
    reference = ((reference_video[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(ours - reference).max() <= 1


def test_raw_latents_equal_diffusers_decode(vae, wan_model, latents, reference_video):
    raw = denormalize(wan_model, latents[None])
    ours = stream_video(vae, raw[0], [2, 3], normalized=False)
    assert_equal_video(ours, reference_video[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_comfyui_half_precision_single_file(wan_model, latents, tmp_path, dtype):
    """ComfyUI's wan_2.1_vae.safetensors: official names, stored in half precision. Decoded in
    fp32 it equals diffusers run on the same rounded weights."""
    official = {k: v.to(dtype).contiguous() for k, v in official_state_dict(wan_model).items()}
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file(official, path)
    rounded = random_wan()
    rounded.load_state_dict({k: v.to(dtype).float() for k, v in wan_model.state_dict().items()})
    reference = reference_decode(rounded, denormalize(rounded, latents[None]))
    vae = streamdec.load_vae(path, device="cpu")
    assert vae.stored_dtype == dtype and vae.dtype == torch.float32
    assert_equal_video(stream_video(vae, latents, [5]), reference[0])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_decode_is_close(checkpoints, latents, reference_video, dtype):
    vae = streamdec.load_vae(checkpoints["official-pth"], device="cpu", dtype=dtype)
    assert next(vae.decoder.parameters()).dtype == vae.dtype
    ours = stream_video(vae, latents, [1, 4])
    # Half precision is not exact; it must stay close (a wrong norm or cast gives errors near 1).
    assert (ours - reference_video[0]).abs().mean() < 0.03


def test_other_widths_and_block_counts(latents, tmp_path):
    """Sizes are read off the tensors, so other widths and depths load from a bare .pth."""
    model = random_wan(base_dim=12, seed=3, num_res_blocks=1)
    torch.save(official_state_dict(model), tmp_path / "vae.pth")
    vae = streamdec.load_vae(tmp_path / "vae.pth", device="cpu")
    assert vae.config.base_dim == 12 and vae.config.num_res_blocks == 1
    reference = reference_decode(model, denormalize(model, latents[None]))
    assert_equal_video(stream_video(vae, latents, [1, 2, 2]), reference[0])


@pytest.mark.cuda
def test_cuda_equals_diffusers(checkpoints, latents, reference_video):
    vae = streamdec.load_vae(checkpoints["official-pth"], device="cuda")
    frames = list(streamdec.decode_frames(vae, latents.cuda(), as_tensor=True))
    assert frames[0].device.type == "cpu"
    assert_equal_video(torch.stack(frames, dim=1), reference_video[0])
