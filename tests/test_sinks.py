"""Frames out through PyAV: lossless round trips, containers, the writer thread, clean failure."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from fractions import Fraction

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
        streamdec.decode_to_file(vae, LATENTS, path, codec="ffv1", progress=False, frames_per_call=1)
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


# ---------------------------------------------------------------------------- colour


BARS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0],
                 [255, 255, 255], [0, 0, 0], [128, 64, 32], [30, 200, 120]], np.uint8)  # fmt: skip
CHART = np.repeat(np.repeat(BARS[None], 16, axis=1), 48, axis=0)  # 48 x 160: ten bars of 16 pixels
PIPES = [("y4m", "rawvideo"), ("nut", "libx264"), ("nut", "rawvideo"), ("matroska", "libx264"),
         ("matroska", "rawvideo"), ("mp4", "libx264")]  # fmt: skip


def chart_through(fmt: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    sink = VideoSink(buffer, 160, 48, format=fmt, codec=codec)
    for _ in range(3):
        sink.write(CHART)
    sink.close()
    return buffer.getvalue()


def bar_error(frame: np.ndarray) -> int:
    """The largest error at the bars' centres (away from chroma subsampling at their edges)."""
    return int(np.abs(frame[24, 8::16].astype(int) - BARS.astype(int)).max())


@pytest.mark.parametrize("fmt, codec", PIPES)
def test_saturated_colours_read_back_right_with_the_readers_defaults(fmt, codec):
    data = chart_through(fmt, codec)
    back = read_back(io.BytesIO(data), format="yuv4mpegpipe" if fmt == "y4m" else fmt)
    assert len(back) == 3 and all(bar_error(f) <= 3 for f in back)


def test_the_chart_would_show_a_wrong_colour_matrix():
    """Not vacuous: y4m written with BT.709, which it cannot say, reads back visibly wrong."""
    buffer = io.BytesIO()
    sink = VideoSink(buffer, 160, 48, format="y4m")
    sink._matrix = "ITU709"
    sink.write(CHART)
    sink.close()
    assert bar_error(read_back(io.BytesIO(buffer.getvalue()), format="yuv4mpegpipe")[0]) > 15


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (apt-get install ffmpeg)")
def test_piped_into_ffmpeg_the_colours_survive(tmp_path):
    out = tmp_path / "out.mp4"
    proc = subprocess.run(["ffmpeg", "-v", "error", "-i", "-", str(out)], input=chart_through("y4m", "rawvideo"),
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    # y4m cannot carry a matrix: ffmpeg writes the file untagged, which every reader takes as BT.601
    assert frames[0].colorspace in (2, 5, 6)  # unspecified, BT.470BG, SMPTE 170M: all BT.601
    assert all(bar_error(f.to_ndarray(format="rgb24")) <= 3 for f in frames)


def test_frames_of_the_wrong_size_are_refused(tmp_path):
    sink = VideoSink(tmp_path / "v.mkv", 64, 48, codec="ffv1")
    with pytest.raises(SinkError, match=r"frame is uint8 \(48, 32, 3\), but this video takes uint8 \(48, 64, 3\)"):
        sink.write(np.zeros((48, 32, 3), np.uint8))
    with pytest.raises(SinkError, match="frame is float32"):
        sink.write(np.zeros((48, 64, 3), np.float32))
    sink.write(np.zeros((48, 64, 3), np.uint8))
    sink.close()
    assert len(read_back(tmp_path / "v.mkv")) == 1


def test_odd_sizes_need_a_format_that_takes_them(tmp_path):
    with pytest.raises(SinkError, match=r"yuv420p needs a frame size divisible by 2x2, not 63x48; use the yuv444p"):
        VideoSink(tmp_path / "v.mkv", 63, 48)
    assert not (tmp_path / "v.mkv").exists()
    sink = VideoSink(tmp_path / "v.mkv", 63, 47, pix_fmt="yuv444p")  # no complaint, no advice to use itself
    sink.write(np.zeros((47, 63, 3), np.uint8))
    sink.close()
    assert len(read_back(tmp_path / "v.mkv")) == 1


def test_an_existing_file_is_replaced_only_once_a_frame_is_in_it(tmp_path):
    path = tmp_path / "v.mkv"
    path.write_bytes(b"precious")
    sink = VideoSink(path, 64, 48, codec="ffv1")
    assert path.read_bytes() == b"precious"  # the header went to a file beside it
    sink.write(np.zeros((48, 64, 3), np.uint8))
    sink.write(np.zeros((48, 64, 3), np.uint8))  # Matroska writes a frame's cluster when the next comes
    assert path.read_bytes() != b"precious" and not list(tmp_path.glob(".*.partial"))
    sink.close()
    assert len(read_back(path)) == 2


def test_a_failure_before_any_frame_keeps_the_old_file(tmp_path):
    class FullDisk:
        def encode(self, frame=None):
            raise OSError(28, "No space left on device")

    path = tmp_path / "v.mp4"
    path.write_bytes(b"precious")
    sink = VideoSink(path, 64, 48)
    sink.encoder = FullDisk()
    with pytest.raises(SinkError, match="cannot write .* after 0 frames: No space left on device"):
        sink.write(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(OSError):
        sink.close()
    assert path.read_bytes() == b"precious" and not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("fps", [0.0001, float("inf"), float("nan"), -2, 5000, "16"])
def test_frame_rates_that_cannot_be_written(tmp_path, fps):
    with pytest.raises(SinkError, match="fps must be positive, from 0.01 to 1000"):
        VideoSink(tmp_path / "v.mp4", 64, 48, fps=fps)
    assert not list(tmp_path.iterdir())


def test_frame_rates_are_written_exactly(tmp_path):
    for fps, rate in [(23.976, Fraction(24000, 1001)), (0.5, Fraction(1, 2)), (16, Fraction(16))]:
        sink = VideoSink(tmp_path / "v.nut", 64, 48, fps=fps, codec="ffv1")
        for _ in range(3):
            sink.write(np.zeros((48, 64, 3), np.uint8))
        sink.close()
        with av.open(str(tmp_path / "v.nut")) as container:
            assert container.streams.video[0].average_rate == rate
        (tmp_path / "v.nut").unlink()


@pytest.mark.parametrize("codec, crf, message", [("libx264", 99, "from 0 to 51"), ("libx264", -1, "from 0 to 51"),
                                                 ("libsvtav1", 0, "from 1 to 63"), ("ffv1", 10, "does not apply")])  # fmt: skip
def test_crf_out_of_range(tmp_path, codec, crf, message):
    with pytest.raises(SinkError, match=message):
        VideoSink(tmp_path / "v.mkv", 64, 48, codec=codec, crf=crf)


def test_a_frame_too_large_to_encode_is_named_with_its_size():
    with pytest.raises(SinkError, match=r"cannot encode with libx264 .*at 40000x30000: "):
        VideoSink(io.BytesIO(), 40000, 30000, format="matroska")


def test_an_audio_encoder_is_not_a_video_one(tmp_path):
    with pytest.raises(SinkError, match="aac is an audio encoder, not a video one; try libx264"):
        VideoSink(tmp_path / "v.mp4", 64, 48, codec="aac")
    assert not list(tmp_path.iterdir())
