"""PatchConv2d: ``nn.Conv2d(in, out, k, stride=k)`` computed by :func:`fastvis.ops.patch_conv2d`."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.patch_conv import patch_conv2d
from .layer_norm import LayerNorm2d
from .reparam import bn_scale_shift, cached_fold, fuse_conv_bn, inference_only, kmajor_conv


class PatchConv2d(nn.Conv2d):
    """A drop-in for ``nn.Conv2d(in_channels, out_channels, kernel_size, stride=kernel_size)``
    (the stems and downsampling layers of ConvNeXt-style networks), or with another
    ``stride`` and zero ``padding`` (ints or pairs; e.g. UniRepLKNet's 3x3 stride-2 layers):
    same parameters, names, initialisation and state-dict keys (it *is* an ``nn.Conv2d``).
    Inference on the CPU runs fastvis' patch convolution (:func:`fastvis.ops.patch_conv2d`);
    training runs PyTorch's forward and input gradient and fastvis' weight gradient (RGB
    stems: PyTorch's convolution whole). The output is channels_last either way (the layout
    the fastvis blocks after a stem or downsampling layer work in), whatever the input's
    layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, bias: bool = True,
                 device=None, dtype=None, stride=None, padding=0):
        if isinstance(padding, str):
            raise TypeError("PatchConv2d: padding must be an int or a pair of ints (zero padding)")
        super().__init__(in_channels, out_channels, kernel_size,
                         stride=kernel_size if stride is None else stride, padding=padding,
                         bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if inference_only(self, x) and x.dtype == w.dtype:
            # Inference: the weight k-major (kmajor_conv), cached until it changes.
            w = cached_fold(self, x.dtype, lambda: kmajor_conv(self.weight))
        y = patch_conv2d(x, w, self.bias, self.stride, self.padding)
        return y.contiguous(memory_format=torch.channels_last)  # no copy when already so


class PatchConvBN(nn.Sequential):
    """``nn.Sequential(PatchConv2d, BatchNorm2d)`` or ``nn.Sequential(BatchNorm2d,
    PatchConv2d)`` (state-dict keys ``0.*`` / ``1.*`` as the plain Sequential): an
    InceptionNeXt stem or downsampling layer. In inference (eval mode, CPU, no gradients
    needed) the BatchNorm is folded into the convolution -- exactly, as the patches do not
    overlap and there is no padding -- and the pair is one :func:`fastvis.ops.patch_conv2d`
    call with the folded weights cached until a parameter or statistic changes. Otherwise
    the two modules run as given."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__(first, second)
        bn_first = isinstance(first, nn.BatchNorm2d)
        conv, bn = (second, first) if bn_first else (first, second)
        if not isinstance(conv, PatchConv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError("PatchConvBN: expected a PatchConv2d and a BatchNorm2d")
        if bn_first and tuple(conv.padding) != (0, 0):
            # BN(x) = x * s + t folds into the convolution only where no padding zero is
            # read (the zeros are not shifted by t).
            raise ValueError("PatchConvBN: a BatchNorm before a padded convolution cannot be folded")
        want = conv.in_channels if bn_first else conv.out_channels
        if bn.num_features != want:
            raise ValueError(f"PatchConvBN: BatchNorm2d has {bn.num_features} features, expected {want}")
        self.bn_first = bn_first

    def _parts(self):
        return (self[1], self[0]) if self.bn_first else (self[0], self[1])

    def _fold(self, dtype):
        conv, bn = self._parts()
        if self.bn_first:  # conv(x * s + t) = conv_{w * s}(x) + sum_{c,i,j} w t (no padding)
            scale, shift = bn_scale_shift(bn)
            w = conv.weight.double()
            b = (w * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
            if conv.bias is not None:
                b = b + conv.bias.double()
            w = w * scale.view(1, -1, 1, 1)
        else:  # bn(conv(x))
            w, b = fuse_conv_bn(conv.weight, conv.bias, bn)
        return kmajor_conv(w.to(dtype)), b.to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self._parts()
        if (inference_only(self, x) and not bn.training and bn.running_mean is not None
                and x.dtype in (torch.float32, torch.float64)):
            w, b = cached_fold(self, x.dtype, lambda: self._fold(x.dtype))
            return patch_conv2d(x, w, b, conv.stride, conv.padding).contiguous(
                memory_format=torch.channels_last)
        return super().forward(x)


class PatchConvLN(nn.Sequential):
    """``nn.Sequential(PatchConv2d, LayerNorm2d)`` (ConvNeXt's stem) or
    ``nn.Sequential(LayerNorm2d, PatchConv2d)`` (its downsampling layers), with the
    state-dict keys ``0.*`` / ``1.*`` of the plain Sequential. In inference (eval mode,
    CPU, nothing needing gradients) the pair is one :func:`fastvis.ops.patch_conv2d` call
    with the LayerNorm fused in (``norm="after"`` / ``"before"``): the activation is not
    written and read once more for the norm. Otherwise the two modules run as given."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__(first, second)
        ln_first = isinstance(first, LayerNorm2d)
        conv, ln = (second, first) if ln_first else (first, second)
        if not isinstance(conv, PatchConv2d) or not isinstance(ln, LayerNorm2d):
            raise TypeError("PatchConvLN: expected a PatchConv2d and a LayerNorm2d")
        want = conv.in_channels if ln_first else conv.out_channels
        if ln.normalized_shape != (want,):
            raise ValueError(f"PatchConvLN: LayerNorm2d over {ln.normalized_shape[0]} channels, expected {want}")
        self.ln_first = ln_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, ln = (self[1], self[0]) if self.ln_first else (self[0], self[1])
        if inference_only(self, x) and x.dtype in (torch.float32, torch.float64):
            w = conv.weight
            if w.dtype == x.dtype:  # k-major (kmajor_conv), cached until it changes
                w = cached_fold(self, x.dtype, lambda: kmajor_conv(conv.weight))
            y = patch_conv2d(x, w, conv.bias, conv.stride, conv.padding,
                             norm="before" if self.ln_first else "after",
                             norm_weight=ln.weight, norm_bias=ln.bias, norm_eps=ln.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return super().forward(x)
