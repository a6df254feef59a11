"""Device memory of a family's stream, traced on the meta device."""

from __future__ import annotations

from streamdec.memory import traced_peak
from streamdec.plan import Plan


def meta_peak(vae, frames: int, size: tuple[int, int], park: bool) -> int:
    """The device peak of a decode of `frames` latent frames of `size` latent pixels, one per push,
    traced on the meta device, what grows parked on the host (as on a GPU) or not."""
    return traced_peak(vae, size, frames, Plan(park=park))
