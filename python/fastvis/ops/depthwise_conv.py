"""Depthwise 2-D convolution: ``fastvis.ops.depthwise_conv2d``.

Semantics of ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` with
``weight`` of shape ``(C, 1, kh, kw)``. Implemented as ``torch.library.custom_op``s
(forward and backward) with fake kernels and registered autograd, so
``torch.compile(fullgraph=True)`` sees no graph break.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled, warn_fallback_once
from .._runtime import _sync_threads, cuda_available
from ._bridge import (autocast_cast, autocast_dtype, call_op, dense_for_core, dl, eager_direct_ok,
                      empty_like_layout, forward_op, register_autograd, like_layout, scratch_arg, stream_of)

IntOrPair = Union[int, Sequence[int]]
Padding = Union[int, str, Sequence[int]]


def _pair(v: IntOrPair, name: str) -> Tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got bool")
    if isinstance(v, int):
        return (v, v)
    try:
        t = tuple(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {type(v).__name__}") from None
    if len(t) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in t):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def normalize_conv_args(
    kernel_size: Tuple[int, int], stride: IntOrPair = 1, padding: Padding = 0, dilation: IntOrPair = 1
) -> Tuple[List[int], List[int], List[int]]:
    """(stride pair, padding as [top, bottom, left, right], dilation pair) from user arguments.

    ``padding`` may be an int, a pair (ph, pw), a 4-tuple (top, bottom, left, right),
    ``"valid"`` or ``"same"`` (stride 1 only; an even kernel pads the extra row/column at
    the bottom/right, as PyTorch does).
    """
    kh, kw = kernel_size
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    for name, v in (("stride", sh), ("stride", sw)):
        if v not in (1, 2):
            raise ValueError(f"{name}: expected 1 or 2 in each dimension, got {(sh, sw)}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation: expected values >= 1, got {(dh, dw)}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0, 0, 0, 0]
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError("padding='same' is only supported with stride 1 (as in PyTorch)")
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = [th // 2, th - th // 2, tw // 2, tw - tw // 2]
        else:
            raise ValueError(f"padding: expected 'same', 'valid', an int or a tuple, got {padding!r}")
    elif isinstance(padding, int) and not isinstance(padding, bool):
        pads = [padding] * 4
    else:
        try:
            t = tuple(padding)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"padding: expected 'same', 'valid', an int or a tuple, got {padding!r}") from None
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in t):
            raise ValueError(f"padding: expected ints, got {padding!r}")
        if len(t) == 2:
            pads = [t[0], t[0], t[1], t[1]]
        elif len(t) == 4:
            pads = list(t)
        else:
            raise ValueError(f"padding: expected 2 (ph, pw) or 4 (top, bottom, left, right) values, got {padding!r}")
    if min(pads) < 0:
        raise ValueError(f"padding: must be non-negative, got {padding!r}")
    return [sh, sw], pads, [dh, dw]


def _out_size(size: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------- custom ops


@forward_op("fastvis::depthwise_conv2d")
def _dwconv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> torch.Tensor:
    _sync_threads()  # here, not in the traced wrapper: torch.compile sees only the op
    x = dense_for_core(x)
    y = empty_like_layout(_out_shape(x, weight, stride, padding, dilation), x)
    xd, wd = x.detach(), weight.detach()
    bd = None if bias is None else bias.detach()
    _C.dwconv_forward(dl(xd), dl(wd), dl(bd), dl(y), stride, padding, dilation,
                      scratch_arg(x, "fwd", _C.dwconv_forward_scratch_bytes, (xd, wd), stride, padding, dilation),
                      stream_of(x))
    return y



def _out_shape(x, weight, stride, padding, dilation):
    kh, kw = weight.shape[-2], weight.shape[-1]
    oh = _out_size(x.shape[2], kh, stride[0], dilation[0], padding[0], padding[1])
    ow = _out_size(x.shape[3], kw, stride[1], dilation[1], padding[2], padding[3])
    return (x.shape[0], x.shape[1], oh, ow)


@_dwconv_fwd.register_fake
def _(x, weight, bias, stride, padding, dilation):
    return empty_like_layout(_out_shape(x, weight, stride, padding, dilation), x)


@forward_op("fastvis::depthwise_conv2d_backward")
def _dwconv_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _sync_threads()
    x = dense_for_core(x).detach()
    gy = like_layout(grad_y, x).detach()
    wd = weight.detach()
    stream = stream_of(x)
    gx = empty_like_layout(x.shape, x) if need_input else x.new_empty(0)
    if need_input:
        _C.dwconv_backward_input(dl(gy), dl(wd), dl(gx), stride, padding, dilation,
                                 scratch_arg(x, "bwd_in", _C.dwconv_backward_input_scratch_bytes, (gy, wd, gx),
                                              stride, padding, dilation), stream)
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight or need_bias else weight.new_empty(0)
    gb = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device) if need_bias else weight.new_empty(0)
    if need_weight or need_bias:
        _C.dwconv_backward_weight(
            dl(gy), dl(x), dl(gw), dl(gb) if need_bias else None, stride, padding, dilation,
            scratch_arg(x, "bwd_w", _C.dwconv_backward_weight_scratch_bytes, (gy, x, gw), stride, padding, dilation),
            stream
        )
    if not need_weight:
        gw = weight.new_empty(0)
    return gx, gw, gb


@_dwconv_bwd.register_fake
def _(grad_y, x, weight, stride, padding, dilation, need_input, need_weight, need_bias):
    gx = empty_like_layout(x.shape, x) if need_input else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    gb = weight.new_empty(weight.shape[0]) if need_bias else weight.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    gx, gw, gb = call_op(_dwconv_bwd, grad_y, x, weight, stride, padding, dilation, need_x, need_w, need_b)
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None, None)


register_autograd(_dwconv_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- public API


def depthwise_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`depthwise_conv2d` (F.pad + F.conv2d(groups=C))."""
    s, p, d = normalize_conv_args((weight.shape[-2], weight.shape[-1]), stride, padding, dilation)
    w = weight if weight.dim() == 4 else weight.unsqueeze(1)
    if p[0] == p[1] and p[2] == p[3]:
        return F.conv2d(x, w, bias, s, (p[0], p[2]), d, groups=x.shape[1])
    return F.conv2d(F.pad(x, (p[2], p[3], p[0], p[1])), w, bias, s, 0, d, groups=x.shape[1])


def _check_devices(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(
                f"depthwise_conv2d: {name} is on {t.device} but x is on {x.device}; "
                "all tensors must be on the same device"
            )


_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], s, p, d) -> None:
    """The core's argument rules, checked in Python so every path (fast, reference,
    fallback device) accepts and refuses the same inputs with the same exceptions."""
    allowed = _CUDA_DTYPES if x.device.type == "cuda" else _CPU_DTYPES
    if x.dtype not in allowed and x.device.type != "meta":
        names = ", ".join(str(t).replace("torch.", "") for t in allowed)
        hint = " (float16 is CUDA-only)" if x.dtype == torch.float16 else ""
        raise TypeError(f"x: the {x.device.type.upper()} backend supports {names}, got {str(x.dtype).replace('torch.', '')}{hint}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the input's), got {t.dtype}")
    n, c, h, w = x.shape
    if c < 1:
        raise ValueError(f"x: expected at least one channel, got shape {tuple(x.shape)}")
    if h < 1 or w < 1:
        raise ValueError(f"x: spatial size must be positive, got shape {tuple(x.shape)}")
    if weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(
            f"weight: a depthwise convolution needs shape (C, 1, kh, kw) with C = {c} "
            f"(groups=C), got {tuple(weight.shape)}"
        )
    kh, kw = weight.shape[2], weight.shape[3]
    if not (1 <= kh <= 63 and 1 <= kw <= 63):
        raise ValueError(f"weight: kernel size must be between 1 and 63 in each dimension, got {kh}x{kw}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"bias: expected shape ({c},), got {tuple(bias.shape)}")
    eh, ew = d[0] * (kh - 1), d[1] * (kw - 1)
    if max(p[0], p[1]) > eh or max(p[2], p[3]) > ew:
        raise ValueError(
            f"padding: each side may be at most dilation*(kernel-1) ({eh} rows, {ew} columns here), "
            f"got (top, bottom, left, right) = {tuple(p)}"
        )
    if h + p[0] + p[1] <= eh or w + p[2] + p[3] <= ew:
        raise ValueError(
            f"x: padded input {h + p[0] + p[1]}x{w + p[2] + p[3]} is smaller than the dilated kernel {eh + 1}x{ew + 1}"
        )


def _core_serves(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        if cuda_available():
            return True
        warn_fallback_once(
            "dwconv-cuda",
            "fastvis.ops.depthwise_conv2d: this fastvis build has no usable CUDA backend; "
            "running the PyTorch reference on CUDA tensors",
        )
        return False
    if x.device.type != "meta":
        warn_fallback_once(
            f"dwconv-{x.device.type}",
            f"fastvis.ops.depthwise_conv2d: no fastvis kernels for device '{x.device.type}'; "
            "running the PyTorch reference",
        )
    return False


# Arguments already checked, by what they are checked on: (x's shape and dtype, the
# weight's, the bias's or None, stride, padding, dilation) -> (stride, pads, dilation as
# the core takes them, the output shape).
_CHECKED: dict = {}
_CHECKED_MAX = 512
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _eager_cpu_fast(x, weight, bias, stride, padding, dilation) -> Optional[torch.Tensor]:
    """The op on the common inference call, or None for the general path: plain CPU tensors,
    x NHWC- or NCHW-dense, no autograd graph to record, no reference mode, autocast or
    anything intercepting dispatch (eager_direct_ok), and arguments this shape and dtype
    already passed _validate. The same core call as the custom op's implementation, minus
    ~25-30 us of Python per call (a 3x3 layer at N=1, 56x56, C=128 is ~0.2 ms in all)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or type(weight) not in _PLAIN_TENSORS or not x.is_cpu:
        return None
    if bias is not None and type(bias) not in _PLAIN_TENSORS:
        return None
    try:
        key = (x.shape, x.dtype, weight.shape, weight.dtype,
               None if bias is None else (bias.shape, bias.dtype), stride, padding, dilation)
        args = _CHECKED.get(key)
    except TypeError:  # unhashable arguments (lists): the general path
        return None
    if args is None or not weight.is_cpu or (bias is not None and not bias.is_cpu):
        return None
    if reference_enabled() or torch.is_autocast_enabled("cpu") or not eager_direct_ok(x, weight, bias):
        return None
    cl = x.is_contiguous(memory_format=torch.channels_last)
    if not cl and not x.is_contiguous():
        return None
    s, p, d, out_shape = args
    _sync_threads()
    if out_shape == x.shape:
        y = torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)
    else:
        y = torch.empty(out_shape, dtype=x.dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
    _C.dwconv_forward(dl(x), dl(weight.detach() if weight.requires_grad else weight),
                      None if bias is None else dl(bias.detach() if bias.requires_grad else bias),
                      dl(y), s, p, d, None, 0)
    return y


def _remember_checked(x, weight, bias, stride, padding, dilation, s, p, d) -> None:
    """Records arguments that passed _validate for _eager_cpu_fast (CPU only)."""
    if not (x.is_cpu and type(x) is torch.Tensor):
        return
    try:
        key = (x.shape, x.dtype, weight.shape, weight.dtype,
               None if bias is None else (bias.shape, bias.dtype), stride, padding, dilation)
        hash(key)
    except TypeError:
        return
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = (list(s), list(p), list(d), torch.Size(_out_shape(x, weight, s, p, d)))


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
) -> torch.Tensor:
    """Depthwise 2-D convolution, ``F.conv2d(..., groups=C)`` semantics.

    Args:
        x: (N, C, H, W), channels_last (fast, zero-copy) or contiguous NCHW; other
            strides are copied to contiguous first.
        weight: (C, 1, kh, kw), kernel sizes 1..63 per dimension (band kernels included).
        bias: optional (C,).
        stride: 1 or 2 per dimension.
        padding: int, (ph, pw), (top, bottom, left, right), "valid" or "same"; each side at
            most ``dilation * (k - 1)``.
        dilation: >= 1 per dimension.

    Returns:
        (N, C, OH, OW) in x's memory format. CPU: float32, float64, bfloat16 (float32
        accumulation). CUDA (if built): float32, float16, bfloat16 -- unverified on hardware.
    """
    y = _eager_cpu_fast(x, weight, bias, stride, padding, dilation)
    if y is not None:
        return y
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("depthwise_conv2d: x and weight must be torch.Tensor")
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv2d: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"depthwise_conv2d: expected a (C, 1, kh, kw) weight, got shape {tuple(weight.shape)}")
    _check_devices(x, weight, bias)
    s, p, d = normalize_conv_args((weight.shape[-2], weight.shape[-1]), stride, padding, dilation)
    ac = autocast_dtype(x)
    if ac is not None:  # as F.conv2d under autocast: input and parameters in the autocast dtype
        x, weight, bias = autocast_cast(ac, [x, weight, bias])
    _validate(x, weight, bias, s, p, d)
    if ac is None:
        _remember_checked(x, weight, bias, stride, padding, dilation, s, p, d)
    if reference_enabled() or not _core_serves(x):
        return depthwise_conv2d_reference(x, weight, bias, s, p, d)
    return call_op(_dwconv_fwd, x, weight, bias, s, p, d)
