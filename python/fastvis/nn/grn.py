"""``fastvis.nn.GlobalResponseNorm``: timm's ``GlobalResponseNorm`` (ConvNeXt-V2) on
fastvis kernels."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.grn import global_response_norm


class GlobalResponseNorm(nn.Module):
    """Global Response Normalization, as ``timm.layers.GlobalResponseNorm``.

    Args:
        dim: the number of channels C.
        eps: added to the mean of the per-channel L2 norms.
        channels_last: as in timm (and with its default, True), the layout of the *tensor*: ``False`` for (N, C, H, W)
            inputs (either memory format), ``True`` for (N, H, W, C) inputs such as the
            activations of ConvNeXt-V2's MLP. An (N, H, W, C) input is handed to the op as
            the zero-copy (N, C, H, W) view ``x.permute(0, 3, 1, 2)``; the output has the
            input's shape.

    Parameters ``weight`` and ``bias`` of shape (dim,), initialised to zero like timm's
    (the layer starts as the identity). State dicts of timm versions that store them as
    (1, 1, 1, dim) or (1, dim, 1, 1) load too (reshaped to (dim,)).
    """

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True, device=None,
                 dtype=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"GlobalResponseNorm: dim must be a positive int, got {dim!r}")
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.channels_last = bool(channels_last)
        self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return global_response_norm(x, self.weight, self.bias, self.eps)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"GlobalResponseNorm(channels_last=True): expected a 4-D (N, H, W, C) input, got {shape}")
        y = global_response_norm(x.permute(0, 3, 1, 2), self.weight, self.bias, self.eps)
        return y.permute(0, 2, 3, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # timm versions differ in the parameters' shape: (dim,), or 4-D broadcast shapes.
        for name in ("weight", "bias"):
            key = prefix + name
            t = state_dict.get(key)
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape in (
                    (1, 1, 1, self.dim), (1, self.dim, 1, 1)):
                state_dict[key] = t.reshape(self.dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, channels_last={self.channels_last}"
