"""Frames out: encoders and pipes that take uint8 (H, W, 3) RGB frames one at a time.

- VideoSink: a PyAV container (mp4, mkv, webm, mov, nut, y4m) on a path or a binary stream.
- RawSink: bare rgb24 bytes on a binary stream (or a file), for pipes.
- FrameWriter: runs a sink in its own thread behind a bounded queue, so encoding overlaps
  decoding and a slow encoder slows the decoder instead of filling memory.

Nothing the user had is lost (`OutputFile`): a file is written beside its path and takes the
path's place only once it holds a frame; a device or a pipe (/dev/null, a FIFO) is written in
place and never removed. A killed process leaves a playable file: mp4/mov are fragmented at every
frame, Matroska/WebM close a cluster at every frame, and every packet is flushed, so the file holds
every frame the encoder has given out but the last (whose fragment waits for the next), less the
frames the encoder still holds (its lookahead; none with `low_latency`).

Colour: RGB is converted to YUV with BT.709 (limited range) and tagged so wherever the output can
say it (H.264/H.265/AV1 streams, mp4, mov, Matroska, WebM). Uncompressed YUV in y4m or nut cannot
carry the tag, and every reader (ffmpeg, PyAV) takes untagged video as BT.601: there streamdec
converts with BT.601, so the colours read back right with the readers' defaults.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import re
import secrets
import threading
from fractions import Fraction
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
UNTAGGED = ("yuv4mpegpipe", "nut")  # containers that cannot say an uncompressed stream's colour matrix

# codec -> (pixel format, crf, preset): visually lossless defaults; crf 0 / ffv1 are lossless.
CODEC_DEFAULTS = {
    "libx264": ("yuv420p", 18, "fast"),
    "libx265": ("yuv420p", 20, "fast"),
    "libsvtav1": ("yuv420p", 24, "8"),
    "libx264rgb": ("rgb24", 0, "fast"),
    "ffv1": ("bgr0", None, None),
    "rawvideo": ("yuv420p", None, None),
}
_X26X = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
X26X_PRESETS = {"libx264": _X26X, "libx264rgb": _X26X, "libx265": _X26X}  # checked here: x264 prints its own complaint
CRF_RANGES = {"libx264": (0, 51), "libx264rgb": (0, 51), "libx265": (0, 51), "libsvtav1": (1, 63)}
# what each encoder needs to give out every frame at once (no lookahead, no reordering)
LOW_LATENCY = {
    "libx264": {"tune": "zerolatency"},
    "libx264rgb": {"tune": "zerolatency"},
    "libx265": {"tune": "zerolatency"},
    "libsvtav1": {"svtav1-params": "pred-struct=1:lookahead=0"},
}
DEFAULT_CODEC = {"webm": "libsvtav1", "yuv4mpegpipe": "rawvideo"}  # else libx264
FRAGMENTED_MP4 = "frag_every_frame+empty_moov+default_base_moof"
FPS_RANGE = (0.01, 1000.0)
NTSC_RATES = (24, 30, 48, 60, 120)  # their 1000/1001 rates: 23.976, 29.97, ...


class SinkError(StreamdecError):
    """Output settings that cannot work, or an output that failed; the message says which and why."""


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


class OutputFile:
    """Where a file output is written, so that nothing already at its path is lost.

    A regular path (new, or an existing file to replace) is written to a new file beside it, which
    takes the path's place (`commit`) once it holds a frame: a failure before that removes only that
    new file, and whatever was at the path stays as it was. A symlink's target is what is replaced.
    A device or a FIFO (/dev/null, a named pipe) is written in place and never moved or removed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.final = Path(os.path.realpath(self.path))
        if self.final.is_dir():
            raise SinkError(f"cannot write {path}: it is a folder")
        if self.final.exists() and not self.final.is_file():
            self.write_path, self.temporary = self.final, False
        else:
            self.write_path, self.temporary = self._create_beside(), True
        self.committed = not self.temporary

    def _create_beside(self) -> Path:
        while True:
            candidate = self.final.with_name(f".{self.final.name}.{secrets.token_hex(4)}.partial")
            try:  # O_EXCL: never opens anything that exists; 0o666 less the umask, as any new file
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                return candidate
            except FileExistsError:
                continue
            except OSError as err:
                raise SinkError(f"cannot write {self.path}: {_reason(err)}") from None

    def holds_data(self, header_bytes: int) -> bool:
        return self.write_path.stat().st_size > header_bytes

    def commit(self) -> None:
        """The new file holds a frame: it takes the path's place, replacing what was there."""
        if not self.committed:
            os.replace(self.write_path, self.final)
            self.committed = True

    def discard(self) -> None:
        """No frame was written: remove the new file, and only it."""
        if not self.committed:
            self.write_path.unlink(missing_ok=True)


class VideoSink:
    """Encode RGB frames with PyAV into a container written to `target` (a path or a binary
    stream). Everything is checked and the header written on construction, so bad settings
    fail before any decoding. `low_latency`: the encoder gives out each frame at once (x264/x265
    zerolatency, SVT-AV1 low delay), so a killed process loses at most one frame, at some cost
    in compression."""

    def __init__(self, target: str | os.PathLike | BinaryIO, width: int, height: int, fps: float = 16,
                 codec: str | None = None, crf: float | None = None, preset: str | None = None,
                 pix_fmt: str | None = None, format: str | None = None, options: dict | None = None,
                 low_latency: bool = False, in_order: bool = False, continue_from: int = 0):  # fmt: skip
        rate = frame_rate(fps)
        is_path = isinstance(target, (str, os.PathLike))
        fmt = container_format(target if is_path else None, format)
        if fmt == "rgb24":
            raise SinkError("rgb24 is a raw pipe format, not a container; use RawSink or another format")
        codec = codec or DEFAULT_CODEC.get(fmt, "libx264")
        if fmt == "yuv4mpegpipe" and codec != "rawvideo":
            raise SinkError(f"y4m holds uncompressed video only; drop the codec {codec!r} or pick another format")
        supported = _video_encoder_formats(codec)
        default_pix, default_crf, default_preset = CODEC_DEFAULTS.get(codec, (supported[0] if supported else "yuv420p", None, None))
        self.pix_fmt = pix_fmt or default_pix
        if supported and self.pix_fmt not in supported:
            raise SinkError(f"{codec} cannot encode pixel format {self.pix_fmt!r}; it takes {', '.join(supported[:8])}")
        _check_frame_size(self.pix_fmt, width, height)
        opts = {}
        if crf is not None:
            opts["crf"] = _check_crf(codec, crf)
        elif default_crf is not None:
            opts["crf"] = str(default_crf)
        if preset is not None and codec in X26X_PRESETS and str(preset) not in X26X_PRESETS[codec]:
            raise SinkError(f"cannot encode with {codec}: it has no preset {preset!r}; use one of {', '.join(X26X_PRESETS[codec])}")
        if preset or default_preset:
            opts["preset"] = str(preset or default_preset)
        if low_latency:
            opts.update(LOW_LATENCY.get(codec, {}))
        opts.update({k: str(v) for k, v in (options or {}).items()})
        if in_order:  # packets in display order (no B-frames), so a later run can append to the file
            opts["bf"] = "0"
        # x265 and SVT-AV1 print pages of banners to stderr; keep them to errors.
        if codec == "libx265":
            x265 = ("log-level=error", opts.get("x265-params"), "bframes=0" if in_order else None)
            opts["x265-params"] = ":".join(p for p in x265 if p)
        if codec == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")

        # Every packet goes to the file at once, and every frame closes a fragment (mp4/mov) or a
        # cluster (Matroska/WebM), so a killed process leaves what was encoded.
        container_options = {"flush_packets": "1"}
        if fmt in ("mp4", "mov"):
            container_options["movflags"] = FRAGMENTED_MP4
        if fmt in ("matroska", "webm"):
            container_options["cluster_size_limit"] = "1"
        self.name = str(target) if is_path else "the output stream"
        self.file = OutputFile(target) if is_path else None
        self.frames_written = 0
        self.size = (width, height)
        try:
            where = self.file.write_path if self.file else target
            self.container = av.open(where, "w", format=fmt, container_options=container_options)
        except (OSError, av.error.FFmpegError) as err:
            self._discard()
            raise SinkError(f"cannot write {self.name}: {_reason(err)}") from None
        self.rate = rate
        try:
            if continue_from:
                context = self._continue(continue_from, codec, opts, fmt)
            else:
                self.stream = self.container.add_stream(codec, rate=rate, options=opts)
                self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, self.pix_fmt
                context = self.encoder = self.stream.codec_context
            if codec.startswith(("libx264", "libx265")):
                if not low_latency:  # frame threads: best throughput, but they hold frames back
                    context.thread_type, context.thread_count = "FRAME", 0
                context.gop_size = max(1, round(2 * float(rate)))  # a keyframe every 2 s
            self._matrix = None  # the colour matrix RGB is converted with, for YUV output
            if not av.VideoFormat(self.pix_fmt).is_rgb:
                tagged = not (codec == "rawvideo" and fmt in UNTAGGED)
                self._matrix = "ITU709" if tagged else "ITU601"  # what readers assume when untagged
                if tagged:  # BT.709, limited range, said in the stream and the container
                    context.colorspace = context.color_primaries = context.color_trc = 1
                context.color_range = 1
            self.container.start_encoding()  # opens the encoder, writes the header
            if continue_from:
                self._copy_frames(continue_from)
        except Exception as err:
            if isinstance(err, SinkError):
                self._abandon()
                raise
            self._abandon()
            if isinstance(err, OSError) and not isinstance(err, av.error.FFmpegError):
                raise SinkError(f"cannot write {self.name}: {_reason(err)}") from None
            settings = f" ({', '.join(f'{k} {v}' for k, v in opts.items())})" if opts else ""
            raise SinkError(f"cannot encode with {codec}{settings} at {width}x{height}: {_reason(err)}") from None
        self._header_bytes = self.file.write_path.stat().st_size if self.file and not self.file.committed else 0

    def write(self, frame: np.ndarray) -> None:
        width, height = self.size
        if not isinstance(frame, np.ndarray) or frame.shape != (height, width, 3) or frame.dtype != np.uint8:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise SinkError(f"frame is {got}, but this video takes uint8 ({height}, {width}, 3) RGB frames")
        video = av.VideoFrame.from_ndarray(frame, format="rgb24")
        if self._matrix is not None:
            video = video.reformat(format=self.pix_fmt, dst_colorspace=self._matrix, dst_color_range="MPEG")
        video.pts, video.time_base = self.frames_written, 1 / self.rate
        try:
            for packet in self._encode(video):
                self.container.mux(packet)
        except OSError as err:
            if err.errno == errno.EPIPE:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe") from None  # the reader has gone: not a failure
            raise SinkError(f"cannot write {self.name} after {self.frames_written} frames: {_reason(err)}") from None
        self.frames_written += 1
        if self.file is not None and not self.file.committed and self.file.holds_data(self._header_bytes):
            self.file.commit()

    def close(self) -> None:
        """Flush the encoder and finish the container; a pipe that is gone ends it quietly. A file
        with no frame is removed (only one streamdec created)."""
        try:
            for packet in self._encode(None):
                self.container.mux(packet)
        finally:
            try:
                self.container.close()
            finally:
                if self.file is not None and self.frames_written:
                    self.file.commit()
                self._discard()

    def _encode(self, frame):
        packets = self.encoder.encode(frame)
        for packet in packets:
            packet.stream = self.stream
        return packets

    def _continue(self, frames: int, codec: str, opts: dict, fmt: str):
        """Set up to append to the file already at the path: its stream, copied as it is, and an
        encoder of the same settings of our own (the old file's packets cannot go through an
        encoder's stream). Returns the encoder to configure."""
        try:
            self._previous = av.open(str(self.file.final))
            template = self._previous.streams.video[0]
        except (OSError, av.error.FFmpegError, IndexError) as err:
            raise SinkError(f"cannot continue {self.name}: {_reason(err) if not isinstance(err, IndexError) else 'it holds no video'}") from None
        self.stream = self.container.add_stream_from_template(template)
        self.encoder = av.CodecContext.create(codec, "w")
        self.encoder.width, self.encoder.height, self.encoder.pix_fmt = *self.size, self.pix_fmt
        self.encoder.time_base, self.encoder.framerate = 1 / self.rate, self.rate
        self.encoder.options = opts
        if fmt in ("mp4", "mov", "matroska", "webm"):  # their headers hold the codec's parameters
            self.encoder.flags |= av.codec.context.Flags.global_header
        return self.encoder

    def _copy_frames(self, frames: int) -> None:
        """The first `frames` frames of the file at the path, as they are, then our encoder's."""
        self.encoder.open()
        template = self._previous.streams.video[0]
        if (self.encoder.extradata or b"") != (template.codec_context.extradata or b""):
            raise SinkError(f"cannot continue {self.name}: its video was encoded with other settings "
                            f"({template.codec_context.name}); decode it again without resuming")  # fmt: skip
        with self._previous:
            for packet in complete_packets(self._previous, str(self.file.final)):
                if self.frames_written == frames:
                    break
                packet.stream = self.stream
                self.container.mux(packet)
                self.frames_written += 1
        if self.frames_written < frames:
            raise SinkError(f"cannot continue {self.name}: it holds {self.frames_written} whole frames, not {frames}")
        self.file.commit()

    def _abandon(self) -> None:
        """Close without any frame and remove what was created: nothing was asked to be kept."""
        try:
            self.container.close()
        except Exception:
            pass
        self._discard()

    def _discard(self) -> None:
        if self.file is not None:
            self.file.discard()


def complete_packets(container, path: str):
    """The video packets of a file that are whole: a killed writer leaves its last one cut short."""
    size = os.path.getsize(path)
    try:
        for packet in container.demux(video=0):
            if packet.pts is None or packet.is_corrupt or packet.pos >= 0 and packet.pos + packet.size > size:
                if packet.pts is not None:
                    return
                continue
            yield packet
    except av.error.FFmpegError:
        return


def complete_frames(path) -> int:
    """How many whole frames the video file at `path` holds (0 if it cannot be read)."""
    try:
        with av.open(str(path)) as container:
            return sum(1 for _ in complete_packets(container, str(path)))
    except (OSError, av.error.FFmpegError):
        return 0


class RawSink:
    """Bare rgb24 frames, one after another, on a binary stream (or a file, made by `open_sink`)."""

    def __init__(self, stream: BinaryIO, file: OutputFile | None = None):
        self.stream = stream
        self.file = file  # the file streamdec opened, closed by it
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        try:
            self.stream.write(np.ascontiguousarray(frame).data)
            if self.file is not None:
                self.stream.flush()
        except OSError as err:
            if err.errno == errno.EPIPE:
                raise
            where = self.file.path if self.file is not None else "the output stream"
            raise SinkError(f"cannot write {where} after {self.frames_written} frames: {_reason(err)}") from None
        self.frames_written += 1
        if self.file is not None:
            self.file.commit()

    def close(self) -> None:
        try:
            self.stream.flush()
        finally:
            if self.file is not None:
                self.stream.close()
                self.file.discard()  # if no frame came


def open_sink(target: str | os.PathLike | BinaryIO, width: int, height: int, fps: float = 16,
              format: str | None = None, **encoder):  # fmt: skip
    """A sink for `target`: RawSink for format "rgb24", else a VideoSink (encoder settings in `encoder`)."""
    if format is not None and format.lower() == "rgb24":
        frame_rate(fps)
        if encoder.get("continue_from"):
            raise SinkError("raw rgb24 output cannot be resumed; write a video file (mkv, mp4) to resume")
        if isinstance(target, (str, os.PathLike)):
            file = OutputFile(target)
            try:
                return RawSink(open(file.write_path, "wb"), file)
            except OSError as err:
                file.discard()
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


def frame_rate(fps) -> Fraction:
    """`fps` as the exact rational rate written into the file (23.976 -> 24000/1001)."""
    low, high = FPS_RANGE
    try:
        ok = not isinstance(fps, bool) and math.isfinite(fps) and low <= fps <= high
    except TypeError:
        ok = False
    if not ok:
        raise SinkError(f"fps must be positive, from {low:g} to {high:g} frames a second (like 16, 24 or 23.976), not {fps!r}")
    for whole in NTSC_RATES:  # 23.976 means 24000/1001, as everyone writes it
        if abs(fps - whole * 1000 / 1001) < 0.0015:
            return Fraction(whole * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _video_encoder_formats(codec: str) -> list[str]:
    """The pixel formats `codec` encodes, after checking it is a video encoder FFmpeg has."""
    hint = "try libx264, libx265, libsvtav1, ffv1 or libx264rgb"
    try:
        encoder = av.codec.Codec(codec, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        raise SinkError(f"unknown video encoder {codec!r}; {hint}") from None
    if encoder.type != "video":
        raise SinkError(f"{codec} is an {encoder.type} encoder, not a video one; {hint}")
    return [f.name for f in encoder.video_formats or []]


def _check_frame_size(pix_fmt: str, width: int, height: int) -> None:
    """Chroma-subsampled formats (4:2:0, 4:2:2) need a size their chroma planes divide."""
    planes = av.VideoFormat(pix_fmt, 64, 64).components
    if len(planes) < 3:  # gray, or packed RGB
        return
    fw, fh = 64 // planes[1].width, 64 // planes[1].height
    if width % fw or height % fh:
        raise SinkError(f"{pix_fmt} needs a frame size divisible by {fw}x{fh}, not {width}x{height}; "
                        "use the yuv444p pixel format (or rgb24 / bgr0 with libx264rgb / ffv1)")  # fmt: skip


def _check_crf(codec: str, crf) -> str:
    if codec not in CRF_RANGES:
        raise SinkError(f"crf does not apply to {codec} (it is lossless or takes other settings); drop it")
    low, high = CRF_RANGES[codec]
    if isinstance(crf, bool) or not isinstance(crf, (int, float)) or not low <= crf <= high:
        raise SinkError(f"crf for {codec} must be from {low} to {high} (lower is better), not {crf!r}")
    return str(crf)


def _reason(err: Exception) -> str:
    ffmpeg_said = re.search(r"last error log: \[[^\]]*\] (.+)", str(err))  # when PyAV's logging is on
    if ffmpeg_said:
        return ffmpeg_said.group(1).strip()
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "its folder does not exist"
    if isinstance(err, IsADirectoryError):
        return "it is a folder"
    return one_line(err)
