"""PatchConv2d: ``nn.Conv2d(in, out, k, stride=k)`` computed by :func:`fastvis.ops.patch_conv2d`."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.patch_conv import patch_conv2d


class PatchConv2d(nn.Conv2d):
    """A drop-in for ``nn.Conv2d(in_channels, out_channels, kernel_size, stride=kernel_size)``
    (the stems and downsampling layers of ConvNeXt-style networks): same parameters, names,
    initialisation and state-dict keys (it *is* an ``nn.Conv2d``). Inference on the CPU runs
    fastvis' patch convolution; training runs PyTorch's. The output is channels_last either
    way (the layout the fastvis blocks after a stem or downsampling layer work in), whatever
    the input's layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = patch_conv2d(x, self.weight, self.bias)
        return y.contiguous(memory_format=torch.channels_last)  # no copy when already so
