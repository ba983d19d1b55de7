"""The fastvis model zoo: timm-compatible architectures on fastvis kernels.

``fastvis.create_model(name, ...)`` builds a registered model, ``fastvis.list_models()``
lists them. Families: ConvNeXt / ConvNeXt-V2 (:mod:`fastvis.models.convnext`),
InceptionNeXt (:mod:`fastvis.models.inception_next`), UniRepLKNet
(:mod:`fastvis.models.unireplknet`), RepLKNet (:mod:`fastvis.models.replknet`).
"""
from ._registry import create_model, is_model, list_models, model_entrypoint, register_model
from ._features import FeatureInfo
from ._pretrained import PretrainedWeightsNotFound, load_state_dict_file
from . import convnext
from .convnext import ConvNeXt, checkpoint_filter_fn, load_checkpoint
from . import inception_next
from .inception_next import MetaNeXt
from . import replknet, unireplknet
from .replknet import RepLKNet
from .unireplknet import UniRepLKNet

__all__ = [
    "ConvNeXt",
    "FeatureInfo",
    "MetaNeXt",
    "PretrainedWeightsNotFound",
    "RepLKNet",
    "UniRepLKNet",
    "checkpoint_filter_fn",
    "convnext",
    "create_model",
    "inception_next",
    "is_model",
    "list_models",
    "load_checkpoint",
    "load_state_dict_file",
    "model_entrypoint",
    "register_model",
    "replknet",
    "unireplknet",
]
