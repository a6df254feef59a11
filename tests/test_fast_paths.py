"""The fast paths of the Wan decoders on the CPU: channels-last activations end to end, norm + SiLU
fused (eagerly, or compiled by torch.compile), several latent frames per call chosen by the frame
size. Each must leave the output equal to diffusers'."""

from __future__ import annotations

import pytest
import torch

import streamdec
from streamdec.layers import CompiledNormSilu, RMSNorm
from streamdec.memory import PLAN_MARGIN, estimate_peak
from streamdec.plan import CALL_PIXELS, GIB, MAX_CALL_FRAMES, calls_for

from helpers.video import assert_equal_video, stream_video
from helpers.wan import random_wan, reference_decode


@pytest.fixture(scope="module")
def vae(checkpoints):
    return streamdec.load_vae(checkpoints["official-pth"], device="cpu")


@pytest.fixture(scope="module")
def compiled_vae(checkpoints):
    return streamdec.load_vae(checkpoints["official-pth"], device="cpu", compile=True)


def conv_input_layouts(vae, run) -> list[str]:
    """The name of every convolution whose input was not channels-last while `run()` decoded."""
    names = {m: n for n, m in vae.decoder.named_modules()}
    strays = []

    def check(module, args):
        layout = torch.channels_last_3d if args[0].dim() == 5 else torch.channels_last
        if not args[0].is_contiguous(memory_format=layout):
            strays.append(names[module])

    convs = [m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    hooks = [m.register_forward_pre_hook(check) for m in convs]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return strays


@pytest.mark.parametrize("version", ["2.1", "2.2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_convolution_runs_channels_last_and_equals_diffusers(version, dtype):
    """One latent frame per push, so the first frame's one-frame tensors are covered too (a layout
    that slips there would spread through the caches to every later frame)."""
    model = random_wan(base_dim=8, version=version, num_res_blocks=1)
    z = torch.randn(1, model.config.z_dim, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    reference = reference_decode(model, z)[0]
    vae = streamdec.load_vae(model, device="cpu", dtype=dtype)
    weights = [m.weight for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d if w.dim() == 5 else torch.channels_last)
               for w in weights)  # fmt: skip
    video = {}
    strays = conv_input_layouts(vae, lambda: video.setdefault("v", stream_video(vae, z[0], [1, 1, 1, 1], normalized=False)))
    assert strays == []
    if dtype == "fp32":
        assert_equal_video(video["v"], reference)
    else:  # rounding, not a wrong layout: a wrong one gives errors near 1
        assert (video["v"] - reference.clamp(-1, 1)).abs().mean() < 0.03


def test_fused_norm_silu_equals_norm_then_silu():
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.gamma.copy_(1 + 0.5 * torch.randn_like(norm.gamma))
    x = torch.randn(2, 6, 3, 4, 5)
    expected = torch.nn.functional.silu(norm(x))
    torch.testing.assert_close(norm(x.clone(), silu=True), expected, rtol=0, atol=1e-6)
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(norm(channels_last, silu=True), expected, rtol=0, atol=1e-6)


def test_compiled_norms_equal_diffusers(compiled_vae, latents, reference_video):
    kernels = {m.fused for m in compiled_vae.decoder.modules() if isinstance(m, RMSNorm)}
    assert len(kernels) == 1 and isinstance(next(iter(kernels)), CompiledNormSilu)
    assert_equal_video(stream_video(compiled_vae, latents, [1, 4]), reference_video[0])
    assert next(iter(kernels)).kernel is not None  # it compiled and ran; it did not fall back


def test_compiled_bf16_is_close_to_fp32_reference(checkpoints, latents, reference_video):
    vae = streamdec.load_vae(checkpoints["official-pth"], device="cpu", dtype="bf16", compile=True)
    ours = stream_video(vae, latents, [5])
    assert (ours - reference_video[0]).abs().mean() < 0.03


def test_a_kernel_that_cannot_compile_falls_back_to_eager(checkpoints, latents, reference_video):
    vae = streamdec.load_vae(checkpoints["official-pth"], device="cpu", compile=True)
    kernel = next(m.fused for m in vae.decoder.modules() if isinstance(m, RMSNorm))

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    kernel.kernel = broken
    with pytest.warns(UserWarning, match="compiling the fused norm failed .*no C\\+\\+ compiler.*eager"):
        video = stream_video(vae, latents, [5])
    assert kernel.kernel is None  # warned once, then eager for good
    assert_equal_video(video, reference_video[0])


def test_frames_per_call_auto_follows_the_frame_size(vae):
    per_latent = vae.temporal_ratio * vae.spatial_ratio**2
    assert calls_for(vae, (6, 8)) == MAX_CALL_FRAMES  # 48x64 frames: the most
    assert calls_for(vae, (12, 16)) == CALL_PIXELS // (per_latent * 12 * 16) == 2  # 96x128
    assert calls_for(vae, (24, 24)) == 1  # 192x192 and larger: one
    assert calls_for(vae, (60, 104)) == 1
    stream = streamdec.StreamDecoder(vae)
    stream.start((12, 16))
    assert stream.plan.frames_per_call == 2
    stream = streamdec.StreamDecoder(vae, frames_per_call=3)
    stream.start((12, 16))
    assert stream.plan.frames_per_call == 3


def test_frames_per_call_auto_takes_one_where_more_would_not_fit(vae, latents):
    size, frames = tuple(latents.shape[-2:]), latents.shape[1]
    many = calls_for(vae, size)
    one_peak = estimate_peak(vae, size, frames, frames_per_call=1)
    many_peak = estimate_peak(vae, size, frames, frames_per_call=many)
    assert many > 1 and many_peak > one_peak
    budget = (one_peak + many_peak) / 2 / PLAN_MARGIN / GIB
    stream = streamdec.StreamDecoder(vae, max_vram=budget, tile=None)
    stream.start(size, frames)
    assert stream.plan.frames_per_call == 1
    with pytest.raises(streamdec.StreamdecError, match="GiB"):  # named, it is not lowered behind the caller's back
        streamdec.StreamDecoder(vae, max_vram=budget, tile=None, frames_per_call=many).start(size, frames)
