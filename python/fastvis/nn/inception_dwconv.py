"""``fastvis.nn.InceptionDWConv2d``: InceptionNeXt's token mixer with timm's names.

The channels are split into four groups, ``split_indexes = (C - 3 gc, gc, gc, gc)`` with
``gc = int(C * branch_ratio)``: the first passes through unchanged, the others go
through a depthwise ``k x k`` (``dwconv_hw``), ``1 x band`` (``dwconv_w``) and
``band x 1`` (``dwconv_h``) convolution ("same" padding, stride 1, optional dilation),
and the four results are concatenated in that order (timm's ``InceptionDWConv2d``).

The three convolutions are :class:`fastvis.nn.DepthwiseConv2d` parameter holders
(``weight`` (gc, 1, kh, kw), ``bias`` (gc,), as ``nn.Conv2d(gc, gc, k, groups=gc)``), so
timm / official state dicts load unchanged. The forward is one call of
the fused ``fastvis.ops.inception_depthwise_conv2d`` op (reads x once, writes the
concatenated output in place); :func:`inception_dwconv_unfused` (split -> three
depthwise convs -> cat) is kept as a composition of fastvis ops for comparisons.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from ..ops.depthwise_conv import depthwise_conv2d
from ..ops.inception_dwconv import inception_depthwise_conv2d
from .depthwise_conv import DepthwiseConv2d

__all__ = ["InceptionDWConv2d", "inception_dwconv_unfused"]


def inception_dwconv_unfused(
    x: torch.Tensor,
    hw_weight: torch.Tensor,
    hw_bias: Optional[torch.Tensor],
    w_weight: torch.Tensor,
    w_bias: Optional[torch.Tensor],
    h_weight: torch.Tensor,
    h_bias: Optional[torch.Tensor],
    dilation: int = 1,
) -> torch.Tensor:
    """split -> three :func:`fastvis.ops.depthwise_conv2d` calls -> cat.

    ``gc`` is taken from ``hw_weight`` (gc, 1, k, k); the identity group is the first
    ``C - 3 gc`` channels. The branch inputs are channel slices of x; when x is
    channels_last they are made channels_last-dense (the op's zero-copy layout) so the
    branch outputs, and therefore the concatenation, stay channels_last."""
    if x.dim() != 4:
        raise ValueError(f"InceptionDWConv2d: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    gc = hw_weight.shape[0]
    c = x.shape[1]
    if c < 3 * gc:
        raise ValueError(f"InceptionDWConv2d: the input has {c} channels, fewer than the 3 x {gc} "
                         "channels of the convolution branches")
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
           else torch.contiguous_format)
    x_id, x_hw, x_w, x_h = torch.split(x, (c - 3 * gc, gc, gc, gc), dim=1)
    d = dilation
    parts = [x_id] if c > 3 * gc else []  # an empty identity group would decide cat's layout
    parts += [
        depthwise_conv2d(x_hw.contiguous(memory_format=fmt), hw_weight, hw_bias, 1, "same", (d, d)),
        depthwise_conv2d(x_w.contiguous(memory_format=fmt), w_weight, w_bias, 1, "same", (1, d)),
        depthwise_conv2d(x_h.contiguous(memory_format=fmt), h_weight, h_bias, 1, "same", (d, 1)),
    ]
    return torch.cat(parts, dim=1)


def _kernel(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 or v % 2 == 0 or v > 63:
        raise ValueError(f"InceptionDWConv2d: {name} must be an odd int in 1..63, got {v!r}")
    return int(v)


class InceptionDWConv2d(nn.Module):
    """Inception depthwise convolution (timm's ``InceptionDWConv2d``, same keys).

    Args:
        in_chs: channels C.
        square_kernel_size: odd k of the ``k x k`` branch (default 3).
        band_kernel_size: odd length of the ``1 x k`` and ``k x 1`` branches (default 11).
        branch_ratio: each branch convolves ``gc = int(C * branch_ratio)`` channels
            (at least 1, at most C / 3).
        dilation: dilation of all three convolutions (along the band for the band ones).

    Kernel sizes must be odd: timm pads ``dilation * (k - 1) // 2`` on each side, which
    only keeps the size for odd k (an even k fails in timm's concatenation).
    Initialisation is ``nn.Conv2d``'s; InceptionNeXt re-initialises (truncated normal).
    """

    def __init__(self, in_chs: int, square_kernel_size: int = 3, band_kernel_size: int = 11,
                 branch_ratio: float = 0.125, dilation: int = 1, device=None, dtype=None):
        super().__init__()
        if isinstance(in_chs, bool) or not isinstance(in_chs, numbers.Integral) or in_chs < 1:
            raise ValueError(f"InceptionDWConv2d: in_chs must be a positive int, got {in_chs!r}")
        square_kernel_size = _kernel("square_kernel_size", square_kernel_size)
        band_kernel_size = _kernel("band_kernel_size", band_kernel_size)
        if isinstance(branch_ratio, bool) or not isinstance(branch_ratio, numbers.Real):
            raise TypeError(f"InceptionDWConv2d: branch_ratio must be a number, got {branch_ratio!r}")
        if isinstance(dilation, bool) or not isinstance(dilation, numbers.Integral) or dilation < 1:
            raise ValueError(f"InceptionDWConv2d: dilation must be a positive int, got {dilation!r}")
        in_chs, dilation = int(in_chs), int(dilation)
        gc = int(in_chs * branch_ratio)
        if gc < 1 or 3 * gc > in_chs:
            raise ValueError(
                f"InceptionDWConv2d: int(in_chs * branch_ratio) = int({in_chs} * {branch_ratio}) = {gc} "
                f"channels per branch; need 1 <= gc <= in_chs / 3")
        factory = {"device": device, "dtype": dtype}
        self.in_chs = in_chs
        self.gc = gc
        self.dilation = dilation
        self.dwconv_hw = DepthwiseConv2d(gc, square_kernel_size, padding="same", dilation=dilation, **factory)
        self.dwconv_w = DepthwiseConv2d(gc, (1, band_kernel_size), padding="same", dilation=(1, dilation), **factory)
        self.dwconv_h = DepthwiseConv2d(gc, (band_kernel_size, 1), padding="same", dilation=(dilation, 1), **factory)
        self.split_indexes = (in_chs - 3 * gc, gc, gc, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chs:
            raise ValueError(f"InceptionDWConv2d: expected input of shape (N, {self.in_chs}, H, W), "
                             f"got {tuple(x.shape)}")
        return inception_depthwise_conv2d(
            x,
            self.dwconv_hw.weight, self.dwconv_hw.bias,
            self.dwconv_w.weight, self.dwconv_w.bias,
            self.dwconv_h.weight, self.dwconv_h.bias,
            dilation=self.dilation,
        )

    def extra_repr(self) -> str:
        return (f"{self.in_chs}, split_indexes={self.split_indexes}, "
                f"square={tuple(self.dwconv_hw.kernel_size)}, band={self.dwconv_w.kernel_size[1]}, "
                f"dilation={self.dilation}")
