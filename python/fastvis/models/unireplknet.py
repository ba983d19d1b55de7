"""UniRepLKNet (Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet",
CVPR 2024) with the official implementation's parameter names, on fastvis kernels.

State-dict layout (the official ``UniRepLKNet``, so its checkpoints load strictly)::

    downsample_layers.0.{0,3}.{weight,bias}   Conv2d k3 s2 p1 (in -> dims[0]/2 -> dims[0])
    downsample_layers.0.{1,4}.{weight,bias}   LayerNorm over channels (eps 1e-6)
    downsample_layers.{i}.0.{weight,bias}     Conv2d k3 s2 p1 (dims[i-1] -> dims[i]), i > 0
    downsample_layers.{i}.1.{weight,bias}     LayerNorm over channels
    stages.{i}.{j}.*                          UniRepLKNetBlock (fastvis.nn.unireplknet)
    norm.{weight,bias}                        nn.LayerNorm(dims[-1]) on the pooled features
    head.{weight,bias}                        nn.Linear(dims[-1], num_classes)

Training form (``deploy=False``): BatchNorms, Dilated Reparam Blocks with their branches,
GRN biases and layer scales; deploy form (``deploy=True``, or ``fastvis.reparameterize``):
the official deploy keys (see :class:`fastvis.nn.UniRepLKNetBlock`).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn.convnext import trunc_normal_02_
from ..nn.depthwise_conv import DepthwiseConv2d
from ..nn.linear import Linear
from ..nn.patch_conv import PatchConv2d
from ..nn.layer_norm import LayerNorm2d
from ..nn.reparam import Reparameterizable
from ..nn.unireplknet import UniRepLKNetBlock
from ._backbone import StagedBackbone, positive_int, probability
from ._features import FeatureInfo
from ._pretrained import PretrainedWeightsNotFound, find_cached_weights, load_pretrained, load_state_dict_file
from ._registry import register_model
from .convnext import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, _unwrap

__all__ = ["UniRepLKNet", "DEFAULT_KERNEL_SIZES", "checkpoint_filter_fn", "load_checkpoint"]

_K3, _K13 = 3, 13
#: depths -> the paper's per-block kernel sizes (the official defaults).
DEFAULT_KERNEL_SIZES: Dict[Tuple[int, ...], Tuple[Tuple[int, ...], ...]] = {
    (2, 2, 6, 2): ((3,) * 2, (13,) * 2, (13,) * 6, (13,) * 2),                      # A, F, P
    (2, 2, 8, 2): ((3,) * 2, (13,) * 2, (13,) * 8, (13,) * 2),                      # N
    (3, 3, 18, 3): ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3),                   # T
    (3, 3, 27, 3): ((3,) * 3, (13,) * 3, (13, 3, 3) * 9, (13,) * 3),                # S, B, L, XL
}


def _positive_int(name: str, v) -> int:
    return positive_int("UniRepLKNet", name, v)


def _probability(name: str, v) -> float:
    return probability("UniRepLKNet", name, v)


class _ReparamModelMixin(StagedBackbone, Reparameterizable):
    """What UniRepLKNet and RepLKNet share: ``reparameterize``, feature extraction, input
    checks, ``pretrained_cfg``. Subclasses define ``_stage_modules()``, ``_stem_forward``,
    ``_stage_forward(i, x)`` and ``_family``."""

    _family = "model"

    def reparameterize(self) -> None:
        """Switches the whole model to its deploy form in place (see
        :func:`fastvis.reparameterize`); a no-op if it is already there."""
        for m in list(self.modules()):
            if m is not self and isinstance(m, Reparameterizable):
                m.reparameterize()
        self.deploy = True

    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError(f"fastvis {self._family}: gradient checkpointing is not implemented")

    def _forward_feature_list(self, x: torch.Tensor) -> List[torch.Tensor]:
        self._check_input(x)
        x = x.contiguous(memory_format=torch.channels_last)
        out = []
        for i in range(self._num_stages_kept()):
            x = self._stage_forward(i, x)
            if i in self.out_indices:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self._forward_feature_list(x)
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ timm API

    def get_classifier(self) -> nn.Module:
        self._check_not_features("get_classifier")
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self._check_not_features("reset_classifier")
        if global_pool not in (None, "avg"):
            raise ValueError(f"reset_classifier: only global_pool='avg' is supported, got {global_pool!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(f"reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = int(num_classes)
        w = self.norm.weight
        self.head = (Linear(self.num_features, self.num_classes, device=w.device, dtype=w.dtype)
                     if self.num_classes > 0 else nn.Identity())
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=self.num_classes)


class UniRepLKNet(_ReparamModelMixin, nn.Module):
    """UniRepLKNet with the official names.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for none (``forward`` then returns the pooled,
            normalised features).
        depths, dims: blocks and channels per stage.
        kernel_sizes: one tuple per stage with each block's kernel size (0, 3, 5 or a
            Dilated Reparam Block size 7..17); None takes the paper's default for ``depths``
            (:data:`DEFAULT_KERNEL_SIZES`).
        layer_scale_init_value: initial layer scale (None or 0: none).
        head_init_scale: multiplies the initial classifier weight and bias.
        deploy: build the deploy form (merged kernels with bias, no BatchNorms).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks).
        features_only, out_indices: a feature extractor returning the stage outputs.
    """

    _family = "UniRepLKNet"

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 27, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-6, head_init_scale: float = 1.0,
                 kernel_sizes: Optional[Sequence[Sequence[int]]] = None, deploy: bool = False,
                 drop_rate: float = 0.0, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        in_chans = _positive_int("UniRepLKNet: in_chans", in_chans)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(f"UniRepLKNet: num_classes must be an int >= 0, got {num_classes!r}")
        depths = tuple(_positive_int("UniRepLKNet: depths[i]", d) for d in depths)
        dims = tuple(_positive_int("UniRepLKNet: dims[i]", d) for d in dims)
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"UniRepLKNet: depths and dims must have the same non-zero length, got {depths} and {dims}")
        if dims[0] < 2:
            raise ValueError(f"UniRepLKNet: dims[0] must be >= 2 (the stem has dims[0] // 2 channels), got {dims[0]}")
        if kernel_sizes is None:
            if depths not in DEFAULT_KERNEL_SIZES:
                raise ValueError(f"UniRepLKNet: no default kernel sizes for depths {depths} (defaults exist for "
                                 f"{sorted(DEFAULT_KERNEL_SIZES)}); pass kernel_sizes, one tuple per stage")
            kernel_sizes = DEFAULT_KERNEL_SIZES[depths]
        kernel_sizes = tuple(tuple(ks) for ks in kernel_sizes)
        if len(kernel_sizes) != len(depths) or any(len(ks) != d for ks, d in zip(kernel_sizes, depths)):
            raise ValueError(f"UniRepLKNet: kernel_sizes must give one size per block of each stage "
                             f"(depths {depths}), got {kernel_sizes}")
        drop_path_rate = _probability("UniRepLKNet: drop_path_rate", drop_path_rate)
        self.drop_rate = _probability("UniRepLKNet: drop_rate", drop_rate)
        self.num_classes = int(num_classes)
        self.in_chans = in_chans
        self.depths, self.dims, self.kernel_sizes = depths, dims, kernel_sizes
        self.deploy = bool(deploy)
        self.features_only = False
        self.grad_checkpointing = False

        self.downsample_layers = nn.ModuleList([nn.Sequential(
            PatchConv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1, **factory),
            LayerNorm2d(dims[0] // 2, eps=1e-6, **factory),
            nn.GELU(),
            PatchConv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1, **factory),
            LayerNorm2d(dims[0], eps=1e-6, **factory))])
        for i in range(1, len(dims)):
            self.downsample_layers.append(nn.Sequential(
                PatchConv2d(dims[i - 1], dims[i], 3, stride=2, padding=1, **factory),
                LayerNorm2d(dims[i], eps=1e-6, **factory)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        info, cur, stride = [], 0, 4
        for i in range(len(depths)):
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(dims[i], kernel_sizes[i][j], drop_path=rates[cur + j],
                                 layer_scale_init_value=layer_scale_init_value, deploy=self.deploy, **factory)
                for j in range(depths[i])]))
            cur += depths[i]
            stride = 4 if i == 0 else stride * 2
            info.append(dict(num_chs=dims[i], reduction=stride, module=f"stages.{i}"))
        self.feature_info = FeatureInfo(info)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6, **factory)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = Linear(dims[-1], self.num_classes, **factory) if self.num_classes > 0 else nn.Identity()
        self._init_weights(head_init_scale)
        self.pretrained_cfg = _default_cfg(in_chans, self.num_classes)
        if features_only:
            self.as_features(out_indices)

    @torch.no_grad()
    def _init_weights(self, head_init_scale: float) -> None:
        # The official init: trunc_normal(std .02) for every Conv2d / Linear weight (the
        # depthwise ones included), zero biases; BN / LN / GRN / layer scale as constructed.
        if self.downsample_layers[0][0].weight.device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, DepthwiseConv2d)):
                trunc_normal_02_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def _num_stages_kept(self) -> int:
        return len(self.stages)

    def _stage_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_layers[i](x)
        return self.stages[i](x.contiguous(memory_format=torch.channels_last))

    # ------------------------------------------------------------------ timm API

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: (N, in_chans, H, W) -> (N, dims[-1], H/32, W/32), channels_last."""
        self._check_not_features("forward_features")
        self._check_input(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for i in range(len(self.stages)):
            x = self._stage_forward(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, LayerNorm, dropout and (unless ``pre_logits``) the classifier."""
        self._check_not_features("forward_head")
        x = self.norm(x.mean(dim=(-2, -1)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def as_features(self, out_indices: Sequence[int] = (0, 1, 2, 3)) -> "UniRepLKNet":
        """A feature extractor, in place (timm's ``features_only``): ``forward`` returns the
        outputs of the stages in ``out_indices``; later stages and the head are removed."""
        idx, keep = self._features_plan(out_indices)
        self.stages = self.stages[:keep]
        self.downsample_layers = self.downsample_layers[:keep]
        del self.norm, self.head
        self.norm = self.head = None
        return self._become_features(idx, keep)


# ---------------------------------------------------------------------- checkpoints

def _filter(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwraps ``model`` / ``state_dict`` entries and strips ``module.`` / ``model.``
    prefixes; the official keys are this model's, so nothing is renamed."""
    return _unwrap(state_dict)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official UniRepLKNet checkpoints (training or deploy form) -> ``model``'s keys."""
    return _filter(state_dict, model)


def load_reparam_checkpoint(model, checkpoint, filter_fn: Callable, is_deploy_sd: Callable[[Mapping], bool],
                            first_conv: str, classifier: str):
    """Loads a checkpoint into a re-parameterisable model. A deploy-form checkpoint given to a
    training-form model first switches the model to its deploy form (its values are then
    all replaced by the checkpoint's); a training-form checkpoint cannot go into a
    deploy-form model (load it into the training form, then ``fastvis.reparameterize``)."""
    sd = load_state_dict_file(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    sd = filter_fn(sd, model)
    ckpt_deploy = is_deploy_sd(sd)
    if ckpt_deploy and not model.deploy:
        model.reparameterize()
    elif model.deploy and not ckpt_deploy:
        raise ValueError(
            f"{type(model).__name__}: this is a training-form checkpoint (separate branches and BatchNorms) "
            "but the model was built with deploy=True. Build it with deploy=False, load the checkpoint, "
            "then call fastvis.reparameterize(model)")
    load_pretrained(model, sd, None, first_conv=first_conv, classifier=classifier)
    return model


def _is_deploy_sd(sd: Mapping[str, Any]) -> bool:
    # Every training-form block has its pwconv2 BatchNorm; no deploy-form block has one.
    return not any(".pwconv2.2." in k for k in sd)


def load_checkpoint(model: UniRepLKNet, checkpoint: Union[str, Mapping[str, Any]]) -> UniRepLKNet:
    """Loads an official checkpoint (a local file or a state dict, training or deploy form)
    strictly, except for a classifier of another size and the first convolution's input
    channels (timm's rules). See :func:`load_reparam_checkpoint` for the forms."""
    return load_reparam_checkpoint(model, checkpoint, checkpoint_filter_fn, _is_deploy_sd,
                                   "downsample_layers.0.0", "head")


# ---------------------------------------------------------------------- models

def _default_cfg(in_chans: int = 3, num_classes: int = 1000, **kw) -> Dict[str, Any]:
    cfg = {"input_size": (in_chans, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
           "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
           "num_classes": num_classes, "first_conv": "downsample_layers.0.0", "classifier": "head"}
    cfg.update(kw)
    return cfg


def create_reparam_model(cls, variant: str, pretrained: bool, cfg: Dict[str, Any], loader: Callable,
                         pretrained_path: Optional[str] = None, pretrained_tag: Optional[str] = None,
                         features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs):
    """Builds ``cls(**kwargs)``, loads local weights if asked (never downloading), then turns
    it into a feature extractor if asked."""
    model = cls(**kwargs)
    cfg = dict(cfg, architecture=variant, num_classes=model.num_classes,
               input_size=(model.in_chans,) + tuple(cfg["input_size"][1:]))
    if pretrained:
        path = pretrained_path
        if path is None:
            path, looked = find_cached_weights(cfg)
            if path is None:
                where = "; ".join(looked) if looked else "no known file name for this model"
                raise PretrainedWeightsNotFound(
                    f"create_model({variant!r}, pretrained=True): no local weights found, and fastvis "
                    f"never downloads anything. Looked in: {where}. Pass a local file of the official "
                    "checkpoint (training or deploy form) with pretrained_path='/path/to/file.pth'.")
        loader(model, path)
        cfg["file"] = str(path)
    model.pretrained_cfg = cfg
    if features_only:
        model.as_features(out_indices)
    return model


# variant -> (dims, depths, official file name of the default weights, cfg overrides)
_VARIANTS = {
    "unireplknet_a": ((40, 80, 160, 320), (2, 2, 6, 2), "unireplknet_a_in1k_224_acc77.03.pth", {}),
    "unireplknet_f": ((48, 96, 192, 384), (2, 2, 6, 2), "unireplknet_f_in1k_224_acc78.58.pth", {}),
    "unireplknet_p": ((64, 128, 256, 512), (2, 2, 6, 2), "unireplknet_p_in1k_224_acc80.23.pth", {}),
    "unireplknet_n": ((80, 160, 320, 640), (2, 2, 8, 2), "unireplknet_n_in1k_224_acc81.64.pth", {}),
    "unireplknet_t": ((80, 160, 320, 640), (3, 3, 18, 3), "unireplknet_t_in1k_224_acc83.21.pth", {}),
    "unireplknet_s": ((96, 192, 384, 768), (3, 3, 27, 3), "unireplknet_s_in1k_224_acc83.91.pth", {}),
    "unireplknet_b": ((128, 256, 512, 1024), (3, 3, 27, 3), "unireplknet_b_in22k_to_in1k_384_acc87.40.pth",
                      {"input_size": (3, 384, 384), "pool_size": (12, 12), "crop_pct": 1.0}),
    "unireplknet_l": ((192, 384, 768, 1536), (3, 3, 27, 3), "unireplknet_l_in22k_to_in1k_384_acc87.88.pth",
                      {"input_size": (3, 384, 384), "pool_size": (12, 12), "crop_pct": 1.0}),
    "unireplknet_xl": ((256, 512, 1024, 2048), (3, 3, 27, 3), "unireplknet_xl_in22k_to_in1k_384_acc87.96.pth",
                       {"input_size": (3, 384, 384), "pool_size": (12, 12), "crop_pct": 1.0}),
}


def _build(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> UniRepLKNet:
    dims, depths, file_name, extra = _VARIANTS[variant]
    cfg = _default_cfg(**extra, file_name=file_name)
    args = dict(dims=dims, depths=depths)
    args.update(kwargs)
    return create_reparam_model(UniRepLKNet, variant, pretrained, cfg, load_checkpoint, **args)


@register_model
def unireplknet_a(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_a", pretrained, kwargs)


@register_model
def unireplknet_f(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_f", pretrained, kwargs)


@register_model
def unireplknet_p(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_p", pretrained, kwargs)


@register_model
def unireplknet_n(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_n", pretrained, kwargs)


@register_model
def unireplknet_t(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_t", pretrained, kwargs)


@register_model
def unireplknet_s(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_s", pretrained, kwargs)


@register_model
def unireplknet_b(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_b", pretrained, kwargs)


@register_model
def unireplknet_l(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_l", pretrained, kwargs)


@register_model
def unireplknet_xl(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return _build("unireplknet_xl", pretrained, kwargs)
