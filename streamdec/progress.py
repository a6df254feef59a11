"""A one-line progress bar on stderr: frames done, frames per second, time left."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._shown = 0.0

    def update(self, frames: int = 1) -> None:
        self.done += frames
        now = time.perf_counter()
        if self.enabled and (now - self._shown > 0.2 or self.done == self.total):
            self._shown = now
            self._draw(now - self.start)

    def _draw(self, elapsed: float) -> None:
        fps = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / fps if fps > 0 else 0.0
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} frames  {fps:5.1f} fps  ETA {_clock(left)}  "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
