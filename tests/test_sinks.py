"""Frames out through PyAV: lossless round trips, containers, the writer thread, clean failure."""

from __future__ import annotations

import io
import time

import av
import numpy as np
import pytest
import torch

import streamdec
from streamdec.sinks import FrameWriter, SinkError, VideoSink, container_format

LATENTS = torch.randn(16, 3, 5, 7, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def vae(checkpoints):
    return streamdec.load_vae(checkpoints["official-pth"], device="cpu")


@pytest.fixture(scope="module")
def frames(vae):
    return list(streamdec.decode_frames(vae, LATENTS))


def read_back(path_or_file, **open_args) -> list[np.ndarray]:
    with av.open(path_or_file, **open_args) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("name, codec", [("video.mkv", "ffv1"), ("video.mp4", "libx264rgb"), ("video.nut", "ffv1")])
def test_lossless_round_trip(vae, frames, tmp_path, name, codec):
    written = streamdec.decode_to_file(vae, LATENTS, tmp_path / name, codec=codec, progress=False)
    back = read_back(tmp_path / name)
    assert written == len(back) == len(frames) == 9
    assert all(np.array_equal(a, b) for a, b in zip(frames, back))


@pytest.mark.parametrize("name", ["v.mp4", "v.mkv", "v.webm", "v.mov", "v.nut", "v.y4m"])
def test_every_container_plays(vae, frames, tmp_path, name):
    streamdec.decode_to_file(vae, LATENTS, tmp_path / name, progress=False)
    back = read_back(tmp_path / name)
    assert len(back) == len(frames)
    # lossy, but the same pictures: mean error of a few levels on this noisy content
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(frames, back)]) < 20


def test_mp4_is_fragmented(vae, tmp_path):
    streamdec.decode_to_file(vae, LATENTS, tmp_path / "v.mp4", progress=False)
    data = (tmp_path / "v.mp4").read_bytes()
    assert b"moof" in data and b"mvex" in data


def test_fragmented_mp4_to_a_stream(vae, frames):
    buffer = io.BytesIO()
    streamdec.decode_to_file(vae, LATENTS, buffer, format="mp4", codec="libx264rgb", progress=False)
    back = read_back(io.BytesIO(buffer.getvalue()))
    assert all(np.array_equal(a, b) for a, b in zip(frames, back))


def test_rgb24_raw(vae, frames):
    buffer = io.BytesIO()
    streamdec.decode_to_file(vae, LATENTS, buffer, format="rgb24", progress=False)
    assert buffer.getvalue() == b"".join(f.tobytes() for f in frames)


def test_encoder_options_pass_through(vae, tmp_path):
    streamdec.decode_to_file(vae, LATENTS, tmp_path / "v.mkv", options={"x264-params": "keyint=1"}, progress=False)
    with av.open(tmp_path / "v.mkv") as container:
        assert all(p.is_keyframe for p in container.demux(video=0) if p.size)


def test_format_names():
    assert container_format("a.MKV", None) == "matroska"
    assert container_format("a.mp4", "y4m") == "yuv4mpegpipe"
    assert container_format(None, None) == "yuv4mpegpipe"
    with pytest.raises(SinkError, match="cannot tell the container from the extension '.avi'"):
        container_format("a.avi", None)
    with pytest.raises(SinkError, match="unknown output format 'flv'"):
        container_format("a.mp4", "flv")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"codec": "libnope"}, "unknown video encoder 'libnope'"),
        ({"codec": "libsvtav1", "pix_fmt": "rgb24"}, "libsvtav1 cannot encode pixel format 'rgb24'"),
        ({"preset": "warp-speed"}, "cannot encode with libx264"),
        ({"fps": 0}, "fps must be positive"),
    ],
)
def test_bad_encoder_settings_fail_before_decoding_and_leave_no_file(vae, tmp_path, kwargs, message):
    path = tmp_path / "v.mp4"
    with pytest.raises(SinkError, match=message) as err:
        streamdec.decode_to_file(vae, LATENTS, path, progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert not path.exists()


def test_decoder_error_midway_keeps_a_playable_file(vae, tmp_path, monkeypatch):
    real_forward, calls = vae.decoder.forward, []

    def failing_forward(z, state):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_forward(z, state)

    monkeypatch.setattr(vae.decoder, "forward", failing_forward)
    path = tmp_path / "v.mkv"
    with pytest.raises(RuntimeError, match="simulated"):
        streamdec.decode_to_file(vae, LATENTS, path, codec="ffv1", progress=False)
    assert len(read_back(path)) == 1 + 4  # the two latent frames decoded before the error


def test_error_before_the_first_frame_leaves_no_file(vae, tmp_path, monkeypatch):
    def failing_forward(z, state):
        raise RuntimeError("boom")

    monkeypatch.setattr(vae.decoder, "forward", failing_forward)
    path = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        streamdec.decode_to_file(vae, LATENTS, path, progress=False)
    assert not path.exists()


class SlowSink:
    def __init__(self):
        self.frames, self.closed = [], False

    def write(self, frame):
        time.sleep(0.01)
        self.frames.append(frame)

    def close(self):
        self.closed = True


def test_writer_queue_is_bounded():
    sink = SlowSink()
    writer = FrameWriter(sink, depth=2)
    peak = 0
    for i in range(12):
        writer.put(np.full((2, 2, 3), i, np.uint8))
        peak = max(peak, writer.queue.qsize())
    writer.close()
    assert peak <= 2 and [int(f[0, 0, 0]) for f in sink.frames] == list(range(12)) and sink.closed


def test_writer_error_reaches_the_producer():
    class BrokenSink(SlowSink):
        def write(self, frame):
            raise OSError("disk full")

    writer = FrameWriter(BrokenSink(), depth=1)
    with pytest.raises(OSError, match="disk full"):
        with writer:
            for _ in range(100):
                writer.put(np.zeros((2, 2, 3), np.uint8))
    assert not writer.thread.is_alive() and writer.sink.closed


def test_unwritable_target(tmp_path):
    with pytest.raises(SinkError, match="cannot write .*: its folder does not exist"):
        VideoSink(tmp_path / "missing" / "v.mp4", 64, 48)
