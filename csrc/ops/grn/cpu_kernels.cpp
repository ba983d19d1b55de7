// CPU fast paths of global_response_norm: the two passes over the activations (see
// cpu_kernels.h). Compiled once per instruction set (see CMakeLists.txt): FV_ISA names
// the namespace and the flags differ.
//
// * NHWC: SIMD over channels. Pass 1 accumulates a chunk's pixels into its C partial
//   sums, four pixels per load/store of the sums (the additions stay in pixel order, so
//   the grouping does not change the result); pass 2 is a per-pixel multiply-add with
//   the image's row of coefficients.
// * NCHW: SIMD over pixels. Pass 1 sums each channel's run of the chunk's pixels with
//   four vector accumulators combined in a fixed order; pass 2 broadcasts the (n, c)
//   coefficients over blocks of a channel plane.
// Channel and pixel tails run scalar code.
#include <algorithm>
#include <cstring>

#include "core/dtype_convert.h"
#include "core/gelu.h"
#include "core/simd.h"
#include "fastvis/threading.h"
#include "ops/grn/cpu_kernels.h"

namespace fastvis {
namespace grn {
namespace FV_ISA {
namespace {

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

template <class A> inline typename VT<A>::V splat(A a) { return typename VT<A>::V{} + a; }

// The activation in front of the normalization (ACT: kActNone, kActGelu, kActGeluTanh of
// cpu_kernels.h). act_v / act_s give act(x); act_both_* also act'(x). float vectors run
// core/gelu.h's SIMD GELU, doubles the C library's erfc / tanh lane by lane.
template <int ACT> inline VT<float>::V act_v(VT<float>::V x) {
  if constexpr (ACT == kActNone) return x;
  else return vgelu(x, ACT == kActGeluTanh);
}
template <int ACT> inline VT<double>::V act_v(VT<double>::V x) {
  if constexpr (ACT != kActNone)
    for (int i = 0; i < VT<double>::L; ++i) x[i] = sgelu(x[i], ACT == kActGeluTanh);
  return x;
}
template <int ACT, class A> inline A act_s(A x) {
  if constexpr (ACT == kActNone) return x;
  else return static_cast<A>(sgelu(x, ACT == kActGeluTanh));
}
template <int ACT> inline void act_both_v(VT<float>::V x, VT<float>::V& g, VT<float>::V& d) {
  vgelu_both(x, ACT == kActGeluTanh, g, d);
}
template <int ACT> inline void act_both_v(VT<double>::V x, VT<double>::V& g, VT<double>::V& d) {
  for (int i = 0; i < VT<double>::L; ++i) {
    g[i] = sgelu(x[i], ACT == kActGeluTanh);
    d[i] = sgelu_grad(x[i], ACT == kActGeluTanh);
  }
}
template <int ACT, class A> inline void act_both_s(A x, A& g, A& d) {
  g = static_cast<A>(sgelu(x, ACT == kActGeluTanh));
  d = static_cast<A>(sgelu_grad(x, ACT == kActGeluTanh));
}

// Pixels per pass-2 work item of an NCHW plane.
constexpr int64_t kPlaneBlock = 4096;

// ------------------------------------------------------------------ pass 1, NHWC

// acc[c] = sum over the np pixels (stride C) of act(x[c])^2; with out, also
// out[c] = act(x[c]) * os[c] + ot[c] for every pixel.
template <class T, class A, int ACT>
void sumsq_nhwc(int64_t np, int64_t C, const T* x, A* acc, T* out, const A* os, const A* ot) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  std::fill(acc, acc + C, A(0));
  int64_t p = 0;
  for (; p + 4 <= np; p += 4) {
    const T* x0 = x + p * C;
    const T *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V v0 = act_v<ACT>(vload<T, A>(x0 + c)), v1 = act_v<ACT>(vload<T, A>(x1 + c));
      const V v2 = act_v<ACT>(vload<T, A>(x2 + c)), v3 = act_v<ACT>(vload<T, A>(x3 + c));
      if (out) {
        const V s = vload<A, A>(os + c), t = vload<A, A>(ot + c);
        T* o = out + p * C + c;
        vstore<T, A>(o, v0 * s + t);
        vstore<T, A>(o + C, v1 * s + t);
        vstore<T, A>(o + 2 * C, v2 * s + t);
        vstore<T, A>(o + 3 * C, v3 * s + t);
      }
      V a = vload<A, A>(acc + c);
      a += v0 * v0;
      a += v1 * v1;
      a += v2 * v2;
      a += v3 * v3;
      vstore<A, A>(acc + c, a);
    }
    for (; c < C; ++c) {
      const A v0 = act_s<ACT, A>(sload<T, A>(x0 + c)), v1 = act_s<ACT, A>(sload<T, A>(x1 + c));
      const A v2 = act_s<ACT, A>(sload<T, A>(x2 + c)), v3 = act_s<ACT, A>(sload<T, A>(x3 + c));
      if (out) {
        T* o = out + p * C + c;
        sstore<T, A>(o, v0 * os[c] + ot[c]);
        sstore<T, A>(o + C, v1 * os[c] + ot[c]);
        sstore<T, A>(o + 2 * C, v2 * os[c] + ot[c]);
        sstore<T, A>(o + 3 * C, v3 * os[c] + ot[c]);
      }
      A a = acc[c];
      a += v0 * v0;
      a += v1 * v1;
      a += v2 * v2;
      a += v3 * v3;
      acc[c] = a;
    }
  }
  for (; p < np; ++p) {
    const T* xp = x + p * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V v = act_v<ACT>(vload<T, A>(xp + c));
      if (out) vstore<T, A>(out + p * C + c, v * vload<A, A>(os + c) + vload<A, A>(ot + c));
      vstore<A, A>(acc + c, vload<A, A>(acc + c) + v * v);
    }
    for (; c < C; ++c) {
      const A v = act_s<ACT, A>(sload<T, A>(xp + c));
      if (out) sstore<T, A>(out + p * C + c, v * os[c] + ot[c]);
      acc[c] += v * v;
    }
  }
}

// dot[c] = sum of gy[c] * act(x[c]), sum[c] = sum of gy[c] over the np pixels (stride C);
// with out, also out[c] = act(x[c]) * os[c] + ot[c] for every pixel.
template <class T, class A, int ACT>
void sumgrad_nhwc(int64_t np, int64_t C, const T* gy, const T* x, A* dot, A* sum, T* out,
                  const A* os, const A* ot) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  std::fill(dot, dot + C, A(0));
  std::fill(sum, sum + C, A(0));
  int64_t p = 0;
  for (; p + 2 <= np; p += 2) {
    const T *g0 = gy + p * C, *g1 = g0 + C;
    const T *x0 = x + p * C, *x1 = x0 + C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V a0 = vload<T, A>(g0 + c), a1 = vload<T, A>(g1 + c);
      const V v0 = act_v<ACT>(vload<T, A>(x0 + c)), v1 = act_v<ACT>(vload<T, A>(x1 + c));
      if (out) {
        const V sc = vload<A, A>(os + c), t = vload<A, A>(ot + c);
        vstore<T, A>(out + p * C + c, v0 * sc + t);
        vstore<T, A>(out + (p + 1) * C + c, v1 * sc + t);
      }
      V d = vload<A, A>(dot + c), s = vload<A, A>(sum + c);
      d += a0 * v0;
      s += a0;
      d += a1 * v1;
      s += a1;
      vstore<A, A>(dot + c, d);
      vstore<A, A>(sum + c, s);
    }
    for (; c < C; ++c) {
      const A a0 = sload<T, A>(g0 + c), a1 = sload<T, A>(g1 + c);
      const A v0 = act_s<ACT, A>(sload<T, A>(x0 + c)), v1 = act_s<ACT, A>(sload<T, A>(x1 + c));
      if (out) {
        sstore<T, A>(out + p * C + c, v0 * os[c] + ot[c]);
        sstore<T, A>(out + (p + 1) * C + c, v1 * os[c] + ot[c]);
      }
      A d = dot[c], s = sum[c];
      d += a0 * v0;
      s += a0;
      d += a1 * v1;
      s += a1;
      dot[c] = d;
      sum[c] = s;
    }
  }
  for (; p < np; ++p) {
    const T *gp = gy + p * C, *xp = x + p * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V a = vload<T, A>(gp + c);
      const V v = act_v<ACT>(vload<T, A>(xp + c));
      if (out) vstore<T, A>(out + p * C + c, v * vload<A, A>(os + c) + vload<A, A>(ot + c));
      vstore<A, A>(dot + c, vload<A, A>(dot + c) + a * v);
      vstore<A, A>(sum + c, vload<A, A>(sum + c) + a);
    }
    for (; c < C; ++c) {
      const A a = sload<T, A>(gp + c);
      const A v = act_s<ACT, A>(sload<T, A>(xp + c));
      if (out) sstore<T, A>(out + p * C + c, v * os[c] + ot[c]);
      dot[c] += a * v;
      sum[c] += a;
    }
  }
}

// ------------------------------------------------------------------ pass 1, NCHW

// Sum of act(x[i])^2 over a contiguous run of len values; with out, also
// out[i] = act(x[i]) * os + ot.
template <class T, class A, int ACT>
A sumsq_run(int64_t len, const T* x, T* out, A os, A ot) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  V a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 4 * L <= len; i += 4 * L) {
    const V v0 = act_v<ACT>(vload<T, A>(x + i)), v1 = act_v<ACT>(vload<T, A>(x + i + L));
    const V v2 = act_v<ACT>(vload<T, A>(x + i + 2 * L)), v3 = act_v<ACT>(vload<T, A>(x + i + 3 * L));
    if (out) {
      const V sv = splat<A>(os), tv = splat<A>(ot);
      vstore<T, A>(out + i, v0 * sv + tv);
      vstore<T, A>(out + i + L, v1 * sv + tv);
      vstore<T, A>(out + i + 2 * L, v2 * sv + tv);
      vstore<T, A>(out + i + 3 * L, v3 * sv + tv);
    }
    a0 += v0 * v0;
    a1 += v1 * v1;
    a2 += v2 * v2;
    a3 += v3 * v3;
  }
  for (; i + L <= len; i += L) {
    const V v = act_v<ACT>(vload<T, A>(x + i));
    if (out) vstore<T, A>(out + i, v * splat<A>(os) + splat<A>(ot));
    a0 += v * v;
  }
  A s = hsum<A>((a0 + a1) + (a2 + a3));
  for (; i < len; ++i) {
    const A v = act_s<ACT, A>(sload<T, A>(x + i));
    if (out) sstore<T, A>(out + i, v * os + ot);
    s += v * v;
  }
  return s;
}

// dot = sum of gy[i] * act(x[i]), sum = sum of gy[i] over a contiguous run of len values;
// with out, also out[i] = act(x[i]) * os + ot.
template <class T, class A, int ACT>
void sumgrad_run(int64_t len, const T* gy, const T* x, A& dot, A& sum, T* out, A os, A ot) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  V d0{}, d1{}, s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    const V g0 = vload<T, A>(gy + i), g1 = vload<T, A>(gy + i + L);
    const V v0 = act_v<ACT>(vload<T, A>(x + i)), v1 = act_v<ACT>(vload<T, A>(x + i + L));
    if (out) {
      vstore<T, A>(out + i, v0 * splat<A>(os) + splat<A>(ot));
      vstore<T, A>(out + i + L, v1 * splat<A>(os) + splat<A>(ot));
    }
    d0 += g0 * v0;
    d1 += g1 * v1;
    s0 += g0;
    s1 += g1;
  }
  for (; i + L <= len; i += L) {
    const V g0 = vload<T, A>(gy + i);
    const V v = act_v<ACT>(vload<T, A>(x + i));
    if (out) vstore<T, A>(out + i, v * splat<A>(os) + splat<A>(ot));
    d0 += g0 * v;
    s0 += g0;
  }
  A d = hsum<A>(d0 + d1), s = hsum<A>(s0 + s1);
  for (; i < len; ++i) {
    const A g = sload<T, A>(gy + i);
    const A v = act_s<ACT, A>(sload<T, A>(x + i));
    if (out) sstore<T, A>(out + i, v * os + ot);
    d += g * v;
    s += g;
  }
  dot = d;
  sum = s;
}

// ------------------------------------------------------------------ pass 2

// Pass 2, elementwise, with g = act(x) and g' = act'(x):
//   forward  (b null): out = act(a) * s + t                     (a = x)
//   backward (b = x):  out = (a * s + act(b) * t) * act'(b)     (a = grad_y)
// Without an activation these are a * s + t and a * s + b * t.
template <class A, int ACT, bool BWD> struct Affine {
  using V = typename VT<A>::V;
  static V v(V a, V b, V s, V t) {
    if constexpr (!BWD) {
      return act_v<ACT>(a) * s + t;
    } else if constexpr (ACT == kActNone) {
      return a * s + b * t;
    } else {
      V g, d;
      act_both_v<ACT>(b, g, d);
      return (a * s + g * t) * d;
    }
  }
  static A sc(A a, A b, A s, A t) {
    if constexpr (!BWD) {
      return act_s<ACT, A>(a) * s + t;
    } else if constexpr (ACT == kActNone) {
      return a * s + b * t;
    } else {
      A g, d;
      act_both_s<ACT, A>(b, g, d);
      return (a * s + g * t) * d;
    }
  }
};

// Over a contiguous run (NCHW plane block) with one (s, t) pair.
template <class T, class A, int ACT, bool BWD>
void affine_run(int64_t len, const T* a, const T* b, A s, A t, T* out) {
  using V = typename VT<A>::V;
  using F = Affine<A, ACT, BWD>;
  constexpr int L = VT<A>::L;
  const V sv = splat<A>(s), tv = splat<A>(t);
  int64_t i = 0;
  for (; i + L <= len; i += L)
    vstore<T, A>(out + i, F::v(vload<T, A>(a + i), BWD ? vload<T, A>(b + i) : V{}, sv, tv));
  for (; i < len; ++i)
    sstore<T, A>(out + i, F::sc(sload<T, A>(a + i), BWD ? sload<T, A>(b + i) : A(0), s, t));
}

// Over one NHWC pixel's C channels with per-channel s[c], t[c].
template <class T, class A, int ACT, bool BWD>
void affine_pixel(int64_t C, const T* a, const T* b, const A* s, const A* t, T* out) {
  using V = typename VT<A>::V;
  using F = Affine<A, ACT, BWD>;
  constexpr int L = VT<A>::L;
  int64_t c = 0;
  for (; c + L <= C; c += L)
    vstore<T, A>(out + c, F::v(vload<T, A>(a + c), BWD ? vload<T, A>(b + c) : V{},
                               vload<A, A>(s + c), vload<A, A>(t + c)));
  for (; c < C; ++c)
    sstore<T, A>(out + c, F::sc(sload<T, A>(a + c), BWD ? sload<T, A>(b + c) : A(0), s[c], t[c]));
}

// Pass 2 over the whole tensor: s1 is per (n, c); s2 is per (n, c) in the backward pass
// and per channel (the bias) in the forward pass.
template <class T, class A, int ACT, bool BWD>
void affine(const Geom& g, const T* a, const T* b, const A* s1, const A* s2, T* out) {
  const int64_t C = g.c, HW = g.hw;
  // GELU costs ~20 flops a value: smaller work items still pay for their scheduling.
  const int64_t work = ACT == kActNone ? 16384 : 4096;
  if (g.nhwc) {
    const int64_t grain = std::max<int64_t>(16, work / C);
    parallel_for(g.n * HW, grain, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / HW;
        const A* t = BWD ? s2 + n * C : s2;
        affine_pixel<T, A, ACT, BWD>(C, a + q * C, BWD ? b + q * C : nullptr, s1 + n * C, t,
                                     out + q * C);
      }
    });
    return;
  }
  const int64_t nb = (HW + kPlaneBlock - 1) / kPlaneBlock;
  const int64_t grain = std::max<int64_t>(1, work / std::min(HW, kPlaneBlock));
  parallel_for(g.n * C * nb, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t plane = it / nb, p0 = (it % nb) * kPlaneBlock;
      const int64_t len = std::min(kPlaneBlock, HW - p0);
      const int64_t off = plane * HW + p0;
      const A t = BWD ? s2[plane] : s2[plane % C];
      affine_run<T, A, ACT, BWD>(len, a + off, BWD ? b + off : nullptr, s1[plane], t,
                                 out + off);
    }
  });
}

// ------------------------------------------------------------------ drivers

// out (optional): out = act(x) * os[n*C + c] + ot[c] for every element, written in the
// same pass (os per image and channel, ot per channel).
template <class T, class A, int ACT>
void sum_squares_t(const Geom& g, int64_t chunks, const T* x, A* partial, T* out, const A* os,
                   const A* ot) {
  const int64_t C = g.c, HW = g.hw;
  parallel_for(g.n * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = it / chunks, r = it % chunks;
      const int64_t p0 = r * HW / chunks, p1 = (r + 1) * HW / chunks;
      A* acc = partial + it * C;
      if (g.nhwc) {
        const int64_t off = (n * HW + p0) * C;
        sumsq_nhwc<T, A, ACT>(p1 - p0, C, x + off, acc, out ? out + off : nullptr,
                              out ? os + n * C : nullptr, ot);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = (n * C + c) * HW + p0;
          acc[c] = sumsq_run<T, A, ACT>(p1 - p0, x + off, out ? out + off : nullptr,
                                        out ? os[n * C + c] : A(0), out ? ot[c] : A(0));
        }
      }
    }
  });
}

template <class T, class A, int ACT>
void sum_grads_t(const Geom& g, int64_t chunks, const T* gy, const T* x, A* partial, T* out,
                 const A* os, const A* ot) {
  const int64_t C = g.c, HW = g.hw;
  parallel_for(g.n * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = it / chunks, r = it % chunks;
      const int64_t p0 = r * HW / chunks, p1 = (r + 1) * HW / chunks;
      A* dot = partial + it * 2 * C;
      A* sum = dot + C;
      if (g.nhwc) {
        const int64_t off = (n * HW + p0) * C;
        sumgrad_nhwc<T, A, ACT>(p1 - p0, C, gy + off, x + off, dot, sum,
                                out ? out + off : nullptr, out ? os + n * C : nullptr, ot);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = (n * C + c) * HW + p0;
          sumgrad_run<T, A, ACT>(p1 - p0, gy + off, x + off, dot[c], sum[c],
                                 out ? out + off : nullptr, out ? os[n * C + c] : A(0),
                                 out ? ot[c] : A(0));
        }
      }
    }
  });
}

}  // namespace

#define FV_GRN_DTYPE(dt, CALL)                     \
  switch (dt) {                                    \
    case DType::Float32: {                         \
      using T = float;                             \
      using A = float;                             \
      CALL;                                        \
      break;                                       \
    }                                              \
    case DType::Float64: {                         \
      using T = double;                            \
      using A = double;                            \
      CALL;                                        \
      break;                                       \
    }                                              \
    case DType::BFloat16: {                        \
      using T = bfloat16;                          \
      using A = float;                             \
      CALL;                                        \
      break;                                       \
    }                                              \
    default: break;                                \
  }

// dtype x activation: T, A and ACT for CALL.
#define FV_GRN_DISPATCH(dt, act, CALL)                       \
  switch (act) {                                             \
    case kActGelu: {                                         \
      constexpr int ACT = kActGelu;                          \
      FV_GRN_DTYPE(dt, CALL)                                 \
      break;                                                 \
    }                                                        \
    case kActGeluTanh: {                                     \
      constexpr int ACT = kActGeluTanh;                      \
      FV_GRN_DTYPE(dt, CALL)                                 \
      break;                                                 \
    }                                                        \
    default: {                                               \
      constexpr int ACT = kActNone;                          \
      FV_GRN_DTYPE(dt, CALL)                                 \
      break;                                                 \
    }                                                        \
  }

void sum_squares(DType dt, const Geom& g, int act, int64_t chunks, const void* x,
                 void* partial, void* out, const void* os, const void* ot) {
  FV_GRN_DISPATCH(dt, act, (sum_squares_t<T, A, ACT>(g, chunks, static_cast<const T*>(x),
                                                     static_cast<A*>(partial),
                                                     static_cast<T*>(out),
                                                     static_cast<const A*>(os),
                                                     static_cast<const A*>(ot))))
}

void apply(DType dt, const Geom& g, int act, const void* x, const void* scale,
           const void* shift, void* y) {
  FV_GRN_DISPATCH(dt, act, (affine<T, A, ACT, false>(g, static_cast<const T*>(x), nullptr,
                                                     static_cast<const A*>(scale),
                                                     static_cast<const A*>(shift),
                                                     static_cast<T*>(y))))
}

void sum_grads(DType dt, const Geom& g, int act, int64_t chunks, const void* gy,
               const void* x, void* partial, void* out, const void* os, const void* ot) {
  FV_GRN_DISPATCH(dt, act, (sum_grads_t<T, A, ACT>(g, chunks, static_cast<const T*>(gy),
                                                   static_cast<const T*>(x),
                                                   static_cast<A*>(partial),
                                                   static_cast<T*>(out),
                                                   static_cast<const A*>(os),
                                                   static_cast<const A*>(ot))))
}

void grad_input(DType dt, const Geom& g, int act, const void* gy, const void* x,
                const void* scale, const void* coef, void* gx) {
  FV_GRN_DISPATCH(dt, act, (affine<T, A, ACT, true>(g, static_cast<const T*>(gy),
                                                    static_cast<const T*>(x),
                                                    static_cast<const A*>(scale),
                                                    static_cast<const A*>(coef),
                                                    static_cast<T*>(gx))))
}

#undef FV_GRN_DTYPE
#undef FV_GRN_DISPATCH

}  // namespace FV_ISA
}  // namespace grn
}  // namespace fastvis
