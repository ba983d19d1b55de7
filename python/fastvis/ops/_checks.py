"""Argument checks and device routing shared by the fastvis ops.

Every op validates in Python, before choosing a path, so the fused kernels, the PyTorch
reference and the fallback devices accept and refuse the same inputs with the same
exceptions (TypeError for types and dtypes, ValueError for shapes, sizes and devices).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Tuple

import torch

from .._reference import warn_fallback_once

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_eps(eps, name: str = "eps") -> float:
    """A positive finite float (a norm's epsilon)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name}: expected a positive float, got {type(eps).__name__}")
    e = float(eps)
    if not (math.isfinite(e) and e > 0.0):
        raise ValueError(f"{name}: expected a positive finite number, got {eps!r}")
    return e


def check_activation(op: str, x, dims_msg: Optional[str] = None) -> int:
    """x must be a 4-D (N, C, H, W) tensor of a dtype its device's backend serves, with at
    least one channel; returns C. ``dims_msg`` replaces the 4-D message's prefix."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        prefix = dims_msg if dims_msg is not None else f"{op}:"
        raise ValueError(f"{prefix} expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    allowed = CUDA_DTYPES if x.device.type == "cuda" else CPU_DTYPES
    if x.dtype not in allowed and x.device.type != "meta":
        names = ", ".join(str(t).replace("torch.", "") for t in allowed)
        hint = " (float16 is CUDA-only)" if x.dtype == torch.float16 else ""
        raise TypeError(
            f"x: the {x.device.type.upper()} backend supports {names}, got "
            f"{str(x.dtype).replace('torch.', '')}{hint}"
        )
    c = x.shape[1]
    if c < 1:
        raise ValueError(f"x: expected at least one channel, got shape {tuple(x.shape)}")
    return c


def check_param_tensors(op: str, x: torch.Tensor, params: Iterable[Tuple[str, object]],
                        optional: bool = True, want: str = "a torch.Tensor",
                        any_dtype: Tuple[str, ...] = ()) -> None:
    """Each named parameter must be a tensor (or None when ``optional``) on x's device, with
    x's dtype unless its name is in ``any_dtype``. ``want`` names the expected value in the
    type error."""
    for name, t in params:
        if t is None and optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {want}{' or None' if optional else ''}, "
                            f"got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but x is on {x.device}; "
                "all tensors must be on the same device"
            )
        if t.dtype != x.dtype and name not in any_dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the input's), got {t.dtype}")


def check_channel_params(op: str, x: torch.Tensor, params: Iterable[Tuple[str, object]],
                         optional: bool) -> None:
    """Each named parameter must be a (C,) tensor with x's dtype and device (or None when
    ``optional``)."""
    c = x.shape[1]
    params = list(params)
    check_param_tensors(op, x, params, optional,
                        want="a torch.Tensor" if optional else f"a torch.Tensor of shape ({c},)")
    for name, t in params:
        if t is None and optional:
            continue
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name}: expected shape ({c},) (one value per channel), got {tuple(t.shape)}")


def cpu_core_serves(op: str, x: torch.Tensor) -> bool:
    """For ops with CPU kernels only: True on the CPU; elsewhere warns once (except on the
    meta device, where the reference only propagates shapes) and returns False, so the
    caller runs the PyTorch reference."""
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        warn_fallback_once(
            f"{op}-cuda",
            f"fastvis.ops.{op}: no fastvis CUDA kernels for this op yet; "
            "running the PyTorch reference on CUDA tensors",
        )
        return False
    if x.device.type != "meta":
        warn_fallback_once(
            f"{op}-{x.device.type}",
            f"fastvis.ops.{op}: no fastvis kernels for device '{x.device.type}'; "
            "running the PyTorch reference",
        )
    return False
