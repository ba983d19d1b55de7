"""Patch convolution: ``F.conv2d(x, weight, bias, stride=kernel)`` (the "patchify" stems and
downsampling layers of ConvNeXt-style networks), one GEMM in the core, forward only. Other
strides and zero padding make it a general dense convolution computed the same way (patch
gather + GEMM), for the 3x3 stride-2 stems and downsampling layers of UniRepLKNet.

Why an op for a plain convolution: on these 2-core machines PyTorch's convolution runs on
its OpenMP team, whose workers keep spinning for ~10 ms after each parallel op; the fused
fastvis blocks that follow a stem or a downsampling layer then share the cores with them
(measured: ConvNeXt-T at N=1, stage 1 blocks 26 ms instead of 17 ms). Computed in fastvis'
pool, a model's forward pass runs no PyTorch parallel region between its blocks.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import autocast_cast, autocast_dtype, call_op, dl, forward_op, scratch
from ._checks import check_eps, check_param_tensors

_CORE_DTYPES = (torch.float32, torch.float64)


_NORMS = {"none": 0, "before": 1, "after": 2}


@forward_op("fastvis::patch_conv2d")
def _pc_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            stride: List[int], padding: List[int], norm: int, norm_weight: Optional[torch.Tensor],
            norm_bias: Optional[torch.Tensor], norm_eps: float) -> torch.Tensor:
    _sync_threads()
    x = x.detach()
    w = weight.detach()
    if not (w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)):
        w = w.contiguous()  # the core takes either dense layout as it is (no per-call copy)
    b = None if bias is None else bias.detach().contiguous()
    y = torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    nbytes = _C.patch_conv2d_forward_scratch_bytes(dl(x), dl(w), stride, padding)
    nw = None if norm_weight is None else norm_weight.detach().contiguous()
    nb = None if norm_bias is None else norm_bias.detach().contiguous()
    _C.patch_conv2d_forward(dl(x), dl(w), None if b is None else dl(b), dl(y),
                            dl(scratch(nbytes, x.device)), stride, padding, norm, dl(nw), dl(nb),
                            norm_eps)
    return y


def _out_shape(x, weight, stride, padding):
    kh, kw = weight.shape[2], weight.shape[3]
    return (x.shape[0], weight.shape[0], (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1,
            (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1)


@_pc_fwd.register_fake
def _(x, weight, bias, stride, padding, norm, norm_weight, norm_bias, norm_eps):
    return torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _pair(v, name: str, kernel=None) -> List[int]:
    """stride / padding as [h, w] ints; stride None: the kernel size."""
    if v is None and kernel is not None:
        return [int(kernel[0]), int(kernel[1])]
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list)):
        raise TypeError(f"patch_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    vals = [v, v] if isinstance(v, int) else list(v)
    if len(vals) != 2 or any(isinstance(e, bool) or not isinstance(e, int) for e in vals):
        raise TypeError(f"patch_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    return vals


def patch_conv2d_reference(x: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, stride=None,
                           padding: Union[int, Sequence[int]] = 0, *, norm: str = "none",
                           norm_weight: Optional[torch.Tensor] = None,
                           norm_bias: Optional[torch.Tensor] = None,
                           norm_eps: float = 1e-6) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)``, stride defaulting to the kernel size,
    with timm's LayerNorm2d before (``norm="before"``) or after (``"after"``) it."""
    from .layer_norm import layer_norm_channels_reference
    k = (weight.shape[2], weight.shape[3])
    if norm == "before":
        x = layer_norm_channels_reference(x, norm_weight, norm_bias, norm_eps)
    y = F.conv2d(x, weight, bias, stride=tuple(_pair(stride, "stride", k)),
                 padding=tuple(_pair(padding, "padding")))
    if norm == "after":
        y = layer_norm_channels_reference(y, norm_weight, norm_bias, norm_eps)
    return y


def _validate(x, weight, bias, stride, padding) -> None:
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
    if min(stride) < 1:
        raise ValueError(f"patch_conv2d: stride must be positive, got {tuple(stride)}")
    if min(padding) < 0:
        raise ValueError(f"patch_conv2d: padding must be >= 0, got {tuple(padding)}")
    if kh > h + 2 * padding[0] or kw > w + 2 * padding[1]:
        raise ValueError(f"x: a {h}x{w} image (padding {tuple(padding)}) is smaller than the "
                         f"{kh}x{kw} patch")
    check_param_tensors("patch_conv2d", x, (("weight", weight), ("bias", bias)))
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias: expected shape ({cout},), got {tuple(bias.shape)}")


def patch_conv2d(x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, stride=None,
                 padding: Union[int, Sequence[int]] = 0, *, norm: str = "none",
                 norm_weight: Optional[torch.Tensor] = None,
                 norm_bias: Optional[torch.Tensor] = None,
                 norm_eps: float = 1e-6) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` for weight (Cout, Cin, kh, kw), one
    group, dilation 1, zero padding. ``stride`` defaults to the kernel size: a convolution
    whose patches do not overlap (the patchify stems and downsampling layers); any other
    stride / padding (an int or an (h, w) pair) is computed the same way.

    ``norm="before"`` / ``"after"`` fuses a LayerNorm over channels (timm's LayerNorm2d,
    affine ``norm_weight`` / ``norm_bias`` optional, epsilon ``norm_eps``) before the
    convolution (each input pixel's Cin values; ConvNeXt's downsampling layers) or after
    it (each output pixel's Cout values; ConvNeXt's stem): one pass instead of a separate
    LayerNorm over the whole activation.

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
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        st = _pair(stride, "stride", (weight.shape[2], weight.shape[3]))
    else:
        st = [1, 1]  # _validate reports the weight
    pad = _pair(padding, "padding")
    _validate(x, weight, bias, st, pad)
    if norm not in _NORMS:
        raise ValueError(f"patch_conv2d: norm must be 'none', 'before' or 'after', got {norm!r}")
    nw, nb = norm_weight, norm_bias
    if norm == "none":
        if nw is not None or nb is not None:
            raise ValueError("patch_conv2d: norm_weight / norm_bias given with norm='none'")
    else:
        if ac is not None:
            nw, nb = autocast_cast(ac, [nw, nb])
        n = x.shape[1] if norm == "before" else weight.shape[0]
        for name, t in (("norm_weight", nw), ("norm_bias", nb)):
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(f"{name}: expected shape ({n},) ({'input' if norm == 'before' else 'output'} "
                                 f"channels), got {tuple(t.shape)}")
        check_param_tensors("patch_conv2d", x, (("norm_weight", nw), ("norm_bias", nb)))
        norm_eps = check_eps(norm_eps, "norm_eps")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, nw, nb))
    if (reference_enabled() or needs_grad or x.device.type != "cpu"
            or x.dtype not in _CORE_DTYPES):
        return patch_conv2d_reference(x, weight, bias, st, pad, norm=norm, norm_weight=nw,
                                      norm_bias=nb, norm_eps=norm_eps)
    return call_op(_pc_fwd, x, weight, bias, st, pad, _NORMS[norm], nw, nb, float(norm_eps))
