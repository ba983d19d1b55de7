"""MetaNeXt (InceptionNeXt) block pieces with timm's names: ``ConvMlp``, ``MetaNeXtBlock``.

timm's ``MetaNeXtBlock`` computes

    x + drop_path(gamma * fc2(GELU(fc1(BatchNorm(token_mixer(x))))))

with 1x1-convolution ``fc1`` / ``fc2`` (``ConvMlp``; its ``norm`` is an Identity and its
dropout 0 in MetaNeXt) and the Inception depthwise token mixer
(:class:`fastvis.nn.InceptionDWConv2d`). The keys are timm's: ``token_mixer.*``,
``norm.{weight,bias,running_mean,running_var,num_batches_tracked}``,
``mlp.fc1.{weight,bias}`` (hidden, C, 1, 1), ``mlp.fc2.{weight,bias}`` (C, hidden, 1, 1),
``gamma`` (C,) unless ``ls_init_value`` is None / 0.

What fastvis does differently (same results):

* the token mixer runs on fastvis' depthwise kernels;
* the MLP runs as ``F.linear`` on the NHWC view of a channels_last activation (the 1x1
  convolutions are matrix products over channels; no layout change);
* in eval mode (running statistics) the BatchNorm is folded into fc1 and the layer scale
  into fc2: with ``s = w / sqrt(running_var + eps)`` and ``t = b - running_mean * s``,
  ``fc1(BN(z)) = (W1 diag(s)) z + (b1 + W1 t)``, and ``gamma * fc2(h) = (gamma W2) h +
  gamma b2``. The folded weights are recomputed from the current parameters and
  statistics on every call (no cache that could go stale; the cost, O(C * hidden), is
  1 / (N H W) of the fc1 product), and autograd reaches the BatchNorm parameters and gamma
  through them. Training mode runs the BatchNorm itself (batch statistics, running-stat
  updates) and multiplies by gamma, as timm does;
* in eval mode with nothing needing gradients (inference), on the CPU, the whole block
  is one :func:`fastvis.ops.metanext_block` call: the fused tile loop (mixer, fc1 with the
  folded BatchNorm, GELU, fc2, layer scale, residual; only the block output is written);
* stochastic depth draws its per-sample factors with
  :func:`fastvis.nn.convnext.drop_path_scale` (timm's draws, and the trainer's hook).
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._reference import reference_enabled
from ..ops._bridge import autocast_dtype
from ..ops.metanext_block import (PreparedMetaNeXtBlock, metanext_block, metanext_block_chain,
                                  metanext_block_prepared)
from ..ops.mlp import core_gemm_wide, mlp, mlp_path
from .convnext import drop_path_scale
from .inception_dwconv import InceptionDWConv2d
from .reparam import cached_fold, inference_only, kmajor, kmajor_fc1

__all__ = ["ConvMlp", "MetaNeXtBlock"]

_Linear = Tuple[torch.Tensor, Optional[torch.Tensor]]


class ConvMlp(nn.Module):
    """timm's ``ConvMlp`` as MetaNeXt builds it: ``fc1`` (1x1 ``nn.Conv2d``) -> GELU (exact)
    -> dropout -> ``fc2`` (1x1 ``nn.Conv2d``); ``norm`` is an Identity (timm's
    ``norm_layer=None``).

    ``forward(x, fc1=None, fc2=None)`` optionally takes replacement ``(weight, bias)`` pairs
    for fc1 / fc2 as (out, in) matrices (the block passes its folded ones)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, bias: bool = True, drop: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=bias, **factory)
        self.norm = nn.Identity()
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features, kernel_size=1, bias=bias, **factory)

    def fc1_matrix(self) -> _Linear:
        return self.fc1.weight.reshape(self.hidden_features, self.in_features), self.fc1.bias

    def fc2_matrix(self) -> _Linear:
        return self.fc2.weight.reshape(self.out_features, self.hidden_features), self.fc2.bias

    def forward(self, x: torch.Tensor, fc1: Optional[_Linear] = None, fc2: Optional[_Linear] = None) -> torch.Tensor:
        w1, b1 = self.fc1_matrix() if fc1 is None else fc1
        w2, b2 = self.fc2_matrix() if fc2 is None else fc2
        h = x.permute(0, 2, 3, 1)  # (N, H, W, C): a dense view when x is channels_last
        if type(self.act) is nn.GELU and (self.drop.p == 0 or not self.training):
            # One fastvis.ops.mlp call: on the CPU the core's tiled MLP, whose autograd
            # keeps fc1's input only (the backward recomputes fc1 tile by tile in cache).
            h = mlp(h, w1, b1, w2, b2, approximate=self.act.approximate)
        else:
            h = F.linear(h, w1, b1)
            h = self.drop(self.act(h))
            h = F.linear(h, w2, b2)
        return h.permute(0, 3, 1, 2)  # logically NCHW, channels_last in memory


def _bn_foldable(bn: nn.BatchNorm2d) -> bool:
    """Eval mode with running statistics: the BatchNorm is a per-channel affine map."""
    return (not bn.training) and bn.running_mean is not None and bn.running_var is not None


def fold_bn_into_linear(bn: nn.BatchNorm2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> _Linear:
    """``(W', b')`` with ``W' z + b' = W BN(z) + b`` for an eval-mode BatchNorm (running
    statistics) before a linear map ``W`` (out, C)."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        s = bn.weight * s
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    w = weight * s.to(weight.dtype)
    b = torch.mv(weight, t.to(weight.dtype))
    if bias is not None:
        b = b + bias
    return w, b


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"MetaNeXtBlock: {name} must be a positive int, got {v!r}")
    return int(v)


class MetaNeXtBlock(nn.Module):
    """timm's ``MetaNeXtBlock`` (InceptionNeXt), same keys.

    Args:
        dim: channels C.
        dilation: passed to the token mixer.
        token_mixer: a module factory called as ``token_mixer(dim, dilation=..., device=...,
            dtype=...)`` (default :class:`fastvis.nn.InceptionDWConv2d`; a
            ``functools.partial`` of it sets kernel sizes / branch ratio, as in timm).
        mlp_ratio: hidden = int(mlp_ratio * dim).
        ls_init_value: initial layer scale; None or 0 for no ``gamma`` (timm's rule).
        drop_path: stochastic-depth probability in [0, 1] (training mode only).
        fold_bn: fold the eval-mode BatchNorm into fc1 (default True; the attribute can be
            switched off for comparisons).

    Parameters keep the constructors' defaults (as timm's block does on its own); the
    model applies timm's initialisation.
    """

    def __init__(self, dim: int, dilation: int = 1, token_mixer: Callable[..., nn.Module] = InceptionDWConv2d,
                 mlp_ratio: float = 4, ls_init_value: Optional[float] = 1e-6, drop_path: float = 0.0,
                 fold_bn: bool = True, device=None, dtype=None):
        super().__init__()
        dim = _check_positive_int("dim", dim)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0:
            raise ValueError(f"MetaNeXtBlock: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        hidden = int(mlp_ratio * dim)
        if hidden < 1:
            raise ValueError(f"MetaNeXtBlock: int(mlp_ratio * dim) must be at least 1, got {mlp_ratio} * {dim}")
        if isinstance(drop_path, bool) or not isinstance(drop_path, numbers.Real) or not 0.0 <= drop_path <= 1.0:
            raise ValueError(f"MetaNeXtBlock: drop_path must be a probability in [0, 1], got {drop_path!r}")
        if ls_init_value is not None and (isinstance(ls_init_value, bool) or not isinstance(ls_init_value, numbers.Real)):
            raise TypeError(f"MetaNeXtBlock: ls_init_value must be a number or None, got {ls_init_value!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden = dim, hidden
        self.drop_path = float(drop_path)
        self.fold_bn = bool(fold_bn)
        self.token_mixer = token_mixer(dim, dilation=dilation, **factory)
        self.norm = nn.BatchNorm2d(dim, **factory)
        self.mlp = ConvMlp(dim, hidden, **factory)
        if ls_init_value:
            self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value), **factory))
        else:
            self.gamma = None

    def _fused_inference(self, x: torch.Tensor) -> bool:
        """Eval mode, the Inception mixer, CPU, nothing needing gradients: the whole block
        is one fastvis.ops.metanext_block call (the fused tile loop)."""
        if not (self.fold_bn and _bn_foldable(self.norm)) or reference_enabled():
            return False
        if type(self.token_mixer) is not InceptionDWConv2d or x.device.type != "cpu":
            return False
        if torch.compiler.is_compiling():  # as inference_only: the fold cache is not traceable
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        # Where the fused block's products would run narrower kernels than the CPU has (no
        # own AVX-512 GEMM, the BLAS on AVX2 code: fastvis.ops.mlp.core_gemm_wide) and
        # fastvis.ops.mlp takes oneDNN's products for this shape, the block runs unfused:
        # the core's mixer, then that MLP. InceptionNeXt-T's blocks on a Zen 5 with OpenBLAS'
        # Haswell kernels: 1.5-1.7x faster than fused where the MLP takes oneDNN, 0.5x at
        # N=8 56x56 where it does not (bench/README.md, session 27). With the own GEMM the
        # fused blocks are faster at every stage.
        if not core_gemm_wide() and mlp_path(
                x.permute(0, 2, 3, 1), self.mlp.fc1_matrix()[0], self.mlp.fc2_matrix()[0]) == "onednn":
            return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_inference(x):
            tm = self.token_mixer
            # The folded fc1, cached until a parameter or buffer changes: no torch op runs
            # between the fused blocks (a torch op wakes its OpenMP team, which then spins
            # on the cores fastvis' pool is about to use).
            # fc2's weight k-major (kmajor: the fused forward's fastest fc2 GEMM).
            # The op's arguments are checked once with the fold (PreparedMetaNeXtBlock).
            if autocast_dtype(x) is None:
                return metanext_block_prepared(x, self._prepared_for(x))
            w1, b1, w2 = cached_fold(self, x.dtype, lambda: (  # autocast
                *self._fc1_folded(), kmajor(self.mlp.fc2_matrix()[0])), slot="_autocast")
            b2 = self.mlp.fc2.bias
            return metanext_block(x, tm.dwconv_hw.weight, tm.dwconv_hw.bias, tm.dwconv_w.weight,
                                  tm.dwconv_w.bias, tm.dwconv_h.weight, tm.dwconv_h.bias,
                                  w1, b1, w2, b2, self.gamma, None, tm.dilation)
        shortcut = x
        x = self.token_mixer(x)
        if self.fold_bn and _bn_foldable(self.norm):
            # Eval: BatchNorm folded into fc1 and the layer scale into fc2, so the rest of
            # the block is GEMM, GELU, GEMM, residual.
            def fold():
                return fold_bn_into_linear(self.norm, *self.mlp.fc1_matrix()), self._fc2_scaled()
            # In inference the folds are cached as the fused path's (one fold a block per
            # parameter change, not per call: 4 of 39 ms of a batch-1 InceptionNeXt-T).
            fc1, fc2 = cached_fold(self, x.dtype, fold, slot="_unfused") if inference_only(self, x) else fold()
            y = self.mlp(x, fc1=fc1, fc2=fc2)
        else:
            # Training: the BatchNorm itself (batch statistics, running-stat updates); the
            # layer scale multiplies the output, as in timm (folding it into fc2 would make
            # autograd keep a scaled copy of every fc2 weight for the backward).
            y = self.mlp(self.norm(x))
            if self.gamma is not None:
                y = y * self.gamma.view(1, -1, 1, 1)
        scale = drop_path_scale(y, self.drop_path, self.training)
        if scale is not None:
            y = y * scale.view(-1, 1, 1, 1)
        return shortcut + y

    def _prepared_for(self, x: torch.Tensor) -> PreparedMetaNeXtBlock:
        """The fused call's arguments, the BatchNorm folded into fc1, fc2's weight k-major,
        checked once and cached until a parameter or buffer changes."""
        tm = self.token_mixer
        return cached_fold(self, x.dtype, lambda: PreparedMetaNeXtBlock(
            x, tm.dwconv_hw.weight, tm.dwconv_hw.bias, tm.dwconv_w.weight, tm.dwconv_w.bias,
            tm.dwconv_h.weight, tm.dwconv_h.bias, *self._fc1_folded(),
            kmajor(self.mlp.fc2_matrix()[0]), self.mlp.fc2.bias, self.gamma, tm.dilation))

    def _fc1_folded(self) -> _Linear:
        """fc1 with the BatchNorm folded in, its weight as the fused kernel multiplies it
        fastest (kmajor_fc1)."""
        w1, b1 = fold_bn_into_linear(self.norm, *self.mlp.fc1_matrix())
        return kmajor_fc1(w1), b1

    def _fc2_scaled(self) -> Optional[_Linear]:
        """fc2 with the layer scale folded in, ``(gamma W2, gamma b2)``; None without gamma."""
        if self.gamma is None:
            return None
        w2, b2 = self.mlp.fc2_matrix()
        g = self.gamma.to(w2.dtype)
        return w2 * g[:, None], None if b2 is None else b2 * g

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, layer_scale={self.gamma is not None}, "
                f"drop_path={self.drop_path:g}, fold_bn={self.fold_bn}")


def run_blocks(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``blocks(x)``; in eval inference (each block's fused path applies, see
    :class:`MetaNeXtBlock`) a run of MetaNeXt blocks with no forward hook on them is one core
    call (:func:`fastvis.ops.metanext_block.metanext_block_chain`, the same bits as block
    after block), as :func:`fastvis.nn.convnext.run_blocks` for ConvNeXt blocks."""
    from .convnext import _global_forward_hooks, _hooked
    mods = list(blocks._modules.values())
    if (len(mods) > 1 and not _hooked(blocks) and autocast_dtype(x) is None
            and all(type(b) is MetaNeXtBlock and not _hooked(b) and b._fused_inference(x) for b in mods)
            and not _global_forward_hooks()):
        return metanext_block_chain(x, [b._prepared_for(x) for b in mods])
    return blocks(x)
