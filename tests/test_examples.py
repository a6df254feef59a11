"""The scripts in examples/ run as a user runs them (on a tiny random VAE), so they never rot."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest

from helpers.pipelines import tiny_wan_pipeline, wan_call

EXAMPLES = Path(__file__).parents[1] / "examples"


def run(script: str, *args) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def frames_in(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def vae_file(checkpoints):
    return checkpoints["official-pth"]


def test_autoregressive(vae_file, tmp_path):
    out = run("autoregressive.py", "--vae", vae_file, "-o", tmp_path / "live.mp4", "--chunks", 3,
              "--frames-per-chunk", 2, "--size", "5x7")  # fmt: skip
    assert "chunk 0: 5 frames so far" in out and "chunk 2: 21 frames so far" in out  # shown as they came
    assert frames_in(tmp_path / "live.mp4") == 21


def test_long_video_in_a_budget_and_through_ffmpeg(vae_file, tmp_path):
    out = run("long_video.py", "--vae", vae_file, "-o", tmp_path / "long.mp4", "--minutes", 0.05, "--size", "5x7",
              "--max-vram", 0.5)  # fmt: skip
    assert frames_in(tmp_path / "long.mp4") == 49 and b"moof" in (tmp_path / "long.mp4").read_bytes()
    if shutil.which("ffmpeg"):
        assert "49 frames through ffmpeg" in out and frames_in(tmp_path / "long-ffmpeg.mp4") == 49
    else:
        assert "ffmpeg is not installed" in out


def test_frame_metrics(vae_file):
    out = run("frame_metrics.py", "--vae", vae_file, "--frames", 3)
    assert "frame     8: brightness" in out and "9 frames; largest change" in out


def test_diffusers_pipeline(tmp_path):
    spec = importlib.util.spec_from_file_location("diffusers_pipeline", EXAMPLES / "diffusers_pipeline.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "pipe.mp4"
    assert example.run(tiny_wan_pipeline(), str(out), **wan_call()) == 9  # the script's own run(), a tiny pipeline
    assert frames_in(out) == 9
