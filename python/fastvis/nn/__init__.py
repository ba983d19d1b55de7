"""fastvis modules, with the parameter names of their PyTorch/timm counterparts."""
from .convnext import ConvNeXtBlock, ConvNeXtMlp, drop_path_scale
from .depthwise_conv import DepthwiseConv2d
from .grn import GlobalResponseNorm
from .layer_norm import LayerNorm2d

__all__ = [
    "ConvNeXtBlock",
    "ConvNeXtMlp",
    "DepthwiseConv2d",
    "GlobalResponseNorm",
    "LayerNorm2d",
    "drop_path_scale",
]
