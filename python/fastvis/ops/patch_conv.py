"""Patch convolution: ``F.conv2d(x, weight, bias, stride=kernel)`` (the "patchify" stems and
downsampling layers of ConvNeXt-style networks), one GEMM in the core. Other strides and
zero padding make it a general dense convolution computed the same way (patch gather +
GEMM), for the 3x3 stride-2 stems and downsampling layers of UniRepLKNet.

Why an op for a plain convolution: inference runs in fastvis' pool with the fused blocks
around it (a LayerNorm before or after it fused in); in training, the weight gradient is
the core's (the patches gathered in chunks, one GEMM per chunk), 1.4-2.6x faster than
PyTorch's oneDNN weight gradient on these layers at N=8, while the forward and the input
gradient stay PyTorch's, which runs them well.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import autocast_cast, autocast_dtype, call_op, dl, forward_op, register_autograd, scratch_arg_sized
from ._checks import check_eps, check_param_tensors

_CORE_DTYPES = (torch.float32, torch.float64)


_NORMS = {"none": 0, "before": 1, "after": 2}


@forward_op("fastvis::patch_conv2d")
def _pc_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            stride: List[int], padding: List[int], norm: int, norm_weight: Optional[torch.Tensor],
            norm_bias: Optional[torch.Tensor], norm_eps: float) -> torch.Tensor:
    _sync_threads()
    x = x.detach()
    w = _dense_weight(weight)
    b = None if bias is None else bias.detach().contiguous()
    y = torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    nbytes = lambda: _C.patch_conv2d_forward_scratch_bytes(dl(x), dl(w), stride, padding)
    nw = None if norm_weight is None else norm_weight.detach().contiguous()
    nb = None if norm_bias is None else norm_bias.detach().contiguous()
    _C.patch_conv2d_forward(dl(x), dl(w), None if b is None else dl(b), dl(y),
                            scratch_arg_sized(x.device, nbytes), stride, padding, norm, dl(nw), dl(nb),
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


def _dense_weight(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    if not (w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)
            or w.permute(2, 3, 1, 0).is_contiguous()):
        w = w.contiguous()  # the core takes the three dense layouts as they are
    return w


# The backward's gradients come in fixed layouts, whatever the inputs' strides (so the fake
# kernel's always match under torch.compile): grad_x channels_last, grad_weight contiguous.
_GX_FORMAT, _GW_FORMAT = torch.channels_last, torch.contiguous_format


# Patches of fewer values (Cin * kh * kw) than this take PyTorch's whole backward: their
# weight-gradient GEMM is too thin to pay for the gather (RGB stems, K = 27 or 48: the core
# measured 1.2-1.4x slower than oneDNN there, N=8).
_CORE_WGRAD_MIN_K = 64


def _core_wgrad_pays(weight: torch.Tensor) -> bool:
    return weight.shape[1] * weight.shape[2] * weight.shape[3] >= _CORE_WGRAD_MIN_K


@forward_op("fastvis::patch_conv2d_backward")
def _pc_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: List[int],
            padding: List[int], need_input: bool, need_weight: bool, need_bias: bool
            ) -> List[torch.Tensor]:
    """[grad_x, grad_weight, grad_bias] (an empty tensor where not needed): the input
    gradient is PyTorch's (aten.convolution_backward, which runs it well), the weight and
    bias gradients the core's (patch gather + GEMM: 1.4-2.6x faster than PyTorch's oneDNN
    weight gradient on UniRepLKNet's 3x3 stride-2 layers, N=8)."""
    _sync_threads()
    x = x.detach()
    w = _dense_weight(weight)
    gy = grad_y.detach().contiguous(memory_format=torch.channels_last)
    empty = x.new_empty(0)
    gx = gw = gb = empty
    if not _core_wgrad_pays(w):  # an RGB stem: all PyTorch's
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, w, [w.shape[0]], stride, padding, [1, 1], False, [0, 0], 1,
            [need_input, need_weight, need_bias])
        return [gx.contiguous(memory_format=_GX_FORMAT) if need_input else x.new_empty(0),
                gw.contiguous(memory_format=_GW_FORMAT) if need_weight else x.new_empty(0),
                gb if need_bias else x.new_empty(0)]
    if need_input:
        gx = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, [1, 1], False,
                                                 [0, 0], 1, [True, False, False])[0]
        gx = gx.contiguous(memory_format=_GX_FORMAT)
    if need_weight or need_bias:
        gw = torch.empty_like(w)  # w's own memory order: the core's (the patches' order)
        gb = torch.empty(w.shape[0], dtype=w.dtype, device=w.device) if need_bias else None
        nbytes = lambda: _C.patch_conv2d_backward_weight_scratch_bytes(dl(x), dl(w), stride, padding)
        _C.patch_conv2d_backward_weight(dl(gy), dl(x), dl(w), dl(gw), dl(gb),
                                        scratch_arg_sized(x.device, nbytes), stride, padding)
        if gb is None:
            gb = x.new_empty(0)
        gw = gw.contiguous(memory_format=_GW_FORMAT) if need_weight else x.new_empty(0)
    return [gx if need_input else x.new_empty(0), gw, gb]


@_pc_bwd.register_fake
def _(grad_y, x, weight, stride, padding, need_input, need_weight, need_bias):
    gx = torch.empty_like(x, memory_format=_GX_FORMAT) if need_input else x.new_empty(0)
    gw = torch.empty_like(weight, memory_format=_GW_FORMAT) if need_weight else weight.new_empty(0)
    gb = weight.new_empty(weight.shape[0]) if need_bias else weight.new_empty(0)
    return [gx, gw, gb]


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, norm, norm_weight, norm_bias, norm_eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (stride, padding)
    ctx.has_bias = bias is not None
    ctx.norm = norm


def _backward(ctx, grad_y):
    if ctx.norm != 0:  # patch_conv2d() runs the reference when a fused norm needs gradients
        raise RuntimeError("fastvis::patch_conv2d: no backward with a fused LayerNorm (norm != 0); "
                           "call fastvis.ops.patch_conv2d, which differentiates that case through "
                           "PyTorch's ops")
    x, weight = ctx.saved_tensors
    stride, padding = ctx.conv_args
    ni = ctx.needs_input_grad
    need_b = ctx.has_bias and ni[2]
    gx, gw, gb = call_op(_pc_bwd, grad_y, x, weight, stride, padding, ni[0], ni[1], need_b)
    return (gx if ni[0] else None, gw if ni[1] else None, gb if need_b else None,
            None, None, None, None, None, None)


register_autograd(_pc_fwd, _backward, _setup_context)


class _TrainConv(torch.autograd.Function):
    """The training path of :func:`patch_conv2d` without a fused norm: PyTorch's forward
    (oneDNN's direct convolution measured 1.2-1.6x faster than the core's gather + GEMM on
    UniRepLKNet's 3x3 stride-2 layers at N=8, 1.1-1.2x on 2x2 patches), and the
    backward op above (PyTorch's input gradient, the core's weight / bias gradients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        # channels_last in, channels_last out (oneDNN follows the input), as the core path
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (stride, padding)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.conv_args
        ni = ctx.needs_input_grad
        need_b = ctx.has_bias and ni[2]
        gx, gw, gb = call_op(_pc_bwd, grad_y, x, weight, stride, padding, ni[0], ni[1], need_b)
        return gx if ni[0] else None, gw if ni[1] else None, gb if need_b else None, None, None


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
    its strides). CPU float32/float64 training (grad mode on and an input requiring grad),
    without a fused norm: PyTorch's forward and input gradient, the core's weight and bias
    gradients (deterministic, thread-count independent), output channels_last too.
    Everything else -- a fused norm with gradients, patches of fewer than 64 values (RGB
    stems, whose weight gradient oneDNN runs faster), other dtypes, other devices,
    ``fastvis.use_reference()`` -- runs :func:`patch_conv2d_reference` (PyTorch's
    convolution: cuDNN on CUDA).
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
    if (reference_enabled() or (needs_grad and (norm != "none" or not _core_wgrad_pays(weight)))
            or x.device.type != "cpu" or x.dtype not in _CORE_DTYPES):
        return patch_conv2d_reference(x, weight, bias, st, pad, norm=norm, norm_weight=nw,
                                      norm_bias=nb, norm_eps=norm_eps)
    if needs_grad:
        return _TrainConv.apply(x, weight, bias, st, pad)
    return call_op(_pc_fwd, x, weight, bias, st, pad, _NORMS[norm], nw, nb, float(norm_eps))
