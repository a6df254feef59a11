"""Frames out: encoders and pipes that take uint8 (H, W, 3) RGB frames one at a time.

- VideoSink: a PyAV container (mp4, mkv, webm, mov, nut, y4m) on a path or a binary stream.
  mp4 is written fragmented, so a killed process leaves a playable file.
- RawSink: bare rgb24 bytes on a binary stream, for pipes.
- FrameWriter: runs a sink in its own thread behind a bounded queue, so encoding overlaps
  decoding and a slow encoder slows the decoder instead of filling memory.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from .errors import StreamdecError, one_line

# extension -> container format
FORMATS_BY_EXTENSION = {
    ".mp4": "mp4", ".m4v": "mp4", ".mkv": "matroska", ".webm": "webm", ".mov": "mov",
    ".nut": "nut", ".y4m": "yuv4mpegpipe",
}  # fmt: skip
FORMAT_ALIASES = {"mkv": "matroska", "y4m": "yuv4mpegpipe"}
CONTAINERS = ("mp4", "matroska", "webm", "mov", "nut", "yuv4mpegpipe")
PIPE_FORMATS = ("y4m", "rgb24", "nut", "matroska", "mp4")

# codec -> (pixel format, crf, preset): visually lossless defaults; crf 0 / ffv1 are lossless.
CODEC_DEFAULTS = {
    "libx264": ("yuv420p", 18, "fast"),
    "libx265": ("yuv420p", 20, "fast"),
    "libsvtav1": ("yuv420p", 24, "8"),
    "libx264rgb": ("rgb24", 0, "fast"),
    "ffv1": ("bgr0", None, None),
    "rawvideo": ("yuv420p", None, None),
}
DEFAULT_CODEC = {"webm": "libsvtav1", "yuv4mpegpipe": "rawvideo"}  # else libx264
FRAGMENTED_MP4 = "frag_keyframe+empty_moov+default_base_moof"


class SinkError(StreamdecError):
    """Output settings that cannot work; the message says which and what to use instead."""


def container_format(path: str | os.PathLike | None, format: str | None) -> str:
    """The container for `path` (None for a pipe), from `format` or else the extension."""
    if format is not None:
        name = FORMAT_ALIASES.get(format.lower(), format.lower())
        if name not in CONTAINERS and name != "rgb24":
            raise SinkError(f"unknown output format {format!r}; use one of mp4, mkv, webm, mov, nut, y4m or rgb24")
        return name
    if path is None:
        return "yuv4mpegpipe"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS_BY_EXTENSION:
        known = ", ".join(FORMATS_BY_EXTENSION)
        raise SinkError(f"cannot tell the container from the extension {suffix or '(none)'!r} of {path}; "
                        f"use one of {known} or give a format")  # fmt: skip
    return FORMATS_BY_EXTENSION[suffix]


class VideoSink:
    """Encode RGB frames with PyAV into a container written to `target` (a path or a binary
    stream). Everything is checked and the header written on construction, so bad settings
    fail before any decoding."""

    def __init__(self, target: str | os.PathLike | BinaryIO, width: int, height: int, fps: float = 16,
                 codec: str | None = None, crf: int | None = None, preset: str | None = None,
                 pix_fmt: str | None = None, format: str | None = None, options: dict | None = None):  # fmt: skip
        rate = _rate(fps)
        is_path = isinstance(target, (str, os.PathLike))
        fmt = container_format(target if is_path else None, format)
        if fmt == "rgb24":
            raise SinkError("rgb24 is a raw pipe format, not a container; use RawSink or another format")
        codec = codec or DEFAULT_CODEC.get(fmt, "libx264")
        if fmt == "yuv4mpegpipe" and codec != "rawvideo":
            raise SinkError(f"y4m holds uncompressed video only; drop the codec {codec!r} or pick another format")
        try:
            supported = [f.name for f in av.codec.Codec(codec, "w").video_formats or []]
        except (av.codec.codec.UnknownCodecError, ValueError):
            raise SinkError(f"unknown video encoder {codec!r}; try libx264, libx265, libsvtav1, ffv1 or libx264rgb") from None
        default_pix, default_crf, default_preset = CODEC_DEFAULTS.get(codec, (supported[0] if supported else "yuv420p", None, None))
        self.pix_fmt = pix_fmt or default_pix
        if supported and self.pix_fmt not in supported:
            raise SinkError(f"{codec} cannot encode pixel format {self.pix_fmt!r}; it takes {', '.join(supported[:8])}")
        if self.pix_fmt.startswith("yuv") and (width % 2 or height % 2):
            raise SinkError(f"{self.pix_fmt} needs an even frame size, not {width}x{height}; use --pix-fmt yuv444p")
        opts = {}
        if crf is None:
            crf = default_crf
        if crf is not None and codec not in ("ffv1", "rawvideo"):
            opts["crf"] = str(crf)
        if preset or default_preset:
            opts["preset"] = str(preset or default_preset)
        opts.update({k: str(v) for k, v in (options or {}).items()})
        # x265 and SVT-AV1 print pages of banners to stderr; keep them to errors.
        if codec == "libx265":
            opts.setdefault("x265-params", "log-level=error")
        if codec == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")

        # Every packet goes to the file at once, so a killed process leaves what it had encoded.
        container_options = {"flush_packets": "1"}
        if fmt == "mp4":
            container_options["movflags"] = FRAGMENTED_MP4
        self.target = target if is_path else None
        try:
            self.container = av.open(target, "w", format=fmt, container_options=container_options)
        except (OSError, av.error.FFmpegError) as err:
            raise SinkError(f"cannot write {target}: {_reason(err)}") from None
        try:
            self.stream = self.container.add_stream(codec, rate=rate, options=opts)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, self.pix_fmt
            context = self.stream.codec_context
            if codec.startswith(("libx264", "libx265")):
                context.thread_type, context.thread_count = "FRAME", 0  # frame threads: best throughput
                context.gop_size = max(1, round(2 * fps))  # a keyframe, so an mp4 fragment, every 2 s
            self._yuv = self.pix_fmt.startswith("yuv")
            if self._yuv:  # tag what we convert with: BT.709, limited range
                context.colorspace = context.color_primaries = context.color_trc = 1
                context.color_range = 1
            self.container.start_encoding()  # opens the file and the encoder, writes the header
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            self._abandon()
            raise SinkError(f"cannot write {target}: {_reason(err)}") from None
        except Exception as err:
            self._abandon()
            raise SinkError(f"cannot encode with {codec} {opts or ''}: {_reason(err)}") from None
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        video = av.VideoFrame.from_ndarray(frame, format="rgb24")
        if self._yuv:
            video = video.reformat(format=self.pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG")
        for packet in self.stream.encode(video):
            self.container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the container; a pipe that is gone ends it quietly."""
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
        finally:
            self.container.close()

    def _abandon(self) -> None:
        """Close without any frame and remove the file: nothing was asked to be kept."""
        try:
            self.container.close()
        except Exception:
            pass
        if self.target is not None:
            Path(self.target).unlink(missing_ok=True)


class RawSink:
    """Bare rgb24 frames, one after another, on a binary stream."""

    def __init__(self, stream: BinaryIO, owned: bool = False):
        self.stream = stream
        self.owned = owned  # opened by us from a path: closed by us
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        self.stream.write(np.ascontiguousarray(frame).data)
        self.frames_written += 1

    def close(self) -> None:
        self.stream.flush()
        if self.owned:
            self.stream.close()


def open_sink(target: str | os.PathLike | BinaryIO, width: int, height: int, fps: float = 16,
              format: str | None = None, **encoder):  # fmt: skip
    """A sink for `target`: RawSink for format "rgb24", else a VideoSink (encoder settings in `encoder`)."""
    if format is not None and format.lower() == "rgb24":
        _rate(fps)
        if isinstance(target, (str, os.PathLike)):
            try:
                return RawSink(open(target, "wb"), owned=True)
            except OSError as err:
                raise SinkError(f"cannot write {target}: {_reason(err)}") from None
        return RawSink(target)
    return VideoSink(target, width, height, fps, format=format, **encoder)


_DONE = object()


class FrameWriter:
    """Feeds a sink from a writer thread through a queue of at most `depth` frames.

    `put` blocks while the queue is full. An error in the writer thread is raised in the
    caller at its next `put` or at `close`. `close` always finishes the sink, so every frame
    handed over before an error or Ctrl-C is encoded and the file stays playable."""

    def __init__(self, sink, depth: int = 8):
        self.sink = sink
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="streamdec-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (frame := self.queue.get()) is not _DONE:
            if self.error is None:
                try:
                    self.sink.write(frame)
                except BaseException as err:  # keep draining so the producer never blocks forever
                    self.error = err

    def put(self, frame: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(frame)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.put(_DONE)
        self.thread.join()
        try:
            self.sink.close()
        except BaseException as err:
            self.error = self.error or err
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
            return
        try:  # already failing: finish the file, keep the first error
            self.close()
        except BaseException:
            pass


def _rate(fps: float):
    from fractions import Fraction

    if fps <= 0:
        raise SinkError(f"fps must be positive, not {fps}")
    return Fraction(fps).limit_denominator(1001)


def _reason(err: Exception) -> str:
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "its folder does not exist"
    if isinstance(err, IsADirectoryError):
        return "it is a folder"
    return one_line(err)
