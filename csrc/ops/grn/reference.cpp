// Scalar reference of global_response_norm: direct loops over logical indices through
// the views' strides, accumulation in double. The oracle of the fast paths. The
// backward formulas are derived in grn.cpp.
#include <cmath>
#include <vector>

#include "core/checks.h"
#include "core/dtype_convert.h"
#include "fastvis/error.h"
#include "fastvis/grn.h"
#include "ops/grn/checks.h"

namespace fastvis {
namespace {

inline int64_t at4(const TensorView& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  return a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + d * t.strides[3];
}
inline double get4(const TensorView& t, int64_t n, int64_t c, int64_t h, int64_t w) {
  return load_as_double(t.dtype, t.data, at4(t, n, c, h, w));
}
inline double chan(const TensorView& t, int64_t c) {
  return load_as_double(t.dtype, t.data, c * t.strides[0]);
}

// The norms G[c] of image n and d = mean_c G + eps, in double.
double image_norms(const TensorView& x, const GrnShape& s, int64_t n, double eps,
                   std::vector<double>& g) {
  double total = 0.0;
  for (int64_t c = 0; c < s.c; ++c) {
    double q = 0.0;
    for (int64_t h = 0; h < s.h; ++h)
      for (int64_t w = 0; w < s.w; ++w) {
        const double v = get4(x, n, c, h, w);
        q += v * v;
      }
    g[c] = std::sqrt(q);
    total += g[c];
  }
  return total / static_cast<double>(s.c) + eps;
}

}  // namespace

void global_response_norm_forward_reference(const TensorView& x, const TensorView& weight,
                                            const TensorView& bias, double eps,
                                            const TensorView& y, const TensorView* norm) {
  const GrnShape s = global_response_norm_shape(x, weight, &bias, eps);
  core::check_cpu(x, "x");
  grn::check_activation(y, x, s, "y");
  if (norm) grn::check_norm(*norm, x, s, "norm");
  std::vector<double> g(s.c);
  for (int64_t n = 0; n < s.n; ++n) {
    const double d = image_norms(x, s, n, eps, g);
    for (int64_t c = 0; c < s.c; ++c) {
      if (norm)
        store_from_double(norm->dtype, norm->data, n * norm->strides[0] + c * norm->strides[1],
                          g[c]);
      const double nx = g[c] / d, wc = chan(weight, c), bc = chan(bias, c);
      for (int64_t h = 0; h < s.h; ++h)
        for (int64_t w = 0; w < s.w; ++w) {
          const double v = get4(x, n, c, h, w);
          store_from_double(y.dtype, y.data, at4(y, n, c, h, w), v + bc + wc * (v * nx));
        }
    }
  }
}

void global_response_norm_backward_reference(const TensorView& grad_y, const TensorView& x,
                                             const TensorView& weight, double eps,
                                             const TensorView* grad_x,
                                             const TensorView* grad_weight,
                                             const TensorView* grad_bias) {
  const GrnShape s = global_response_norm_shape(x, weight, nullptr, eps);
  core::check_cpu(x, "x");
  grn::check_activation(grad_y, x, s, "grad_y");
  if (grad_x) grn::check_activation(*grad_x, x, s, "grad_x");
  if (grad_weight) grn::check_channel_vector(*grad_weight, x, s, "grad_weight");
  if (grad_bias) grn::check_channel_vector(*grad_bias, x, s, "grad_bias");
  std::vector<double> gw(s.c, 0.0), gb(s.c, 0.0), g(s.c), e(s.c);
  for (int64_t n = 0; n < s.n; ++n) {
    const double d = image_norms(x, s, n, eps, g);
    double kbar = 0.0;
    for (int64_t c = 0; c < s.c; ++c) {
      double dot = 0.0, sum = 0.0;
      for (int64_t h = 0; h < s.h; ++h)
        for (int64_t w = 0; w < s.w; ++w) {
          const double gyv = get4(grad_y, n, c, h, w);
          dot += gyv * get4(x, n, c, h, w);
          sum += gyv;
        }
      const double nx = g[c] / d;
      e[c] = chan(weight, c) * dot;
      kbar += e[c] * nx;
      gw[c] += nx * dot;
      gb[c] += sum;
    }
    kbar /= static_cast<double>(s.c);
    if (!grad_x) continue;
    for (int64_t c = 0; c < s.c; ++c) {
      const double scale = 1.0 + chan(weight, c) * (g[c] / d);
      const double k = g[c] > 0.0 ? (e[c] - kbar) / (d * g[c]) : 0.0;
      for (int64_t h = 0; h < s.h; ++h)
        for (int64_t w = 0; w < s.w; ++w)
          store_from_double(grad_x->dtype, grad_x->data, at4(*grad_x, n, c, h, w),
                            get4(grad_y, n, c, h, w) * scale + get4(x, n, c, h, w) * k);
    }
  }
  for (int64_t c = 0; c < s.c; ++c) {
    if (grad_weight)
      store_from_double(grad_weight->dtype, grad_weight->data, c * grad_weight->strides[0], gw[c]);
    if (grad_bias)
      store_from_double(grad_bias->dtype, grad_bias->data, c * grad_bias->strides[0], gb[c]);
  }
}

}  // namespace fastvis
