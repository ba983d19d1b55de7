"""UniRepLKNet's block (Ding et al., "UniRepLKNet", CVPR 2024) with the official
implementation's parameter names, on fastvis ops.

``x + drop_path(gamma * BN2(fc2(GRN(GELU(fc1(SE(BN1(dwconv(x)))))))))`` where

* ``dwconv``: a :class:`fastvis.nn.DilatedReparamBlock` for kernel sizes >= 7, a plain
  depthwise convolution (:class:`fastvis.nn.DepthwiseConv2d`, no bias in the training
  form) for 3 and 5, nothing for 0;
* ``norm``: ``BatchNorm2d`` (BN1);
* ``se``: squeeze-and-excitation, ``x * sigmoid(up(relu(down(avgpool(x)))))`` with 1x1
  convolutions ``se.down`` (C -> C/4) and ``se.up`` (C/4 -> C), both with bias;
* ``pwconv1.1`` (``nn.Linear`` C -> 4C, the official ``Sequential(NCHWtoNHWC, Linear)``),
  exact GELU, ``act.1`` the GRN (:class:`UniRepLKNetGRN`), ``pwconv2.0`` (``nn.Linear``
  4C -> C without bias) and ``pwconv2.2`` (BN2);
* ``gamma`` (C,): layer scale.

Deploy form (``deploy=True`` or :meth:`UniRepLKNetBlock.reparameterize`): the dwconv is
one depthwise convolution with bias (BN1 fused in), ``norm`` is gone, the GRN has no
``beta``, and ``pwconv2.0`` is a Linear with bias that absorbs the GRN bias (projected
through the weight), BN2 and the layer scale; ``gamma`` is gone. These are the official
deploy keys, so official deploy-form checkpoints load into a re-parameterised model.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from ..ops.grn import global_response_norm
from .depthwise_conv import DepthwiseConv2d
from .dilated_reparam import DILATED_BRANCHES, DilatedReparamBlock
from .reparam import Reparameterizable, fuse_conv_bn
from .replk import apply_drop_path

__all__ = ["UniRepLKNetBlock", "UniRepLKNetGRN", "SEBlock", "NCHWtoNHWC", "NHWCtoNCHW"]


class NCHWtoNHWC(nn.Module):
    """(N, C, H, W) -> the (N, H, W, C) view (zero-copy for channels_last tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class NHWCtoNCHW(nn.Module):
    """(N, H, W, C) -> the (N, C, H, W) view (a channels_last tensor for contiguous input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class UniRepLKNetGRN(nn.Module):
    """Global Response Normalization on (N, H, W, C) tensors with UniRepLKNet's parameter
    layout: ``gamma`` and ``beta`` of shape (1, 1, 1, C) (``beta`` absent when
    ``use_bias=False``, the deploy form). Same function as
    :class:`fastvis.nn.GlobalResponseNorm` (``(gamma * Nx + 1) * x + beta`` with
    ``Nx = G / (mean_c G + 1e-6)``, G the per-image L2 norm of each channel), which stores
    ``weight`` / ``bias`` of shape (C,); this module keeps the official names and shapes and
    hands (C,) views to :func:`fastvis.ops.global_response_norm`."""

    def __init__(self, dim: int, use_bias: bool = True, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"UniRepLKNetGRN: dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.eps = eps
        self.use_bias = bool(use_bias)
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim, device=device, dtype=dtype))
        if self.use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UniRepLKNetGRN: expected an (N, H, W, {self.dim}) input, got {shape}")
        w = self.gamma.view(self.dim)
        b = self.beta.view(self.dim) if self.use_bias else w.new_zeros(self.dim)
        return global_response_norm(x.permute(0, 3, 1, 2), w, b, self.eps).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"{self.dim}, use_bias={self.use_bias}"


class SEBlock(nn.Module):
    """Squeeze-and-excitation with 1x1 convolutions ``down`` / ``up`` (official names);
    computed as two small matrix products on the pooled (N, C) vector."""

    def __init__(self, input_channels: int, internal_neurons: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_channels = input_channels
        self.down = nn.Conv2d(input_channels, internal_neurons, 1, bias=True, **factory)
        self.up = nn.Conv2d(internal_neurons, input_channels, 1, bias=True, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.relu(nn.functional.linear(s, self.down.weight.flatten(1), self.down.bias))
        s = torch.sigmoid(nn.functional.linear(s, self.up.weight.flatten(1), self.up.bias))
        return x * s.view(x.shape[0], -1, 1, 1)


class UniRepLKNetBlock(Reparameterizable, nn.Module):
    """UniRepLKNet's block (see the module docstring) on (N, C, H, W) inputs, kept
    channels_last inside (the (N, H, W, C) views of the MLP are then zero-copy).

    Args:
        dim: C.
        kernel_size: 0 (no depthwise convolution), 3 or 5 (a plain depthwise
            convolution), or a Dilated Reparam Block size (7, 9, 11, 13, 15, 17).
        drop_path: stochastic depth probability.
        layer_scale_init_value: initial ``gamma``; None or <= 0 for no layer scale.
        deploy: build the deploy form directly.
        ffn_factor: hidden width of the MLP, ``int(ffn_factor * dim)``.
    """

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-6, deploy: bool = False,
                 ffn_factor: float = 4, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 4:
            raise ValueError(f"UniRepLKNetBlock: dim must be an int >= 4 (the SE block has dim // 4 "
                             f"channels), got {dim!r}")
        allowed = [0, 3, 5] + [k for k in sorted(DILATED_BRANCHES) if k >= 7]
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral) or kernel_size not in allowed:
            raise ValueError(f"UniRepLKNetBlock: kernel_size must be one of {allowed}, got {kernel_size!r}")
        dim, kernel_size = int(dim), int(kernel_size)
        self.dim = dim
        self.kernel_size = kernel_size
        self.deploy = bool(deploy)
        self.drop_path = float(drop_path)
        if kernel_size == 0:
            self.dwconv = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=self.deploy, **factory)
        else:
            self.dwconv = DepthwiseConv2d(dim, kernel_size, padding="same", bias=self.deploy, **factory)
        self.norm = nn.Identity() if (self.deploy or kernel_size == 0) else nn.BatchNorm2d(dim, **factory)
        self.se = SEBlock(dim, dim // 4, **factory)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(NCHWtoNHWC(), nn.Linear(dim, ffn_dim, **factory))
        self.act = nn.Sequential(nn.GELU(), UniRepLKNetGRN(ffn_dim, use_bias=not self.deploy, **factory))
        if self.deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, **factory), NHWCtoNCHW())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False, **factory), NHWCtoNCHW(),
                                         nn.BatchNorm2d(dim, **factory))
        if not self.deploy and layer_scale_init_value is not None and layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value), **factory))
        else:
            self.gamma = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return apply_drop_path(x, y, self.drop_path, self.training)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switches to the deploy form in place (no-op if already there); exact in eval mode."""
        if self.deploy:
            return
        # 1. dwconv: merge the dilated branches, then fuse BN1 into the result.
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
            conv = self.dwconv.lk_origin
        else:
            conv = self.dwconv
        if isinstance(self.norm, nn.BatchNorm2d):
            w, b = fuse_conv_bn(conv.weight, conv.bias, self.norm)
            fused = DepthwiseConv2d(self.dim, self.kernel_size, padding="same", bias=True,
                                    device=conv.weight.device, dtype=conv.weight.dtype)
            fused.weight.copy_(w)
            fused.bias.copy_(b)
            if isinstance(self.dwconv, DilatedReparamBlock):
                self.dwconv.lk_origin = fused
            else:
                self.dwconv = fused
            self.norm = nn.Identity()
        # 2. GRN bias, BN2 and the layer scale into pwconv2's Linear.
        linear, bn2, grn = self.pwconv2[0], self.pwconv2[2], self.act[1]
        w = linear.weight.double()
        lin_bias = w @ grn.beta.double().view(-1)
        if linear.bias is not None:
            lin_bias = lin_bias + linear.bias.double()
        w, b = fuse_conv_bn(w, lin_bias, bn2)
        if self.gamma is not None:
            ls = self.gamma.double()
            w, b = w * ls.view(-1, 1), b * ls
        new_linear = nn.Linear(linear.in_features, linear.out_features, bias=True,
                               device=linear.weight.device, dtype=linear.weight.dtype)
        new_linear.weight.copy_(w)
        new_linear.bias.copy_(b)
        self.pwconv2 = nn.Sequential(new_linear, NHWCtoNCHW())
        del grn.beta
        grn.use_bias = False
        self.gamma = None
        self.deploy = True

    def extra_repr(self) -> str:
        return f"{self.dim}, kernel_size={self.kernel_size}, deploy={self.deploy}, drop_path={self.drop_path}"
