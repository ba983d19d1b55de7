"""Shared plumbing between torch tensors and the core: scratch, streams, layouts."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x (4-D) is dense in channels_last (NHWC) order: the core's native layout."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def dense_for_core(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is NHWC- or NCHW-dense (zero copy), else a contiguous copy."""
    if x.dim() != 4 or is_channels_last(x) or x.is_contiguous():
        return x
    return x.contiguous()


def like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t in ref's memory format (channels_last if ref is channels_last-dense)."""
    fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def empty_like_layout(shape, ref: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
    return torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=fmt)


def scratch(nbytes: int, device: torch.device) -> torch.Tensor:
    """Scratch memory from torch's (caching) allocator."""
    return torch.empty(max(int(nbytes), 0), dtype=torch.uint8, device=device)


def stream_of(x: torch.Tensor) -> int:
    if x.device.type == "cuda":
        return torch.cuda.current_stream(x.device).cuda_stream
    return 0
