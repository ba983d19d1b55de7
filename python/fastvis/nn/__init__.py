"""fastvis modules, with the parameter names of their PyTorch/timm counterparts."""
from .convnext import ConvNeXtBlock, ConvNeXtMlp, drop_path_scale
from .depthwise_conv import DepthwiseConv2d
from .dilated_reparam import DILATED_BRANCHES, DilatedReparamBlock
from .grn import GlobalResponseNorm
from .inception_dwconv import InceptionDWConv2d
from .layer_norm import LayerNorm2d
from .linear import Linear
from .metanext import ConvMlp, MetaNeXtBlock
from .patch_conv import PatchConv2d, PatchConvBN, PatchConvLN
from .reparam import Reparameterizable, reparameterize
from .replk import ConvBN, ConvFFN, RepLKBlock, ReparamLargeKernelConv
from .unireplknet import SEBlock, UniRepLKNetBlock, UniRepLKNetGRN

__all__ = [
    "ConvBN",
    "ConvFFN",
    "ConvMlp",
    "ConvNeXtBlock",
    "ConvNeXtMlp",
    "DILATED_BRANCHES",
    "DepthwiseConv2d",
    "DilatedReparamBlock",
    "GlobalResponseNorm",
    "InceptionDWConv2d",
    "LayerNorm2d",
    "Linear",
    "MetaNeXtBlock",
    "PatchConv2d",
    "PatchConvBN",
    "PatchConvLN",
    "RepLKBlock",
    "ReparamLargeKernelConv",
    "Reparameterizable",
    "SEBlock",
    "UniRepLKNetBlock",
    "UniRepLKNetGRN",
    "drop_path_scale",
    "reparameterize",
]
