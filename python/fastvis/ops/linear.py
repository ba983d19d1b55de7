"""Linear layer: ``F.linear(x, weight, bias)``, with the core's streaming kernel for
inference at small batch.

Why an op for a plain matrix product: a classifier head at batch 1 multiplies one row by a
weight of several MB (InceptionNeXt's MLP head: 7 + 9 MB) that the rest of the network has
pushed out of the caches since the previous image, so the product is a read of the weight
from DRAM. PyTorch's ``F.linear`` (MKL's sgemv on these AMD CPUs) read it at 16-20 GB/s
here; the core's few-rows kernel reads each weight row once as a stream of dot products
over both threads, prefetching the next rows, at ~50 GB/s (the core call alone, cache
cold); through this op 1.3-1.9x ``F.linear``'s speed at batch 1 (``bench/head_linear.py``).

Only that case runs the core: eval-style calls with nothing needing gradients, on the CPU,
float32, at most :data:`FEW_ROWS` rows (the leading dimensions of x multiplied out), where
the core's own AVX-512 kernels are active (``fastvis._C.own_gemm_active()``). Everything
else -- training, more rows, other dtypes or devices, autocast, ``torch.compile``,
``fastvis.use_reference()`` -- is ``F.linear`` itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _C
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import autocast_dtype, dl, eager_direct_ok

# Rows of x up to which the core's kernel runs (core::kFewRows in csrc/core/gemm_kernels.h).
FEW_ROWS = 8


def _core_serves(x, weight, bias) -> bool:
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 1 or weight.dim() != 2:
        return False
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or x.shape[-1] != weight.shape[1]:
        return False
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32
                             or bias.device.type != "cpu" or tuple(bias.shape) != (weight.shape[0],)):
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= FEW_ROWS or weight.shape[0] == 0:
        return False
    if reference_enabled() or autocast_dtype(x) is not None or not _C.own_gemm_active():
        return False
    return eager_direct_ok(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x @ weight.T + bias`` for x (..., K), weight (N, K),
    bias (N,) or None.

    In inference (nothing needing gradients, eager mode) on CPU float32 input of at most
    :data:`FEW_ROWS` rows, with the core's AVX-512 kernels active, the product runs the
    core's few-rows kernel (``fastvis._C.linear_forward``): each output is one dot product
    in a fixed order, the same for any thread count, within float32 rounding of
    ``F.linear``'s. Every other call is ``F.linear`` (gradients, autocast, compile and
    error messages are PyTorch's)."""
    if not _core_serves(x, weight, bias):
        return F.linear(x, weight, bias)
    _sync_threads()
    k, n = weight.shape[1], weight.shape[0]
    x2 = x.detach().reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.detach()
    if w.stride(-1) != 1 and w.shape[1] > 1:
        w = w.contiguous()
    b = None if bias is None else bias.detach()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    _C.linear_forward(dl(x2), dl(w), dl(b), dl(y))
    return y.reshape(*x.shape[:-1], n)
