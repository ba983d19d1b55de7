// fastvis: fused multi-branch depthwise convolution + BatchNorm, training mode (op family 5).
//
// UniRepLKNet's dilated re-param block and RepLKNet's large kernel with its parallel small
// kernel are, in training,
//
//     y = sum_b BN_b(conv_b(x)),
//
// each branch b a depthwise convolution (C channels, kernel k_b x k_b with k_b odd,
// dilation d_b, "same" padding d_b*(k_b-1)/2, stride 1, no bias) followed by its own
// BatchNorm over (N, H, W) with the batch statistics (biased variance, eps added under the
// square root) and the affine parameters gamma_b, beta_b. The first branch sets the merged
// kernel extent E = d_0*(k_0-1)+1; every branch's extent d_b*(k_b-1)+1 must be <= E (and
// E <= 63).
//
// The forward pass returns y and each branch's batch mean and biased variance ((B, C),
// float32, float64 for float64 activations); the caller updates running statistics (the
// unbiased variance is var * M / (M - 1), M = N*H*W). The backward pass takes those
// statistics back instead of recomputing them.
//
// Activations: channels-last (NHWC, the fast layout) or contiguous NCHW; x, y, grad_y and
// grad_x share one layout. Every reduction uses a shape-determined split and a fixed order:
// results are bit-identical run to run and for any thread count.
//
// CPU only. Forward: float32, float64, bfloat16 (float32 accumulation and statistics).
// Backward: float32, float64 (the Python layer runs bfloat16 backward in float32).
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

// The branches, as parallel arrays of `count` entries.
struct DilatedReparamBranches {
  int64_t count = 0;
  const TensorView* weight = nullptr;     // (C, 1, k, k) or (C, k, k), x's dtype, k odd
  const int64_t* dilation = nullptr;      // >= 1
  const TensorView* bn_weight = nullptr;  // gamma, (C), x's dtype
  const TensorView* bn_bias = nullptr;    // beta, (C), x's dtype
};

struct DilatedReparamShape {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t branches = 0;
  int64_t extent = 0;  // E, the merged kernel's size
  Layout layout = Layout::NHWC;
};

// Validates x, the branches and eps (throws fastvis::Error) and returns the shapes.
// Training needs more than one value per channel: N*H*W > 1.
DilatedReparamShape dilated_reparam_shape(const TensorView& x, const DilatedReparamBranches& br,
                                          double eps);

// The dtype of the statistics for activations of dtype dt.
DType dilated_reparam_stats_dtype(DType dt);

size_t dilated_reparam_forward_scratch_bytes(const TensorView& x,
                                             const DilatedReparamBranches& br);
// y = sum_b BN_b(conv_b(x)) with batch statistics; mean and var ((B, C), stats dtype,
// row-major) receive each branch's batch mean and biased variance.
void dilated_reparam_forward(const TensorView& x, const DilatedReparamBranches& br, double eps,
                             const TensorView& y, const TensorView& mean, const TensorView& var,
                             void* scratch, size_t scratch_bytes);

size_t dilated_reparam_backward_scratch_bytes(const TensorView& x,
                                              const DilatedReparamBranches& br);
// Gradients given grad_y, x and the forward's mean / var (same eps). grad_x (x's shape and
// layout) may be null; grad_weight, grad_bn_weight, grad_bn_bias are arrays of br.count
// views (each array may be null: not computed).
void dilated_reparam_backward(const TensorView& grad_y, const TensorView& x,
                              const DilatedReparamBranches& br, const TensorView& mean,
                              const TensorView& var, double eps, const TensorView* grad_x,
                              const TensorView* grad_weight, const TensorView* grad_bn_weight,
                              const TensorView* grad_bn_bias, void* scratch,
                              size_t scratch_bytes);

}  // namespace fastvis
