// Global Response Normalization: validation, scratch planning, dispatch to the CPU
// passes (cpu_kernels.cpp, per ISA) and the per-(n, c) arithmetic between them: the
// fixed-order reduction of the pass-1 partial sums, the norms, the per-image divisor,
// and (backward) the input-gradient coefficients and the weight/bias gradients.
//
// Backward derivation. Per image n (dropped from the notation), with P the pixels,
//   G[c] = sqrt(sum_p x[c,p]^2),  d = (1/C) sum_k G[k] + eps,  Nx[c] = G[c] / d,
//   y[c,p] = x[c,p] * (1 + w[c] Nx[c]) + b[c].
// Let D[c] = sum_p gy[c,p] x[c,p] and B[c] = sum_p gy[c,p]. Then
//   dL/db[c]  = sum_n B[n,c],      dL/dw[c] = sum_n Nx[n,c] D[n,c],
//   dL/dNx[c] = w[c] D[c] =: E[c].
// Nx depends on x through every G: dNx[j]/dG[k] = delta_jk / d - G[j] / (C d^2), so
//   dL/dG[k] = E[k] / d - (1 / (C d^2)) sum_j E[j] G[j] = (E[k] - Kbar) / d,
//   with Kbar = (1/C) sum_j E[j] Nx[j],
// and dG[c]/dx[c,p] = x[c,p] / G[c] (taken as 0 when G[c] = 0, as torch's norm does;
// x[c,:] is then all zero anyway). Altogether
//   dL/dx[c,p] = gy[c,p] * (1 + w[c] Nx[c]) + x[c,p] * coef[c],
//   coef[c] = (E[c] - Kbar) / (d G[c])   (0 when G[c] = 0).
// So the backward needs one reduction pass (D and B per (n, c)), O(N*C) arithmetic, and
// one elementwise pass; the forward's G (saved) gives d and Nx without touching x.
#include "fastvis/grn.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/checks.h"
#include "core/scratch.h"
#include "core/cpu_features.h"
#include "core/dtype_convert.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"
#include "ops/grn/checks.h"
#include "ops/grn/cpu_kernels.h"

namespace fastvis {
namespace grn {

void check_activation(const TensorView& t, const TensorView& x, const GrnShape& s,
                      const char* name) {
  core::check_activation_like(t, x, s.n, s.c, s.h, s.w, name);
}

void check_channel_vector(const TensorView& t, const TensorView& x, const GrnShape& s,
                          const char* name) {
  FV_CHECK_VALUE(t.ndim == 1 && t.shape[0] == s.c, name, ": expected shape [", s.c,
                 "] (one value per channel), got ", t.describe());
  FV_CHECK_TYPE(t.dtype == x.dtype, name, ": expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(t.dtype));
  FV_CHECK_VALUE(t.device == x.device, name, " is on ", device_name(t.device), " but x is on ",
                 device_name(x.device), "; both must be on the same device");
  FV_CHECK_VALUE(t.data != nullptr, name, ": null data pointer");
}

void check_norm(const TensorView& t, const TensorView& x, const GrnShape& s, const char* name) {
  const int64_t want[2] = {s.n, s.c};
  core::check_row_major(t, x, want, 2, global_response_norm_stats_dtype(x.dtype), name,
                        "one value per image and channel");
}

Layout common_layout(const TensorView* const* ts, int count) {
  return core::common_dense_layout(ts, count, "global_response_norm");
}

namespace {

using core::acc_size;
using core::align64;
using core::ScratchCarver;

Geom geom_of(const GrnShape& s, Layout layout) {
  return Geom{s.n, s.c, s.h * s.w, layout == Layout::NHWC};
}

// A channel vector (any stride) in the accumulation type A.
template <class A> void pack_channels(const TensorView& t, int64_t C, A* out) {
  for (int64_t c = 0; c < C; ++c)
    out[c] = static_cast<A>(load_as_double(t.dtype, t.data, c * t.strides[0]));
}

struct Kernels {
  void (*sum_squares)(DType, const Geom&, int, int64_t, const void*, void*, void*, const void*,
                      const void*);
  void (*apply)(DType, const Geom&, int, const void*, const void*, const void*, void*);
  void (*sum_grads)(DType, const Geom&, int, int64_t, const void*, const void*, void*, void*,
                    const void*, const void*);
  void (*grad_input)(DType, const Geom&, int, const void*, const void*, const void*,
                     const void*, void*);
};

const Kernels& kernels() {
  static const Kernels k = [] {
#if defined(FV_HAVE_ISA_AVX512)
    if (cpu::selected_isa() == cpu::Isa::Avx512)
      return Kernels{&avx512::sum_squares, &avx512::apply, &avx512::sum_grads, &avx512::grad_input};
#endif
#if defined(FV_HAVE_ISA_AVX2)
    if (cpu::selected_isa() == cpu::Isa::Avx2)
      return Kernels{&avx2::sum_squares, &avx2::apply, &avx2::sum_grads, &avx2::grad_input};
#endif
    return Kernels{&generic::sum_squares, &generic::apply, &generic::sum_grads,
                   &generic::grad_input};
  }();
  return k;
}

void refuse_cuda(const TensorView& x) {
  FV_CHECK_RUNTIME(x.device.type != DeviceType::CUDA,
                   "global_response_norm: no CUDA kernels yet (got ", x.describe(),
                   "); the Python op runs the PyTorch reference on CUDA tensors");
  core::check_cpu(x, "x");
}

// The scratch sizes do not depend on the layout (a tensor dense in both layouts may be
// queried as NHWC and run as NCHW): partials are sized for the NHWC chunk count, which
// is never below the NCHW one.
int64_t max_chunks(const Geom& g) {
  Geom gn = g;
  gn.nhwc = true;
  return std::max(reduction_chunks(gn), reduction_chunks(g));
}

// Forward: pass-1 partials [N][R][C]; norms and scales [N][C]; packed weight and bias,
// ones and zeros [C].
size_t forward_bytes(const Geom& g, DType dt) {
  const size_t a = acc_size(dt);
  return align64(g.n * max_chunks(g) * g.c * a) + 2 * align64(g.n * g.c * a) +
         4 * align64(g.c * a);
}

// Backward: partials [N][R][2][C]; scale, coef, Nx*D and B [N][C]; packed weight and
// bias [C].
size_t backward_bytes(const Geom& g, DType dt) {
  const size_t a = acc_size(dt);
  return align64(g.n * max_chunks(g) * 2 * g.c * a) + 4 * align64(g.n * g.c * a) +
         2 * align64(g.c * a);
}

Layout layout_of(const TensorView& x) {
  const TensorView* ts[1] = {&x};
  return common_layout(ts, 1);
}

// d = mean_c G[c] + eps for one image's norms (summed in channel order). Forward and
// backward both call this, so they see the same d and Nx = G / d.
template <class A> A divisor(int64_t C, const A* norm, A eps) {
  A s = 0;
  for (int64_t c = 0; c < C; ++c) s += norm[c];
  return s / static_cast<A>(C) + eps;
}

// Pass 2's per-(n, c) scales 1 + w[c] Nx[n, c] from the norms G.
template <class A>
void scales_from_norms(int64_t N, int64_t C, const A* norm, const A* w, A eps, A* scale) {
  for (int64_t n = 0; n < N; ++n) {
    const A* gr = norm + n * C;
    const A d = divisor<A>(C, gr, eps);
    for (int64_t c = 0; c < C; ++c) scale[n * C + c] = A(1) + w[c] * (gr[c] / d);
  }
}

// norm_in: the norms of an earlier forward call (pass 1 skipped); else computed here and
// copied to norm_out when given.
template <class A>
void forward_t(const Kernels& k, DType dt, const Geom& g, int act, const TensorView& x,
               const TensorView& weight, const TensorView& bias, double eps_d,
               const TensorView& y, const TensorView* norm_out, const TensorView* norm_in,
               ScratchCarver& sc) {
  const int64_t N = g.n, C = g.c, R = reduction_chunks(g);
  const A eps = static_cast<A>(eps_d);
  A* partial = static_cast<A*>(sc.take(N * R * C * sizeof(A)));
  A* norm = static_cast<A*>(sc.take(N * C * sizeof(A)));
  A* scale = static_cast<A*>(sc.take(N * C * sizeof(A)));
  A* w = static_cast<A*>(sc.take(C * sizeof(A)));
  A* shift = static_cast<A*>(sc.take(C * sizeof(A)));
  A* ones = static_cast<A*>(sc.take(C * sizeof(A)));
  A* zeros = static_cast<A*>(sc.take(C * sizeof(A)));
  if (N == 0) return;
  pack_channels<A>(weight, C, w);
  pack_channels<A>(bias, C, shift);
  if (norm_in) {
    scales_from_norms<A>(N, C, static_cast<const A*>(norm_in->data), w, eps, scale);
    if (g.hw > 0) k.apply(dt, g, act, x.data, scale, shift, y.data);
    return;
  }
  // With an activation and storage in the accumulation type, pass 1 also stores act(x)
  // into y and pass 2 scales y in place: one evaluation of the activation instead of two.
  // (bfloat16 would round act(x) once more on the way; it evaluates twice instead.)
  const bool store_act = act != kActNone && dt != DType::BFloat16;
  if (store_act) {
    std::fill(ones, ones + C, A(1));
    std::fill(zeros, zeros + C, A(0));
    for (int64_t n = 0; n < N; ++n) std::copy(ones, ones + C, scale + n * C);
  }
  if (g.hw > 0) {
    k.sum_squares(dt, g, act, R, x.data, partial, store_act ? y.data : nullptr, scale, zeros);
  } else {
    std::fill(partial, partial + N * R * C, A(0));
  }
  // Per image: the norms (chunk partials summed in chunk order), d, and the scales.
  parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      A* gr = norm + n * C;
      std::fill(gr, gr + C, A(0));
      for (int64_t r = 0; r < R; ++r) {
        const A* pr = partial + (n * R + r) * C;
        for (int64_t c = 0; c < C; ++c) gr[c] += pr[c];
      }
      for (int64_t c = 0; c < C; ++c) gr[c] = std::sqrt(gr[c]);
      scales_from_norms<A>(1, C, gr, w, eps, scale + n * C);
    }
  });
  if (norm_out) std::memcpy(norm_out->data, norm, N * C * sizeof(A));
  if (g.hw > 0) {
    if (store_act)
      k.apply(dt, g, kActNone, y.data, scale, shift, y.data);
    else
      k.apply(dt, g, act, x.data, scale, shift, y.data);
  }
}

template <class A>
void backward_t(const Kernels& k, DType dt, const Geom& g, int act, const TensorView& grad_y,
                const TensorView& x, const TensorView& weight, const TensorView& norm_in,
                double eps_d, const TensorView* grad_x, const TensorView* grad_weight,
                const TensorView* grad_bias, const TensorView* bias, const TensorView* y_out,
                ScratchCarver& sc) {
  const int64_t N = g.n, C = g.c, R = reduction_chunks(g);
  const A eps = static_cast<A>(eps_d);
  A* partial = static_cast<A*>(sc.take(N * R * 2 * C * sizeof(A)));
  A* scale = static_cast<A*>(sc.take(N * C * sizeof(A)));
  A* coef = static_cast<A*>(sc.take(N * C * sizeof(A)));
  A* nxd = static_cast<A*>(sc.take(N * C * sizeof(A)));
  A* bsum = static_cast<A*>(sc.take(N * C * sizeof(A)));
  A* w = static_cast<A*>(sc.take(C * sizeof(A)));
  A* shift = static_cast<A*>(sc.take(C * sizeof(A)));
  pack_channels<A>(weight, C, w);
  const A* norm = static_cast<const A*>(norm_in.data);
  if (y_out) {  // the forward output, recomputed in the reduction pass
    pack_channels<A>(*bias, C, shift);
    scales_from_norms<A>(N, C, norm, w, eps, scale);
  }
  if (N > 0 && g.hw > 0) {
    k.sum_grads(dt, g, act, R, grad_y.data, x.data, partial, y_out ? y_out->data : nullptr,
                scale, shift);
  } else {
    std::fill(partial, partial + N * R * 2 * C, A(0));
  }
  // Per image (see the derivation at the top): D, B, E = w D (kept in coef until Kbar
  // is known), then the coefficients of grad_x.
  parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const A* gr = norm + n * C;
      const A d = divisor<A>(C, gr, eps);
      // D and B: the chunk partials summed in chunk order (into the rows of nxd / bsum).
      A* dots = nxd + n * C;
      A* sums = bsum + n * C;
      std::fill(dots, dots + C, A(0));
      std::fill(sums, sums + C, A(0));
      for (int64_t r = 0; r < R; ++r) {
        const A* pr = partial + (n * R + r) * 2 * C;
        for (int64_t c = 0; c < C; ++c) {
          dots[c] += pr[c];
          sums[c] += pr[C + c];
        }
      }
      A ksum = 0;
      for (int64_t c = 0; c < C; ++c) {
        const A dot = dots[c];
        const A nx = gr[c] / d;
        const A e = w[c] * dot;
        ksum += e * nx;
        dots[c] = nx * dot;
        coef[n * C + c] = e;
      }
      const A kbar = ksum / static_cast<A>(C);
      for (int64_t c = 0; c < C; ++c) {
        const A gc = gr[c];
        scale[n * C + c] = A(1) + w[c] * (gc / d);
        coef[n * C + c] = gc > A(0) ? (coef[n * C + c] - kbar) / (d * gc) : A(0);
      }
    }
  });
  // Weight/bias gradients: the per-image terms summed in image order, into row 0.
  for (int64_t n = 1; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      nxd[c] += nxd[n * C + c];
      bsum[c] += bsum[n * C + c];
    }
  for (int64_t c = 0; c < C; ++c) {
    if (grad_weight)
      store_from_double(grad_weight->dtype, grad_weight->data, c * grad_weight->strides[0],
                        N > 0 ? nxd[c] : A(0));
    if (grad_bias)
      store_from_double(grad_bias->dtype, grad_bias->data, c * grad_bias->strides[0],
                        N > 0 ? bsum[c] : A(0));
  }
  if (grad_x && N > 0 && g.hw > 0)
    k.grad_input(dt, g, act, grad_y.data, x.data, scale, coef, grad_x->data);
}

}  // namespace
}  // namespace grn

using namespace grn;

DType global_response_norm_stats_dtype(DType dt) {
  return dt == DType::Float64 ? DType::Float64 : DType::Float32;
}

GrnShape global_response_norm_shape(const TensorView& x, const TensorView& weight,
                                    const TensorView* bias, double eps) {
  const core::NchwDims d = core::activation_dims(x, "x");
  GrnShape s;
  s.n = d.n;
  s.c = d.c;
  s.h = d.h;
  s.w = d.w;
  FV_CHECK_VALUE(std::isfinite(eps) && eps > 0.0,
                 "eps: expected a positive finite number, got ", eps);
  check_channel_vector(weight, x, s, "weight");
  if (bias) check_channel_vector(*bias, x, s, "bias");
  FV_CHECK_VALUE(x.data != nullptr || x.numel() == 0, "x: null data pointer");
  // The fast paths require a dense layout (common_layout); the references take any strides.
  s.layout = (core::dense_layouts(x) & 2) ? Layout::NHWC : Layout::NCHW;
  return s;
}

namespace {

// The shape checks of the scratch queries (which receive no weight).
GrnShape query_shape(const TensorView& x) {
  const core::NchwDims d = core::activation_dims(x, "x");
  GrnShape s;
  s.n = d.n;
  s.c = d.c;
  s.h = d.h;
  s.w = d.w;
  s.layout = layout_of(x);
  return s;
}

}  // namespace

size_t global_response_norm_forward_scratch_bytes(const TensorView& x) {
  const GrnShape s = query_shape(x);
  if (x.device.type == DeviceType::CUDA) return 0;
  return forward_bytes(geom_of(s, s.layout), x.dtype);
}

namespace {

int act_code(GrnActivation act) {
  switch (act) {
    case GrnActivation::None: return kActNone;
    case GrnActivation::Gelu: return kActGelu;
    case GrnActivation::GeluTanh: return kActGeluTanh;
  }
  detail::throw_error(ErrorKind::Value, "activation: expected None, Gelu or GeluTanh, got ",
                      static_cast<int>(act));
}

void forward_impl(const TensorView& x, const TensorView& weight, const TensorView& bias,
                  double eps, const TensorView& y, const TensorView* norm_out,
                  const TensorView* norm_in, void* scratch, size_t scratch_bytes,
                  GrnActivation act) {
  const int code = act_code(act);
  const GrnShape s = global_response_norm_shape(x, weight, &bias, eps);
  check_activation(y, x, s, "y");
  if (norm_out) check_norm(*norm_out, x, s, "norm");
  if (norm_in) check_norm(*norm_in, x, s, "norm");
  refuse_cuda(x);
  const TensorView* acts[2] = {&x, &y};
  const Layout layout = common_layout(acts, 2);
  const Geom g = geom_of(s, layout);
  const size_t need = forward_bytes(g, x.dtype);
  FV_CHECK_VALUE(scratch_bytes >= need && scratch != nullptr, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  ScratchCarver sc(scratch, scratch_bytes);
  if (x.dtype == DType::Float64)
    forward_t<double>(kernels(), x.dtype, g, code, x, weight, bias, eps, y, norm_out, norm_in,
                      sc);
  else
    forward_t<float>(kernels(), x.dtype, g, code, x, weight, bias, eps, y, norm_out, norm_in,
                     sc);
}

}  // namespace

void global_response_norm_forward(const TensorView& x, const TensorView& weight,
                                  const TensorView& bias, double eps, const TensorView& y,
                                  const TensorView* norm, void* scratch, size_t scratch_bytes,
                                  GrnActivation act) {
  forward_impl(x, weight, bias, eps, y, norm, nullptr, scratch, scratch_bytes, act);
}

void global_response_norm_apply(const TensorView& x, const TensorView& weight,
                                const TensorView& bias, double eps, const TensorView& norm,
                                const TensorView& y, void* scratch, size_t scratch_bytes,
                                GrnActivation act) {
  forward_impl(x, weight, bias, eps, y, nullptr, &norm, scratch, scratch_bytes, act);
}

size_t global_response_norm_backward_scratch_bytes(const TensorView& x) {
  const GrnShape s = query_shape(x);
  if (x.device.type == DeviceType::CUDA) return 0;
  return backward_bytes(geom_of(s, s.layout), x.dtype);
}

void global_response_norm_backward(const TensorView& grad_y, const TensorView& x,
                                   const TensorView& weight, const TensorView& norm, double eps,
                                   const TensorView* grad_x, const TensorView* grad_weight,
                                   const TensorView* grad_bias, void* scratch,
                                   size_t scratch_bytes, GrnActivation act,
                                   const TensorView* bias, const TensorView* y) {
  const int code = act_code(act);
  const GrnShape s = global_response_norm_shape(x, weight, bias, eps);
  FV_CHECK_VALUE(!y || bias, "y: the recomputed forward output needs the bias (got none)");
  check_activation(grad_y, x, s, "grad_y");
  if (grad_x) check_activation(*grad_x, x, s, "grad_x");
  if (y) check_activation(*y, x, s, "y");
  check_norm(norm, x, s, "norm");
  if (grad_weight) check_channel_vector(*grad_weight, x, s, "grad_weight");
  if (grad_bias) check_channel_vector(*grad_bias, x, s, "grad_bias");
  refuse_cuda(x);
  const TensorView* acts[4] = {&x, &grad_y, grad_x ? grad_x : &x, y ? y : &x};
  const Layout layout = common_layout(acts, 4);
  const Geom g = geom_of(s, layout);
  const size_t need = backward_bytes(g, x.dtype);
  FV_CHECK_VALUE(scratch_bytes >= need && scratch != nullptr, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  if (!grad_x && !grad_weight && !grad_bias && !y) return;
  ScratchCarver sc(scratch, scratch_bytes);
  if (x.dtype == DType::Float64)
    backward_t<double>(kernels(), x.dtype, g, code, grad_y, x, weight, norm, eps, grad_x, grad_weight,
                       grad_bias, bias, y, sc);
  else
    backward_t<float>(kernels(), x.dtype, g, code, grad_y, x, weight, norm, eps, grad_x, grad_weight,
                      grad_bias, bias, y, sc);
}

}  // namespace fastvis
