"""Resumable decodes: `streamdec decode --resume` killed with SIGKILL at random points, several times,
then run to the end, gives the file an uninterrupted decode gives (frame-exact with a lossless codec;
same frames and timestamps with a lossy one), for a causal (Wan), a lookahead (WF-VAE) and a windowed
(CausalVAE) family. And what it refuses."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import streamdec
from streamdec import resume, sinks
from streamdec.cli import main
from streamdec.resume import Checkpoints
from streamdec.stream import decode_frames, decode_to_file

from helpers.cogvideox import random_cogvideox
from helpers.cosmos import random_cosmos
from helpers.hunyuan15 import random_hunyuan15
from helpers.kvae3d import random_kvae3d
from helpers.osp import save_layouts

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def jobs(checkpoints, tmp_path_factory):
    """(checkpoint, latents file, latents) of a causal, a lookahead and a windowed family."""
    root = tmp_path_factory.mktemp("resume")
    osp = {name: save_layouts(name, root) for name in ("wfvae", "causalvae_v12")}
    found = {}
    for family, ckpt, shape in [("wan", checkpoints["official-pth"], (16, 10, 12, 12)),
                                ("wfvae", osp["wfvae"]["folder"], None),
                                ("causalvae", osp["causalvae_v12"]["folder"], None)]:  # fmt: skip
        vae = streamdec.load_vae(ckpt, device="cpu")
        shape = shape or (vae.latent_channels, 14, 8, 8)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        save_file({"latents": z}, root / f"{family}.safetensors")
        found[family] = (ckpt, root / f"{family}.safetensors", z, vae)
    return found


def decoded(path: Path) -> list[tuple[int, np.ndarray]]:
    with av.open(str(path)) as container:
        return [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


# One latent frame per decoder call throughout: states are saved between calls, and the kills below
# aim at states of single latent frames (and uint8 rounding can differ between call sizes).
ONE_A_CALL = ("--frames-per-call", "1")


def cli(ckpt, latents, out, *extra) -> list[str]:
    return [sys.executable, "-m", "streamdec", "decode", str(latents), "--vae", str(ckpt), "-o", str(out),
            "--device", "cpu", "--quiet", *ONE_A_CALL, *extra]  # fmt: skip


def kill_at(command: list[str], folder: Path, latent_frame: int, delay: float) -> bool:
    """Run `command` and SIGKILL it `delay` s after it has saved a state at `latent_frame` or later;
    True if it was killed before it finished."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            try:
                saved = [int(f.name.split("-")[0]) for f in folder.glob("*.pt")]
            except FileNotFoundError:  # not made yet, or removed by a decode that just finished
                saved = []
            if saved and max(saved) >= latent_frame:
                time.sleep(delay)
                break
            time.sleep(0.005)
        killed = proc.poll() is None
        proc.kill()
    finally:
        _, err = proc.communicate()
    assert killed or proc.returncode == 0, err.decode()
    return killed


def kill_and_finish(command: list[str], out: Path, latent_frames: int, seed: int) -> int:
    """Kill `command` at three random points, checking the file plays each time; then finish it."""
    rng = random.Random(seed)
    folder = out.with_name(f".{out.name}.resume")
    kills = 0
    for target in sorted(rng.sample(range(1, latent_frames - 2), 3)):
        if kill_at(command, folder, target, rng.uniform(0, 0.05)):
            kills += 1
            if out.exists():  # it does once the encoder has given out a frame: then it plays
                decoded(out)
    done = subprocess.run(command, cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert not folder.exists(), "the state was not removed after the decode finished"
    return kills


@pytest.mark.parametrize("family", ["wan", "wfvae", "causalvae"])
def test_killed_lossless_decodes_resume_to_the_uninterrupted_frames(jobs, family, tmp_path):
    ckpt, latents, z, vae = jobs[family]
    out = tmp_path / "video.mkv"
    command = cli(ckpt, latents, out, "--codec", "ffv1", "--resume", "--resume-every", "1")
    kills = kill_and_finish(command, out, z.shape[1], seed=len(family))
    assert kills >= 2, "the decode finished before it could be killed: make it longer"
    frames = [f for _, f in decoded(out)]
    reference = list(decode_frames(vae, z, frames_per_call=1))
    assert len(frames) == len(reference) == vae.frames_for(z.shape[1])
    for i, (ours, theirs) in enumerate(zip(frames, reference)):
        assert np.array_equal(ours, theirs), f"frame {i} differs from the uninterrupted decode"


def test_killed_lossy_decode_resumes_with_the_same_frames_and_timestamps(jobs, tmp_path):
    ckpt, latents, z, vae = jobs["wan"]
    whole = tmp_path / "whole.mp4"
    assert subprocess.run(cli(ckpt, latents, whole, "--resume"), cwd=ROOT).returncode == 0
    out = tmp_path / "video.mp4"
    assert kill_and_finish(cli(ckpt, latents, out, "--resume", "--resume-every", "1"), out, z.shape[1], seed=7) >= 2
    ours, theirs = decoded(out), decoded(whole)
    assert [pts for pts, _ in ours] == [pts for pts, _ in theirs]
    assert len(ours) == vae.frames_for(z.shape[1])
    for (_, a), (_, b) in zip(ours, theirs):  # a new group of pictures where a run went on; the same picture
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


class Killed(Exception):
    pass


def interrupted(vae, z, out: Path, after: int, **options) -> None:
    """A resumable decode into `out` stopped after `after` frames (as a kill would, leaving its state)."""
    real_put = sinks.FrameWriter.put
    count = 0

    def put(self, frame):
        nonlocal count
        count += 1
        if count > after:
            raise Killed
        real_put(self, frame)

    sinks.FrameWriter.put = put
    try:
        with pytest.raises(Killed):
            decode_to_file(vae, z, out, resume=True, resume_every=1, progress=False, frames_per_call=1, **options)
    finally:
        sinks.FrameWriter.put = real_put


@pytest.mark.parametrize("family", ["cogvideox", "kvae3d", "hunyuanvideo1.5", "cosmos"])
def test_every_resumable_stream_goes_on_exactly(family, tmp_path):
    """Replayed calls with carried caches (CogVideoX, KVAE-3D), and kept attention keys and values
    (HunyuanVideo-1.5, Cosmos): interrupted twice, then finished, frame-exact."""
    model = {"cogvideox": random_cogvideox, "kvae3d": random_kvae3d, "hunyuanvideo1.5": random_hunyuan15,
             "cosmos": random_cosmos}[family]()  # fmt: skip
    vae = streamdec.load_vae(model, device="cpu")
    assert vae.family == family
    z = torch.randn(vae.latent_channels, 7, 2, 3, generator=torch.Generator().manual_seed(5))
    out = tmp_path / "v.mkv"
    for after in (3, 11):
        interrupted(vae, z, out, after=after, codec="ffv1")
    decode_to_file(vae, z, out, codec="ffv1", resume=True, resume_every=1, progress=False, frames_per_call=1)
    frames = [f for _, f in decoded(out)]
    reference = list(decode_frames(vae, z, frames_per_call=1))
    assert len(frames) == len(reference)
    assert all(np.array_equal(a, b) for a, b in zip(frames, reference))
    assert not out.with_name(".v.mkv.resume").exists()


def test_the_state_holds_no_frames_and_does_not_grow(jobs, tmp_path):
    _, _, z, vae = jobs["wan"]
    out = tmp_path / "v.mkv"
    interrupted(vae, z, out, after=30, codec="ffv1")
    states = [torch.load(f, weights_only=True) for f in sorted(out.with_name(".v.mkv.resume").glob("*.pt"))]
    assert len(states) == resume.KEEP and states[0]["frames_in"] >= 3

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
        return [t for item in items for t in tensors(item)]

    sizes = {sum(t.numel() * t.element_size() for t in tensors(s["stream"])) for s in states}
    assert len(sizes) == 1, f"the state grows with the video: {sizes}"
    height, width = (s * vae.spatial_ratio for s in z.shape[-2:])
    frames = [t for s in states for t in tensors(s["stream"]) if t.dim() == 5 and t.shape[1] == 3 and t.shape[-2:] == (height, width)]
    assert not frames, "a state holds decoded frames"


def test_resuming_with_other_settings_or_latents_is_refused_in_one_line(jobs, tmp_path):
    ckpt, latents, z, vae = jobs["wan"]
    out = tmp_path / "v.mkv"
    interrupted(vae, z, out, after=9, codec="ffv1")
    before = out.read_bytes()
    other = tmp_path / "other.safetensors"
    save_file({"latents": z + 1}, other)
    for argv, problem in [([str(latents), "--codec", "libx264rgb"], "codec changed (ffv1 -> libx264rgb)"),
                          ([str(other), "--codec", "ffv1"], "the latents differ")]:  # fmt: skip
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["decode", *argv, "--vae", str(ckpt), "-o", str(out), "--device", "cpu", "--resume", "--quiet",
                         *ONE_A_CALL])  # fmt: skip
        assert code == 1
        message = err.getvalue().strip()
        assert problem in message and "\n" not in message and "Traceback" not in message, message
        assert out.read_bytes() == before  # the interrupted run's file is left as it was


def test_resuming_needs_a_file(jobs, tmp_path):
    _, _, z, vae = jobs["wan"]
    with pytest.raises(streamdec.StreamdecError, match="resuming needs a regular output file"):
        decode_to_file(vae, z, io.BytesIO(), format="nut", resume=True)
    with pytest.raises(streamdec.StreamdecError, match="raw rgb24 output cannot be resumed"):
        decode_to_file(vae, z, tmp_path / "v.rgb", format="rgb24", resume=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "4"])
def test_a_bad_interval_is_refused_before_anything_is_written(jobs, tmp_path, every):
    _, _, z, vae = jobs["wan"]
    with pytest.raises(streamdec.StreamdecError, match="resume_every must be a whole number of latent frames"):
        decode_to_file(vae, z, tmp_path / "v.mkv", resume=True, resume_every=every)
    assert not list(tmp_path.iterdir())


def test_an_existing_output_without_state_still_needs_overwrite(jobs, tmp_path):
    ckpt, latents, _, _ = jobs["wan"]
    out = tmp_path / "v.mp4"
    out.write_bytes(b"precious")
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["decode", str(latents), "--vae", str(ckpt), "-o", str(out), "--resume", "--quiet"])
    assert code == 1 and "add --overwrite" in err.getvalue() and out.read_bytes() == b"precious"


def test_saving_by_time_takes_at_most_a_twentieth_of_the_decode(monkeypatch, tmp_path):
    clock = [100.0]
    monkeypatch.setattr(resume.time, "monotonic", lambda: clock[0])
    checkpoints = Checkpoints(tmp_path / "v.mp4")
    checkpoints.begin({"job": 1})
    assert not checkpoints.due(1)
    clock[0] += resume.MIN_INTERVAL
    assert checkpoints.due(2)
    real_save = torch.save

    def slow_save(obj, f):
        clock[0] += 2.0  # a save that takes 2 s
        real_save(obj, f)

    monkeypatch.setattr(resume.torch, "save", slow_save)
    checkpoints.save({"frames_in": 2, "frames_out": 5, "stream": {}})
    clock[0] += 39.0
    assert not checkpoints.due(3)
    clock[0] += 1.0
    assert checkpoints.due(3)  # 40 s of decoding for 2 s of saving: 5%
    assert json.loads((checkpoints.folder / "job.json").read_text()) == {"job": 1}
