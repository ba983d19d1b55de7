"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design
in CNNs", CVPR 2022) with the official implementation's parameter names, on fastvis kernels.

State-dict layout (the official ``RepLKNet``, so its checkpoints load strictly)::

    stem.{0..3}.{conv,bn}.*          ConvBN+ReLU: 3x3 s2 (in -> C0), dw 3x3, 1x1, dw 3x3 s2
    stages.{i}.blocks.{2j}.*         RepLKBlock (prelkb_bn, pw1, large_kernel, pw2)
    stages.{i}.blocks.{2j+1}.*       ConvFFN (preffn_bn, pw1, pw2)
    transitions.{i}.{0,1}.{conv,bn}.*  ConvBN+ReLU: 1x1 (C_i -> C_i+1), dw 3x3 s2
    norm.*                           BatchNorm2d(C_last) before pooling
    head.{weight,bias}               nn.Linear(C_last, num_classes)

Training form: ``large_kernel.lkb_origin.{conv,bn}`` and ``large_kernel.small_conv.{conv,bn}``
(none for RepLKNet-XL); deploy form (``deploy=True``, the official
``small_kernel_merged=True``, or ``fastvis.reparameterize``): ``large_kernel.lkb_reparam``
with bias. As in the official ``structural_reparam``, only the large kernels are merged;
every other ConvBN keeps its BatchNorm, so official deploy checkpoints load.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..nn.linear import Linear
from ..nn.replk import ConvBN, ConvFFN, RepLKBlock
from ._features import FeatureInfo
from ._registry import register_model
from .convnext import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, _unwrap
from .unireplknet import _ReparamModelMixin, _positive_int, _probability, create_reparam_model, load_reparam_checkpoint

__all__ = ["RepLKNet", "RepLKNetStage", "checkpoint_filter_fn", "load_checkpoint"]


class RepLKNetStage(nn.Module):
    """``blocks``: RepLKBlock / ConvFFN pairs; ``norm``: Identity (the official stage's
    ``norm`` is a BatchNorm only for downstream feature maps of RepLKNet-XL)."""

    def __init__(self, channels: int, num_blocks: int, stage_lk_size: int, drop_path: Sequence[float],
                 small_kernel: Optional[int], dw_ratio: float = 1.0, ffn_ratio: float = 4.0,
                 deploy: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        blocks = []
        for i in range(num_blocks):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel,
                                     drop_path=drop_path[i], deploy=deploy, **factory))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, drop_path=drop_path[i], **factory))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class RepLKNet(_ReparamModelMixin, nn.Module):
    """RepLKNet with the official names.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for none (``forward`` returns pooled features).
        large_kernel_sizes: the large depthwise kernel of each stage (odd, <= 63).
        layers: RepLKBlock + ConvFFN pairs per stage.
        channels: channels per stage.
        small_kernel: the parallel small kernel (odd, <= the large ones), None for none.
        dw_ratio: width of the large-kernel convolution relative to the stage's channels.
        ffn_ratio: hidden width of the ConvFFN.
        deploy: build the deploy form (merged large kernels).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block pair (linear from 0).
        features_only, out_indices: a feature extractor returning the stage outputs.
    """

    _family = "RepLKNet"

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 large_kernel_sizes: Sequence[int] = (31, 29, 27, 13), layers: Sequence[int] = (2, 2, 18, 2),
                 channels: Sequence[int] = (128, 256, 512, 1024), small_kernel: Optional[int] = 5,
                 dw_ratio: float = 1.0, ffn_ratio: float = 4.0, deploy: bool = False,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        in_chans = _positive_int("RepLKNet: in_chans", in_chans)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(f"RepLKNet: num_classes must be an int >= 0, got {num_classes!r}")
        layers = tuple(_positive_int("RepLKNet: layers[i]", d) for d in layers)
        channels = tuple(_positive_int("RepLKNet: channels[i]", c) for c in channels)
        large_kernel_sizes = tuple(large_kernel_sizes)
        if not layers or not len(layers) == len(channels) == len(large_kernel_sizes):
            raise ValueError(f"RepLKNet: large_kernel_sizes, layers and channels must have the same non-zero "
                             f"length, got {large_kernel_sizes}, {layers}, {channels}")
        for k in large_kernel_sizes:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 or k % 2 == 0 or k > 63:
                raise ValueError(f"RepLKNet: large kernel sizes must be odd ints in 1..63, got {large_kernel_sizes}")
            if small_kernel is not None and small_kernel > k:
                raise ValueError(f"RepLKNet: small_kernel ({small_kernel}) cannot be larger than a large kernel "
                                 f"({large_kernel_sizes})")
        for name, r in (("dw_ratio", dw_ratio), ("ffn_ratio", ffn_ratio)):
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or r <= 0:
                raise ValueError(f"RepLKNet: {name} must be a positive number, got {r!r}")
        drop_path_rate = _probability("RepLKNet: drop_path_rate", drop_path_rate)
        self.drop_rate = _probability("RepLKNet: drop_rate", drop_rate)
        self.num_classes = int(num_classes)
        self.in_chans = in_chans
        self.large_kernel_sizes, self.layers, self.channels = large_kernel_sizes, layers, channels
        self.small_kernel = small_kernel
        self.deploy = bool(deploy)
        self.features_only = False
        self.grad_checkpointing = False

        w = channels[0]
        self.stem = nn.ModuleList([
            ConvBN(in_chans, w, 3, stride=2, padding=1, relu=True, **factory),
            ConvBN(w, w, 3, stride=1, padding=1, groups=w, relu=True, **factory),
            ConvBN(w, w, 1, stride=1, padding=0, relu=True, **factory),
            ConvBN(w, w, 3, stride=2, padding=1, groups=w, relu=True, **factory)])
        dpr = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        info, stride = [], 4
        for i in range(len(layers)):
            self.stages.append(RepLKNetStage(
                channels[i], layers[i], large_kernel_sizes[i], dpr[sum(layers[:i]):sum(layers[:i + 1])],
                small_kernel, dw_ratio=dw_ratio, ffn_ratio=ffn_ratio, deploy=self.deploy, **factory))
            if i < len(layers) - 1:
                self.transitions.append(nn.Sequential(
                    ConvBN(channels[i], channels[i + 1], 1, padding=0, relu=True, **factory),
                    ConvBN(channels[i + 1], channels[i + 1], 3, stride=2, padding=1, groups=channels[i + 1],
                           relu=True, **factory)))
            if i > 0:
                stride *= 2
            info.append(dict(num_chs=channels[i], reduction=stride, module=f"stages.{i}"))
        self.feature_info = FeatureInfo(info)
        self.num_features = self.head_hidden_size = channels[-1]
        self.norm = nn.BatchNorm2d(channels[-1], **factory)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = Linear(channels[-1], self.num_classes, **factory) if self.num_classes > 0 else nn.Identity()
        self.pretrained_cfg = _default_cfg(in_chans, self.num_classes)
        if features_only:
            self.as_features(out_indices)

    def _num_stages_kept(self) -> int:
        return len(self.stages)

    def _stage_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0:
            for layer in self.stem:
                x = layer(x)
        else:
            x = self.transitions[i - 1](x)
        return self.stages[i](x.contiguous(memory_format=torch.channels_last))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and transitions: (N, in_chans, H, W) -> (N, C_last, H/32, W/32),
        channels_last (before the final BatchNorm, which belongs to the head)."""
        self._check_not_features("forward_features")
        self._check_input(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for i in range(len(self.stages)):
            x = self._stage_forward(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """BatchNorm, global average pool, dropout and (unless ``pre_logits``) the classifier."""
        self._check_not_features("forward_head")
        x = self.norm(x).mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def as_features(self, out_indices: Sequence[int] = (0, 1, 2, 3)) -> "RepLKNet":
        """A feature extractor, in place (timm's ``features_only``): ``forward`` returns the
        outputs of the stages in ``out_indices``; later stages, transitions and the head are
        removed."""
        idx, keep = self._features_plan(out_indices)
        self.stages = self.stages[:keep]
        self.transitions = self.transitions[:keep - 1]
        del self.norm, self.head
        self.norm = self.head = None
        return self._become_features(idx, keep)


# ---------------------------------------------------------------------- checkpoints

def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official RepLKNet checkpoints (training or deploy form) -> ``model``'s keys: unwraps
    ``model`` / ``state_dict`` entries and strips ``module.`` / ``model.`` prefixes (the
    official keys are this model's, so nothing is renamed)."""
    sd = _unwrap(state_dict)
    return sd


def _is_deploy_sd(sd: Mapping[str, Any]) -> bool:
    return any(".large_kernel.lkb_reparam." in k for k in sd)


def load_checkpoint(model: RepLKNet, checkpoint: Union[str, Mapping[str, Any]]) -> RepLKNet:
    """Loads an official checkpoint (file or state dict, training or deploy form) strictly,
    except for a classifier of another size and the first convolution's input channels."""
    return load_reparam_checkpoint(model, checkpoint, checkpoint_filter_fn, _is_deploy_sd, "stem.0.conv", "head")


# ---------------------------------------------------------------------- models

def _default_cfg(in_chans: int = 3, num_classes: int = 1000, **kw) -> Dict[str, Any]:
    cfg = {"input_size": (in_chans, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
           "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
           "num_classes": num_classes, "first_conv": "stem.0.conv", "classifier": "head"}
    cfg.update(kw)
    return cfg


_VARIANTS = {
    "replknet_31b": (dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                          channels=(128, 256, 512, 1024), small_kernel=5),
                     {"file_name": "RepLKNet-31B_ImageNet-1K_224.pth"}),
    "replknet_31l": (dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                          channels=(192, 384, 768, 1536), small_kernel=5),
                     {"file_name": "RepLKNet-31L_ImageNet-22K-to-1K_384.pth", "input_size": (3, 384, 384),
                      "pool_size": (12, 12), "crop_pct": 1.0}),
    # The paper's XL preprocessing: mean = std = 0.5, 320x320 on ImageNet-1K.
    "replknet_xl": (dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2),
                         channels=(256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5),
                    {"file_name": None, "input_size": (3, 320, 320), "pool_size": (10, 10), "crop_pct": 1.0,
                     "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}),
}


def _build(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> RepLKNet:
    args, extra = _VARIANTS[variant]
    args = dict(args, **kwargs)
    return create_reparam_model(RepLKNet, variant, pretrained, _default_cfg(**extra), load_checkpoint, **args)


@register_model
def replknet_31b(pretrained: bool = False, **kwargs) -> RepLKNet:
    return _build("replknet_31b", pretrained, kwargs)


@register_model
def replknet_31l(pretrained: bool = False, **kwargs) -> RepLKNet:
    return _build("replknet_31l", pretrained, kwargs)


@register_model
def replknet_xl(pretrained: bool = False, **kwargs) -> RepLKNet:
    return _build("replknet_xl", pretrained, kwargs)
