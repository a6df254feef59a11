"""MiniMax-H3 video VAE: the windowed, tiled stream equals diffusers' AutoencoderKLMiniMaxH3.decode, which
tiles by default (spatial tiles, 7-latent windows every 5, padded with the last latent), and its
`disable_tiling()` decode with a tile as large as the frame; through every load path (diffusers folder,
pipeline folder, live object, the official layout with its fused per-head to_qkv and [gate; value]
ff.w1), any chunking and every offload mode, grouped or not. Small random models (2 layers, 64-wide
heads) with random norm gains, biases, layer scales and latent statistics; fp32, within 1e-4."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import AutoencoderKLMiniMaxH3
from safetensors.torch import save_file

import streamdec
from streamdec import memory
from streamdec.checkpoints import CheckpointError
from streamdec.cli import main
from streamdec.errors import StreamdecError
from streamdec.families.minimax_h3 import MiniMaxH3Config, MiniMaxH3Decoder, ReferenceTiles, frames_for, split_tiles
from streamdec.plan import GIB, Plan
from streamdec.tiling import Blended

from helpers.layouts import diffusers_layouts
from helpers.minimax_h3 import official_state_dict, random_minimax, reference_decode, save_official
from helpers.video import TOL

SIZE = (6, 7)  # latent frame: 2 x 2 tiles of 4 latent pixels (64 px) at least 1 apart (16 px), as SMALL_TILES
SMALL_TILES = dict(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_min_overlap_height=16,
                   tile_sample_min_overlap_width=16)  # fmt: skip
TILE = 4  # the same tiles for streamdec: 4 latent pixels overlapping by a quarter of a tile
LENGTHS = (3, 7, 8, 12, 13)  # every kind of end: one window padded, exact, padded by 4, by 0 after 2 windows, ...


def reference(model: AutoencoderKLMiniMaxH3, z: torch.Tensor, tiling: dict | None = SMALL_TILES) -> torch.Tensor:
    """diffusers' decode of normalized latents (C, T, h, w), tiled as `tiling` says (None: untiled),
    in [-1, 1] unclamped: (3, F, H, W)."""
    if tiling is None:
        model.disable_tiling()
    else:
        model.enable_tiling(**tiling)
    try:
        return reference_decode(model, z)
    finally:  # the defaults again
        model.enable_tiling(256, 256, 64, 64)


def stream(vae, z: torch.Tensor, chunks, tile=TILE, **options) -> tuple[torch.Tensor, list[int]]:
    """Push (C, T, h, w) in chunks; the unclamped video (3, F, H, W) and the frames each push (then
    close) gave."""
    decoder = streamdec.StreamDecoder(vae, tile=tile, **options)
    pieces, counts, start = [], [], 0
    for n in chunks:
        got = list(decoder.decode_videos(z[None, :, start : start + n]))
        pieces += got
        counts.append(sum(p.shape[2] for p in got))
        start += n
    got = list(decoder.close_videos())
    counts.append(sum(p.shape[2] for p in got))
    return torch.cat(pieces + got, dim=2)[0], counts


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g} > {TOL}"


@pytest.fixture(scope="module")
def model():
    return random_minimax()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(4, max(LENGTHS), *SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def references(model, latents):
    return {t: reference(model, latents[:, :t]) for t in LENGTHS}


@pytest.fixture(scope="module")
def layouts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("minimax")
    return {**diffusers_layouts(model, root, "MiniMaxH3Pipeline"), **save_official(model, root)}


@pytest.fixture(scope="module")
def vae(layouts):
    return streamdec.load_vae(layouts["diffusers-folder"], device="cpu")


def test_released_sizes():
    with torch.device("meta"):
        ours = MiniMaxH3Decoder(MiniMaxH3Config())
        theirs = AutoencoderKLMiniMaxH3()
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for n, p in theirs.named_parameters() if n.startswith(("decoder.", "post_quant")))
    assert 2.40e9 < count < 2.45e9  # the 2.4 B decoder


def test_reference_is_tiled_and_not_trivial(model, latents, references):
    ref = references[12]
    assert ref.std() > 0.2 and ref.abs().max() > 1.0
    untiled = reference(model, latents[:, :12], tiling=None)
    assert (untiled - ref).abs().max() > 0.1  # tiling changes the output: the tiled one is the reference


@pytest.mark.parametrize("path", ["live-object", "diffusers-folder", "diffusers-pipeline", "official-folder"])
def test_every_load_path_equals_tiled_decode(layouts, path, latents, references):
    vae = streamdec.load_vae(layouts[path], device="cpu")
    assert vae.family == "minimax-h3" and vae.latent_channels == 4
    assert vae.config.layout == ("official" if path.startswith("official") else "diffusers")
    assert_close(stream(vae, latents[:, :12], [12])[0], references[12])


def test_official_file_without_config_assumes_64_wide_heads(layouts, model, latents, references):
    """A bare official file has no config.json: the released head size (64) gives the head count; its
    latent statistics are not in it either, so the latents go in de-normalized."""
    vae = streamdec.load_vae(layouts["official-file"], device="cpu")
    assert (vae.config.num_heads, vae.config.head_dim, vae.config.layout) == (2, 64, "official")
    mean = torch.tensor(model.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(-1, 1, 1, 1)
    raw = latents[:, :8] * std + mean
    assert_close(stream(vae, raw, [3, 5], normalized=False)[0], references[8])


def test_official_layout_is_mapped_not_just_renamed(model):
    """The fused projection is interleaved per head and w1's halves are swapped: reading either one
    as diffusers lays it out would give another decoder."""
    official = official_state_dict(model)
    block = "decoder.transformer_blocks.0"
    q = model.state_dict()[f"{block}.attn.to_q.weight"]
    assert not torch.equal(official[f"{block}.attn.to_qkv.weight"][: q.shape[0]], q)
    assert torch.equal(official[f"{block}.attn.to_qkv.weight"][:64], q[:64])  # head 0's q comes first
    w1 = model.state_dict()[f"{block}.ff.net.0.proj.weight"]
    assert torch.equal(official[f"{block}.ff.w1.weight"], torch.cat(w1.chunk(2)[::-1]))


@pytest.mark.parametrize("length", LENGTHS)
def test_every_length_and_chunking_equals_tiled_decode(vae, latents, references, length):
    z, ref = latents[:, :length], references[length]
    assert ref.shape[1] == frames_for(length) == vae.frames_for(length)
    rng = random.Random(length)
    cuts = sorted(rng.sample(range(1, length), rng.randint(1, length - 1)))
    random_split = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
    for chunks in ([1] * length, [length], random_split):
        assert_close(stream(vae, z, chunks)[0], ref)


def test_frames_leave_as_windows_complete(vae, latents):
    """One latent at a time: nothing until a window's 7 latents are in, then the frames of its first
    5 latents (17); the last window's end and the padding's trim at close."""
    _, counts = stream(vae, latents[:, :13], [1] * 13)
    # 13 latents: 3 windows, the last padded with 4 copies of latent 12 whose 13 frames are cut at close
    assert counts == [0] * 6 + [17] + [0] * 4 + [17] + [0, 9]
    assert sum(counts) == frames_for(13) == 43


def test_default_tiles_are_the_references(model, tmp_path):
    """tile="auto" (and None, "blended") is diffusers' default decode: 256-pixel tiles, 64 px apart at least."""
    z = torch.randn(4, 7, 5, 20, generator=torch.Generator().manual_seed(1))  # 320 px wide: two tiles
    vae = streamdec.load_vae(model, device="cpu")
    ref = reference(model, z, tiling={})
    for tile in ("auto", None, "blended"):
        assert_close(stream(vae, z, [4, 3], tile=tile)[0], ref)


def test_other_tiles_are_enable_tiling(vae, model, latents):
    z = latents[:, :8]
    wide = {**SMALL_TILES, "tile_sample_min_width": 128, "tile_sample_min_overlap_width": 32}
    ref = reference(model, z, tiling=wide)
    assert_close(stream(vae, z, [8], tile=(4, 8))[0], ref)
    ref = reference(model, z, tiling={**SMALL_TILES, "tile_sample_min_overlap_height": 32,
                                      "tile_sample_min_overlap_width": 32})  # fmt: skip
    assert_close(stream(vae, z, [2, 6], tile=Blended((4, 4), 0.5))[0], ref)


def test_a_tile_as_large_as_the_frame_is_untiled(vae, model, latents):
    z = latents[:, :12]
    assert_close(stream(vae, z, [5, 7], tile=4096)[0], reference(model, z, tiling=None))


def test_tiles_in_batches_equal_tiles_one_by_one(vae, latents):
    z = vae.prepare(latents[None, :, :7], normalized=True)
    one_by_one = ReferenceTiles((TILE, TILE), (1, 1), 16).decode(vae.decoder, z)
    for batch in (3, 4, 8):  # the last batch short, all in one, more than there are
        assert_close(ReferenceTiles((TILE, TILE), (1, 1), 16, batch).decode(vae.decoder, z)[0], one_by_one[0])


def test_split_tiles_is_the_references(model):
    for length in range(1, 40):
        for tile, overlap in ((4, 1), (16, 4), (8, 3)):
            starts, overlaps = split_tiles(length, tile, overlap)
            px, _, px_overlaps = model._split_tiles(length * 16, tile * 16, overlap * 16)
            assert [s * 16 for s in starts] == px and [o * 16 for o in overlaps] == px_overlaps


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_equal_resident(layouts, vae, latents, mode):
    """"block" decodes a window's tiles in batches (the weights pass once per batch): the same frames."""
    offloaded = streamdec.load_vae(layouts["diffusers-folder"], device="cpu", offload=mode)
    z = latents[:, :8]
    assert_close(stream(offloaded, z, [3, 5])[0], stream(vae, z, [3, 5])[0])


@pytest.mark.parametrize("group", [1, 2, 3])
def test_grouped_offload_equals_resident_and_holds_two_groups(layouts, vae, latents, group):
    offloaded = streamdec.load_vae(layouts["official-folder"], device="cpu", offload="block")
    offloader = offloaded.offloader
    blocks = offloaded.decoder.offload_blocks()
    z = latents[:, :12]  # two windows in one push: the second one's groups are prefetched
    decoder = streamdec.StreamDecoder(offloaded, tile=TILE)
    decoder.start(SIZE)
    decoder.plan = Plan("block", decoder.plan.tile, offload_group=group)
    ours = torch.cat(list(decoder.decode_videos(z[None])) + list(decoder.close_videos()), dim=2)[0]
    assert_close(ours, stream(vae, z, [12])[0])
    groups = [sum(offloader.block_bytes[b] for b in blocks[i : i + group]) for i in range(0, len(blocks), group)]
    assert max(groups) < offloader.peak_resident_bytes <= sum(sorted(groups)[-2:])  # a group and the next
    # two windows, each with its 4 tiles in one batch: each group moves once a window, and the last
    # group prefetches the first for a window that does not come. The compute waits for every group of
    # the first window (the order is being learned), then only for the first group of the second.
    assert offloader.transfers == 2 * len(groups) + 1
    assert offloader.waited_transfers == len(groups) + 1
    assert not offloader.resident  # all released after the chunk


def test_grouped_sessions_move_fewer_transfers(layouts, latents):
    counts = {}
    for group in (1, 2, 4):
        vae = streamdec.load_vae(layouts["diffusers-folder"], device="cpu", offload="block")
        decoder = streamdec.StreamDecoder(vae, tile=TILE)
        decoder.start(SIZE)
        decoder.plan = Plan("block", decoder.plan.tile, offload_group=group)
        list(decoder.decode_videos(latents[None, :, :12]))
        list(decoder.close_videos())
        counts[group] = vae.offloader.transfers
    assert counts[1] > counts[2] > counts[4] > 0


def test_planner_picks_the_group_size_under_max_vram(tmp_path, monkeypatch):
    """With six layers the decoder has 8 offload blocks; the plan takes the largest group (of at most
    half of them) whose two groups fit beside the traced activations."""
    model = random_minimax(seed=3, layers=6)
    model.save_pretrained(tmp_path)
    probe = streamdec.load_vae(tmp_path, device="cpu", offload="block")
    monkeypatch.setattr(memory, "GROUP_BYTES", 1 << 40)  # as if the layers were small: group as much as fits
    size = (4, 4)  # one tile: the batch is the same as untiled
    assert memory.group_choices(probe, "block") == [4, 3, 2, 1]
    traced = memory.estimate_peak(probe, size, offload="block") - memory.weight_bytes(probe, "block", 4)
    for group in (3, 2, 1):
        budget = (traced + memory.weight_bytes(probe, "block", group)) / memory.PLAN_MARGIN / GIB * 1.0001
        vae = streamdec.load_vae(tmp_path, device="cpu", max_vram=budget)
        plan = memory.plan_decode(vae, size)
        assert (plan.offload, plan.offload_group) == ("block", group)
        assert "offload block" + (f" in groups of {group}" if group > 1 else ",") in plan.describe()
        z = torch.randn(4, 7, *size, generator=torch.Generator().manual_seed(group))
        ours, _ = stream(vae, z, [7], tile="auto")
        assert vae.offloader.peak_resident_bytes <= memory.weight_bytes(vae, "block", group)
        assert_close(ours, reference(model, z))


def test_resume_mid_video(vae, latents, references):
    first = streamdec.StreamDecoder(vae, tile=TILE)
    pieces = [p for n in (4, 5) for p in first.decode_videos(latents[None, :, 4 if n == 5 else 0 : 9 if n == 5 else 4])]
    saved = first.state_dict()
    second = streamdec.StreamDecoder(vae, tile=TILE)
    second.start(SIZE)
    second.load_state_dict(saved)
    pieces += list(second.decode_videos(latents[None, :, 9:13])) + list(second.close_videos())
    assert_close(torch.cat(pieces, dim=2)[0], references[13])


@pytest.mark.parametrize("length", [1, 2])
def test_too_short_videos_are_refused(vae, latents, length):
    with pytest.raises(StreamdecError, match=f"3 latent frames or more .* this one has {length}"):
        stream(vae, latents[:, :length], [length])


def test_tiles_that_do_not_overlap_in_whole_pixels(vae):
    with pytest.raises(StreamdecError, match="tiles of 6x6 latent pixels cannot overlap by 0.25"):
        streamdec.StreamDecoder(vae, tile=6)


def test_missing_tensor_is_named_as_the_file_names_it(model, tmp_path):
    state = official_state_dict(model)
    del state["decoder.transformer_blocks.1.ff.w1.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"official layout\) lacks 1 decoder tensors: "
                                              r"decoder\.transformer_blocks\.1\.ff\.w1\.bias"):  # fmt: skip
        streamdec.load_vae(tmp_path / "model.safetensors", device="cpu")


def test_other_compression_is_refused(tmp_path):
    torch.manual_seed(0)
    other = AutoencoderKLMiniMaxH3(latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
                                   spatial_downsample_factors=(2, 2, 2), temporal_downsample_factors=(1, 2, 2),
                                   norm_num_groups=4, decoder_num_layers=1, decoder_num_attention_heads=1)  # fmt: skip
    other.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="streamdec decodes MiniMax-H3's RGB 4x16x16"):
        streamdec.load_vae(tmp_path, device="cpu")


def test_bf16_decodes_close_to_fp32(layouts, vae, latents):
    half = streamdec.load_vae(layouts["diffusers-folder"], device="cpu", dtype="bf16")
    z = latents[:, :7]
    ours, full = stream(half, z, [7])[0], stream(vae, z, [7])[0]
    assert ours.dtype == torch.bfloat16 and (ours.float() - full).abs().mean() < 0.05


def test_info_names_the_family_and_its_frame_count(layouts, capsys):
    assert main(["info", str(layouts["official-folder"])]) == 0
    out = capsys.readouterr().out
    assert "minimax-h3 (MiniMax-H3 VAE)" in out and "5 -> 17, 6 -> 18, 7 -> 22" in out
