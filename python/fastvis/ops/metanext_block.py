"""The fused MetaNeXt block of InceptionNeXt, for inference: ``fastvis.ops.metanext_block``.

    y = x + drop_scale[n] * gamma * fc2(GELU(fc1(inception_mixer(x))))

on logical (N, C, H, W) activations (channels_last native; contiguous NCHW accepted).
The mixer is InceptionNeXt's inception depthwise conv: channels ``[0, C - 3g)`` pass
through, then three depthwise convs of ``g`` channels each, with "same" padding and one
dilation: ``hw`` (ks x ks), ``w`` (1 x kb) and ``h`` (kb x 1), outputs in that order. The
block's BatchNorm (eval mode) is folded into fc1 by the caller
(:func:`fold_affine_into_fc1`).

The fused kernel is forward-only: when autograd needs gradients through the call (grad
mode on and an input requiring grad) the op runs its PyTorch reference, which is
differentiable, so results are right either way; only inference is fused.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import (autocast_cast, autocast_dtype, call_op, dl, forward_op, memoised_size,
                      prepared_direct, run_prepared_chain, scratch_arg_sized)
from ._checks import check_activation, check_param_tensors, cpu_core_serves

_GELU = ("none", "tanh")


def metanext_block_reference(
    x: torch.Tensor,
    hw_weight: torch.Tensor, hw_bias: Optional[torch.Tensor],
    w_weight: torch.Tensor, w_bias: Optional[torch.Tensor],
    h_weight: torch.Tensor, h_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    drop_scale: Optional[torch.Tensor] = None,
    dilation: int = 1,
    approximate: str = "none",
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`metanext_block` (split, three grouped convs, cat,
    then the MLP); differentiable; the output keeps x's memory format."""
    c, g = x.shape[1], hw_weight.shape[0]
    ks, kb, d = hw_weight.shape[-1], w_weight.shape[-1], dilation
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    x_id, x_hw, x_w, x_h = torch.split(x, (c - 3 * g, g, g, g), dim=1)
    t = torch.cat((
        x_id,
        F.conv2d(x_hw, hw_weight, hw_bias, padding=(ks - 1) * d // 2, dilation=d, groups=g),
        F.conv2d(x_w, w_weight, w_bias, padding=(0, (kb - 1) * d // 2), dilation=d, groups=g),
        F.conv2d(x_h, h_weight, h_bias, padding=((kb - 1) * d // 2, 0), dilation=d, groups=g),
    ), dim=1)
    h = F.gelu(F.linear(t.permute(0, 2, 3, 1), fc1_weight, fc1_bias), approximate=approximate)
    o = F.linear(h, fc2_weight, fc2_bias)
    if gamma is not None:
        o = o * gamma
    if drop_scale is not None:
        o = o * drop_scale.reshape(-1, 1, 1, 1).to(o.dtype)
    return (x + o.permute(0, 3, 1, 2)).contiguous(memory_format=fmt)


def fold_affine_into_fc1(scale: torch.Tensor, shift: torch.Tensor, fc1_weight: torch.Tensor,
                         fc1_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """fc1(scale * z + shift) = W' z + b' with W' = W diag(scale), b' = W shift + b: an
    eval-mode BatchNorm (scale = weight / sqrt(running_var + eps), shift = bias -
    running_mean * scale) folded into the linear layer after it. Computed in float64."""
    w = fc1_weight.double()
    wf = w * scale.double()
    bf = w @ shift.double()
    if fc1_bias is not None:
        bf = bf + fc1_bias.double()
    return wf.to(fc1_weight.dtype), bf.to(fc1_weight.dtype)



@forward_op("fastvis::metanext_block")
def _mn_fwd(
    x: torch.Tensor, hw_weight: torch.Tensor, hw_bias: Optional[torch.Tensor],
    w_weight: torch.Tensor, w_bias: Optional[torch.Tensor], h_weight: torch.Tensor,
    h_bias: Optional[torch.Tensor], fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
    drop_scale: Optional[torch.Tensor], dilation: int, tanh_gelu: bool,
) -> torch.Tensor:
    _sync_threads()
    x = x.detach().contiguous(memory_format=torch.channels_last)
    ws = [None if t is None else t.detach() for t in (
        hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, fc1_weight, fc1_bias,
        fc2_weight, fc2_bias, gamma, drop_scale)]
    # The size query's memo key is built only where scratch is asked for (CUDA); the CPU
    # core takes its scratch from the bindings' per-thread buffer.
    nbytes = lambda: memoised_size(
        ("metanext_block_fwd", _C.get_num_threads(), tuple(x.shape), x.stride(), x.dtype, dilation,
         tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in ws)),
        lambda: _C.metanext_block_forward_scratch_bytes(x, ws, dilation, tanh_gelu))
    y = torch.empty_like(x, memory_format=torch.channels_last)
    _C.metanext_block_forward(dl(x), [None if t is None else dl(t) for t in ws], dilation,
                              tanh_gelu, dl(y), scratch_arg_sized(x.device, nbytes))
    return y


@_mn_fwd.register_fake
def _(x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, fc1_weight, fc1_bias,
      fc2_weight, fc2_bias, gamma, drop_scale, dilation, tanh_gelu):
    return torch.empty_like(x, memory_format=torch.channels_last)


def _validate(x, params, dilation, approximate) -> None:
    c = check_activation("metanext_block", x)
    check_param_tensors("metanext_block", x, params, any_dtype=("drop_scale",))
    p = dict(params)
    for name in ("hw_weight", "w_weight", "h_weight", "fc1_weight", "fc2_weight"):
        if p[name] is None:
            raise TypeError(f"{name}: a tensor is required, got None")
    hw, ww, hh = p["hw_weight"], p["w_weight"], p["h_weight"]
    g = hw.shape[0]
    if hw.dim() != 4 or hw.shape[1] != 1 or hw.shape[2] != hw.shape[3] or hw.shape[2] % 2 == 0:
        raise ValueError(f"hw_weight: expected (g, 1, ks, ks) with ks odd, got {tuple(hw.shape)}")
    if not 1 <= 3 * g <= c:
        raise ValueError(f"hw_weight: g = {g} branch channels need 1 <= 3g <= C = {c}")
    kb = ww.shape[-1] if ww.dim() == 4 else -1
    if ww.dim() != 4 or tuple(ww.shape[:3]) != (g, 1, 1) or kb % 2 == 0:
        raise ValueError(f"w_weight: expected ({g}, 1, 1, kb) with kb odd, got {tuple(ww.shape)}")
    if tuple(hh.shape) != (g, 1, kb, 1):
        raise ValueError(f"h_weight: expected ({g}, 1, {kb}, 1), got {tuple(hh.shape)}")
    for name in ("hw_bias", "w_bias", "h_bias"):
        if p[name] is not None and tuple(p[name].shape) != (g,):
            raise ValueError(f"{name}: expected shape ({g},), got {tuple(p[name].shape)}")
    f1, f2 = p["fc1_weight"], p["fc2_weight"]
    if f1.dim() != 2 or f1.shape[1] != c:
        raise ValueError(f"fc1_weight: expected (hidden, {c}), got {tuple(f1.shape)}")
    hidden = f1.shape[0]
    if tuple(f2.shape) != (c, hidden):
        raise ValueError(f"fc2_weight: expected ({c}, {hidden}), got {tuple(f2.shape)}")
    for name, n in (("fc1_bias", hidden), ("fc2_bias", c), ("gamma", c), ("drop_scale", x.shape[0])):
        if p[name] is not None and tuple(p[name].shape) != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(p[name].shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation: expected an integer >= 1, got {dilation!r}")
    if approximate not in _GELU:
        raise ValueError(f"approximate: expected 'none' (exact erf GELU) or 'tanh', got {approximate!r}")


def metanext_block(
    x: torch.Tensor,
    hw_weight: torch.Tensor, hw_bias: Optional[torch.Tensor],
    w_weight: torch.Tensor, w_bias: Optional[torch.Tensor],
    h_weight: torch.Tensor, h_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    drop_scale: Optional[torch.Tensor] = None,
    dilation: int = 1,
    approximate: str = "none",
) -> torch.Tensor:
    """One InceptionNeXt MetaNeXt block (eval form: the BatchNorm folded into fc1), fused.

    Args:
        x: (N, C, H, W), channels_last (native) or contiguous NCHW.
        hw_weight (g, 1, ks, ks), w_weight (g, 1, 1, kb), h_weight (g, 1, kb, 1): the
            mixer's depthwise branches (ks, kb odd), biases (g,) or None.
        fc1_weight (hidden, C), fc1_bias (hidden,), fc2_weight (C, hidden), fc2_bias (C,).
        gamma: layer scale (C,) or None; drop_scale: per-sample factor (N,) or None.
        dilation: of the three branches; approximate: ``"none"`` (erf GELU) or ``"tanh"``.

    Returns:
        (N, C, H, W) in x's memory format. The fused CPU kernel serves inference (no
        gradient needed); otherwise, and on other devices, the PyTorch reference runs.
    """
    if isinstance(x, torch.Tensor):
        ad = autocast_dtype(x)
        (x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, fc1_weight, fc1_bias,
         fc2_weight, fc2_bias, gamma) = autocast_cast(ad, [x, hw_weight, hw_bias, w_weight, w_bias,
            h_weight, h_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma])
    params = (("hw_weight", hw_weight), ("hw_bias", hw_bias), ("w_weight", w_weight),
              ("w_bias", w_bias), ("h_weight", h_weight), ("h_bias", h_bias),
              ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight),
              ("fc2_bias", fc2_bias), ("gamma", gamma), ("drop_scale", drop_scale))
    _validate(x, params, dilation, approximate)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for _, t in params if _ != "drop_scale") or (
        torch.is_grad_enabled() and x.requires_grad)
    if not needs_grad and not reference_enabled() and cpu_core_serves("metanext_block", x):
        ds = None
        if drop_scale is not None:
            ds = drop_scale.detach().reshape(-1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        y = call_op(_mn_fwd, x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, fc1_weight,
                    fc1_bias, fc2_weight, fc2_bias, gamma, ds, int(dilation), approximate == "tanh")
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y
    return metanext_block_reference(x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias,
                                    fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                                    None if drop_scale is None else drop_scale.detach(),
                                    dilation, approximate)


class PreparedMetaNeXtBlock:
    """The arguments of :func:`metanext_block` (without drop path) validated and detached
    once, for repeated inference calls (:func:`metanext_block_prepared`), as
    :class:`fastvis.ops.convnext_block.PreparedConvNeXtBlock` for the ConvNeXt block."""

    __slots__ = ("args", "kwargs", "impl_args", "core_ws", "c", "dtype", "device")

    def __init__(self, x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, fc1_weight,
                 fc1_bias, fc2_weight, fc2_bias, gamma=None, dilation=1, approximate="none"):
        names = ("hw_weight", "hw_bias", "w_weight", "w_bias", "h_weight", "h_bias",
                 "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma")
        ts = (hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, fc1_weight, fc1_bias,
              fc2_weight, fc2_bias, gamma)
        _validate(x, tuple(zip(names, ts)) + (("drop_scale", None),), dilation, approximate)
        d = tuple(None if t is None else t.detach() for t in ts)
        self.args = d
        self.kwargs = dict(dilation=dilation, approximate=approximate)
        self.impl_args = d + (None, int(dilation), approximate == "tanh")  # _mn_fwd's after x
        self.core_ws = d + (None,)  # the core's weight list (drop_scale None)
        self.c, self.dtype, self.device = x.shape[1], x.dtype, x.device


def metanext_block_chain(x: torch.Tensor, blocks: Sequence[PreparedMetaNeXtBlock]) -> torch.Tensor:
    """The prepared blocks applied one after the other, in a single core call when the
    direct conditions hold (as :func:`fastvis.ops.convnext_block.convnext_block_chain`);
    otherwise block after block through :func:`metanext_block_prepared`. Same bits."""
    return run_prepared_chain(
        x, blocks, prepared_direct, metanext_block_prepared,
        lambda *a: _C.metanext_block_forward_chain(*a),
        lambda p: ([None if t is None else dl(t) for t in p.core_ws], p.impl_args[-2], p.impl_args[-1]))


def metanext_block_prepared(x: torch.Tensor, p: PreparedMetaNeXtBlock) -> torch.Tensor:
    """``metanext_block(x, *args)`` for the arguments ``p`` holds, without gradients and
    without drop path: the fused kernel directly when nothing else is needed (eager mode, a
    plain CPU tensor like the one ``p`` was prepared for, no autocast, no reference mode),
    otherwise :func:`metanext_block` with its checks and dispatch."""
    if prepared_direct(x, p):
        y = _mn_fwd.fastvis_impl(x, *p.impl_args)
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y
    return metanext_block(x, *p.args, **p.kwargs)
