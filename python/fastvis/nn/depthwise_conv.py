"""``fastvis.nn.DepthwiseConv2d``: a drop-in for ``nn.Conv2d(C, C, k, groups=C)``."""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import nn

from ..ops.depthwise_conv import Padding, _pair, depthwise_conv2d, normalize_conv_args


class DepthwiseConv2d(nn.Module):
    """Depthwise convolution with ``nn.Conv2d``'s parameter names and shapes.

    ``weight`` is (C, 1, kh, kw) and ``bias`` (C,), so state dicts of
    ``nn.Conv2d(C, C, k, groups=C)`` load unchanged (and the other way round).
    Initialisation follows ``nn.Conv2d``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Padding = "same",
        dilation: Union[int, Tuple[int, int]] = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"DepthwiseConv2d: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1 or max(self.kernel_size) > 63:
            raise ValueError(f"DepthwiseConv2d: kernel sizes must be in 1..63, got {self.kernel_size}")
        # Validate once here so a bad configuration fails at construction.
        s, p, d = normalize_conv_args(self.kernel_size, stride, padding, dilation)
        self.stride, self.dilation = tuple(s), tuple(d)
        self.padding = padding
        self._pads = tuple(p)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(channels, 1, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation: kaiming_uniform(a=sqrt(5)), bias U(-1/sqrt(fan_in), ...).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self._pads, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, dilation={self.dilation}, bias={self.bias is not None}"
        )
