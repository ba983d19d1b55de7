"""``fastvis.nn.LayerNorm2d``: timm's ``LayerNorm2d`` (ConvNeXt) on fastvis kernels."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.layer_norm import layer_norm_channels


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, H, W) tensors, as ``timm.layers.LayerNorm2d``.

    A subclass of ``nn.LayerNorm`` with ``normalized_shape = (num_channels,)``; the
    parameters are ``weight`` (ones) and ``bias`` (zeros) of shape (C,) when ``affine``,
    so timm state dicts load unchanged. The output keeps the input's memory format.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None):
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"LayerNorm2d: num_channels must be a positive int, got {num_channels!r}")
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_channels(x, self.weight, self.bias, self.eps)
