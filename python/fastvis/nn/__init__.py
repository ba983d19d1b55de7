"""fastvis modules, with the parameter names of their PyTorch/timm counterparts."""
from .convnext import ConvNeXtBlock, ConvNeXtMlp, drop_path_scale
from .depthwise_conv import DepthwiseConv2d
from .grn import GlobalResponseNorm
from .inception_dwconv import InceptionDWConv2d
from .layer_norm import LayerNorm2d
from .metanext import ConvMlp, MetaNeXtBlock

__all__ = [
    "ConvMlp",
    "ConvNeXtBlock",
    "ConvNeXtMlp",
    "DepthwiseConv2d",
    "GlobalResponseNorm",
    "InceptionDWConv2d",
    "LayerNorm2d",
    "MetaNeXtBlock",
    "drop_path_scale",
]
