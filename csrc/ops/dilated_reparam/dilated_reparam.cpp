// dilated_reparam: the fused multi-branch depthwise convolution + BatchNorm of UniRepLKNet
// (dilated re-param block) and RepLKNet (large kernel + small kernel), training mode.
// Validation, scratch planning, the statistics reduction, the merged kernel, and the
// backward pass built from the depthwise family's per-ISA kernels.
//
// Notation (per channel c, dropped): branch b has z_b = conv_b(x) (kernel w_b, k_b x k_b,
// dilation d_b, "same" padding p_b = d_b (k_b - 1) / 2); over the M = N*H*W pixels p,
//   mu_b = mean_p z_b,  var_b = mean_p (z_b - mu_b)^2,  sigma_b = sqrt(var_b + eps),
//   xh_b = (z_b - mu_b) / sigma_b,  y = sum_b gamma_b xh_b + beta_b.
//
// Forward. BN is a per-channel affine map of its input once the statistics are known:
//   y = sum_b s_b z_b + sum_b (beta_b - s_b mu_b),  s_b = gamma_b / sigma_b,
// and a sum of convolutions of x is one convolution with the summed kernel. With
// E = d_0 (k_0 - 1) + 1 (every branch's extent fits in it, centred: offset
// o_b = (E - 1)/2 - p_b), branch tap (i, j) sits at (o_b + i d_b, o_b + j d_b) of the
// merged E x E kernel
//   K = sum_b s_b expand(w_b),  bias = sum_b (beta_b - s_b mu_b),
// so y = conv_K(x) + bias exactly (up to rounding). Two passes over x:
//   1. statistics: per tile of rows, every branch's z_b in a per-thread buffer, the tile's
//      per-channel mean and M2 (sum of squared deviations) in double; tiles are combined
//      in a fixed order with Chan et al.'s update (no catastrophic cancellation from
//      E[z^2] - E[z]^2);
//   2. output: one depthwise convolution with K and bias (the depthwise family's kernel,
//      K packed in the accumulation type: no rounding of K to bfloat16).
// Only x and (mu_b, var_b) are kept for the backward pass.
//
// Backward. With g = dL/dy:
//   dL/dbeta_b = sum_p g =: Sg,   dL/dgamma_b = sum_p g xh_b = (Sgz_b - mu_b Sg) / sigma_b,
//   Sgz_b = sum_p g z_b = sum_p g(p) sum_t w_b[t] x(p + off_t) = sum_t w_b[t] G[t_b],
// where G[I, J] = sum_p g(p) x(p + (I - (E-1)/2, J - (E-1)/2)) is the weight gradient of an
// E x E "same" convolution (one depthwise weight-gradient pass of g against x gives G and
// Sg for all branches; z_b is never needed for it). BN's input gradient is
//   dz_b = a_b (g - Sg/M - xh_b (dL/dgamma_b)/M),  a_b = gamma_b / sigma_b = s_b,
//        = a_b g + u_b + v_b z_b,
//   v_b = -a_b (dL/dgamma_b) / (M sigma_b),  u_b = -a_b Sg / M - v_b mu_b.
// Then, conv_b^T being the transposed (= flipped, same padding) convolution,
//   dx    = sum_b conv_b^T(dz_b),   dw_b = corr(dz_b, x),
// and dz_b = conv(x; v_b w_b) + u_b + a_b g is one depthwise convolution with a scaled
// kernel and a bias, plus a multiple of g. Scheme (exact; every piece is a depthwise-family
// kernel):
//   wgrad(g, x; E x E) -> G, Sg;  per-channel coefficients;
//   per branch: dz_b = conv(x; v_b w_b) + u_b, then dz_b += a_b g (one activation-sized
//               buffer, reused), dx += conv_b^T(dz_b), dw_b = wgrad(dz_b, x; w_b's geometry).
// Per pixel and channel that is E^2 + 3 sum_b k_b^2 taps (979 for UniRepLKNet's 13x13
// block). An earlier scheme split dz_b = a_b g + r_b and ran the a_b g parts merged,
// dx = conv_K^T(g) + sum_b conv_b^T(r_b), dw_b = a_b G_b + corr(r_b, x): the same per-branch
// passes plus one E x E pass, 2 E^2 + 3 sum_b k_b^2 taps (1148); measured slower.
// Each pass is parallel with a shape-determined split; weight gradients are reduced in a
// fixed order: results do not depend on the thread count.
#include "fastvis/dilated_reparam.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/checks.h"
#include "core/cpu_features.h"
#include "core/dtype_convert.h"
#include "core/layout.h"
#include "core/scratch.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"
#include "ops/depthwise_conv/cpu_kernels.h"
#include "ops/dilated_reparam/cpu_kernels.h"

namespace fastvis {
namespace dilrep {
namespace {

constexpr int64_t kMaxExtent = 63;

using core::acc_size;
using core::align64;
using Carver = core::ScratchCarver;  // a null base measures (the scratch queries)

struct Kernels {
  void (*stats)(DType, const Shape&, const StatsPlan&, const void*, const void* const*, double*,
                void*, int);
  void (*dw_forward)(DType, const dwconv::Geom&, const void*, const void*, const void*, void*,
                     void*, int);
  void (*dw_wgrad)(DType, const dwconv::Geom&, const dwconv::WgradPlan&, const void*,
                   const void*, void*, void*, int);
};

const Kernels& kernels() {
  static const Kernels k = [] {
#if defined(FV_HAVE_ISA_AVX512)
    if (cpu::selected_isa() == cpu::Isa::Avx512)
      return Kernels{&avx512::stats_partials, &dwconv::avx512::forward,
                     &dwconv::avx512::backward_weight_partials};
#endif
#if defined(FV_HAVE_ISA_AVX2)
    if (cpu::selected_isa() == cpu::Isa::Avx2)
      return Kernels{&avx2::stats_partials, &dwconv::avx2::forward,
                     &dwconv::avx2::backward_weight_partials};
#endif
    return Kernels{&generic::stats_partials, &dwconv::generic::forward,
                   &dwconv::generic::backward_weight_partials};
  }();
  return k;
}

void check_channel_vector(const TensorView& t, const TensorView& x, int64_t c, const char* name,
                          int64_t b) {
  FV_CHECK_VALUE(t.ndim == 1 && t.shape[0] == c, name, "[", b, "]: expected shape [", c,
                 "] (one value per channel), got ", t.describe());
  FV_CHECK_TYPE(t.dtype == x.dtype, name, "[", b, "]: expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(t.dtype));
  FV_CHECK_VALUE(t.device == x.device, name, "[", b, "] is on ", device_name(t.device),
                 " but x is on ", device_name(x.device), "; all tensors must be on one device");
  FV_CHECK_VALUE(t.data != nullptr, name, "[", b, "]: null data pointer");
}

void check_activation(const TensorView& t, const TensorView& x, const DilatedReparamShape& s,
                      const char* name) {
  core::check_activation_like(t, x, s.n, s.c, s.h, s.w, name);
}

void check_stats(const TensorView& t, const TensorView& x, const DilatedReparamShape& s,
                 const char* name) {
  const int64_t want[2] = {s.branches, s.c};
  core::check_row_major(t, x, want, 2, dilated_reparam_stats_dtype(x.dtype), name,
                        "one value per branch and channel");
}

Layout common_layout(std::initializer_list<const TensorView*> ts) {
  return core::common_dense_layout(ts.begin(), static_cast<int>(ts.size()), "dilated_reparam");
}

Shape make_shape(const DilatedReparamShape& sh, const DilatedReparamBranches& br, DType dt) {
  Shape s{};
  s.n = sh.n;
  s.c = sh.c;
  s.h = sh.h;
  s.w = sh.w;
  s.cp = dwconv::padded_channels(sh.c, static_cast<int64_t>(acc_size(dt)));
  s.nb = br.count;
  for (int64_t b = 0; b < br.count; ++b) {
    s.k[b] = br.weight[b].shape[br.weight[b].ndim - 1];
    s.d[b] = br.dilation[b];
  }
  s.extent = sh.extent;
  return s;
}

// The "same" depthwise geometry over the whole batch for kernel k, dilation d.
dwconv::Geom same_geom(const Shape& s, int64_t k, int64_t d) {
  const int64_t p = d * (k - 1) / 2;
  return dwconv::Geom{s.n, s.c, s.h, s.w, k, k, s.h, s.w, 1, 1, p, p, d, d, s.cp};
}

// Element offset of weight[c, i, j] for (C,1,k,k) or (C,k,k) weights.
inline int64_t widx(const TensorView& w, int64_t c, int64_t i, int64_t j) {
  return c * w.strides[0] + i * w.strides[w.ndim - 2] + j * w.strides[w.ndim - 1];
}

// t's element at offset i as double, float32 read directly (the dtype dispatch of
// load_as_double per element was a visible part of small calls), and stored likewise.
inline double val(const TensorView& t, int64_t i) {
  return t.dtype == DType::Float32 ? static_cast<double>(static_cast<const float*>(t.data)[i])
                                   : load_as_double(t.dtype, t.data, i);
}
inline void put(const TensorView& t, int64_t i, double v) {
  if (t.dtype == DType::Float32)
    static_cast<float*>(t.data)[i] = static_cast<float>(v);
  else
    store_from_double(t.dtype, t.data, i, v);
}

// Packs scale[c] * w[c, i, j] as [k][k][cp] (flipped: tap (k-1-i, k-1-j)) in A; scale null = 1.
template <class A>
void pack_branch(const TensorView& w, int64_t C, int64_t cp, const double* scale, bool flip,
                 A* out) {
  const int64_t k = w.shape[w.ndim - 1];
  // Channel blocks over the pool (the packing is per channel; it ran serially between the
  // backward's parallel passes, 12 times per call).
  parallel_for(C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t si = flip ? k - 1 - i : i, sj = flip ? k - 1 - j : j;
        A* o = out + (i * k + j) * cp;
        for (int64_t c = c0; c < c1; ++c) {
          const double v = val(w, widx(w, c, si, sj));
          o[c] = static_cast<A>(scale ? scale[c] * v : v);
        }
      }
  });
  for (int64_t t = 0; t < k * k; ++t) std::fill(out + t * cp + C, out + (t + 1) * cp, A(0));
}

// The merged kernel sum_b scale[b][c] expand(w_b), [E][E][cp] in A (flipped if asked),
// summed in double in branch order.
template <class A>
void pack_merged(const Shape& s, const DilatedReparamBranches& br, const double* scale, bool flip,
                 double* tmp, A* out) {
  const int64_t E = s.extent, C = s.c, cp = s.cp, half = (E - 1) / 2;
  // Per channel block over the pool, each element summed in branch order as before.
  parallel_for(cp, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t e = 0; e < E * E; ++e) std::fill(tmp + e * cp + c0, tmp + e * cp + c1, 0.0);
    for (int64_t b = 0; b < s.nb; ++b) {
      const TensorView& w = br.weight[b];
      const int64_t k = s.k[b], d = s.d[b], o = half - pad_of(s, b);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) {
          const int64_t I = o + i * d, J = o + j * d;
          const int64_t ti = flip ? E - 1 - I : I, tj = flip ? E - 1 - J : J;
          double* t = tmp + (ti * E + tj) * cp;
          for (int64_t c = c0; c < std::min(c1, C); ++c)
            t[c] += scale[b * C + c] * val(w, widx(w, c, i, j));
        }
    }
    for (int64_t e = 0; e < E * E; ++e)
      for (int64_t c = c0; c < c1; ++c) out[e * cp + c] = static_cast<A>(tmp[e * cp + c]);
  });
}

inline double chan(const TensorView& t, int64_t c) {
  return load_as_double(t.dtype, t.data, c * t.strides[0]);
}

// ---------------------------------------------------------------- forward

struct FwdBufs {
  void *xh = nullptr, *yh = nullptr;
  std::vector<void*> wpk;
  void *kpk = nullptr, *bias = nullptr, *ktmp = nullptr;
  double* partial = nullptr;
  void* bufs = nullptr;  // the statistics pass and the output pass, one after the other
};

FwdBufs carve_forward(const Shape& s, DType dt, bool nchw, Carver& sc) {
  const size_t a = acc_size(dt), e = dtype_size(dt);
  const int nt = get_num_threads();
  FwdBufs f;
  const size_t act = static_cast<size_t>(s.n * s.c * s.h * s.w) * e;
  if (nchw) {
    f.xh = sc.take(act);
    f.yh = sc.take(act);
  }
  for (int64_t b = 0; b < s.nb; ++b) f.wpk.push_back(sc.take(s.k[b] * s.k[b] * s.cp * a));
  f.kpk = sc.take(s.extent * s.extent * s.cp * a);
  f.ktmp = sc.take(s.extent * s.extent * s.cp * sizeof(double));
  f.bias = sc.take(s.cp * a);
  const StatsPlan plan = stats_plan(s, static_cast<int64_t>(a));
  f.partial = static_cast<double*>(sc.take(plan.ntiles * s.nb * 2 * s.c * sizeof(double)));
  const int64_t out_elems =
      dwconv::fwd_plan(same_geom(s, s.extent, 1), static_cast<int64_t>(a)).buf_elems;
  f.bufs = sc.take(std::max(align64(plan.buf_elems * a), align64(out_elems * a)) * nt);
  return f;
}

template <class A>
void forward_t(const Shape& s, DType dt, const DilatedReparamBranches& br, double eps,
               const void* x, void* y, const TensorView& mean_out, const TensorView& var_out,
               const FwdBufs& f) {
  const int64_t C = s.c, B = s.nb, a = sizeof(A);
  const int nt = get_num_threads();
  for (int64_t b = 0; b < B; ++b)
    pack_branch<A>(br.weight[b], C, s.cp, nullptr, false, static_cast<A*>(f.wpk[b]));
  // 1. statistics
  const StatsPlan plan = stats_plan(s, a);
  std::vector<const void*> wp(f.wpk.begin(), f.wpk.end());
  kernels().stats(dt, s, plan, x, wp.data(), f.partial, f.bufs, nt);
  std::vector<double> mean(B * C), var(B * C), scale(B * C);
  const double M = static_cast<double>(s.n * s.h * s.w);
  parallel_for(C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t b = 0; b < B; ++b) {
        double cnt = 0, mu = 0, m2 = 0;
        for (int64_t t = 0; t < plan.ntiles; ++t) {
          const int64_t r0 = (t % plan.tpi) * plan.rt, r1 = std::min(s.h, r0 + plan.rt);
          const double nt_ = static_cast<double>((r1 - r0) * s.w);
          const double* pm = f.partial + (t * B + b) * 2 * C;
          const double delta = pm[c] - mu, tot = cnt + nt_;
          mu += delta * (nt_ / tot);
          m2 += pm[C + c] + delta * delta * (cnt * nt_ / tot);
          cnt = tot;
        }
        mean[b * C + c] = mu;
        var[b * C + c] = m2 / M;
      }
  });
  // 2. the merged kernel and bias, then one convolution
  std::vector<double> bias(C, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const double sb = chan(br.bn_weight[b], c) / std::sqrt(var[b * C + c] + eps);
      scale[b * C + c] = sb;
      bias[c] += chan(br.bn_bias[b], c) - sb * mean[b * C + c];
      store_from_double(mean_out.dtype, mean_out.data, b * C + c, mean[b * C + c]);
      store_from_double(var_out.dtype, var_out.data, b * C + c, var[b * C + c]);
    }
  pack_merged<A>(s, br, scale.data(), false, static_cast<double*>(f.ktmp), static_cast<A*>(f.kpk));
  A* bp = static_cast<A*>(f.bias);
  std::fill(bp, bp + s.cp, A(0));
  for (int64_t c = 0; c < C; ++c) bp[c] = static_cast<A>(bias[c]);
  kernels().dw_forward(dt, same_geom(s, s.extent, 1), x, f.kpk, f.bias, y, f.bufs, nt);
}

// ---------------------------------------------------------------- backward

struct BwdBufs {
  void *xh = nullptr, *gyh = nullptr, *dxh = nullptr, *r = nullptr, *tmp = nullptr;
  void *wpk = nullptr, *bias = nullptr;
  double *G = nullptr, *Sg = nullptr, *extra = nullptr;
  void *partial = nullptr, *bufs = nullptr;
};

BwdBufs carve_backward(const Shape& s, DType dt, bool nchw, bool need_x, bool need_w,
                       Carver& sc) {
  const size_t a = acc_size(dt), e = dtype_size(dt);
  const int nt = get_num_threads();
  const int64_t E = s.extent;
  BwdBufs f;
  const size_t act = static_cast<size_t>(s.n * s.c * s.h * s.w) * e;
  if (nchw) {
    f.xh = sc.take(act);
    f.gyh = sc.take(act);
    if (need_x) f.dxh = sc.take(act);
  }
  int64_t kmax = 1;
  for (int64_t b = 0; b < s.nb; ++b) kmax = std::max(kmax, s.k[b]);
  if (need_x || need_w) f.r = sc.take(act);
  if (need_x && s.nb > 1) f.tmp = sc.take(act);
  f.wpk = sc.take(kmax * kmax * s.cp * a);
  f.bias = sc.take(s.cp * a);
  f.G = static_cast<double*>(sc.take(E * E * s.c * sizeof(double)));
  f.Sg = static_cast<double*>(sc.take(s.c * sizeof(double)));
  f.extra = static_cast<double*>(sc.take(kmax * kmax * s.c * sizeof(double)));
  // Weight-gradient partials and tile buffers, and forward tile buffers: the largest need
  // of any geometry used (E x E at dilation 1, and every branch's).
  size_t part = 0, bufs = 0;
  auto need = [&](const dwconv::Geom& g) {
    const dwconv::WgradPlan wp = dwconv::wgrad_plan(g, static_cast<int64_t>(a));
    part = std::max(part, align64(wp.row_chunks * wp.partial_elems * a));
    bufs = std::max(bufs, align64((wp.x_elems + wp.gy_elems) * a) * nt);
    bufs = std::max(bufs, align64(dwconv::fwd_plan(g, static_cast<int64_t>(a)).buf_elems * a) * nt);
  };
  need(same_geom(s, E, 1));
  for (int64_t b = 0; b < s.nb; ++b) need(same_geom(s, s.k[b], s.d[b]));
  f.partial = sc.take(part);
  f.bufs = sc.take(bufs);
  return f;
}

// out[t*C + c] (t < k*k taps) and, if sum is not null, sum[c]: the weight and bias gradients
// of the geometry g for gradient gy against x, reduced over the row chunks in order, in double.
template <class A>
void wgrad(const Shape& s, DType dt, const dwconv::Geom& g, const A* gy, const A* x,
           const BwdBufs& f, double* out, double* sum) {
  const dwconv::WgradPlan plan = dwconv::wgrad_plan(g, sizeof(A));
  kernels().dw_wgrad(dt, g, plan, gy, x, f.partial, f.bufs, get_num_threads());
  const A* pp = static_cast<const A*>(f.partial);
  const int64_t KK = g.kh * g.kw, RC = plan.row_chunks, PE = plan.partial_elems, C = s.c;
  // Tap after tap over the channels of a chunk: the partials are read along channels (as
  // dwconv::reduce_weight_partials; channel after channel read a cache line per element).
  // Chunk after chunk into the output (each element still summed in chunk order from 0):
  // the chunk loop innermost read one value per chunk and channel, 13 % of a batch-1
  // backward at 640x7x7.
  parallel_for(C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t <= KK; ++t) {
      if (t == KK && !sum) break;
      double* o = t < KK ? out + t * C : sum;
      std::fill(o + c0, o + c1, 0.0);
      for (int64_t r = 0; r < RC; ++r) {
        const A* p = pp + r * PE + t * g.cp;
        for (int64_t c = c0; c < c1; ++c) o[c] += static_cast<double>(p[c]);
      }
    }
  });
}

template <class A>
void backward_t(const Shape& s, DType dt, const DilatedReparamBranches& br, const TensorView& mean_in,
                const TensorView& var_in, double eps, const A* gy, const A* x, A* dx,
                const TensorView* grad_w, const TensorView* grad_g, const TensorView* grad_bt,
                const BwdBufs& f) {
  const int64_t C = s.c, B = s.nb, E = s.extent, half = (E - 1) / 2;
  const int nt = get_num_threads();
  const double M = static_cast<double>(s.n * s.h * s.w);
  // G (E x E taps) and Sg from one weight-gradient pass of g against x.
  wgrad<A>(s, dt, same_geom(s, E, 1), gy, x, f, f.G, f.Sg);
  std::vector<double> coef_a(B * C), coef_u(B * C), coef_v(B * C);
  // Per channel (over the pool: every (b, c) is independent).
  parallel_for(C, 16, [&](int64_t c0, int64_t c1) {
  for (int64_t b = 0; b < B; ++b) {
    const TensorView& w = br.weight[b];
    const int64_t k = s.k[b], d = s.d[b], o = half - pad_of(s, b);
    for (int64_t c = c0; c < c1; ++c) {
      const double mu = load_as_double(mean_in.dtype, mean_in.data, b * C + c);
      const double var = load_as_double(var_in.dtype, var_in.data, b * C + c);
      const double sigma = std::sqrt(var + eps), gamma = chan(br.bn_weight[b], c);
      double sgz = 0;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j)
          sgz += val(w, widx(w, c, i, j)) * f.G[((o + i * d) * E + (o + j * d)) * C + c];
      const double sg = f.Sg[c];
      const double dgamma = (sgz - mu * sg) / sigma;
      const double ab = gamma / sigma;
      const double vb = -ab * dgamma / (M * sigma);
      coef_a[b * C + c] = ab;
      coef_v[b * C + c] = vb;
      coef_u[b * C + c] = -ab * sg / M - vb * mu;
      if (grad_g)
        store_from_double(grad_g[b].dtype, grad_g[b].data, c * grad_g[b].strides[0], dgamma);
      if (grad_bt)
        store_from_double(grad_bt[b].dtype, grad_bt[b].data, c * grad_bt[b].strides[0], sg);
    }
  }
  });
  if (!dx && !grad_w) return;
  const int64_t act = s.n * s.h * s.w * C;
  A* r = static_cast<A*>(f.r);
  A* tmp = static_cast<A*>(f.tmp);
  A* wpk = static_cast<A*>(f.wpk);
  A* bias = static_cast<A*>(f.bias);
  std::vector<A> ab(C);
  for (int64_t b = 0; b < B; ++b) {
    const TensorView& w = br.weight[b];
    const int64_t k = s.k[b];
    const dwconv::Geom g = same_geom(s, k, s.d[b]);
    // dz_b = conv(x; v_b w_b) + u_b + a_b g
    pack_branch<A>(w, C, s.cp, coef_v.data() + b * C, false, wpk);
    std::fill(bias, bias + s.cp, A(0));
    for (int64_t c = 0; c < C; ++c) {
      bias[c] = static_cast<A>(coef_u[b * C + c]);
      ab[c] = static_cast<A>(coef_a[b * C + c]);
    }
    kernels().dw_forward(dt, g, x, wpk, bias, r, f.bufs, nt);
    parallel_for(act / C, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        A* rp = r + p * C;
        const A* gp = gy + p * C;
        for (int64_t c = 0; c < C; ++c) rp[c] += ab[c] * gp[c];
      }
    });
    if (dx) {  // dx = sum_b conv_b^T(dz_b): the first branch writes dx, the others add
      pack_branch<A>(w, C, s.cp, nullptr, true, wpk);
      kernels().dw_forward(dt, g, r, wpk, nullptr, b == 0 ? dx : tmp, f.bufs, nt);
      if (b > 0)
        parallel_for(act, 4096, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) dx[i] += tmp[i];
        });
    }
    if (grad_w) {  // dw_b = corr(dz_b, x)
      wgrad<A>(s, dt, g, r, x, f, f.extra, nullptr);
      const TensorView& gw = grad_w[b];
      parallel_for(C, 16, [&](int64_t c0, int64_t c1) {
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; j < k; ++j)
            for (int64_t c = c0; c < c1; ++c)
              put(gw, widx(gw, c, i, j), f.extra[(i * k + j) * C + c]);
      });
    }
  }
}

}  // namespace
}  // namespace dilrep

using namespace dilrep;

DType dilated_reparam_stats_dtype(DType dt) {
  return dt == DType::Float64 ? DType::Float64 : DType::Float32;
}

DilatedReparamShape dilated_reparam_shape(const TensorView& x, const DilatedReparamBranches& br,
                                          double eps) {
  const core::NchwDims d = core::activation_dims(x, "x");
  DilatedReparamShape s;
  s.n = d.n;
  s.c = d.c;
  s.h = d.h;
  s.w = d.w;
  FV_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "eps: expected a positive finite number, got ",
                 eps);
  FV_CHECK_VALUE(br.count >= 1 && br.count <= kMaxBranches, "branches: expected 1 to ",
                 kMaxBranches, " branches, got ", br.count);
  FV_CHECK_VALUE(br.weight && br.dilation && br.bn_weight && br.bn_bias,
                 "branches: weight, dilation, bn_weight and bn_bias arrays are required");
  FV_CHECK_VALUE(s.n * s.h * s.w > 1, "x: BatchNorm in training mode needs more than one value "
                 "per channel (N*H*W > 1), got ", x.describe());
  int64_t extent0 = 0;
  for (int64_t b = 0; b < br.count; ++b) {
    const TensorView& w = br.weight[b];
    FV_CHECK_VALUE(w.ndim == 4 || w.ndim == 3, "weights[", b,
                   "]: expected shape (C, 1, k, k) or (C, k, k), got ", w.describe());
    if (w.ndim == 4)
      FV_CHECK_VALUE(w.shape[1] == 1, "weights[", b,
                     "]: a depthwise convolution has one input channel per group: expected (C, 1, "
                     "k, k), got ", w.describe());
    FV_CHECK_VALUE(w.shape[0] == s.c, "weights[", b, "]: expected ", s.c,
                   " output channels (the input's C), got ", w.describe());
    FV_CHECK_TYPE(w.dtype == x.dtype, "weights[", b, "]: expected dtype ", dtype_name(x.dtype),
                  " (the input's), got ", dtype_name(w.dtype));
    FV_CHECK_VALUE(w.device == x.device, "weights[", b, "] is on ", device_name(w.device),
                   " but x is on ", device_name(x.device), "; all tensors must be on one device");
    const int64_t kh = w.shape[w.ndim - 2], kw = w.shape[w.ndim - 1];
    FV_CHECK_VALUE(kh == kw && kh >= 1 && kh % 2 == 1, "weights[", b,
                   "]: expected a square kernel of odd size (\"same\" padding), got ", kh, "x", kw);
    FV_CHECK_VALUE(w.data != nullptr, "weights[", b, "]: null data pointer");
    const int64_t dl = br.dilation[b];
    FV_CHECK_VALUE(dl >= 1 && dl <= 1024, "dilations[", b, "]: expected a value in [1, 1024], got ",
                   dl);
    const int64_t ext = dl * (kh - 1) + 1;
    if (b == 0) {
      extent0 = ext;
      FV_CHECK_VALUE(ext <= kMaxExtent, "weights[0]: the merged kernel's extent dilation*(k-1)+1 = ",
                     ext, " exceeds ", kMaxExtent);
    } else {
      FV_CHECK_VALUE(ext <= extent0, "branch ", b, ": extent dilation*(k-1)+1 = ", dl, "*(", kh,
                     "-1)+1 = ", ext, " exceeds the first branch's ", extent0,
                     " (the first branch must be the largest)");
    }
    check_channel_vector(br.bn_weight[b], x, s.c, "bn_weights", b);
    check_channel_vector(br.bn_bias[b], x, s.c, "bn_biases", b);
  }
  s.branches = br.count;
  s.extent = extent0;
  FV_CHECK_VALUE(x.data != nullptr, "x: null data pointer");
  s.layout = (core::dense_layouts(x) & 2) ? Layout::NHWC : Layout::NCHW;
  return s;
}

namespace {
void check_cpu_dtype(const TensorView& x, bool backward) {
  FV_CHECK_RUNTIME(x.device.type != DeviceType::CUDA,
                   "dilated_reparam: no CUDA kernels yet (got ", x.describe(),
                   "); the Python op runs the PyTorch reference on CUDA tensors");
  core::check_cpu(x, "x");
  if (backward)
    FV_CHECK_TYPE(x.dtype == DType::Float32 || x.dtype == DType::Float64,
                  "dilated_reparam backward: expected float32 or float64 (bfloat16 gradients are "
                  "computed in float32 by the caller), got ", dtype_name(x.dtype));
}
}  // namespace

size_t dilated_reparam_forward_scratch_bytes(const TensorView& x,
                                             const DilatedReparamBranches& br) {
  const DilatedReparamShape sh = dilated_reparam_shape(x, br, 1.0);
  check_cpu_dtype(x, false);
  const Shape s = make_shape(sh, br, x.dtype);
  Carver sc(nullptr, 0);
  carve_forward(s, x.dtype, sh.layout == Layout::NCHW, sc);
  return sc.used();
}

void dilated_reparam_forward(const TensorView& x, const DilatedReparamBranches& br, double eps,
                             const TensorView& y, const TensorView& mean, const TensorView& var,
                             void* scratch, size_t scratch_bytes) {
  const DilatedReparamShape sh = dilated_reparam_shape(x, br, eps);
  check_activation(y, x, sh, "y");
  check_stats(mean, x, sh, "mean");
  check_stats(var, x, sh, "var");
  check_cpu_dtype(x, false);
  const Layout layout = common_layout({&x, &y});
  const size_t need = dilated_reparam_forward_scratch_bytes(x, br);
  FV_CHECK_VALUE(scratch != nullptr && scratch_bytes >= need, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  const Shape s = make_shape(sh, br, x.dtype);
  const bool nchw = layout == Layout::NCHW;
  Carver sc(scratch, scratch_bytes);
  const FwdBufs f = carve_forward(s, x.dtype, nchw, sc);
  const size_t e = x.itemsize();
  const void* xin = x.data;
  void* yout = y.data;
  if (nchw) {
    nchw_to_nhwc(x.data, f.xh, s.n, s.c, s.h * s.w, e);
    xin = f.xh;
    yout = f.yh;
  }
  if (x.dtype == DType::Float64)
    forward_t<double>(s, x.dtype, br, eps, xin, yout, mean, var, f);
  else
    forward_t<float>(s, x.dtype, br, eps, xin, yout, mean, var, f);
  if (nchw) nhwc_to_nchw(f.yh, y.data, s.n, s.c, s.h * s.w, e);
}

size_t dilated_reparam_backward_scratch_bytes(const TensorView& x,
                                              const DilatedReparamBranches& br) {
  const DilatedReparamShape sh = dilated_reparam_shape(x, br, 1.0);
  check_cpu_dtype(x, true);
  const Shape s = make_shape(sh, br, x.dtype);
  Carver sc(nullptr, 0);
  carve_backward(s, x.dtype, sh.layout == Layout::NCHW, true, true, sc);
  return sc.used();
}

void dilated_reparam_backward(const TensorView& grad_y, const TensorView& x,
                              const DilatedReparamBranches& br, const TensorView& mean,
                              const TensorView& var, double eps, const TensorView* grad_x,
                              const TensorView* grad_weight, const TensorView* grad_bn_weight,
                              const TensorView* grad_bn_bias, void* scratch,
                              size_t scratch_bytes) {
  const DilatedReparamShape sh = dilated_reparam_shape(x, br, eps);
  check_activation(grad_y, x, sh, "grad_y");
  if (grad_x) check_activation(*grad_x, x, sh, "grad_x");
  check_stats(mean, x, sh, "mean");
  check_stats(var, x, sh, "var");
  check_cpu_dtype(x, true);
  for (int64_t b = 0; b < br.count; ++b) {
    if (grad_weight) {
      const TensorView& g = grad_weight[b];
      const TensorView& w = br.weight[b];
      FV_CHECK_VALUE(g.ndim == w.ndim && g.dtype == w.dtype && g.device == w.device &&
                         g.data != nullptr,
                     "grad_weights[", b, "]: expected the weight's shape, dtype and device, got ",
                     g.describe());
      for (int i = 0; i < w.ndim; ++i)
        FV_CHECK_VALUE(g.shape[i] == w.shape[i], "grad_weights[", b, "]: expected ",
                       w.describe(), ", got ", g.describe());
    }
    if (grad_bn_weight) check_channel_vector(grad_bn_weight[b], x, sh.c, "grad_bn_weights", b);
    if (grad_bn_bias) check_channel_vector(grad_bn_bias[b], x, sh.c, "grad_bn_biases", b);
  }
  const Layout layout =
      grad_x ? common_layout({&x, &grad_y, grad_x}) : common_layout({&x, &grad_y});
  const size_t need = dilated_reparam_backward_scratch_bytes(x, br);
  FV_CHECK_VALUE(scratch != nullptr && scratch_bytes >= need, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  const Shape s = make_shape(sh, br, x.dtype);
  const bool nchw = layout == Layout::NCHW;
  Carver sc(scratch, scratch_bytes);
  const BwdBufs f = carve_backward(s, x.dtype, nchw, grad_x != nullptr, grad_weight != nullptr, sc);
  const size_t e = x.itemsize();
  const void* xin = x.data;
  const void* gyin = grad_y.data;
  void* dx = grad_x ? grad_x->data : nullptr;
  if (nchw) {
    nchw_to_nhwc(x.data, f.xh, s.n, s.c, s.h * s.w, e);
    nchw_to_nhwc(grad_y.data, f.gyh, s.n, s.c, s.h * s.w, e);
    xin = f.xh;
    gyin = f.gyh;
    if (grad_x) dx = f.dxh;
  }
  if (x.dtype == DType::Float64)
    backward_t<double>(s, x.dtype, br, mean, var, eps, static_cast<const double*>(gyin),
                       static_cast<const double*>(xin), static_cast<double*>(dx), grad_weight,
                       grad_bn_weight, grad_bn_bias, f);
  else
    backward_t<float>(s, x.dtype, br, mean, var, eps, static_cast<const float*>(gyin),
                      static_cast<const float*>(xin), static_cast<float*>(dx), grad_weight,
                      grad_bn_weight, grad_bn_bias, f);
  if (nchw && grad_x) nhwc_to_nchw(f.dxh, grad_x->data, s.n, s.c, s.h * s.w, e);
}

}  // namespace fastvis
