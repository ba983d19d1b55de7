"""LayerNorm over channels: ``fastvis.ops.layer_norm_channels``.

Semantics of timm's ``LayerNorm2d`` (ConvNeXt): each pixel's C values of a logical
(N, C, H, W) tensor are normalised (biased variance, ``eps`` inside the square root) and
scaled by the optional affine ``weight`` / ``bias`` of shape (C,), i.e.
``F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias, eps).permute(0, 3, 1, 2)``.

Implemented as ``torch.library.custom_op``s (forward and backward) with fake kernels and
registered autograd, so ``torch.compile(fullgraph=True)`` sees no graph break. The
forward op also returns the per-pixel ``mean`` and ``rstd`` (float32, float64 for
float64 inputs), which autograd saves so the backward pass does not recompute them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._checks import check_activation, check_channel_params, check_eps, cpu_core_serves
from ._bridge import (autocast_cast, autocast_dtype, call_op, dense_for_core, forward_op, register_autograd, dl, empty_like_layout,
                      like_layout, scratch_arg_sized)



def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_stats(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty((n, h, w), dtype=_stats_dtype(x.dtype), device=x.device)


# ---------------------------------------------------------------- custom ops


@forward_op("fastvis::layer_norm_channels")
def _ln_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _sync_threads()  # here, not in the traced wrapper: torch.compile sees only the op
    x = dense_for_core(x).detach()
    wd = None if weight is None else weight.detach()
    bd = None if bias is None else bias.detach()
    y = empty_like_layout(x.shape, x)
    mean, rstd = _empty_stats(x), _empty_stats(x)
    nbytes = lambda: _C.layer_norm_channels_forward_scratch_bytes(x)
    _C.layer_norm_channels_forward(dl(x), dl(wd), dl(bd), eps, dl(y), dl(mean), dl(rstd),
                                   scratch_arg_sized(x.device, nbytes))
    return y, mean, rstd


@_ln_fwd.register_fake
def _(x, weight, bias, eps):
    return empty_like_layout(x.shape, x), _empty_stats(x), _empty_stats(x)


@forward_op("fastvis::layer_norm_channels_backward")
def _ln_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _sync_threads()
    x = dense_for_core(x).detach()
    gy = like_layout(grad_y, x).detach()
    wd = None if weight is None else weight.detach()
    c = x.shape[1]
    gx = empty_like_layout(x.shape, x) if need_input else x.new_empty(0)
    gw = torch.empty(c, dtype=x.dtype, device=x.device) if need_weight else x.new_empty(0)
    gb = torch.empty(c, dtype=x.dtype, device=x.device) if need_bias else x.new_empty(0)
    if need_input or need_weight or need_bias:
        nbytes = lambda: _C.layer_norm_channels_backward_scratch_bytes(x)
        _C.layer_norm_channels_backward(
            dl(gy), dl(x), dl(wd), dl(mean.detach()), dl(rstd.detach()),
            dl(gx) if need_input else None, dl(gw) if need_weight else None,
            dl(gb) if need_bias else None, scratch_arg_sized(x.device, nbytes),
        )
    return gx, gw, gb


@_ln_bwd.register_fake
def _(grad_y, x, weight, mean, rstd, need_input, need_weight, need_bias):
    c = x.shape[1]
    gx = empty_like_layout(x.shape, x) if need_input else x.new_empty(0)
    gw = x.new_empty(c) if need_weight else x.new_empty(0)
    gb = x.new_empty(c) if need_bias else x.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.has_weight and ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    gx, gw, gb = call_op(_ln_bwd, grad_y, x, weight, mean, rstd, need_x, need_w, need_b)
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None)


register_autograd(_ln_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- public API


def layer_norm_channels_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`layer_norm_channels` (timm's LayerNorm2d:
    permute to NHWC, ``F.layer_norm`` over C, permute back), in x's memory format."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def _validate(x, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    """The core's argument rules, checked in Python so every path (fast, reference,
    fallback device) accepts and refuses the same inputs with the same exceptions."""
    check_activation("layer_norm_channels", x)
    check_channel_params("layer_norm_channels", x, (("weight", weight), ("bias", bias)), optional=True)


def _core_serves(x: torch.Tensor) -> bool:
    return cpu_core_serves("layer_norm_channels", x)


def layer_norm_channels(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LayerNorm over the channel dimension of an (N, C, H, W) tensor (timm's LayerNorm2d).

    Args:
        x: (N, C, H, W), channels_last (fast, zero-copy) or contiguous NCHW; other strides
            are copied to contiguous first.
        weight, bias: optional (C,), x's dtype.
        eps: added to the (biased) variance; a positive finite number.

    Returns:
        (N, C, H, W) in x's memory format. CPU: float32, float64, bfloat16 (float32
        accumulation). CUDA tensors run the PyTorch reference (warned once).
    """
    if autocast_dtype(x) is not None and isinstance(x, torch.Tensor):
        # Under autocast the norm runs in the input's precision (the affine follows it).
        weight, bias = autocast_cast(x.dtype, [weight, bias])
    _validate(x, weight, bias)
    e = check_eps(eps)
    if reference_enabled() or not _core_serves(x):
        return layer_norm_channels_reference(x, weight, bias, e)
    y, _, _ = call_op(_ln_fwd, x, weight, bias, e)
    return y
