"""HunyuanVideo VAE (Open-Sora 2.0): the windowed stream equals diffusers'
AutoencoderKLHunyuanVideo.decode: its default framewise schedule for videos spanning many windows,
its one-shot decode for clips shorter than a window, and its blended spatial tiling; through every
load path, any chunking and every offload mode, handing frames out as their windows complete."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streamdec
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.families.hunyuan import HunyuanConfig, HunyuanDecoder
from streamdec.plan import Plan
from streamdec.streams import Windows
from streamdec.tiling import Blended

from helpers.hunyuan import random_hunyuan
from helpers.video import assert_equal_video, stream_video

SHAPE = (16, 14, 3, 5)  # (C, T, h, w): 14 latent frames = 5 windows of the reference's schedule
SCALING = 0.476986


def reference(model, z: torch.Tensor, framewise: bool = True, tiling: dict | None = None) -> torch.Tensor:
    """diffusers' decode of raw latents (1, C, T, h, w) -> (3, F, H, W), clamped as frames are."""
    model.use_framewise_decoding = framewise
    model.use_tiling = False
    if tiling:
        model.enable_tiling(**tiling)
    try:
        with torch.no_grad():
            return model.decode(z).sample[0].clamp(-1, 1)
    finally:
        model.use_framewise_decoding, model.use_tiling = True, False


@pytest.fixture(scope="module")
def model():
    return random_hunyuan()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(31))


@pytest.fixture(scope="module")
def framewise(model, latents):
    """What the diffusers pipeline decodes for latents from the diffusion model (z / scaling)."""
    return reference(model, latents[None] / SCALING)


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # encoder included
    paths = {"live-object": model}
    paths["official-pt"] = root / "pytorch_model.pt"  # HunyuanVideo's vae/pytorch_model.pt
    torch.save({"state_dict": state}, paths["official-pt"])
    paths["vae-prefixed-pt"] = root / "prefixed.pt"  # the same under "vae.", which Tencent's loader strips
    torch.save({f"vae.{k}": v for k, v in state.items()}, paths["vae-prefixed-pt"])
    paths["open-sora-safetensors"] = root / "hunyuan_vae.safetensors"
    save_file(state, paths["open-sora-safetensors"])
    model.save_pretrained(root / "diffusers-vae")
    paths["diffusers-folder"] = root / "diffusers-vae"
    model.save_pretrained(root / "pipeline" / "vae")
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    paths["diffusers-pipeline"] = root / "pipeline"
    return paths


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["open-sora-safetensors"], device="cpu")


def test_released_sizes():
    """The released decoder: 140 decoder-side tensors, diffusers' names and shapes."""
    with torch.device("meta"):
        ours = HunyuanDecoder(HunyuanConfig()).state_dict()
        theirs = AutoencoderKLHunyuanVideo().state_dict()
    decoder_side = {k: tuple(v.shape) for k, v in theirs.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(decoder_side) == 140
    assert {k: tuple(v.shape) for k, v in ours.items()} == decoder_side


def test_reference_output_is_not_saturated(framewise):
    assert framewise.shape == (3, 53, 24, 40)
    assert (framewise.abs() < 0.99).float().mean() > 0.5


def test_windows_differ_from_one_shot(model, latents, framewise):
    """The schedule matters (GroupNorm spans the window): equality to it below is not vacuous."""
    assert (reference(model, latents[None] / SCALING, framewise=False) - framewise).abs().max() > 0.01


@pytest.mark.parametrize("path", ["live-object", "official-pt", "vae-prefixed-pt", "open-sora-safetensors",
                                  "diffusers-folder", "diffusers-pipeline"])  # fmt: skip
def test_every_load_path_equals_framewise_decode(layouts, path, latents, framewise):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert (vae.family, vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == ("hunyuanvideo", 16, 4, 8)
    frames = list(streamdec.decode_frames(vae, latents, as_tensor=True))
    assert len(frames) == vae.frames_for(SHAPE[1]) == 53
    assert_equal_video(torch.stack(frames, dim=1), framewise)


@pytest.mark.parametrize("chunks", [[1] * 14, [14], [5, 9], [2, 7, 1, 4]], ids=lambda c: "+".join(map(str, c)))
def test_every_chunking_equals_framewise_decode(vae, latents, framewise, chunks):
    assert_equal_video(stream_video(vae, latents, chunks), framewise)


@settings(max_examples=5, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SHAPE[1] - 1), max_size=5))
def test_random_chunkings(vae, latents, framewise, cuts):
    bounds = [0, *sorted(cuts), SHAPE[1]]
    assert_equal_video(stream_video(vae, latents, [b - a for a, b in zip(bounds, bounds[1:])]), framewise)


@pytest.mark.parametrize("length", [5, 6, 7, 8, 10])
def test_every_length_equals_framewise_decode(vae, model, latents, length):
    """Lengths that end windows short, or start one with a single latent frame."""
    z = latents[:, :length]
    assert_equal_video(stream_video(vae, z, [length]), reference(model, z[None] / SCALING))


@pytest.mark.parametrize("length", [1, 2, 4])
def test_short_clips_equal_one_shot_decode(vae, model, latents, length):
    z = latents[:, :length]
    assert_equal_video(stream_video(vae, z, [1] * length), reference(model, z[None] / SCALING, framewise=False))


def test_frames_come_out_as_windows_complete(vae, latents, framewise):
    """A window's kept frames are handed out as soon as its last latent frame arrives; no more than
    one window of latents waits."""
    stream = streamdec.StreamDecoder(vae, as_tensor=True)
    counts = []
    for t in range(SHAPE[1]):
        counts.append(len(stream.push(latents[:, t : t + 1])))
        assert stream.stream.pending.shape[2] <= 5
    rest = stream.close()
    # windows of latents 0-4, 3-7, 6-10, 9-13 complete at latents 4, 7, 10, 13: 13 frames, then 12
    assert counts == [0, 0, 0, 0, 13, 0, 0, 12, 0, 0, 12, 0, 0, 12]
    assert len(rest) == 53 - 49 and stream.close() == []


def test_raw_latents(vae, model, latents, framewise):
    assert_equal_video(stream_video(vae, latents / SCALING, [6, 8], normalized=False), framewise)


@pytest.mark.parametrize("chunks", [[9], [1] * 9])
def test_spatial_tiling_equals_reference_tiling(vae, model, chunks):
    """Blended tiles of 4 latent px every 3 (diffusers: enable_tiling with 32 px tiles, 24 px
    stride), inside the temporal windows, on a frame of 3 x 4 tiles."""
    z = torch.randn(16, 9, 11, 10, generator=torch.Generator().manual_seed(32))
    tiling = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                  tile_sample_stride_width=24)  # fmt: skip
    expected = reference(model, z[None] / SCALING, tiling=tiling)
    assert (expected - reference(model, z[None] / SCALING)).abs().max() > 0.01  # tiling does change it
    assert_equal_video(stream_video(vae, z, chunks, tile=4), expected)


def test_blended_is_enable_tiling_at_its_defaults(vae):
    """tile="blended" is diffusers' enable_tiling() as it comes: 256-pixel tiles every 192 (32 latents
    every 24), the same tiles as tile=32."""
    blended = vae.family_spec.open_stream(vae.decoder, Plan(tile=vae.family_spec.effective_tile(Blended())))
    assert (blended.tiles.tile, blended.tiles.stride) == ((32, 32), (24, 24))
    assert blended.tiles == vae.family_spec.open_stream(vae.decoder, Plan(tile=(32, 32))).tiles


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_give_identical_output(layouts, vae, latents, mode):
    offloaded = streamdec.load_vae(layouts["official-pt"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, latents, [3, 11]), stream_video(vae, latents, [3, 11]))


def test_released_depth_from_a_diffusers_folder(latents, tmp_path):
    model = random_hunyuan(seed=2, layers_per_block=2)
    model.save_pretrained(tmp_path)
    vae = streamdec.load_vae(tmp_path, device="cpu")
    assert vae.config.layers_per_block == 2
    z = latents[:, :6]
    assert_equal_video(stream_video(vae, z, [2, 4]), reference(model, z[None] / SCALING))


def test_decode_to_file_writes_every_frame(vae, latents, tmp_path):
    assert streamdec.decode_to_file(vae, latents, tmp_path / "h.mkv", codec="ffv1", progress=False) == 53


def test_missing_tensor_is_named(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if k != "decoder.mid_block.attentions.0.to_k.bias"}
    torch.save(state, tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match=r"HunyuanVideo VAE, official layout\) lacks 1 decoder tensors: "
                                              r"decoder\.mid_block\.attentions\.0\.to_k\.bias"):  # fmt: skip
        streamdec.load_vae(tmp_path / "vae.pt", device="cpu")


def test_widths_that_do_not_split_into_norm_groups(tmp_path, capsys):
    """A bare file carries no group count, so the released 32 applies; widths of 8 cannot have it."""
    torch.manual_seed(0)
    small = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 16, 16), norm_num_groups=4)
    torch.save(small.state_dict(), tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match=r"widths \[16, 16, 8, 8\] do not split into 32 norm groups"):
        streamdec.load_vae(tmp_path / "vae.pt", device="cpu")
    assert main(["info", str(tmp_path / "vae.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("streamdec: error: ") and err.count("\n") == 1 and "norm groups" in err


def test_wrong_number_of_up_blocks(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.up_blocks.3.")}
    torch.save(state, tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match="the decoder has 3 up blocks; the HunyuanVideo VAE has 4"):
        streamdec.load_vae(tmp_path / "vae.pt", device="cpu")


@pytest.mark.parametrize("stride", [0, 5])
def test_window_stride_must_fit_the_window(stride):
    with pytest.raises(ValueError, match=rf"window stride must be in 1\.\.4 for windows of 5 latents .*, not {stride}"):
        Windows(latents=5, stride=stride, blend=0)
