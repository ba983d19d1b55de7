// Scalar reference of layer_norm_channels: direct loops over logical indices through
// the views' strides, accumulation in double. The oracle of the fast paths.
#include <cmath>
#include <vector>

#include "core/dtype_convert.h"
#include "fastvis/error.h"
#include "fastvis/layer_norm.h"
#include "core/checks.h"
#include "ops/layer_norm/checks.h"

namespace fastvis {
namespace {

inline int64_t at4(const TensorView& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  return a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + d * t.strides[3];
}
inline int64_t at3(const TensorView& t, int64_t a, int64_t b, int64_t c) {
  return a * t.strides[0] + b * t.strides[1] + c * t.strides[2];
}
inline double chan(const TensorView* t, int64_t c, double fill) {
  return t ? load_as_double(t->dtype, t->data, c * t->strides[0]) : fill;
}

// Mean and 1/sqrt(var + eps) of pixel (n, h, w), in double.
void pixel_stats(const TensorView& x, int64_t C, int64_t n, int64_t h, int64_t w, double eps,
                 double& mean, double& rstd) {
  double s = 0.0;
  for (int64_t c = 0; c < C; ++c) s += load_as_double(x.dtype, x.data, at4(x, n, c, h, w));
  mean = s / static_cast<double>(C);
  double q = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double d = load_as_double(x.dtype, x.data, at4(x, n, c, h, w)) - mean;
    q += d * d;
  }
  rstd = 1.0 / std::sqrt(q / static_cast<double>(C) + eps);
}

}  // namespace

void layer_norm_channels_forward_reference(const TensorView& x, const TensorView* weight,
                                           const TensorView* bias, double eps,
                                           const TensorView& y, const TensorView* mean,
                                           const TensorView* rstd) {
  const LayerNormShape s = layer_norm_channels_shape(x, weight, bias, eps);
  core::check_cpu(x, "x");
  layernorm::check_activation(y, x, s, "y");
  if (mean) layernorm::check_stats(*mean, x, s, "mean");
  if (rstd) layernorm::check_stats(*rstd, x, s, "rstd");
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t h = 0; h < s.h; ++h)
      for (int64_t w = 0; w < s.w; ++w) {
        double mu, r;
        pixel_stats(x, s.c, n, h, w, eps, mu, r);
        if (mean) store_from_double(mean->dtype, mean->data, at3(*mean, n, h, w), mu);
        if (rstd) store_from_double(rstd->dtype, rstd->data, at3(*rstd, n, h, w), r);
        for (int64_t c = 0; c < s.c; ++c) {
          const double xh = (load_as_double(x.dtype, x.data, at4(x, n, c, h, w)) - mu) * r;
          store_from_double(y.dtype, y.data, at4(y, n, c, h, w),
                            xh * chan(weight, c, 1.0) + chan(bias, c, 0.0));
        }
      }
}

void layer_norm_channels_backward_reference(const TensorView& grad_y, const TensorView& x,
                                            const TensorView* weight, double eps,
                                            const TensorView* grad_x,
                                            const TensorView* grad_weight,
                                            const TensorView* grad_bias) {
  const LayerNormShape s = layer_norm_channels_shape(x, weight, nullptr, eps);
  core::check_cpu(x, "x");
  layernorm::check_activation(grad_y, x, s, "grad_y");
  if (grad_x) layernorm::check_activation(*grad_x, x, s, "grad_x");
  if (grad_weight) layernorm::check_channel_vector(*grad_weight, x, s, "grad_weight");
  if (grad_bias) layernorm::check_channel_vector(*grad_bias, x, s, "grad_bias");
  std::vector<double> gw(s.c, 0.0), gb(s.c, 0.0), xh(s.c), g(s.c);
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t h = 0; h < s.h; ++h)
      for (int64_t w = 0; w < s.w; ++w) {
        double mu, r;
        pixel_stats(x, s.c, n, h, w, eps, mu, r);
        double sg = 0.0, sgx = 0.0;
        for (int64_t c = 0; c < s.c; ++c) {
          const double gyv = load_as_double(grad_y.dtype, grad_y.data, at4(grad_y, n, c, h, w));
          xh[c] = (load_as_double(x.dtype, x.data, at4(x, n, c, h, w)) - mu) * r;
          g[c] = gyv * chan(weight, c, 1.0);
          sg += g[c];
          sgx += g[c] * xh[c];
          gw[c] += gyv * xh[c];
          gb[c] += gyv;
        }
        if (!grad_x) continue;
        const double a = sg / static_cast<double>(s.c), b = sgx / static_cast<double>(s.c);
        for (int64_t c = 0; c < s.c; ++c)
          store_from_double(grad_x->dtype, grad_x->data, at4(*grad_x, n, c, h, w),
                            (g[c] - a - xh[c] * b) * r);
      }
  for (int64_t c = 0; c < s.c; ++c) {
    if (grad_weight)
      store_from_double(grad_weight->dtype, grad_weight->data, c * grad_weight->strides[0], gw[c]);
    if (grad_bias)
      store_from_double(grad_bias->dtype, grad_bias->data, c * grad_bias->strides[0], gb[c]);
  }
}

}  // namespace fastvis
