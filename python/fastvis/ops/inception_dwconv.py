"""Inception depthwise convolution (InceptionNeXt's token mixer): ``fastvis.ops.inception_depthwise_conv2d``.

Semantics of timm's ``InceptionDWConv2d.forward``: the C channels of x are split, in this
order, into identity (C - 3g), square (g), band 1 x kb (g) and band kb x 1 (g); each branch
is a depthwise ``F.conv2d`` with bias, stride 1, dilation ``d`` along its kernel extent and
symmetric "same" padding ``d*(k-1)//2``; the results are concatenated in the same order.
One op reads x once and writes the concatenated output in place: no split, no cat, no
activation-sized temporaries (channels_last; contiguous NCHW stages the 3g branch
channels). Implemented as ``torch.library.custom_op``s (forward and backward) with fake
kernels and registered autograd, so ``torch.compile(fullgraph=True)`` sees no graph break.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled, warn_fallback_once
from .._runtime import _sync_threads, cuda_available
from ._bridge import (autocast_cast, autocast_dtype, call_op, dense_for_core, forward_op, register_autograd, empty_like_layout, like_layout,
                      scratch_arg_sized, stream_of)

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_KERNEL = 63
_WEIGHT_NAMES = ("hw_weight", "w_weight", "h_weight")
_BIAS_NAMES = ("hw_bias", "w_bias", "h_bias")


def _fmt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- custom ops


@forward_op("fastvis::inception_depthwise_conv2d")
def _inc_fwd(
    x: torch.Tensor,
    hw_weight: torch.Tensor,
    hw_bias: Optional[torch.Tensor],
    w_weight: torch.Tensor,
    w_bias: Optional[torch.Tensor],
    h_weight: torch.Tensor,
    h_bias: Optional[torch.Tensor],
    dilation: int,
) -> torch.Tensor:
    _sync_threads()  # here, not in the traced wrapper: torch.compile sees only the op
    x = dense_for_core(x).detach()
    ws = [None if t is None else t.detach() for t in (hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias)]
    y = empty_like_layout(x.shape, x)
    if x.shape[0] == 0:
        return y
    nbytes = lambda: _C.inception_dwconv_forward_scratch_bytes(x, ws, dilation)
    _C.inception_dwconv_forward(x, ws, dilation, y, scratch_arg_sized(x.device, nbytes, export=False), stream_of(x))
    return y


@_inc_fwd.register_fake
def _(x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, dilation):
    return empty_like_layout(x.shape, x)


@forward_op("fastvis::inception_depthwise_conv2d_backward")
def _inc_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    hw_weight: torch.Tensor,
    w_weight: torch.Tensor,
    h_weight: torch.Tensor,
    dilation: int,
    need: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias); entries whose
    ``need`` flag is False come back as empty tensors."""
    _sync_threads()
    x = dense_for_core(x).detach()
    gy = like_layout(grad_y, x).detach()
    outs = _empty_grads(x, hw_weight, w_weight, h_weight, need)
    if any(need):
        # The weights are read for their shapes (and, for grad_x, their values); biases
        # do not enter the backward pass.
        ws = [hw_weight.detach(), None, w_weight.detach(), None, h_weight.detach(), None]
        grads = [o if n else None for o, n in zip(outs, need)]
        nbytes = lambda: _C.inception_dwconv_backward_scratch_bytes(x, ws, dilation)
        _C.inception_dwconv_backward(gy, x, ws, dilation, grads, scratch_arg_sized(x.device, nbytes, export=False), stream_of(x))
    return tuple(outs)


def _empty_grads(x, hw_weight, w_weight, h_weight, need):
    g = hw_weight.shape[0]
    shapes = [None, hw_weight.shape, (g,), w_weight.shape, (g,), h_weight.shape, (g,)]
    outs = []
    for i, (shape, n) in enumerate(zip(shapes, need)):
        if not n:
            outs.append(x.new_empty(0))
        elif i == 0:
            outs.append(empty_like_layout(x.shape, x))
        else:
            outs.append(torch.empty(shape, dtype=x.dtype, device=x.device))
    return outs


@_inc_bwd.register_fake
def _(grad_y, x, hw_weight, w_weight, h_weight, dilation, need):
    return tuple(_empty_grads(x, hw_weight, w_weight, h_weight, need))


def _setup_context(ctx, inputs, output):
    x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, dilation = inputs
    ctx.save_for_backward(x, hw_weight, w_weight, h_weight)
    ctx.dilation = dilation
    ctx.has_bias = (hw_bias is not None, w_bias is not None, h_bias is not None)


def _backward(ctx, grad_y):
    x, hw_weight, w_weight, h_weight = ctx.saved_tensors
    ng = ctx.needs_input_grad
    hb = ctx.has_bias
    need = [bool(ng[0]), bool(ng[1]), bool(hb[0] and ng[2]), bool(ng[3]), bool(hb[1] and ng[4]),
            bool(ng[5]), bool(hb[2] and ng[6])]
    if not any(need):
        return (None,) * 8
    grads = call_op(_inc_bwd, grad_y, x, hw_weight, w_weight, h_weight, ctx.dilation, need)
    return tuple(gr if n else None for gr, n in zip(grads, need)) + (None,)


register_autograd(_inc_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- public API


def inception_depthwise_conv2d_reference(
    x: torch.Tensor,
    hw_weight: torch.Tensor,
    hw_bias: Optional[torch.Tensor],
    w_weight: torch.Tensor,
    w_bias: Optional[torch.Tensor],
    h_weight: torch.Tensor,
    h_bias: Optional[torch.Tensor],
    dilation: int = 1,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`inception_depthwise_conv2d`: timm's composition
    (``torch.split`` -> three depthwise ``F.conv2d`` -> ``torch.cat``), in x's memory format."""
    d = dilation
    g = hw_weight.shape[0]
    c = x.shape[1]
    x_id, x_hw, x_w, x_h = torch.split(x, (c - 3 * g, g, g, g), dim=1)
    kh, kw = hw_weight.shape[2], hw_weight.shape[3]
    kbw, kbh = w_weight.shape[3], h_weight.shape[2]
    y = torch.cat((
        x_id,
        F.conv2d(x_hw, hw_weight, hw_bias, 1, (d * (kh - 1) // 2, d * (kw - 1) // 2), d, groups=g),
        F.conv2d(x_w, w_weight, w_bias, 1, (0, d * (kbw - 1) // 2), (1, d), groups=g),
        F.conv2d(x_h, h_weight, h_bias, 1, (d * (kbh - 1) // 2, 0), (d, 1), groups=g),
    ), dim=1)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def _validate(x, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]], dilation) -> int:
    """The core's argument rules, checked in Python so every path (fast, reference,
    fallback device) accepts and refuses the same inputs with the same exceptions.
    Returns the dilation as an int."""
    name = "inception_depthwise_conv2d"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    allowed = _CUDA_DTYPES if x.device.type == "cuda" else _CPU_DTYPES
    if x.dtype not in allowed and x.device.type != "meta":
        names = ", ".join(_fmt(t) for t in allowed)
        hint = " (float16 is CUDA-only)" if x.dtype == torch.float16 else ""
        raise TypeError(f"x: the {x.device.type.upper()} backend supports {names}, got {_fmt(x.dtype)}{hint}")
    if isinstance(dilation, bool) or not isinstance(dilation, int):
        raise TypeError(f"dilation: expected an int, got {type(dilation).__name__}")
    if not 1 <= dilation <= 1024:
        raise ValueError(f"dilation: expected a value in [1, 1024], got {dilation}")
    for wname, t in zip(_WEIGHT_NAMES, weights):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{wname}: expected a torch.Tensor, got {type(t).__name__}")
    for bname, t in zip(_BIAS_NAMES, biases):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{bname}: expected a torch.Tensor or None, got {type(t).__name__}")
    for tname, t in list(zip(_WEIGHT_NAMES, weights)) + list(zip(_BIAS_NAMES, biases)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name}: {tname} is on {t.device} but x is on {x.device}; "
                             "all tensors must be on the same device")
        if t.dtype != x.dtype:
            raise TypeError(f"{tname}: expected dtype {_fmt(x.dtype)} (the input's), got {_fmt(t.dtype)}")
    n, c, h, w = x.shape
    if h < 1 or w < 1:
        raise ValueError(f"x: spatial size must be positive, got shape {tuple(x.shape)}")
    for wname, t in zip(_WEIGHT_NAMES, weights):
        if t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"{wname}: expected a depthwise weight of shape (g, 1, kh, kw), got {tuple(t.shape)}")
    hw, ww, hh = weights
    g = hw.shape[0]
    if g < 1:
        raise ValueError(f"hw_weight: expected at least one channel per branch, got {tuple(hw.shape)}")
    if ww.shape[0] != g or hh.shape[0] != g:
        raise ValueError(
            "the three branch weights must have the same number of channels g: hw_weight "
            f"{tuple(hw.shape)}, w_weight {tuple(ww.shape)}, h_weight {tuple(hh.shape)}")
    if ww.shape[2] != 1:
        raise ValueError(f"w_weight: the band branch 1 x k needs a (g, 1, 1, k) weight, got {tuple(ww.shape)}")
    if hh.shape[3] != 1:
        raise ValueError(f"h_weight: the band branch k x 1 needs a (g, 1, k, 1) weight, got {tuple(hh.shape)}")
    if 3 * g > c:
        raise ValueError(f"x: the three branches need 3 * g = {3 * g} channels (g = {g} from the weights) "
                         f"but x has only {c} channels")
    for wname, dim, k in (("hw_weight", "height", hw.shape[2]), ("hw_weight", "width", hw.shape[3]),
                          ("w_weight", "width", ww.shape[3]), ("h_weight", "height", hh.shape[2])):
        if not 1 <= k <= _MAX_KERNEL:
            raise ValueError(f"{wname}: kernel {dim} must be between 1 and {_MAX_KERNEL}, got {k}")
        if (dilation * (k - 1)) % 2:
            raise ValueError(
                f"{wname}: kernel {dim} {k} with dilation {dilation} has no symmetric 'same' padding "
                f"(dilation*(k-1) = {dilation * (k - 1)} is odd; timm's padding would shrink the output); "
                "use an odd kernel size")
    for bname, t in zip(_BIAS_NAMES, biases):
        if t is not None and tuple(t.shape) != (g,):
            raise ValueError(f"{bname}: expected shape ({g},), got {tuple(t.shape)}")
    return dilation


def _core_serves(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        if cuda_available():
            return True
        warn_fallback_once(
            "incdw-cuda",
            "fastvis.ops.inception_depthwise_conv2d: this fastvis build has no usable CUDA backend; "
            "running the PyTorch reference on CUDA tensors",
        )
        return False
    if x.device.type != "meta":
        warn_fallback_once(
            f"incdw-{x.device.type}",
            f"fastvis.ops.inception_depthwise_conv2d: no fastvis kernels for device '{x.device.type}'; "
            "running the PyTorch reference",
        )
    return False


def inception_depthwise_conv2d(
    x: torch.Tensor,
    hw_weight: torch.Tensor,
    hw_bias: Optional[torch.Tensor],
    w_weight: torch.Tensor,
    w_bias: Optional[torch.Tensor],
    h_weight: torch.Tensor,
    h_bias: Optional[torch.Tensor],
    dilation: int = 1,
) -> torch.Tensor:
    """InceptionNeXt's Inception depthwise convolution (timm's ``InceptionDWConv2d``), fused.

    Args:
        x: (N, C, H, W), channels_last (native, in place) or contiguous NCHW; other strides
            are copied to contiguous first.
        hw_weight: (g, 1, kh, kw), the square branch (channels C-3g .. C-2g).
        w_weight: (g, 1, 1, kbw), the 1 x kbw band branch (channels C-2g .. C-g).
        h_weight: (g, 1, kbh, 1), the kbh x 1 band branch (channels C-g .. C).
        hw_bias, w_bias, h_bias: (g,) or None.
        dilation: applied along each branch's kernel extent; dilation*(k-1) must be even
            for every kernel extent k (odd kernels always qualify), as timm's symmetric
            padding d*(k-1)//2 keeps the size only then.

    Returns:
        (N, C, H, W) in x's memory format: channels [0, C-3g) are x's, the others the
        branch convolutions. CPU: float32, float64, bfloat16 (float32 accumulation).
        CUDA: through the depthwise CUDA kernels if this build has them (unverified on
        hardware), else the PyTorch reference with a one-time warning.
    """
    if isinstance(x, torch.Tensor):
        # As F.conv2d under autocast: input and parameters in the autocast dtype.
        x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias = autocast_cast(
            autocast_dtype(x), [x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias])
    d = _validate(x, (hw_weight, w_weight, h_weight), (hw_bias, w_bias, h_bias), dilation)
    if reference_enabled() or not _core_serves(x):
        return inception_depthwise_conv2d_reference(x, hw_weight, hw_bias, w_weight, w_bias, h_weight,
                                                    h_bias, d)
    return call_op(_inc_fwd, x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, d)
