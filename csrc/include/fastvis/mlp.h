// fastvis: the pointwise MLP of the vision blocks, for training (op family 3, fused blocks).
//
//     y = fc2(GRN?(GELU(fc1(x))))
//
// on a logical (N, C, H, W) activation stored channels-last (NHWC): fc1 (hidden, C) and
// fc2 (C, hidden) in nn.Linear layout with optional biases, GELU exact (erf) or the tanh
// approximation, and optionally the ConvNeXt-V2 / UniRepLKNet Global Response
// Normalization of the hidden activations, per image (grn_weight and grn_bias, hidden;
// see convnext_block.h for its formula). The output has x's shape (fc2 maps back to C).
//
// CPU: the fused ConvNeXt block's tile engine without its mixer, norm and residual: tiles
// of image rows go through fc1 -> GELU (-> GRN) -> fc2 as OpenBLAS GEMMs in per-thread
// buffers, so the hidden activations never leave the cache. The backward recomputes fc1
// tile by tile from x (nothing but x is needed: 5 GEMMs per tile instead of 4, all on
// cache-resident tiles) and reduces the parameter gradients in a fixed, shape-determined
// order (bit-identical for any thread count). With GRN, forward and backward take the
// block's extra statistics passes. float32, float64 and bfloat16 (float32 inside). CUDA
// tensors are refused.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

struct MlpWeights {
  const TensorView* fc1_weight = nullptr;  // (hidden, C) required
  const TensorView* fc1_bias = nullptr;    // (hidden)
  const TensorView* fc2_weight = nullptr;  // (C, hidden) required
  const TensorView* fc2_bias = nullptr;    // (C)
  const TensorView* grn_weight = nullptr;  // (hidden), with grn_bias
  const TensorView* grn_bias = nullptr;    // (hidden)
};

struct MlpParams {
  bool gelu_tanh = false;  // the tanh approximation of GELU instead of erf
  double grn_eps = 1e-6;   // GRN epsilon (added to the mean of the norms)
};

// Gradients to compute; null = not wanted. grad x: x's shape, NHWC, x's dtype; parameter
// gradients: their parameter's shape, contiguous.
struct MlpGrads {
  const TensorView* x = nullptr;
  const TensorView* fc1_weight = nullptr;
  const TensorView* fc1_bias = nullptr;
  const TensorView* fc2_weight = nullptr;
  const TensorView* fc2_bias = nullptr;
  const TensorView* grn_weight = nullptr;
  const TensorView* grn_bias = nullptr;
};

struct MlpShape {
  int64_t n = 0, c = 0, h = 0, w = 0, hidden = 0;
};

// Validates x, the weights and params (throws fastvis::Error) and returns the sizes.
MlpShape mlp_shape(const TensorView& x, const MlpWeights& w, const MlpParams& p);

// grn_stats (GRN only, optional): GRN's statistics, kept from the forward for the
// backward: per image row, the sums over the row's pixels of the squared hidden
// activations, a contiguous [N][H][hidden] tensor in the accumulation type (float32;
// float64 for float64 tensors). mlp_forward writes them; mlp_backward given them skips the
// statistics pass that would recompute them (fc1 and GELU of every tile). The values are
// the ones that pass computes, so the results are bitwise the same either way.
size_t mlp_forward_scratch_bytes(const TensorView& x, const MlpWeights& w, const MlpParams& p);
// y: x's shape and dtype, channels-last, not overlapping x.
void mlp_forward(const TensorView& x, const MlpWeights& w, const MlpParams& p,
                 const TensorView& y, void* scratch, size_t scratch_bytes,
                 const TensorView* grn_stats = nullptr);

size_t mlp_backward_scratch_bytes(const TensorView& x, const MlpWeights& w, const MlpParams& p);
// grad_y: x's shape and dtype, channels-last. grads.x must not overlap x or grad_y.
void mlp_backward(const TensorView& grad_y, const TensorView& x, const MlpWeights& w,
                  const MlpParams& p, const MlpGrads& grads, void* scratch,
                  size_t scratch_bytes, const TensorView* grn_stats = nullptr);

}  // namespace fastvis
