"""fastvis modules, with the parameter names of their PyTorch/timm counterparts."""
from .depthwise_conv import DepthwiseConv2d

__all__ = ["DepthwiseConv2d"]
