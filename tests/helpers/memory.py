"""Device memory of a family's stream, traced on the meta device."""

from __future__ import annotations

import torch

from streamdec.frames import to_uint8
from streamdec.memory import MemoryTrace
from streamdec.plan import Plan


def meta_peak(vae, frames: int, size: tuple[int, int], park: bool) -> int:
    """The device peak of a decode of `frames` latent frames of `size` latent pixels, one per push,
    traced on the meta device, what grows parked on the host (as on a GPU) or not."""
    with torch.device("meta"):
        decoder = vae.family_spec.build(vae.config)
    trace = MemoryTrace(device="meta")
    with torch.inference_mode(), trace:
        stream = vae.family_spec.open_stream(decoder, Plan(park=park))
        z = torch.zeros(1, vae.latent_channels, 1, *size, device="meta")
        for _ in range(frames):
            for video in stream.push(z):
                to_uint8(video)
                del video
    return trace.peak
