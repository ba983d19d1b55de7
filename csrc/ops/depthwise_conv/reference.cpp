// Scalar reference of depthwise convolution: direct loops over logical indices
// through the views' strides, accumulation in double. The oracle of the fast paths.
#include <vector>

#include "core/dtype_convert.h"
#include "fastvis/depthwise_conv.h"
#include "fastvis/error.h"
#include "ops/depthwise_conv/checks.h"

namespace fastvis {
namespace {

inline int64_t at4(const TensorView& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  return a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + d * t.strides[3];
}

}  // namespace

void depthwise_conv2d_forward_reference(const TensorView& x, const TensorView& weight,
                                        const TensorView* bias, const TensorView& y,
                                        const DepthwiseConv2dParams& p) {
  const DepthwiseConv2dShape s = depthwise_conv2d_shape(x, weight, p);
  dwconv::check_cpu(x, "x");
  dwconv::check_output(y, x, s.n, s.c, s.oh, s.ow, "y");
  if (bias) dwconv::check_bias(*bias, x, s.c, "bias");
  const dwconv::WeightIndex wi(weight);
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t oh = 0; oh < s.oh; ++oh)
        for (int64_t ow = 0; ow < s.ow; ++ow) {
          double acc = bias ? load_as_double(bias->dtype, bias->data, c * bias->strides[0]) : 0.0;
          for (int64_t i = 0; i < s.kh; ++i) {
            const int64_t ih = oh * p.stride_h - p.pad_top + i * p.dilation_h;
            if (ih < 0 || ih >= s.h) continue;
            for (int64_t j = 0; j < s.kw; ++j) {
              const int64_t iw = ow * p.stride_w - p.pad_left + j * p.dilation_w;
              if (iw < 0 || iw >= s.w) continue;
              acc += load_as_double(x.dtype, x.data, at4(x, n, c, ih, iw)) *
                     load_as_double(weight.dtype, weight.data, wi(c, i, j));
            }
          }
          store_from_double(y.dtype, y.data, at4(y, n, c, oh, ow), acc);
        }
}

void depthwise_conv2d_backward_input_reference(const TensorView& grad_y, const TensorView& weight,
                                               const TensorView& grad_x,
                                               const DepthwiseConv2dParams& p) {
  const DepthwiseConv2dShape s = depthwise_conv2d_shape(grad_x, weight, p);
  dwconv::check_cpu(grad_x, "grad_x");
  dwconv::check_output(grad_y, grad_x, s.n, s.c, s.oh, s.ow, "grad_y");
  const dwconv::WeightIndex wi(weight);
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t ih = 0; ih < s.h; ++ih)
        for (int64_t iw = 0; iw < s.w; ++iw) {
          double acc = 0.0;
          for (int64_t i = 0; i < s.kh; ++i) {
            const int64_t th = ih + p.pad_top - i * p.dilation_h;
            if (th < 0 || th % p.stride_h != 0 || th / p.stride_h >= s.oh) continue;
            for (int64_t j = 0; j < s.kw; ++j) {
              const int64_t tw = iw + p.pad_left - j * p.dilation_w;
              if (tw < 0 || tw % p.stride_w != 0 || tw / p.stride_w >= s.ow) continue;
              acc += load_as_double(grad_y.dtype, grad_y.data,
                                    at4(grad_y, n, c, th / p.stride_h, tw / p.stride_w)) *
                     load_as_double(weight.dtype, weight.data, wi(c, i, j));
            }
          }
          store_from_double(grad_x.dtype, grad_x.data, at4(grad_x, n, c, ih, iw), acc);
        }
}

void depthwise_conv2d_backward_weight_reference(const TensorView& grad_y, const TensorView& x,
                                                const TensorView& grad_weight,
                                                const TensorView* grad_bias,
                                                const DepthwiseConv2dParams& p) {
  const DepthwiseConv2dShape s = depthwise_conv2d_shape(x, grad_weight, p);
  dwconv::check_cpu(x, "x");
  dwconv::check_output(grad_y, x, s.n, s.c, s.oh, s.ow, "grad_y");
  if (grad_bias) dwconv::check_bias(*grad_bias, x, s.c, "grad_bias");
  const dwconv::WeightIndex wi(grad_weight);
  for (int64_t c = 0; c < s.c; ++c) {
    for (int64_t i = 0; i < s.kh; ++i)
      for (int64_t j = 0; j < s.kw; ++j) {
        double acc = 0.0;
        for (int64_t n = 0; n < s.n; ++n)
          for (int64_t oh = 0; oh < s.oh; ++oh) {
            const int64_t ih = oh * p.stride_h - p.pad_top + i * p.dilation_h;
            if (ih < 0 || ih >= s.h) continue;
            for (int64_t ow = 0; ow < s.ow; ++ow) {
              const int64_t iw = ow * p.stride_w - p.pad_left + j * p.dilation_w;
              if (iw < 0 || iw >= s.w) continue;
              acc += load_as_double(grad_y.dtype, grad_y.data, at4(grad_y, n, c, oh, ow)) *
                     load_as_double(x.dtype, x.data, at4(x, n, c, ih, iw));
            }
          }
        store_from_double(grad_weight.dtype, grad_weight.data, wi(c, i, j), acc);
      }
    if (grad_bias) {
      double acc = 0.0;
      for (int64_t n = 0; n < s.n; ++n)
        for (int64_t oh = 0; oh < s.oh; ++oh)
          for (int64_t ow = 0; ow < s.ow; ++ow)
            acc += load_as_double(grad_y.dtype, grad_y.data, at4(grad_y, n, c, oh, ow));
      store_from_double(grad_bias->dtype, grad_bias->data, c * grad_bias->strides[0], acc);
    }
  }
}

}  // namespace fastvis
