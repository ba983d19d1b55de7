"""RepLKNet's modules (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022) with the
official implementation's parameter names:

* :class:`ConvBN`: a convolution without bias, a ``BatchNorm2d`` and optionally a ReLU
  (``conv``, ``bn``; the official ``conv_bn`` / ``conv_bn_relu``). Depthwise convolutions
  run on :class:`fastvis.nn.DepthwiseConv2d`, the others on ``nn.Conv2d``.
* :class:`ReparamLargeKernelConv`: a large depthwise kernel with BN (``lkb_origin``) plus a
  parallel small kernel with BN (``small_conv``, optional), summed; deploy form: one
  depthwise convolution with bias (``lkb_reparam``).
* :class:`RepLKBlock`: ``x + drop_path(pw2(ReLU(large_kernel(pw1(prelkb_bn(x))))))``,
  ``pw1`` a 1x1 ConvBN + ReLU to the depthwise width, ``pw2`` a 1x1 ConvBN back.
* :class:`ConvFFN`: ``x + drop_path(pw2(GELU(pw1(preffn_bn(x)))))`` with 1x1 ConvBNs.

Only the large-kernel module is re-parameterised (as the official ``structural_reparam``
does: its deploy checkpoints keep every other ConvBN), so deploy-form official state dicts
load into a re-parameterised model.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import nn

from .convnext import drop_path_scale
from .depthwise_conv import DepthwiseConv2d
from ..ops.convnext_block import dwconv_mlp_block
from .reparam import (Reparameterizable, bn_scale_shift, branches_forward, cached_fold, fuse_conv_bn,
                      inference_only, kmajor, kmajor_fc1, pad_kernel_to)

__all__ = ["ConvBN", "ReparamLargeKernelConv", "RepLKBlock", "ConvFFN", "apply_drop_path"]


def apply_drop_path(x: torch.Tensor, out: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """``x + drop_path(out)`` with timm's per-sample stochastic depth (through
    :func:`fastvis.nn.drop_path_scale`, so the trainer's deterministic draws apply)."""
    scale = drop_path_scale(out, drop_prob, training)
    if scale is None:
        return x + out
    return x + out * scale.view(-1, 1, 1, 1)


def _odd_kernel(name: str, k, upper: int = 63) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 or k % 2 == 0 or k > upper:
        raise ValueError(f"{name} must be an odd int in 1..{upper}, got {k!r}")
    return int(k)


class ConvBN(nn.Module):
    """``conv`` (no bias) -> ``bn`` -> ReLU if ``relu``. ``groups == in == out`` (and a
    kernel > 1) uses :class:`fastvis.nn.DepthwiseConv2d`, else ``nn.Conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: Optional[int] = None, groups: int = 1, relu: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        padding = kernel_size // 2 if padding is None else padding
        if groups == in_channels == out_channels and kernel_size > 1:
            self.conv = DepthwiseConv2d(in_channels, kernel_size, stride=stride, padding=padding,
                                        bias=False, **factory)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  groups=groups, bias=False, **factory)
        self.bn = nn.BatchNorm2d(out_channels, **factory)
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class ReparamLargeKernelConv(Reparameterizable, nn.Module):
    """RepLKNet's large depthwise kernel with a parallel small kernel (stride 1, "same").

    Args:
        channels: C (depthwise).
        kernel_size: the large kernel, odd, 1..63.
        small_kernel: the parallel kernel (odd, <= kernel_size), or None for no branch
            (RepLKNet-XL).
        deploy: build the deploy form (``lkb_reparam``, with bias) directly.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: Optional[int] = 5,
                 deploy: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
            raise ValueError(f"ReparamLargeKernelConv: channels must be a positive int, got {channels!r}")
        self.channels = int(channels)
        self.kernel_size = _odd_kernel("ReparamLargeKernelConv: kernel_size", kernel_size)
        if small_kernel is not None:
            small_kernel = _odd_kernel("ReparamLargeKernelConv: small_kernel", small_kernel)
            if small_kernel > self.kernel_size:
                raise ValueError(f"ReparamLargeKernelConv: small_kernel ({small_kernel}) cannot be larger "
                                 f"than kernel_size ({self.kernel_size})")
        self.small_kernel = small_kernel
        self.deploy = bool(deploy)
        if self.deploy:
            self.lkb_reparam = DepthwiseConv2d(self.channels, self.kernel_size, padding="same", bias=True, **factory)
        else:
            self.lkb_origin = ConvBN(self.channels, self.channels, self.kernel_size, groups=self.channels, **factory)
            if small_kernel is not None:
                self.small_conv = ConvBN(self.channels, self.channels, small_kernel, groups=self.channels, **factory)

    def branch_modules(self):
        """[(conv, bn), ...]: the large kernel's pair, then the small kernel's (if any)."""
        pairs = [(self.lkb_origin.conv, self.lkb_origin.bn)]
        if self.small_kernel is not None:
            pairs.append((self.small_conv.conv, self.small_conv.bn))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lkb_reparam(x)
        return self.forward_branches(x)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The training form: every branch is conv then BN, and the branches are summed
        (the one place to swap in a fused multi-branch op)."""
        return branches_forward(x, self.branch_modules())

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight (C, 1, K, K), bias (C,)) of the deploy form, in the parameters' dtype."""
        if self.deploy:
            return self.lkb_reparam.weight.detach().clone(), self.lkb_reparam.bias.detach().clone()
        weight, bias = fuse_conv_bn(self.lkb_origin.conv.weight, None, self.lkb_origin.bn)
        if self.small_kernel is not None:
            w, b = fuse_conv_bn(self.small_conv.conv.weight, None, self.small_conv.bn)
            weight = weight + pad_kernel_to(w, self.kernel_size)
            bias = bias + b
        dt = self.lkb_origin.conv.weight.dtype
        return weight.to(dt), bias.to(dt)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switches to the deploy form in place (no-op if already there); exact in eval mode."""
        if self.deploy:
            return
        weight, bias = self.get_equivalent_kernel_bias()
        old = self.lkb_origin.conv.weight
        merged = DepthwiseConv2d(self.channels, self.kernel_size, padding="same", bias=True,
                                 device=old.device, dtype=old.dtype)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        merged.requires_grad_(old.requires_grad)
        self.lkb_reparam = merged
        del self.lkb_origin
        if self.small_kernel is not None:
            del self.small_conv
        self.deploy = True

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
                f"deploy={self.deploy}")


class RepLKBlock(nn.Module):
    """RepLKNet's large-kernel block (names: ``prelkb_bn``, ``pw1``, ``large_kernel``,
    ``pw2``)."""

    def __init__(self, in_channels: int, dw_channels: int, block_lk_size: int, small_kernel: Optional[int],
                 drop_path: float = 0.0, deploy: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.pw1 = ConvBN(in_channels, dw_channels, 1, padding=0, relu=True, **factory)
        self.pw2 = ConvBN(dw_channels, in_channels, 1, padding=0, **factory)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, block_lk_size, small_kernel, deploy=deploy, **factory)
        self.prelkb_bn = nn.BatchNorm2d(in_channels, **factory)
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw1(self.prelkb_bn(x))
        out = torch.relu(self.large_kernel(out))
        out = self.pw2(out)
        return apply_drop_path(x, out, self.drop_path, self.training)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class ConvFFN(nn.Module):
    """RepLKNet's feed-forward block (names: ``preffn_bn``, ``pw1``, ``pw2``)."""

    def __init__(self, in_channels: int, internal_channels: int, out_channels: int, drop_path: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.preffn_bn = nn.BatchNorm2d(in_channels, **factory)
        self.pw1 = ConvBN(in_channels, internal_channels, 1, padding=0, **factory)
        self.pw2 = ConvBN(internal_channels, out_channels, 1, padding=0, **factory)
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_only(self, x) and x.dim() == 4 and self.pw2.bn.num_features == x.shape[1]:
            # Eval inference: preffn_bn and pw1's BN fold into fc1, pw2's BN into fc2, and
            # the block is one fused call (identity 1x1 "depthwise" mixer, no norm).
            p = cached_fold(self, x.dtype, lambda: self._fold(x.dtype))
            return dwconv_mlp_block(x, p[0], None, p[1], p[2], p[3], p[4], layer_norm=False)
        out = self.pw2(nn.functional.gelu(self.pw1(self.preffn_bn(x))))
        return apply_drop_path(x, out, self.drop_path, self.training)

    def _fold(self, dtype: torch.dtype):
        s0, t0 = bn_scale_shift(self.preffn_bn)
        s1, t1 = bn_scale_shift(self.pw1.bn)
        s2, t2 = bn_scale_shift(self.pw2.bn)
        w1 = self.pw1.conv.weight.double().flatten(1)
        w2 = self.pw2.conv.weight.double().flatten(1)
        fc1_w = s1[:, None] * w1 * s0[None, :]
        fc1_b = s1 * (w1 @ t0) + t1
        fc2_w = s2[:, None] * w2
        ones = torch.ones(w1.shape[1], 1, 1, 1, dtype=torch.float64, device=w1.device)
        ones, fc1_w, fc1_b, fc2_w, t2 = (t.to(dtype).contiguous() for t in (ones, fc1_w, fc1_b, fc2_w, t2))
        return ones, kmajor_fc1(fc1_w), fc1_b, kmajor(fc2_w), t2

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"
