"""Building blocks shared by the causal video decoders.

Tensors are (batch, channels, time, height, width) throughout. Every module whose output
depends on earlier frames takes the StreamState as its second argument; everything else
is a plain per-frame or per-position function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .state import StreamState

HALF_DTYPES = (torch.float16, torch.bfloat16)


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution that is causal in time.

    Output frame t sees input frames t-k+1 .. t. Before the stream starts the missing past is
    zeros; afterwards it is the last k-1 input frames of the previous chunk, kept in the
    StreamState. So decoding in chunks of any size equals decoding the whole sequence at once.
    Spatial padding is symmetric zero padding, done by the convolution itself.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0):
        kernel = _triple(kernel_size)
        pad = _triple(padding)
        super().__init__(in_channels, out_channels, kernel, padding=(0, pad[1], pad[2]))
        # The references pad time by 2*pad in front, which for their kernels is kernel-1.
        self.past_frames = 2 * pad[0]

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.past_frames:
            x = state.with_history(self, x, self.past_frames)
        return conv3d(self, x)


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
