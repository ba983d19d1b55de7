// fastvis: patch convolution ("patchify"): a dense 2-D convolution, one group, no dilation
// (op family 8):
//
//     y = F.conv2d(x, weight, bias, stride, padding)
//
// with weight of shape (Cout, Cin, kh, kw), stride = the kernel size and no padding by
// default (the stems, 4x4 stride 4, and downsampling layers, 2x2 stride 2, of ConvNeXt-style
// networks: patches that do not overlap), any stride and zero padding otherwise (e.g. the
// 3x3 stride-2 stems and downsampling layers of UniRepLKNet). Either way the convolution is
// one GEMM: each output pixel's patch, gathered as a row of Cin*kh*kw values in the
// weight's memory order ((ci, i, j) for a row-major weight, (i, j, ci) for a channels_last
// one; zeros where the patch reaches into the padding), times the weight viewed as a
// (Cout, Cin*kh*kw) row-major matrix. Input rows/columns that no patch reaches are ignored,
// as conv2d does (OH = (H + 2 pad_h - kh) / stride_h + 1, rounded down).
//
// Forward, and the weight / bias gradients for training (below; the Python layer takes
// the input gradient from PyTorch). CPU, float32 and float64. x may have any strides (NCHW, NHWC, views: the
// gather reads through them); weight must be dense, row-major, channels_last or k-major
// ((kh, kw, Cin, Cout) in memory: the GEMM then multiplies by a (K x Cout) row-major
// matrix, the faster product for small tiles; the inference caches of the Python layer
// pass this layout) -- the gather follows its order; y is NHWC (channels_last) dense. Work is split into tiles of
// output pixels (the patch rows of a tile gathered into per-thread scratch, one BLAS GEMM
// written straight into y); when there are too few tiles to share, each GEMM is split
// over the pool instead.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

// Stride and zero padding. The default (stride 0 = the kernel size, no padding) is the
// patch convolution proper; any other stride and padding make it a general dense
// convolution (overlapping patches, e.g. UniRepLKNet's 3x3 stride-2 stem and downsampling
// layers), computed the same way: OH = (H + 2 pad_h - kh) / stride_h + 1, patch values
// outside the image are zeros.
//
// Optionally with a LayerNorm over channels fused in (ConvNeXt's stem: conv then LayerNorm;
// its downsampling layers: LayerNorm then conv), with timm LayerNorm2d semantics (biased
// variance, eps inside the square root, optional affine weight / bias):
//   Before: every input pixel's Cin values are normalised (as they are gathered; the
//           padding stays zero: y = conv(pad(LN(x))));
//   After:  every output pixel's Cout values are normalised after the bias.
enum class PatchNorm { None = 0, Before = 1, After = 2 };

struct PatchConv2dParams {
  int64_t stride_h = 0, stride_w = 0;  // 0: the kernel size
  int64_t pad_h = 0, pad_w = 0;        // each side
  PatchNorm norm = PatchNorm::None;
  const TensorView* norm_weight = nullptr;  // (Cin) for Before, (Cout) for After; null: 1
  const TensorView* norm_bias = nullptr;    // likewise; null: 0
  double norm_eps = 1e-6;                   // > 0, finite
};

struct PatchConv2dShape {
  int64_t n = 0, cin = 0, h = 0, w = 0;  // x
  int64_t cout = 0, kh = 0, kw = 0;      // weight
  int64_t sh = 0, sw = 0, ph = 0, pw = 0;  // stride, padding (stride resolved: >= 1)
  int64_t oh = 0, ow = 0;                // y
  bool weight_hwc = false;  // weight is channels_last: patches gathered in (i, j, ci) order
  bool weight_kmajor = false;  // weight is (kh, kw, Cin, Cout) in memory (gathered as hwc)
};

// Validates x, weight, bias (may be null) and the params; throws fastvis::Error.
PatchConv2dShape patch_conv2d_shape(const TensorView& x, const TensorView& weight,
                                    const TensorView* bias, const PatchConv2dParams& p = {});

size_t patch_conv2d_forward_scratch_bytes(const TensorView& x, const TensorView& weight,
                                          const PatchConv2dParams& p = {});
// y (N, Cout, OH, OW), NHWC-dense, x's dtype and device.
void patch_conv2d_forward(const TensorView& x, const TensorView& weight, const TensorView* bias,
                          const TensorView& y, void* scratch, size_t scratch_bytes,
                          const PatchConv2dParams& p = {});

// The weight (and bias) gradient, for training (norm must be None): grad_weight = the sum
// over output pixels of grad_y's Cout values times the pixel's patch (the GEMM
// grad_y^T * patches, over chunks of pixels whose patches are gathered into scratch, each
// product split over the pool by output columns), grad_bias = grad_y summed over pixels
// (in double). grad_y (N, Cout, OH, OW) NHWC-dense; grad_weight with the weight's shape
// and strides (its memory order is the gather's); grad_bias (Cout) or null. The split
// depends on the shape only: results do not depend on the thread count. The input
// gradient is not computed here (the Python layer takes PyTorch's).
size_t patch_conv2d_backward_weight_scratch_bytes(const TensorView& x, const TensorView& weight,
                                                  const PatchConv2dParams& p = {});
void patch_conv2d_backward_weight(const TensorView& grad_y, const TensorView& x,
                                  const TensorView& weight, const TensorView& grad_weight,
                                  const TensorView* grad_bias, void* scratch, size_t scratch_bytes,
                                  const PatchConv2dParams& p = {});

}  // namespace fastvis
