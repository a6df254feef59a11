"""Weight offloading: every mode gives identical output, block mode holds at most two blocks, the
hooks are real accelerate hooks and come off cleanly."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook

import streamdec
from streamdec.offload import Offloader

from helpers.video import stream_video

MODES = ["none", "model", "block"]
LATENTS = torch.randn(16, 4, 14, 18, generator=torch.Generator().manual_seed(21))


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints["official-pth"]


def decode(vae, chunks, tile=None):
    return stream_video(vae, LATENTS, chunks, tile=tile)


@pytest.fixture(scope="module")
def untouched(checkpoint):
    return decode(streamdec.load_vae(checkpoint, device="cpu"), [4])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunks, tile", [([4], None), ([1, 3], None), ([2, 2], 6)], ids=["whole", "chunked", "tiled"])
def test_every_mode_gives_identical_output(checkpoint, untouched, mode, chunks, tile):
    vae = streamdec.load_vae(checkpoint, device="cpu", offload=mode)
    assert vae.offload == mode
    out = decode(vae, chunks, tile)
    if tile is None and chunks == [4]:
        assert torch.equal(out, untouched)  # the very same computation, bit for bit
    else:
        assert (out - untouched).abs().max() <= 1e-4


def _resident(block) -> bool:
    return all(p.numel() > 0 for p in block.parameters())


@pytest.mark.parametrize("tile", [None, 6])
def test_block_mode_holds_at_most_two_blocks(checkpoint, tile):
    vae = streamdec.load_vae(checkpoint, device="cpu", offload="block")
    offloader = vae.offloader
    blocks = vae.decoder.offload_blocks()
    seen = []

    def probe(block, args):  # torch's pre-hook runs before accelerate's: the block is not yet loaded
        seen.append(sum(_resident(b) for b in blocks if b is not block))

    handles = [b.register_forward_pre_hook(probe) for b in blocks]
    decoder = streamdec.StreamDecoder(vae, tile=tile)
    decoder.push(LATENTS[:, :2])
    decoder.push(LATENTS[:, 2:])
    for h in handles:
        h.remove()
    assert len(seen) > len(blocks) and max(seen) <= 1  # at most the one prefetched block besides
    two_largest = sum(sorted(offloader.block_bytes.values())[-2:])
    assert 0 < offloader.peak_resident_bytes <= two_largest
    assert not any(_resident(b) for b in blocks)  # between chunks: nothing on the device


def test_model_mode_releases_between_chunks(checkpoint):
    vae = streamdec.load_vae(checkpoint, device="cpu", offload="model")
    blocks = vae.decoder.offload_blocks()
    decoder = streamdec.StreamDecoder(vae)
    decoder.push(LATENTS[:, :1])
    assert not any(_resident(b) for b in blocks)
    total = sum(vae.offloader.block_bytes.values())
    assert vae.offloader.peak_resident_bytes == total


def test_hooks_are_accelerate_hooks_and_come_off(checkpoint):
    plain = streamdec.load_vae(checkpoint, device="cpu")
    vae = streamdec.load_vae(checkpoint, device="cpu", offload="block")
    blocks = vae.decoder.offload_blocks()
    assert all(isinstance(b._hf_hook, ModelHook) for b in blocks)
    assert all("forward" in vars(b) for b in blocks)  # accelerate wraps forward on the instance
    decode(vae, [2])
    vae.offloader.remove()
    assert not any(hasattr(b, "_hf_hook") or "forward" in vars(b) for b in blocks)
    plain_state = plain.decoder.state_dict()
    assert all(torch.equal(t, plain_state[name]) for name, t in vae.decoder.state_dict().items())
    vae.offloader = None
    assert torch.equal(decode(vae, [4]), decode(plain, [4]))


def test_parameter_count_survives_offload(checkpoint):
    plain = streamdec.load_vae(checkpoint, device="cpu")
    assert streamdec.load_vae(checkpoint, device="cpu", offload="block").num_parameters() == plain.num_parameters()


def test_unknown_mode(checkpoint):
    with pytest.raises(ValueError, match="unknown offload mode 'disk'; use one of none, model, block"):
        streamdec.load_vae(checkpoint, device="cpu", offload="disk")


def test_offloader_refuses_blocks_that_miss_weights(checkpoint):
    vae = streamdec.load_vae(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="leave out"):
        streamdec.offload.attach(vae.decoder, vae.decoder.offload_blocks()[1:], "cpu", "block")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["model", "block"])
def test_cuda_modes_equal_none_and_prefetch_on_a_side_stream(checkpoint, mode):
    reference = decode(streamdec.load_vae(checkpoint, device="cuda"), [1, 3], tile=6)
    vae = streamdec.load_vae(checkpoint, device="cuda", offload=mode)
    assert all(t.is_pinned() for t in vae.offloader.rest.values())
    assert torch.equal(decode(vae, [1, 3], tile=6), reference)
    blocks = vae.decoder.offload_blocks()
    assert not any(p.is_cuda and p.numel() for b in blocks for p in b.parameters())
    if mode == "block":
        offloader: Offloader = vae.offloader
        assert offloader.side_stream in offloader.copy_streams
        assert offloader.peak_resident_bytes <= sum(sorted(offloader.block_bytes.values())[-2:])
