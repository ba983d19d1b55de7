// fastvis: the public C++ API of the core. Framework-free: no PyTorch header.
#pragma once
#include "fastvis/build_info.h"
#include "fastvis/convnext_block.h"
#include "fastvis/depthwise_conv.h"
#include "fastvis/dilated_reparam.h"
#include "fastvis/error.h"
#include "fastvis/grn.h"
#include "fastvis/inception_dwconv.h"
#include "fastvis/layer_norm.h"
#include "fastvis/metanext_block.h"
#include "fastvis/patch_conv.h"
#include "fastvis/tensor.h"
#include "fastvis/threading.h"
