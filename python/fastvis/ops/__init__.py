"""fastvis ops: torch custom ops over the core, each with a pure-PyTorch reference."""
from .depthwise_conv import depthwise_conv2d, depthwise_conv2d_reference, normalize_conv_args

__all__ = ["depthwise_conv2d", "depthwise_conv2d_reference", "normalize_conv_args"]
