"""Memory estimates and max_vram plans: the meta-device trace counts what a real decode allocates,
plans fit their budget and keep the output unchanged, an unmet budget names the one that would do."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import streamdec
from streamdec import memory
from streamdec.cli import main
from streamdec.frames import to_uint8
from streamdec.memory import GIB, PLAN_MARGIN, BudgetError, MemoryTrace, estimate_peak, plan_decode
from streamdec.plan import Plan
from streamdec.stream import StreamDecoder
from streamdec.tiling import Blended
from streamdec.vae import VAE

from helpers.hunyuan import random_hunyuan
from helpers.osp import save_layouts
from helpers.video import stream_video
from helpers.wan import official_state_dict, random_wan

LATENTS = torch.randn(16, 4, 14, 18, generator=torch.Generator().manual_seed(41))
SIZE = tuple(LATENTS.shape[-2:])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "Wan2.1_VAE.pth"
    torch.save(official_state_dict(random_wan(base_dim=8, seed=42, num_res_blocks=0)), path)
    return path


@pytest.fixture(scope="module")
def wan(checkpoint):
    return streamdec.load_vae(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def untiled(wan):
    return stream_video(wan, LATENTS, [4])


@pytest.fixture(scope="module")
def family_vaes(wan, tmp_path_factory):
    osp = tmp_path_factory.mktemp("memory_osp")
    return {
        "wan2.1": (wan, SIZE),
        "wan2.2": (streamdec.load_vae(random_wan(base_dim=8, seed=45, version="2.2"), device="cpu"), (5, 7)),
        "hunyuan": (streamdec.load_vae(random_hunyuan(), device="cpu"), (3, 5)),
        "wfvae": (streamdec.load_vae(save_layouts("wfvae", osp)["folder"], device="cpu"), (4, 6)),
        "causalvae": (streamdec.load_vae(save_layouts("causalvae_v12", osp)["folder"], device="cpu"), (4, 6)),
    }


def traced_decode(vae, size, frames, tile=None) -> int:
    """The peak bytes a MemoryTrace counts while `vae` really decodes `frames` random latent frames
    (each made inside the trace, as it would be copied to the device)."""
    trace = MemoryTrace()
    with trace:
        stream = StreamDecoder(vae, tile=tile)
        for _ in range(frames):
            hand_over(stream.decode_videos(torch.randn(1, vae.latent_channels, 1, *size)))
        hand_over(stream.close_videos())
    return trace.peak


def hand_over(videos) -> None:
    for video in videos:
        if video is not None:
            to_uint8(video)
        del video


def test_trace_counts_storages_while_alive():
    trace = MemoryTrace()
    with trace:
        a = torch.empty(1000)  # 4000 bytes
        b = a[10:20]  # a view: no new storage
        c = torch.empty(250, dtype=torch.float64)  # 2000 bytes
        del a, c
        d = torch.empty(100)
    assert trace.peak == 6000
    assert trace.now == 4000 + 400  # b keeps a's storage alive
    del b, d


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2", "hunyuan", "wfvae", "causalvae"])
def test_estimate_equals_what_a_real_decode_allocates(family_vaes, family):
    # The meta-device run is the same code: it allocates the same tensors as the real one, and
    # its few latent frames reach the steady state: a longer real decode needs no more.
    vae, size = family_vaes[family]
    estimated = estimate_peak(vae, size) - memory.weight_bytes(vae, "none")
    assert estimated == traced_decode(vae, size, vae.family_spec.steady_latents + 3) > 0


@pytest.mark.parametrize("family", ["wan2.1", "wfvae"])
def test_estimate_with_several_frames_per_call_equals_a_real_decode(family_vaes, family):
    vae, size = family_vaes[family]
    estimated = estimate_peak(vae, size, frames_per_call=3) - memory.weight_bytes(vae, "none")
    trace = MemoryTrace()
    with trace:
        stream = StreamDecoder(vae, frames_per_call=3)
        for _ in range(4):
            hand_over(stream.decode_videos(torch.randn(1, vae.latent_channels, 3, *size)))
        hand_over(stream.close_videos())
    assert estimated == trace.peak > estimate_peak(vae, size) - memory.weight_bytes(vae, "none")


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2"])
def test_tiled_estimate_equals_what_a_real_tiled_decode_allocates(family_vaes, family):
    vae, size = family_vaes[family]
    estimated = estimate_peak(vae, size, tile=(3, 4), park=False) - memory.weight_bytes(vae, "none")
    assert estimated == traced_decode(vae, size, 5, tile=(3, 4))


def test_memory_grows_with_the_frame_not_with_the_video(wan):
    # Real decodes, every latent frame traced: a longer video needs not one byte more.
    assert traced_decode(wan, SIZE, 4) == traced_decode(wan, SIZE, 12)
    assert traced_decode(wan, SIZE, 4, tile=(6, 6)) == traced_decode(wan, SIZE, 12, tile=(6, 6))
    assert estimate_peak(wan, (28, 36), 3) > 3 * estimate_peak(wan, SIZE, 3) - 4 * memory.weight_bytes(wan, "none")


def test_parked_tile_caches_leave_the_device(wan):
    size = (40, 48)
    untiled = estimate_peak(wan, size, tile=None)
    parked = [estimate_peak(wan, size, tile=(t, t), park=True) for t in (24, 12, 6)]
    kept = estimate_peak(wan, size, tile=(6, 6), park=False)
    assert parked[0] > parked[1] > parked[2]  # smaller tiles, less memory
    assert parked[0] < untiled < kept  # without parking the halos' caches outweigh what tiles save


def test_one_tile_per_shape_traces_the_same_peak(wan):
    # Parked tiles of one shape use the same memory, so the estimate traces one of each.
    size = (22, 26)
    trace = MemoryTrace(device="meta")
    with torch.device("meta"):
        decoder = wan.family_spec.build(wan.config)
    meta = VAE(wan.family_spec, wan.config, decoder, torch.device("meta"), wan.dtype, wan.stored_dtype, "meta")
    with torch.inference_mode(), trace:  # every tile decoded, caches parked
        stream = wan.family_spec.open_stream(decoder, Plan(tile=(5, 5), park=True))
        z = torch.zeros(1, 16, 1, *size, device="meta")  # alive through each push, as a pushed chunk is
        for _ in range(3):
            hand_over(stream.push(meta.prepare(z, normalized=True)))
    assert len(stream.state.tiles) == 30
    assert all(t.device.type == "cpu" for child in stream.state.tiles.values() for t in child.tensors())  # parked
    assert trace.peak == estimate_peak(wan, size, 3, tile=(5, 5), park=True) - memory.weight_bytes(wan, "none")


def test_block_offload_counts_two_blocks(wan):
    sizes = sorted(sum(p.numel() for p in b.parameters()) for b in wan.decoder.offload_blocks())
    assert memory.weight_bytes(wan, "block") == 4 * (sizes[-1] + sizes[-2])
    assert memory.weight_bytes(wan, "none") == memory.weight_bytes(wan, "model") == 4 * wan.num_parameters()


# ---------------------------------------------------------------------------- plans


def budget_between(low: int, high: int) -> float:
    """A max_vram (GiB) under which a plan needing `high` bytes fails and one needing `low` fits."""
    return (low + high) / 2 / PLAN_MARGIN / GIB


def with_budget(checkpoint, max_vram, **kwargs):
    return streamdec.load_vae(checkpoint, device="cpu", max_vram=max_vram, **kwargs)


def test_a_roomy_budget_changes_nothing(checkpoint, untiled):
    vae = with_budget(checkpoint, 64)
    stream = StreamDecoder(vae)
    stream.start(SIZE)
    assert (stream.plan.offload, stream.plan.tile) == ("none", None) and vae.offload == "auto"  # the VAE as loaded
    assert torch.equal(stream_video(vae, LATENTS, [4]), untiled)


def test_block_offload_before_tiles(checkpoint, wan, untiled):
    none = estimate_peak(wan, SIZE, offload="none")
    block = estimate_peak(wan, SIZE, offload="block")
    vae = with_budget(checkpoint, budget_between(block, none))
    plan = plan_decode(vae, SIZE)
    assert (plan.offload, plan.tile, plan.peak_bytes) == ("block", None, block)
    assert torch.equal(stream_video(vae, LATENTS, [1, 3]), untiled)
    assert 0 < vae.offloader.peak_resident_bytes <= memory.weight_bytes(vae, "block")  # decoded block by block


def test_tiles_when_offload_is_not_enough(checkpoint, wan):
    size = (40, 48)  # large enough against the halo for tiles to save memory even unparked (on the CPU)
    block = estimate_peak(wan, size, offload="block")
    tiled = estimate_peak(wan, size, offload="block", tile=(32, 32))
    assert tiled < block
    vae = with_budget(checkpoint, budget_between(tiled, block))
    plan = plan_decode(vae, size)
    assert plan.tile == (32, 32) and plan.peak_bytes <= vae.max_vram * GIB * PLAN_MARGIN
    latents = torch.randn(16, 2, *size, generator=torch.Generator().manual_seed(43))
    out = stream_video(vae, latents, [2], tile="auto")
    assert (out - stream_video(wan, latents, [2])).abs().max() <= 1e-4


def test_the_real_decode_stays_under_the_plan(checkpoint, wan):
    size = (40, 48)
    vae = with_budget(checkpoint, estimate_peak(wan, size, offload="block", tile=(16, 16)) / PLAN_MARGIN / GIB)
    plan = plan_decode(vae, size)
    assert plan.tile is not None
    planned = streamdec.load_vae(checkpoint, device="cpu", offload=plan.offload)  # decoded as the plan says
    assert traced_decode(planned, size, 6, tile=plan.tile) + memory.weight_bytes(vae, plan.offload) <= plan.peak_bytes


def test_an_unmet_budget_names_the_smallest_that_would_do(checkpoint):
    vae = with_budget(checkpoint, 1e-4)
    with pytest.raises(BudgetError, match=r"too little to decode 144x112 video .* smallest budget that would do is "
                                          r"about [\d.e-]+ GiB \(offload block, ") as err:  # fmt: skip
        plan_decode(vae, SIZE)
    assert "\n" not in str(err.value)
    needed = float(re.search(r"about ([\d.e-]+) GiB", str(err.value)).group(1))
    smallest = min(estimate_peak(vae, SIZE, offload=offload, tile=tile)
                   for offload in ("none", "block") for tile in memory.tile_choices(vae, SIZE)) / PLAN_MARGIN / GIB  # fmt: skip
    assert smallest <= needed <= 1.1 * smallest
    plan_decode(with_budget(checkpoint, needed), SIZE)  # enough, as promised


def test_two_streams_with_their_own_plans_share_one_vae(checkpoint, wan):
    """A plan belongs to its stream: two streams of different frame sizes and budgets on one VAE,
    their pushes interleaved, each decode what it decodes alone and each stays within its own budget."""
    large = (40, 48)
    latents = torch.randn(16, 4, *large, generator=torch.Generator().manual_seed(46))
    tiled = estimate_peak(wan, large, offload="block", tile=(32, 32))
    too_much = min(estimate_peak(wan, large, offload="block"), estimate_peak(wan, large, offload="none", tile=(32, 32)))
    vae = with_budget(checkpoint, 64)
    streams = {"small": StreamDecoder(vae), "large": StreamDecoder(vae, max_vram=budget_between(tiled, too_much))}
    inputs = {"small": LATENTS, "large": latents}
    traces = {name: MemoryTrace() for name in streams}  # each counts its own stream's tensors
    resident = {name: 0 for name in streams}
    frames = {name: [] for name in streams}
    for t in range(4):
        for name, stream in streams.items():
            vae.offloader.peak_resident_bytes = 0
            with traces[name]:  # the frames are copied out, so the trace holds no frame the test keeps
                frames[name] += [f.copy() for f in stream.push(inputs[name][:, t : t + 1])]
            resident[name] = max(resident[name], vae.offloader.peak_resident_bytes)
    for name, stream in streams.items():
        with traces[name]:
            assert stream.close() == []
    small, large_plan = streams["small"].plan, streams["large"].plan
    assert (small.offload, small.tile) == ("none", None) and (large_plan.offload, large_plan.tile) == ("block", (32, 32))
    assert vae.offload == "auto" and vae.max_vram == 64  # the VAE itself is as loaded
    alone = {"small": streamdec.decode_frames(wan, LATENTS, frames_per_call=1),  # as the pushes above
             "large": streamdec.decode_frames(wan, latents, tile=32, frames_per_call=1)}  # fmt: skip
    for name, stream in streams.items():
        assert all(np.array_equal(a, b) for a, b in zip(frames[name], alone[name], strict=True))
        assert resident[name] <= memory.weight_bytes(vae, stream.plan.offload)
        assert traces[name].peak + resident[name] <= stream.plan.peak_bytes <= stream.max_vram * GIB * PLAN_MARGIN


def test_a_named_offload_mode_is_kept(checkpoint, wan):
    none = estimate_peak(wan, SIZE, offload="none")
    vae = with_budget(checkpoint, 2 * none / PLAN_MARGIN / GIB, offload="model")
    assert plan_decode(vae, SIZE).offload == "model"
    with pytest.raises(BudgetError, match="or load with offload='block' or 'auto'"):
        plan_decode(with_budget(checkpoint, 0.9 * none / GIB, offload="none"), SIZE)


def test_a_named_tile_is_kept(checkpoint, wan):
    vae = with_budget(checkpoint, 64)
    assert plan_decode(vae, SIZE, tile=(7, 7)).tile == (7, 7)
    with pytest.raises(BudgetError, match="let tile='auto' choose tiles"):
        plan_decode(with_budget(checkpoint, 1e-4), SIZE, tile=None)


def test_windowed_families_are_never_retiled(family_vaes):
    vae, size = family_vaes["causalvae"]
    assert memory.tile_choices(vae, size) == [Blended((64, 64), 0.125)]  # its reference's own tiles: part of its output
    vae, size = family_vaes["wfvae"]
    assert memory.tile_choices(vae, size) == [None]  # no exact tiling


def test_plans_are_made_once_per_size(checkpoint, monkeypatch):
    vae = with_budget(checkpoint, 64)
    first = plan_decode(vae, SIZE, 5)
    monkeypatch.setattr(memory, "_traced_peak", lambda *args: pytest.fail("planned twice"))
    assert plan_decode(vae, SIZE, 9) is first  # lengths past the steady state plan the same
    vae.max_vram = 32
    with pytest.raises(pytest.fail.Exception):
        plan_decode(vae, SIZE, 5)  # another budget: a new plan


def test_switching_offload_modes_keeps_the_output(checkpoint, untiled):
    vae = streamdec.load_vae(checkpoint, device="cpu")
    for mode in ("block", "model", "none", "block"):
        vae.set_offload(mode)
        assert vae.offload == mode
        assert torch.equal(stream_video(vae, LATENTS, [4]), untiled)
    vae.set_offload("none")
    assert all(p.numel() > 0 for p in vae.decoder.parameters())


@pytest.mark.parametrize("bad", [0, -1, "20", True, float("nan"), float("inf")])
def test_bad_max_vram(checkpoint, bad):
    with pytest.raises(ValueError, match="max_vram must be a positive number of GiB"):
        with_budget(checkpoint, bad)


def test_auto_offload_needs_a_budget(checkpoint):
    with pytest.raises(ValueError, match="offload='auto' lets max_vram choose"):
        streamdec.load_vae(checkpoint, device="cpu", offload="auto")


def test_decode_to_file_refuses_an_unmet_budget_before_writing(checkpoint, tmp_path):
    out = tmp_path / "video.mp4"
    with pytest.raises(BudgetError):
        streamdec.decode_to_file(with_budget(checkpoint, 1e-4), LATENTS, out, progress=False)
    assert not out.exists()


def test_cli_max_vram(checkpoint, tmp_path, capsys):
    latents = tmp_path / "latents.pt"
    torch.save(LATENTS, latents)
    out = tmp_path / "out.mp4"
    assert main(["decode", str(latents), "--vae", str(checkpoint), "-o", str(out), "--device", "cpu",
                 "--max-vram", "0.05"]) == 0  # fmt: skip
    assert out.stat().st_size > 0
    assert "max-vram 0.05 GiB: offload none, untiled, 2 latent frames a call, about" in capsys.readouterr().err
    code = main(["decode", str(latents), "--vae", str(checkpoint), "-o", str(tmp_path / "no.mp4"),
                 "--device", "cpu", "--max-vram", "0.00001"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "smallest budget that would do is about" in err
    assert not (tmp_path / "no.mp4").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["decode", str(latents), "--vae", str(checkpoint), "-o", str(out), "--max-vram", "lots"])
    assert exit_.value.code == 2


# ---------------------------------------------------------------------------- on a GPU

@pytest.mark.cuda
def test_cuda_peak_stays_under_max_vram(checkpoint, wan):
    size = (60, 80)
    latents = torch.randn(16, 5, *size, generator=torch.Generator().manual_seed(44))
    reference = stream_video(wan, latents, [5])
    full = estimate_peak(streamdec.load_vae(checkpoint, device="cuda"), size)
    for share in (0.6, 0.3):  # block offload, then tiles
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        vae = streamdec.load_vae(checkpoint, device="cuda", max_vram=share * full / GIB)
        torch.cuda.reset_peak_memory_stats()
        out = stream_video(vae, latents, [2, 3], tile="auto")
        assert torch.cuda.max_memory_allocated() - base <= vae.max_vram * GIB  # weights, caches, workspaces
        assert (out - reference).abs().max() <= 1e-4
        del vae


@pytest.mark.cuda
def test_cuda_tile_caches_wait_on_the_host(checkpoint):
    vae = streamdec.load_vae(checkpoint, device="cuda")
    stream = StreamDecoder(vae, tile=6)
    stream.push(LATENTS[:, :2])
    state = stream.stream.state
    caches = [t for child in state.tiles.values() for t in child.tensors()]
    assert caches and all(t.device.type == "cpu" and t.is_pinned() for t in caches)
    assert all(t.device.type == "cuda" for t in state.history.values())
