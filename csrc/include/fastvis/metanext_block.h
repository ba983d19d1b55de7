// fastvis: the fused MetaNeXt block of InceptionNeXt, inference (op family 3, fused blocks).
//
//     y = x + drop_scale[n] * gamma * fc2(GELU(fc1(mixer(x))))
//
// on a logical (N, C, H, W) activation stored channels-last (NHWC). mixer: InceptionNeXt's
// inception depthwise conv: channels [0, C - 3g) pass through unchanged, then three
// depthwise convs of g channels each with optional bias, "same" zero padding, stride 1 and
// one dilation: hw (g, 1, ks, ks), w (g, 1, 1, kb), h (g, 1, kb, 1), ks and kb odd. The
// block's BatchNorm (eval mode) is an affine map per channel, which the caller folds into
// fc1 (fc1(a * z + b) = (W1 diag(a)) z + W1 b + b1), so there is no norm here.
//
// CPU: tiles of image rows, as the fused ConvNeXt block (convnext_block.h): per tile the
// mixer (identity copy + the depthwise family's tile kernel per branch), fc1 -> GELU -> fc2
// as OpenBLAS GEMMs, layer scale and residual; only y is written. Forward only (inference):
// training uses the separate ops (the block's BatchNorm needs batch statistics).
// float32, float64, bfloat16 (float32 inside). CUDA tensors are refused.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

struct MetaNeXtBlockWeights {
  const TensorView* hw_weight = nullptr;   // (g, 1, ks, ks) required
  const TensorView* hw_bias = nullptr;     // (g)
  const TensorView* w_weight = nullptr;    // (g, 1, 1, kb) required
  const TensorView* w_bias = nullptr;      // (g)
  const TensorView* h_weight = nullptr;    // (g, 1, kb, 1) required
  const TensorView* h_bias = nullptr;      // (g)
  const TensorView* fc1_weight = nullptr;  // (hidden, C) required (norm folded in)
  const TensorView* fc1_bias = nullptr;    // (hidden)
  const TensorView* fc2_weight = nullptr;  // (C, hidden) required
  const TensorView* fc2_bias = nullptr;    // (C)
  const TensorView* gamma = nullptr;       // (C) layer scale
  const TensorView* drop_scale = nullptr;  // (N)
};

struct MetaNeXtBlockParams {
  int64_t dilation = 1;    // of the three depthwise branches
  bool gelu_tanh = false;  // the tanh approximation of GELU instead of erf
};

struct MetaNeXtBlockShape {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t identity = 0, g = 0, ks = 0, kb = 0, hidden = 0;
};

// Validates x, the weights and params (throws fastvis::Error) and returns the sizes.
MetaNeXtBlockShape metanext_block_shape(const TensorView& x, const MetaNeXtBlockWeights& w,
                                        const MetaNeXtBlockParams& p);

size_t metanext_block_forward_scratch_bytes(const TensorView& x, const MetaNeXtBlockWeights& w,
                                            const MetaNeXtBlockParams& p);
void metanext_block_forward(const TensorView& x, const MetaNeXtBlockWeights& w,
                            const MetaNeXtBlockParams& p, const TensorView& y, void* scratch,
                            size_t scratch_bytes, void* stream = nullptr);

}  // namespace fastvis
