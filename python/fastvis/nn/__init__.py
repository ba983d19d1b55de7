"""fastvis modules, with the parameter names of their PyTorch/timm counterparts."""
from .depthwise_conv import DepthwiseConv2d
from .grn import GlobalResponseNorm
from .layer_norm import LayerNorm2d

__all__ = ["DepthwiseConv2d", "GlobalResponseNorm", "LayerNorm2d"]
