"""Decoded pieces -> host frames (streamdec.frames): the CPU path's zero-copy views, and the host
ring a GPU copies into: buffers reused once let go, never while a frame or a pending piece holds
them. The ring's logic runs on the CPU here (unpinned buffers, no events); the `cuda` tests run it
for real against a GPU."""

from __future__ import annotations

import gc
import queue
import threading
import time

import numpy as np
import pytest
import torch

from streamdec.frames import HostRing, host_piece, ring_for, to_host_tensors, to_host_uint8, to_uint8


def piece(frames: int = 4, h: int = 6, w: int = 10, seed: int = 0, device="cpu") -> torch.Tensor:
    """A decoded piece (1, 3, T, H, W), a little past [-1, 1] so clamping shows."""
    g = torch.Generator().manual_seed(seed)
    return (1.2 * torch.randn(1, 3, frames, h, w, generator=g)).to(device)


def expected_uint8(video: torch.Tensor) -> list[np.ndarray]:
    x = ((video.double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 3, 0)
    return [f.numpy() for f in x.cpu()]


def test_cpu_frames_are_views_of_one_converted_piece():
    video = piece()
    frames = to_host_uint8(video)
    assert len(frames) == 4
    for frame, want in zip(frames, expected_uint8(video)):
        assert frame.dtype == np.uint8 and frame.shape == (6, 10, 3)
        np.testing.assert_array_equal(frame, want)
    assert frames[0].base is not None and frames[0].base is frames[1].base  # zero copy: views of one array


def test_cpu_tensor_frames():
    video = piece()
    frames = to_host_tensors(video)
    assert [f.shape for f in frames] == [(3, 6, 10)] * 4
    torch.testing.assert_close(torch.stack(frames, 1)[None], video.clamp(-1, 1), rtol=0, atol=0)


def test_ring_reuses_buffers_once_frames_are_let_go():
    ring = HostRing(slots=2, pin=False)
    for seed in range(10):
        video = piece(seed=seed)
        frames = ring.copy(to_uint8(video)).frames()
        for frame, want in zip(frames, expected_uint8(video)):
            np.testing.assert_array_equal(frame, want)
        del frames, frame
    assert ring.allocations == 1  # one buffer, reused by every piece


def test_ring_never_overwrites_frames_the_caller_holds():
    ring = HostRing(slots=2, pin=False)
    kept, wants = [], []
    for seed in range(6):  # more pieces held than slots
        video = piece(seed=seed)
        frames = ring.copy(to_uint8(video)).frames()
        kept.append(frames[seed % 4][1:, ::2])  # a view of a view: enough to hold the buffer
        wants.append(expected_uint8(video)[seed % 4][1:, ::2])
        del frames
    for frame, want in zip(kept, wants):
        np.testing.assert_array_equal(frame, want)
    assert ring.allocations == 6  # every held buffer left to its frame, a fresh one made
    kept.clear()
    gc.collect()
    before = ring.allocations
    for seed in range(4):
        ring.copy(to_uint8(piece(seed=seed))).frames()
    assert ring.allocations == before  # let go: the slots' buffers are reused again


@pytest.mark.parametrize("hold", ["memoryview", "torch.from_numpy", "np.asarray"])
def test_other_holders_of_the_memory_hold_the_buffer(hold):
    ring = HostRing(slots=1, pin=False)
    video = piece(seed=1)
    frame = ring.copy(to_uint8(video)).frames()[2]
    holder = {"memoryview": memoryview, "torch.from_numpy": torch.from_numpy, "np.asarray": np.asarray}[hold](frame)
    del frame
    ring.copy(to_uint8(piece(seed=2))).frames()  # must not land in the held buffer
    np.testing.assert_array_equal(np.asarray(holder), expected_uint8(video)[2])
    assert ring.allocations == 2


def test_frames_read_later_in_another_thread_are_intact():
    """As decode_to_file hands frames to its writer thread through a bounded queue."""
    ring = HostRing(slots=2, pin=False)
    videos = [piece(seed=s) for s in range(12)]
    frames: queue.Queue = queue.Queue(maxsize=3)
    seen = []

    def writer():
        while (frame := frames.get()) is not None:
            time.sleep(0.002)  # a slow encoder: the producer runs ahead until the queue is full
            seen.append(frame.copy())

    thread = threading.Thread(target=writer)
    thread.start()
    for video in videos:
        for frame in ring.copy(to_uint8(video)).frames():
            frames.put(frame)
        del frame
    frames.put(None)
    thread.join()
    wants = [f for video in videos for f in expected_uint8(video)]
    assert len(seen) == len(wants)
    for got, want in zip(seen, wants):
        np.testing.assert_array_equal(got, want)
    assert ring.allocations < len(videos)  # buffers came back to the ring once written


def test_pending_pieces_hold_their_buffers():
    """Several pieces copied before any is read (as when the host waits only when it needs frames)."""
    ring = HostRing(slots=2, pin=False)
    videos = [piece(seed=s) for s in range(5)]
    pending = [ring.copy(to_uint8(v)) for v in videos]
    for p, video in zip(pending, videos):
        for frame, want in zip(p.frames(), expected_uint8(video)):
            np.testing.assert_array_equal(frame, want)
    with pytest.raises(RuntimeError, match="already been taken"):
        pending[0].frames()


def test_ring_grows_a_buffer_for_a_bigger_piece_and_serves_smaller_ones():
    ring = HostRing(slots=1, pin=False)
    small, big = piece(frames=1, seed=3), piece(frames=4, seed=4)
    for video in (small, big, small, big):
        for frame, want in zip(ring.copy(to_uint8(video)).frames(), expected_uint8(video)):
            np.testing.assert_array_equal(frame, want)
        del frame  # the loop's last frame would hold the buffer
    assert ring.allocations == 2  # the first piece's buffer, then one big enough for all


def test_ring_copies_float_frames_out():
    ring = HostRing(slots=1, pin=False)
    video = piece(seed=5)
    frames = ring.copy(video.float().clamp(-1, 1)[0].transpose(0, 1).contiguous(), as_tensor=True).frames()
    assert not any(np.shares_memory(f.numpy(), ring.slots[0].array) for f in frames)
    ring.copy(to_uint8(piece(seed=6))).frames()  # reuses the buffer: float frames are unaffected
    torch.testing.assert_close(torch.stack(frames, 1)[None], video.clamp(-1, 1), rtol=0, atol=0)
    assert ring.allocations == 1


def test_host_piece_on_cpu_is_ready_without_a_ring():
    video = piece(seed=7)
    for frame, want in zip(host_piece(video).frames(), expected_uint8(video)):
        np.testing.assert_array_equal(frame, want)


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
def test_cuda_frames_equal_the_cpu_path():
    for seed, frames in enumerate((1, 4, 4, 2)):
        video = piece(frames=frames, h=48, w=64, seed=seed)
        for got, want in zip(to_host_uint8(video.cuda()), to_host_uint8(video)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(to_host_tensors(video.cuda()), to_host_tensors(video)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.cuda
def test_cuda_ring_is_pinned_and_stops_allocating():
    ring = ring_for(torch.device("cuda"))
    for seed in range(12):
        to_host_uint8(piece(h=48, w=64, seed=seed).cuda())
    gc.collect()
    before = ring.allocations
    for seed in range(12):
        to_host_uint8(piece(h=48, w=64, seed=seed).cuda())
    assert ring.allocations == before
    assert all(b is None or b.tensor.is_pinned() for b in ring.slots)


@pytest.mark.cuda
def test_cuda_deferred_wait_keeps_held_frames_and_pending_pieces_intact():
    """Copies queued behind slow GPU work, read only later, with frames of earlier pieces still held."""
    ring = HostRing(slots=2)
    a = torch.randn(2048, 2048, device="cuda")
    videos = [piece(h=96, w=128, seed=s) for s in range(6)]
    held = ring.copy(to_uint8(videos[0].cuda())).frames()
    pending = []
    for video in videos[1:]:
        for _ in range(5):
            a = (a @ a).tanh_()  # keeps the GPU busy so the copies are still queued when the host moves on
        pending.append(ring.copy(to_uint8(video.cuda())))
    for p, video in zip(pending, videos[1:]):
        for got, want in zip(p.frames(), expected_uint8(video)):
            np.testing.assert_array_equal(got, want)
    for got, want in zip(held, expected_uint8(videos[0])):
        np.testing.assert_array_equal(got, want)
