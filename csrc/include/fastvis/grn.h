// fastvis: Global Response Normalization of a logical (N, C, H, W) tensor (op family 3).
//
// Semantics are those of ConvNeXt-V2's GRN layer (timm's GlobalResponseNorm):
//
//     G[n, c]  = sqrt(sum_{h, w} x[n, c, h, w]^2)        (L2 norm over the image)
//     d[n]     = mean_c G[n, c] + eps                    (eps added after the mean)
//     Nx[n, c] = G[n, c] / d[n]
//     y        = x + bias[c] + weight[c] * x * Nx[n, c]
//
// weight and bias are required 1-D tensors of C elements (timm initialises both to zero,
// which makes the layer the identity).
//
// Activations are stored channels-last (NHWC, the fast layout) or contiguous NCHW; x, y,
// grad_y and grad_x must share one of them. The per-(n, c) norms G are a dense row-major
// (N, C) tensor in the accumulation type (float32 for float32/bfloat16 activations,
// float64 for float64): the forward pass can store them, the backward pass reads them
// and rebuilds d and Nx from them exactly as the forward pass did (no pass over x).
//
// Every reduction over pixels (the norms, and in the backward pass the per-(n, c) sums
// of grad_y * x and grad_y) is cut into pixel chunks that depend only on the shape, each
// chunk writes its own partial sums and a fixed-order reduction finishes: results are
// bit-identical run to run and for any thread count.
//
// CPU: float32, float64, bfloat16 (float32 accumulation). No CUDA kernels yet: CUDA
// tensors are refused with a RuntimeError (the Python layer falls back to PyTorch).
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"  // TensorView, Layout

namespace fastvis {

// An activation applied to x before the normalization (a fused prologue): the layer then
// computes y = grn(act(x)), the norms are those of act(x), and the backward pass returns
// the gradient with respect to x (the pre-activation). act(x) is never stored: each pass
// recomputes it from x. Gelu is the exact (erf) GELU, GeluTanh the tanh approximation;
// float32/bfloat16 evaluate them with the SIMD forms of the fused blocks (absolute error
// of Phi below 1.5e-7), float64 with the C library's erfc / tanh.
enum class GrnActivation : int { None = 0, Gelu = 1, GeluTanh = 2 };

struct GrnShape {
  int64_t n = 0, c = 0, h = 0, w = 0;
  Layout layout = Layout::NHWC;  // layout of x (NCHW also when x is dense in neither:
                                 // only the references accept such strides)
};

// Validates x, weight, bias (bias may be null: the backward entry points have none) and
// eps (> 0, finite); throws fastvis::Error.
GrnShape global_response_norm_shape(const TensorView& x, const TensorView& weight,
                                    const TensorView* bias, double eps);

// The dtype of the per-(n, c) norms for activations of dtype dt.
DType global_response_norm_stats_dtype(DType dt);

size_t global_response_norm_forward_scratch_bytes(const TensorView& x);
// y = grn(act(x)); norm ((N, C), stats dtype) receives G when not null.
void global_response_norm_forward(const TensorView& x, const TensorView& weight,
                                  const TensorView& bias, double eps, const TensorView& y,
                                  const TensorView* norm, void* scratch, size_t scratch_bytes,
                                  GrnActivation act = GrnActivation::None);

// The forward's second pass alone: y = grn(act(x)) from the norms G an earlier forward
// call stored for the same x (one pass over x instead of two; recomputation in a
// backward pass). Scratch: global_response_norm_forward_scratch_bytes.
void global_response_norm_apply(const TensorView& x, const TensorView& weight,
                                const TensorView& bias, double eps, const TensorView& norm,
                                const TensorView& y, void* scratch, size_t scratch_bytes,
                                GrnActivation act = GrnActivation::None);

size_t global_response_norm_backward_scratch_bytes(const TensorView& x);
// Gradients from grad_y, x and the forward's norms (with the forward's eps and act;
// grad_x is the gradient with respect to x, through the activation). With y (shape and
// layout of x; bias then required), the reduction pass also writes the forward output
// grn(act(x)) recomputed from the norms, for callers that need it in their own backward
// (a following linear layer's weight gradient) without a pass of their own. Each of
// grad_x (shape and layout of x), grad_weight and grad_bias (C) may be null (not
// computed).
void global_response_norm_backward(const TensorView& grad_y, const TensorView& x,
                                   const TensorView& weight, const TensorView& norm, double eps,
                                   const TensorView* grad_x, const TensorView* grad_weight,
                                   const TensorView* grad_bias, void* scratch,
                                   size_t scratch_bytes,
                                   GrnActivation act = GrnActivation::None,
                                   const TensorView* bias = nullptr,
                                   const TensorView* y = nullptr);

// Scalar references (CPU, any supported dtype and strides, double accumulation). The
// backward reference computes its own norms from x. No scratch.
void global_response_norm_forward_reference(const TensorView& x, const TensorView& weight,
                                            const TensorView& bias, double eps,
                                            const TensorView& y, const TensorView* norm);
void global_response_norm_backward_reference(const TensorView& grad_y, const TensorView& x,
                                             const TensorView& weight, double eps,
                                             const TensorView* grad_x,
                                             const TensorView* grad_weight,
                                             const TensorView* grad_bias);

}  // namespace fastvis
