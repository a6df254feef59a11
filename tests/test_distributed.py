"""Distributed decode (streamdec.distributed): processes on a gloo group, each decoding a band of rows,
give rank 0 the video one process gives, and diffusers' decode, within 1e-4 in fp32, for Wan 2.1,
Wan 2.2 and HunyuanVideo-1.5 (random weights, norm gains and biases), 2 and 3 processes (unequal
bands), several chunkings, tiles; a rank that dies stops the others with one clear line and leaves
rank 0's file playable up to its last complete frame; `torchrun -m streamdec decode` works; bad
setups are refused in one line.

Each launch starts real processes (tests/helpers/distributed_worker.py), so the cases of one world
size run in one launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import streamdec
from streamdec.distributed import DistributedError, column_tile, split_rows

from helpers.hunyuan import random_hunyuan
from helpers.hunyuan15 import random_hunyuan15
from helpers.hunyuan15 import reference as hunyuan15_reference
from helpers.video import assert_equal_video, stream_video
from helpers.wan import denormalize, official_state_dict, random_wan, reference_decode

WORKER = Path(__file__).parent / "helpers" / "distributed_worker.py"
_g = torch.Generator().manual_seed(22)
LATENTS = {  # odd, non-square; 5 or 7 rows: unequal bands for 2 and 3 ranks
    "wan2.1": torch.randn(16, 4, 7, 5, generator=_g),
    "wan2.2": torch.randn(48, 4, 5, 4, generator=_g),
    "hunyuanvideo1.5": torch.randn(8, 4, 5, 4, generator=_g),
}
CHUNKINGS = {  # latent frames per push: all at once, one at a time, a random split
    "wan2.1": [[4], [1] * 4, [1, 2, 1]],
    "wan2.2": [[4], [1, 3]],
    "hunyuanvideo1.5": [[4], [1] * 4, [2, 2]],
}
DIE_AFTER = 3  # pushes the dying rank makes: 1 + 4 + 4 video frames reach rank 0's file


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family's diffusers model, and where its checkpoint is saved (Wan 2.1 official .pth)."""
    root = tmp_path_factory.mktemp("distributed")
    wan21, wan22, hy15, hunyuan = random_wan(), random_wan(version="2.2", base_dim=8), random_hunyuan15(), random_hunyuan()  # fmt: skip
    torch.save(official_state_dict(wan21), root / "Wan2.1_VAE.pth")
    for name, model in [("wan22", wan22), ("hy15", hy15), ("hunyuan", hunyuan)]:
        model.save_pretrained(root / name)
    return {
        "wan2.1": (wan21, str(root / "Wan2.1_VAE.pth")),
        "wan2.2": (wan22, str(root / "wan22")),
        "hunyuanvideo1.5": (hy15, str(root / "hy15")),
        "hunyuan": (hunyuan, str(root / "hunyuan")),
    }


@pytest.fixture(scope="module")
def references(models):
    """Per family: diffusers' decode and one process's streamdec decode, (3, F, H, W) clamped."""
    out = {}
    for family, z in LATENTS.items():
        model, path = models[family]
        if family == "hunyuanvideo1.5":
            theirs = hunyuan15_reference(model, z[None])
        else:
            theirs = reference_decode(model, denormalize(model, z[None]))[0].clamp(-1, 1)
        ours = stream_video(streamdec.load_vae(path, device="cpu"), z, [z.shape[1]])
        out[family] = (theirs, ours)
    return out


@pytest.fixture(scope="module")
def wan21_frames(models) -> list[np.ndarray]:
    """One process's uint8 frames of the Wan 2.1 latents."""
    return list(streamdec.decode_frames(streamdec.load_vae(models["wan2.1"][1], device="cpu"), LATENTS["wan2.1"]))


def equality_cases(models, chunkings: int) -> list[dict]:
    """Each family in its first `chunkings` chunkings, and Wan 2.1 with two latent frames per call,
    with block offload, with column tiles, gathered as uint8, and with offload under a max_vram
    planned per rank."""
    cases = []
    for family, z in LATENTS.items():
        path = models[family][1]
        cases += [dict(family=family, vae=path, latents=z, chunks=c) for c in CHUNKINGS[family][:chunkings]]
    z, path = LATENTS["wan2.1"], models["wan2.1"][1]
    cases.append(dict(family="wan2.1", vae=path, latents=z, chunks=[4], frames_per_call=2))
    cases.append(dict(family="wan2.1", vae=path, latents=z, chunks=[1, 3], load=dict(offload="block")))
    cases.append(dict(family="wan2.1", vae=path, latents=z, chunks=[3, 1], tile=(6, 2)))  # column tiles
    cases.append(dict(family="wan2.1", vae=path, latents=z, chunks=[2, 2], as_tensor=False))  # uint8 gathered
    cases.append(dict(family="wan2.1", vae=path, latents=z, chunks=[4], max_vram=0.01, load=dict(offload="model")))
    return cases


def bands_of(cases, ranks: int) -> list[list[int]]:
    return [split_rows(c["latents"].shape[2], ranks) for c in cases]


def launch(cases: list[dict], ranks: int, tmp_path: Path, timeout: int = 20) -> tuple[list[int], list[list]]:
    """Run the cases on `ranks` worker processes; their exit codes and each rank's results."""
    job = tmp_path / f"job{ranks}.pt"
    torch.save({"cases": cases, "timeout": timeout}, job)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(job), str(tmp_path / "out")],
                              env={**env, "RANK": str(r)}, stderr=subprocess.PIPE) for r in range(ranks)]  # fmt: skip
    codes = [p.wait(timeout=240) for p in procs]
    results = [torch.load(tmp_path / f"out.rank{r}.pt", weights_only=False) if codes[r] == 0 else None
               for r in range(ranks)]  # fmt: skip
    for r, p in enumerate(procs):
        if codes[r] not in (0, 3):
            pytest.fail(f"rank {r} exited {codes[r]}: {p.stderr.read().decode()[-2000:]}")
        p.stderr.close()
    return codes, results


def check_equal(cases, results, references, wan21_frames):
    for case, got in zip(cases, results):
        assert "error" not in got, (case["family"], got["error"])
        theirs, ours = references[case["family"]]
        if case.get("as_tensor", True):
            assert_equal_video(got["frames"], ours)
            assert_equal_video(got["frames"], theirs)
        else:  # uint8 frames (F, H, W, 3): within one level of one process's
            one = torch.from_numpy(np.stack(wan21_frames))
            assert got["frames"].dtype == torch.uint8 and got["frames"].shape == one.shape
            assert (got["frames"].int() - one.int()).abs().max() <= 1


def test_two_ranks_equal_one_process_and_a_dead_rank_stops_rank_0(models, references, wan21_frames, tmp_path):
    cases = equality_cases(models, chunkings=3)
    out_file = tmp_path / "died.mkv"
    cases.append(dict(family="wan2.1", vae=models["wan2.1"][1], latents=LATENTS["wan2.1"], file=str(out_file),
                      die_after={1: DIE_AFTER}))  # fmt: skip
    codes, results = launch(cases, 2, tmp_path)
    assert codes == [0, 3]
    first = results[0]
    check_equal(cases[:-1], first[:-1], references, wan21_frames)
    assert [r["rows"] for r in first[:-1]] == bands_of(cases[:-1], 2)  # [4, 3] and [3, 2] latent rows
    assert all(r["sent"]["halo"] > 0 and r["sent"]["whole-frame"] > 0 for r in first[:-1])
    assert first[-4]["plan"] == "offload none, tiles of 7x2 latent pixels"  # columns of the frame's height
    assert first[-2]["plan"].startswith("offload model, untiled, about")  # planned (for this rank's band)
    died = first[-1]
    assert "another process of the distributed decode stopped" in died["error"] and "\n" not in died["error"]
    assert "GLHF" not in died["error"] and "pair.cc" not in died["error"]  # gloo's cause, its first sentence
    assert died["frames_written"] == 1 + 4 * (DIE_AFTER - 1)  # every frame whose bands had all arrived
    with av.open(str(out_file)) as container:  # closed cleanly: playable, and holds exactly those frames
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == died["frames_written"]
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(frames, wan21_frames))


def test_three_ranks_unequal_bands_and_refusals(models, references, wan21_frames, tmp_path):
    cases = equality_cases(models, chunkings=2)
    cases.append(dict(family="wan2.1", vae=models["wan2.1"][1], latents=LATENTS["wan2.1"], chunks=[4],
                      chunks_by_rank={1: [2, 2]}))  # rank 1 pushes other chunks  # fmt: skip
    cases.append(dict(family="wan2.1", vae=models["wan2.1"][1], latents=LATENTS["wan2.1"][:, :, :2]))
    cases.append(dict(family="hunyuan", vae=models["hunyuan"][1], latents=torch.randn(16, 2, 4, 4)))
    codes, results = launch(cases, 3, tmp_path)
    assert codes == [0, 0, 0]
    check_equal(cases[:-3], results[0][:-3], references, wan21_frames)
    assert [r["rows"] for r in results[0][:-3]] == bands_of(cases[:-3], 3)  # [3, 2, 2] and [2, 2, 1] latent rows
    assert all("frames" not in r for rank in results[1:] for r in rank[:-3])  # only rank 0 gets frames
    for rank in results:  # every rank refuses: pushes that differ between ranks, too few rows, no exact tiles
        assert rank[-3]["error"].startswith("the ranks disagree on the chunk pushed")
        assert "rank 0: [16, 4, 7, 5, 1], rank 1: [16, 2, 7, 5, 1]" in rank[-3]["error"]
        few_rows, no_tiles = rank[-2]["error"], rank[-1]["error"]
        assert few_rows.startswith("a frame of 2 latent rows cannot be split among 3 processes")
        assert "cannot be decoded across processes" in no_tiles and "exact spatial tiling" in no_tiles


def test_torchrun_cli(models, wan21_frames, tmp_path):
    """`torchrun --nproc-per-node 2 -m streamdec decode …` writes rank 0's file, equal to one process's."""
    z = LATENTS["wan2.1"]
    np.save(tmp_path / "z.npy", z.numpy())
    out = tmp_path / "out.mkv"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "streamdec", "decode", str(tmp_path / "z.npy"), "--vae", models["wan2.1"][1],
                           "-o", str(out), "--codec", "ffv1", "--device", "cpu"],
                          capture_output=True, timeout=240, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert "wrote 13 frames of 40x56" in proc.stderr.decode()
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == len(wan21_frames) == 13
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(frames, wan21_frames))


def test_bands_and_column_tiles():
    assert split_rows(7, 3) == [3, 2, 2] and split_rows(90, 8) == [12, 12, 11, 11, 11, 11, 11, 11]
    with pytest.raises(DistributedError, match="at most 2 processes"):
        split_rows(2, 3)
    assert column_tile(None, 5, 90) is None
    assert column_tile((32, 32), 14, 90) == (90, 32)  # a column of the band's height, as wide
    assert column_tile((8, 8), 16, 90) == (90, 4)  # a band taller than the tile: narrower, same area


def test_group_must_be_initialized(models):
    vae = streamdec.load_vae(models["wan2.1"][1], device="cpu")
    with pytest.raises(DistributedError, match="initialized torch.distributed process group"):
        streamdec.StreamDecoder(vae, group=object())
