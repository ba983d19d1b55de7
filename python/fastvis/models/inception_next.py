"""InceptionNeXt (timm's ``MetaNeXt``) with timm's names, keys and conventions, on fastvis kernels.

Every block is a :class:`fastvis.nn.MetaNeXtBlock` whose token mixer is
:class:`fastvis.nn.InceptionDWConv2d` (fastvis depthwise kernels); the stem, the
downsampling layers and the BatchNorms of training mode are plain PyTorch, the head's
linear layers :class:`fastvis.nn.Linear` (the core's streaming kernel at small batch).
Activations are kept channels_last inside.

State-dict layout (timm's ``MetaNeXt``; the official sail-sg checkpoints use the same)::

    stem.0.{weight,bias}                   Conv2d(in_chans, dims[0], 4, stride=4)
    stem.1.*                               BatchNorm2d(dims[0])
    stages.{i}.downsample.0.*              BatchNorm2d(dims[i-1])                  (i > 0)
    stages.{i}.downsample.1.{weight,bias}  Conv2d(dims[i-1], dims[i], 2, stride=2)
    stages.{i}.blocks.{j}.*                MetaNeXtBlock (see fastvis.nn.metanext)
    head.fc1.{weight,bias}                 Linear(dims[-1], 3 * dims[-1])
    head.norm.{weight,bias}                LayerNorm(3 * dims[-1], eps=1e-6)
    head.fc2.{weight,bias}                 Linear(3 * dims[-1], num_classes)
"""
from __future__ import annotations

import functools
import numbers
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.convnext import trunc_normal_02_
from ..nn.depthwise_conv import DepthwiseConv2d
from ..nn.linear import Linear
from ..nn.inception_dwconv import InceptionDWConv2d
from ..nn.metanext import MetaNeXtBlock, run_blocks
from ..nn.patch_conv import PatchConv2d, PatchConvBN
from ._backbone import StagedBackbone, positive_int, probability
from ._features import FeatureInfo
from ._pretrained import (
    PretrainedWeightsNotFound,
    find_cached_weights,
    load_pretrained,
    load_state_dict_file,
)
from ._registry import register_model

__all__ = ["MetaNeXt", "MetaNeXtStage", "MlpClassifierHead", "checkpoint_filter_fn", "load_checkpoint"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _positive_int(name: str, v) -> int:
    return positive_int("MetaNeXt", name, v)


def _probability(name: str, v) -> float:
    return probability("MetaNeXt", name, v)


class _StaticSameConv2d(nn.Conv2d):
    """A stride-1 ``nn.Conv2d`` with TensorFlow-style "same" padding given as explicit
    (left/top, right/bottom) amounts: timm's ``Conv2dSame`` for the k2 downsampling
    convolution of a dilated stage (for stride 1 the padding does not depend on the
    input size). Same keys as ``nn.Conv2d``."""

    def __init__(self, *args, same_pad=(0, 1), **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.same_pad = tuple(same_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.same_pad
        return super().forward(F.pad(x, (lo, hi, lo, hi)))


def _downsample_conv(in_chs: int, out_chs: int, stride: int, dilation: int, same: bool, factory) -> nn.Conv2d:
    """timm's ``create_conv2d(in_chs, out_chs, 2, stride, dilation, padding='same' if the
    stage is dilated else 0)``."""
    if not same:
        if stride == 2 and dilation == 1:  # non-overlapping 2x2 patches
            return PatchConv2d(in_chs, out_chs, 2, **factory)
        return nn.Conv2d(in_chs, out_chs, 2, stride=stride, dilation=dilation, **factory)
    if stride != 1:  # timm never asks for this: a dilated stage has stride 1
        raise ValueError("MetaNeXt: 'same' padding of a strided downsampling convolution is not supported")
    total = dilation  # dilation * (kernel - 1), kernel 2
    if total % 2 == 0:
        return nn.Conv2d(in_chs, out_chs, 2, stride=1, dilation=dilation, padding=total // 2, **factory)
    return _StaticSameConv2d(in_chs, out_chs, 2, stride=1, dilation=dilation,
                             same_pad=(total // 2, total - total // 2), **factory)


class MetaNeXtStage(nn.Module):
    """``downsample`` (BatchNorm2d then a k2 Conv2d, or Identity) and ``blocks``
    (timm's ``MetaNeXtStage``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2, depth: int = 2,
                 dilation=(1, 1), drop_path_rates: Optional[Sequence[float]] = None,
                 ls_init_value: Optional[float] = 1.0,
                 token_mixer: Callable[..., nn.Module] = InceptionDWConv2d, mlp_ratio: float = 4,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if stride > 1 or dilation[0] != dilation[1]:
            bn = nn.BatchNorm2d(in_chs, **factory)
            conv = _downsample_conv(in_chs, out_chs, stride, dilation[0], dilation[1] > 1, factory)
            # PatchConvBN: in inference the BatchNorm folds into the patch convolution.
            self.downsample = PatchConvBN(bn, conv) if isinstance(conv, PatchConv2d) else nn.Sequential(bn, conv)
        else:
            if in_chs != out_chs:
                raise ValueError(f"MetaNeXtStage: {in_chs} -> {out_chs} channels needs a downsample layer")
            self.downsample = nn.Identity()
        rates = list(drop_path_rates) if drop_path_rates else [0.0] * depth
        self.blocks = nn.Sequential(*[
            MetaNeXtBlock(out_chs, dilation=dilation[1], token_mixer=token_mixer, mlp_ratio=mlp_ratio,
                          ls_init_value=ls_init_value, drop_path=rates[j], **factory)
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # The depthwise kernels' native layout; a no-op when the convolution kept it.
        x = x.contiguous(memory_format=torch.channels_last)
        return run_blocks(self.blocks, x)  # self.blocks(x), the eval blocks in one core call


class MlpClassifierHead(nn.Module):
    """timm's ``MlpClassifierHead``: global average pool -> flatten -> ``fc1`` (C -> 3C)
    -> GELU -> ``norm`` (LayerNorm, eps 1e-6) -> dropout -> ``fc2`` (the classifier)."""

    def __init__(self, in_features: int, num_classes: int = 1000, mlp_ratio: float = 3,
                 drop: float = 0.0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_features = hidden = int(mlp_ratio * in_features)
        self.use_bias = bias
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc1 = Linear(in_features, hidden, bias=bias, **factory)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=1e-6, **factory)
        self.fc2 = Linear(hidden, num_classes, bias=bias, **factory) if num_classes > 0 else nn.Identity()
        self.drop = nn.Dropout(drop)

    def reset(self, num_classes: int, reset_other: bool = False) -> None:
        """A fresh classifier of ``num_classes`` outputs (0: none); ``reset_other`` also
        removes the pre-logits MLP (fc1, act, norm), as timm's does."""
        ref = next(self.parameters(), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        if reset_other:
            self.fc1, self.act, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.in_features
        # nn.Linear's default initialisation, as timm's reset
        self.fc2 = (Linear(self.num_features, num_classes, bias=self.use_bias, **factory)
                    if num_classes > 0 else nn.Identity())

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.fc1(x)
        x = self.act(x)
        x = self.norm(x)
        x = self.drop(x)
        return x if pre_logits else self.fc2(x)


def _per_stage(name: str, v, n: int) -> list:
    items = list(v) if isinstance(v, (list, tuple)) else [v] * n
    if len(items) != n:
        raise ValueError(f"MetaNeXt: {name} needs one entry per stage ({n}), got {v!r}")
    return items


class MetaNeXt(StagedBackbone, nn.Module):
    _family = "MetaNeXt"

    """InceptionNeXt (timm's ``MetaNeXt``) with timm's conventions.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for none (``forward`` then returns the
            pre-logits features of the head's MLP, as timm).
        global_pool: only ``"avg"`` (timm's default).
        output_stride: 32 (default), 16, 8 or 4: later stages keep the resolution and
            dilate their token mixers instead, timm's rule.
        depths, dims: blocks and channels per stage.
        token_mixers: module factory (or one per stage) called as
            ``f(dim, dilation=..., device=..., dtype=...)``; default
            :class:`fastvis.nn.InceptionDWConv2d` (``functools.partial`` of it for other
            kernel sizes / branch ratios, as timm's variants do).
        mlp_ratios: MLP expansion, one number or one per stage (timm: (4, 4, 4, 3)).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block; block b of B gets
            drop_path_rate * b / (B - 1) (timm's linear rule).
        ls_init_value: initial layer scale; None / 0 for no ``gamma``.
        features_only, out_indices: build a feature extractor (see :meth:`as_features`).

    timm's ``norm_layer`` / ``act_layer`` are fixed (BatchNorm2d, exact GELU).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        output_stride: int = 32,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        token_mixers: Union[Callable[..., nn.Module], Sequence[Callable[..., nn.Module]]] = InceptionDWConv2d,
        mlp_ratios: Union[float, Sequence[float]] = (4, 4, 4, 3),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: Optional[float] = 1e-6,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        in_chans = _positive_int("in_chans", in_chans)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(f"MetaNeXt: num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool != "avg":
            raise ValueError(f"MetaNeXt: only global_pool='avg' is supported, got {global_pool!r}")
        output_stride = _positive_int("output_stride", output_stride)
        if output_stride < 4 or output_stride & (output_stride - 1):
            raise ValueError(f"MetaNeXt: output_stride must be a power of two >= 4, got {output_stride}")
        depths = tuple(_positive_int("depths[i]", d) for d in depths)
        dims = tuple(_positive_int("dims[i]", d) for d in dims)
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"MetaNeXt: depths and dims must have the same non-zero length, got {depths} and {dims}")
        num_stages = len(depths)
        token_mixers = _per_stage("token_mixers", token_mixers, num_stages)
        mlp_ratios = _per_stage("mlp_ratios", mlp_ratios, num_stages)
        drop_rate = _probability("drop_rate", drop_rate)
        drop_path_rate = _probability("drop_path_rate", drop_path_rate)

        self.num_classes = int(num_classes)
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.depths, self.dims = depths, dims
        self.output_stride = output_stride
        self.features_only = False
        self.grad_checkpointing = False

        self.stem = PatchConvBN(  # BatchNorm folded into the convolution in inference
            PatchConv2d(in_chans, dims[0], 4, **factory),
            nn.BatchNorm2d(dims[0], **factory),
        )
        total = sum(depths)
        rates = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()  # timm's rates, to the bit
        stages, info = [], []
        start, curr_stride, dilation, prev = 0, 4, 1, dims[0]
        for i in range(num_stages):
            # timm's rule: stage 0 keeps the stem's resolution; later stages halve it until
            # output_stride is reached, then dilate instead.
            stride = 2 if i > 0 else 1
            if curr_stride >= output_stride and stride > 1:
                dilation *= stride
                stride = 1
            curr_stride *= stride
            first_dilation = 1 if dilation in (1, 2) else 2
            stages.append(MetaNeXtStage(
                prev, dims[i], stride=stride, depth=depths[i], dilation=(first_dilation, dilation),
                drop_path_rates=rates[start:start + depths[i]], ls_init_value=ls_init_value,
                token_mixer=token_mixers[i], mlp_ratio=mlp_ratios[i], **factory))
            start += depths[i]
            prev = dims[i]
            info.append(dict(num_chs=dims[i], reduction=curr_stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_info = FeatureInfo(info)
        self.num_features = dims[-1]
        self.head = MlpClassifierHead(dims[-1], self.num_classes, drop=drop_rate, **factory)
        self.head_hidden_size = self.head.num_features
        self._init_weights()
        self.pretrained_cfg = _default_cfg(in_chans, self.num_classes)

        if features_only:
            self.as_features(out_indices)

    # timm's name for the same dict
    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    @torch.no_grad()
    def _init_weights(self) -> None:
        # timm's MetaNeXt._init_weights: every convolution (the depthwise ones included) and
        # linear layer truncated normal (std 0.02), biases zero; norms keep their defaults.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, DepthwiseConv2d)):
                trunc_normal_02_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm API

    def get_classifier(self) -> nn.Module:
        self._check_not_features("get_classifier")
        return self.head.fc2

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """A new, freshly initialised classifier (``head.fc2``) of ``num_classes`` outputs
        (0: none); ``reset_other`` also removes the head's pre-logits MLP (timm's option).
        Only average pooling is supported (``global_pool`` None or ``"avg"``)."""
        self._check_not_features("reset_classifier")
        if global_pool not in (None, "avg"):
            raise ValueError(f"reset_classifier: only global_pool='avg' is supported, got {global_pool!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(f"reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.head.reset(self.num_classes, reset_other=reset_other)
        self.head_hidden_size = self.head.num_features
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=self.num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError("fastvis MetaNeXt: gradient checkpointing is not implemented")

    def no_weight_decay(self):
        return set()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: (N, in_chans, H, W) -> (N, dims[-1], H/32, W/32) (output
        stride 32), channels_last."""
        self._check_input(x)
        x = self.stem(x)  # PatchConv2d reads any layout and returns channels_last
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, fc1, GELU, LayerNorm, dropout and (unless ``pre_logits``) the classifier
        ``fc2``. ``pre_logits`` gives (N, head_hidden_size) = (N, 3 * dims[-1])."""
        self._check_not_features("forward_head")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self._forward_feature_list(x)
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ features

    def as_features(self, out_indices: Sequence[int] = (0, 1, 2, 3)) -> "MetaNeXt":
        """Turns the model, in place, into a feature extractor like timm's
        ``features_only=True``: ``forward`` returns the outputs of the stages in
        ``out_indices`` (ascending, negative counts from the end), later stages and the
        head are removed, ``feature_info.channels()`` / ``.reduction()`` describe the
        outputs. Returns the model."""
        idx, keep = self._features_plan(out_indices)
        self.stages = self.stages[:keep]
        del self.head
        self.head = None
        return self._become_features(idx, keep)

# ---------------------------------------------------------------------- checkpoints


def _unwrap(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    sd: Mapping[str, Any] = state_dict
    for wrapper in ("model", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "model.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Converts a checkpoint to ``model``'s keys: unwraps a top-level ``'model'`` or
    ``'state_dict'`` entry, strips ``module.`` / ``model.`` prefixes and maps timm
    ``features_only`` names (``stem_0``, ``stages_2``) to module paths. timm's and the
    official sail-sg checkpoints share one layout, so nothing else is renamed; anything
    unknown is left for the strict load to report."""
    out = {}
    for k, v in _unwrap(state_dict).items():
        m = re.match(r"^(stem|stages)_(\d+)\.", k)
        out[f"{m.group(1)}.{m.group(2)}.{k[m.end():]}" if m else k] = v
    return out


def load_checkpoint(model: MetaNeXt, checkpoint: Union[str, Mapping[str, Any]]) -> MetaNeXt:
    """Loads a checkpoint (a local file path or a state dict, timm or official layout)
    into ``model`` through :func:`checkpoint_filter_fn`, strictly except for a classifier
    of another size and the first convolution's input channels (timm's rules)."""
    sd = load_state_dict_file(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    load_pretrained(model, sd, checkpoint_filter_fn, first_conv="stem.0", classifier="head.fc2")
    return model


# ---------------------------------------------------------------------- models


def _default_cfg(in_chans: int = 3, num_classes: int = 1000, **kw) -> Dict[str, Any]:
    cfg = {
        "input_size": (in_chans, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "num_classes": num_classes, "first_conv": "stem.0", "classifier": "head.fc2",
    }
    cfg.update(kw)
    return cfg


# timm's pretrained tags per model (the first is the default) with their config changes,
# and the file name of the official sail-sg release of each tag (what
# torch.hub.load_state_dict_from_url would have cached: same layout as timm's files).
_PRETRAINED = {
    "inception_next_atto": {"sail_in1k": ("inceptionnext_atto.pth", {})},
    "inception_next_tiny": {"sail_in1k": ("inceptionnext_tiny.pth", {})},
    "inception_next_small": {"sail_in1k": ("inceptionnext_small.pth", {})},
    "inception_next_base": {
        "sail_in1k": ("inceptionnext_base.pth", {"crop_pct": 0.95}),
        "sail_in1k_384": ("inceptionnext_base_384.pth",
                          {"input_size": (3, 384, 384), "pool_size": (12, 12), "crop_pct": 1.0}),
    },
}


def _pretrained_cfg(variant: str, tag: Optional[str], in_chans: int, num_classes: int) -> Dict[str, Any]:
    tags = _PRETRAINED[variant]
    use_tag = tag or next(iter(tags))
    file_name, extra = tags.get(use_tag, (None, {}))
    extra = dict(extra)
    if "input_size" in extra:
        extra["input_size"] = (in_chans,) + tuple(extra["input_size"][1:])
    return _default_cfg(in_chans, num_classes, architecture=variant, tag=use_tag,
                        hf_hub_id=f"timm/{variant}.{use_tag}", file_name=file_name, **extra)


def _create_inception_next(variant: str, pretrained: bool = False, *, pretrained_path: Optional[str] = None,
                           pretrained_tag: Optional[str] = None, features_only: bool = False,
                           out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs) -> MetaNeXt:
    model = MetaNeXt(**kwargs)
    cfg = _pretrained_cfg(variant, pretrained_tag, model.in_chans, model.num_classes)
    if pretrained:
        path = pretrained_path
        if path is None:
            path, looked = find_cached_weights(cfg)
            if path is None:
                raise PretrainedWeightsNotFound(
                    f"create_model({variant!r}, pretrained=True): no local weights found, and fastvis "
                    f"never downloads anything. Looked in: {'; '.join(looked)}. Pass a local file with "
                    "pretrained_path='/path/to/weights.safetensors' (or .pth / .bin; timm or official "
                    "sail-sg layout), or fetch the weights yourself into one of those places.")
        load_checkpoint(model, path)
        cfg["file"] = str(path)
    model.pretrained_cfg = cfg
    if features_only:
        model.as_features(out_indices)
    return model


def _build(variant: str, pretrained: bool, kwargs: Dict[str, Any], **model_args) -> MetaNeXt:
    return _create_inception_next(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def inception_next_atto(pretrained: bool = False, **kwargs) -> MetaNeXt:
    return _build("inception_next_atto", pretrained, kwargs, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320),
                  token_mixers=functools.partial(InceptionDWConv2d, band_kernel_size=9, branch_ratio=0.25))


@register_model
def inception_next_tiny(pretrained: bool = False, **kwargs) -> MetaNeXt:
    return _build("inception_next_tiny", pretrained, kwargs, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                  token_mixers=InceptionDWConv2d)


@register_model
def inception_next_small(pretrained: bool = False, **kwargs) -> MetaNeXt:
    return _build("inception_next_small", pretrained, kwargs, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768),
                  token_mixers=InceptionDWConv2d)


@register_model
def inception_next_base(pretrained: bool = False, **kwargs) -> MetaNeXt:
    return _build("inception_next_base", pretrained, kwargs, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024),
                  token_mixers=InceptionDWConv2d)
