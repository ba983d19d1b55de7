"""Fused multi-branch depthwise convolution + BatchNorm: ``fastvis.ops.dilated_reparam_conv``.

UniRepLKNet's dilated re-param block and RepLKNet's large kernel with its parallel small
kernel compute, before re-parameterisation,

    y = sum_b BN_b(conv_b(x)),

each branch b a depthwise convolution (kernel k_b x k_b, k_b odd, dilation d_b, "same"
padding d_b*(k_b-1)//2, no bias) followed by its own BatchNorm2d. Semantics are exactly
those of ``sum_b F.batch_norm(F.conv2d(x, w_b, None, 1, d_b*(k_b-1)//2, d_b, groups=C),
running_mean_b, running_var_b, bn_weight_b, bn_bias_b, training, momentum, eps)``,
including the in-place running-statistics updates in training mode (unbiased variance).

* Training: the ``fastvis::dilated_reparam_train`` custom op (fake kernel, registered
  autograd for x, every branch weight, every gamma and beta) over the core's fused kernels:
  a statistics pass over tiles and one depthwise convolution with the merged kernel
  ``sum_b gamma_b/sigma_b * expand(w_b)``; the backward pass keeps only x and the
  per-branch batch mean / variance (see ``csrc/ops/dilated_reparam/dilated_reparam.cpp``).
  bfloat16: forward in the core (float32 statistics), backward computed in float32.
* Eval: every branch folded exactly into one kernel and bias (dilated kernels expanded
  with zeros, BN folded with the running statistics), then one
  :func:`fastvis.ops.depthwise_conv2d` (differentiable through the merge).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import (autocast_cast, autocast_dtype, call_op, dense_for_core, dl, empty_like_layout, forward_op,
                      is_channels_last, like_layout, memoised_size, register_autograd, scratch_arg_sized)
from ._checks import check_activation, check_channel_params, check_eps, cpu_core_serves
from .depthwise_conv import depthwise_conv2d

_MAX_BRANCHES = 16
_MAX_EXTENT = 63


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scratch_bytes(kind: str, query, x, ws, dilations, gs, bs) -> int:
    """Memoised scratch query: the size depends on the thread count, x's shape, strides and
    dtype and the branches' kernel shapes and dilations only (the core packs every weight)."""
    key = (kind, _C.get_num_threads(), tuple(x.shape), x.stride(), x.dtype, tuple(dilations),
           tuple((tuple(w.shape), w.dtype) for w in ws), tuple(g.dtype for g in gs), tuple(b.dtype for b in bs))
    return memoised_size(key, lambda: query(dl(x), [dl(w) for w in ws], dilations, [dl(g) for g in gs],
                                            [dl(b) for b in bs]))


# ---------------------------------------------------------------- custom ops


@forward_op("fastvis::dilated_reparam_train")
def _train_fwd(
    x: torch.Tensor,
    weights: List[torch.Tensor],
    dilations: List[int],
    bn_weights: List[torch.Tensor],
    bn_biases: List[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, batch mean (B, C), batch biased variance (B, C)) in training mode."""
    _sync_threads()  # here, not in the traced wrapper: torch.compile sees only the op
    x = dense_for_core(x).detach()
    ws = [w.detach() for w in weights]
    gs = [g.detach() for g in bn_weights]
    bs = [b.detach() for b in bn_biases]
    y = empty_like_layout(x.shape, x)
    nb, c = len(ws), x.shape[1]
    mean = torch.empty(nb, c, dtype=_stats_dtype(x.dtype))
    var = torch.empty(nb, c, dtype=_stats_dtype(x.dtype))
    nbytes = lambda: _scratch_bytes("dilated_reparam_fwd", _C.dilated_reparam_forward_scratch_bytes, x, ws, dilations, gs, bs)
    _C.dilated_reparam_forward(dl(x), [dl(w) for w in ws], dilations, [dl(g) for g in gs], [dl(b) for b in bs],
                               eps, dl(y), dl(mean), dl(var), scratch_arg_sized(x.device, nbytes))
    return y, mean, var


@_train_fwd.register_fake
def _(x, weights, dilations, bn_weights, bn_biases, eps):
    nb, c = len(weights), x.shape[1]
    sd = _stats_dtype(x.dtype)
    return (empty_like_layout(x.shape, x), x.new_empty((nb, c), dtype=sd), x.new_empty((nb, c), dtype=sd))


@forward_op("fastvis::dilated_reparam_train_backward")
def _train_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weights: List[torch.Tensor],
    dilations: List[int],
    bn_weights: List[torch.Tensor],
    bn_biases: List[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    need_input: bool,
    need_weight: bool,
    need_bn: bool,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    _sync_threads()
    x = dense_for_core(x).detach()
    gy = like_layout(grad_y, x).detach()
    out_dtype = x.dtype
    ws = [w.detach() for w in weights]
    gs = [g.detach() for g in bn_weights]
    bs = [b.detach() for b in bn_biases]
    if out_dtype == torch.bfloat16:  # the core's backward runs in float32 for bfloat16
        x, gy = x.float(), gy.float()
        ws, gs, bs = [w.float() for w in ws], [g.float() for g in gs], [b.float() for b in bs]
    gx = empty_like_layout(x.shape, x) if need_input else None
    gws = [torch.empty(w.shape, dtype=w.dtype) for w in ws] if need_weight else None
    ggs = [torch.empty(g.shape, dtype=g.dtype) for g in gs] if need_bn else None
    gbs = [torch.empty(b.shape, dtype=b.dtype) for b in bs] if need_bn else None
    if need_input or need_weight or need_bn:
        nbytes = lambda: _scratch_bytes("dilated_reparam_bwd", _C.dilated_reparam_backward_scratch_bytes, x, ws, dilations, gs, bs)
        dls = lambda ts: None if ts is None else [dl(t) for t in ts]  # noqa: E731
        _C.dilated_reparam_backward(dl(gy), dl(x), dls(ws), dilations, dls(gs), dls(bs), dl(mean.detach()),
                                    dl(var.detach()), eps, None if gx is None else dl(gx), dls(gws), dls(ggs),
                                    dls(gbs), scratch_arg_sized(x.device, nbytes))

    def out(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        if t is None:
            return like.new_empty(0)
        return t if t.dtype == out_dtype else t.to(out_dtype)

    return (
        out(gx, grad_y),
        [out(None if gws is None else gws[i], w) for i, w in enumerate(weights)],
        [out(None if ggs is None else ggs[i], g) for i, g in enumerate(bn_weights)],
        [out(None if gbs is None else gbs[i], b) for i, b in enumerate(bn_biases)],
    )


@_train_bwd.register_fake
def _(grad_y, x, weights, dilations, bn_weights, bn_biases, mean, var, eps, need_input, need_weight, need_bn):
    gx = empty_like_layout(x.shape, x) if need_input else x.new_empty(0)
    gws = [w.new_empty(w.shape) if need_weight else w.new_empty(0) for w in weights]
    ggs = [g.new_empty(g.shape) if need_bn else g.new_empty(0) for g in bn_weights]
    gbs = [b.new_empty(b.shape) if need_bn else b.new_empty(0) for b in bn_biases]
    return gx, gws, ggs, gbs


def _setup_context(ctx, inputs, output):
    x, weights, dilations, bn_weights, bn_biases, eps = inputs
    _, mean, var = output
    nb = len(weights)
    ctx.save_for_backward(x, mean, var, *weights, *bn_weights, *bn_biases)
    ctx.nb = nb
    ctx.dilations = list(dilations)
    ctx.eps = eps
    ctx.needs = (
        x.requires_grad,
        any(w.requires_grad for w in weights),
        any(t.requires_grad for t in list(bn_weights) + list(bn_biases)),
    )
    ctx.mark_non_differentiable(mean, var)


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, mean, var, *rest = ctx.saved_tensors
    nb = ctx.nb
    weights, bn_weights, bn_biases = rest[:nb], rest[nb:2 * nb], rest[2 * nb:]
    need_x, need_w, need_bn = ctx.needs
    gx, gws, ggs, gbs = call_op(_train_bwd, grad_y, x, weights, ctx.dilations, bn_weights, bn_biases, mean, var,
                                   ctx.eps, need_x, need_w, need_bn)
    # List inputs take a list of gradients (None entries where not needed).
    return (
        gx if need_x else None,
        list(gws) if need_w else [None] * nb,
        None,
        list(ggs) if need_bn else [None] * nb,
        list(gbs) if need_bn else [None] * nb,
        None,
    )


register_autograd(_train_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- merge (eval mode)


def merge_branches(
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    bn_weights: Sequence[torch.Tensor],
    bn_biases: Sequence[torch.Tensor],
    means: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact re-parameterisation: (kernel (C, 1, E, E), bias (C,)) with
    ``conv(x, kernel, bias, padding=(E-1)//2) == sum_b BN_b(conv_b(x))`` for the given
    statistics (E = the first branch's extent). Differentiable; computed in float32
    (float64 for float64 weights) and returned in that precision."""
    c = weights[0].shape[0]
    e = dilations[0] * (weights[0].shape[-1] - 1) + 1
    dt = weights[0].dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    kernel = weights[0].new_zeros((c, 1, e, e), dtype=acc)
    bias = weights[0].new_zeros((c,), dtype=acc)
    for w, d, g, b, m, v in zip(weights, dilations, bn_weights, bn_biases, means, variances):
        k = w.shape[-1]
        s = g.to(acc) / torch.sqrt(v.to(acc) + eps)
        o = (e - 1) // 2 - d * (k - 1) // 2
        ext = d * (k - 1) + 1
        kernel = kernel.clone()
        kernel[:, :, o:o + ext:d, o:o + ext:d] += s.view(c, 1, 1, 1) * w.to(acc)
        bias = bias + b.to(acc) - s * m.to(acc)
    return kernel, bias


# ---------------------------------------------------------------- public API


def dilated_reparam_conv_reference(
    x, weights, dilations, bn_weights, bn_biases, running_means, running_vars, training,
    momentum=0.1, eps=1e-5,
) -> torch.Tensor:
    """Pure-PyTorch reference: the F.conv2d + F.batch_norm composition itself (updates
    the running statistics in training mode), in x's memory format."""
    c = x.shape[1]
    y = None
    for w, d, g, b, rm, rv in zip(weights, dilations, bn_weights, bn_biases, running_means, running_vars):
        k = w.shape[-1]
        z = F.conv2d(x, w, None, 1, d * (k - 1) // 2, d, groups=c)
        t = F.batch_norm(z, rm, rv, g, b, training, momentum, eps)
        y = t if y is None else y + t
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def _validate(x, weights, dilations, bn_weights, bn_biases, running_means, running_vars, training,
              momentum, eps) -> Tuple[list, list, list, list, list, list, float]:
    """The core's argument rules, checked in Python so every path (fast, reference,
    fallback device, eval) accepts and refuses the same inputs with the same exceptions."""
    name = "dilated_reparam_conv"
    check_activation(name, x)
    n, c, h, w_ = x.shape
    if h < 1 or w_ < 1:
        raise ValueError(f"x: spatial size must be positive, got shape {tuple(x.shape)}")
    seqs = {}
    for key, v in (("weights", weights), ("dilations", dilations), ("bn_weights", bn_weights),
                   ("bn_biases", bn_biases), ("running_means", running_means), ("running_vars", running_vars)):
        if v is None:
            raise ValueError(
                f"{name}: {key} is required (one entry per branch); running statistics are needed "
                "in both modes (training updates them, eval uses them)")
        if isinstance(v, torch.Tensor) or not isinstance(v, (list, tuple)):
            raise TypeError(f"{name}: {key} must be a list with one entry per branch, got {type(v).__name__}")
        seqs[key] = list(v)
    nb = len(seqs["weights"])
    if not 1 <= nb <= _MAX_BRANCHES:
        raise ValueError(f"{name}: expected 1 to {_MAX_BRANCHES} branches, got {nb}")
    for key, v in seqs.items():
        if len(v) != nb:
            raise ValueError(f"{name}: {key} has {len(v)} entries but weights has {nb} (one per branch)")
    ext0 = None
    for i, (w, d) in enumerate(zip(seqs["weights"], seqs["dilations"])):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}]: expected a torch.Tensor, got {type(w).__name__}")
        if w.device != x.device:
            raise ValueError(f"{name}: weights[{i}] is on {w.device} but x is on {x.device}; "
                             "all tensors must be on the same device")
        if w.dtype != x.dtype:
            raise TypeError(f"weights[{i}]: expected dtype {x.dtype} (the input's), got {w.dtype}")
        if w.dim() != 4 or w.shape[0] != c or w.shape[1] != 1:
            raise ValueError(f"weights[{i}]: a depthwise branch needs shape (C, 1, k, k) with C = {c}, "
                             f"got {tuple(w.shape)}")
        k = w.shape[2]
        if w.shape[3] != k or k % 2 == 0:
            raise ValueError(f"weights[{i}]: expected a square kernel of odd size (\"same\" padding), "
                             f"got {w.shape[2]}x{w.shape[3]}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"dilations[{i}]: expected an int >= 1, got {d!r}")
        ext = d * (k - 1) + 1
        if i == 0:
            ext0 = ext
            if ext > _MAX_EXTENT:
                raise ValueError(f"weights[0]: the merged kernel's extent dilation*(k-1)+1 = {ext} "
                                 f"exceeds {_MAX_EXTENT}")
        elif ext > ext0:
            raise ValueError(f"{name}: branch {i} has extent dilation*(k-1)+1 = {d}*({k}-1)+1 = {ext}, "
                             f"larger than the first branch's {ext0} (the first branch must be the largest)")
    check_channel_params(name, x, [(f"{key}[{i}]", t) for key in ("bn_weights", "bn_biases")
                                   for i, t in enumerate(seqs[key])], optional=False)
    for key in ("running_means", "running_vars"):
        for i, t in enumerate(seqs[key]):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{key}[{i}]: expected a torch.Tensor of shape ({c},), got {type(t).__name__}")
            if t.device != x.device:
                raise ValueError(f"{name}: {key}[{i}] is on {t.device} but x is on {x.device}; "
                                 "all tensors must be on the same device")
            if tuple(t.shape) != (c,):
                raise ValueError(f"{key}[{i}]: expected shape ({c},) (one value per channel), got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{key}[{i}]: expected a floating-point tensor, got {t.dtype}")
    eps = check_eps(eps)
    if training:
        if momentum is None:
            raise ValueError(
                f"{name}: momentum=None (cumulative moving average) is not supported; pass the "
                "factor explicitly, e.g. 1/num_batches_tracked as nn.BatchNorm2d does")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
        if n == 0:
            raise ValueError(f"{name}: empty batch (N = 0); BatchNorm in training mode needs values")
        if n * h * w_ <= 1:
            raise ValueError(
                f"{name}: expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)} (BatchNorm's batch statistics need N*H*W > 1)")
    return (seqs["weights"], [int(d) for d in seqs["dilations"]], seqs["bn_weights"], seqs["bn_biases"],
            seqs["running_means"], seqs["running_vars"], eps)


def dilated_reparam_conv(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    bn_weights: Sequence[torch.Tensor],
    bn_biases: Sequence[torch.Tensor],
    running_means: Sequence[torch.Tensor],
    running_vars: Sequence[torch.Tensor],
    training: bool,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``sum_b BN_b(depthwise_conv_b(x))`` (UniRepLKNet's dilated re-param block,
    RepLKNet's large + small kernel), one fused op.

    Args:
        x: (N, C, H, W), channels_last (fast, zero-copy) or contiguous NCHW; other strides
            are copied to contiguous first.
        weights: per branch a (C, 1, k_b, k_b) tensor, k_b odd; the first branch is the
            largest: every extent d_b*(k_b-1)+1 must be <= the first's (<= 63).
        dilations: per branch an int >= 1 ("same" padding d_b*(k_b-1)//2, stride 1).
        bn_weights, bn_biases: per branch (C,), x's dtype (BatchNorm's gamma and beta).
        running_means, running_vars: per branch (C,), required; updated in place in
            training mode (momentum; unbiased variance), used in eval mode.
        training: batch statistics (True) or running statistics (False).
        momentum: the running-statistics factor; None (cumulative average) is refused.
        eps: added to the variance.

    Returns:
        (N, C, H, W) in x's memory format. CPU: float32, float64, bfloat16 (float32
        statistics). CUDA tensors run the PyTorch reference (warned once). Under autocast
        x, the weights, gammas and betas are cast to the autocast dtype (as F.conv2d's
        inputs are); running statistics keep their dtype.
    """
    ac = autocast_dtype(x)
    if ac is not None and isinstance(weights, (list, tuple)) and isinstance(bn_weights, (list, tuple)) \
            and isinstance(bn_biases, (list, tuple)):
        # As F.conv2d under autocast: input and convolution weights in the autocast dtype;
        # the BatchNorm parameters follow (the op takes them in x's dtype). The casts are
        # differentiable, so gradients reach the float32 parameters.
        x, *rest = autocast_cast(ac, [x, *weights, *bn_weights, *bn_biases])
        nb = len(weights)
        weights, bn_weights, bn_biases = rest[:nb], rest[nb:nb + len(bn_weights)], rest[nb + len(bn_weights):]
    ws, ds, gs, bs, rms, rvs, eps = _validate(x, weights, dilations, bn_weights, bn_biases, running_means,
                                              running_vars, training, momentum, eps)
    if reference_enabled() or not cpu_core_serves("dilated_reparam_conv", x):
        return dilated_reparam_conv_reference(x, ws, ds, gs, bs, rms, rvs, training, momentum, eps)
    if not training:
        kernel, bias = merge_branches(ws, ds, gs, bs, rms, rvs, eps)
        pad = (kernel.shape[-1] - 1) // 2
        if x.dtype == torch.bfloat16:
            # The merged kernel and bias are not bfloat16-exact: convolve in float32 and
            # round the output once (rounding the kernel to bfloat16 would add an error of
            # 2^-9 of every tap).
            # (autocast off for that call, or it would cast back to bfloat16 first).
            with torch.autocast(x.device.type, enabled=False):
                return depthwise_conv2d(x.float(), kernel.float(), bias.float(), 1, pad).to(torch.bfloat16)
        return depthwise_conv2d(x, kernel, bias, 1, pad)
    y, mean, var = call_op(_train_fwd, x, ws, ds, gs, bs, eps)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    with torch.no_grad():
        unbiased = var * (m / (m - 1))
        stats = rms + rvs
        if all(t.dtype == mean.dtype and t.device == mean.device and t.is_contiguous() for t in stats):
            # Every branch's running statistics in four foreach calls (the same arithmetic
            # as the loop below, which took ~40 small ops a call).
            torch._foreach_mul_(stats, 1.0 - momentum)
            torch._foreach_add_(stats, list(mean.unbind(0)) + list(unbiased.unbind(0)), alpha=momentum)
        else:
            for i in range(len(ws)):
                rms[i].mul_(1.0 - momentum).add_(mean[i].to(rms[i].dtype), alpha=momentum)
                rvs[i].mul_(1.0 - momentum).add_(unbiased[i].to(rvs[i].dtype), alpha=momentum)
    return y
