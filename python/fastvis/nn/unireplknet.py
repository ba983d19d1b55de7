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

from ..ops.batch_norm_se import batch_norm_se
from ..ops.convnext_block import dwconv_mlp_block
from ..ops.grn import global_response_norm
from ..ops.mlp import mlp
from .depthwise_conv import DepthwiseConv2d
from .dilated_reparam import DILATED_BRANCHES, DilatedReparamBlock
from .._reference import reference_enabled
from .reparam import (Reparameterizable, cached_fold, foldable_batch_norm, fuse_conv_bn, inference_only,
                      kmajor, kmajor_fc1, scaled_batch_norm)
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
        if self._fused_inference(x):
            return self._forward_fused(x)
        z = self._norm_se(self.dwconv(x))
        y = self._mlp(z)
        bn2 = self.pwconv2[2] if len(self.pwconv2) > 2 else None
        if bn2 is not None and self.gamma is not None and foldable_batch_norm(bn2) and not reference_enabled():
            # gamma * BN2(y) as one BatchNorm with gamma-scaled affine parameters: no separate
            # pass over the activation and no saved BN2 output for gamma's gradient (the
            # official composition runs under fastvis.use_reference())
            y = scaled_batch_norm(bn2, y, self.gamma)
        else:
            if bn2 is not None:
                y = bn2(y)
            if self.gamma is not None:
                y = y * self.gamma.view(1, -1, 1, 1)
        return apply_drop_path(x, y, self.drop_path, self.training)

    def _norm_se(self, u: torch.Tensor) -> torch.Tensor:
        """se(norm(u)). In training with a plain BatchNorm as one
        fastvis.ops.batch_norm_se call (statistics and SE pooling in one pass, the output in
        another, the BatchNorm output not saved; forward hooks on ``norm`` / ``se`` then do
        not run); otherwise the modules (eval mode, the reference mode, autocast, other
        dtypes, or a replaced norm / SE)."""
        bn = self.norm
        if (self.training and type(bn) is nn.BatchNorm2d and bn.affine and type(self.se) is SEBlock
                and u.dtype in (torch.float32, torch.float64) and u.dim() == 4 and not reference_enabled()
                and not torch.is_autocast_enabled(u.device.type)):
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            keep = bn.track_running_stats and bn.running_mean is not None
            se = self.se
            return batch_norm_se(u, bn.running_mean if keep else None, bn.running_var if keep else None,
                                 bn.weight, bn.bias, factor, bn.eps, se.down.weight.flatten(1), se.down.bias,
                                 se.up.weight.flatten(1), se.up.bias)
        return self.se(self.norm(u))

    def _mlp(self, z: torch.Tensor) -> torch.Tensor:
        """pwconv1 -> GELU -> GRN -> pwconv2's Linear on the (N, C, H, W) SE output, as one
        fastvis.ops.mlp call: autograd keeps fc1's input only (C values a pixel: the tiled
        path, chosen with GRN where the core's GEMM runs AVX-512 kernels) or fc1's input and
        output (5C: the torch-GEMM path), not GELU's and GRN's outputs too (13C in the
        module-by-module form). The submodules' parameters are used directly, so
        forward hooks on pwconv1 / act / pwconv2's Linear (and on BN2 when forward folds
        the layer scale into it) do not run."""
        lin1, gelu, grn, lin2 = self.pwconv1[1], self.act[0], self.act[1], self.pwconv2[0]
        u = mlp(z.permute(0, 2, 3, 1), lin1.weight, lin1.bias, lin2.weight, lin2.bias,
                grn_weight=grn.gamma.view(-1), grn_bias=grn.beta.view(-1) if grn.use_bias else None,
                grn_eps=grn.eps, approximate=gelu.approximate)
        return u.permute(0, 3, 1, 2)

    # ------------------------------------------------------------ fused inference
    #
    # In eval mode every BatchNorm is an affine map, so the whole block is one
    # fastvis.ops.dwconv_mlp_block call (the fused tile loop: dwconv, SE, fc1, GELU, GRN,
    # fc2, residual, with only y written): BN1 folds into the depthwise conv, BN2 and the
    # layer scale into fc2, exactly what reparameterize() does, computed here without
    # touching the module (cached until a parameter or buffer changes). Used when nothing
    # needs gradients; training and autograd run the module's own ops above.

    def _fused_inference(self, x: torch.Tensor) -> bool:
        return inference_only(self, x) and x.dim() == 4 and x.shape[1] == self.dim

    def _eval_params(self, dtype: torch.dtype):
        return cached_fold(self, dtype, lambda: self._fold(dtype))

    def _fold(self, dtype: torch.dtype):
        if self.kernel_size == 0:
            ref = self.pwconv1[1].weight
            w = torch.ones(self.dim, 1, 1, 1, dtype=torch.float64, device=ref.device)
            b = None
        elif isinstance(self.dwconv, DilatedReparamBlock):
            w, b = (t.double() for t in self.dwconv.get_equivalent_kernel_bias())
        else:
            w = self.dwconv.weight.double()
            b = None if self.dwconv.bias is None else self.dwconv.bias.double()
        if isinstance(self.norm, nn.BatchNorm2d):
            w, b = fuse_conv_bn(w, b, self.norm)
        lin, grn = self.pwconv2[0], self.act[1]
        w2 = lin.weight.double()
        b2 = None if lin.bias is None else lin.bias.double()
        if len(self.pwconv2) > 2:
            w2, b2 = fuse_conv_bn(w2, b2, self.pwconv2[2])
        if self.gamma is not None:
            g = self.gamma.double()
            w2 = w2 * g.view(-1, 1)
            b2 = None if b2 is None else b2 * g
        cast = (lambda t: None if t is None else t.detach().to(dtype).contiguous())
        return dict(
            dw_weight=cast(w), dw_bias=cast(b),
            fc1_weight=kmajor_fc1(cast(self.pwconv1[1].weight)), fc1_bias=cast(self.pwconv1[1].bias),
            fc2_weight=kmajor(cast(w2)), fc2_bias=cast(b2),
            se_down_weight=cast(self.se.down.weight.flatten(1)), se_down_bias=cast(self.se.down.bias),
            se_up_weight=cast(self.se.up.weight.flatten(1)), se_up_bias=cast(self.se.up.bias),
            grn_weight=cast(grn.gamma.view(-1)),
            grn_bias=cast(grn.beta.view(-1)) if grn.use_bias else None,
        )

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        p = self._eval_params(x.dtype)
        return dwconv_mlp_block(
            x, p["dw_weight"], p["dw_bias"], p["fc1_weight"], p["fc1_bias"], p["fc2_weight"],
            p["fc2_bias"], layer_norm=False, se_down_weight=p["se_down_weight"],
            se_down_bias=p["se_down_bias"], se_up_weight=p["se_up_weight"],
            se_up_bias=p["se_up_bias"], grn_weight=p["grn_weight"], grn_bias=p["grn_bias"],
            grn_eps=self.act[1].eps)

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
