"""Patch convolution: ``F.conv2d(x, weight, bias, stride=kernel)`` (the "patchify" stems and
downsampling layers of ConvNeXt-style networks), one GEMM in the core, forward only.

Why an op for a plain convolution: on these 2-core machines PyTorch's convolution runs on
its OpenMP team, whose workers keep spinning for ~10 ms after each parallel op; the fused
fastvis blocks that follow a stem or a downsampling layer then share the cores with them
(measured: ConvNeXt-T at N=1, stage 1 blocks 26 ms instead of 17 ms). Computed in fastvis'
pool, a model's forward pass runs no PyTorch parallel region between its blocks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import autocast_cast, autocast_dtype, call_op, dl, forward_op, scratch
from ._checks import check_param_tensors

_CORE_DTYPES = (torch.float32, torch.float64)


@forward_op("fastvis::patch_conv2d")
def _pc_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _sync_threads()
    x = x.detach()
    w = weight.detach()
    if not (w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)):
        w = w.contiguous()  # the core takes either dense layout as it is (no per-call copy)
    b = None if bias is None else bias.detach().contiguous()
    y = torch.empty(_out_shape(x, weight), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    nbytes = _C.patch_conv2d_forward_scratch_bytes(dl(x), dl(w))
    _C.patch_conv2d_forward(dl(x), dl(w), None if b is None else dl(b), dl(y),
                            dl(scratch(nbytes, x.device)))
    return y


def _out_shape(x, weight):
    kh, kw = weight.shape[2], weight.shape[3]
    return (x.shape[0], weight.shape[0], x.shape[2] // kh, x.shape[3] // kw)


@_pc_fwd.register_fake
def _(x, weight, bias):
    return torch.empty(_out_shape(x, weight), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def patch_conv2d_reference(x: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=(kh, kw))``."""
    return F.conv2d(x, weight, bias, stride=(weight.shape[2], weight.shape[3]))


def _validate(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("patch_conv2d: x and weight must be torch.Tensor")
    if x.dim() != 4:
        raise ValueError(f"patch_conv2d: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected (Cout, Cin, kh, kw), got shape {tuple(weight.shape)}")
    n, c, h, w = x.shape
    cout, cin, kh, kw = weight.shape
    if cin != c:
        raise ValueError(f"weight: expected {c} input channels (one group), got shape {tuple(weight.shape)}")
    if min(cout, kh, kw) < 1:
        raise ValueError(f"weight: sizes must be positive, got shape {tuple(weight.shape)}")
    if kh > h or kw > w:
        raise ValueError(f"x: a {h}x{w} image is smaller than the {kh}x{kw} patch")
    check_param_tensors("patch_conv2d", x, (("weight", weight), ("bias", bias)))
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias: expected shape ({cout},), got {tuple(bias.shape)}")


def patch_conv2d(x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=(kh, kw))`` for weight (Cout, Cin, kh, kw): a
    convolution whose patches do not overlap (no padding, dilation 1, one group).

    CPU float32/float64 inference runs fastvis' kernel (patch gather + one GEMM per tile
    of output pixels, in fastvis' thread pool) and returns a **channels_last** tensor
    whatever x's layout (x may be NCHW, channels_last or any view: the gather reads through
    its strides). Everything else -- gradients needed (grad mode on and an input requiring
    grad), other dtypes, other devices, ``fastvis.use_reference()`` -- runs
    :func:`patch_conv2d_reference` (PyTorch's convolution: cuDNN on CUDA), so training is
    unaffected.
    """
    ac = autocast_dtype(x)
    if ac is not None:  # as F.conv2d under autocast: input and parameters in the autocast dtype
        x, weight, bias = autocast_cast(ac, [x, weight, bias])
    _validate(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if (reference_enabled() or needs_grad or x.device.type != "cpu"
            or x.dtype not in _CORE_DTYPES):
        return patch_conv2d_reference(x, weight, bias)
    return call_op(_pc_fwd, x, weight, bias)
