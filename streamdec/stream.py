"""Latents in, frames out: the streaming decode.

StreamDecoder takes latent chunks as they come and returns the video frames that are final. It
checks the latents, settles a Plan for the video (the caller's settings, or a memory plan under
`max_vram`), de-normalizes, runs the family's stream (streamdec.streams) and takes each decoded piece
off the device as uint8 frames (streamdec.frames). decode_frames is a generator over it for a whole
latent tensor, and decode_to_file feeds those frames to a sink; nothing keeps a frame once it is
handed out.
"""

from __future__ import annotations

import sys
from collections import deque
from contextlib import nullcontext
from dataclasses import replace
from typing import Iterator

import torch

from .errors import StreamdecError
from .frames import to_host_tensors, to_host_uint8
from .latents import as_latents
from .memory import BudgetError, plan_decode
from .plan import Plan, calls_for
from .tiling import parks_caches, parse_tile
from .vae import VAE, check_max_vram


class StreamDecoder:
    """Decode a latent video that arrives in chunks.

    `push(chunk)` decodes a chunk of latent frames, shaped (C, T, h, w) or (1, C, T, h, w) with
    T >= 1, and returns the frames that are now final; `close()` returns the rest. Frames are
    numpy uint8 (H, W, 3) RGB, or with `as_tensor=True` float32 CPU tensors (3, H, W) in [-1, 1].
    With `normalized=True` the latents are as the diffusion model makes them and are first
    de-normalized with the family's per-channel statistics (z * std + mean).

    `tile` (latent pixels, an int or (height, width)) decodes each frame in spatial tiles: for a
    family with exact tiling (Wan) with output equal to the untiled decode and memory bounded by the
    tile (off the CPU, each tile's caches wait in pinned host memory between its turns); for a family
    whose reference tiles, as its reference does, blended: HunyuanVideo every 3/4 tile, CausalVAE
    every 7/8 tile. `None`: untiled (CausalVAE: its reference's 64-pixel tiles). `"auto"` (the
    default): what `max_vram` needs, untiled without one.

    `frames_per_call`: latent frames a carried-state decoder takes per call: more is faster where
    frames are small (larger convolutions, fewer calls), the output is the same, and activations grow
    with it. "auto" (the default): as many as keep a call's output under `plan.CALL_PIXELS` (several
    for small frames, one from 192x192 up for Wan); under `max_vram`, one where more would not fit.

    `max_vram` (GiB; default: the VAE's): the device memory this stream may peak at. The first push
    plans the video (offload mode, tiles) to fit it, or refuses with the smallest budget that would
    do; the plan is this stream's own (`plan`), so streams of other sizes and budgets can share the VAE.

    `latent_frames`: the video's length in latent frames, where the pushes do not all come at once.
    A family whose reference cuts the latents by their number needs it before the first push and
    refuses to start without it (CogVideoX: its first call takes 2 + T mod 2 latents); the others
    ignore it. Pushing more latent frames than it says is refused. decode_frames, decode_to_file and
    the CLI pass it themselves.

    `decode_options`: options the family declares (`Family.decode_options`; LTX: `decode_timestep`,
    `decode_noise_scale`, `seed`), over those named at `load_vae`; another family refuses them.

    `group`: an initialized torch.distributed process group to decode across (streamdec.distributed):
    each process decodes a band of every frame's rows, and rank 0 returns the whole frames (the other
    ranks none). Every rank pushes the same latents in the same chunks. None: this process alone.

    A carried-state family's frames are final as soon as they are decoded, or, with a lookahead
    (WF-VAE), once the next latent frame has come: the last latent frame's are returned by `close()`.
    A schedule-replay family's are final once their window is: each push returns whole windows' worth,
    and `close()` the last ones.
    """

    def __init__(self, vae: VAE, normalized: bool = True, as_tensor: bool = False, tile="auto",
                 max_vram: float | None = None, frames_per_call: int | str = "auto",
                 latent_frames: int | None = None, group=None, **decode_options):  # fmt: skip
        self.vae = vae
        self.decode_options = {**vae.decode_options, **vae.family_spec.check_decode_options(decode_options)}
        self.normalized = normalized
        self.as_tensor = as_tensor
        self.tile = parse_tile(tile)
        self.max_vram = vae.max_vram if max_vram is None else check_max_vram(max_vram)
        if frames_per_call != "auto" and (isinstance(frames_per_call, bool) or not isinstance(frames_per_call, int)
                                          or frames_per_call < 1):  # fmt: skip
            raise StreamdecError(f"frames_per_call must be a whole number of latent frames, 1 or more, or 'auto', "
                                 f"not {frames_per_call!r}")  # fmt: skip
        self.frames_per_call = frames_per_call
        if latent_frames is not None and (isinstance(latent_frames, bool) or not isinstance(latent_frames, int)
                                          or latent_frames < 1):  # fmt: skip
            raise StreamdecError(f"latent_frames must be the video's length in latent frames, 1 or more, not {latent_frames!r}")
        self.latent_frames = latent_frames
        if self.tile != "auto":  # refuse a tile the family cannot take now, not at the first push
            vae.family_spec.effective_tile(self.tile)
        self.group = group
        if group is not None:
            from .distributed import check_group

            check_group(group, vae)
        self.plan: Plan | None = None  # settled by the first push (or start), once the frame size is known
        self.stream = None  # the family's stream (streamdec.streams)
        self.closed = False
        self.frames_in = 0  # latent frames pushed so far
        self.frames_out = 0  # video frames decoded so far

    def start(self, latent_size: tuple[int, int], latent_frames: int | None = None) -> None:
        """Settle how this stream decodes frames of `latent_size` (done by the first push): its plan,
        then the family's stream. `latent_frames`: the video's length, if not given to the constructor."""
        vae = self.vae
        latent_frames = self.latent_frames if latent_frames is None else latent_frames

        def plan_for(size: tuple[int, int]) -> Plan:
            auto = self.frames_per_call == "auto"
            calls = calls_for(vae, size) if auto else self.frames_per_call
            if self.max_vram is not None:
                try:
                    plan = plan_decode(vae, size, latent_frames, tile=self.tile, max_vram=self.max_vram,
                                       frames_per_call=calls)  # fmt: skip
                except BudgetError:
                    if not auto or calls == 1:
                        raise
                    plan = plan_decode(vae, size, latent_frames, tile=self.tile, max_vram=self.max_vram)  # one a call
            else:
                tile = vae.family_spec.effective_tile(None if self.tile == "auto" else self.tile)
                offload = "none" if vae.offload == "auto" else vae.offload
                plan = Plan(offload=offload, tile=tile, park=parks_caches(vae.device), frames_per_call=calls)
            plan = replace(plan, latent_frames=latent_frames)  # the video's own length, not a cached plan's
            if self.decode_options:
                plan = replace(plan, decode=tuple(sorted(self.decode_options.items())))
            return plan

        if self.group is None:
            plan = plan_for(tuple(latent_size))
            self.stream = vae.family_spec.open_stream(vae.decoder, plan)  # may refuse: then nothing is settled
        else:  # this rank's band of rows (streamdec.distributed)
            from .distributed import open_band_stream

            plan, self.stream = open_band_stream(vae, self.group, tuple(latent_size), plan_for, exact=self.as_tensor)
        self.plan, self.latent_frames = plan, latent_frames
        self._frame_size = tuple(latent_size)

    def push(self, chunk) -> list:
        return self._host_frames(self.decode_videos(self._check(chunk)))

    def close(self) -> list:
        """End the stream, free its state and return the frames not yet returned: those a lookahead
        held back (none without one), the last windows' for a schedule-replay family."""
        return self._host_frames(self.close_videos())

    @torch.inference_mode()  # as a decorator: on for each step of the generator, not between them
    def decode_videos(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """The decoded pieces of checked latents `z`, on the device: (1, 3, T, H, W) in [-1, 1],
        unclamped. A generator, so that one piece is on the device at a time."""
        if self.plan is None:
            self.start(z.shape[-2:])
        if self.latent_frames is not None and self.frames_in + z.shape[2] > self.latent_frames:
            raise StreamdecError(f"this stream was told the video has latent_frames={self.latent_frames}, but "
                                 f"{self.frames_in + z.shape[2]} have been pushed; give its true length")  # fmt: skip
        self.frames_in += z.shape[2]
        with self._offload_session():
            for video in self.stream.push(self.vae.prepare(z, self.normalized, self.frames_in - z.shape[2])):
                self.frames_out += video.shape[2]
                yield video

    @torch.inference_mode()
    def close_videos(self) -> Iterator[torch.Tensor]:
        """`close()` on the device: the last pieces, as `decode_videos` gives them."""
        if self.closed:
            return
        self.closed = True
        stream, self.stream = self.stream, None
        if stream is None:
            return
        with self._offload_session():
            for video in stream.close():
                self.frames_out += video.shape[2]
                yield video

    def state_dict(self) -> dict:
        """Everything this stream would need to go on from here in another process (caches, buffers,
        counters; never a decoded frame), as tensors and plain data for `torch.save`. Between pushes."""
        if self.stream is None or not hasattr(self.stream, "state_dict"):
            raise StreamdecError(f"a {self.vae.family_spec.title} stream cannot be saved to resume; decode it without resuming")
        names = {m: n for n, m in self.vae.decoder.named_modules()}
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "stream": self.stream.state_dict(names)}

    def load_state_dict(self, data: dict) -> None:
        """Go on from where `state_dict` was taken (a started stream of the same VAE and settings)."""
        modules = dict(self.vae.decoder.named_modules())
        self.stream.load_state_dict(data["stream"], modules, self.vae.device)
        self.frames_in, self.frames_out = data["frames_in"], data["frames_out"]

    def _offload_session(self):
        offloader = self.vae.offloader
        return nullcontext() if offloader is None else offloader.session(self.plan.offload, self.plan.offload_group)

    def _check(self, chunk) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("this StreamDecoder is closed; start a new one for another video")
        z = as_latents(chunk, self.vae.latent_channels, "latent chunk")
        size = tuple(z.shape[-2:])
        if self.plan is not None and size != self._frame_size:
            raise ValueError(
                f"latent chunk is {size[0]}x{size[1]} but earlier chunks of this stream were "
                f"{self._frame_size[0]}x{self._frame_size[1]}; start a new StreamDecoder for another video"
            )
        return z

    def _host_frames(self, videos: Iterator[torch.Tensor]) -> list:
        convert = to_host_tensors if self.as_tensor else to_host_uint8
        frames = []
        for video in videos:
            frames.extend(convert(video))
            del video  # off the device before the next piece is decoded
        return frames


def decode_frames(vae: VAE, latents, normalized: bool = True, as_tensor: bool = False, tile="auto",
                  max_vram: float | None = None, frames_per_call: int | str = "auto", group=None,
                  **decode_options) -> Iterator:  # fmt: skip
    """Decode a whole latent video frame by frame.

    `latents`: torch tensor or numpy array, (C, T, h, w) or (1, C, T, h, w). Returns a generator
    of `1 + temporal_ratio * (T - 1)` frames: numpy uint8 (H, W, 3) RGB equal to
    round((clamp(x, -1, 1) + 1) * 127.5), or with `as_tensor=True` float32 tensors (3, H, W) in
    [-1, 1]. `tile`, `max_vram`, `frames_per_call`, `group`, `decode_options`: see StreamDecoder (with a
    `group`, rank 0 gets the frames and the other ranks none). The latents are checked and the video
    planned here, before any frame is decoded."""
    return _checked_frames(vae, latents, normalized=normalized, as_tensor=as_tensor, tile=tile,
                           max_vram=max_vram, frames_per_call=frames_per_call, group=group, **decode_options)[1]  # fmt: skip


def _checked_frames(vae: VAE, latents, **options) -> tuple[torch.Tensor, Iterator]:
    """The latents as (1, C, T, h, w), checked, and a generator of their frames. Everything that
    can be refused (the latents, `tile`, an unmet max_vram) is refused here, before any frame."""
    z = as_latents(latents, vae.latent_channels)
    stream = StreamDecoder(vae, **options)
    stream.start(z.shape[-2:], z.shape[2])
    return z, _frames(stream, z)


def _frames(stream: StreamDecoder, z: torch.Tensor, start: int = 0, between=None) -> Iterator:
    """Frames of latents `z` that `as_latents` has already checked, from latent frame `start` on,
    pushed as many at a time as the decoder takes per call; `between()` runs after each push."""
    step = stream.plan.frames_per_call
    for t in range(start, z.shape[2], step):
        pending = deque(stream._host_frames(stream.decode_videos(z[:, :, t : t + step])))
        if between is not None:
            between()
        yield from _hand_out(pending)
    yield from _hand_out(deque(stream.close()))


def _hand_out(pending: deque) -> Iterator:
    while pending:  # popleft: the generator holds no frame it has yielded (a list would keep them all)
        yield pending.popleft()


def decode_to_file(vae: VAE, latents, path, fps: float = 16, codec: str | None = None, crf: float | None = None,
                   preset: str | None = None, pix_fmt: str | None = None, format: str | None = None,
                   normalized: bool = True, progress: bool = True, options: dict | None = None,
                   tile="auto", max_vram: float | None = None, low_latency: bool = False,
                   frames_per_call: int | str = "auto", resume: bool = False, resume_every: int | None = None,
                   group=None, **decode_options) -> int:  # fmt: skip
    """Decode `latents` straight into a video file (or a binary stream such as stdout).

    Frames go from the decoder through a bounded queue to a writer thread that encodes them
    with PyAV as they arrive. The container follows the extension or `format` (mp4, mkv, webm,
    mov, nut, y4m; rgb24 for raw bytes); `codec` defaults to libx264 (libsvtav1 for webm).
    `options` pass straight to the encoder; `low_latency`: the encoder holds no frames back (see
    streamdec.sinks); `tile`, `max_vram`, `frames_per_call`: see StreamDecoder.

    An existing file at `path` is replaced once the new one holds a frame; a failure before that
    leaves it as it was. On an error or Ctrl-C after that, the file is closed cleanly with every
    frame decoded so far, and the exception carries `frames_written`. Returns the number of frames
    written (with `resume`, those this run wrote and those it kept).

    `resume`: keep the stream's state beside the file as it goes (every `resume_every` latent
    frames, by default by time at 5% of the decode's time at most), and go on from a killed run's
    state if the same job left one (streamdec.resume). `decode_options`: see StreamDecoder.

    `group`: decode across the processes of a torch.distributed group (see StreamDecoder): every rank
    calls this with the same latents; rank 0 writes `path`, the others write nothing and return 0."""
    from tqdm import tqdm

    from .sinks import FrameWriter, open_sink

    settings = dict(fps=fps, codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt, format=format, normalized=normalized,
                    options=options, tile=tile, max_vram=max_vram, low_latency=low_latency,
                    frames_per_call=frames_per_call, **decode_options)  # fmt: skip
    z = as_latents(latents, vae.latent_channels)
    stream = StreamDecoder(vae, normalized=normalized, tile=tile, max_vram=max_vram, frames_per_call=frames_per_call,
                           group=group, **decode_options)
    if group is not None and resume:
        raise StreamdecError("a distributed decode cannot be resumed; decode it without resume, or in one process")
    stream.start(z.shape[-2:], z.shape[2])  # everything that can be refused, before the file exists
    if group is not None and torch.distributed.get_rank(group) != 0:  # rank 0 writes the file
        for _ in _frames(stream, z):
            pass
        return 0
    checkpoints, state, between = _resumable(vae, z, stream, path, settings, resume_every) if resume else (None, None, None)
    if state is not None:
        stream.load_state_dict(state)
    kept = 0 if state is None else state["frames_out"]
    height, width = (s * vae.spatial_ratio for s in z.shape[-2:])
    sink = open_sink(path, width, height, fps, format=format, codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt,
                     options=options, low_latency=low_latency, in_order=resume, continue_from=kept)  # fmt: skip
    # on a terminal only: quiet in pipes, logs, with progress=False, and when stderr is closed
    shown = None if progress and sys.stderr is not None else True
    bar = tqdm(total=vae.frames_for(z.shape[2]), initial=kept, unit="frame", file=sys.stderr, disable=shown)
    try:
        with FrameWriter(sink) as writer:
            for frame in _frames(stream, z, start=stream.frames_in, between=between):
                writer.put(frame)
                bar.update()
    except BaseException as err:
        err.frames_written = sink.frames_written  # what the file holds, for the caller to say
        raise
    finally:
        bar.close()
    if checkpoints is not None:
        checkpoints.remove()
    return sink.frames_written


def _resumable(vae: VAE, z: torch.Tensor, stream: StreamDecoder, path, settings: dict, every: int | None):
    """For a resumable decode into `path`: its Checkpoints, the state a killed run left (or None),
    and what to do between pushes (save the state when due)."""
    import os

    from .resume import Checkpoints, ResumeError, job_of

    if not isinstance(path, (str, os.PathLike)) or (os.path.exists(path) and not os.path.isfile(path)):
        raise ResumeError("resuming needs a regular output file, not a stream, pipe or device")
    if str(settings["format"]).lower() == "rgb24":
        raise ResumeError("raw rgb24 output cannot be resumed; write a video file (mkv, mp4) to resume")
    stream.state_dict()  # refuses a stream that cannot be saved, now rather than at the first save
    checkpoints = Checkpoints(path, every)
    state = checkpoints.begin(job_of(vae, z, settings))

    def between():
        if checkpoints.due(stream.frames_in):
            checkpoints.save(stream.state_dict())

    return checkpoints, state, between
