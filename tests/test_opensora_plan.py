"""Open-Sora-Plan's VAEs against the official code.

`tests/data/osp/` holds what the official WF-VAE and CausalVAE code decoded from random weights
(made by `osp_weights.seeded_weights` from the official key lists; see make_reference.py there).
The tests write those weights in the released layouts, load them, and check:

- WF-VAE: the stream, cut anywhere, equals the official one-shot decode, and frames come out one
  latent frame late (its lookahead), the last ones at close.
- CausalVAE (v1.1 and v1.2 upsamplers): the windowed stream equals the official tiled decode
  (`enable_tiling()`: 6-latent windows every 4, blended spatial tiles), through every load path
  and chunking.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streamdec
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.families import Strategy
from streamdec.plan import Plan
from streamdec.state import StreamState
from streamdec.tiling import Blended

from helpers.osp import SEEDS, config_json, official_state_dict, reference, save_layouts
from helpers.video import TOL, assert_equal_video, stream_video


def assert_matches_reference(video: torch.Tensor, ref: dict) -> None:
    """`video` (1, 3, F, H, W), unclamped, against the official decode's summary."""
    assert tuple(video.shape) == tuple(ref["shape"])
    ours = {"row_means": video.mean(dim=4), "column_means": video.mean(dim=3), "pixels": video[..., ::4, ::4]}
    for key, value in ours.items():
        err = (value - ref[key]).abs().max().item()
        assert err <= TOL, f"{key}: max abs error {err:.3g} > {TOL}"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("osp")
    return {name: save_layouts(name, root) for name in SEEDS}


def test_references_are_not_trivial():
    for name in SEEDS:
        ref = reference(name)
        assert ref["pixels"].abs().max() > 1.0 and ref["pixels"].std() > 0.1  # random weights, real values


# ---------------------------------------------------------------------------- WF-VAE


def wf_stream(vae, z: torch.Tensor, chunks) -> tuple[torch.Tensor, list[int]]:
    """Decode de-normalized latents through the decoder's stream; the unclamped video and the frames
    each call gave (the last: `finish`)."""
    state, pieces, start = StreamState(), [], 0
    with torch.no_grad():
        for n in chunks:
            pieces.append(vae.decoder(z[:, :, start : start + n], state))
            start += n
        pieces.append(vae.decoder.finish(state))
    return torch.cat(pieces, dim=2), [p.shape[2] for p in pieces]


@pytest.mark.parametrize("path", ["folder", "ckpt_folder", "ckpt", "safetensors"])
def test_wfvae_every_load_path_equals_official_one_shot(layouts, path):
    vae = streamdec.load_vae(layouts["wfvae"][path], device="cpu")
    assert vae.family == "wfvae" and vae.latent_channels == 4
    ref = reference("wfvae")
    video, _ = wf_stream(vae, vae.denormalize(ref["latents"]), [1] * ref["latents"].shape[2])
    assert_matches_reference(video, ref)


@pytest.mark.parametrize("chunks", [[6], [1, 5], [2, 2, 2], [3, 3], [5, 1]])
def test_wfvae_any_chunking_equals_official_one_shot(layouts, chunks):
    vae = streamdec.load_vae(layouts["wfvae"]["folder"], device="cpu")
    ref = reference("wfvae")
    video, counts = wf_stream(vae, vae.denormalize(ref["latents"]), chunks)
    assert_matches_reference(video, ref)
    # One latent frame of lookahead: a chunk's last latent frame gives its frames with the next chunk.
    assert counts[0] == 4 * chunks[0] - 5 + (2 if chunks[0] == 1 else 0) and counts[-1] == 2


@pytest.fixture(scope="module")
def wfvae(layouts):
    return streamdec.load_vae(layouts["wfvae"]["folder"], device="cpu")


@settings(max_examples=10, deadline=None)
@given(length=st.integers(1, 6), cuts=st.lists(st.integers(1, 3), min_size=1, max_size=6))
def test_wfvae_stream_equals_one_shot_for_any_length(wfvae, length, cuts):
    z = reference("wfvae")["latents"][0, :, :length]
    with torch.no_grad():
        one_shot = wfvae.decoder(wfvae.denormalize(z[None]))[0].clamp(-1, 1)
    chunks = []
    while sum(chunks) < length:
        chunks.append(min(cuts[len(chunks) % len(cuts)], length - sum(chunks)))
    assert_equal_video(stream_video(wfvae, z, chunks), one_shot)


@pytest.mark.parametrize("frames_per_call", [2, 4])
def test_wfvae_several_latent_frames_per_call(wfvae, frames_per_call):
    z = reference("wfvae")["latents"][0]
    assert_equal_video(stream_video(wfvae, z, [6], frames_per_call=frames_per_call), stream_video(wfvae, z, [6]))


def test_wfvae_frames_wait_for_the_next_latent_frame(wfvae):
    z = reference("wfvae")["latents"][0]
    decoder = streamdec.StreamDecoder(wfvae)
    counts = [len(decoder.push(z[:, t : t + 1])) for t in range(z.shape[1])]
    assert counts == [1, 2, 4, 4, 4, 4]  # latent frame t's last 2 frames come with frame t+1
    assert len(decoder.close()) == 2 and sum(counts) + 2 == wfvae.frames_for(z.shape[1])


@pytest.mark.parametrize("mode", ["model", "block"])
def test_wfvae_offload_gives_identical_output(layouts, wfvae, mode):
    z = reference("wfvae")["latents"][0]
    offloaded = streamdec.load_vae(layouts["wfvae"]["folder"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, z, [2, 4]), stream_video(wfvae, z, [2, 4]))


def test_wfvae_decode_to_file_writes_every_frame(wfvae, tmp_path):
    z = reference("wfvae")["latents"][0]
    assert streamdec.decode_to_file(wfvae, z, tmp_path / "out.mp4", progress=False) == 21


def test_wfvae_cannot_be_tiled_exactly(wfvae):
    with pytest.raises(ValueError, match="cannot be tiled exactly"):
        streamdec.StreamDecoder(wfvae, tile=2)


def test_wfvae_with_groupnorm_is_refused(tmp_path):
    state = {k.replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v
             for k, v in official_state_dict("wfvae").items()}  # fmt: skip
    save_file(state, tmp_path / "gn.safetensors")
    with pytest.raises(CheckpointError, match="GroupNorm.*cannot be streamed exactly"):
        streamdec.load_vae(tmp_path / "gn.safetensors", device="cpu")


def test_wfvae_per_channel_scale_and_shift(tmp_path):
    folder = tmp_path / "scaled"
    folder.mkdir()
    save_file(official_state_dict("wfvae"), folder / "diffusion_pytorch_model.safetensors")
    config = {**config_json("wfvae"), "scale": [0.5, 1.0, 2.0, 4.0], "shift": [0.1, 0.0, -0.1, 0.2]}
    (folder / "config.json").write_text(json.dumps(config))
    vae = streamdec.load_vae(folder, device="cpu")
    z = torch.ones(1, 4, 1, 1, 1)
    assert vae.denormalize(z).flatten().tolist() == pytest.approx([2.1, 1.0, 0.4, 0.45])
    (folder / "config.json").write_text(json.dumps({**config, "scale": [0.5, 1.0]}))
    with pytest.raises(CheckpointError, match="2 different scale values for 4 latent channels"):
        streamdec.load_vae(folder, device="cpu")


def test_wfvae_missing_tensor_is_named(tmp_path):
    state = official_state_dict("wfvae")
    del state["decoder.up2.2.conv.conv.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 decoder tensors: decoder\.up2\.2\.conv\.conv\.weight"):
        streamdec.load_vae(tmp_path / "broken.safetensors", device="cpu")


# ---------------------------------------------------------------------------- CausalVAE


def causal_stream(vae, z: torch.Tensor, chunks, tile) -> torch.Tensor:
    stream = vae.family_spec.open_stream(vae.decoder, Plan(tile=tile))
    pieces, start = [], 0
    with torch.no_grad():
        for n in chunks:
            pieces += stream.push(z[:, :, start : start + n])
            start += n
        pieces += stream.close()
    return torch.cat(pieces, dim=2)


@pytest.mark.parametrize("name", ["causalvae_v12", "causalvae_v11"])
@pytest.mark.parametrize("path", ["folder", "ckpt_folder", "ckpt", "safetensors"])
def test_causalvae_every_load_path_equals_official_tiled_decode(layouts, name, path):
    vae = streamdec.load_vae(layouts[name][path], device="cpu")
    assert vae.family == "causalvae" and vae.family_spec.strategy is Strategy.REPLAY
    ref = reference(name)
    tile = (ref["tiling"]["tile"],) * 2
    video = causal_stream(vae, vae.denormalize(ref["latents"]), [1] * ref["latents"].shape[2], tile)
    assert_matches_reference(video, ref)


@pytest.mark.parametrize("chunks", [[11], [6, 5], [3, 3, 3, 2], [7, 1, 3], [4, 4, 3]])
def test_causalvae_any_chunking_equals_official_tiled_decode(layouts, chunks):
    vae = streamdec.load_vae(layouts["causalvae_v12"]["folder"], device="cpu")
    ref = reference("causalvae_v12")
    video = causal_stream(vae, vae.denormalize(ref["latents"]), chunks, (8, 8))
    assert_matches_reference(video, ref)


@pytest.fixture(scope="module")
def causalvae(layouts):
    return streamdec.load_vae(layouts["causalvae_v12"]["folder"], device="cpu")


def window_reference(vae, z: torch.Tensor, tile=None) -> torch.Tensor:
    """The reference's temporal schedule written out: windows [4i, 4i+6) clipped to the end, one more
    from the last start if latents remain, the first 5 frames of every later window dropped."""
    t = z.shape[2]
    starts = list(range(0, t, 4))
    spans = [[s, min(s + 6, t)] for s in starts[:-1]] or [[0, t]]
    if spans[-1][1] < t:
        spans.append([starts[-1], t])
    stream = vae.family_spec.open_stream(vae.decoder, Plan(tile=tile))
    with torch.no_grad():  # each window as the stream decodes it; later ones without their 5 context frames
        pieces = [stream._decode(z[:, :, a:b])[:, :, 5 if a else 0 :] for a, b in spans]
    return torch.cat(pieces, dim=2)


@pytest.mark.parametrize("length", range(1, 15))
def test_causalvae_windows_follow_the_reference_schedule_at_every_length(causalvae, length):
    latents = reference("causalvae_v12")["latents"]
    z = causalvae.denormalize(torch.cat([latents, latents.flip(2)], dim=2)[:, :, :length])
    video = causal_stream(causalvae, z, [1] * length, (8, 8))
    assert video.shape[2] == causalvae.frames_for(length)
    assert_equal_video(video, window_reference(causalvae, z, (8, 8)))


def test_causalvae_short_small_clips_are_decoded_whole(causalvae):
    # The reference tiles only videos longer than 5 latents or frames larger than a tile.
    z = causalvae.denormalize(reference("causalvae_v12")["latents"][:, :, :5])
    with torch.no_grad():
        small = z[..., :8, :8]
        assert_equal_video(causal_stream(causalvae, small, [2, 3], (8, 8)), causalvae.decoder(small))
        tiled = causal_stream(causalvae, z, [2, 3], (8, 8))
        assert (tiled - causalvae.decoder(z)).abs().max() > 1e-3  # blended tiles are not the whole decode


def test_causalvae_public_stream_equals_window_schedule(causalvae):
    z = reference("causalvae_v12")["latents"][0]
    expected = window_reference(causalvae, causalvae.denormalize(z[None]), (8, 8))[0].clamp(-1, 1)
    assert_equal_video(stream_video(causalvae, z, [3, 5, 3], tile=8), expected)


@pytest.mark.parametrize("mode", ["model", "block"])
def test_causalvae_offload_gives_identical_output(layouts, causalvae, mode):
    z = reference("causalvae_v12")["latents"][0]
    offloaded = streamdec.load_vae(layouts["causalvae_v12"]["folder"], device="cpu", offload=mode)
    assert torch.equal(stream_video(offloaded, z, [11], tile=8), stream_video(causalvae, z, [11], tile=8))


def test_causalvae_default_tile_is_the_reference_512_pixels(causalvae):
    stream = causalvae.family_spec.open_stream(causalvae.decoder, Plan())
    assert stream.tiles.tile == (64, 64) and stream.tiles.stride == (56, 56)


def test_causalvae_blended_is_its_default_tiling(causalvae):
    stream = causalvae.family_spec.open_stream(causalvae.decoder, Plan(tile=Blended()))
    assert stream.tiles == causalvae.family_spec.open_stream(causalvae.decoder, Plan()).tiles


def test_causalvae_tile_must_fit_the_overlap(causalvae):
    with pytest.raises(ValueError, match="multiple of 8 latent pixels"):
        streamdec.StreamDecoder(causalvae, tile=12)


def test_causalvae_without_config_and_weightless_time_upsamplers(tmp_path):
    # TimeUpsample2x has no weights: without config.json the decoder looks 1x in time.
    state = {k: v for k, v in official_state_dict("causalvae_v12").items()}
    for level in (2, 3):
        w = state[f"decoder.up.{level}.upsample.conv.conv.weight"]
        state[f"decoder.up.{level}.upsample.conv.conv.weight"] = w[:, :, 1:2].contiguous()
    save_file(state, tmp_path / "v10.safetensors")
    with pytest.raises(CheckpointError, match="upsamples 1x in time.*config.json"):
        streamdec.load_vae(tmp_path / "v10.safetensors", device="cpu")


def test_cli_info_and_decode(layouts, tmp_path, capsys):
    for name in ("wfvae", "causalvae_v12"):
        assert main(["info", str(layouts[name]["folder"])]) == 0
        assert name.split("_")[0] in capsys.readouterr().out
    z = reference("causalvae_v12")["latents"][0]
    torch.save(z, tmp_path / "z.pt")
    out = tmp_path / "causal.mp4"
    assert main(["decode", str(tmp_path / "z.pt"), "--vae", str(layouts["causalvae_v12"]["folder"]), "-o", str(out),
                 "--tile", "8", "--quiet"]) == 0  # fmt: skip
    assert out.stat().st_size > 0


def test_wfvae_8x_in_time_is_refused(tmp_path):
    # v1.5's WF-VAE upsamples time in up1 too: a 3-D causal conv where the 4x model has a 2-D one.
    state = official_state_dict("wfvae")
    w = state.pop("decoder.up1.2.conv.weight")
    state["decoder.up1.2.conv.conv.weight"] = w[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()
    save_file(state, tmp_path / "v15.safetensors")
    with pytest.raises(CheckpointError, match="upsamples 8x in time"):
        streamdec.load_vae(tmp_path / "v15.safetensors", device="cpu")


def save_folder(name: str, root, state: dict, **config) -> object:
    root.mkdir()
    save_file(state, root / "diffusion_pytorch_model.safetensors")
    (root / "config.json").write_text(json.dumps({**config_json(name), **config}))
    return root


def test_wfvae_unknown_time_interpolation_is_refused(tmp_path):
    folder = save_folder("wfvae", tmp_path / "f", official_state_dict("wfvae"), t_interpolation="bicubic")
    with pytest.raises(CheckpointError, match="t_interpolation 'bicubic'"):
        streamdec.load_vae(folder, device="cpu")


def test_causalvae_attention_in_up_blocks_is_refused(tmp_path):
    state = official_state_dict("causalvae_v12")
    state["decoder.up.0.attn.0.q.conv.weight"] = torch.zeros(32, 32, 1, 1, 1)
    save_file(state, tmp_path / "attn.safetensors")
    with pytest.raises(CheckpointError, match="attention in its up blocks"):
        streamdec.load_vae(tmp_path / "attn.safetensors", device="cpu")


def test_causalvae_unknown_upsampler_is_refused(tmp_path):
    folder = save_folder("causalvae_v12", tmp_path / "f", official_state_dict("causalvae_v12"),
                         decoder_temporal_upsample=["", "", "TimeUpsample4x", ""])  # fmt: skip
    with pytest.raises(CheckpointError, match="upsampler 'TimeUpsample4x'"):
        streamdec.load_vae(folder, device="cpu")


def test_causalvae_widths_that_do_not_split_into_norm_groups(tmp_path, capsys):
    state = {k: v[:16] if k.startswith("decoder.up.0.") and v.dim() == 1 else v
             for k, v in official_state_dict("causalvae_v12").items()}  # fmt: skip
    state["decoder.up.0.block.0.conv1.conv.weight"] = state["decoder.up.0.block.0.conv1.conv.weight"][:16]
    save_file(state, tmp_path / "narrow.safetensors")
    assert main(["info", str(tmp_path / "narrow.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert "do not split into 32 norm groups" in err and len(err.splitlines()) == 1 and "Traceback" not in err
