"""fastvis ops: torch custom ops over the core, each with a pure-PyTorch reference."""
from .depthwise_conv import depthwise_conv2d, depthwise_conv2d_reference, normalize_conv_args
from .convnext_block import convnext_block, convnext_block_reference
from .grn import global_response_norm, global_response_norm_reference
from .inception_dwconv import inception_depthwise_conv2d, inception_depthwise_conv2d_reference
from .layer_norm import layer_norm_channels, layer_norm_channels_reference

__all__ = [
    "convnext_block",
    "convnext_block_reference",
    "depthwise_conv2d",
    "depthwise_conv2d_reference",
    "normalize_conv_args",
    "layer_norm_channels",
    "layer_norm_channels_reference",
    "global_response_norm",
    "global_response_norm_reference",
    "inception_depthwise_conv2d",
    "inception_depthwise_conv2d_reference",
]
