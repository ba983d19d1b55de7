"""The fused ConvNeXt block: ``fastvis.ops.convnext_block``.

    y = x + drop_scale[n] * gamma * fc2(GRN?(GELU(fc1(LayerNorm_C(dwconv_kxk(x))))))

on logical (N, C, H, W) activations (channels_last is the native layout; contiguous NCHW
is accepted). ``dwconv`` is a depthwise k x k convolution with stride 1 and "same"
padding (k odd), LayerNorm runs over channels with a biased variance, fc1 / fc2 are
``nn.Linear`` layers C -> hidden -> C, GELU is exact (erf) or the tanh approximation,
``gamma`` is the optional layer scale and ``drop_scale`` the optional per-sample
stochastic-depth factor (0 or 1/keep_prob in training). With ``grn_weight`` and
``grn_bias`` the ConvNeXt-V2 Global Response Normalization runs on the hidden
activations after GELU.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled, warn_fallback_once
from .._runtime import _sync_threads
from ._checks import check_activation, check_eps, check_param_tensors
from ._bridge import (autocast_cast, autocast_dtype, call_op, dl, forward_op, memoised_size, register_autograd,
                      prepared_direct, run_prepared_chain, scratch_arg_sized, stream_of)

_GELU = ("none", "tanh")


def grn_channels_last_reference(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                eps: float = 1e-6) -> torch.Tensor:
    """ConvNeXt-V2 GRN on an (N, H, W, C) tensor: x + bias + weight * x * Nx, with Nx the
    per-channel spatial L2 norm divided by its mean over channels (plus eps)."""
    gx = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return h + bias + weight * (h * nx)


def convnext_block_reference(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    drop_scale: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    grn_weight: Optional[torch.Tensor] = None,
    grn_bias: Optional[torch.Tensor] = None,
    grn_eps: float = 1e-6,
    approximate: str = "none",
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`convnext_block`, layer by layer as timm's
    ``ConvNeXtBlock`` computes it; the output keeps x's memory format."""
    c, k = x.shape[1], dw_weight.shape[-1]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        # No pixels: y = x, and every parameter gets a zero gradient (as the fused op gives).
        zero = sum((t.sum() * 0 for t in (dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight,
                                            fc1_bias, fc2_weight, fc2_bias, gamma, grn_weight,
                                            grn_bias) if t is not None), x.new_zeros(()))
        return (x + zero.to(x.dtype)).contiguous(memory_format=fmt)
    t = F.conv2d(x, dw_weight, dw_bias, padding=k // 2, groups=c)
    t = F.layer_norm(t.permute(0, 2, 3, 1), (c,), norm_weight, norm_bias, eps)
    h = F.gelu(F.linear(t, fc1_weight, fc1_bias), approximate=approximate)
    if grn_weight is not None:
        h = grn_channels_last_reference(h, grn_weight, grn_bias, grn_eps)
    o = F.linear(h, fc2_weight, fc2_bias)
    if gamma is not None:
        o = o * gamma
    if drop_scale is not None:
        o = o * drop_scale.reshape(-1, 1, 1, 1).to(o.dtype)
    y = x + o.permute(0, 3, 1, 2)
    return y.contiguous(memory_format=fmt)


# ---------------------------------------------------------------- custom ops

_GRAD_NAMES = ("x", "dw_weight", "dw_bias", "norm_weight", "norm_bias", "fc1_weight",
               "fc1_bias", "fc2_weight", "fc2_bias", "gamma")


def _scratch_bytes(kind, query, x, ws, eps, tanh_gelu, grn_eps) -> int:
    """Memoised core scratch query: the size depends on the shapes, dtypes and strides of x
    and the parameters present, and on the core's thread count, nothing else."""
    key = (kind, _C.get_num_threads(), x.device.type, tuple(x.shape), x.stride(), x.dtype,
           tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in ws))
    return memoised_size(key, lambda: query(x, ws, eps, tanh_gelu, grn_eps))


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@forward_op("fastvis::convnext_block")
def _cb_fwd(
    x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
    drop_scale: Optional[torch.Tensor], grn_weight: Optional[torch.Tensor],
    grn_bias: Optional[torch.Tensor], eps: float, tanh_gelu: bool, grn_eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, stats): the block output and, for GRN blocks on the CPU, GRN's per-image-row sums
    of the squared hidden activations (N, H, hidden) in the accumulation type, which the
    backward reads instead of recomputing them (an empty tensor otherwise)."""
    _sync_threads()
    x = _nhwc(x.detach())
    ws = [None if t is None else t.detach() for t in
          (dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
           gamma, drop_scale, grn_weight, grn_bias)]
    y = torch.empty_like(x, memory_format=torch.channels_last)
    stats = _grn_stats_like(x, fc1_weight, grn_weight)
    nbytes = lambda: _scratch_bytes("convnext_block_fwd", _C.convnext_block_forward_scratch_bytes, x, ws,
                                    eps, tanh_gelu, grn_eps)
    _C.convnext_block_forward(dl(x), [dl(t) for t in ws], eps, tanh_gelu, dl(y),
                              scratch_arg_sized(x.device, nbytes), grn_eps, stream_of(x), True,
                              dl(stats) if stats.numel() else None)
    return y, stats


def _grn_stats_like(x: torch.Tensor, fc1_weight: torch.Tensor, grn_weight) -> torch.Tensor:
    """The forward's GRN row sums (N, H, hidden) for a CPU GRN block, else an empty tensor."""
    if grn_weight is None or x.device.type != "cpu":
        return x.new_empty(0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty(x.shape[0], x.shape[2], fc1_weight.shape[0], dtype=acc, device=x.device)


@_cb_fwd.register_fake
def _(x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
      gamma, drop_scale, grn_weight, grn_bias, eps, tanh_gelu, grn_eps):
    if grn_weight is None or x.device.type != "cpu":
        stats = x.new_empty(0)
    else:
        stats = x.new_empty((x.shape[0], x.shape[2], fc1_weight.shape[0]),
                            dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.empty_like(x, memory_format=torch.channels_last), stats


@forward_op("fastvis::convnext_block_backward")
def _cb_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor], fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
    drop_scale: Optional[torch.Tensor], grn_weight: Optional[torch.Tensor],
    grn_bias: Optional[torch.Tensor], eps: float, tanh_gelu: bool, grn_eps: float,
    needs: List[bool],
) -> List[torch.Tensor]:
    _sync_threads()
    x = _nhwc(x.detach())
    gy = _nhwc(grad_y.detach())
    params = (dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
              fc2_bias, gamma, grn_weight, grn_bias)
    ws = [None if t is None else t.detach() for t in params[:9] + (drop_scale,) + params[9:]]
    outs = [torch.empty_like(x, memory_format=torch.channels_last) if needs[0] else x.new_empty(0)]
    outs += [torch.empty(p.shape, dtype=x.dtype, device=x.device) if (p is not None and need)
             else x.new_empty(0) for p, need in zip(params, needs[1:])]
    grads = [o if need else None for o, need in zip(outs, [needs[0]] + [
        n and p is not None for p, n in zip(params, needs[1:])])]
    nbytes = lambda: _scratch_bytes("convnext_block_bwd", _C.convnext_block_backward_scratch_bytes, x, ws,
                                    eps, tanh_gelu, grn_eps)
    _C.convnext_block_backward(dl(gy), dl(x), [dl(t) for t in ws], eps, tanh_gelu,
                               [dl(t) for t in grads], scratch_arg_sized(x.device, nbytes), grn_eps,
                               stream_of(x), dl(stats.detach()) if stats.numel() else None)
    return outs


@_cb_bwd.register_fake
def _(grad_y, x, stats, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
      fc2_bias, gamma, drop_scale, grn_weight, grn_bias, eps, tanh_gelu, grn_eps, needs):
    params = (dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
              fc2_bias, gamma, grn_weight, grn_bias)
    outs = [torch.empty_like(x, memory_format=torch.channels_last) if needs[0] else x.new_empty(0)]
    outs += [x.new_empty(p.shape) if (p is not None and need) else x.new_empty(0)
             for p, need in zip(params, needs[1:])]
    return outs


def _setup_context(ctx, inputs, output):
    (x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
     gamma, drop_scale, grn_weight, grn_bias, eps, tanh_gelu, grn_eps) = inputs
    _, stats = output
    ctx.save_for_backward(x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias,
                          fc2_weight, fc2_bias, gamma, drop_scale, grn_weight, grn_bias, stats)
    ctx.eps = eps
    ctx.tanh_gelu = tanh_gelu
    ctx.grn_eps = grn_eps
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


# Input positions of the differentiable tensors (x and the parameters; not drop_scale).
_DIFF_POS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)


def _backward(ctx, grad_y, _grad_stats):
    if grad_y is None:  # y does not reach the loss
        return (None,) * 16
    saved = ctx.saved_tensors
    x, drop_scale, stats = saved[0], saved[10], saved[13]
    params = saved[1:10] + saved[11:13]
    needs = [bool(ctx.needs_input_grad[0])] + [
        bool(ctx.needs_input_grad[pos]) and params[i] is not None
        for i, pos in enumerate(_DIFF_POS[1:])]
    if not any(needs):
        return (None,) * 16
    outs = call_op(_cb_bwd, grad_y, x, stats, *params[:9], drop_scale, *params[9:], ctx.eps,
                   ctx.tanh_gelu, ctx.grn_eps, needs)
    grads = [o if need else None for o, need in zip(outs, needs)]
    if grads[0] is not None and not x.is_contiguous(memory_format=torch.channels_last):
        grads[0] = grads[0].contiguous()
    res = [None] * 16
    for g, pos in zip(grads, _DIFF_POS):
        res[pos] = g
    return tuple(res)


register_autograd(_cb_fwd, _backward, _setup_context)


def _core_serves(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return True
    # CUDA: the fused kernels (float16 / bfloat16 only; compiled, not yet run on a GPU).
    if x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16) and _C.build_info()["cuda"]:
        return True
    if x.device.type != "meta":
        warn_fallback_once(
            f"convnext_block-{x.device.type}",
            f"fastvis.ops.convnext_block: no fused fastvis kernel for device '{x.device.type}' "
            "yet; running the PyTorch reference",
        )
    return False


def _validate(x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
              fc2_bias, gamma, drop_scale, grn_weight, grn_bias, approximate) -> None:
    """Argument rules of the op, checked in Python so the fused path, the reference and the
    fallback devices accept and refuse the same inputs with the same exceptions."""
    c = check_activation("convnext_block", x, dims_msg="x:")
    n, _, h, w = x.shape
    if approximate not in _GELU:
        raise ValueError(f"approximate: expected 'none' (exact erf GELU) or 'tanh', got {approximate!r}")

    def tensor(name, t, shape, required=False, dtype=x.dtype):
        if t is None:
            if required:
                raise TypeError(f"{name}: a tensor is required, got None")
            return
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor{'' if required else ' or None'}, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(
                f"convnext_block: {name} is on {t.device} but x is on {x.device}; "
                "all tensors must be on the same device"
            )
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the input's), got {t.dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")

    tensor("dw_weight", dw_weight, None, required=True)
    if dw_weight.dim() != 4 or dw_weight.shape[0] != c or dw_weight.shape[1] != 1:
        raise ValueError(f"dw_weight: expected shape ({c}, 1, k, k), got {tuple(dw_weight.shape)}")
    kh, kw = dw_weight.shape[2], dw_weight.shape[3]
    if kh != kw or kh % 2 == 0 or kh > 31:
        raise ValueError(f"dw_weight: expected a square odd kernel of size 1..31, got {kh}x{kw}")
    tensor("fc1_weight", fc1_weight, None, required=True)
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != c or fc1_weight.shape[0] < 1:
        raise ValueError(f"fc1_weight: expected shape (hidden, {c}), got {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    tensor("fc2_weight", fc2_weight, (c, hidden), required=True)
    tensor("dw_bias", dw_bias, (c,))
    tensor("norm_weight", norm_weight, (c,))
    tensor("norm_bias", norm_bias, (c,))
    tensor("fc1_bias", fc1_bias, (hidden,))
    tensor("fc2_bias", fc2_bias, (c,))
    tensor("gamma", gamma, (c,))
    tensor("grn_weight", grn_weight, (hidden,))
    tensor("grn_bias", grn_bias, (hidden,))
    if (grn_weight is None) != (grn_bias is None):
        raise ValueError("grn_weight and grn_bias: give both (ConvNeXt-V2 GRN) or neither")
    if drop_scale is not None:
        if not isinstance(drop_scale, torch.Tensor):
            raise TypeError(f"drop_scale: expected a torch.Tensor or None, got {type(drop_scale).__name__}")
        if drop_scale.device != x.device:
            raise ValueError(f"convnext_block: drop_scale is on {drop_scale.device} but x is on {x.device}")
        if not drop_scale.is_floating_point():
            raise TypeError(f"drop_scale: expected a floating-point tensor, got {drop_scale.dtype}")
        if drop_scale.numel() != n or drop_scale.dim() not in (1, 4):
            raise ValueError(f"drop_scale: expected shape ({n},) (one factor per sample), got {tuple(drop_scale.shape)}")


def convnext_block(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    drop_scale: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    grn_weight: Optional[torch.Tensor] = None,
    grn_bias: Optional[torch.Tensor] = None,
    grn_eps: float = 1e-6,
    approximate: str = "none",
) -> torch.Tensor:
    """One ConvNeXt block (v1, or v2 with ``grn_weight``/``grn_bias``), fused.

    Args:
        x: (N, C, H, W), channels_last (native) or contiguous NCHW.
        dw_weight: (C, 1, k, k), k odd, 1..31; ``dw_bias`` (C,) or None.
        norm_weight, norm_bias: LayerNorm affine (C,) or None; ``eps`` its epsilon.
        fc1_weight: (hidden, C), fc1_bias (hidden,); fc2_weight: (C, hidden), fc2_bias (C,).
        gamma: layer scale (C,) or None.
        drop_scale: per-sample factor (N,) (stochastic depth) or None; a constant (no
            gradient flows to it).
        grn_weight, grn_bias: ConvNeXt-V2 GRN parameters (hidden,), both or neither;
            ``grn_eps`` its epsilon.
        approximate: ``"none"`` (exact GELU) or ``"tanh"``.

    Returns:
        (N, C, H, W) in x's memory format.
    """
    if isinstance(x, torch.Tensor):
        # Under autocast the block runs in the autocast dtype, as linear and conv layers do.
        (x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
         fc2_bias, gamma, grn_weight, grn_bias) = autocast_cast(autocast_dtype(x),
            [x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
             fc2_bias, gamma, grn_weight, grn_bias])
    _validate(x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
              fc2_bias, gamma, drop_scale, grn_weight, grn_bias, approximate)
    e = check_eps(eps, "eps")
    ge = check_eps(grn_eps, "grn_eps")
    if drop_scale is not None:
        drop_scale = drop_scale.detach()
    if not reference_enabled() and _core_serves(x):
        ds = None
        if drop_scale is not None:
            ds = drop_scale.reshape(-1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        y, _ = call_op(_cb_fwd, x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias,
                       fc2_weight, fc2_bias, gamma, ds, grn_weight, grn_bias, e, approximate == "tanh", ge)
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y
    return convnext_block_reference(
        x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
        gamma, drop_scale, e, grn_weight=grn_weight, grn_bias=grn_bias, grn_eps=ge,
        approximate=approximate,
    )


# ---------------------------------------------------------------- repeated inference

class PreparedConvNeXtBlock:
    """The arguments of :func:`convnext_block` validated and detached once, for repeated
    inference calls (:func:`convnext_block_prepared`): the eval-mode modules cache one per
    parameter state, so a call does not re-check a dozen parameters each time (at batch 1
    the per-call Python work is a visible part of a ConvNeXt's forward)."""

    __slots__ = ("args", "kwargs", "impl_args", "core_ws", "c", "dtype", "device")

    def __init__(self, x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias,
                 fc2_weight, fc2_bias, gamma=None, eps=1e-6, *, grn_weight=None, grn_bias=None,
                 grn_eps=1e-6, approximate="none"):
        _validate(x, dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias,
                  fc2_weight, fc2_bias, gamma, None, grn_weight, grn_bias, approximate)
        e, ge = check_eps(eps, "eps"), check_eps(grn_eps, "grn_eps")
        d = [None if t is None else t.detach() for t in
             (dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
              fc2_bias, gamma, grn_weight, grn_bias)]
        self.args = tuple(d[:9])
        self.kwargs = dict(eps=e, grn_weight=d[9], grn_bias=d[10], grn_eps=ge, approximate=approximate)
        # the core's weight list (drop_scale None) for convnext_block_chain
        self.core_ws = tuple(d[:9]) + (None, d[9], d[10])
        # _cb_fwd's arguments after x (drop_scale None)
        self.impl_args = tuple(d[:9]) + (None, d[9], d[10], e, approximate == "tanh", ge)
        self.c, self.dtype, self.device = x.shape[1], x.dtype, x.device


def convnext_block_chain(x: torch.Tensor, blocks: Sequence[PreparedConvNeXtBlock]) -> torch.Tensor:
    """The prepared blocks applied one after the other (``convnext_block_prepared`` block
    after block), in a single core call when the direct conditions hold for x and every
    block takes what the one before gives (same channels, dtype and device): the per-block
    Python work is gone, and two buffers take turns as the blocks' outputs. Otherwise block
    after block through :func:`convnext_block_prepared`. Same bits either way."""
    return run_prepared_chain(
        x, blocks, prepared_direct, convnext_block_prepared,
        lambda *a: _C.convnext_block_forward_chain(*a),
        lambda p: ([None if t is None else dl(t) for t in p.core_ws], p.kwargs["eps"],
                   p.kwargs["approximate"] == "tanh", p.kwargs["grn_eps"]))


def convnext_block_prepared(x: torch.Tensor, p: PreparedConvNeXtBlock) -> torch.Tensor:
    """``convnext_block(x, *args)`` for the arguments ``p`` holds, without gradients (the
    parameters are detached) and without drop path. Calls the fused kernel directly when
    nothing else is needed (eager mode, a plain CPU tensor like the one ``p`` was prepared
    for, no autocast, no reference mode); otherwise runs :func:`convnext_block`, which
    checks and dispatches as usual."""
    if prepared_direct(x, p):
        y, _ = _cb_fwd.fastvis_impl(x, *p.impl_args)
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y
    return convnext_block(x, *p.args, **p.kwargs)


# ---------------------------------------------------------------- inference-only forms

def dwconv_mlp_block_reference(
    x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], *,
    layer_norm: bool = True, norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
    se_down_weight: Optional[torch.Tensor] = None, se_down_bias: Optional[torch.Tensor] = None,
    se_up_weight: Optional[torch.Tensor] = None, se_up_bias: Optional[torch.Tensor] = None,
    grn_weight: Optional[torch.Tensor] = None, grn_bias: Optional[torch.Tensor] = None,
    grn_eps: float = 1e-6, gamma: Optional[torch.Tensor] = None,
    drop_scale: Optional[torch.Tensor] = None, approximate: str = "none",
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`dwconv_mlp_block` (differentiable); the output
    keeps x's memory format."""
    c, k = x.shape[1], dw_weight.shape[-1]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    t = F.conv2d(x, dw_weight, dw_bias, padding=k // 2, groups=c).permute(0, 2, 3, 1)
    if layer_norm:
        t = F.layer_norm(t, (c,), norm_weight, norm_bias, eps)
    if se_down_weight is not None:
        m = t.mean(dim=(1, 2))
        s = torch.sigmoid(F.linear(F.relu(F.linear(m, se_down_weight, se_down_bias)), se_up_weight, se_up_bias))
        t = t * s[:, None, None, :]
    h = F.gelu(F.linear(t, fc1_weight, fc1_bias), approximate=approximate)
    if grn_weight is not None:
        h = grn_channels_last_reference(h, grn_weight, grn_bias if grn_bias is not None else torch.zeros_like(grn_weight), grn_eps)
    o = F.linear(h, fc2_weight, fc2_bias)
    if gamma is not None:
        o = o * gamma
    if drop_scale is not None:
        o = o * drop_scale.reshape(-1, 1, 1, 1).to(o.dtype)
    return (x + o.permute(0, 3, 1, 2)).contiguous(memory_format=fmt)


@forward_op("fastvis::dwconv_mlp_block")
def _dmb_fwd(x: torch.Tensor, ws: List[Optional[torch.Tensor]], eps: float, tanh_gelu: bool,
             grn_eps: float, layer_norm: bool) -> torch.Tensor:
    _sync_threads()
    x = _nhwc(x.detach())
    ws = [None if t is None else t.detach() for t in ws]
    y = torch.empty_like(x, memory_format=torch.channels_last)
    key_ws = list(ws)
    nbytes = lambda: _scratch_bytes(("dwconv_mlp_block", layer_norm),
                                    lambda x_, w_, e_, t_, g_: _C.convnext_block_forward_scratch_bytes(x_, w_, e_, t_, g_, layer_norm),
                                    x, key_ws, eps, tanh_gelu, grn_eps)
    _C.convnext_block_forward(dl(x), [None if t is None else dl(t) for t in ws], eps, tanh_gelu,
                              dl(y), scratch_arg_sized(x.device, nbytes), grn_eps, 0, layer_norm)
    return y


@_dmb_fwd.register_fake
def _(x, ws, eps, tanh_gelu, grn_eps, layer_norm):
    return torch.empty_like(x, memory_format=torch.channels_last)


def dwconv_mlp_block(
    x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], *,
    layer_norm: bool = True, norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
    se_down_weight: Optional[torch.Tensor] = None, se_down_bias: Optional[torch.Tensor] = None,
    se_up_weight: Optional[torch.Tensor] = None, se_up_bias: Optional[torch.Tensor] = None,
    grn_weight: Optional[torch.Tensor] = None, grn_bias: Optional[torch.Tensor] = None,
    grn_eps: float = 1e-6, gamma: Optional[torch.Tensor] = None,
    drop_scale: Optional[torch.Tensor] = None, approximate: str = "none",
) -> torch.Tensor:
    """A depthwise-conv + MLP residual block in its inference forms, fused:

        y = x + drop_scale[n] * gamma * fc2(GRN?(GELU(fc1(SE?(LayerNorm?(dwconv(x)))))))

    The ConvNeXt block (:func:`convnext_block`) plus two forms it cannot train: no
    LayerNorm (``layer_norm=False``: blocks whose norm is an eval-mode BatchNorm fold it
    into ``dw_weight``/``dw_bias``) and a squeeze-and-excitation step before fc1 (``se_*``:
    per image, ``z *= sigmoid(up(relu(down(mean over pixels of z))))``, down (Cr, C), up
    (C, Cr)), as UniRepLKNet's block in eval/deploy form. ``grn_bias`` may be None here.

    The fused CPU kernel is forward-only: when autograd needs gradients through the call
    (grad mode on and an input requiring grad) the differentiable reference runs instead;
    other devices run the reference too.
    """
    if approximate not in _GELU:
        raise ValueError(f"approximate: expected 'none' (exact erf GELU) or 'tanh', got {approximate!r}")
    c = check_activation("dwconv_mlp_block", x)
    e = check_eps(eps, "eps")
    ge = check_eps(grn_eps, "grn_eps")
    if not layer_norm and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight / norm_bias given with layer_norm=False")
    if (se_down_weight is None) != (se_up_weight is None):
        raise ValueError("se_down_weight and se_up_weight: give both (the SE step) or neither")
    if grn_weight is not None and grn_bias is None:
        grn_bias = torch.zeros_like(grn_weight)
    named = dict(dw_weight=dw_weight, dw_bias=dw_bias, norm_weight=norm_weight, norm_bias=norm_bias,
                 fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
                 gamma=gamma, grn_weight=grn_weight, grn_bias=grn_bias,
                 se_down_weight=se_down_weight, se_down_bias=se_down_bias,
                 se_up_weight=se_up_weight, se_up_bias=se_up_bias)
    check_param_tensors("dwconv_mlp_block", x, named.items())
    for name in ("dw_weight", "fc1_weight", "fc2_weight"):
        if named[name] is None:
            raise TypeError(f"{name}: a tensor is required, got None")
    k = dw_weight.shape[-1]
    if dw_weight.dim() != 4 or tuple(dw_weight.shape[:2]) != (c, 1) or dw_weight.shape[2] != k or k % 2 == 0 or k > 31:
        raise ValueError(f"dw_weight: expected ({c}, 1, k, k) with k odd, 1..31, got {tuple(dw_weight.shape)}")
    # The shapes the core checks, here too, so the reference path (gradients, other devices)
    # refuses the same inputs with the same exceptions.
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != c or fc1_weight.shape[0] < 1:
        raise ValueError(f"fc1_weight: expected (hidden, {c}), got {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    if tuple(fc2_weight.shape) != (c, hidden):
        raise ValueError(f"fc2_weight: expected ({c}, {hidden}), got {tuple(fc2_weight.shape)}")
    cr = se_down_weight.shape[0] if se_down_weight is not None and se_down_weight.dim() == 2 else None
    if se_down_weight is not None and (cr is None or tuple(se_down_weight.shape) != (cr, c)):
        raise ValueError(f"se_down_weight: expected shape [Cr, {c}], got {tuple(se_down_weight.shape)}")
    if se_up_weight is not None and tuple(se_up_weight.shape) != (c, cr):
        raise ValueError(f"se_up_weight: expected shape [{c}, {cr}], got {tuple(se_up_weight.shape)}")
    for name, n in (("dw_bias", c), ("norm_weight", c), ("norm_bias", c), ("fc1_bias", hidden),
                    ("fc2_bias", c), ("gamma", c), ("grn_weight", hidden), ("grn_bias", hidden),
                    ("se_down_bias", cr), ("se_up_bias", c)):
        t = named[name]
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    grad = torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for t in named.values()))
    ref_args = dict(layer_norm=layer_norm, norm_weight=norm_weight, norm_bias=norm_bias, eps=e,
                    se_down_weight=se_down_weight, se_down_bias=se_down_bias,
                    se_up_weight=se_up_weight, se_up_bias=se_up_bias, grn_weight=grn_weight,
                    grn_bias=grn_bias, grn_eps=ge, gamma=gamma,
                    drop_scale=None if drop_scale is None else drop_scale.detach(),
                    approximate=approximate)
    if grad or reference_enabled() or x.device.type != "cpu":
        if x.device.type not in ("cpu", "meta") and not reference_enabled():
            warn_fallback_once(f"dwconv_mlp_block-{x.device.type}",
                               "fastvis.ops.dwconv_mlp_block: no fused kernel for device "
                               f"'{x.device.type}'; running the PyTorch reference")
        return dwconv_mlp_block_reference(x, dw_weight, dw_bias, fc1_weight, fc1_bias, fc2_weight,
                                          fc2_bias, **ref_args)
    ds = None
    if drop_scale is not None:
        ds = drop_scale.detach().reshape(-1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    ws = [dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
          gamma, ds, grn_weight, grn_bias, se_down_weight, se_down_bias, se_up_weight, se_up_bias]
    y = call_op(_dmb_fwd, x, ws, e, approximate == "tanh", ge, bool(layer_norm))
    if not x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous()
    return y
