"""Decoded video pieces on the device -> frames on the host.

A piece (1, 3, T, H, W) in [-1, 1] becomes uint8 RGB on the device (4x fewer bytes to copy than
float32), is copied into pinned host memory without blocking the device's queue for longer than the
copy, and is handed out frame by frame. Nothing here keeps a frame once it is handed out.
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 RGB, round((clamp(x) + 1) * 127.5), on the same device."""
    scaled = (video.float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round_().to(torch.uint8)[0].permute(1, 2, 3, 0).contiguous()


def to_host_uint8(video: torch.Tensor) -> list[np.ndarray]:
    return list(_to_host(to_uint8(video)).numpy())


def to_host_tensors(video: torch.Tensor) -> list[torch.Tensor]:
    """(1, 3, T, H, W) -> T float32 CPU tensors (3, H, W), clamped to [-1, 1]."""
    frames = video.float().clamp(-1.0, 1.0)[0].transpose(0, 1).contiguous()
    return list(_to_host(frames).unbind(0))


def _to_host(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return host
