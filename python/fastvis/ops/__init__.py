"""fastvis ops: torch custom ops over the core, each with a pure-PyTorch reference."""
from .batch_norm_se import batch_norm_se, batch_norm_se_reference
from .depthwise_conv import depthwise_conv2d, depthwise_conv2d_reference, normalize_conv_args
from .dilated_reparam import dilated_reparam_conv, dilated_reparam_conv_reference, merge_branches
from .convnext_block import (convnext_block, convnext_block_reference, dwconv_mlp_block,
                             dwconv_mlp_block_reference)
from .grn import global_response_norm, global_response_norm_reference
from .inception_dwconv import inception_depthwise_conv2d, inception_depthwise_conv2d_reference
from .layer_norm import layer_norm_channels, layer_norm_channels_reference
from .linear import linear
from .mlp import mlp, mlp_reference
from .metanext_block import fold_affine_into_fc1, metanext_block, metanext_block_reference
from .patch_conv import patch_conv2d, patch_conv2d_reference

__all__ = [
    "batch_norm_se",
    "batch_norm_se_reference",
    "convnext_block",
    "convnext_block_reference",
    "dwconv_mlp_block",
    "dwconv_mlp_block_reference",
    "depthwise_conv2d",
    "depthwise_conv2d_reference",
    "dilated_reparam_conv",
    "dilated_reparam_conv_reference",
    "merge_branches",
    "normalize_conv_args",
    "layer_norm_channels",
    "layer_norm_channels_reference",
    "global_response_norm",
    "global_response_norm_reference",
    "fold_affine_into_fc1",
    "metanext_block",
    "metanext_block_reference",
    "linear",
    "mlp",
    "mlp_reference",
    "inception_depthwise_conv2d",
    "inception_depthwise_conv2d_reference",
    "patch_conv2d",
    "patch_conv2d_reference",
]
