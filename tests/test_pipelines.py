"""diffusers pipelines: a tiny WanPipeline's latents (output_type="latent") streamed through its own
VAE equal the frames the pipeline decodes itself (output_type="np") within one uint8 level."""

from __future__ import annotations

import av
import numpy as np
import pytest

import streamdec
from streamdec import pipelines

from helpers.pipelines import hunyuan_call, tiny_hunyuan_pipeline, tiny_wan_pipeline, wan_call


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def outputs(pipe):
    """The same two-video run, as latents and as the pipeline's own decoded frames."""
    latents = pipe(output_type="latent", **wan_call(num_videos=2)).frames
    video = pipe(output_type="np", **wan_call(num_videos=2)).frames  # (videos, frames, H, W, 3) in [0, 1]
    return latents, (video * 255).round().astype(np.int16)


def test_streamed_frames_equal_the_pipelines_own(pipe, outputs):
    latents, expected = outputs
    assert latents.shape == (2, 16, 3, 6, 8) and expected.shape == (2, 9, 48, 64, 3)
    assert expected.std() > 10  # a real picture, not a flat one
    for i in range(2):
        ours = np.stack(list(pipelines.frames(pipe, latents, video=i))).astype(np.int16)
        assert ours.shape == expected[i].shape and np.abs(ours - expected[i]).max() <= 1


def test_to_file_writes_each_video(pipe, outputs, tmp_path):
    latents, expected = outputs
    assert pipelines.to_file(pipe, latents, tmp_path / "clip.mkv", codec="ffv1", progress=False) == 18
    for name, want in (("clip.mkv", expected[0]), ("clip_1.mkv", expected[1])):
        with av.open(str(tmp_path / name)) as container:
            got = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)
        assert np.abs(got - want).max() <= 1


def test_the_vae_is_loaded_once_per_pipeline(pipe):
    assert pipelines.from_pipeline(pipe) is pipelines.from_pipeline(pipe)
    assert pipelines.from_pipeline(pipe).family == "wan2.1"


def test_a_windowed_familys_pipeline():
    """HunyuanVideo's pipeline decodes in its VAE's overlapping windows; streamed, the same frames."""
    pipe = tiny_hunyuan_pipeline()
    latents = pipe(output_type="latent", **hunyuan_call()).frames
    expected = (pipe(output_type="np", **hunyuan_call()).frames[0] * 255).round().astype(np.int16)
    assert latents.shape[2] == 6 and expected.shape == (21, 32, 48, 3) and expected.std() > 10
    ours = np.stack(list(pipelines.frames(pipe, latents))).astype(np.int16)
    assert np.abs(ours - expected).max() <= 1


def test_bad_input(pipe, outputs):
    with pytest.raises(ValueError, match="has no vae to decode with"):
        pipelines.from_pipeline(object())
    with pytest.raises(ValueError, match="hold 2 videos; there is no video 5"):
        pipelines.frames(pipe, outputs[0], video=5)
    with pytest.raises(ValueError, match="must be a torch tensor"):
        pipelines.frames(pipe, outputs[1])
    assert streamdec.pipelines is pipelines
