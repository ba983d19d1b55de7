// fastvis: the Inception depthwise convolution (op family 5), InceptionNeXt's token mixer.
//
// The C channels of a logical (N, C, H, W) activation are split, in this order, into
//
//     identity  [0, C - 3g)          copied unchanged
//     square    [C - 3g, C - 2g)     depthwise kh x kw   (hw_weight (g, 1, kh, kw)), dilation (d, d)
//     band w    [C - 2g, C - g)      depthwise 1 x kbw   (w_weight  (g, 1, 1, kbw)), dilation (1, d)
//     band h    [C - g, C)           depthwise kbh x 1   (h_weight  (g, 1, kbh, 1)), dilation (d, 1)
//
// each convolution with an optional bias (g), stride 1 and "same" zero padding
// d*(k-1)/2 on both sides (timm's get_padding; d*(k-1) must be even, i.e. an odd
// kernel or an even dilation, for the output to keep the input's size), and the
// results land in the same channels of the output: timm's InceptionDWConv2d
// (split -> three nn.Conv2d -> cat) as one op that reads x once and writes y in place,
// with no split, no concatenation and no activation-sized temporary (NHWC).
//
// Layouts: channels-last (NHWC, native: the branches run on channel slices of x and y
// in place) or contiguous NCHW (the 3g branch channels are staged through NHWC scratch;
// the identity planes are copied directly). The output uses the input's layout.
//
// CPU: float32, float64, bfloat16 (float32 accumulation). Weight and bias gradients use
// the depthwise family's deterministic reduction: bit-identical for any thread count.
// CUDA (when built with it): float32, float16, bfloat16 through the depthwise family's
// CUDA kernels on channel slices -- compiled, NOT run on a GPU.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

// Weights are required, biases optional (nullptr).
struct InceptionDWConv2dWeights {
  const TensorView* hw_weight = nullptr;  // (g, 1, kh, kw), InceptionNeXt: square 3x3
  const TensorView* hw_bias = nullptr;    // (g)
  const TensorView* w_weight = nullptr;   // (g, 1, 1, kbw), InceptionNeXt: 1x11 (atto 1x9)
  const TensorView* w_bias = nullptr;     // (g)
  const TensorView* h_weight = nullptr;   // (g, 1, kbh, 1), InceptionNeXt: 11x1 (atto 9x1)
  const TensorView* h_bias = nullptr;     // (g)
};

struct InceptionDWConv2dParams {
  int64_t dilation = 1;  // 1..1024, applied along each branch's kernel extent
};

struct InceptionDWConv2dShape {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t g = 0;            // channels per branch (identity: c - 3g)
  int64_t kh = 0, kw = 0;   // square branch kernel
  int64_t kbw = 0;          // 1 x kbw band
  int64_t kbh = 0;          // kbh x 1 band
  Layout layout = Layout::NHWC;
};

// Gradients to compute; nullptr where not wanted. Shapes as the corresponding inputs
// (grad_x in x's layout).
struct InceptionDWConv2dGrads {
  const TensorView* x = nullptr;
  const TensorView* hw_weight = nullptr;
  const TensorView* hw_bias = nullptr;
  const TensorView* w_weight = nullptr;
  const TensorView* w_bias = nullptr;
  const TensorView* h_weight = nullptr;
  const TensorView* h_bias = nullptr;
};

// Validates x, the weights and the params (throws fastvis::Error) and returns the shapes.
InceptionDWConv2dShape inception_dwconv2d_shape(const TensorView& x,
                                                const InceptionDWConv2dWeights& w,
                                                const InceptionDWConv2dParams& p);

size_t inception_dwconv2d_forward_scratch_bytes(const TensorView& x,
                                                const InceptionDWConv2dWeights& w,
                                                const InceptionDWConv2dParams& p);
// y: (N, C, H, W) in x's layout. stream: a cudaStream_t for CUDA tensors.
void inception_dwconv2d_forward(const TensorView& x, const InceptionDWConv2dWeights& w,
                                const InceptionDWConv2dParams& p, const TensorView& y,
                                void* scratch, size_t scratch_bytes, void* stream = nullptr);

// Enough scratch for any set of requested gradients.
size_t inception_dwconv2d_backward_scratch_bytes(const TensorView& x,
                                                 const InceptionDWConv2dWeights& w,
                                                 const InceptionDWConv2dParams& p);
// grad_y: (N, C, H, W) in x's layout. Only the gradients in `grads` are written.
void inception_dwconv2d_backward(const TensorView& grad_y, const TensorView& x,
                                 const InceptionDWConv2dWeights& w,
                                 const InceptionDWConv2dParams& p,
                                 const InceptionDWConv2dGrads& grads, void* scratch,
                                 size_t scratch_bytes, void* stream = nullptr);

}  // namespace fastvis
