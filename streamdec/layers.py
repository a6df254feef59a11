"""Building blocks shared by the video decoders.

Tensors are (batch, channels, time, height, width) throughout. A module whose output depends on
earlier frames takes an optional StreamState as its second argument: with one it continues the
stream kept there, without one it decodes its input in one shot, as the references do.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .state import StreamState

HALF_DTYPES = (torch.float16, torch.bfloat16)
PADDINGS = ("zeros", "replicate")


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution that is causal in time: output frame t sees input frames t-k+1 .. t.

    Before the stream starts the missing k-1 past frames are zeros (`time_pad="zeros"`, Wan) or
    copies of the first frame (`"replicate"`, HunyuanVideo, Open-Sora-Plan); afterwards they are the
    last k-1 input frames of the previous chunk, kept in the StreamState. So decoding in chunks of any
    size equals decoding the whole sequence at once. Space is padded by `padding` on each side, with
    zeros (done by the convolution) or by replicating the border (`spatial_pad="replicate"`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, time_pad: str = "zeros",
                 spatial_pad: str = "zeros"):  # fmt: skip
        if time_pad not in PADDINGS or spatial_pad not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, not {time_pad!r} / {spatial_pad!r}")
        kernel, pad = _triple(kernel_size), _triple(padding)
        conv_pad = (0, pad[1], pad[2]) if spatial_pad == "zeros" else 0
        super().__init__(in_channels, out_channels, kernel, padding=conv_pad)
        self.past_frames = kernel[0] - 1
        self.time_pad = time_pad
        self.border = (pad[2], pad[2], pad[1], pad[1], 0, 0) if spatial_pad == "replicate" and any(pad[1:]) else None

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        if state is None and self.border is not None and self.time_pad == "replicate":
            x = F.pad(x, (*self.border[:4], self.past_frames, 0), mode="replicate")  # one copy for both pads
        else:
            if state is not None and self.past_frames:
                x = state.with_history(self, x, self.past_frames, first=self.time_pad)
            elif self.past_frames:
                x = _pad_front(x, self.past_frames, self.time_pad)
            if self.border is not None:
                x = F.pad(x, self.border, mode="replicate")
        return conv3d(self, x)


class WrappedCausalConv3d(nn.Module):
    """A CausalConv3d kept as `.conv`, where the checkpoints store it so (HunyuanVideo, Open-Sora-Plan:
    `conv_in.conv.weight`)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.conv = CausalConv3d(*args, **kwargs)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        return self.conv(x, state)


def _pad_front(x: torch.Tensor, frames: int, mode: str) -> torch.Tensor:
    if mode == "replicate":
        return torch.cat([x[:, :, :1].expand(-1, -1, frames, -1, -1), x], dim=2)
    return F.pad(x, (0, 0, 0, 0, frames, 0))


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, computed by oneDNN for fp32 on CPU: PyTorch sends a 5-D input to its slow
    reference kernel whenever B*C*T*H <= 20480 (a rule made for images: it ignores W), which is
    most of a video decoder's convolutions; oneDNN computes the same convolution 2-16x faster."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, 1)
    return nn.Conv3d.forward(conv, x)


class Conv3d(nn.Conv3d):
    """nn.Conv3d computed by `conv3d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(self, x)


class RMSNorm(nn.Module):
    """L2-normalize over channels at each position, times sqrt(C) and a learned gain.

    Half-precision inputs are normalized in fp32 and cast back, as diffusers does.
    """

    def __init__(self, channels: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))
        self.fused: CompiledNormSilu | None = None  # see compile_norms

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """self(x), or with `silu` silu(self(x)) made in fewer passes (`_then_silu`). Called as a
        module either way, so offload hooks see it."""
        if silu:
            return self._then_silu(x)
        normalized = F.normalize(x.float() if x.dtype in HALF_DTYPES else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma

    def _then_silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(self(x)), by the compiled kernel where `compile_norms` gave one, else in eager
        PyTorch: the norms taken in fp32 straight from a half-precision input (no fp32 copy of it),
        then three in-place passes. In fp32 equal to silu(self(x)) to rounding; in half precision it
        rounds twice where the plain form rounds three times."""
        if self.fused is not None:
            y = self.fused(x, self.gamma * self.scale)
            if y is not None:
                return y
        if x.dtype in HALF_DTYPES:
            norms = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
            y = x * norms.clamp_min_(NORM_EPS).reciprocal_().to(x.dtype)
        else:
            y = F.normalize(x, dim=1, eps=NORM_EPS)
        y.mul_(self.gamma * self.scale)
        return F.silu(y, inplace=True)


NORM_EPS = 1e-12  # F.normalize's


def _norm_silu(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """silu(x / |x| * gain), the norm over channels, computed in fp32: what `CompiledNormSilu` compiles."""
    xf = x.float()
    inverse = torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(NORM_EPS).reciprocal()
    return F.silu(xf * inverse * gain.float()).to(x.dtype)


class CompiledNormSilu:
    """RMSNorm + SiLU as one kernel made by torch.compile (inductor): the activation is read once and
    written once, in fp32 registers whatever its dtype, where eager PyTorch makes four passes and
    half-precision roundings between them (about 4x faster for a bf16 activation on the CPU). Compiled
    on first use for any shape (a few seconds; inductor keeps it on disk for later runs). Where it
    cannot compile (no C++ compiler, a device inductor does not take) it warns once and the norms
    run in eager PyTorch."""

    def __init__(self) -> None:
        self.kernel = torch.compile(_norm_silu, dynamic=True)

    def __call__(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor | None:
        if self.kernel is None:
            return None
        try:
            return self.kernel(x, gain)
        except Exception as err:  # inductor raises many kinds; the eager path is always there
            warnings.warn(f"streamdec: compiling the fused norm failed ({type(err).__name__}: {err}); "
                          f"running it in eager PyTorch", stacklevel=2)  # fmt: skip
            self.kernel = None
            return None


def compile_norms(module: nn.Module) -> None:
    """Give every RMSNorm in `module` one shared `CompiledNormSilu` (used where a norm feeds a SiLU:
    `norm(x, silu=True)`)."""
    fused = CompiledNormSilu()
    for norm in module.modules():
        if isinstance(norm, RMSNorm):
            norm.fused = fused


class NearestUpsample2x(nn.Module):
    """2x nearest-neighbour upsampling of (N, C, H, W), in the input's dtype and memory format (a
    copy of each value: exact in any dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` (B, C, T, H, W) laid out channels-last on the CPU, the layout oneDNN's convolutions run fastest
    in; the layers after keep that layout, so it is changed once per call, not per layer. A decoder
    that does this says so (`channels_last = True`), and its convolution weights are laid out to
    match once, at load (`prepare_layout`), not converted by every call."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.device.type == "cpu" else x


def prepare_layout(decoder: nn.Module, device: torch.device) -> None:
    """Lay out the weights of a `channels_last` decoder's 2-D and 3-D convolutions channels-last on
    the CPU, in place, before anything copies them (offload's resting copies)."""
    if torch.device(device).type != "cpu" or not getattr(decoder, "channels_last", False):
        return
    for conv in decoder.modules():
        if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
            layout = torch.channels_last_3d if conv.weight.dim() == 5 else torch.channels_last
            conv.weight.data = conv.weight.data.contiguous(memory_format=layout)


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of a (B, C, T, H, W) tensor."""
    b, _, t, _, _ = x.shape
    if b * t == 1:  # selected, not flattened: a flattened view of one frame has a batch stride
        return module(x[:, :, 0]).unsqueeze(2)  # that sends a channels-last input to other layouts
    y = module(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def attend_in_blocks(q: torch.Tensor, blocks, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys and values of all `blocks` ((B, N, C) each, q (B, M, C)),
    taken one block at a time: each block's scores are folded into a running maximum, sum and output
    (fp32), so kept keys and values can visit the device a block at a time."""
    q32 = q.float() * scale
    top = total = acc = None
    for k, v in blocks:
        scores = q32 @ k.float().transpose(1, 2)
        block_top = scores.amax(dim=-1, keepdim=True)
        new_top = block_top if top is None else torch.maximum(top, block_top)
        weights = torch.exp(scores - new_top)
        block_out = weights @ v.float()
        if top is None:
            total, acc = weights.sum(dim=-1, keepdim=True), block_out
        else:
            rescale = torch.exp(top - new_top)
            total = total * rescale + weights.sum(dim=-1, keepdim=True)
            acc = acc * rescale + block_out
        top = new_top
    return (acc / total).to(q.dtype)
