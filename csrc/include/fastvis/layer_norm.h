// fastvis: LayerNorm over the channels of a logical (N, C, H, W) tensor (op family 2).
//
// Semantics are those of timm's LayerNorm2d (ConvNeXt): every pixel's C values are
// normalised on their own,
//
//     mean = sum_c x[c] / C,   var = sum_c (x[c] - mean)^2 / C   (biased),
//     rstd = 1 / sqrt(var + eps),
//     y[c] = (x[c] - mean) * rstd * weight[c] + bias[c],
//
// i.e. F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias, eps).permute(0, 3, 1, 2).
// weight and bias are optional 1-D tensors of C elements (absent: 1 and 0).
//
// Activations are stored channels-last (NHWC, the fast layout: each pixel's channels
// are contiguous) or contiguous NCHW; x, y, grad_y and grad_x must share one of them.
// Per-pixel statistics `mean` and `rstd` are dense row-major (N, H, W) tensors in the
// accumulation type (float32 for float32/bfloat16 activations, float64 for float64):
// the forward pass can store them, the backward pass reads them (no recomputation).
//
// CPU: float32, float64, bfloat16 (float32 accumulation). No CUDA kernels yet: CUDA
// tensors are refused with a RuntimeError (the Python layer falls back to PyTorch).
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"  // TensorView, Layout

namespace fastvis {

struct LayerNormShape {
  int64_t n = 0, c = 0, h = 0, w = 0;
  Layout layout = Layout::NHWC;  // layout of x (NCHW also when x is dense in neither:
                                 // only the references accept such strides)
};

// Validates x, the optional weight/bias and eps (> 0, finite); throws fastvis::Error.
LayerNormShape layer_norm_channels_shape(const TensorView& x, const TensorView* weight,
                                         const TensorView* bias, double eps);

// The dtype of the per-pixel statistics for activations of dtype dt.
DType layer_norm_stats_dtype(DType dt);

size_t layer_norm_channels_forward_scratch_bytes(const TensorView& x);
// y = layer_norm(x); mean / rstd ((N, H, W), stats dtype) are written when not null.
void layer_norm_channels_forward(const TensorView& x, const TensorView* weight,
                                 const TensorView* bias, double eps, const TensorView& y,
                                 const TensorView* mean, const TensorView* rstd, void* scratch,
                                 size_t scratch_bytes);

size_t layer_norm_channels_backward_scratch_bytes(const TensorView& x);
// Gradients from grad_y and the forward's statistics. Each of grad_x (shape and layout of
// x), grad_weight and grad_bias (C) may be null (not computed); grad_weight with a null
// weight is the gradient of an all-ones weight. The weight/bias gradients reduce over
// all pixels with per-chunk partial sums (a split that depends only on the shape) and a
// fixed-order reduction: bit-identical run to run and for any thread count.
void layer_norm_channels_backward(const TensorView& grad_y, const TensorView& x,
                                  const TensorView* weight, const TensorView& mean,
                                  const TensorView& rstd, const TensorView* grad_x,
                                  const TensorView* grad_weight, const TensorView* grad_bias,
                                  void* scratch, size_t scratch_bytes);

// Scalar references (CPU, any supported dtype and strides, double accumulation). The
// backward reference computes its own statistics from x and eps. No scratch.
void layer_norm_channels_forward_reference(const TensorView& x, const TensorView* weight,
                                           const TensorView* bias, double eps,
                                           const TensorView& y, const TensorView* mean,
                                           const TensorView* rstd);
void layer_norm_channels_backward_reference(const TensorView& grad_y, const TensorView& x,
                                            const TensorView* weight, double eps,
                                            const TensorView* grad_x,
                                            const TensorView* grad_weight,
                                            const TensorView* grad_bias);

}  // namespace fastvis
