"""LTX-2 and LTX-Video (0.9.x) VAEs: the lookahead stream against diffusers' untiled decode."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

import streamdec
from streamdec import StreamdecError, StreamDecoder
from streamdec.families.ltx import LTXConfig, lookahead
from streamdec.frames import to_uint8
from streamdec.memory import MemoryTrace, estimate_peak, weight_bytes
from tests.helpers.ltx import (
    LTX2_RELEASED_COUNTS,
    LTXV090_SMALL,
    LTXV091_SMALL,
    denormalize,
    official_state_dict,
    random_ltx2,
    random_ltx_video,
    reference,
)  # fmt: skip

TOL = 1e-4


def stream(vae, z: torch.Tensor, splits: list[int] | None = None, **options) -> torch.Tensor:
    """Push `z` (1, C, T, h, w) in chunks of `splits` latent frames (default: one per push) -> (3, F, H, W)."""
    decoder = StreamDecoder(vae, as_tensor=True, **options)
    splits = splits or [1] * z.shape[2]
    frames, t = [], 0
    for n in splits:
        frames += decoder.push(z[:, :, t : t + n])
        t += n
    frames += decoder.close()
    return torch.stack(frames, dim=1)


def random_splits(total: int, seed: int) -> list[int]:
    rng, out = random.Random(seed), []
    while total:
        out.append(rng.randint(1, total))
        total -= out[-1]
    return out


def load(model, tmp_path, path: str):
    """The model saved as `path` says and loaded through streamdec's loader."""
    if path == "live":
        return streamdec.load_vae(model, device="cpu")
    if path == "diffusers":
        model.save_pretrained(tmp_path / "vae")
        return streamdec.load_vae(tmp_path / "vae", device="cpu")
    file = tmp_path / "model.safetensors"
    if path == "official":  # ltx-core / LTX-Video / ComfyUI checkpoint: the VAE under vae. beside the rest
        save_file(official_state_dict(model), file)
    else:  # a VAE-only file (ComfyUI's split VAE): the official names, no prefix
        save_file(official_state_dict(model, prefix="", beside=False), file)
    return streamdec.load_vae(file, device="cpu")


@pytest.fixture(scope="module")
def ltx2():
    return random_ltx2()


@pytest.mark.parametrize("path", ["diffusers", "official", "vae-only", "live"])
def test_ltx2_equals_diffusers_for_every_load_path_and_chunking(ltx2, tmp_path, path):
    vae = load(ltx2, tmp_path, path)
    assert vae.family == "ltx2" and lookahead(vae.config) == 9
    for frames in (1, 3, 11):  # shorter and longer than the lookahead
        z = torch.randn(1, 8, frames, 2, 3)
        expected = reference(ltx2, z)
        chunkings = (None, [frames], random_splits(frames, frames)) if path == "diffusers" else (None,)
        for splits in chunkings:
            got = stream(vae, z, splits)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() < TOL, (frames, splits)


def test_frames_leave_as_soon_as_no_later_latent_can_change_them():
    """Perturb latent frame t in diffusers' decode: the first video frame that changes is exactly the
    number of frames the stream has given out after t latent frames (released layer counts)."""
    model = random_ltx2(1, **LTX2_RELEASED_COUNTS)
    vae = streamdec.load_vae(model, device="cpu")
    assert lookahead(vae.config) == lookahead(LTXConfig()) == 22  # the released decoder's
    total = 27
    z = torch.randn(1, 8, total, 2, 2)
    base = reference(model, z)
    decoder = StreamDecoder(vae, as_tensor=True)
    given = []
    for t in range(total):
        given.append(len(decoder.push(z[:, :, t : t + 1])))
    out_after = [sum(given[:t]) for t in range(total + 1)]
    # latent n's frames (1 + 8(n - 1) .. 8n) are all final once latent n + 22 has come, and not all sooner
    assert all(out_after[n + 23] >= 1 + 8 * n for n in range(total - 22))
    assert out_after[22] == 0 and any(out_after[n + 22] < 1 + 8 * n for n in range(total - 21))
    for t in (22, 23, 24, 26):
        bumped = z.clone()
        bumped[:, :, t] += 3
        changed = (reference(model, bumped) - base).abs().amax(
            dim=(0, 2, 3)
        ) > 0  # frames it cannot reach are bit-equal
        first = int(changed.nonzero()[0])
        assert first == out_after[t], t


def test_ltx_video_timestep_and_latent_noise(tmp_path):
    """0.9.5-0.9.8: the decoder conditioned on decode_timestep; the latents mixed with noise as the
    pipeline mixes them, (1 - s) z + s n on the de-normalized latents, n drawn per latent frame from
    the seed (so any chunking gives the same video)."""
    model = random_ltx_video()
    vae = load(model, tmp_path, "official")
    assert vae.family == "ltx-video" and vae.config.timestep_conditioning and vae.config.spatial_padding == "zeros"
    z = torch.randn(1, 8, 5, 2, 3)
    expected = reference(model, z, timestep=0.05)
    got = stream(vae, z, decode_timestep=0.05, decode_noise_scale=0.0)
    assert (got - expected).abs().max() < TOL
    # with noise: the same as diffusers given the documented noise, for any chunking and per push
    s, seed = 0.3, 7
    gen = torch.Generator().manual_seed(seed)
    noise = torch.cat([torch.randn((1, 8, 1, 2, 3), generator=gen) for _ in range(5)], dim=2)
    noisy = (1 - s) * denormalize(model, z) + s * noise
    with torch.no_grad():
        expected = model.decode(noisy, torch.tensor([0.05])).sample[0].clamp(-1, 1)
    for splits in (None, [2, 3]):
        got = stream(vae, z, splits, decode_timestep=0.05, decode_noise_scale=s, seed=seed)
        assert (got - expected).abs().max() < TOL
    # named at load: the defaults of every decode; the noise scale defaults to the timestep
    vae = streamdec.load_vae(model, device="cpu", decode_timestep=0.05, seed=seed)
    assert (stream(vae, z, decode_noise_scale=s) - expected).abs().max() < TOL


def test_ltx2_noise_is_mixed_before_de_normalizing(tmp_path):
    """An LTX-2 VAE with timestep conditioning (none is released; its official file holds the audio VAE
    beside it, which tells it from an LTX-Video one): the pipeline mixes the noise into the latents
    before de-normalizing them."""
    model = random_ltx2(3, timestep_conditioning=True)
    vae = load(model, tmp_path, "official")
    assert vae.family == "ltx2"
    z, s = torch.randn(1, 8, 3, 2, 3), 0.25
    gen = torch.Generator().manual_seed(0)
    noise = torch.cat([torch.randn((1, 8, 1, 2, 3), generator=gen) for _ in range(3)], dim=2)
    with torch.no_grad():
        expected = model.decode(denormalize(model, (1 - s) * z + s * noise), torch.tensor([0.1])).sample[0].clamp(-1, 1)
    assert (stream(vae, z, decode_timestep=0.1, decode_noise_scale=s) - expected).abs().max() < TOL


def test_ltx_video_091_resnet_noise_is_seeded():
    """0.9.1 adds spatial noise inside its resnets from the global generator: the stream draws it once,
    in the reference's order, equal to diffusers' decode right after torch.manual_seed(seed)."""
    model = random_ltx_video(2, base=LTXV091_SMALL)
    vae = streamdec.load_vae(model, device="cpu")
    assert vae.config.inject_noise == (True, True, True, False)
    z = torch.randn(1, 8, 4, 2, 3)
    torch.manual_seed(11)
    expected = reference(model, z, timestep=0.0)
    for splits in (None, [4], [3, 1]):
        got = stream(vae, z, splits, seed=11)
        assert (got - expected).abs().max() < TOL


def test_ltx_video_090_official_file(tmp_path):
    """0.9.0: width-changing resnets (LayerNorm + 1x1 causal-conv shortcut), plain upsamplers, a block
    without one, zero padding, no timestep; its official file names the blocks in one flat list."""
    model = random_ltx_video(4, base=LTXV090_SMALL)
    vae = load(model, tmp_path, "official")
    assert vae.family == "ltx-video" and not vae.config.timestep_conditioning
    z = torch.randn(1, 8, 4, 2, 3)
    assert (stream(vae, z, [1, 3]) - reference(model, z)).abs().max() < TOL


def test_causal_decoder_streams_without_lookahead():
    model = random_ltx2(5, decoder_causal=True)
    vae = streamdec.load_vae(model, device="cpu")
    assert lookahead(vae.config) == 0
    z = torch.randn(1, 8, 4, 2, 3)
    decoder = StreamDecoder(vae, as_tensor=True)
    counts = [len(decoder.push(z[:, :, t : t + 1])) for t in range(4)]
    assert counts == [1, 8, 8, 8] and decoder.close() == []
    assert (stream(vae, z) - reference(model, z)).abs().max() < TOL


def test_blended_tiles_equal_enable_tiling(ltx2):
    vae = streamdec.load_vae(ltx2, device="cpu")
    z = torch.randn(1, 8, 3, 6, 8)  # tiles of 4 every 3 latent pixels (the last 2 wide: reflection needs 2)
    expected = reference(ltx2, z, tiling=dict(tile_sample_min_height=128, tile_sample_min_width=128,
                                              tile_sample_stride_height=96, tile_sample_stride_width=96))  # fmt: skip
    got = stream(vae, z, tile=streamdec.tiling.Blended((4, 4), 0.25))
    assert (got - expected).abs().max() < TOL
    assert (got - reference(ltx2, z)).abs().max() > 1e-3  # blended: not the untiled decode


def test_uint8_offload_and_max_vram_plans(ltx2):
    z = torch.randn(1, 8, 4, 2, 3)
    vae = streamdec.load_vae(ltx2, device="cpu")
    expected = ((reference(ltx2, z) + 1) * 127.5).round()
    frames = list(streamdec.decode_frames(vae, z))
    got = torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() for f in frames], dim=1)
    assert (got - expected).abs().max() <= 1
    floats = stream(vae, z)
    for offload in ("model", "block"):
        assert torch.equal(stream(streamdec.load_vae(ltx2, device="cpu", offload=offload), z), floats)
    assert torch.equal(stream(streamdec.load_vae(ltx2, device="cpu", max_vram=8), z), floats)


def test_memory_is_flat_in_length_and_estimated(ltx2):
    """The stream's traced peak is the same for a clip twice as long, and the planner's estimate
    (the stream run on the meta device) equals it."""
    vae = streamdec.load_vae(ltx2, device="cpu")

    def traced(frames: int) -> int:  # a real decode, one latent frame per push, as tests/test_memory.py traces it
        with MemoryTrace() as trace:
            decoder = StreamDecoder(vae)
            for _ in range(frames):
                for video in decoder.decode_videos(torch.randn(1, 8, 1, 2, 3)):
                    to_uint8(video)
            for video in decoder.close_videos():
                to_uint8(video)
        return trace.peak

    steady = lookahead(vae.config) + 3
    peak = traced(steady)
    assert traced(steady + 4) == peak > 0
    # the planner's estimate (the stream on the meta device) is within 0.2% of it: a few small
    # allocations differ between the CPU's and the meta device's kernels
    assert abs(estimate_peak(vae, (2, 3)) - weight_bytes(vae, "none") - peak) < 0.002 * peak


def test_bad_inputs(ltx2):
    vae = streamdec.load_vae(ltx2, device="cpu")
    z = torch.randn(8, 2, 2, 3)
    with pytest.raises(StreamdecError, match="cannot be tiled exactly.*704 video pixels.*tile='blended'"):
        list(streamdec.decode_frames(vae, z, tile=8))
    with pytest.raises(StreamdecError, match="takes no decode option decode_timstep"):
        streamdec.decode_frames(vae, z, decode_timstep=0.05)
    with pytest.raises(StreamdecError, match="seed must be a whole number"):
        streamdec.load_vae(ltx2, device="cpu", seed=1.5)
    from streamdec.demo import demo_vae

    with pytest.raises(StreamdecError, match=r"Wan 2.1 VAE takes no decode option decode_timestep \(it takes: none\)"):
        StreamDecoder(demo_vae(8, device="cpu"), decode_timestep=0.05)


def test_cli_decode_options(tmp_path):
    from streamdec.cli import main

    model = random_ltx_video(6)
    model.save_pretrained(tmp_path / "vae")
    z = torch.randn(8, 3, 2, 3)
    save_file({"latents": z}, tmp_path / "z.safetensors")
    out = tmp_path / "out.y4m"
    args = ["decode", str(tmp_path / "z.safetensors"), "--vae", str(tmp_path / "vae"), "-o", str(out), "--quiet",
            "--device", "cpu", "--decode-timestep", "0.05", "--decode-noise-scale", "0", "--seed", "3"]  # fmt: skip
    assert main(args) == 0 and out.stat().st_size > 0
