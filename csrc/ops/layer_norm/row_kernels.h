// Internal: the per-pixel LayerNorm kernels, as inline templates. Include only from a
// file compiled per instruction set (FV_ISA defined, see CMakeLists.txt): everything
// here lives in fastvis::layernorm::FV_ISA, so each ISA's copy has its own symbols.
//
// Two layouts of a contiguous row of `npix` pixels:
// * NHWC (pixel stride C, channel stride 1): SIMD over channels. Per pixel: the sum,
//   then the sum of squared deviations (two passes over the pixel's C values, which sit
//   in L1), then the output. Channel tails run scalar code.
// * NCHW (pixel stride 1, channel stride cs): SIMD over pixels, in blocks of a few
//   vectors of consecutive pixels. The forward pass copies the block's C x block inputs
//   into a contiguous buffer (widened to A) while summing, so the variance and output
//   passes do not re-read C rows that are cs elements apart (with cs a power of two
//   those rows share a few cache sets). Pixel tails use zero-filled partial vectors.
//
// Determinism: every sum has a fixed order given npix, C and the row's start; nothing
// depends on threads.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/dtype_convert.h"
#include "core/simd.h"
#include "fastvis/tensor.h"

#ifndef FV_ISA
#error "row_kernels.h belongs to per-ISA kernel files (FV_ISA undefined)"
#endif

namespace fastvis {
namespace layernorm {
namespace FV_ISA {

using namespace ::fastvis::simd::FV_ISA;

// Sum of the lanes, pairwise in a fixed order.
template <class A> inline A hsum(typename VT<A>::V v) {
  constexpr int L = VT<A>::L;
  A t[L];
  std::memcpy(t, &v, sizeof t);
  for (int w = L / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

template <class A> inline typename VT<A>::V splat(A a) {
  return typename VT<A>::V{} + a;
}

template <class A> inline A rsqrt_eps(A var, A eps) { return A(1) / std::sqrt(var + eps); }

// ------------------------------------------------------------------ forward

// y = (x - mean) * rstd * w + b for npix NHWC pixels. mean / rstd (npix) may be null.
template <class T, class A>
inline void fwd_nhwc(int64_t npix, int64_t C, const T* x, const A* w, const A* b, A eps, T* y,
                     A* mean, A* rstd) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  for (int64_t p = 0; p < npix; ++p) {
    const T* xp = x + p * C;
    T* yp = y + p * C;
    V s0{}, s1{};
    int64_t c = 0;
    for (; c + 2 * L <= C; c += 2 * L) {
      s0 += vload<T, A>(xp + c);
      s1 += vload<T, A>(xp + c + L);
    }
    if (c + L <= C) {
      s0 += vload<T, A>(xp + c);
      c += L;
    }
    A s = hsum<A>(s0 + s1);
    for (; c < C; ++c) s += sload<T, A>(xp + c);
    const A mu = s / A(C);
    const V muv = splat<A>(mu);
    V q0{}, q1{};
    c = 0;
    for (; c + 2 * L <= C; c += 2 * L) {
      const V d0 = vload<T, A>(xp + c) - muv, d1 = vload<T, A>(xp + c + L) - muv;
      q0 += d0 * d0;
      q1 += d1 * d1;
    }
    if (c + L <= C) {
      const V d0 = vload<T, A>(xp + c) - muv;
      q0 += d0 * d0;
      c += L;
    }
    A q = hsum<A>(q0 + q1);
    for (; c < C; ++c) {
      const A d = sload<T, A>(xp + c) - mu;
      q += d * d;
    }
    const A r = rsqrt_eps<A>(q / A(C), eps);
    if (mean) mean[p] = mu;
    if (rstd) rstd[p] = r;
    const V rv = splat<A>(r);
    c = 0;
    for (; c + L <= C; c += L)
      vstore<T, A>(yp + c, (vload<T, A>(xp + c) - muv) * rv * vload<A, A>(w + c) +
                               vload<A, A>(b + c));
    for (; c < C; ++c) sstore<T, A>(yp + c, (sload<T, A>(xp + c) - mu) * r * w[c] + b[c]);
  }
}

// The same for npix NCHW pixels of one image (channel stride cs). buf: C *
// nchw_fwd_block accumulators (see cpu_kernels.h).
template <class T, class A>
inline void fwd_nchw(int64_t npix, int64_t C, int64_t cs, const T* x, const A* w, const A* b,
                     A eps, T* y, A* mean, A* rstd, A* buf) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L, NV = 4, PB = NV * L;
  for (int64_t p0 = 0; p0 < npix; p0 += PB) {
    const int64_t np = std::min<int64_t>(PB, npix - p0);
    int64_t nk[NV];
    for (int k = 0; k < NV; ++k) nk[k] = std::max<int64_t>(0, std::min<int64_t>(L, np - k * L));
    V s[NV] = {};
    for (int64_t c = 0; c < C; ++c) {
      const T* xc = x + c * cs + p0;
      A* bc = buf + c * PB;
      if (np == PB) {
        for (int k = 0; k < NV; ++k) {
          const V v = vload<T, A>(xc + k * L);
          vstore<A, A>(bc + k * L, v);
          s[k] += v;
        }
      } else {
        for (int k = 0; k < NV; ++k) {
          const V v = nk[k] > 0 ? vload_n<T, A>(xc + k * L, nk[k]) : V{};
          vstore<A, A>(bc + k * L, v);
          s[k] += v;
        }
      }
    }
    V mu[NV], q[NV] = {};
    for (int k = 0; k < NV; ++k) mu[k] = s[k] / A(C);
    for (int64_t c = 0; c < C; ++c) {
      const A* bc = buf + c * PB;
      for (int k = 0; k < NV; ++k) {
        const V d = vload<A, A>(bc + k * L) - mu[k];
        q[k] += d * d;
      }
    }
    V r[NV];
    for (int k = 0; k < NV; ++k)
      for (int i = 0; i < L; ++i) r[k][i] = rsqrt_eps<A>(q[k][i] / A(C), eps);
    for (int k = 0; k < NV; ++k) {
      if (nk[k] == 0) continue;
      if (mean) vstore_n<A, A>(mean + p0 + k * L, mu[k], nk[k]);
      if (rstd) vstore_n<A, A>(rstd + p0 + k * L, r[k], nk[k]);
    }
    for (int64_t c = 0; c < C; ++c) {
      const A* bc = buf + c * PB;
      T* yc = y + c * cs + p0;
      const V wv = splat<A>(w[c]), bv = splat<A>(b[c]);
      for (int k = 0; k < NV; ++k) {
        if (nk[k] == 0) break;
        const V v = (vload<A, A>(bc + k * L) - mu[k]) * r[k] * wv + bv;
        if (nk[k] == L)
          vstore<T, A>(yc + k * L, v);
        else
          vstore_n<T, A>(yc + k * L, v, nk[k]);
      }
    }
  }
}

// ------------------------------------------------------------------ backward
//
// With x_hat = (x - mean) * rstd and g = grad_y * w:
//   grad_x = rstd * (g - mean_c(g) - x_hat * mean_c(g * x_hat)),
//   grad_w = sum over pixels of grad_y * x_hat,   grad_b = sum over pixels of grad_y.

// npix NHWC pixels. gx may be null. pw / pb (C each, may be null together): the
// weight / bias gradient sums of these pixels are added to them, pixel by pixel.
template <class T, class A>
inline void bwd_nhwc(int64_t npix, int64_t C, const T* gy, const T* x, const A* w,
                     const A* mean, const A* rstd, T* gx, A* pw, A* pb) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  for (int64_t p = 0; p < npix; ++p) {
    const T* xp = x + p * C;
    const T* gp = gy + p * C;
    const A mu = mean[p], r = rstd[p];
    const V muv = splat<A>(mu), rv = splat<A>(r);
    V sg{}, sgx{};
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V xh = (vload<T, A>(xp + c) - muv) * rv;
      const V gv = vload<T, A>(gp + c);
      const V g = gv * vload<A, A>(w + c);
      sg += g;
      sgx += g * xh;
      if (pw) {
        vstore<A, A>(pw + c, vload<A, A>(pw + c) + gv * xh);
        vstore<A, A>(pb + c, vload<A, A>(pb + c) + gv);
      }
    }
    A sgs = hsum<A>(sg), sgxs = hsum<A>(sgx);
    for (; c < C; ++c) {
      const A xh = (sload<T, A>(xp + c) - mu) * r;
      const A gv = sload<T, A>(gp + c);
      const A g = gv * w[c];
      sgs += g;
      sgxs += g * xh;
      if (pw) {
        pw[c] += gv * xh;
        pb[c] += gv;
      }
    }
    if (!gx) continue;
    T* op = gx + p * C;
    const A a = sgs / A(C), bq = sgxs / A(C);
    const V av = splat<A>(a), bv = splat<A>(bq);
    c = 0;
    for (; c + L <= C; c += L) {
      const V xh = (vload<T, A>(xp + c) - muv) * rv;
      const V g = vload<T, A>(gp + c) * vload<A, A>(w + c);
      vstore<T, A>(op + c, (g - av - xh * bv) * rv);
    }
    for (; c < C; ++c) {
      const A xh = (sload<T, A>(xp + c) - mu) * r;
      const A g = sload<T, A>(gp + c) * w[c];
      sstore<T, A>(op + c, (g - a - xh * bq) * r);
    }
  }
}

// npix NCHW pixels of one image (channel stride cs). gx may be null. lw / lb (C * L
// each, may be null together): per-channel lane sums of the weight / bias gradients,
// added to. buf: 2 * C * nchw_bwd_block accumulators (x_hat and g of a block).
template <class T, class A>
inline void bwd_nchw(int64_t npix, int64_t C, int64_t cs, const T* gy, const T* x, const A* w,
                     const A* mean, const A* rstd, T* gx, A* lw, A* lb, A* buf) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L, NV = 2, PB = NV * L;
  A* xhb = buf;
  A* gb = buf + C * PB;
  for (int64_t p0 = 0; p0 < npix; p0 += PB) {
    const int64_t np = std::min<int64_t>(PB, npix - p0);
    int64_t nk[NV];
    for (int k = 0; k < NV; ++k) nk[k] = std::max<int64_t>(0, std::min<int64_t>(L, np - k * L));
    V mu[NV], r[NV], sg[NV] = {}, sgx[NV] = {};
    for (int k = 0; k < NV; ++k) {
      mu[k] = nk[k] > 0 ? vload_n<A, A>(mean + p0 + k * L, nk[k]) : V{};
      r[k] = nk[k] > 0 ? vload_n<A, A>(rstd + p0 + k * L, nk[k]) : V{};
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* xc = x + c * cs + p0;
      const T* gc = gy + c * cs + p0;
      const V wv = splat<A>(w[c]);
      V aw{}, ab{};
      for (int k = 0; k < NV; ++k) {
        V xv, gv;
        if (nk[k] == L) {
          xv = vload<T, A>(xc + k * L);
          gv = vload<T, A>(gc + k * L);
        } else if (nk[k] > 0) {
          xv = vload_n<T, A>(xc + k * L, nk[k]);
          gv = vload_n<T, A>(gc + k * L, nk[k]);
        } else {
          xv = V{};
          gv = V{};
        }
        const V xh = (xv - mu[k]) * r[k];  // zero in unused lanes (r = 0 there)
        const V g = gv * wv;
        sg[k] += g;
        sgx[k] += g * xh;
        aw += gv * xh;
        ab += gv;
        if (gx) {
          vstore<A, A>(xhb + c * PB + k * L, xh);
          vstore<A, A>(gb + c * PB + k * L, g);
        }
      }
      if (lw) {
        vstore<A, A>(lw + c * L, vload<A, A>(lw + c * L) + aw);
        vstore<A, A>(lb + c * L, vload<A, A>(lb + c * L) + ab);
      }
    }
    if (!gx) continue;
    V a[NV], bq[NV];
    for (int k = 0; k < NV; ++k) {
      a[k] = sg[k] / A(C);
      bq[k] = sgx[k] / A(C);
    }
    for (int64_t c = 0; c < C; ++c) {
      T* oc = gx + c * cs + p0;
      for (int k = 0; k < NV; ++k) {
        if (nk[k] == 0) break;
        const V v = (vload<A, A>(gb + c * PB + k * L) - a[k] -
                     vload<A, A>(xhb + c * PB + k * L) * bq[k]) *
                    r[k];
        if (nk[k] == L)
          vstore<T, A>(oc + k * L, v);
        else
          vstore_n<T, A>(oc + k * L, v, nk[k]);
      }
    }
  }
}

}  // namespace FV_ISA
}  // namespace layernorm
}  // namespace fastvis
