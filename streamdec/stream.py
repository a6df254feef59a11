"""Latents in, frames out: the streaming decode.

StreamDecoder takes latent chunks as they come and returns the video frames that are final.
decode_frames is a generator over it for a whole latent tensor. Frames become uint8 on the
device, are copied to (pinned) host memory, and nothing keeps them once they are handed out.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .latents import as_latents
from .state import StreamState
from .tiling import HostParking, decode_tiled, parks_caches, parse_tile, supports_tiling
from .vae import VAE


class StreamDecoder:
    """Decode a latent video that arrives in chunks.

    `push(chunk)` decodes a chunk of latent frames, shaped (C, T, h, w) or (1, C, T, h, w) with
    T >= 1, and returns the frames that are now final; `close()` returns the rest. Frames are
    numpy uint8 (H, W, 3) RGB, or with `as_tensor=True` float32 CPU tensors (3, H, W) in [-1, 1].
    With `normalized=True` the latents are as the diffusion model makes them and are first
    de-normalized with the family's per-channel statistics (z * std + mean).

    `tile` (latent pixels, an int or (height, width)) decodes each frame in spatial tiles: for a
    causal family (Wan) with output equal to the untiled decode and memory bounded by the tile
    (off the CPU, each tile's caches wait in pinned host memory between its turns); for a windowed
    family as its reference does, blended: HunyuanVideo every 3/4 tile, CausalVAE every 7/8 tile.
    `None`: untiled (CausalVAE: its reference's 64-pixel tiles). `"auto"` (the default): what the
    VAE's `max_vram` needs, untiled without one (the family's default for a windowed family).

    A causal family's frames are final as soon as they are decoded, or, with a lookahead (WF-VAE),
    once the next latent frame has come: the last latent frame's are returned by `close()`. A
    windowed family's are final once their window is: each push returns whole windows' worth, and
    `close()` the last ones.
    """

    def __init__(self, vae: VAE, normalized: bool = True, as_tensor: bool = False, tile="auto"):
        self.vae = vae
        self.normalized = normalized
        self.as_tensor = as_tensor
        self.tile = parse_tile(tile)
        self.plan = None  # what max_vram chose, once the frame size is known
        self.state: StreamState | None = None
        self.windows = None  # a windowed family's stream (streamdec.windowed)
        if self.tile != "auto":  # refuse a tile the decoder cannot take now, not at the first push
            if vae.family_spec.strategy == "windowed":
                self.windows = vae.family_spec.window_stream(vae.decoder, self.tile)
            elif self.tile is not None and not supports_tiling(vae.decoder):
                raise ValueError(f"the {vae.family_spec.title} decoder cannot be tiled exactly; use tile=None")
        self.parking = None  # where tile caches wait between turns (streamdec.tiling)
        self.one_tile_per_shape = False  # memory estimates only: see decode_tiled
        self.closed = False
        self._frame_size: tuple[int, int] | None = None

    def start(self, latent_size: tuple[int, int], latent_frames: int | None = None) -> None:
        """Settle how this stream decodes frames of `latent_size` (done by the first push): the
        plan for the VAE's `max_vram`, if any, then the tiling and the caches."""
        vae = self.vae
        self._frame_size = tuple(latent_size)
        if vae.max_vram is not None:
            from .memory import plan_decode

            self.plan = plan_decode(vae, self._frame_size, latent_frames, tile=self.tile)
            vae.set_offload(self.plan.offload)
            self.tile = self.plan.tile
        elif self.tile == "auto":
            self.tile = None
        if vae.family_spec.strategy == "windowed":
            if self.windows is None:
                self.windows = vae.family_spec.window_stream(vae.decoder, self.tile)
            return
        self.state = StreamState()
        if self.tile is not None and parks_caches(vae.device):
            self.parking = HostParking(vae.device)

    def push(self, chunk) -> list:
        return self._push_checked(self._check(chunk))

    def close(self) -> list:
        """End the stream, free its caches and return the frames not yet returned: those a causal
        family's lookahead held back (none without one), the last windows' for a windowed one."""
        return self._host_frames(self.close_videos())

    @torch.inference_mode()  # as a decorator: on for each step of the generator, not between them
    def decode_videos(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """The decoded pieces of checked latents `z`, on the device: (1, 3, T, H, W) in [-1, 1],
        unclamped. A generator, so that one piece is on the device at a time."""
        if self._frame_size is None:
            self.start(z.shape[-2:])
        try:
            if self.windows is not None:
                yield from self.windows.push(self._prepare(z))
            else:
                # One latent frame per decoder call, as the reference does: activations stay the
                # size of one latent frame's output whatever the chunk length.
                for t in range(z.shape[2]):
                    yield self._decode(z[:, :, t : t + 1])
        finally:
            self._chunk_done()

    @torch.inference_mode()
    def close_videos(self) -> Iterator[torch.Tensor]:
        """`close()` on the device: the last pieces, as `decode_videos` gives them."""
        if self.closed:
            return
        self.closed = True
        state, self.state = self.state, None
        windows, self.windows = self.windows, None
        try:
            if windows is not None:
                yield from windows.close()
            elif state is not None and self.vae.family_spec.lookahead:
                yield self.vae.decoder.finish(state)
        finally:
            self._chunk_done()

    def _check(self, chunk) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("this StreamDecoder is closed; start a new one for another video")
        z = as_latents(chunk, self.vae.latent_channels, "latent chunk")
        size = tuple(z.shape[-2:])
        if self._frame_size is not None and size != self._frame_size:
            raise ValueError(
                f"latent chunk is {size[0]}x{size[1]} but earlier chunks of this stream were "
                f"{self._frame_size[0]}x{self._frame_size[1]}; start a new StreamDecoder for another video"
            )
        return z

    def _push_checked(self, z: torch.Tensor) -> list:
        return self._host_frames(self.decode_videos(z))

    def _chunk_done(self) -> None:
        if self.vae.offloader is not None:
            self.vae.offloader.chunk_done()

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as the decoder takes them: on its device, de-normalized, in its dtype."""
        vae = self.vae
        z = z.to(vae.device, non_blocking=True)
        z = vae.denormalize(z) if self.normalized else z.float()
        return z.to(vae.dtype)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        vae, state = self.vae, self.state
        z = self._prepare(z)
        if self.tile is None:
            video = vae.decoder(z, state)
        else:
            video = decode_tiled(vae.decoder, z, state, self.tile, vae.spatial_ratio, self.parking,
                                 self.one_tile_per_shape)  # fmt: skip
        state.frames_in += z.shape[2]
        state.frames_out += video.shape[2]
        return video

    def _host_frames(self, videos: Iterator[torch.Tensor]) -> list:
        convert = to_host_tensors if self.as_tensor else to_host_uint8
        frames = []
        for video in videos:
            if video is not None:
                frames.extend(convert(video))
            del video  # off the device before the next piece is decoded
        return frames


def decode_frames(vae: VAE, latents, normalized: bool = True, as_tensor: bool = False, tile="auto") -> Iterator:
    """Decode a whole latent video frame by frame.

    `latents`: torch tensor or numpy array, (C, T, h, w) or (1, C, T, h, w). Returns a generator
    of `1 + temporal_ratio * (T - 1)` frames: numpy uint8 (H, W, 3) RGB equal to
    round((clamp(x, -1, 1) + 1) * 127.5), or with `as_tensor=True` float32 tensors (3, H, W) in
    [-1, 1]. `tile`: see StreamDecoder. The latents are checked here, before any frame is decoded."""
    return _checked_frames(vae, latents, normalized=normalized, as_tensor=as_tensor, tile=tile)[1]


def _checked_frames(vae: VAE, latents, **options) -> tuple[torch.Tensor, Iterator]:
    """The latents as (1, C, T, h, w), checked, and a generator of their frames. Everything that
    can be refused (the latents, `tile`, an unmet max_vram) is refused here, before any frame."""
    z = as_latents(latents, vae.latent_channels)
    stream = StreamDecoder(vae, **options)
    stream.start(z.shape[-2:], z.shape[2])  # settles the tiles and the memory plan
    return z, _frames(stream, z)


def _frames(stream: StreamDecoder, z: torch.Tensor) -> Iterator:
    """Frames of latents `z` that `as_latents` has already checked."""
    for t in range(z.shape[2]):
        yield from _hand_out(stream._push_checked(z[:, :, t : t + 1]))
    yield from _hand_out(stream.close())


def _hand_out(frames: list) -> Iterator:
    pending = deque(frames)
    del frames  # the list would keep every frame alive until the last is yielded
    while pending:  # popleft: the generator holds no frame it has yielded
        yield pending.popleft()


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 RGB, on the same device."""
    scaled = (video.float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round_().to(torch.uint8)[0].permute(1, 2, 3, 0).contiguous()


def to_host_uint8(video: torch.Tensor) -> list[np.ndarray]:
    frames = to_uint8(video)  # 4x fewer bytes to copy than float32
    return list(_to_host(frames).numpy())


def to_host_tensors(video: torch.Tensor) -> list[torch.Tensor]:
    frames = video.float().clamp(-1.0, 1.0)[0].transpose(0, 1).contiguous()
    return list(_to_host(frames).unbind(0))


def _to_host(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return host


def decode_to_file(vae: VAE, latents, path, fps: float = 16, codec: str | None = None, crf: int | None = None,
                   preset: str | None = None, pix_fmt: str | None = None, format: str | None = None,
                   normalized: bool = True, progress: bool = True, options: dict | None = None,
                   tile="auto") -> int:  # fmt: skip
    """Decode `latents` straight into a video file (or a binary stream such as stdout).

    Frames go from the decoder through a bounded queue to a writer thread that encodes them
    with PyAV as they arrive. The container follows the extension or `format` (mp4, mkv, webm,
    mov, nut, y4m; rgb24 for raw bytes); `codec` defaults to libx264 (libsvtav1 for webm).
    `options` pass straight to the encoder; `tile`: see StreamDecoder. On an error or Ctrl-C the file is closed cleanly
    with every frame decoded so far. Returns the number of frames written."""
    from .progress import Progress
    from .sinks import FrameWriter, open_sink

    z, frames = _checked_frames(vae, latents, normalized=normalized, tile=tile)  # before the file exists
    height, width = (s * vae.spatial_ratio for s in z.shape[-2:])
    sink = open_sink(path, width, height, fps, format=format, codec=codec, crf=crf, preset=preset,
                     pix_fmt=pix_fmt, options=options)  # fmt: skip
    bar = Progress(vae.frames_for(z.shape[2]), enabled=progress)
    try:
        with FrameWriter(sink) as writer:
            for frame in frames:
                writer.put(frame)
                bar.update()
    except BaseException:
        if sink.frames_written == 0 and isinstance(path, (str, os.PathLike)):
            Path(path).unlink(missing_ok=True)  # an empty file is no result: leave none
        raise
    finally:
        bar.close()
    return sink.frames_written
