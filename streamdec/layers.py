"""Building blocks shared by the video decoders.

Tensors are (batch, channels, time, height, width) throughout. A module whose output depends on
earlier frames takes an optional StreamState as its second argument: with one it continues the
stream kept there, without one it decodes its input in one shot, as the references do.
"""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = F.normalize(x.float() if x.dtype in HALF_DTYPES else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma


class NearestUpsample2x(nn.Module):
    """2x nearest-neighbour upsampling of (N, C, H, W), computed in fp32 (bf16 support)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of a (B, C, T, H, W) tensor."""
    b, _, t, _, _ = x.shape
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
