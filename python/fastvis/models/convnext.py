"""ConvNeXt and ConvNeXt-V2 with timm's names, keys and conventions, on fastvis kernels.

Every residual block is one call of the fused op (:class:`fastvis.nn.ConvNeXtBlock` ->
:func:`fastvis.ops.convnext_block`); every LayerNorm over channels (stem, downsampling,
head) is :class:`fastvis.nn.LayerNorm2d`. Activations are kept channels_last inside.

State-dict layout (timm's ``ConvNeXt``)::

    stem.0.{weight,bias}                  Conv2d(in_chans, dims[0], patch_size, stride=patch_size)
    stem.1.{weight,bias}                  LayerNorm2d(dims[0])
    stages.{i}.downsample.0.{weight,bias} LayerNorm2d(dims[i-1])          (i > 0)
    stages.{i}.downsample.1.{weight,bias} Conv2d(dims[i-1], dims[i], 2, stride=2)
    stages.{i}.blocks.{j}.*               ConvNeXtBlock (see fastvis.nn.convnext)
    head.norm.{weight,bias}               LayerNorm2d(dims[-1])
    head.fc.{weight,bias}                 Linear(dims[-1], num_classes)

``checkpoint_filter_fn`` maps official facebookresearch ConvNeXt / ConvNeXt-V2
checkpoints to it and passes timm checkpoints through.
"""
from __future__ import annotations

import numbers
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..nn.convnext import ConvNeXtBlock, run_blocks, trunc_normal_02_
from ..nn.depthwise_conv import DepthwiseConv2d
from ..nn.linear import Linear
from ..nn.layer_norm import LayerNorm2d
from ..nn.patch_conv import PatchConv2d, PatchConvLN
from ._backbone import StagedBackbone, positive_int, probability
from ._features import FeatureInfo
from ._pretrained import (
    PretrainedWeightsNotFound,
    find_cached_weights,
    load_pretrained,
    load_state_dict_file,
)
from ._registry import register_model

__all__ = ["ConvNeXt", "ConvNeXtStage", "NormClassifierHead", "checkpoint_filter_fn"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _positive_int(name: str, v) -> int:
    return positive_int("ConvNeXt", name, v)


def _probability(name: str, v) -> float:
    return probability("ConvNeXt", name, v)


class ConvNeXtStage(nn.Module):
    """``downsample`` (LayerNorm2d then a k2 s2 Conv2d, or Identity) and ``blocks``."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, kernel_size: int,
                 drop_path_rates: Sequence[float], ls_init_value: Optional[float], conv_mlp: bool,
                 conv_bias: bool, use_grn: bool, norm_eps: float, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if downsample:
            self.downsample = PatchConvLN(
                LayerNorm2d(in_chs, eps=norm_eps, **factory),
                PatchConv2d(in_chs, out_chs, 2, bias=conv_bias, **factory),
            )
        else:
            if in_chs != out_chs:
                raise ValueError(f"ConvNeXtStage: {in_chs} -> {out_chs} channels needs a downsample layer")
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(out_chs, kernel_size=kernel_size, conv_mlp=conv_mlp, conv_bias=conv_bias,
                          use_grn=use_grn, ls_init_value=ls_init_value, drop_path=drop_path_rates[j],
                          norm_eps=norm_eps, **factory)
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # The fused block's native layout; a no-op when the convolution kept it.
        x = x.contiguous(memory_format=torch.channels_last)
        return run_blocks(self.blocks, x)  # self.blocks(x), the eval blocks in one core call


class NormClassifierHead(nn.Module):
    """timm's ``NormMlpClassifierHead`` without hidden layer: global average pool ->
    LayerNorm2d -> flatten -> dropout -> fc (``head.norm``, ``head.fc``)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0,
                 norm_eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = self.num_features = in_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.norm = LayerNorm2d(in_features, eps=norm_eps, **factory)
        self.flatten = nn.Flatten(1)
        self.pre_logits = nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = Linear(in_features, num_classes, **factory) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        w = self.norm.weight
        self.fc = (Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
                   if num_classes > 0 else nn.Identity())

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.norm(x)
        x = self.flatten(x)
        x = self.pre_logits(x)
        x = self.drop(x)
        if pre_logits:
            return x
        return self.fc(x)


class ConvNeXt(StagedBackbone, nn.Module):
    _family = "ConvNeXt"

    """ConvNeXt (``use_grn=False``, layer scale) and ConvNeXt-V2 (``use_grn=True``,
    ``ls_init_value=None``) with timm's conventions.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for none (``forward`` then returns the pooled,
            normalised features).
        depths, dims: blocks and channels per stage.
        kernel_sizes: odd depthwise kernel size(s) 1..31, one int or one per stage
            (``kernel_size`` is accepted as an alias).
        ls_init_value: initial layer scale, None for no ``gamma`` (V2).
        patch_size: stem kernel and stride (4 in every registered model; 1 or 2 keep more
            resolution for small images). Stage 0 never downsamples, so the stage strides
            are patch_size * (1, 2, 4, 8). (timm adds a stride-2 downsample to stage 0 when
            patch_size == 2; fastvis does not.)
        head_init_scale: multiplies the initial classifier weight and bias.
        conv_mlp: store the block MLPs as 1x1 convolutions (timm's atto..nano form);
            the computation is the same fused op either way.
        conv_bias: biases of the stem, downsampling and depthwise convolutions.
        use_grn: ConvNeXt-V2 Global Response Normalization in the blocks.
        norm_eps: epsilon of every LayerNorm (timm's default 1e-6).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block; block b of B gets
            drop_path_rate * b / (B - 1), b = 0..B-1 (timm's linear rule).
        features_only, out_indices: build a feature extractor (see :meth:`as_features`).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        kernel_sizes: Union[int, Sequence[int]] = 7,
        ls_init_value: Optional[float] = 1e-6,
        patch_size: int = 4,
        head_init_scale: float = 1.0,
        conv_mlp: bool = False,
        conv_bias: bool = True,
        use_grn: bool = False,
        norm_eps: Optional[float] = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        kernel_size: Optional[Union[int, Sequence[int]]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        in_chans = _positive_int("in_chans", in_chans)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(f"ConvNeXt: num_classes must be an int >= 0, got {num_classes!r}")
        depths = tuple(_positive_int("depths[i]", d) for d in depths)
        dims = tuple(_positive_int("dims[i]", d) for d in dims)
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"ConvNeXt: depths and dims must have the same non-zero length, got {depths} and {dims}")
        num_stages = len(depths)
        if kernel_size is not None:
            if kernel_sizes != 7:
                raise ValueError("ConvNeXt: give kernel_sizes or its alias kernel_size, not both")
            kernel_sizes = kernel_size
        if isinstance(kernel_sizes, numbers.Integral) and not isinstance(kernel_sizes, bool):
            kernel_sizes = (int(kernel_sizes),) * num_stages
        kernel_sizes = tuple(kernel_sizes)
        if len(kernel_sizes) != num_stages:
            raise ValueError(f"ConvNeXt: kernel_sizes needs one size per stage ({num_stages}), got {kernel_sizes}")
        for k in kernel_sizes:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 or k % 2 == 0 or k > 31:
                raise ValueError(f"ConvNeXt: kernel sizes must be odd ints in 1..31, got {kernel_sizes}")
        patch_size = _positive_int("patch_size", patch_size)
        drop_rate = _probability("drop_rate", drop_rate)
        drop_path_rate = _probability("drop_path_rate", drop_path_rate)
        norm_eps = 1e-6 if norm_eps is None else float(norm_eps)

        self.num_classes = int(num_classes)
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.depths, self.dims, self.kernel_sizes = depths, dims, kernel_sizes
        self.patch_size = patch_size
        self.use_grn = bool(use_grn)
        self.conv_mlp = bool(conv_mlp)
        self.features_only = False
        self.grad_checkpointing = False

        self.stem = PatchConvLN(
            PatchConv2d(in_chans, dims[0], patch_size, bias=conv_bias, **factory),
            LayerNorm2d(dims[0], eps=norm_eps, **factory),
        )
        total = sum(depths)
        rates = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()  # timm's rates, to the bit
        stages, info = [], []
        start, stride = 0, patch_size
        for i in range(num_stages):
            if i > 0:
                stride *= 2
            stages.append(ConvNeXtStage(
                dims[i - 1] if i > 0 else dims[0], dims[i], depths[i], downsample=i > 0,
                kernel_size=kernel_sizes[i], drop_path_rates=rates[start:start + depths[i]],
                ls_init_value=ls_init_value, conv_mlp=self.conv_mlp, conv_bias=conv_bias,
                use_grn=self.use_grn, norm_eps=norm_eps, **factory))
            start += depths[i]
            info.append(dict(num_chs=dims[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_info = FeatureInfo(info)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm_pre = nn.Identity()
        self.head = NormClassifierHead(dims[-1], self.num_classes, drop_rate=drop_rate, norm_eps=norm_eps, **factory)
        self._init_weights(head_init_scale)
        self.pretrained_cfg = _default_cfg(in_chans, self.num_classes)

        if features_only:
            self.as_features(out_indices)

    # timm's name for the same dict
    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    @torch.no_grad()
    def _init_weights(self, head_init_scale: float) -> None:
        # timm's _init_weights for the layers outside the blocks (the blocks initialise
        # themselves by the same rules).
        for name, m in self.named_modules():
            if ".blocks." in name:
                continue
            if isinstance(m, (nn.Conv2d, nn.Linear, DepthwiseConv2d)):
                trunc_normal_02_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if name.startswith("head.") and isinstance(m, nn.Linear):
                    m.weight.mul_(head_init_scale)
                    m.bias.mul_(head_init_scale)

    # ------------------------------------------------------------------ timm API

    def get_classifier(self) -> nn.Module:
        self._check_not_features("get_classifier")
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new, freshly initialised classifier of ``num_classes`` outputs (0: none).
        Only average pooling is supported (``global_pool`` None or ``"avg"``)."""
        self._check_not_features("reset_classifier")
        if global_pool not in (None, "avg"):
            raise ValueError(f"reset_classifier: only global_pool='avg' is supported, got {global_pool!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(f"reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.head.reset(self.num_classes)
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=self.num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError("fastvis ConvNeXt: gradient checkpointing is not implemented "
                                      "(the fused block already recomputes its interior in the backward)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: (N, in_chans, H, W) -> (N, dims[-1], H/32, W/32) (patch_size 4),
        channels_last."""
        self._check_input(x)
        x = self.stem(x)  # PatchConv2d reads any layout and returns channels_last
        x = self.stages(x)
        return self.norm_pre(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm, flatten, dropout and (unless ``pre_logits``) the classifier."""
        self._check_not_features("forward_head")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self._forward_feature_list(x)
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ features

    def as_features(self, out_indices: Sequence[int] = (0, 1, 2, 3)) -> "ConvNeXt":
        """Turns the model, in place, into a feature extractor like timm's
        ``features_only=True``: ``forward`` returns the outputs of the stages in
        ``out_indices`` (ascending, negative counts from the end), later stages and the
        head are removed, ``feature_info.channels()`` / ``.reduction()`` describe the
        outputs. Returns the model."""
        idx, keep = self._features_plan(out_indices)
        self.stages = self.stages[:keep]
        del self.head
        self.head = None
        self.norm_pre = nn.Identity()
        return self._become_features(idx, keep)

# ---------------------------------------------------------------------- checkpoints

_OFFICIAL_BLOCK_PARAMS = {
    # official Block attribute -> timm/fastvis ConvNeXtBlock attribute
    "dwconv": "conv_dw",
    "norm": "norm",
    "pwconv1": "mlp.fc1",
    "pwconv2": "mlp.fc2",
    "grn": "mlp.grn",
}
_OFFICIAL_GRN = {"gamma": "weight", "beta": "bias"}
_RESHAPABLE = re.compile(r"\.mlp\.(fc1|fc2)\.weight$|\.mlp\.grn\.(weight|bias)$")


def _official_key(key: str) -> str:
    """One key of the facebookresearch layout -> this model's (unknown keys unchanged,
    so a strict load names them)."""
    parts = key.split(".")
    if parts[0] == "downsample_layers" and len(parts) >= 4 and parts[1].isdigit():
        i, rest = int(parts[1]), ".".join(parts[2:])
        return f"stem.{rest}" if i == 0 else f"stages.{i}.downsample.{rest}"
    if parts[0] == "stages" and len(parts) >= 4 and parts[1].isdigit() and parts[2].isdigit():
        head = f"stages.{parts[1]}.blocks.{parts[2]}"
        name, rest = parts[3], parts[4:]
        if name == "gamma" and not rest:
            return f"{head}.gamma"
        if name == "grn" and len(rest) == 1 and rest[0] in _OFFICIAL_GRN:
            return f"{head}.mlp.grn.{_OFFICIAL_GRN[rest[0]]}"
        if name in _OFFICIAL_BLOCK_PARAMS and name != "grn" and rest:
            return f"{head}.{_OFFICIAL_BLOCK_PARAMS[name]}.{'.'.join(rest)}"
        return key
    if parts[0] == "norm" and len(parts) == 2:
        return f"head.norm.{parts[1]}"
    if parts[0] == "head" and len(parts) == 2:
        return f"head.fc.{parts[1]}"
    return key


def _timm_features_key(key: str) -> str:
    """timm ``FeatureListNet`` names (``stem_0.``, ``stages_2.``) -> module paths."""
    m = re.match(r"^(stem|stages)_(\d+)\.", key)
    return f"{m.group(1)}.{m.group(2)}.{key[m.end():]}" if m else key


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
    """Converts a checkpoint to ``model``'s keys and shapes.

    * Unwraps a top-level ``'model'`` or ``'state_dict'`` entry and strips ``module.`` /
      ``model.`` key prefixes.
    * Official facebookresearch ConvNeXt / ConvNeXt-V2 layout (``downsample_layers.*``,
      ``stages.i.j.dwconv``, ``pwconv1/2``, ``gamma``, ``grn.gamma/beta`` (1,1,1,C), ``norm``,
      ``head``) is renamed to timm's; timm checkpoints pass through (timm
      ``features_only`` names ``stem_0`` / ``stages_i`` are mapped to module paths).
    * MLP weights and GRN parameters are reshaped to the model's storage form
      (Linear (hidden, C) <-> 1x1 conv (hidden, C, 1, 1); (1,1,1,C) -> (C,)) when the
      element counts agree; every other key and shape is left for a strict load to check.
    """
    sd = _unwrap(state_dict)
    if any(k.startswith("downsample_layers.") for k in sd):
        sd = {_official_key(k): v for k, v in sd.items()}
    else:
        sd = {_timm_features_key(k): v for k, v in sd.items()}
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        if (k in own and isinstance(v, torch.Tensor) and _RESHAPABLE.search(k)
                and tuple(v.shape) != tuple(own[k].shape) and v.numel() == own[k].numel()):
            v = v.reshape(own[k].shape)
        out[k] = v
    return out


def load_checkpoint(model: "ConvNeXt", checkpoint: Union[str, Mapping[str, Any]]) -> "ConvNeXt":
    """Loads a checkpoint (a local file path or a state dict, timm or official layout)
    into ``model`` through :func:`checkpoint_filter_fn`, strictly except for a classifier
    of another size and the first convolution's input channels (timm's rules)."""
    sd = load_state_dict_file(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    load_pretrained(model, sd, checkpoint_filter_fn, first_conv="stem.0", classifier="head.fc")
    return model


# ---------------------------------------------------------------------- models

def _default_cfg(in_chans: int = 3, num_classes: int = 1000, **kw) -> Dict[str, Any]:
    cfg = {
        "input_size": (in_chans, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "num_classes": num_classes, "first_conv": "stem.0", "classifier": "head.fc",
    }
    cfg.update(kw)
    return cfg


# timm's default pretrained tag for each model and, where timm has one, the file name of
# its legacy URL (what torch.hub would have cached).
_PRETRAINED = {
    "convnext_atto": ("d2_in1k", "convnext_atto_d2-01bb0f51.pth", {}),
    "convnext_femto": ("d1_in1k", "convnext_femto_d1-d71d5b4c.pth", {}),
    "convnext_pico": ("d1_in1k", "convnext_pico_d1-10ad7f0d.pth", {}),
    "convnext_nano": ("in12k_ft_in1k", None, {"crop_pct": 0.95}),
    "convnext_tiny": ("in12k_ft_in1k", None, {"crop_pct": 0.95}),
    "convnext_small": ("in12k_ft_in1k", None, {"crop_pct": 0.95}),
    "convnext_base": ("fb_in22k_ft_in1k", "convnext_base_22k_1k_224.pth", {}),
    "convnext_large": ("fb_in22k_ft_in1k", "convnext_large_22k_1k_224.pth", {}),
    "convnext_xlarge": ("fb_in22k_ft_in1k", "convnext_xlarge_22k_1k_224_ema.pth", {}),
    "convnextv2_atto": ("fcmae_ft_in1k", "convnextv2_atto_1k_224_ema.pt", {}),
    "convnextv2_femto": ("fcmae_ft_in1k", "convnextv2_femto_1k_224_ema.pt", {}),
    "convnextv2_pico": ("fcmae_ft_in1k", "convnextv2_pico_1k_224_ema.pt", {}),
    "convnextv2_nano": ("fcmae_ft_in22k_in1k", "convnextv2_nano_22k_224_ema.pt", {}),
    "convnextv2_tiny": ("fcmae_ft_in22k_in1k", "convnextv2_tiny_22k_224_ema.pt", {}),
    "convnextv2_small": (None, None, {}),  # timm publishes no weights for it
    "convnextv2_base": ("fcmae_ft_in22k_in1k", "convnextv2_base_22k_224_ema.pt", {}),
    "convnextv2_large": ("fcmae_ft_in22k_in1k", "convnextv2_large_22k_224_ema.pt", {}),
    "convnextv2_huge": ("fcmae_ft_in22k_in1k_384", "convnextv2_huge_22k_384_ema.pt",
                        {"input_size": (3, 384, 384), "pool_size": (12, 12), "crop_pct": 1.0}),
}


def _pretrained_cfg(variant: str, tag: Optional[str], in_chans: int, num_classes: int) -> Dict[str, Any]:
    default_tag, file_name, extra = _PRETRAINED[variant]
    extra = dict(extra)
    if "input_size" in extra:
        extra["input_size"] = (in_chans,) + tuple(extra["input_size"][1:])
    use_tag = tag or default_tag
    return _default_cfg(
        in_chans, num_classes, architecture=variant, tag=use_tag,
        hf_hub_id=f"timm/{variant}.{use_tag}" if use_tag else None,
        # the legacy file belongs to the default tag only
        file_name=file_name if use_tag == default_tag else None,
        **extra)


def _create_convnext(variant: str, pretrained: bool = False, *, pretrained_path: Optional[str] = None,
                     pretrained_tag: Optional[str] = None, features_only: bool = False,
                     out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs) -> ConvNeXt:
    model = ConvNeXt(**kwargs)
    cfg = _pretrained_cfg(variant, pretrained_tag, model.in_chans, model.num_classes)
    if pretrained:
        path = pretrained_path
        if path is None:
            path, looked = find_cached_weights(cfg)
            if path is None:
                where = "; ".join(looked) if looked else f"timm publishes no weights for {variant}"
                raise PretrainedWeightsNotFound(
                    f"create_model({variant!r}, pretrained=True): no local weights found, and fastvis "
                    f"never downloads anything. Looked in: {where}. Pass a local file with "
                    "pretrained_path='/path/to/weights.safetensors' (or .pth / .bin; timm or official "
                    "facebookresearch layout), or fetch the weights yourself into one of those places.")
        load_checkpoint(model, path)
        cfg["file"] = str(path)
    model.pretrained_cfg = cfg
    if features_only:
        model.as_features(out_indices)
    return model


_V1 = dict(use_grn=False)
_V2 = dict(use_grn=True, ls_init_value=None)
_SMALL4 = dict(depths=(2, 2, 6, 2))
_SMALL_NANO = dict(depths=(2, 2, 8, 2))
_T = dict(depths=(3, 3, 9, 3))
_L = dict(depths=(3, 3, 27, 3))


def _build(variant: str, pretrained: bool, kwargs: Dict[str, Any], **model_args) -> ConvNeXt:
    return _create_convnext(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_atto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_atto", pretrained, kwargs, **_V1, **_SMALL4, dims=(40, 80, 160, 320), conv_mlp=True)


@register_model
def convnext_femto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_femto", pretrained, kwargs, **_V1, **_SMALL4, dims=(48, 96, 192, 384), conv_mlp=True)


@register_model
def convnext_pico(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_pico", pretrained, kwargs, **_V1, **_SMALL4, dims=(64, 128, 256, 512), conv_mlp=True)


@register_model
def convnext_nano(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_nano", pretrained, kwargs, **_V1, **_SMALL_NANO, dims=(80, 160, 320, 640), conv_mlp=True)


@register_model
def convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_tiny", pretrained, kwargs, **_V1, **_T, dims=(96, 192, 384, 768))


@register_model
def convnext_small(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_small", pretrained, kwargs, **_V1, **_L, dims=(96, 192, 384, 768))


@register_model
def convnext_base(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_base", pretrained, kwargs, **_V1, **_L, dims=(128, 256, 512, 1024))


@register_model
def convnext_large(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_large", pretrained, kwargs, **_V1, **_L, dims=(192, 384, 768, 1536))


@register_model
def convnext_xlarge(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnext_xlarge", pretrained, kwargs, **_V1, **_L, dims=(256, 512, 1024, 2048))


@register_model
def convnextv2_atto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_atto", pretrained, kwargs, **_V2, **_SMALL4, dims=(40, 80, 160, 320), conv_mlp=True)


@register_model
def convnextv2_femto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_femto", pretrained, kwargs, **_V2, **_SMALL4, dims=(48, 96, 192, 384), conv_mlp=True)


@register_model
def convnextv2_pico(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_pico", pretrained, kwargs, **_V2, **_SMALL4, dims=(64, 128, 256, 512), conv_mlp=True)


@register_model
def convnextv2_nano(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_nano", pretrained, kwargs, **_V2, **_SMALL_NANO, dims=(80, 160, 320, 640), conv_mlp=True)


@register_model
def convnextv2_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_tiny", pretrained, kwargs, **_V2, **_T, dims=(96, 192, 384, 768))


@register_model
def convnextv2_small(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_small", pretrained, kwargs, **_V2, **_L, dims=(96, 192, 384, 768))


@register_model
def convnextv2_base(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_base", pretrained, kwargs, **_V2, **_L, dims=(128, 256, 512, 1024))


@register_model
def convnextv2_large(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_large", pretrained, kwargs, **_V2, **_L, dims=(192, 384, 768, 1536))


@register_model
def convnextv2_huge(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _build("convnextv2_huge", pretrained, kwargs, **_V2, **_L, dims=(352, 704, 1408, 2816))
