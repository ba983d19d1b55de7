"""``fastvis.nn.ConvNeXtBlock``: timm's ConvNeXt / ConvNeXt-V2 block on the fused op.

The block's submodules only *hold* parameters, under the names and in the shapes timm
uses, so ``load_state_dict`` of a timm ``ConvNeXtBlock`` (or a whole timm ConvNeXt) works
strictly. ``forward`` never calls them: it hands every tensor to
:func:`fastvis.ops.convnext_block`, which computes

    x + drop_scale * gamma * fc2(GRN?(GELU(fc1(LayerNorm_C(dwconv(x))))))

in one pass (and, for training, its autograd).

Two storage forms, as in timm (``conv_mlp``):

* ``conv_mlp=False`` (timm's default, ConvNeXt-T and larger): ``mlp.fc1`` / ``mlp.fc2`` are
  ``nn.Linear`` (weights (hidden, C) and (C, hidden)).
* ``conv_mlp=True`` (timm's atto / femto / pico / nano): they are 1x1 ``nn.Conv2d``
  (weights (hidden, C, 1, 1) and (C, hidden, 1, 1)); the block passes (hidden, C) /
  (C, hidden) views of them to the op, so gradients flow back to the stored tensors.

The computation is the same in both forms (timm's two forms are mathematically equal);
only the stored shapes differ.
"""
from __future__ import annotations

import contextlib
import numbers
import threading
from typing import Callable, Optional

import torch
from torch import nn

from ..ops._bridge import autocast_dtype
from ..ops.convnext_block import (PreparedConvNeXtBlock, convnext_block, convnext_block_chain,
                                 convnext_block_prepared)
from .depthwise_conv import DepthwiseConv2d
from .layer_norm import LayerNorm2d
from .reparam import cached_fold, inference_only, kmajor, kmajor_fc1

from .grn import GlobalResponseNorm  # the GRN module; the block passes its parameters to the fused op

__all__ = ["ConvNeXtBlock", "ConvNeXtMlp", "drop_path_scale", "drop_path_source", "trunc_normal_02_"]


@torch.no_grad()
def trunc_normal_02_(t: torch.Tensor) -> torch.Tensor:
    """timm's ConvNeXt weight init, ``trunc_normal_(t, std=0.02)`` (bounds +-2), drawn as
    ``normal_(0, 0.02)`` clamped to +-2: the bounds sit 100 standard deviations out, so
    the two distributions are the same, and this is several times faster than the
    inverse-CDF sampling of ``nn.init.trunc_normal_`` (seconds for the large models)."""
    return t.normal_(0.0, 0.02).clamp_(-2.0, 2.0)


_drop_path_local = threading.local()


@contextlib.contextmanager
def drop_path_source(source: Optional[Callable[[int, float], torch.Tensor]]):
    """Within the context (in this thread), :func:`drop_path_scale` takes its keep/drop
    decisions from ``source(n, keep)``, an (n,) tensor of 0s and 1s, instead of drawing them
    from the global torch RNG. The trainer uses it to key each image's draws to its place
    in the global batch, so a distributed run drops the same paths as a single process."""
    prev = getattr(_drop_path_local, "source", None)
    _drop_path_local.source = source
    try:
        yield
    finally:
        _drop_path_local.source = prev


def drop_path_scale(x: torch.Tensor, drop_prob: float, training: bool) -> Optional[torch.Tensor]:
    """Per-sample stochastic-depth factors for a batch ``x`` (timm's ``DropPath`` with
    ``scale_by_keep=True``): ``None`` when nothing is dropped (eval mode or
    ``drop_prob == 0``), else an (N,) tensor of x's dtype and device holding
    Bernoulli(keep)/keep, keep = 1 - drop_prob (all zeros when drop_prob == 1).

    The draw is ``x.new_empty(N).bernoulli_(keep)``: the same random numbers, in the same
    order, as timm's ``drop_path`` draws for its (N, 1, 1, 1) mask."""
    if not training or drop_prob == 0.0:
        return None
    keep = 1.0 - drop_prob
    source = getattr(_drop_path_local, "source", None)
    if source is not None:
        scale = source(x.shape[0], keep).to(device=x.device, dtype=x.dtype)
    else:
        scale = x.new_empty(x.shape[0]).bernoulli_(keep)
    if keep > 0.0:
        scale.div_(keep)
    return scale


class ConvNeXtMlp(nn.Module):
    """Parameter holder of the block's MLP with timm's names: ``fc1``, ``grn`` (V2 only),
    ``fc2``. ``nn.Linear`` layers when ``use_conv`` is False, 1x1 ``nn.Conv2d`` otherwise
    (timm's ``Mlp`` / ``GlobalResponseNormMlp`` with ``use_conv``). Not callable: the
    block passes its tensors to the fused op."""

    def __init__(self, in_features: int, hidden_features: int, use_conv: bool = False,
                 use_grn: bool = False, grn_eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.use_conv = use_conv
        if use_conv:
            self.fc1 = nn.Conv2d(in_features, hidden_features, 1, **factory)
        else:
            self.fc1 = nn.Linear(in_features, hidden_features, **factory)
        self.grn = GlobalResponseNorm(hidden_features, eps=grn_eps, **factory) if use_grn else None
        if use_conv:
            self.fc2 = nn.Conv2d(hidden_features, in_features, 1, **factory)
        else:
            self.fc2 = nn.Linear(hidden_features, in_features, **factory)

    def forward(self, x):  # pragma: no cover - a holder, see the class docstring
        raise RuntimeError("ConvNeXtMlp only holds parameters; call the ConvNeXtBlock that owns it")


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"ConvNeXtBlock: {name} must be a positive int, got {v!r}")
    return int(v)


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt (V1, or V2 with ``use_grn``) block with timm's state-dict keys.

    Keys (timm's ``ConvNeXtBlock``): ``conv_dw.{weight,bias}`` (C, 1, k, k) / (C,),
    ``norm.{weight,bias}`` (C,), ``mlp.fc1.{weight,bias}``, ``mlp.grn.{weight,bias}``
    (hidden,) for V2, ``mlp.fc2.{weight,bias}``, ``gamma`` (C,) iff ``ls_init_value`` is
    not None.

    Args:
        in_chs: channels C (the block keeps them: ``out_chs`` may only repeat C).
        kernel_size: odd depthwise kernel size, 1..31 (default 7), "same" padding, stride 1.
        mlp_ratio: hidden = int(mlp_ratio * C).
        conv_mlp: store fc1/fc2 as 1x1 convolutions (timm's atto..nano form) instead of
            ``nn.Linear``; the computation is identical.
        conv_bias: bias of the depthwise convolution.
        use_grn: ConvNeXt-V2 Global Response Normalization after GELU.
        ls_init_value: initial layer scale; None disables ``gamma``.
        drop_path: stochastic-depth probability in [0, 1] (training mode only).
        norm_eps, grn_eps: the LayerNorm and GRN epsilons (timm: 1e-6 both).
        approximate: GELU form, ``"none"`` (exact erf, timm's ``nn.GELU``) or ``"tanh"``.

    Initialisation follows timm's ConvNeXt (``_init_weights``): convolution and linear
    weights truncated normal (std 0.02, :func:`trunc_normal_02_`), their biases zero,
    LayerNorm ones/zeros, GRN zeros, ``gamma = ls_init_value``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: Optional[int] = None,
        kernel_size: int = 7,
        mlp_ratio: float = 4,
        conv_mlp: bool = False,
        conv_bias: bool = True,
        use_grn: bool = False,
        ls_init_value: Optional[float] = 1e-6,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        grn_eps: float = 1e-6,
        approximate: str = "none",
        device=None,
        dtype=None,
    ):
        super().__init__()
        in_chs = _check_positive_int("in_chs", in_chs)
        if out_chs is not None and out_chs != in_chs:
            raise ValueError(
                f"ConvNeXtBlock: out_chs={out_chs!r} differs from in_chs={in_chs}; the fused block "
                "keeps the channel count (timm's shortcut projection is not supported)")
        kernel_size = _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0 or kernel_size > 31:
            raise ValueError(f"ConvNeXtBlock: kernel_size must be odd and at most 31, got {kernel_size}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0:
            raise ValueError(f"ConvNeXtBlock: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        hidden = int(mlp_ratio * in_chs)
        if hidden < 1:
            raise ValueError(f"ConvNeXtBlock: mlp_ratio * in_chs must be at least 1, got {mlp_ratio} * {in_chs}")
        if isinstance(drop_path, bool) or not isinstance(drop_path, numbers.Real) or not 0.0 <= drop_path <= 1.0:
            raise ValueError(f"ConvNeXtBlock: drop_path must be a probability in [0, 1], got {drop_path!r}")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"ConvNeXtBlock: approximate must be 'none' or 'tanh', got {approximate!r}")
        if ls_init_value is not None and (isinstance(ls_init_value, bool) or not isinstance(ls_init_value, numbers.Real)):
            raise TypeError(f"ConvNeXtBlock: ls_init_value must be a number or None, got {ls_init_value!r}")
        factory = {"device": device, "dtype": dtype}

        self.dim = in_chs
        self.hidden = hidden
        self.kernel_size = kernel_size
        self.use_conv_mlp = bool(conv_mlp)
        self.use_grn = bool(use_grn)
        self.drop_path = float(drop_path)
        self.approximate = approximate
        self.ls_init_value = ls_init_value

        self.conv_dw = DepthwiseConv2d(in_chs, kernel_size, padding="same", bias=conv_bias, **factory)
        self.norm = LayerNorm2d(in_chs, eps=norm_eps, **factory)
        self.mlp = ConvNeXtMlp(in_chs, hidden, use_conv=self.use_conv_mlp, use_grn=self.use_grn,
                               grn_eps=grn_eps, **factory)
        if ls_init_value is not None:
            self.gamma = nn.Parameter(torch.empty(in_chs, **factory))
        else:
            self.gamma = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in (self.conv_dw, self.mlp.fc1, self.mlp.fc2):
            trunc_normal_02_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if self.mlp.grn is not None:
            nn.init.zeros_(self.mlp.grn.weight)
            nn.init.zeros_(self.mlp.grn.bias)
        if self.gamma is not None:
            self.gamma.fill_(self.ls_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        if inference_only(self, x) and autocast_dtype(x) is None:
            # Inference: the op's arguments checked once and cached until a parameter
            # changes, with fc2's weight k-major (kmajor).
            return convnext_block_prepared(x, self._prepared_for(x))
        # (hidden, C) / (C, hidden) views of the conv_mlp form's 1x1 kernels; plain
        # references in the Linear form. Either way autograd reaches the stored tensors.
        fc1_weight = mlp.fc1.weight.reshape(self.hidden, self.dim)
        fc2_weight = mlp.fc2.weight.reshape(self.dim, self.hidden)
        grn = mlp.grn
        return convnext_block(
            x,
            self.conv_dw.weight, self.conv_dw.bias,
            self.norm.weight, self.norm.bias,
            fc1_weight, mlp.fc1.bias,
            fc2_weight, mlp.fc2.bias,
            self.gamma,
            drop_path_scale(x, self.drop_path, self.training),
            self.norm.eps,
            grn_weight=None if grn is None else grn.weight,
            grn_bias=None if grn is None else grn.bias,
            grn_eps=1e-6 if grn is None else grn.eps,
            approximate=self.approximate,
        )

    def _prepared_for(self, x: torch.Tensor) -> PreparedConvNeXtBlock:
        return cached_fold(self, x.dtype, lambda: self._prepared(x))

    def _prepared(self, x: torch.Tensor) -> PreparedConvNeXtBlock:
        mlp, grn = self.mlp, self.mlp.grn
        return PreparedConvNeXtBlock(
            x, self.conv_dw.weight, self.conv_dw.bias, self.norm.weight, self.norm.bias,
            kmajor_fc1(mlp.fc1.weight.reshape(self.hidden, self.dim)), mlp.fc1.bias,
            kmajor(mlp.fc2.weight.reshape(self.dim, self.hidden)), mlp.fc2.bias, self.gamma,
            self.norm.eps,
            grn_weight=None if grn is None else grn.weight,
            grn_bias=None if grn is None else grn.bias,
            grn_eps=1e-6 if grn is None else grn.eps,
            approximate=self.approximate)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, kernel_size={self.kernel_size}, "
            f"conv_mlp={self.use_conv_mlp}, grn={self.use_grn}, layer_scale={self.gamma is not None}, "
            f"drop_path={self.drop_path:g}"
        )


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _global_forward_hooks() -> bool:
    from torch.nn.modules import module as _mod
    return bool(getattr(_mod, "_global_forward_hooks", None) or getattr(_mod, "_global_forward_pre_hooks", None))


def run_blocks(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``blocks(x)``. In eval inference (each block's fused path applies, see
    :class:`ConvNeXtBlock`) a run of ConvNeXt blocks with no forward hook on them goes to
    the core in one call (:func:`fastvis.ops.convnext_block.convnext_block_chain`, the same
    bits as block after block): at batch 1 the Python work between two fused block calls
    was a visible part of the forward."""
    mods = list(blocks._modules.values())
    if (len(mods) > 1 and not _hooked(blocks) and autocast_dtype(x) is None
            and all(type(b) is ConvNeXtBlock and not _hooked(b) and inference_only(b, x) for b in mods)
            and not _global_forward_hooks()):
        return convnext_block_chain(x, [b._prepared_for(x) for b in mods])
    return blocks(x)
