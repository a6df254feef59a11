"""Wan 2.2 (TI2V-5B) VAE: the released checkpoint's layout, and streamdec's decode equal to
diffusers' AutoencoderKLWan(is_residual=True).decode through every load path, every chunking,
tiled and offloaded."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from hypothesis import given, settings
from hypothesis import strategies as st

import streamdec
from streamdec.checkpoints import CheckpointError
from streamdec.families.wan import WAN22, WanDecoder, config_from_shapes, diffusers_to_official, official_to_diffusers

from helpers.video import assert_equal_video, stream_video
from helpers.wan import (
    DATA,
    LOAD_PATHS,
    WAN22_STATS,
    denormalize,
    official_state_dict,
    random_wan,
    reference_decode,
    save_layouts,
    wan22_config,
)

SHAPE = (48, 5, 3, 5)  # (C, T, h, w) -> 17 frames of 48x80


def released_shapes() -> dict[str, tuple[int, ...]]:
    """The 196 tensors of the released Wan2.2_VAE.pth, with their shapes."""
    shapes = {}
    for line in (DATA / "wan22_keys.txt").read_text().splitlines():
        name, shape = line.split("\t")
        shapes[name] = tuple(int(s) for s in shape.strip("[]").split(","))
    return shapes


@pytest.fixture(scope="module")
def model():
    return random_wan(version="2.2", seed=5)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def reference(model, latents):
    return reference_decode(model, denormalize(model, latents[None]))[0]


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    return save_layouts(model, tmp_path_factory.mktemp("wan22"), "Wan2.2_VAE", "WanImageToVideoPipeline")


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["official-pth"], device="cpu")


# ---------------------------------------------------------------------------- layout


def test_released_checkpoint_keys_map_onto_the_decoder():
    """The 110 decoder-side tensors of the released 196-tensor Wan2.2_VAE.pth, shapes included,
    are exactly the released-size decoder's; its sizes are read back off them."""
    official = released_shapes()
    assert len(official) == 196
    renames = official_to_diffusers(official)
    assert len(renames) == 110
    with torch.device("meta"):
        decoder = WanDecoder(WAN22)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert {new: official[old] for old, new in renames.items()} == expected
    assert diffusers_to_official(expected.keys()) == {v: k for k, v in renames.items()}
    assert config_from_shapes(expected, WAN22.latents_mean, WAN22.latents_std) == WAN22
    assert sum(v.numel() for v in decoder.state_dict().values()) == pytest.approx(555e6, rel=0.01)
    assert decoder.local_halo == 13


def test_official_fixture_is_the_released_layout():
    """Our official-layout writer, applied to a released-size diffusers model, gives the released
    checkpoint's 196 names and shapes (encoder included), so the test files are realistic."""
    with torch.device("meta"):
        model = AutoencoderKLWan(**{**wan22_config(160), "decoder_base_dim": 256})
    assert {k: tuple(v.shape) for k, v in official_state_dict(model).items()} == released_shapes()


@pytest.mark.parametrize("path", ["official-pth", "diffusers-folder", "live-object"])
def test_detected_as_wan22(layouts, path):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert vae.family == "wan2.2"
    assert (vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == (48, 4, 16)
    assert vae.config.residual and vae.config.patch_size == 2
    # without a config (a bare .pth), the released latent statistics apply
    assert vae.latents_mean.flatten().tolist() == pytest.approx(WAN22_STATS["latents_mean"])
    assert vae.latents_std.flatten().tolist() == pytest.approx(WAN22_STATS["latents_std"])


def test_missing_tensor_named_in_the_nested_layout(model, tmp_path):
    state = official_state_dict(model)
    del state["decoder.upsamples.1.upsamples.3.time_conv.weight"], state["decoder.upsamples.2.upsamples.1.residual.2.bias"]
    torch.save(state, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError) as err:
        streamdec.load_vae(tmp_path / "vae.pth", device="cpu")
    text = str(err.value)
    assert "Wan 2.2 VAE, official layout) lacks 2 decoder tensors" in text
    assert "decoder.upsamples.1.upsamples.3.time_conv.weight" in text
    assert "decoder.upsamples.2.upsamples.1.residual.2.bias" in text


# ---------------------------------------------------------------------------- equality


def test_reference_output_is_not_saturated(reference):
    assert reference.shape == (3, 17, 48, 80)
    assert (reference.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize("path", LOAD_PATHS)
def test_every_load_path_equals_diffusers(layouts, path, latents, reference):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True))
    assert len(frames) == vae.frames_for(SHAPE[1]) == 17
    assert_equal_video(torch.stack(frames, dim=1), reference)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [5], [2, 3], [4, 1]], ids=lambda c: "+".join(map(str, c)))
def test_every_chunking_equals_diffusers(vae, latents, reference, chunks):
    assert_equal_video(stream_video(vae, latents, chunks), reference)


@settings(max_examples=6, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SHAPE[1] - 1)))
def test_random_chunkings_equal_diffusers(vae, latents, reference, cuts):
    bounds = [0, *sorted(cuts), SHAPE[1]]
    assert_equal_video(stream_video(vae, latents, [b - a for a, b in zip(bounds, bounds[1:])]), reference)


def test_raw_latents(vae, model, latents, reference):
    raw = denormalize(model, latents[None])[0]
    assert_equal_video(stream_video(vae, raw, [3, 2], normalized=False), reference)


def test_first_frame_rule_is_kept_by_the_shortcuts(vae, model, latents):
    """A single latent frame decodes to a single frame (the shortcuts drop their extra copy),
    and that frame is diffusers' first frame."""
    frames = stream_video(vae, latents[:, :1], [1])
    assert frames.shape[1] == 1
    assert_equal_video(frames, reference_decode(model, denormalize(model, latents[None, :, :1]))[0])


@pytest.mark.parametrize("tile, chunks", [(1, [5]), ((2, 3), [2, 3]), (2, [1, 1, 3])], ids=["1", "2x3", "2"])
def test_tiled_equals_diffusers(vae, latents, reference, tile, chunks):
    assert_equal_video(stream_video(vae, latents, chunks, tile=tile), reference)


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_give_identical_output(layouts, vae, latents, mode):
    offloaded = streamdec.load_vae(layouts["official-safetensors"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, latents, [5]), stream_video(vae, latents, [5]))
    assert_equal_video(stream_video(offloaded, latents, [2, 3], tile=2), stream_video(vae, latents, [5]))


def test_cli_info_and_decode(layouts, vae, latents, tmp_path, capsys):
    from streamdec.cli import main

    assert main(["info", str(layouts["official-safetensors"])]) == 0
    out = capsys.readouterr().out
    assert "wan2.2" in out and "latent channels   48" in out and "16x16 space" in out
    torch.save(latents.clone(), tmp_path / "z.pt")
    assert main(["decode", str(tmp_path / "z.pt"), "--vae", str(layouts["official-pth"]), "-o",
                 str(tmp_path / "v.mkv"), "--codec", "ffv1", "--quiet"]) == 0  # fmt: skip
    with av.open(str(tmp_path / "v.mkv")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    expected = list(streamdec.decode_frames(vae, latents))
    assert len(frames) == 17 and all(np.array_equal(f, e) for f, e in zip(frames, expected))


def test_output_channels_that_are_not_rgb_patches(model, tmp_path):
    state = official_state_dict(model)
    state["decoder.head.2.weight"], state["decoder.head.2.bias"] = torch.zeros(5, 8, 3, 3, 3), torch.zeros(5)
    torch.save(state, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match=r"gives 5 channels, which are not RGB patches \(3 x p x p\)"):
        streamdec.load_vae(tmp_path / "vae.pth", device="cpu")


def test_latent_statistics_must_fit_the_channels(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latents_mean"], config["latents_std"] = config["latents_mean"][:16], config["latents_std"][:16]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="takes 48 latent channels but its latent statistics have 16"):
        streamdec.load_vae(tmp_path, device="cpu")
