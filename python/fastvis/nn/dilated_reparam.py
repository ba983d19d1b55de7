"""``fastvis.nn.DilatedReparamBlock``: UniRepLKNet's large-kernel depthwise convolution with
parallel dilated small-kernel branches (Ding et al., "UniRepLKNet", CVPR 2024, Sec. 3.2).

Training form: the large depthwise kernel (``lk_origin``, no bias) followed by a BatchNorm
(``origin_bn``), plus, for every (k, r) of the kernel size's table, a depthwise k x k
convolution at dilation r (``dil_conv_k{k}_{r}``, no bias) followed by its own BatchNorm
(``dil_bn_k{k}_{r}``); the outputs are summed. Deploy form: the single large depthwise
convolution ``lk_origin`` with a bias. :meth:`DilatedReparamBlock.reparameterize` turns the
first into the second (each branch's BN fused into its kernel, the dilated kernels expanded
to ``r * (k - 1) + 1`` with zeros between the taps and zero-padded, centred, to the large
size, kernels and biases summed). Parameter names are the official implementation's, so
its training-form and deploy-form state dicts load strictly.

Every convolution is :class:`fastvis.nn.DepthwiseConv2d` (``fastvis.ops.depthwise_conv2d``,
"same" padding, dilation included); the BatchNorms are ``torch.nn.BatchNorm2d``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .depthwise_conv import DepthwiseConv2d
from .reparam import Reparameterizable, branches_forward, dilate_kernel, fuse_conv_bn, pad_kernel_to

__all__ = ["DilatedReparamBlock", "DILATED_BRANCHES"]

#: Large kernel size -> the (kernel size, dilation) of each parallel branch (the paper's
#: default settings, as in the official code). The first branch is always undilated.
DILATED_BRANCHES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}


class DilatedReparamBlock(Reparameterizable, nn.Module):
    """UniRepLKNet's Dilated Reparam Block on (N, C, H, W) inputs (either memory format;
    channels_last is the fast one), stride 1, "same" padding.

    Args:
        channels: C (the convolutions are depthwise).
        kernel_size: the large kernel, one of the keys of :data:`DILATED_BRANCHES`
            (5, 7, 9, 11, 13, 15, 17).
        deploy: build the deploy form (one convolution with bias) directly.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False, device=None, dtype=None):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size not in DILATED_BRANCHES:
            raise ValueError(
                f"DilatedReparamBlock: kernel_size must be one of {sorted(DILATED_BRANCHES)} "
                f"(the sizes with a dilated-branch table), got {kernel_size!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"DilatedReparamBlock: channels must be a positive int, got {channels!r}")
        factory = {"device": device, "dtype": dtype}
        self.channels = channels
        self.kernel_size = kernel_size
        self.branches = DILATED_BRANCHES[kernel_size]
        self.kernel_sizes = [k for k, _ in self.branches]  # the official attribute names
        self.dilates = [r for _, r in self.branches]
        self.deploy = bool(deploy)
        self.lk_origin = DepthwiseConv2d(channels, kernel_size, padding="same", bias=self.deploy, **factory)
        if not self.deploy:
            self.origin_bn = nn.BatchNorm2d(channels, **factory)
            for k, r in self.branches:
                self.add_module(f"dil_conv_k{k}_{r}", DepthwiseConv2d(
                    channels, k, padding="same", dilation=r, bias=False, **factory))
                self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels, **factory))

    def branch_modules(self):
        """[(conv, bn), ...]: the large kernel's pair first, then the dilated branches'."""
        pairs = [(self.lk_origin, self.origin_bn)]
        for k, r in self.branches:
            pairs.append((getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        return self.forward_branches(x)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The training form: every branch is conv then BN, and the branches are summed
        (the one place to swap in a fused multi-branch op)."""
        return branches_forward(x, self.branch_modules())

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight (C, 1, K, K), bias (C,)) of the deploy form, in the parameters' dtype."""
        if self.deploy:
            return self.lk_origin.weight.detach().clone(), self.lk_origin.bias.detach().clone()
        K = self.kernel_size
        weight, bias = fuse_conv_bn(self.lk_origin.weight, None, self.origin_bn)
        for k, r in self.branches:
            w, b = fuse_conv_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, None,
                                getattr(self, f"dil_bn_k{k}_{r}"))
            weight = weight + pad_kernel_to(dilate_kernel(w, r), K)
            bias = bias + b
        dt = self.lk_origin.weight.dtype
        return weight.to(dt), bias.to(dt)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switches to the deploy form in place (no-op if already there). Exact in eval
        mode: the BatchNorms' running statistics are what gets fused."""
        if self.deploy:
            return
        weight, bias = self.get_equivalent_kernel_bias()
        old = self.lk_origin
        merged = DepthwiseConv2d(self.channels, self.kernel_size, padding="same", bias=True,
                                 device=old.weight.device, dtype=old.weight.dtype)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        merged.weight.requires_grad_(old.weight.requires_grad)
        merged.bias.requires_grad_(old.weight.requires_grad)
        self.lk_origin = merged
        del self.origin_bn
        for k, r in self.branches:
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        self.deploy = True

    def extra_repr(self) -> str:
        br = ", ".join(f"k{k}_r{r}" for k, r in self.branches)
        return f"{self.channels}, kernel_size={self.kernel_size}, deploy={self.deploy}, branches=[{br}]"
