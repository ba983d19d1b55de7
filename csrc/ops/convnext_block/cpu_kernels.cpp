// CPU kernels of the fused ConvNeXt block, NHWC. Compiled once per instruction set
// (FV_ISA names the namespace, see CMakeLists.txt).
//
// Per tile: dwconv (dwconv::FV_ISA::forward_tile_acc, serial, into the tile buffer),
// LayerNorm (layernorm::FV_ISA::fwd_nhwc, in place), fc1 (GEMM), bias + GELU (SIMD over
// the hidden units), fc2 (GEMM), then layer scale, drop scale and the residual on the way
// out. The backward pass runs the same recomputation and then the chain rule backwards
// through the tile (see backward_tiles_t).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/blas.h"
#include "core/profile.h"
#include "core/gelu.h"
#include "core/simd.h"
#include "fastvis/threading.h"
#include "ops/convnext_block/cpu_kernels.h"
#include "ops/layer_norm/row_kernels.h"

#ifndef FV_ISA
#error "FV_ISA must name the instruction-set namespace"
#endif

namespace fastvis {
namespace cnblock {
namespace FV_ISA {
namespace {

using namespace ::fastvis::simd::FV_ISA;
using core::Op;

// A GEMM on the tile: one BLAS call, or split over the pool when the plan has few tiles.
template <class A>
inline void mm(const Plan& pl, Op ta, Op tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a,
               int64_t lda, const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  if (pl.split_gemm)
    core::gemm_split(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  else
    core::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ------------------------------------------------------------------ GELU
//
// The GELU math (vgelu, vgelu_grad, sgelu, sgelu_grad) is in core/gelu.h.

// h[p][j] = gelu(h[p][j] + b[j]) over np rows of n (row stride ld of h and g); with `keep`,
// h keeps the biased pre-activation and the GELU goes to g.
void bias_gelu_ld(int64_t np, int64_t n, int64_t ld, float* h, const float* b, bool tanh_form, float* g) {
  constexpr int L = VT<float>::L;
  for (int64_t p = 0; p < np; ++p) {
    float* hp = h + p * ld;
    float* gp = g ? g + p * ld : hp;
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      const VF v = vload<float, float>(hp + j) + vload<float, float>(b + j);
      if (g) vstore<float, float>(hp + j, v);
      vstore<float, float>(gp + j, vgelu(v, tanh_form));
    }
    if (j < n) {
      const VF v = vload_n<float, float>(hp + j, n - j) + vload_n<float, float>(b + j, n - j);
      if (g) vstore_n<float, float>(hp + j, v, n - j);
      vstore_n<float, float>(gp + j, vgelu(v, tanh_form), n - j);
    }
  }
}
void bias_gelu_ld(int64_t np, int64_t n, int64_t ld, double* h, const double* b, bool tanh_form, double* g) {
  for (int64_t p = 0; p < np; ++p) {
    double* hp = h + p * ld;
    double* gp = g ? g + p * ld : hp;
    for (int64_t j = 0; j < n; ++j) {
      const double v = hp[j] + b[j];
      if (g) hp[j] = v;
      gp[j] = sgelu(v, tanh_form);
    }
  }
}
template <class A>
inline void bias_gelu(int64_t np, int64_t n, A* h, const A* b, bool tanh_form, A* g) {
  bias_gelu_ld(np, n, n, h, b, tanh_form, g);
}

// h[p][j] = dg[p][j] * gelu'(h[p][j]) (h holds the pre-activation), and db[j] += h[p][j]
// pixel by pixel.
void gelu_backward(int64_t np, int64_t n, float* h, const float* dg, bool tanh_form, float* db) {
  constexpr int L = VT<float>::L;
  for (int64_t p = 0; p < np; ++p) {
    float* hp = h + p * n;
    const float* dp = dg + p * n;
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      const VF d = vload<float, float>(dp + j) * vgelu_grad(vload<float, float>(hp + j), tanh_form);
      vstore<float, float>(hp + j, d);
      vstore<float, float>(db + j, vload<float, float>(db + j) + d);
    }
    if (j < n) {
      const VF d = vload_n<float, float>(dp + j, n - j) *
                   vgelu_grad(vload_n<float, float>(hp + j, n - j), tanh_form);
      vstore_n<float, float>(hp + j, d, n - j);
      vstore_n<float, float>(db + j, vload_n<float, float>(db + j, n - j) + d, n - j);
    }
  }
}
void gelu_backward(int64_t np, int64_t n, double* h, const double* dg, bool tanh_form,
                   double* db) {
  for (int64_t p = 0; p < np; ++p)
    for (int64_t j = 0; j < n; ++j) {
      const double d = dg[p * n + j] * sgelu_grad(h[p * n + j], tanh_form);
      h[p * n + j] = d;
      db[j] += d;
    }
}

// g[p][j] = gelu(a[p][j]) over np rows of n (a already biased).
void gelu_of(int64_t np, int64_t n, const float* a, bool tanh_form, float* g) {
  constexpr int L = VT<float>::L;
  const int64_t ne = np * n;
  int64_t i = 0;
  for (; i + L <= ne; i += L) vstore<float, float>(g + i, vgelu(vload<float, float>(a + i), tanh_form));
  if (i < ne)
    vstore_n<float, float>(g + i, vgelu(vload_n<float, float>(a + i, ne - i), tanh_form), ne - i);
}
void gelu_of(int64_t np, int64_t n, const double* a, bool tanh_form, double* g) {
  for (int64_t i = 0; i < np * n; ++i) g[i] = sgelu(a[i], tanh_form);
}

// ------------------------------------------------------------------ tile pieces

// Inception mixer output of image rows [g0, g1) into out [pixels][C]: the identity
// channels are copied, and each branch's g channels are gathered from the input rows it
// reads into a dense slice (buf), convolved by the depthwise tile kernel into a dense
// [pixels][g] block and scattered into their channels of out. The copies stay in L2.
// buf: inception_buf_elems(...) accumulators (see plan()).
template <class T, class A>
void inception_tile(DType dt, const Shape& s, const Packed& pk, const T* x, int64_t g0,
                    int64_t g1, A* out, A* buf, int64_t slice_elems, int64_t os_elems) {
  const Mixer& m = s.mix;
  const int64_t C = s.c, W = s.w, G = m.g;
  T* xs = reinterpret_cast<T*>(buf);
  A* os = buf + slice_elems;
  A* dwb = os + os_elems;
  for (int64_t gr = g0; gr < g1;) {
    const int64_t n = gr / s.h, r0 = gr % s.h, r1 = std::min(s.h, r0 + (g1 - gr));
    const int64_t np = (r1 - r0) * W;
    A* o = out + (gr - g0) * W * C;
    const T* xr = x + ((n * s.h + r0) * W) * C;
    for (int64_t p = 0; p < np; ++p)
      for (int64_t c = 0; c < m.cid; ++c) o[p * C + c] = sload<T, A>(xr + p * C + c);
    for (int b = 0; b < 3; ++b) {
      int64_t kh, kw, off, s0;
      inception_branch(m, b, kh, kw, off);
      const dwconv::Geom geo = same_tile_geom(G, s.h, W, kh, kw, m.dil, m.cpg, r0, r1, s0);
      const T* src = x + ((n * s.h + s0) * W) * C + off;
      const int64_t npx = geo.h * W;
      for (int64_t p = 0; p < npx; ++p)
        std::memcpy(xs + p * G, src + p * C, static_cast<size_t>(G) * sizeof(T));
      ::fastvis::dwconv::FV_ISA::forward_tile_acc(dt, geo, xs, pk.mw[b], pk.mb[b], os, dwb);
      for (int64_t p = 0; p < np; ++p)
        std::memcpy(o + p * C + off, os + p * G, static_cast<size_t>(G) * sizeof(A));
    }
    gr += r1 - r0;
  }
}

// Mixer output (depthwise k x k over all channels, or the inception mixer) of image rows
// [g0, g1) (global rows n*H + r) into out [pixels][C].
template <class T, class A>
void dw_tile(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const T* x, int64_t g0,
             int64_t g1, A* out, A* dwbuf) {
  if (s.mix.kind == Mixer::Inception) {
    inception_tile<T, A>(dt, s, pk, x, g0, g1, out, dwbuf, pl.inc_slice_elems, pl.inc_out_elems);
    return;
  }
  if (s.mix.kind == Mixer::Identity) {  // the rows of x themselves, in A
    constexpr int L = VT<A>::L;
    const T* src = x + g0 * s.w * s.c;
    const int64_t ne = (g1 - g0) * s.w * s.c;
    int64_t i = 0;
    for (; i + L <= ne; i += L) vstore<A, A>(out + i, vload<T, A>(src + i));
    for (; i < ne; ++i) out[i] = sload<T, A>(src + i);
    return;
  }
  for (int64_t gr = g0; gr < g1;) {
    const int64_t n = gr / s.h, r0 = gr % s.h, r1 = std::min(s.h, r0 + (g1 - gr));
    int64_t s0;
    const dwconv::Geom g = tile_geom(s, r0, r1, s0);
    ::fastvis::dwconv::FV_ISA::forward_tile_acc(dt, g, x + ((n * s.h + s0) * s.w) * s.c, pk.dw,
                                                pk.dwb, out + (gr - g0) * s.w * s.c, dwbuf);
    gr += r1 - r0;
  }
}

// y = x + ds[n] * gamma * (o + b2) for the np pixels starting at global pixel p0; without
// the x term (RESIDUAL false) for blocks without a residual (the MLP op).
template <class T, class A, bool RESIDUAL>
void output_pixels(const Shape& s, const Packed& pk, int64_t p0, int64_t np, const T* x,
                   const A* o, T* y) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  const A* gamma = static_cast<const A*>(pk.gamma);
  const A* b2 = static_cast<const A*>(pk.b2);
  const A* ds = static_cast<const A*>(pk.ds);
  const int64_t C = s.c, hw = s.h * s.w;
  for (int64_t p = 0; p < np; ++p) {
    const A sc = ds[(p0 + p) / hw];
    const V scv = V{} + sc;
    const T* xp = x + (p0 + p) * C;
    T* yp = y + (p0 + p) * C;
    const A* op = o + p * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V v = scv * vload<A, A>(gamma + c) * (vload<A, A>(op + c) + vload<A, A>(b2 + c));
      vstore<T, A>(yp + c, RESIDUAL ? vload<T, A>(xp + c) + v : v);
    }
    for (; c < C; ++c) {
      const A v = sc * gamma[c] * (op[c] + b2[c]);
      sstore<T, A>(yp + c, RESIDUAL ? sload<T, A>(xp + c) + v : v);
    }
  }
}

template <class T, class A>
void residual_out(const Shape& s, const Packed& pk, int64_t p0, int64_t np, const T* x,
                  const A* o, T* y) {
  if (pk.residual)
    output_pixels<T, A, true>(s, pk, p0, np, x, o, y);
  else
    output_pixels<T, A, false>(s, pk, p0, np, x, o, y);
}

// GRN on the tile: h[p][j] = h[p][j] * f[n][j] + b[j] (n the pixel's image).
template <class A>
void grn_apply(const Shape& s, int64_t p0, int64_t np, A* h, const A* f, const A* b) {
  constexpr int L = VT<A>::L;
  const int64_t Hd = s.hidden, hw = s.h * s.w;
  for (int64_t p = 0; p < np; ++p) {
    const A* fn = f + ((p0 + p) / hw) * Hd;
    A* hp = h + p * Hd;
    int64_t j = 0;
    for (; j + L <= Hd; j += L)
      vstore<A, A>(hp + j, vload<A, A>(hp + j) * vload<A, A>(fn + j) + vload<A, A>(b + j));
    for (; j < Hd; ++j) hp[j] = hp[j] * fn[j] + b[j];
  }
}

// GRN's input gradient on the tile: g[p][j] = dz[p][j] * f[n][j] + u[n][j] * g[p][j].
template <class A>
void grn_backward_apply(const Shape& s, int64_t p0, int64_t np, const A* dz, const A* f,
                        const A* u, A* g) {
  constexpr int L = VT<A>::L;
  const int64_t Hd = s.hidden, hw = s.h * s.w;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t n = (p0 + p) / hw;
    const A* fn = f + n * Hd;
    const A* un = u + n * Hd;
    const A* dp = dz + p * Hd;
    A* gp = g + p * Hd;
    int64_t j = 0;
    for (; j + L <= Hd; j += L)
      vstore<A, A>(gp + j, vload<A, A>(dp + j) * vload<A, A>(fn + j) +
                               vload<A, A>(un + j) * vload<A, A>(gp + j));
    for (; j < Hd; ++j) gp[j] = dp[j] * fn[j] + un[j] * gp[j];
  }
}

// do = dy * ds[n] * gamma for np pixels from global pixel p0.
template <class T, class A>
void scaled_grad(const Shape& s, const Packed& pk, int64_t p0, int64_t np, const T* gy, A* dob) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  const A* gamma = static_cast<const A*>(pk.gamma);
  const A* ds = static_cast<const A*>(pk.ds);
  const int64_t C = s.c, hw = s.h * s.w;
  for (int64_t p = 0; p < np; ++p) {
    const A sc = ds[(p0 + p) / hw];
    const V scv = V{} + sc;
    const T* gp = gy + (p0 + p) * C;
    A* dp = dob + p * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) vstore<A, A>(dp + c, vload<T, A>(gp + c) * scv * vload<A, A>(gamma + c));
    for (; c < C; ++c) dp[c] = sload<T, A>(gp + c) * sc * gamma[c];
  }
}

// The mixer output of rows [g0, g1), normalised when the block has a LayerNorm, into t
// [pixels][C].
template <class T, class A>
void mixer_tile(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const T* x,
                int64_t g0, int64_t g1, A* t, A* dwb) {
  const int64_t np = (g1 - g0) * s.w;
  {
    prof::Scope ps(prof::kDwconv);
    dw_tile<T, A>(dt, s, pl, pk, x, g0, g1, t, dwb);
  }
  if (pk.norm) {
    prof::Scope ps(prof::kLayerNorm);
    ::fastvis::layernorm::FV_ISA::fwd_nhwc<A, A>(np, s.c, t, static_cast<const A*>(pk.nw),
                                                 static_cast<const A*>(pk.nb),
                                                 static_cast<A>(pk.eps), t, nullptr, nullptr);
  }
}

// t[p][c] *= se[n][c] for np pixels from global pixel p0 (n the pixel's image).
template <class A>
void se_apply(const Shape& s, int64_t p0, int64_t np, A* t, const A* se) {
  constexpr int L = VT<A>::L;
  const int64_t C = s.c, hw = s.h * s.w;
  for (int64_t p = 0; p < np; ++p) {
    const A* sn = se + ((p0 + p) / hw) * C;
    A* tp = t + p * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) vstore<A, A>(tp + c, vload<A, A>(tp + c) * vload<A, A>(sn + c));
    for (; c < C; ++c) tp[c] *= sn[c];
  }
}

// t -> hidden activations g = GELU(fc1(SE?(LN?(mixer(x))))) of rows [g0, g1) into hb;
// with keep_a, fc1's biased pre-activations go there (and g to hb).
template <class T, class A>
void hidden_tile(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const T* x,
                 int64_t g0, int64_t g1, A* t, A* hb, A* dwb, A* keep_a = nullptr) {
  const int64_t np = (g1 - g0) * s.w;
  mixer_tile<T, A>(dt, s, pl, pk, x, g0, g1, t, dwb);
  if (pk.se_scale) se_apply<A>(s, g0 * s.w, np, t, static_cast<const A*>(pk.se_scale));
  // GELU over each column block of fc1's output right after it (with a split GEMM: on the
  // thread that computed the block, in parallel; a one-tile plan ran it on one thread after
  // the product). With the split, the fc1 phase of the profiler includes its thread's GELU.
  const A* b1 = static_cast<const A*>(pk.b1);
  const int64_t Hd = s.hidden;
  auto gelu_cols = [&](int64_t j0, int64_t nj) {
    prof::Scope ps(prof::kGelu);
    if (keep_a)
      bias_gelu_ld(np, nj, Hd, keep_a + j0, b1 + j0, pk.tanh, hb + j0);
    else
      bias_gelu_ld(np, nj, Hd, hb + j0, b1 + j0, pk.tanh, static_cast<A*>(nullptr));
  };
  const bool kmaj = pk.w1t != nullptr;
  const A* w1 = static_cast<const A*>(kmaj ? pk.w1t : pk.w1);
  A* a = keep_a ? keep_a : hb;
  if (pl.split_gemm) {
    prof::Scope ps(prof::kFc1);
    core::gemm_split(Op::N, kmaj ? Op::N : Op::T, np, Hd, s.c, A(1), t, s.c, w1, kmaj ? Hd : s.c, A(0), a,
                     Hd, std::function<void(int64_t, int64_t)>(gelu_cols));
  } else {
    {
      prof::Scope ps(prof::kFc1);
      core::gemm(Op::N, kmaj ? Op::N : Op::T, np, Hd, s.c, A(1), t, s.c, w1, kmaj ? Hd : s.c, A(0), a, Hd);
    }
    gelu_cols(0, Hd);
  }
}

// Per image row: rowsum[r][c] = sum over the row's pixels of the mixer(+norm) output.
template <class T, class A>
void se_stats_t(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const T* x,
                A* rowsum, A* bufs, int nbufs) {
  const int64_t C = s.c, rows = s.n * s.h;
  parallel_for_indexed(pl.ntiles, 1, [&](int slot, int64_t begin, int64_t end) {
    A* t = bufs + std::min(slot, nbufs - 1) * pl.fwd_elems;
    A* dwb = t + pl.P * C + pl.P * s.hidden;  // forward_t's layout
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t g0 = tile * pl.rt, g1 = std::min(rows, g0 + pl.rt);
      mixer_tile<T, A>(dt, s, pl, pk, x, g0, g1, t, dwb);
      for (int64_t gr = g0; gr < g1; ++gr) {
        A* o = rowsum + gr * C;
        std::fill(o, o + C, A(0));
        for (int64_t w = 0; w < s.w; ++w) {
          const A* tp = t + ((gr - g0) * s.w + w) * C;
          for (int64_t c = 0; c < C; ++c) o[c] += tp[c];
        }
      }
    }
  });
}

// ------------------------------------------------------------------ forward

template <class T, class A>
void forward_t(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const T* x, T* y,
               A* bufs, int nbufs) {
  const int64_t C = s.c, Hd = s.hidden, rows = s.n * s.h;
  const A* w2 = static_cast<const A*>(pk.w2);
  parallel_for_indexed(pl.ntiles, 1, [&](int slot, int64_t begin, int64_t end) {
    A* t = bufs + std::min(slot, nbufs - 1) * pl.fwd_elems;
    A* hb = t + pl.P * C;
    A* dwb = hb + pl.P * Hd;
    A* const stored = static_cast<A*>(pk.hidden);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t g0 = tile * pl.rt, g1 = std::min(rows, g0 + pl.rt), np = (g1 - g0) * s.w;
      if (stored)
        hb = stored + g0 * s.w * Hd;  // the statistics pass left g there
      else
        hidden_tile<T, A>(dt, s, pl, pk, x, g0, g1, t, hb, dwb);
      if (pk.grn_f) {
        prof::Scope ps(prof::kGrn);
        grn_apply<A>(s, g0 * s.w, np, hb, static_cast<const A*>(pk.grn_f),
                     static_cast<const A*>(pk.grn_b));
      }
      {
        prof::Scope ps(prof::kFc2);
        if (pk.w2t)
          mm(pl, Op::N, Op::N, np, C, Hd, A(1), hb, Hd, static_cast<const A*>(pk.w2t), C, A(0), t, C);
        else
          mm(pl, Op::N, Op::T, np, C, Hd, A(1), hb, Hd, w2, Hd, A(0), t, C);
      }
      prof::Scope ps(prof::kOutput);
      residual_out<T, A>(s, pk, g0 * s.w, np, x, t, y);
    }
  });
}

// ------------------------------------------------------------------ backward (tiles)
//
// Per tile, with t1 = dwconv(x), t2 = LN(t1), a = t2 W1^T + b1, g = gelu(a),
// o = g W2^T (+ b2), y = x + ds * gamma * (o + b2):
//   do = dy * ds * gamma             db2 += sum do     dgamma += sum dy * ds * (o + b2)
//   dW2 += do^T g                     dg = do W2
//   da = dg * gelu'(a)               db1 += sum da     dW1 += da^T t2     dt2 = da W1
//   dt1 = LN backward (dnorm_w += sum dt2 * xhat, dnorm_b += sum dt2)  -> D
// Without a LayerNorm (pk.norm false) t2 = t1 and D = dt2; without D (null: no gradient of
// the mixer output wanted, the MLP op when x needs none) the last GEMM is skipped.
// Tiles are grouped in plan.chunks contiguous runs; each run sums into its own partials
// in tile order, and the caller reduces the runs in order: the result does not depend on
// which thread ran which run.
template <class T, class A>
void backward_tiles_t(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const T* x,
                      const T* gy, T* D, A* partials, A* w1_0, A* w2_0, A* bufs, int nbufs,
                      bool need_gamma) {
  (void)need_gamma;  // the layer-scale gradient always comes from the fc2 partials
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  const int64_t C = s.c, Hd = s.hidden, rows = s.n * s.h, hw = s.h * s.w;
  const PartialLayout lay = partial_layout(s);
  const A* w1 = static_cast<const A*>(pk.w1);
  const A* w2 = static_cast<const A*>(pk.w2);
  const A* b1 = static_cast<const A*>(pk.b1);
  const A* nw = static_cast<const A*>(pk.nw);
  const A* nb = static_cast<const A*>(pk.nb);
  const A* gamma = static_cast<const A*>(pk.gamma);
  const A* ds = static_cast<const A*>(pk.ds);
  parallel_for_indexed(pl.chunks, 1, [&](int slot, int64_t cbeg, int64_t cend) {
    A* t1 = bufs + std::min(slot, nbufs - 1) * pl.bwd_elems;
    A* t2 = t1 + pl.P * C;
    A* dob = t2 + pl.P * C;
    A* dt2 = dob + pl.P * C;
    A* mean = dt2 + pl.P * C;
    A* rstd = mean + pl.P;
    A* ab = rstd + pl.P;
    A* gb = ab + pl.P * Hd;
    A* zb = gb + pl.P * Hd;  // GRN: its output z, then dz
    A* dwb = zb + pl.P * Hd;
    const A* grn_f = static_cast<const A*>(pk.grn_f);
    A* const store_a = static_cast<A*>(pk.grn_a);
    const A* const store_dz = static_cast<const A*>(pk.grn_dz);
    for (int64_t chunk = cbeg; chunk < cend; ++chunk) {
      A* part = partials + chunk * pl.partial_elems;  // the stride the reduction reads
      // Run 0's weight-gradient sums may go straight to the caller's gradient tensors
      // (w1_0 / w2_0, see backward_tiles in cpu_kernels.h).
      A* const pw1 = chunk == 0 && w1_0 ? w1_0 : part + lay.w1;
      A* const pw2 = chunk == 0 && w2_0 ? w2_0 : part + lay.w2;
      // The weight-gradient slots (2 x C x hidden) are written by the run's first tile's
      // GEMMs (beta = 0) instead of zeroed and then read back: for the wide blocks that
      // is 19 MB less to write and read per run. The small sums are zeroed.
      std::fill(part + lay.b1, part + lay.total, A(0));
      const int64_t tb = chunk * pl.ntiles / pl.chunks, te = (chunk + 1) * pl.ntiles / pl.chunks;
      for (int64_t tile = tb; tile < te; ++tile) {
        const A wbeta = tile == tb ? A(0) : A(1);
        const int64_t g0 = tile * pl.rt, g1 = std::min(rows, g0 + pl.rt), np = (g1 - g0) * s.w;
        const int64_t p0 = g0 * s.w;
        {
          prof::Scope ps(prof::kDwconv);
          dw_tile<T, A>(dt, s, pl, pk, x, g0, g1, t1, dwb);
        }
        A* z = t1;  // fc1's input
        if (pk.norm) {
          prof::Scope ps(prof::kLayerNorm);
          ::fastvis::layernorm::FV_ISA::fwd_nhwc<A, A>(np, C, t1, nw, nb, static_cast<A>(pk.eps),
                                                       t2, mean, rstd);
          z = t2;
        }
        // a: fc1's biased pre-activations, then (gelu_backward) their gradient; the GRN
        // statistics pass's copy when it kept one (scratch: overwriting it is fine).
        A* const a = store_a ? store_a + p0 * Hd : ab;
        if (store_a) {
          prof::Scope ps(prof::kGelu);
          gelu_of(np, Hd, a, pk.tanh, gb);
        } else {
          {
            prof::Scope ps(prof::kFc1);
            if (pk.w1t)
              mm(pl, Op::N, Op::N, np, Hd, C, A(1), z, C, static_cast<const A*>(pk.w1t), Hd, A(0), ab, Hd);
            else
              mm(pl, Op::N, Op::T, np, Hd, C, A(1), z, C, w1, C, A(0), ab, Hd);
          }
          prof::Scope ps(prof::kGelu);
          bias_gelu(np, Hd, ab, b1, pk.tanh, gb);
        }
        A* zin = gb;  // fc2's input: g, or GRN(g)
        if (grn_f) {
          prof::Scope ps(prof::kGrn);
          std::copy(gb, gb + np * Hd, zb);
          grn_apply<A>(s, p0, np, zb, grn_f, static_cast<const A*>(pk.grn_b));
          zin = zb;
        }
        // e = dy * ds (dob: do = e * gamma). The fc2 weight-gradient GEMM takes e, not do:
        // its partial is M = sum_p e_p z_p^T, and the reduction forms dW2 = gamma * M and
        // dgamma_c = sum_j W2_cj M_cj + b2_c sum_p e_pc, so fc2's output never has to be
        // recomputed here (one GEMM fewer per tile). The b2 slot sums e.
        A* e = dt2;
        A* esum = part + lay.b2;
        {  // ps_out
        prof::Scope ps_out(prof::kGradOut);
        for (int64_t p = 0; p < np; ++p) {
          const A sc = ds[(p0 + p) / hw];
          const V scv = V{} + sc;
          const T* gp = gy + (p0 + p) * C;
          A* dp = dob + p * C;
          A* ep = e + p * C;
          int64_t c = 0;
          for (; c + L <= C; c += L) {
            const V g = vload<T, A>(gp + c) * scv;
            vstore<A, A>(ep + c, g);
            vstore<A, A>(dp + c, g * vload<A, A>(gamma + c));
            vstore<A, A>(esum + c, vload<A, A>(esum + c) + g);
          }
          for (; c < C; ++c) {
            const A g = sload<T, A>(gp + c) * sc;
            ep[c] = g;
            dp[c] = g * gamma[c];
            esum[c] += g;
          }
        }
        }  // ps_out
        {
          prof::Scope ps(prof::kWgrad);
          mm(pl, Op::T, Op::N, C, Hd, np, A(1), e, C, zin, Hd, wbeta, pw2, Hd);
        }
        if (grn_f) {  // dz (kept by the statistics pass, or recomputed), then dg = dz * f + u * g
          const A* dz = store_dz ? store_dz + p0 * Hd : zb;
          if (!store_dz) {
            prof::Scope ps(prof::kDgrad);
            mm(pl, Op::N, Op::N, np, Hd, C, A(1), dob, C, w2, Hd, A(0), zb, Hd);
          }
          prof::Scope ps(prof::kGrn);
          grn_backward_apply<A>(s, p0, np, dz, grn_f, static_cast<const A*>(pk.grn_u), gb);
        } else {
          prof::Scope ps(prof::kDgrad);
          mm(pl, Op::N, Op::N, np, Hd, C, A(1), dob, C, w2, Hd, A(0), gb, Hd);
        }
        {
          prof::Scope ps(prof::kGeluBwd);
          gelu_backward(np, Hd, a, gb, pk.tanh, part + lay.b1);
        }
        {
          prof::Scope ps(prof::kWgrad);
          mm(pl, Op::T, Op::N, Hd, C, np, A(1), a, Hd, z, C, wbeta, pw1, C);
        }
        if (!D) continue;
        {
          prof::Scope ps(prof::kDgrad);
          mm(pl, Op::N, Op::N, np, C, Hd, A(1), a, Hd, w1, C, A(0), dt2, C);
        }
        const A* dz = dt2;  // the gradient stored as D
        if (pk.norm) {
          prof::Scope ps(prof::kLayerNormBwd);
          ::fastvis::layernorm::FV_ISA::bwd_nhwc<A, A>(np, C, dt2, t1, nw, mean, rstd, dob,
                                                       part + lay.nw, part + lay.nb);
          dz = dob;
        }
        prof::Scope ps_store(prof::kStoreD);
        T* Dp = D + p0 * C;
        const int64_t ne = np * C;
        int64_t i = 0;
        for (; i + L <= ne; i += L) vstore<T, A>(Dp + i, vload<A, A>(dz + i));
        for (; i < ne; ++i) sstore<T, A>(Dp + i, dz[i]);
      }
    }
  });
}

// Per image row: rowsq[r][j] = sum over the row's pixels of g^2.
template <class T, class A>
void grn_forward_stats_t(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const T* x,
                         A* rowsq, A* bufs, int nbufs) {
  const int64_t C = s.c, Hd = s.hidden, rows = s.n * s.h;
  parallel_for_indexed(pl.ntiles, 1, [&](int slot, int64_t begin, int64_t end) {
    A* t = bufs + std::min(slot, nbufs - 1) * pl.fwd_elems;
    A* const own = t + pl.P * C;
    A* dwb = own + pl.P * Hd;
    A* const stored = static_cast<A*>(pk.hidden);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t g0 = tile * pl.rt, g1 = std::min(rows, g0 + pl.rt);
      A* hb = stored ? stored + g0 * s.w * Hd : own;  // kept for the output pass
      hidden_tile<T, A>(dt, s, pl, pk, x, g0, g1, t, hb, dwb);
      for (int64_t gr = g0; gr < g1; ++gr) {
        A* out = rowsq + gr * Hd;
        std::fill(out, out + Hd, A(0));
        for (int64_t w = 0; w < s.w; ++w) {
          const A* hp = hb + ((gr - g0) * s.w + w) * Hd;
          for (int64_t j = 0; j < Hd; ++j) out[j] += hp[j] * hp[j];
        }
      }
    }
  });
}

// Per image row: rowt[r][j] = sum of dz * g, rowdb[r][j] = sum of dz, dz = (dy ds gamma) W2.
template <class T, class A>
void grn_backward_stats_t(DType dt, const Shape& s, const Plan& pl, const Packed& pk,
                          const T* x, const T* gy, A* rowt, A* rowdb, A* bufs, int nbufs) {
  const int64_t C = s.c, Hd = s.hidden, rows = s.n * s.h;
  const A* w2 = static_cast<const A*>(pk.w2);
  parallel_for_indexed(pl.ntiles, 1, [&](int slot, int64_t begin, int64_t end) {
    A* t = bufs + std::min(slot, nbufs - 1) * pl.bwd_elems;
    A* hb = t + pl.P * C;
    A* const own_db = hb + pl.P * Hd;
    A* dwb = own_db + pl.P * Hd;
    A* const store_a = static_cast<A*>(pk.grn_a);
    A* const store_dz = static_cast<A*>(pk.grn_dz);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t g0 = tile * pl.rt, g1 = std::min(rows, g0 + pl.rt), np = (g1 - g0) * s.w;
      hidden_tile<T, A>(dt, s, pl, pk, x, g0, g1, t, hb, dwb,
                        store_a ? store_a + g0 * s.w * Hd : nullptr);
      scaled_grad<T, A>(s, pk, g0 * s.w, np, gy, t);
      A* const db = store_dz ? store_dz + g0 * s.w * Hd : own_db;  // kept for the gradient pass
      mm(pl, Op::N, Op::N, np, Hd, C, A(1), t, C, w2, Hd, A(0), db, Hd);
      for (int64_t gr = g0; gr < g1; ++gr) {
        A* ot = rowt + gr * Hd;
        A* ob = rowdb + gr * Hd;
        std::fill(ot, ot + Hd, A(0));
        std::fill(ob, ob + Hd, A(0));
        for (int64_t w = 0; w < s.w; ++w) {
          const int64_t q = ((gr - g0) * s.w + w) * Hd;
          for (int64_t j = 0; j < Hd; ++j) {
            ot[j] += db[q + j] * hb[q + j];
            ob[j] += db[q + j];
          }
        }
      }
    }
  });
}

}  // namespace

void forward(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const void* x, void* y,
             void* bufs, int nbufs) {
  switch (dt) {
    case DType::Float32:
      forward_t<float, float>(dt, s, pl, pk, static_cast<const float*>(x), static_cast<float*>(y),
                              static_cast<float*>(bufs), nbufs);
      break;
    case DType::Float64:
      forward_t<double, double>(dt, s, pl, pk, static_cast<const double*>(x),
                                static_cast<double*>(y), static_cast<double*>(bufs), nbufs);
      break;
    case DType::BFloat16:
      forward_t<bfloat16, float>(dt, s, pl, pk, static_cast<const bfloat16*>(x),
                                 static_cast<bfloat16*>(y), static_cast<float*>(bufs), nbufs);
      break;
    default: break;
  }
}

void backward_tiles(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const void* x,
                    const void* gy, void* d, void* partials, void* w1_0, void* w2_0, void* bufs,
                    int nbufs, bool need_gamma) {
  switch (dt) {
    case DType::Float32:
      backward_tiles_t<float, float>(dt, s, pl, pk, static_cast<const float*>(x),
                                     static_cast<const float*>(gy), static_cast<float*>(d),
                                     static_cast<float*>(partials), static_cast<float*>(w1_0),
                                     static_cast<float*>(w2_0), static_cast<float*>(bufs), nbufs,
                                     need_gamma);
      break;
    case DType::Float64:
      backward_tiles_t<double, double>(dt, s, pl, pk, static_cast<const double*>(x),
                                       static_cast<const double*>(gy), static_cast<double*>(d),
                                       static_cast<double*>(partials), static_cast<double*>(w1_0),
                                       static_cast<double*>(w2_0), static_cast<double*>(bufs),
                                       nbufs, need_gamma);
      break;
    case DType::BFloat16:
      backward_tiles_t<bfloat16, float>(dt, s, pl, pk, static_cast<const bfloat16*>(x),
                                        static_cast<const bfloat16*>(gy),
                                        static_cast<bfloat16*>(d), static_cast<float*>(partials),
                                        static_cast<float*>(w1_0), static_cast<float*>(w2_0),
                                        static_cast<float*>(bufs), nbufs, need_gamma);
      break;
    default: break;
  }
}

#define FV_CNB_DISPATCH(CALL_F32, CALL_F64, CALL_BF16) \
  switch (dt) {                                       \
    case DType::Float32: CALL_F32; break;             \
    case DType::Float64: CALL_F64; break;             \
    case DType::BFloat16: CALL_BF16; break;           \
    default: break;                                   \
  }

void se_stats(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const void* x,
              void* rowsum, void* bufs, int nbufs) {
  FV_CNB_DISPATCH(
      (se_stats_t<float, float>(dt, s, pl, pk, static_cast<const float*>(x),
                                static_cast<float*>(rowsum), static_cast<float*>(bufs), nbufs)),
      (se_stats_t<double, double>(dt, s, pl, pk, static_cast<const double*>(x),
                                  static_cast<double*>(rowsum), static_cast<double*>(bufs),
                                  nbufs)),
      (se_stats_t<bfloat16, float>(dt, s, pl, pk, static_cast<const bfloat16*>(x),
                                   static_cast<float*>(rowsum), static_cast<float*>(bufs),
                                   nbufs)))
}

void grn_forward_stats(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const void* x,
                       void* rowsq, void* bufs, int nbufs) {
  FV_CNB_DISPATCH(
      (grn_forward_stats_t<float, float>(dt, s, pl, pk, static_cast<const float*>(x),
                                         static_cast<float*>(rowsq), static_cast<float*>(bufs),
                                         nbufs)),
      (grn_forward_stats_t<double, double>(dt, s, pl, pk, static_cast<const double*>(x),
                                           static_cast<double*>(rowsq),
                                           static_cast<double*>(bufs), nbufs)),
      (grn_forward_stats_t<bfloat16, float>(dt, s, pl, pk, static_cast<const bfloat16*>(x),
                                            static_cast<float*>(rowsq),
                                            static_cast<float*>(bufs), nbufs)))
}

void grn_backward_stats(DType dt, const Shape& s, const Plan& pl, const Packed& pk,
                        const void* x, const void* gy, void* rowt, void* rowdb, void* bufs,
                        int nbufs) {
  FV_CNB_DISPATCH(
      (grn_backward_stats_t<float, float>(dt, s, pl, pk, static_cast<const float*>(x),
                                          static_cast<const float*>(gy),
                                          static_cast<float*>(rowt), static_cast<float*>(rowdb),
                                          static_cast<float*>(bufs), nbufs)),
      (grn_backward_stats_t<double, double>(dt, s, pl, pk, static_cast<const double*>(x),
                                            static_cast<const double*>(gy),
                                            static_cast<double*>(rowt),
                                            static_cast<double*>(rowdb),
                                            static_cast<double*>(bufs), nbufs)),
      (grn_backward_stats_t<bfloat16, float>(dt, s, pl, pk, static_cast<const bfloat16*>(x),
                                             static_cast<const bfloat16*>(gy),
                                             static_cast<float*>(rowt),
                                             static_cast<float*>(rowdb),
                                             static_cast<float*>(bufs), nbufs)))
}
#undef FV_CNB_DISPATCH

}  // namespace FV_ISA
}  // namespace cnblock
}  // namespace fastvis
