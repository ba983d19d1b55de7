// fastvis: depthwise 2-D convolution (op family 1).
//
// Semantics are those of torch.nn.functional.conv2d(x, w, b, stride, padding,
// dilation, groups=C) with w of shape (C, 1, kh, kw), except that padding may
// differ per side (PyTorch's padding="same" with an even kernel pads one more
// at the bottom/right).
//
// Activations are logical (N, C, H, W) tensors stored either channels-last
// (NHWC, the native layout of the fast paths) or contiguous NCHW. The output
// must use the same layout as the input. Weights are (C, 1, kh, kw) or
// (C, kh, kw), any strides. Scratch memory is allocated by the caller: ask the
// *_scratch_bytes function first and pass a buffer at least that large. Every
// entry point of every op family carves its scratch into regions at 64-byte offsets
// from the base, so give a 64-byte-aligned buffer: any alignment works, but a
// misaligned one makes the vector loads of the packed tiles straddle cache lines
// (measured: a 13x13 forward 1.7x slower).
//
// CPU: float32, float64, bfloat16 (float32 accumulation).
// CUDA (when built with it): float32, float16, bfloat16 -- unverified on hardware.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

struct DepthwiseConv2dParams {
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
};

struct DepthwiseConv2dShape {
  int64_t n = 0, c = 0, h = 0, w = 0;  // input
  int64_t kh = 0, kw = 0;              // kernel
  int64_t oh = 0, ow = 0;              // output
  Layout layout = Layout::NHWC;        // layout of the input
};

// Validates x, weight and params (throws fastvis::Error) and returns the shapes.
DepthwiseConv2dShape depthwise_conv2d_shape(const TensorView& x, const TensorView& weight,
                                            const DepthwiseConv2dParams& p);

// The memory layout of a logical NCHW tensor (throws if it is neither NHWC- nor NCHW-dense).
Layout activation_layout(const TensorView& t, const char* name);

size_t depthwise_conv2d_forward_scratch_bytes(const TensorView& x, const TensorView& weight,
                                              const DepthwiseConv2dParams& p);
// y = conv(x, weight) + bias. bias may be nullptr. stream: a cudaStream_t for CUDA tensors.
void depthwise_conv2d_forward(const TensorView& x, const TensorView& weight,
                              const TensorView* bias, const TensorView& y,
                              const DepthwiseConv2dParams& p, void* scratch,
                              size_t scratch_bytes, void* stream = nullptr);

size_t depthwise_conv2d_backward_input_scratch_bytes(const TensorView& grad_y,
                                                     const TensorView& weight,
                                                     const TensorView& grad_x,
                                                     const DepthwiseConv2dParams& p);
// grad_x = d(loss)/d(x) given grad_y; grad_x carries the input's shape and layout.
void depthwise_conv2d_backward_input(const TensorView& grad_y, const TensorView& weight,
                                     const TensorView& grad_x, const DepthwiseConv2dParams& p,
                                     void* scratch, size_t scratch_bytes,
                                     void* stream = nullptr);

size_t depthwise_conv2d_backward_weight_scratch_bytes(const TensorView& grad_y,
                                                      const TensorView& x,
                                                      const TensorView& grad_weight,
                                                      const DepthwiseConv2dParams& p);
// grad_weight (shape of the weight) and, if grad_bias is not null, grad_bias (C).
// Reductions use a fixed, shape-determined split and order: results are
// bit-identical run to run and independent of the thread count.
void depthwise_conv2d_backward_weight(const TensorView& grad_y, const TensorView& x,
                                      const TensorView& grad_weight, const TensorView* grad_bias,
                                      const DepthwiseConv2dParams& p, void* scratch,
                                      size_t scratch_bytes, void* stream = nullptr);

// Scalar reference implementations (CPU, any supported dtype, accumulate in double).
// They are the oracle of the fast paths and need no scratch.
void depthwise_conv2d_forward_reference(const TensorView& x, const TensorView& weight,
                                        const TensorView* bias, const TensorView& y,
                                        const DepthwiseConv2dParams& p);
void depthwise_conv2d_backward_input_reference(const TensorView& grad_y, const TensorView& weight,
                                               const TensorView& grad_x,
                                               const DepthwiseConv2dParams& p);
void depthwise_conv2d_backward_weight_reference(const TensorView& grad_y, const TensorView& x,
                                                const TensorView& grad_weight,
                                                const TensorView* grad_bias,
                                                const DepthwiseConv2dParams& p);

}  // namespace fastvis
