"""Structural re-parameterisation helpers shared by the re-parameterisable modules.

* :func:`fuse_conv_bn`: a convolution (weight, optional bias) followed by an eval-mode
  ``BatchNorm2d`` as one convolution with bias: ``w' = w * g / s``,
  ``b' = beta + (b - mean) * g / s`` with ``s = sqrt(running_var + eps)``, ``g`` the BN
  weight (per output channel).
* :func:`dilate_kernel`: a kernel of size k applied at dilation r as the equivalent
  undilated kernel of size ``r * (k - 1) + 1`` (the taps r apart, zeros between).
* :func:`pad_kernel_to`: a smaller odd kernel zero-padded, centred, to a larger odd size
  (a "same"-padded convolution with the small kernel equals one with the padded kernel).
* :class:`Reparameterizable`: the marker of modules that :func:`fastvis.reparameterize`
  switches to their deploy form (each implements an idempotent ``reparameterize()``).

All arithmetic is done in float64 and cast back to the parameter's dtype, so a merged
float32 model differs from the training form by float32 rounding of the result only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["Reparameterizable", "reparameterize", "fuse_conv_bn", "bn_scale_shift", "dilate_kernel", "pad_kernel_to"]


class Reparameterizable:
    """Mixin marking a module with a training form (branches, BatchNorms) and a deploy
    form. ``reparameterize()`` converts the module in place (a no-op when it is already in
    its deploy form) and ``deploy`` says which form it is in."""

    deploy: bool

    def reparameterize(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@torch.no_grad()
def bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float64, with ``bn(x) == x * scale + shift`` per channel in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fuse: the BatchNorm has no running statistics (track_running_stats=False)")
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean.double() * scale


@torch.no_grad()
def fuse_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor],
                 bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the convolution equal to ``bn(conv(x))`` in eval mode, in float64.
    ``weight`` has the output channels first (any trailing shape, e.g. a Linear's)."""
    scale, shift = bn_scale_shift(bn)
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else shift + bias.double() * scale
    return w, b


def dilate_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """(..., k, k) kernel at dilation r -> the equivalent (..., r(k-1)+1, r(k-1)+1) kernel."""
    if dilation == 1:
        return kernel
    kh, kw = kernel.shape[-2:]
    out = kernel.new_zeros(*kernel.shape[:-2], dilation * (kh - 1) + 1, dilation * (kw - 1) + 1)
    out[..., ::dilation, ::dilation] = kernel
    return out


def pad_kernel_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pads an odd (..., k, k) kernel to (..., size, size), centred."""
    k = kernel.shape[-1]
    if kernel.shape[-2] != k or k % 2 == 0 or size % 2 == 0 or k > size:
        raise ValueError(f"pad_kernel_to: expected an odd square kernel of size <= {size}, "
                         f"got {tuple(kernel.shape[-2:])}")
    p = (size - k) // 2
    return nn.functional.pad(kernel, [p, p, p, p])


def reparameterize(model: nn.Module) -> nn.Module:
    """Switches every re-parameterisable part of ``model`` to its deploy form, in place, and
    returns ``model``.

    Walks the module tree and calls ``reparameterize()`` on each
    :class:`Reparameterizable` module (fastvis' UniRepLKNet / RepLKNet models, blocks,
    Dilated Reparam Blocks, large-kernel convolutions): dilated and small-kernel branches
    are merged into the large kernel, BatchNorms fused into the adjacent convolution /
    linear layer as the official deploy forms do. The result equals the training form in
    **eval mode** (the BatchNorms' running statistics are fused; a model in training mode
    would have used batch statistics). The model's train/eval mode is left as it was.
    Models without such parts (ConvNeXt, any plain ``nn.Module``) are returned unchanged.
    Calling it again is a no-op."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize: expected an nn.Module, got {type(model).__name__}")
    for m in list(model.modules()):
        if isinstance(m, Reparameterizable):
            m.reparameterize()
    return model


def _state_tensors(module: nn.Module) -> list:
    """Every parameter and buffer of module and its submodules (what parameters() and
    buffers() yield, shared ones possibly twice), from the modules' own dicts: about half
    the time of the two generators (25 against 46 us for a MetaNeXt block), which the
    fused blocks' cache key costs on every call."""
    # Plain loops: 3x faster than the same walk with generator expressions (7.6 against
    # 21 us for a MetaNeXt block).
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        for t in m._parameters.values():
            if t is not None:
                out.append(t)
        for t in m._buffers.values():
            if t is not None:
                out.append(t)
        for c in m._modules.values():
            if c is not None:
                stack.append(c)
    return out


def cached_fold(module: nn.Module, dtype: torch.dtype, compute, slot: str = ""):
    """``compute()`` (folded eval-form parameters of ``module``, any object), cached on the
    module until one of its parameters or buffers changes (storage or in-place version) or
    another dtype is asked for. For the fused inference paths, which fold BatchNorms into
    neighbouring weights on the fly instead of mutating the module. A module caching two
    kinds of value names each one's ``slot``."""
    key = (dtype, *[(t.data_ptr(), t._version) for t in _state_tensors(module)])
    name = "_fastvis_fold_cache" + slot
    cached = module.__dict__.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        value = compute()
    module.__dict__[name] = (key, value)
    return value


def kmajor(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) matrix with the same values stored k-major (strides ``(1, out)``): what
    the fused blocks' fc2 multiplies fastest (the forward's tile GEMM then runs without
    transposing the weight; measured 1.05-1.85x on the tile shapes, most at small row
    counts). For the eval-form caches (``cached_fold``), not for parameters."""
    return weight.detach().t().contiguous().t()


def kmajor_fc1(weight: torch.Tensor) -> torch.Tensor:
    """fc1's (hidden, C) weight for the eval-form caches: k-major (:func:`kmajor`) where the
    core's own AVX-512 gemm(N, N) runs (``fastvis._C.own_gemm_active()``; fc1's product then
    needs no transposed operand, which would go to the BLAS), else as it is. Either form
    gives the same results; this only picks the faster product."""
    from .. import _C
    return kmajor(weight) if _C.own_gemm_active() else weight.detach()


def kmajor_conv(weight: torch.Tensor) -> torch.Tensor:
    """A (Cout, Cin, kh, kw) convolution weight with the same values stored k-major,
    (kh, kw, Cin, Cout) in memory: for :func:`fastvis.ops.patch_conv2d` a (K x Cout)
    row-major GEMM operand, which MKL multiplies 1.0-3x faster than the (Cout x K) one on
    the stems' and downsampling layers' tiles (most for the narrow column blocks of small
    images). For the eval-form caches (``cached_fold``), not for parameters."""
    return weight.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def inference_only(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module`` runs in eval mode on a CPU tensor with nothing needing gradients
    and the reference mode off: the condition for the fused inference paths."""
    from .._reference import reference_enabled
    if module.training or reference_enabled() or not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        # torch.compile traces the module path instead: the fold caches key on data
        # pointers and versions, which Dynamo cannot trace (fullgraph=True failed).
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())))


def foldable_batch_norm(bn: nn.Module) -> bool:
    """True for a plain affine nn.BatchNorm2d (what :func:`scaled_batch_norm` reproduces)."""
    return type(bn) is nn.BatchNorm2d and bn.affine


def scaled_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale.view(1, -1, 1, 1) * bn(x)`` as one ``F.batch_norm`` with the affine parameters
    scaled by ``scale`` (C,): the same normalisation, running-statistics update and
    bookkeeping as ``nn.BatchNorm2d.forward`` (``num_batches_tracked``, a None momentum,
    ``track_running_stats=False``), without a second pass over the activation. Gradients
    reach ``bn.weight``, ``bn.bias`` and ``scale`` through the products."""
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if keep else None, bn.running_var if keep else None,
                        bn.weight * scale, bn.bias * scale, use_batch, factor, bn.eps)


def branches_forward(x: torch.Tensor, pairs) -> torch.Tensor:
    """``sum_b bn_b(conv_b(x))`` over (depthwise conv, BatchNorm2d) pairs: the training form
    of UniRepLKNet's dilated re-param block and RepLKNet's large kernel. Runs as one
    :func:`fastvis.ops.dilated_reparam_conv` (statistics pass + one merged-kernel conv in
    training, one merged conv in eval) when the modules allow it: square odd depthwise
    kernels without bias at stride 1 with "same" padding, affine BatchNorms tracking running
    statistics with one eps, one momentum and one batch count (nn.BatchNorm2d's bookkeeping,
    ``num_batches_tracked`` and a None momentum, is reproduced). Otherwise the modules run."""
    from ..ops.dilated_reparam import dilated_reparam_conv
    from .depthwise_conv import DepthwiseConv2d
    convs = [c for c, _ in pairs]
    bns = [b for _, b in pairs]
    ok = all(isinstance(c, DepthwiseConv2d) and c.bias is None and c.stride == (1, 1)
             and c.kernel_size[0] == c.kernel_size[1] and c.kernel_size[0] % 2 == 1
             and c.dilation[0] == c.dilation[1]
             and tuple(c._pads) == (c.dilation[0] * (c.kernel_size[0] - 1) // 2,) * 4
             for c in convs)
    ok = ok and all(type(b) is nn.BatchNorm2d and b.affine and b.track_running_stats
                    and b.running_mean is not None for b in bns)
    ok = ok and len({b.eps for b in bns}) == 1 and len({b.momentum for b in bns}) == 1
    ok = ok and len({b.training for b in bns}) == 1 and len({int(b.num_batches_tracked) for b in bns}) == 1
    if not ok:
        out = bns[0](convs[0](x))
        for c, b in pairs[1:]:
            out = out + b(c(x))
        return out
    bn0 = bns[0]
    training = bn0.training
    momentum = bn0.momentum
    if training:
        for b in bns:
            b.num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(bn0.num_batches_tracked)
    return dilated_reparam_conv(
        x, [c.weight for c in convs], [c.dilation[0] for c in convs], [b.weight for b in bns],
        [b.bias for b in bns], [b.running_mean for b in bns], [b.running_var for b in bns],
        training, momentum if momentum is not None else 0.0, bn0.eps)
