// fastvis: patch convolution ("patchify"): a dense 2-D convolution whose stride equals its
// kernel, no padding, no dilation, one group (op family 8):
//
//     y = F.conv2d(x, weight, bias, stride=(kh, kw))
//
// with weight of shape (Cout, Cin, kh, kw). These are the stems (4x4, stride 4) and the
// downsampling layers (2x2, stride 2) of ConvNeXt-style networks. The patches do not
// overlap, so the convolution is one GEMM: each output pixel's patch, gathered as a row
// of Cin*kh*kw values in the weight's memory order ((ci, i, j) for a row-major weight,
// (i, j, ci) for a channels_last one), times the weight viewed as a (Cout, Cin*kh*kw)
// row-major matrix. Input rows/columns that do not fill a whole patch
// are ignored, as conv2d does (OH = H / kh, OW = W / kw, rounded down).
//
// Forward only (inference): the Python layer runs PyTorch's convolution when gradients
// are needed. CPU, float32 and float64. x may have any strides (NCHW, NHWC, views: the
// gather reads through them); weight must be dense, row-major or channels_last (the
// gather follows its order); y is NHWC (channels_last)
// dense. Work is split into tiles of output pixels (the patch rows of a tile gathered into
// per-thread scratch, one BLAS GEMM written straight into y); when there are too few tiles
// to share, each GEMM is split over the pool instead.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

struct PatchConv2dShape {
  int64_t n = 0, cin = 0, h = 0, w = 0;  // x
  int64_t cout = 0, kh = 0, kw = 0;      // weight
  int64_t oh = 0, ow = 0;                // y
  bool weight_hwc = false;  // weight is channels_last: patches gathered in (i, j, ci) order
};

// Validates x, weight and bias (may be null); throws fastvis::Error.
PatchConv2dShape patch_conv2d_shape(const TensorView& x, const TensorView& weight,
                                    const TensorView* bias);

size_t patch_conv2d_forward_scratch_bytes(const TensorView& x, const TensorView& weight);
// y (N, Cout, OH, OW), NHWC-dense, x's dtype and device.
void patch_conv2d_forward(const TensorView& x, const TensorView& weight, const TensorView* bias,
                          const TensorView& y, void* scratch, size_t scratch_bytes);

}  // namespace fastvis
