"""Streaming a latent tensor through streamdec, and the equality every family's tests assert."""

from __future__ import annotations

import torch

TOL = 1e-4  # max abs error against the reference, fp32


def assert_equal_video(ours: torch.Tensor, reference: torch.Tensor):
    assert ours.shape == reference.shape
    err = (ours - reference).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g} > {TOL}"


def stream_video(vae, latents, chunks, tile=None, normalized=True, frames_per_call=1) -> torch.Tensor:
    """Push `latents` (C, T, h, w) through a StreamDecoder in chunks of the given lengths;
    return the video as one (3, F, H, W) float32 tensor."""
    import streamdec

    decoder = streamdec.StreamDecoder(vae, normalized=normalized, as_tensor=True, tile=tile,
                                      frames_per_call=frames_per_call)  # fmt: skip
    frames, start = [], 0
    for n in chunks:
        frames += decoder.push(latents[:, start : start + n])
        start += n
    return torch.stack(frames + decoder.close(), dim=1)
