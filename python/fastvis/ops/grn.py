"""Global Response Normalization: ``fastvis.ops.global_response_norm``.

Semantics of ConvNeXt-V2's GRN (timm's ``GlobalResponseNorm``) on a logical (N, C, H, W)
tensor::

    G  = ||x[n, c, :, :]||_2                 (per image and channel)
    Nx = G / (mean_c G + eps)
    y  = x + bias[c] + weight[c] * (x * Nx)

with ``weight`` and ``bias`` of shape (C,). With ``activation="gelu"`` (or ``"gelu_tanh"``)
the layer computes ``grn(gelu(x))`` in the same two passes, never storing ``gelu(x)``, and
its gradient with respect to ``x``: the GELU -> GRN pair of the ConvNeXt-V2 and
UniRepLKNet MLPs, fused.

Implemented as ``torch.library.custom_op``s (forward and backward) with fake kernels and
registered autograd, so ``torch.compile(fullgraph=True)`` sees no graph break. The
forward op also returns the per-(n, c) norms ``G`` as an (N, C) tensor (float32, float64
for float64 inputs), which autograd saves: the backward pass rebuilds ``Nx`` from them
instead of re-reading x for the norms.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import autocast_cast, autocast_dtype, call_op, dense_for_core, dl, forward_op, register_autograd, empty_like_layout, like_layout, scratch_arg_sized
from ._checks import check_activation, check_channel_params, check_eps, cpu_core_serves



def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# activation name -> the core's GrnActivation value.
_ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2}


def _empty_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:2], dtype=_stats_dtype(x.dtype), device=x.device)


# ---------------------------------------------------------------- custom ops


@forward_op("fastvis::global_response_norm")
def _grn_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, activation: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    _sync_threads()  # here, not in the traced wrapper: torch.compile sees only the op
    x = dense_for_core(x).detach()
    y = empty_like_layout(x.shape, x)
    norm = _empty_norm(x)
    nbytes = lambda: _C.global_response_norm_forward_scratch_bytes(x)
    _C.global_response_norm_forward(dl(x), dl(weight.detach()), dl(bias.detach()), eps, dl(y),
                                    dl(norm), scratch_arg_sized(x.device, nbytes), activation)
    return y, norm


@_grn_fwd.register_fake
def _(x, weight, bias, eps, activation=0):
    return empty_like_layout(x.shape, x), _empty_norm(x)


@forward_op("fastvis::global_response_norm_backward")
def _grn_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    activation: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _sync_threads()
    x = dense_for_core(x).detach()
    gy = like_layout(grad_y, x).detach()
    c = x.shape[1]
    gx = empty_like_layout(x.shape, x) if need_input else x.new_empty(0)
    gw = torch.empty(c, dtype=x.dtype, device=x.device) if need_weight else x.new_empty(0)
    gb = torch.empty(c, dtype=x.dtype, device=x.device) if need_bias else x.new_empty(0)
    if need_input or need_weight or need_bias:
        nbytes = lambda: _C.global_response_norm_backward_scratch_bytes(x)
        _C.global_response_norm_backward(
            dl(gy), dl(x), dl(weight.detach()), dl(norm.detach()), eps,
            dl(gx) if need_input else None, dl(gw) if need_weight else None,
            dl(gb) if need_bias else None, scratch_arg_sized(x.device, nbytes), activation,
        )
    return gx, gw, gb


@_grn_bwd.register_fake
def _(grad_y, x, weight, norm, eps, need_input, need_weight, need_bias, activation=0):
    c = x.shape[1]
    gx = empty_like_layout(x.shape, x) if need_input else x.new_empty(0)
    gw = x.new_empty(c) if need_weight else x.new_empty(0)
    gb = x.new_empty(c) if need_bias else x.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, _bias, eps, activation = inputs
    _, norm = output
    ctx.save_for_backward(x, weight, norm)
    ctx.eps = eps
    ctx.activation = activation
    ctx.mark_non_differentiable(norm)


def _backward(ctx, grad_y, _grad_norm):
    x, weight, norm = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = call_op(_grn_bwd, grad_y, x, weight, norm, ctx.eps, need_x, need_w, need_b,
                         ctx.activation)
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None)


register_autograd(_grn_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- public API


def global_response_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
    activation: "str | None" = None,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`global_response_norm` (timm's GlobalResponseNorm
    on an NCHW view, after ``F.gelu`` when ``activation`` names it), in x's memory format."""
    if activation is not None:
        x = torch.nn.functional.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")
    g = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True)
    nx = g / (g.mean(dim=1, keepdim=True) + eps)
    y = x + bias.view(1, -1, 1, 1) + weight.view(1, -1, 1, 1) * (x * nx)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def _validate(x, weight, bias) -> None:
    """The core's argument rules, checked in Python so every path (fast, reference,
    fallback device) accepts and refuses the same inputs with the same exceptions."""
    check_activation("global_response_norm", x)
    check_channel_params("global_response_norm", x, (("weight", weight), ("bias", bias)), optional=False)


def _core_serves(x: torch.Tensor) -> bool:
    return cpu_core_serves("global_response_norm", x)


def _activation_code(activation) -> int:
    code = _ACTIVATIONS.get(activation) if isinstance(activation, (str, type(None))) else None
    if code is None:
        raise ValueError(f"activation: expected None, 'gelu' or 'gelu_tanh', got {activation!r}")
    return code


def global_response_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
    activation: "str | None" = None,
) -> torch.Tensor:
    """Global Response Normalization of an (N, C, H, W) tensor (ConvNeXt-V2, timm's
    GlobalResponseNorm): ``x + bias + weight * x * Nx`` with ``Nx = G / (mean_c G + eps)``
    and ``G`` the L2 norm of each image's channel.

    Args:
        x: (N, C, H, W), channels_last (fast, zero-copy) or contiguous NCHW; other strides
            are copied to contiguous first. For an (N, H, W, C) tensor pass
            ``x.permute(0, 3, 1, 2)`` (a zero-copy channels_last view) and permute the
            result back, as :class:`fastvis.nn.GlobalResponseNorm` does.
        weight, bias: (C,), x's dtype (required).
        eps: added to the mean of the norms; a positive finite number.
        activation: None, or ``"gelu"`` / ``"gelu_tanh"`` (exact / tanh-approximated
            GELU) applied to x first: ``grn(gelu(x))`` with the gradient taken with
            respect to x. Fused: gelu(x) is recomputed in each pass, never stored, and
            autograd saves only x and the norms.

    Returns:
        (N, C, H, W) in x's memory format. CPU: float32, float64, bfloat16 (float32
        accumulation). CUDA tensors run the PyTorch reference (warned once).
    """
    if autocast_dtype(x) is not None and isinstance(x, torch.Tensor):
        # Under autocast GRN runs in the input's precision (its parameters follow it).
        weight, bias = autocast_cast(x.dtype, [weight, bias])
    act = _activation_code(activation)
    _validate(x, weight, bias)
    e = check_eps(eps)
    if reference_enabled() or not _core_serves(x):
        return global_response_norm_reference(x, weight, bias, e, activation)
    y, _ = call_op(_grn_fwd, x, weight, bias, e, act)
    return y
