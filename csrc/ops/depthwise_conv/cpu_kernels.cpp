// CPU fast paths of depthwise convolution, NHWC. Compiled once per instruction
// set (see CMakeLists.txt): FV_ISA names the namespace and the flags differ.
//
// SIMD runs over channels (core/simd.h: 64-byte vectors when built for AVX-512, else
// 32-byte ones, one AVX register when built for AVX2, two SSE/NEON registers on the
// baseline build). A channel block (CB) is two vectors, as channel_block() in the plan.
// Forward and backward-input keep a block of output pixels x channel vectors in
// registers; weight-gradient keeps a block of kernel taps x channel vectors in
// registers while sweeping an output row.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/dtype_convert.h"
#include "core/simd.h"
#include "fastvis/threading.h"
#include "ops/depthwise_conv/cpu_kernels.h"

#ifndef FV_ISA
#error "FV_ISA must name the instruction-set namespace"
#endif

namespace fastvis {
namespace dwconv {
namespace FV_ISA {
namespace {

using namespace ::fastvis::simd::FV_ISA;

// A cache-line prefetch the optimiser keeps (GCC dropped __builtin_prefetch from the
// direct forward path at -O1 and above).
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// The same for a line about to be written: prefetchw (fetched in exclusive state) where
// the instruction set has it (every AVX-512 CPU does), else a plain prefetch.
inline void prefetch_line_w(const char* p) {
#if defined(__AVX512F__)
  asm volatile("prefetchw %0" : : "m"(*p));
#else
  prefetch_line(p);
#endif
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Taps t in [0, k) with 0 <= base + t*d < size.
inline void tap_range(int64_t base, int64_t d, int64_t k, int64_t size, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, ceil_div(-base, d));
  hi = std::min<int64_t>(k, floor_div(size - 1 - base, d) + 1);
  lo = std::min(lo, k);
  hi = std::max(hi, lo);
}

// Channel blocks: (first channel, kind) with kind 2 = two vectors, 1 = one vector,
// -m = m leftover channels handled by scalar code.
template <class A> std::vector<std::pair<int64_t, int>> channel_blocks(int64_t C) {
  constexpr int L = VT<A>::L;
  std::vector<std::pair<int64_t, int>> b;
  int64_t c0 = 0;
  for (; c0 + 2 * L <= C; c0 += 2 * L) b.push_back({c0, 2});
  for (; c0 + L <= C; c0 += L) b.push_back({c0, 1});
  if (c0 < C) b.push_back({c0, -static_cast<int>(C - c0)});
  return b;
}
template <class A> inline int64_t block_width(const std::pair<int64_t, int>& b) {
  return b.second > 0 ? b.second * VT<A>::L : -b.second;
}

// ------------------------------------------------------------------ forward, register window

// Stride 1, horizontal dilation 1: output pixel o of a block reads input pixel o + j for
// kernel column j, so one input vector serves up to KC accumulators. Per kernel row
// the block loads OWB + KC - 1 input vectors and KC weight vectors (kept in registers)
// for OWB * KC multiply-adds, one vector of channels at a time. The tap-list kernels
// above (direct_block, fwd_pixels) load one input vector per multiply-add; on 2 cores
// they ran 5x5 and 7x7 at ~30-45 % of the FMA peak.

// Kernel columns [0, KC) of one kernel row into acc: xp = the block's first input pixel
// in that row (column j0 of the chunk), wp = the weights of column j0 (columns wstep
// apart). TAIL: only `tail` channels are valid (masked input loads; the packed weights
// are zero-padded to a whole block, so weight loads need no mask).
template <class T, class A, int KC, int OWB, bool TAIL>
__attribute__((always_inline)) inline void window_chunk(typename VT<A>::V (&acc)[OWB], const T* xp,
                                                        int64_t step, const A* wp, int64_t wstep,
                                                        int64_t tail) {
  using V = typename VT<A>::V;
  V w[KC];
#pragma GCC unroll 16
  for (int j = 0; j < KC; ++j) w[j] = vload<A, A>(wp + j * wstep);
#pragma GCC unroll 32
  for (int p = 0; p < OWB + KC - 1; ++p) {
    const V xv = TAIL ? vload_n<T, A>(xp + p * step, tail) : vload<T, A>(xp + p * step);
#pragma GCC unroll 16
    for (int j = 0; j < KC; ++j) {
      const int o = p - j;
      if (o >= 0 && o < OWB) acc[o] += xv * w[j];
    }
  }
}

// OWB consecutive output pixels x one vector of channels: kernel rows r < nr at input
// offsets xo[r] from xb and weight offsets wo[r] from wb; each row in nfull chunks of 7
// columns, then one of KT columns (chunks of at most 7 keep the window in the 16 vector
// registers of AVX2). The chunk sizes are compile-time so the accumulators stay in
// registers (a switch over the last chunk's size here put them on the stack); NF >= 0 fixes
// nfull at compile time too (5x5 at N=8: 2.38 -> 2.02 ms, the accumulators no longer
// stored to the stack on every kernel row). STEP > 0: the pixel step, known at compile
// time (the packed tiles' channel block), so the window's loads take immediate offsets
// instead of a register per pixel (13x13 at N=8: 13.1-13.9 -> 12.0-12.5 ms). pf != 0:
// first prefetch the block's pixels of the input row pf elements from xb (and, pf_step !=
// 0, of the row pf_step after it).
template <class T, class A, class Y, int OWB, int KT, bool TAIL, int NF = -1, int STEP = 0>
inline void window_block(const T* xb, int64_t step_rt, const A* wb, int64_t wstep,
                         const int64_t* xo, const int64_t* wo, int nr, int64_t nfull_rt,
                         const A* bias, Y* yb, int64_t YP, int64_t tail, int64_t pf = 0,
                         int64_t pf_step = 0) {
  const int64_t nfull = NF >= 0 ? NF : nfull_rt;
  const int64_t step = STEP > 0 ? STEP : step_rt;
  if (pf) {
    for (int o = 0; o < OWB; ++o) prefetch_line(reinterpret_cast<const char*>(xb + pf + o * step));
    if (pf_step)
      for (int o = 0; o < OWB; ++o)
        prefetch_line(reinterpret_cast<const char*>(xb + pf + pf_step + o * step));
  }
  using V = typename VT<A>::V;
  V acc[OWB];
  const V b = bias ? vload<A, A>(bias) : V{};
  for (int o = 0; o < OWB; ++o) acc[o] = b;
  for (int r = 0; r < nr; ++r) {
    const T* xp = xb + xo[r];
    const A* wp = wb + wo[r];
    for (int64_t c = 0; c < nfull; ++c, xp += 7 * step, wp += 7 * wstep)
      window_chunk<T, A, 7, OWB, TAIL>(acc, xp, step, wp, wstep, tail);
    if (KT > 0) window_chunk<T, A, (KT > 0 ? KT : 1), OWB, TAIL>(acc, xp, step, wp, wstep, tail);
  }
  for (int o = 0; o < OWB; ++o) {
    if (TAIL)
      vstore_n<Y, A>(yb + o * YP, acc[o], tail);
    else
      vstore<Y, A>(yb + o * YP, acc[o]);
  }
}

// Window kernels apply: stride 1 and dilation 1 along the row, more than one column.
inline bool use_window(const Geom& g) { return g.sw == 1 && g.dw == 1 && g.kw > 1; }

// Pixels per window block: the accumulators, the weights of one chunk and the input
// vector fill at most 16 registers (AVX2). With AVX-512's 32 registers, rows of 14 or more
// columns take 14 pixels (each weight vector, streamed from L2 for big kernels, then
// serves twice the multiply-adds: N=8 C=128 56x56 forward, in-process A/B, 31x31 86 ->
// 76 ms, 51x51 237 -> 181 ms); smaller kernels measured no better or slower that way.
constexpr int kWideWindow = FV_VEC_BYTES == 64 ? 14 : 0;  // min kw of 14-pixel blocks (0: none)
// Rows of 4-5 columns: 9 pixels on AVX2; 12 with AVX-512 (5x5, C=128, 56x56, N=8: 1.93 ->
// 1.79 ms in the C++ core; 14 pixels were slower).
constexpr int kMidWindow = FV_VEC_BYTES == 64 ? 12 : 9;
constexpr int window_owb(int64_t kw) {  // as window_pixels_any
  return kw <= 3 ? 10 : kw <= 5 ? kMidWindow : (kWideWindow > 0 && kw >= kWideWindow) ? 14 : 7;
}

// Output pixels [0, npix) (xb: the first one's window, yb: its output) x channels [0, C),
// one vector of channels at a time; blocks of OWB pixels, the rest in blocks of 4, 2, 1.
// KT = kw % 7 (the last chunk of a kernel row).
template <class T, class A, class Y, int OWB, int KT, int NF = -1, int STEP = 0>
void window_pixels(const T* xb, int64_t step, const A* wb, int64_t wstep, const int64_t* xo,
                   const int64_t* wo, int nr, int64_t kw, const A* bias, Y* yb, int64_t YP,
                   int64_t C, int64_t npix, int64_t pf, int64_t pf_step) {
  constexpr int64_t L = VT<A>::L;
  const int64_t nfull = kw / 7;
  auto span = [&](auto owb, int64_t p0, int64_t p1) {
    constexpr int B = decltype(owb)::value;
    for (; p0 + B <= p1; p0 += B) {
      const T* x = xb + p0 * step;
      Y* y = yb + p0 * YP;
      int64_t c0 = 0;
      for (; c0 + L <= C; c0 += L) {
        // The output lines of the next vector of channels, fetched for writing while this
        // one computes. An output not in cache (a fresh tensor) otherwise costs a read for
        // ownership per line at the store: N=8, C=128, 56x56 forward with the caches
        // flushed first, 3x3 1.74 -> 1.47 ms, 1x11 1.87 -> 1.44-1.49 ms.
        if (c0 + L < C)
          for (int o = 0; o < B; ++o) prefetch_line_w(reinterpret_cast<const char*>(y + o * YP + c0 + L));
        window_block<T, A, Y, B, KT, false, NF, STEP>(x + c0, step, wb + c0, wstep, xo, wo, nr, nfull,
                                            bias ? bias + c0 : nullptr, y + c0, YP, L, pf, pf_step);
      }
      if (c0 < C)
        window_block<T, A, Y, B, KT, true, NF, STEP>(x + c0, step, wb + c0, wstep, xo, wo, nr, nfull,
                                           bias ? bias + c0 : nullptr, y + c0, YP, C - c0, pf, pf_step);
    }
    return p0;
  };
  int64_t p = span(std::integral_constant<int, OWB>{}, 0, npix);
  if (OWB >= 12) p = span(std::integral_constant<int, (OWB >= 12 ? OWB / 2 : 1)>{}, p, npix);
  p = span(std::integral_constant<int, 4>{}, p, npix);
  p = span(std::integral_constant<int, 2>{}, p, npix);
  span(std::integral_constant<int, 1>{}, p, npix);
}

// Dispatches window_pixels on kw: the pixel block (window_owb) and the last chunk.
template <class T, class A, class Y, int STEP = 0>
void window_pixels_any(const T* xb, int64_t step, const A* wb, int64_t wstep, const int64_t* xo,
                       const int64_t* wo, int nr, int64_t kw, const A* bias, Y* yb, int64_t YP,
                       int64_t C, int64_t npix, int64_t pf = 0, int64_t pf_step = 0) {
#define FV_WINDOW_ARGS xb, step, wb, wstep, xo, wo, nr, kw, bias, yb, YP, C, npix, pf, pf_step
  constexpr int B3 = window_owb(3), B5 = window_owb(5), B7 = window_owb(7);
  if (kWideWindow > 0 && kw >= kWideWindow) {
    switch (kw % 7) {
      case 0: return window_pixels<T, A, Y, 14, 0, -1, STEP>(FV_WINDOW_ARGS);
      case 1: return window_pixels<T, A, Y, 14, 1, -1, STEP>(FV_WINDOW_ARGS);
      case 2: return window_pixels<T, A, Y, 14, 2, -1, STEP>(FV_WINDOW_ARGS);
      case 3: return window_pixels<T, A, Y, 14, 3, -1, STEP>(FV_WINDOW_ARGS);
      case 4: return window_pixels<T, A, Y, 14, 4, -1, STEP>(FV_WINDOW_ARGS);
      case 5: return window_pixels<T, A, Y, 14, 5, -1, STEP>(FV_WINDOW_ARGS);
      default: return window_pixels<T, A, Y, 14, 6, -1, STEP>(FV_WINDOW_ARGS);
    }
  }
  switch (kw) {
    case 2: return window_pixels<T, A, Y, B3, 2, 0, STEP>(FV_WINDOW_ARGS);
    case 3: return window_pixels<T, A, Y, B3, 3, 0, STEP>(FV_WINDOW_ARGS);
    case 4: return window_pixels<T, A, Y, B5, 4, 0, STEP>(FV_WINDOW_ARGS);
    case 5: return window_pixels<T, A, Y, B5, 5, 0, STEP>(FV_WINDOW_ARGS);
    case 6: return window_pixels<T, A, Y, B7, 6, 0, STEP>(FV_WINDOW_ARGS);
    case 7: return window_pixels<T, A, Y, B7, 0, 1, STEP>(FV_WINDOW_ARGS);
    case 8: return window_pixels<T, A, Y, B7, 1, 1, STEP>(FV_WINDOW_ARGS);
    case 9: return window_pixels<T, A, Y, B7, 2, 1, STEP>(FV_WINDOW_ARGS);
    case 10: return window_pixels<T, A, Y, B7, 3, 1, STEP>(FV_WINDOW_ARGS);
    case 11: return window_pixels<T, A, Y, B7, 4, 1, STEP>(FV_WINDOW_ARGS);
    case 12: return window_pixels<T, A, Y, B7, 5, 1, STEP>(FV_WINDOW_ARGS);
    case 13: return window_pixels<T, A, Y, B7, 6, 1, STEP>(FV_WINDOW_ARGS);
    default: break;
  }
  switch (kw % 7) {
    case 0: return window_pixels<T, A, Y, B7, 0, -1, STEP>(FV_WINDOW_ARGS);
    case 1: return window_pixels<T, A, Y, B7, 1, -1, STEP>(FV_WINDOW_ARGS);
    case 2: return window_pixels<T, A, Y, B7, 2, -1, STEP>(FV_WINDOW_ARGS);
    case 3: return window_pixels<T, A, Y, B7, 3, -1, STEP>(FV_WINDOW_ARGS);
    case 4: return window_pixels<T, A, Y, B7, 4, -1, STEP>(FV_WINDOW_ARGS);
    case 5: return window_pixels<T, A, Y, B7, 5, -1, STEP>(FV_WINDOW_ARGS);
    default: return window_pixels<T, A, Y, B7, 6, -1, STEP>(FV_WINDOW_ARGS);
  }
#undef FV_WINDOW_ARGS
}

// Packed tiles, two output rows at once (fwd_item, use_tile_pairs): rows oh and oh + 1 read
// kh + 1 packed rows, each loaded once for both, as direct_row_group does for small kernels
// on the NHWC rows. Per input row and chunk of KC <= 7 columns the block holds the weights
// of kernel row r (for row oh, DO0) and r - 1 (for row oh + 1, DO1): 2 OWB accumulators and
// 2 KC weights, 29 of AVX-512's 32 registers with OWB = KC = 7.
template <class A, int KC, int OWB, int STEP, bool DO0, bool DO1>
__attribute__((always_inline)) inline void pair_chunk(typename VT<A>::V (&acc0)[OWB],
                                                      typename VT<A>::V (&acc1)[OWB], const A* xp,
                                                      const A* w0p, const A* w1p, int64_t wstep) {
  using V = typename VT<A>::V;
  V w0[KC], w1[KC];
#pragma GCC unroll 8
  for (int j = 0; j < KC; ++j) {
    if (DO0) w0[j] = vload<A, A>(w0p + j * wstep);
    if (DO1) w1[j] = vload<A, A>(w1p + j * wstep);
  }
#pragma GCC unroll 16
  for (int p = 0; p < OWB + KC - 1; ++p) {
    const V xv = vload<A, A>(xp + p * STEP);
#pragma GCC unroll 8
    for (int j = 0; j < KC; ++j) {
      const int o = p - j;
      if (o < 0 || o >= OWB) continue;
      if (DO0) acc0[o] += xv * w0[j];
      if (DO1) acc1[o] += xv * w1[j];
    }
  }
}

// One kernel row's pass of pair_block: nfull chunks of 7 columns, then one of KT.
template <class A, int OWB, int KT, int NF, int STEP, bool DO0, bool DO1>
__attribute__((always_inline)) inline void pair_row(typename VT<A>::V (&acc0)[OWB],
                                                    typename VT<A>::V (&acc1)[OWB], const A* xp,
                                                    const A* w0p, const A* w1p, int64_t wstep,
                                                    int64_t nfull_rt) {
  const int64_t nfull = NF >= 0 ? NF : nfull_rt;
  for (int64_t c = 0; c < nfull; ++c, xp += 7 * STEP, w0p += 7 * wstep, w1p += 7 * wstep)
    pair_chunk<A, 7, OWB, STEP, DO0, DO1>(acc0, acc1, xp, w0p, w1p, wstep);
  if (KT > 0) pair_chunk<A, (KT > 0 ? KT : 1), OWB, STEP, DO0, DO1>(acc0, acc1, xp, w0p, w1p, wstep);
}

// OWB pixels x one vector of channels of both rows. xo[r]: packed row r of the kh + 1 (from
// the top kernel row of row oh); wo[i]: kernel row i's weights. TAIL: `tail` channels valid
// (only the stores are masked: packed rows and weights are zero-padded).
template <class A, class Y, int OWB, int KT, int NF, int STEP, bool TAIL>
inline void pair_block(const A* xb, const A* wb, int64_t wstep, const int64_t* xo,
                       const int64_t* wo, int kh, int64_t nfull, const A* bias, Y* y0, Y* y1,
                       int64_t YP, int64_t tail) {
  using V = typename VT<A>::V;
  V acc0[OWB], acc1[OWB];
  const V b = bias ? vload<A, A>(bias) : V{};
  for (int o = 0; o < OWB; ++o) acc0[o] = acc1[o] = b;
  pair_row<A, OWB, KT, NF, STEP, true, false>(acc0, acc1, xb + xo[0], wb + wo[0], wb, wstep, nfull);
  for (int r = 1; r < kh; ++r)
    pair_row<A, OWB, KT, NF, STEP, true, true>(acc0, acc1, xb + xo[r], wb + wo[r], wb + wo[r - 1],
                                              wstep, nfull);
  pair_row<A, OWB, KT, NF, STEP, false, true>(acc0, acc1, xb + xo[kh], wb, wb + wo[kh - 1], wstep,
                                             nfull);
  for (int o = 0; o < OWB; ++o) {
    if (TAIL) {
      vstore_n<Y, A>(y0 + o * YP, acc0[o], tail);
      vstore_n<Y, A>(y1 + o * YP, acc1[o], tail);
    } else {
      vstore<Y, A>(y0 + o * YP, acc0[o]);
      vstore<Y, A>(y1 + o * YP, acc1[o]);
    }
  }
}

// Pixels [0, npix) of both rows, channels [0, C) of a packed block (C <= STEP).
template <class A, class Y, int KT, int NF, int STEP>
void pair_pixels(const A* xb, const A* wb, int64_t wstep, const int64_t* xo, const int64_t* wo,
                 int kh, int64_t kw, const A* bias, Y* y0, Y* y1, int64_t YP, int64_t C,
                 int64_t npix) {
  constexpr int64_t L = VT<A>::L;
  const int64_t nfull = kw / 7;
  auto span = [&](auto owb, int64_t p0) {
    constexpr int B = decltype(owb)::value;
    for (; p0 + B <= npix; p0 += B) {
      int64_t c0 = 0;
      for (; c0 + L <= C; c0 += L)
        pair_block<A, Y, B, KT, NF, STEP, false>(xb + p0 * STEP + c0, wb + c0, wstep, xo, wo, kh,
                                                 nfull, bias ? bias + c0 : nullptr,
                                                 y0 + p0 * YP + c0, y1 + p0 * YP + c0, YP, L);
      if (c0 < C)
        pair_block<A, Y, B, KT, NF, STEP, true>(xb + p0 * STEP + c0, wb + c0, wstep, xo, wo, kh,
                                                nfull, bias ? bias + c0 : nullptr,
                                                y0 + p0 * YP + c0, y1 + p0 * YP + c0, YP, C - c0);
    }
    return p0;
  };
  int64_t p = span(std::integral_constant<int, 7>{}, 0);
  p = span(std::integral_constant<int, 4>{}, p);
  p = span(std::integral_constant<int, 2>{}, p);
  span(std::integral_constant<int, 1>{}, p);
}

template <class A, class Y, int STEP>
void pair_pixels_any(const A* xb, const A* wb, int64_t wstep, const int64_t* xo, const int64_t* wo,
                     int kh, int64_t kw, const A* bias, Y* y0, Y* y1, int64_t YP, int64_t C,
                     int64_t npix) {
#define FV_PAIR_ARGS xb, wb, wstep, xo, wo, kh, kw, bias, y0, y1, YP, C, npix
  if (kw < 14) {
    switch (kw) {
      case 8: return pair_pixels<A, Y, 1, 1, STEP>(FV_PAIR_ARGS);
      case 9: return pair_pixels<A, Y, 2, 1, STEP>(FV_PAIR_ARGS);
      case 10: return pair_pixels<A, Y, 3, 1, STEP>(FV_PAIR_ARGS);
      case 11: return pair_pixels<A, Y, 4, 1, STEP>(FV_PAIR_ARGS);
      case 12: return pair_pixels<A, Y, 5, 1, STEP>(FV_PAIR_ARGS);
      case 13: return pair_pixels<A, Y, 6, 1, STEP>(FV_PAIR_ARGS);
      default: break;
    }
  }
  switch (kw % 7) {
    case 0: return pair_pixels<A, Y, 0, -1, STEP>(FV_PAIR_ARGS);
    case 1: return pair_pixels<A, Y, 1, -1, STEP>(FV_PAIR_ARGS);
    case 2: return pair_pixels<A, Y, 2, -1, STEP>(FV_PAIR_ARGS);
    case 3: return pair_pixels<A, Y, 3, -1, STEP>(FV_PAIR_ARGS);
    case 4: return pair_pixels<A, Y, 4, -1, STEP>(FV_PAIR_ARGS);
    case 5: return pair_pixels<A, Y, 5, -1, STEP>(FV_PAIR_ARGS);
    default: return pair_pixels<A, Y, 6, -1, STEP>(FV_PAIR_ARGS);
  }
#undef FV_PAIR_ARGS
}

// Large kernels, kernel row outermost. window_block keeps a block's accumulators in
// registers across all kernel rows, so every block streams the whole kernel (kh x kw
// weight lines per channel vector) and its kh input rows through L1, from L2 while a
// channel block's window fits there and from L3 once it does not (51x51). Here a segment
// of up to kSegment pixels keeps its accumulators in an L1 buffer instead and runs one
// kernel row at a time over all of its blocks: that row's kw weight lines stay in L1 for
// the whole segment and consecutive blocks share their input lines, at the cost of
// loading and storing the accumulators once per block and kernel row. Packed tiles only
// (zero-padded channel blocks and weights): vectors are whole, only the store to y is
// masked. use_window_rows (below) says where this wins.
constexpr int64_t kSegment = 56;
constexpr int kRowsBlock = FV_VEC_BYTES == 64 ? 14 : 7;  // pixels per block (as window_owb)

template <class A, int OWB, int KT, int STEP>
inline void window_row_acc(const A* xp, const A* wp, int64_t wstep, int64_t nfull, A* acc_buf) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  V acc[OWB];
  for (int o = 0; o < OWB; ++o) acc[o] = vload<A, A>(acc_buf + o * L);
  for (int64_t c = 0; c < nfull; ++c, xp += 7 * STEP, wp += 7 * wstep)
    window_chunk<A, A, 7, OWB, false>(acc, xp, STEP, wp, wstep, L);
  if (KT > 0) window_chunk<A, A, (KT > 0 ? KT : 1), OWB, false>(acc, xp, STEP, wp, wstep, L);
  for (int o = 0; o < OWB; ++o) vstore<A, A>(acc_buf + o * L, acc[o]);
}

// window_pixels for packed tiles (pixels STEP apart), kernel row outermost per segment.
template <class A, class Y, int KT, int STEP>
void window_pixels_rows(const A* xb, const A* wb, int64_t wstep, const int64_t* xo,
                        const int64_t* wo, int nr, int64_t kw, const A* bias, Y* yb, int64_t YP,
                        int64_t C, int64_t npix) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  const int64_t nfull = kw / 7;
  alignas(64) A acc_buf[kSegment * L];
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    const int64_t cn = std::min<int64_t>(L, C - c0);
    const V b = bias ? vload<A, A>(bias + c0) : V{};
    for (int64_t s0 = 0; s0 < npix; s0 += kSegment) {
      const int64_t np = std::min(kSegment, npix - s0);
      for (int64_t p = 0; p < np; ++p) vstore<A, A>(acc_buf + p * L, b);
      for (int r = 0; r < nr; ++r) {
        const A* x = xb + xo[r] + s0 * STEP + c0;
        const A* w = wb + wo[r] + c0;
        auto span = [&](auto owb, int64_t p0) {
          constexpr int B = decltype(owb)::value;
          for (; p0 + B <= np; p0 += B)
            window_row_acc<A, B, KT, STEP>(x + p0 * STEP, w, wstep, nfull, acc_buf + p0 * L);
          return p0;
        };
        int64_t p = span(std::integral_constant<int, kRowsBlock>{}, 0);
        if (kRowsBlock > 7) p = span(std::integral_constant<int, 7>{}, p);
        p = span(std::integral_constant<int, 4>{}, p);
        p = span(std::integral_constant<int, 2>{}, p);
        span(std::integral_constant<int, 1>{}, p);
      }
      Y* y = yb + s0 * YP + c0;
      if (cn == L)
        for (int64_t p = 0; p < np; ++p) vstore<Y, A>(y + p * YP, vload<A, A>(acc_buf + p * L));
      else
        for (int64_t p = 0; p < np; ++p) vstore_n<Y, A>(y + p * YP, vload<A, A>(acc_buf + p * L), cn);
    }
  }
}

// Where the kernel-row-outer order wins: A/B within one process, C=128, 56x56, forward,
// calls alternating between the two orders. AVX-512 (14-pixel blocks both ways), two
// threads: 51x51 N=8 113 -> 90 ms, N=1 15.4 -> 12.6; 41x41 68 -> 59 and 9.3 -> 8.2; 35x35
// N=1 5.8 -> 5.3; 31x31 down to 13x13 within 5 % either way (run to run), 9x9 9 % slower.
// The gain comes once one channel block's window (kh packed rows and the kh x kw weight
// lines) outgrows half of the 1 MB L2: 31x31 at 56 pixels holds 464 KB, 35x35 560 KB, 51x51 1 MB. AVX2
// (7-pixel blocks, half the bytes per pixel, twice the weight passes of the register
// order): 31x31 N=1 7.8 -> 6.8 ms, 27x27 10 %, 21x21 6 %, 17x17 2 % faster; 13x13 12 %,
// 31x7 19 % slower, 7x31 equal.
inline bool use_window_rows(const Geom& g) {
  if (g.kh < 3 || g.kw < 7) return false;
  if (FV_VEC_BYTES == 64)
    return (g.kh * packed_width(g) + g.kh * g.kw) * 2 * FV_VEC_BYTES > (512 << 10);
  return g.kw >= 14 && g.kh * g.kw >= 256;
}

template <class A, class Y, int STEP>
void window_pixels_rows_any(const A* xb, const A* wb, int64_t wstep, const int64_t* xo,
                            const int64_t* wo, int nr, int64_t kw, const A* bias, Y* yb,
                            int64_t YP, int64_t C, int64_t npix) {
#define FV_ROWS_ARGS xb, wb, wstep, xo, wo, nr, kw, bias, yb, YP, C, npix
  switch (kw % 7) {
    case 0: return window_pixels_rows<A, Y, 0, STEP>(FV_ROWS_ARGS);
    case 1: return window_pixels_rows<A, Y, 1, STEP>(FV_ROWS_ARGS);
    case 2: return window_pixels_rows<A, Y, 2, STEP>(FV_ROWS_ARGS);
    case 3: return window_pixels_rows<A, Y, 3, STEP>(FV_ROWS_ARGS);
    case 4: return window_pixels_rows<A, Y, 4, STEP>(FV_ROWS_ARGS);
    case 5: return window_pixels_rows<A, Y, 5, STEP>(FV_ROWS_ARGS);
    default: return window_pixels_rows<A, Y, 6, STEP>(FV_ROWS_ARGS);
  }
#undef FV_ROWS_ARGS
}

// ------------------------------------------------------------------ forward

// Packed row slots: row ih of a tile lives at slot ih - ih_lo, or, in a ring of `ring`
// rows (the forward pass), at slot ih % ring, so consecutive tiles of one image keep the
// rows they share where the previous tile packed them.
inline int64_t row_slot(int64_t ih, int64_t ih_lo, int64_t ring) {
  return ring > 0 ? ih % ring : ih - ih_lo;
}

// Packs input rows [ih_lo, ih_hi) of channels [c0, c0 + cw) into buf[slot][q][CB], q
// the packed column of input column q - pl (zero outside the image; accumulator
// type; channels past cw are zero).
template <class T, class A>
void pack_rows(const Geom& g, const T* xn, int64_t ih_lo, int64_t ih_hi, int64_t c0, int64_t cw,
               A* buf, int64_t ring = 0) {
  constexpr int L = VT<A>::L, CB = 2 * L;
  const int64_t wp = packed_width(g), xp = in_pitch(g);
  const int64_t q_lo = std::min(wp, g.pl), q_hi = std::max(q_lo, std::min(wp, g.pl + g.w));
  for (int64_t ih = ih_lo; ih < ih_hi; ++ih) {
    A* row = buf + row_slot(ih, ih_lo, ring) * wp * CB;
    std::fill(row, row + q_lo * CB, A(0));
    std::fill(row + q_hi * CB, row + wp * CB, A(0));
    const T* s = xn + (ih * g.w + (q_lo - g.pl)) * xp + c0;
    A* d = row + q_lo * CB;
    if (cw == CB) {
      for (int64_t q = q_lo; q < q_hi; ++q, s += xp, d += CB) {
        vstore<A, A>(d, vload<T, A>(s));
        vstore<A, A>(d + L, vload<T, A>(s + L));
      }
    } else {
      for (int64_t q = q_lo; q < q_hi; ++q, s += xp, d += CB) {
        int64_t c = 0;
        for (; c < cw; ++c) d[c] = sload<T, A>(s + c);
        for (; c < CB; ++c) d[c] = A(0);
      }
    }
  }
}

// OWB consecutive output pixels of one row, one channel block (two vectors), read
// from the packed tile. The taps come as one flat list of (input offset, weight
// offset): a single loop keeps the 12 accumulators in registers (with nested i/j
// loops GCC spills them to the stack at every kernel row).
template <class Y, class A, int OWB, int SW>
inline void fwd_pixels(const Geom& g, const A* xb, const A* wb, const int32_t* xo,
                       const int32_t* wo, int nt, const A* bias, Y* yp, int64_t cw, int64_t c0) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L, CB = 2 * L;
  constexpr int64_t sps = SW * CB;
  V acc[OWB][2];
  for (int v = 0; v < 2; ++v) {
    const V b = bias ? vload<A, A>(bias + c0 + v * L) : V{};
    for (int o = 0; o < OWB; ++o) acc[o][v] = b;
  }
  for (int t = 0; t < nt; ++t) {
    const A* wp = wb + wo[t];
    const V w0 = vload<A, A>(wp), w1 = vload<A, A>(wp + L);
    const A* xp = xb + xo[t];
    for (int o = 0; o < OWB; ++o) {
      acc[o][0] += vload<A, A>(xp + o * sps) * w0;
      acc[o][1] += vload<A, A>(xp + o * sps + L) * w1;
    }
  }
  const int64_t P = out_pitch(g);
  if (cw == CB) {
    for (int o = 0; o < OWB; ++o) {
      vstore<Y, A>(yp + o * P, acc[o][0]);
      vstore<Y, A>(yp + o * P + L, acc[o][1]);
    }
  } else {
    for (int o = 0; o < OWB; ++o) {
      A tmp[CB];
      std::memcpy(tmp, acc[o], sizeof tmp);
      for (int64_t c = 0; c < cw; ++c) sstore<Y, A>(yp + o * P + c, tmp[c]);
    }
  }
}

// One output row of one channel block from a packed tile whose rows sit in a ring of
// `ring` slots (row_slot).
template <class Y, class A, int SW>
void fwd_row_sw(const Geom& g, const A* buf, int64_t ring, const A* wpk, const A* bias,
                Y* yrow, int64_t oh, int64_t c0, int64_t cw) {
  constexpr int OWB = 6, CB = 2 * VT<A>::L;
  const int64_t wp = packed_width(g), ih0 = oh * g.sh - g.pt;
  int64_t i_lo, i_hi;
  tap_range(ih0, g.dh, g.kh, g.h, i_lo, i_hi);
  // The row's taps: input offsets in the packed tile (pixel 0) and weight offsets.
  int32_t xo[64 * 64], wo[64 * 64];
  int nt = 0;
  for (int64_t i = i_lo; i < i_hi; ++i)
    for (int64_t j = 0; j < g.kw; ++j, ++nt) {
      xo[nt] = static_cast<int32_t>((row_slot(ih0 + i * g.dh, 0, ring) * wp + j * g.dw) * CB);
      wo[nt] = static_cast<int32_t>((i * g.kw + j) * g.cp);
    }
  const A* wb = wpk + c0;
  const int64_t P = out_pitch(g);
  if (SW == 1 && use_window(g)) {
    int64_t rxo[64], rwo[64];  // kh <= 63
    int nr = 0;
    for (int64_t i = i_lo; i < i_hi; ++i, ++nr) {
      rxo[nr] = row_slot(ih0 + i * g.dh, 0, ring) * wp * CB;
      rwo[nr] = i * g.kw * g.cp;
    }
    if (use_window_rows(g)) {
      window_pixels_rows_any<A, Y, CB>(buf, wb, g.cp, rxo, rwo, nr, g.kw, bias ? bias + c0 : nullptr,
                                       yrow + c0, P, cw, g.ow);
      return;
    }
    window_pixels_any<A, A, Y, CB>(buf, CB, wb, g.cp, rxo, rwo, nr, g.kw, bias ? bias + c0 : nullptr,
                               yrow + c0, P, cw, g.ow);
    return;
  }
  int64_t ow = 0;
  for (; ow + OWB <= g.ow; ow += OWB)
    fwd_pixels<Y, A, OWB, SW>(g, buf + ow * SW * CB, wb, xo, wo, nt, bias,
                              yrow + ow * P + c0, cw, c0);
  if (ow + 3 <= g.ow) {
    fwd_pixels<Y, A, 3, SW>(g, buf + ow * SW * CB, wb, xo, wo, nt, bias, yrow + ow * P + c0,
                            cw, c0);
    ow += 3;
  }
  for (; ow < g.ow; ++ow)
    fwd_pixels<Y, A, 1, SW>(g, buf + ow * SW * CB, wb, xo, wo, nt, bias, yrow + ow * P + c0,
                            cw, c0);
}

template <class Y, class A>
void fwd_row(const Geom& g, const A* buf, int64_t ring, const A* wpk, const A* bias, Y* yrow,
             int64_t oh, int64_t c0, int64_t cw) {
  if (g.sw == 1)
    fwd_row_sw<Y, A, 1>(g, buf, ring, wpk, bias, yrow, oh, c0, cw);
  else
    fwd_row_sw<Y, A, 2>(g, buf, ring, wpk, bias, yrow, oh, c0, cw);
}

// Packs rows [ih_lo, ih_hi) of channel blocks [b0, b1) into one packed tile per block
// (tile b - b0 at buf + (b - b0) * block_elems, rows in a ring of `ring` slots), reading
// each pixel's channels in order.
template <class T, class A>
void pack_rows_blocks(const Geom& g, const T* xn, int64_t ih_lo, int64_t ih_hi, int64_t b0,
                      int64_t b1, int64_t block_elems, A* buf, int64_t ring) {
  constexpr int L = VT<A>::L, CB = 2 * L;
  if (b1 - b0 == 1) {
    const int64_t c0 = b0 * CB;
    pack_rows<T, A>(g, xn, ih_lo, ih_hi, c0, std::min<int64_t>(CB, g.c - c0), buf, ring);
    return;
  }
  const int64_t wp = packed_width(g), xp = in_pitch(g);
  const int64_t q_lo = std::min(wp, g.pl), q_hi = std::max(q_lo, std::min(wp, g.pl + g.w));
  for (int64_t ih = ih_lo; ih < ih_hi; ++ih) {
    const int64_t r = row_slot(ih, ih_lo, ring);
    for (int64_t b = b0; b < b1; ++b) {
      A* row = buf + (b - b0) * block_elems + r * wp * CB;
      std::fill(row, row + q_lo * CB, A(0));
      std::fill(row + q_hi * CB, row + wp * CB, A(0));
    }
    const T* s = xn + (ih * g.w + (q_lo - g.pl)) * xp;
    for (int64_t q = q_lo; q < q_hi; ++q, s += xp) {
      A* d = buf + (r * wp + q) * CB;
      for (int64_t b = b0; b < b1; ++b, d += block_elems) {
        const int64_t c0 = b * CB, cw = std::min<int64_t>(CB, g.c - c0);
        if (cw == CB) {
          vstore<A, A>(d, vload<T, A>(s + c0));
          vstore<A, A>(d + L, vload<T, A>(s + c0 + L));
        } else {
          int64_t c = 0;
          for (; c < cw; ++c) d[c] = sload<T, A>(s + c0 + c);
          for (; c < CB; ++c) d[c] = A(0);
        }
      }
    }
  }
}

// Where fwd_item runs output rows in pairs (pair_pixels): the packed register windows
// (stride 1, dilation 1) of kernels 7 to 13 columns wide, and wider ones up to where
// use_window_rows takes over, AVX-512 only (29 registers). Measured (session 25, Zen 5, C=128,
// 56x56, 13x13 forward, one row at a time against pairs, each against PyTorch's
// channels_last in the same process): N=1 0.605 -> 0.531 ms, N=8 4.26 -> 3.89 ms.
inline bool use_tile_pairs(const Geom& g) {
  return FV_VEC_BYTES == 64 && use_window(g) && g.sh == 1 && g.dh == 1 && g.kh >= 2 &&
         g.kw >= 7 && !use_window_rows(g);
}

// Output rows oh and oh + 1 (both with every kernel row inside the image) of one channel
// block [c0, c0 + cw) from its packed tile.
template <class Y, class A>
void fwd_row_pair(const Geom& g, const A* buf, int64_t ring, const A* wpk, const A* bias, Y* y0,
                  Y* y1, int64_t oh, int64_t c0, int64_t cw) {
  constexpr int CB = 2 * VT<A>::L;
  const int64_t wp = packed_width(g), ih0 = oh - g.pt;
  int64_t rxo[65], rwo[64];  // kh <= 63
  for (int64_t r = 0; r <= g.kh; ++r) rxo[r] = row_slot(ih0 + r, 0, ring) * wp * CB;
  for (int64_t i = 0; i < g.kh; ++i) rwo[i] = i * g.kw * g.cp;
  pair_pixels_any<A, Y, CB>(buf, wpk + c0, g.cp, rxo, rwo, static_cast<int>(g.kh), g.kw,
                            bias ? bias + c0 : nullptr, y0 + c0, y1 + c0, out_pitch(g), cw, g.ow);
}

// What a thread's buffer holds: rows [lo, hi) of image n, channel blocks from b0, in
// their ring slots (n = -1: nothing).
struct PackedRows {
  int64_t n = -1, b0 = -1, lo = 0, hi = 0;
};

// One work item of the forward pass: output rows [oh0, oh1) of image n, channel blocks
// [b0, b1) (a tile of the plan), packed into buf and convolved. Rows the buffer already
// holds for the same image and blocks (the previous tile of a thread's run; with 7x7 and
// all-channel tiles of 2 output rows, 6 of the 8 rows a tile reads) are not packed again.
template <class T, class A, class Y>
void fwd_item(const Geom& g, const FwdPlan& pl, const T* x, const A* wpk, const A* bias, Y* y,
              A* buf, PackedRows& held, int64_t n, int64_t oh0, int64_t oh1, int64_t b0,
              int64_t b1) {
  constexpr int64_t CB = 2 * VT<A>::L;
  const int64_t xp = in_pitch(g), yp = out_pitch(g);
  const int64_t ring = tile_rows_in(g, pl.rt);  // the slots block_elems holds
  const int64_t ih_lo = std::max<int64_t>(0, oh0 * g.sh - g.pt);
  const int64_t ih_hi = std::min<int64_t>(g.h, (oh1 - 1) * g.sh - g.pt + (g.kh - 1) * g.dh + 1);
  const T* xn = x + n * g.h * g.w * xp;
  if (ih_hi > ih_lo) {
    int64_t from = ih_lo;
    if (held.n == n && held.b0 == b0 && held.lo <= ih_lo && ih_lo <= held.hi)
      from = std::min(ih_hi, std::max(ih_lo, held.hi));
    // Rows [from, ih_hi) overwrite slots of rows below ih_lo only: ih_hi - ih_lo <= ring.
    if (from < ih_hi) pack_rows_blocks<T, A>(g, xn, from, ih_hi, b0, b1, pl.block_elems, buf, ring);
    if (from == ih_lo || held.hi < ih_hi) held = PackedRows{n, b0, ih_lo, ih_hi};
    else held.lo = ih_lo;
  }
  const bool pairs = use_tile_pairs(g);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t c0 = b * CB, cw = std::min<int64_t>(CB, g.c - c0);
    const A* tile_buf = buf + (b - b0) * pl.block_elems;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      Y* yrow = y + (n * g.oh + oh) * g.ow * yp;
      // Both rows' kernel rows inside the image (and so in the tile's packed rows).
      if (pairs && oh + 1 < oh1 && oh >= g.pt && oh - g.pt + g.kh < g.h) {
        fwd_row_pair<Y, A>(g, tile_buf, ring, wpk, bias, yrow, yrow + g.ow * yp, oh, c0, cw);
        ++oh;
        continue;
      }
      fwd_row<Y, A>(g, tile_buf, ring, wpk, bias, yrow, oh, c0, cw);
    }
  }
}

// ------------------------------------------------------------------ forward, direct

// Small kernels (see use_direct): no packing. For each output row, blocks of OWB
// output pixels sweep all channel blocks of those pixels, reading the NHWC input rows in
// place. The input a pixel block touches (kh rows x a few pixels x all channels) stays in
// L1/L2 while every channel block is computed, and each input element is read from
// memory once per output row instead of being copied into a packed tile first; for
// 3x3 to 7x7 kernels the copy cost as much as the arithmetic.

// OWB output pixels x NV vectors of channels [c0, ...) of one output row, every pixel's
// taps inside the image horizontally. xb: input at (row 0 of the image, the block's
// first input column, channel c0); xo[t]: offset of tap t's pixel from xb (rows outside
// the image already dropped); wo[t]: its weight offset. TAIL: the last vector holds
// only `tail` channels (masked loads and stores; reading past them could leave the
// tensor).
template <class T, class A, class Y, int NV, int OWB, bool TAIL>
inline void direct_block(const T* xb, int64_t step, const A* wb, const int64_t* xo,
                         const int64_t* wo, int nt, const A* bias, Y* yb, int64_t YP, int64_t tail) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  V acc[OWB][NV];
  for (int v = 0; v < NV; ++v) {
    const V b = bias ? vload<A, A>(bias + v * L) : V{};
    for (int o = 0; o < OWB; ++o) acc[o][v] = b;
  }
  for (int t = 0; t < nt; ++t) {
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<A, A>(wb + wo[t] + v * L);
    const T* xp = xb + xo[t];
    for (int o = 0; o < OWB; ++o)
      for (int v = 0; v < NV; ++v) {
        const T* q = xp + o * step + v * L;
        acc[o][v] += (TAIL && v == NV - 1 ? vload_n<T, A>(q, tail) : vload<T, A>(q)) * w[v];
      }
  }
  for (int o = 0; o < OWB; ++o)
    for (int v = 0; v < NV; ++v) {
      Y* q = yb + o * YP + v * L;
      if (TAIL && v == NV - 1)
        vstore_n<Y, A>(q, acc[o][v], tail);
      else
        vstore<Y, A>(q, acc[o][v]);
    }
}

// OWB pixels starting at output column ow, every channel.
template <class T, class A, class Y, int OWB>
inline void direct_pixels(const Geom& g, const T* xb, int64_t step, const A* wpk,
                          const int64_t* xo, const int64_t* wo, int nt, const A* bias, Y* yb) {
  constexpr int64_t L = VT<A>::L;
  const int64_t YP = out_pitch(g);
  int64_t c0 = 0;
  for (; c0 + 2 * L <= g.c; c0 += 2 * L)
    direct_block<T, A, Y, 2, OWB, false>(xb + c0, step, wpk + c0, xo, wo, nt,
                                         bias ? bias + c0 : nullptr, yb + c0, YP, L);
  for (; c0 + L <= g.c; c0 += L)
    direct_block<T, A, Y, 1, OWB, false>(xb + c0, step, wpk + c0, xo, wo, nt,
                                         bias ? bias + c0 : nullptr, yb + c0, YP, L);
  if (c0 < g.c)
    direct_block<T, A, Y, 1, OWB, true>(xb + c0, step, wpk + c0, xo, wo, nt,
                                        bias ? bias + c0 : nullptr, yb + c0, YP, g.c - c0);
}

// Output row oh of image n (xn, yrow: that image's input, that output row).
// interior = false: only the edge pixels (direct_row_group computes the rest).
template <class T, class A, class Y>
void direct_row(const Geom& g, const T* xn, const A* wpk, const A* bias, Y* yrow, int64_t oh,
                bool interior = true) {
  constexpr int OWB = 6;
  const int64_t XP = in_pitch(g), YP = out_pitch(g), step = g.sw * XP;
  const int64_t ih0 = oh * g.sh - g.pt;
  int64_t i_lo, i_hi;
  tap_range(ih0, g.dh, g.kh, g.h, i_lo, i_hi);
  // Interior columns: every tap inside the image, ow in [ow_lo, ow_hi).
  const int64_t ow_lo = std::min(g.ow, ceil_div(g.pl, g.sw));
  const int64_t ow_hi =
      std::max(ow_lo, std::min(g.ow, floor_div(g.w - 1 + g.pl - (g.kw - 1) * g.dw, g.sw) + 1));
  int64_t xo[kDirectMaxTaps], wo[kDirectMaxTaps];  // use_direct bounds the taps
  auto taps = [&](int64_t iw0, int64_t j_lo, int64_t j_hi) {
    int nt = 0;
    for (int64_t i = i_lo; i < i_hi; ++i)
      for (int64_t j = j_lo; j < j_hi; ++j, ++nt) {
        xo[nt] = ((ih0 + i * g.dh) * g.w + iw0 + j * g.dw) * XP;
        wo[nt] = (i * g.kw + j) * g.cp;
      }
    return nt;
  };
  // Edge pixels: their own horizontal tap range, one pixel at a time.
  auto edge = [&](int64_t ow) {
    int64_t j_lo, j_hi;
    const int64_t iw0 = ow * g.sw - g.pl;
    tap_range(iw0, g.dw, g.kw, g.w, j_lo, j_hi);
    const int nt = taps(iw0, j_lo, j_hi);
    direct_pixels<T, A, Y, 1>(g, xn, step, wpk, xo, wo, nt, bias, yrow + ow * YP);
  };
  // The input rows the next output row reads first (its last kernel row; with stride 2
  // also the one before): fetched into cache ahead of use, a slice of them per pixel
  // block. Without this a large batch ran at DRAM latency, not bandwidth: the rows
  // are consumed too slowly, in too scattered an order, for the hardware prefetcher.
  const int64_t pf_hi = std::min(g.h, (oh + 1) * g.sh - g.pt + (g.kh - 1) * g.dh + 1);
  const int64_t pf_lo = std::max<int64_t>(0, std::max(pf_hi - g.sh, ih0 + (g.kh - 1) * g.dh + 1));
  const int64_t row_bytes = g.w * XP * static_cast<int64_t>(sizeof(T));
  auto prefetch = [&](int64_t ow0, int64_t ow1) {
    if (pf_lo >= pf_hi) return;
    const int64_t b0 = std::max<int64_t>(0, ow0 * g.sw - g.pl) * XP * static_cast<int64_t>(sizeof(T));
    const int64_t b1 = std::min(row_bytes, std::max<int64_t>(0, ow1 * g.sw - g.pl) * XP * static_cast<int64_t>(sizeof(T)));
    for (int64_t r = pf_lo; r < pf_hi; ++r) {
      const char* base = reinterpret_cast<const char*>(xn) + r * row_bytes;
      for (int64_t b = b0; b < b1; b += 64) prefetch_line(base + b);
    }
  };
  if (!interior) {
    for (int64_t ow = 0; ow < ow_lo; ++ow) edge(ow);
    for (int64_t ow = std::max(ow_lo, ow_hi); ow < g.ow; ++ow) edge(ow);
    return;
  }
  prefetch(0, ow_lo);
  for (int64_t ow = 0; ow < ow_lo; ++ow) edge(ow);
  if (ow_hi > ow_lo && use_window(g)) {
    int64_t rxo[64], rwo[64];  // kh <= 63
    int nr = 0;
    for (int64_t i = i_lo; i < i_hi; ++i, ++nr) {
      rxo[nr] = (ih0 + i * g.dh) * g.w * XP;
      rwo[nr] = i * g.kw * g.cp;
    }
    // The next row's input is prefetched a few lines per window block (pf), spread over
    // the row's work. (Bursts of a few blocks' lines before them stalled on full fill
    // buffers: 14-18 % of a single-thread 5x5 forward at N=8 sat on that prefetch loop.)
    const int64_t pf = pf_lo < pf_hi ? pf_lo * g.w * XP : 0;
    const int64_t pf_step = pf_hi - pf_lo > 1 ? g.w * XP : 0;
    window_pixels_any<T, A, Y>(xn + (ow_lo - g.pl) * XP, XP, wpk, g.cp, rxo, rwo, nr, g.kw, bias,
                               yrow + ow_lo * YP, YP, g.c, ow_hi - ow_lo, pf, pf_step);
    prefetch(ow_hi, g.ow + g.kw);
  } else if (ow_hi > ow_lo) {
    const int nt = taps(0, 0, g.kw);
    int64_t ow = ow_lo;
    for (; ow + OWB <= ow_hi; ow += OWB) {
      prefetch(ow, ow + OWB);
      direct_pixels<T, A, Y, OWB>(g, xn + (ow * g.sw - g.pl) * XP, step, wpk, xo, wo, nt, bias,
                                  yrow + ow * YP);
    }
    prefetch(ow, g.ow + (g.kw - 1) * g.dw + 1);
    for (; ow + 3 <= ow_hi; ow += 3)
      direct_pixels<T, A, Y, 3>(g, xn + (ow * g.sw - g.pl) * XP, step, wpk, xo, wo, nt, bias,
                                yrow + ow * YP);
    for (; ow < ow_hi; ++ow)
      direct_pixels<T, A, Y, 1>(g, xn + (ow * g.sw - g.pl) * XP, step, wpk, xo, wo, nt, bias,
                                yrow + ow * YP);
  }
  for (int64_t ow = std::max(ow_lo, ow_hi); ow < g.ow; ++ow) edge(ow);
}

// KR output rows at once (square 3x3, 5x5, 7x7 at stride 1 and dilation 1, see row_group;
// every kernel row inside the image for all KR rows): output rows oh .. oh + KR - 1 read
// KH + KR - 1 input rows, each loaded once for all of them, so a block of OWB pixels loads
// (KH + KR - 1) (OWB + KW - 1) input vectors for KR OWB KH KW multiply-adds (one row at a
// time: KH (OWB + KW - 1) for OWB KH KW), and an output row brings in (KH + KR - 1) / KR
// input rows from L2 instead of KH. Per input row r the block holds the weights of kernel
// row r - q for each output row q that reads it.
template <class T, class A, class Y, int KR, int OWB, int KH, int KW>
__attribute__((always_inline)) inline void group_block(const T* xb, int64_t step, int64_t xrow,
                                                       const A* wb, int64_t wstep, int64_t wrow,
                                                       const A* bias, Y* yb, int64_t yrow,
                                                       int64_t YP) {
  using V = typename VT<A>::V;
  V acc[KR][OWB];
  const V b = bias ? vload<A, A>(bias) : V{};
  for (int q = 0; q < KR; ++q)
    for (int o = 0; o < OWB; ++o) acc[q][o] = b;
#pragma GCC unroll 16
  for (int r = 0; r < KH + KR - 1; ++r) {
    const T* xp = xb + r * xrow;
    V w[KR][KW];
#pragma GCC unroll 8
    for (int q = 0; q < KR; ++q)
#pragma GCC unroll 8
      for (int j = 0; j < KW; ++j)
        if (r - q >= 0 && r - q < KH) w[q][j] = vload<A, A>(wb + (r - q) * wrow + j * wstep);
#pragma GCC unroll 32
    for (int p = 0; p < OWB + KW - 1; ++p) {
      const V xv = vload<T, A>(xp + p * step);
#pragma GCC unroll 8
      for (int q = 0; q < KR; ++q)
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) {
          const int o = p - j;
          if (o >= 0 && o < OWB && r - q >= 0 && r - q < KH) acc[q][o] += xv * w[q][j];
        }
    }
  }
  for (int q = 0; q < KR; ++q)
    for (int o = 0; o < OWB; ++o) vstore<Y, A>(yb + q * yrow + o * YP, acc[q][o]);
}

// Output pixels [0, npix) of the KR rows, every channel (C a whole number of vectors):
// xb = the first pixel's window (top kernel row of the first row), yb = its output; npf:
// input rows below the group's to prefetch, a block's pixels of them with the block.
template <class T, class A, class Y, int KR, int OWB, int KH, int KW>
void group_pixels(const T* xb, int64_t step, int64_t xrow, const A* wb, int64_t wstep,
                  int64_t wrow, const A* bias, Y* yb, int64_t yrow, int64_t YP, int64_t C,
                  int64_t npix, int npf) {
  constexpr int64_t L = VT<A>::L;
  auto span = [&](auto owb, int64_t p0) {
    constexpr int B = decltype(owb)::value;
    for (; p0 + B <= npix; p0 += B)
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        for (int q = 0; q < npf; ++q)
          for (int o = 0; o < B; ++o)
            prefetch_line(reinterpret_cast<const char*>(xb + (p0 + o) * step + c0 +
                                                        (KH + KR - 1 + q) * xrow));
        group_block<T, A, Y, KR, B, KH, KW>(xb + p0 * step + c0, step, xrow, wb + c0, wstep, wrow,
                                            bias ? bias + c0 : nullptr, yb + p0 * YP + c0, yrow, YP);
      }
    return p0;
  };
  int64_t p = span(std::integral_constant<int, OWB>{}, 0);
  if (OWB > 4) p = span(std::integral_constant<int, 4>{}, p);
  p = span(std::integral_constant<int, 2>{}, p);
  span(std::integral_constant<int, 1>{}, p);
}

// Output rows per group in direct_rows (1: one row at a time): 3 for 3x3 and 5x5 (blocks
// of 6 and 4 pixels: 18 / 12 accumulators and up to 9 / 15 weight vectors), 2 for 7x7 (6
// pixels, 12 accumulators, 14 weights). Measured against 2-row groups on the same machine
// (N=8, C=128, 56x56): 3x3 0.235 -> 0.209 ms (4 rows of 4 pixels: 0.214), 5x5 0.496 ->
// 0.470; 7x7 in blocks of 4 pixels was slower than 6 (1.06 against 1.02 ms).
// AVX2 (16 registers): 3x3 in pairs of rows, blocks of 4 pixels (8 accumulators, 6 weights;
// use_row_groups, for the AVX-512 shapes, does not cover it). Measured on the Zen 5 capped to
// AVX2 (FASTVIS_CPU_ISA=avx2), C=128, 56x56: N=1 0.059 -> 0.046-0.049 ms; N=8 level within
// that machine's noise (0.45 against 0.42-0.47 ms).
inline int row_group(const Geom& g) {
  if (FV_VEC_BYTES == 64) return use_row_groups(g) ? (g.kh == 7 ? 2 : 3) : 1;
#if defined(__AVX2__)
  if (use_window(g) && g.sh == 1 && g.dh == 1 && g.kh == 3 && g.kw == 3) return 2;
#endif
  return 1;
}

// Output rows oh .. oh + kr - 1 of image n (all with every kernel row inside the image).
template <class T, class A, class Y>
void direct_row_group(const Geom& g, int kr, const T* xn, const A* wpk, const A* bias, Y* yrow,
                      int64_t oh) {
  const int64_t XP = in_pitch(g), YP = out_pitch(g), yrs = g.ow * YP;
  for (int q = 0; q < kr; ++q) direct_row<T, A, Y>(g, xn, wpk, bias, yrow + q * yrs, oh + q, false);
  const int64_t ow_lo = std::min(g.ow, g.pl);
  const int64_t ow_hi = std::max(ow_lo, std::min(g.ow, g.w + g.pl - g.kw + 1));
  if (ow_hi <= ow_lo) return;
  const T* xb = xn + ((oh - g.pt) * g.w + ow_lo - g.pl) * XP;
  const int64_t xrow = g.w * XP, wrow = g.kw * g.cp;
  // The next group's new input rows (those that exist), fetched a slice per block when the
  // input outgrows the caches closest to the cores (N=8, C=128, 56x56, session 25, one
  // process, with / without: 3x3 0.37-0.40 / 0.43-0.49 ms, 5x5 0.63 / 0.80, 7x7 1.21 / 1.49;
  // at N=1, in L2, they cost 3x3 0.036 -> 0.042 ms and are left out).
  const bool pf = g.n * g.h * g.w * XP * static_cast<int64_t>(sizeof(T)) > (int64_t{4} << 20);
  const int npf = pf ? static_cast<int>(std::max<int64_t>(
                           0, std::min<int64_t>(kr, g.h - (oh - g.pt + g.kh + kr - 1))))
                     : 0;
#define FV_GROUP_ARGS \
  xb, XP, xrow, wpk, g.cp, wrow, bias, yrow + ow_lo * YP, yrs, YP, g.c, ow_hi - ow_lo, npf
  // kr comes from row_group, which fixes it per shape and instruction set: 3x3 2 (AVX2) or 3.
  if (g.kh == 3 && kr == 2)
    group_pixels<T, A, Y, 2, 4, 3, 3>(FV_GROUP_ARGS);
  else if (g.kh == 3)
    group_pixels<T, A, Y, 3, 6, 3, 3>(FV_GROUP_ARGS);
  else if (g.kh == 5)
    group_pixels<T, A, Y, 3, 4, 5, 5>(FV_GROUP_ARGS);
  else
    group_pixels<T, A, Y, 2, 6, 7, 7>(FV_GROUP_ARGS);
#undef FV_GROUP_ARGS
}

// k x 1 kernels (use_row_band): output pixel (oh, ow) is the weighted sum of the k input
// pixels of column ow in rows oh - pt .. oh - pt + k - 1, so each output row is a
// per-channel weighted sum of k whole input rows. A band of KR output rows runs over its
// rows' vectors in memory order, NV vectors at a time (xoff / yoff: their offsets in a row,
// woff: their channels' offset in a weight row): each input vector of the band's
// KR + k - 1 rows is loaded once and multiplied into every output row of the band it
// reaches, the weights coming from L1 as memory operands. Loads and stores walk whole rows
// front to back, which the hardware prefetchers stream, and the k rows in use stay in L2.
// (The column window this replaced read each column at a whole-row stride and wrote the
// output column by column: 11x1 at N=8, C=128, 56x56 ran at 3.9 ms, now 1.5-1.9.) Input
// rows outside the image (s outside [s_lo, s_hi)) add nothing and are skipped, so the top
// and bottom rows need no path of their own.
template <class T, class A, class Y, int KR, int NV>
__attribute__((always_inline)) inline void row_band_chunk(int64_t kh, int64_t cp,
                                                          const T* const* xr, int s_lo,
                                                          int s_hi, int nr,
                                                          const int64_t* xoff,
                                                          const int64_t* woff, const A* wpk,
                                                          const A* bias, Y* const* yr,
                                                          const int64_t* yoff) {
  using V = typename VT<A>::V;
  V acc[KR][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const V b = bias ? vload<A, A>(bias + woff[v]) : V{};
#pragma GCC unroll 8
    for (int r = 0; r < KR; ++r) acc[r][v] = b;
  }
  for (int s = s_lo; s < s_hi; ++s) {
    V xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = vload<T, A>(xr[s] + xoff[v]);
#pragma GCC unroll 8
    for (int r = 0; r < KR; ++r) {
      const int64_t i = s - r;  // kernel row of input slot s for output row r
      if (i < 0 || i >= kh) continue;
      const A* wi = wpk + i * cp;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += xv[v] * vload<A, A>(wi + woff[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < KR; ++r) {
    if (r >= nr) break;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore<Y, A>(yr[r] + yoff[v], acc[r][v]);
  }
}

#if FV_VEC_BYTES == 64
// k x 1 bands with the kernel height a compile-time KH (AVX-512's 32 registers): one channel
// vector at a time with its KH weights held in registers, a band of KR output rows swept
// pixel by pixel, PX pixels at once (KH + PX * KR + PX registers: 29 for 11x1). Each input
// vector is loaded once per band and multiplied into the band's rows it reaches. The
// register-window band (row_band_chunk) takes its weights from L1 as memory operands, one
// load per multiply-add, which left it load-bound. Same summation order (bias, then the
// taps in kernel-row order): the same results.
template <class T, class A, class Y, int KR, int KH, int PX>
__attribute__((always_inline)) inline void regw_pixels(const T* const* xr, int s_lo, int s_hi, int nr,
                                                       int64_t off_x, int64_t XP,
                                                       const typename VT<A>::V* wv, typename VT<A>::V bv,
                                                       Y* const* yr, int64_t off_y, int64_t YP) {
  using V = typename VT<A>::V;
  constexpr int NS = KR + KH - 1;
  V acc[PX][KR];
#pragma GCC unroll 16
  for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < PX; ++q) acc[q][r] = bv;
#pragma GCC unroll 40
  for (int s = 0; s < NS; ++s) {
    if (s < s_lo || s >= s_hi) continue;
    V xv[PX];
#pragma GCC unroll 4
    for (int q = 0; q < PX; ++q) xv[q] = vload<T, A>(xr[s] + off_x + q * XP);
#pragma GCC unroll 16
    for (int r = 0; r < KR; ++r) {
      const int i = s - r;
      if (i < 0 || i >= KH) continue;
#pragma GCC unroll 4
      for (int q = 0; q < PX; ++q) acc[q][r] += xv[q] * wv[i];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < KR; ++r) {
    if (r >= nr) break;
#pragma GCC unroll 4
    for (int q = 0; q < PX; ++q) vstore<Y, A>(yr[r] + off_y + q * YP, acc[q][r]);
  }
}

template <class T, class A, class Y, int KH>
void row_band_regw(const Geom& g, const T* xn, const A* wpk, const A* bias, Y* yn, int64_t oh,
                   int64_t nrows) {
  using V = typename VT<A>::V;
  constexpr int KR = 8, PX = 2, NS = KR + KH - 1;
  constexpr int64_t L = VT<A>::L;
  const int64_t XP = in_pitch(g), YP = out_pitch(g), m = g.c / L, W = g.ow;
  const T* xr[NS];
  Y* yr[KR];
  for (int64_t b0 = oh; b0 < oh + nrows; b0 += KR) {
    const int nr = static_cast<int>(std::min<int64_t>(KR, oh + nrows - b0));
    const int64_t ih0 = b0 - g.pt;  // the input row of band slot 0
    const int64_t ns = nr + KH - 1;
    const int s_lo = static_cast<int>(std::min(ns, std::max<int64_t>(0, -ih0)));
    const int s_hi = static_cast<int>(std::max<int64_t>(s_lo, std::min(ns, g.h - ih0)));
    for (int s = 0; s < NS; ++s) xr[s] = (s >= s_lo && s < s_hi) ? xn + (ih0 + s) * g.w * XP : xn;
    for (int r = 0; r < KR; ++r) yr[r] = yn + (b0 + std::min(r, nr - 1)) * W * YP;
    for (int64_t cv = 0; cv < m; ++cv) {
      V wv[KH];
#pragma GCC unroll 16
      for (int i = 0; i < KH; ++i) wv[i] = vload<A, A>(wpk + i * g.cp + cv * L);
      const V bv = bias ? vload<A, A>(bias + cv * L) : V{};
      int64_t p = 0;
      for (; p + PX <= W; p += PX)
        regw_pixels<T, A, Y, KR, KH, PX>(xr, s_lo, s_hi, nr, p * XP + cv * L, XP, wv, bv, yr,
                                         p * YP + cv * L, YP);
      for (; p < W; ++p)
        regw_pixels<T, A, Y, KR, KH, 1>(xr, s_lo, s_hi, nr, p * XP + cv * L, XP, wv, bv, yr,
                                        p * YP + cv * L, YP);
    }
  }
}

// row_band_regw for the kernel heights where it measured faster, when a band's input and
// output rows (KR + KH - 1 and KR rows of the whole width) fit L2; else false. Against
// row_band_chunk, C=128, 56x56, two threads, one process alternating (medians of 15, ms),
// forward / input gradient: N=1 7x1 0.056 -> 0.048 / 0.058 -> 0.052, 9x1 0.059 -> 0.051 /
// 0.063 -> 0.056, 11x1 0.064-0.065 -> 0.055 / 0.067-0.068 -> 0.059; N=8 7x1 0.394 -> 0.381,
// 9x1 0.396 -> 0.382, 11x1 0.47-0.50 -> 0.37-0.42 / 0.48-0.49 -> 0.44-0.45. 5x1 was slower
// at N=8 (0.354 -> 0.418) and 13x1 (31 of the 32 registers) level: they keep the window.
template <class T, class A, class Y>
bool row_band_regw_any(const Geom& g, const T* xn, const A* wpk, const A* bias, Y* yn, int64_t oh,
                       int64_t nrows) {
  const int64_t row_bytes = g.w * in_pitch(g) * static_cast<int64_t>(sizeof(T));
  if ((8 + g.kh - 1 + 8) * row_bytes > (int64_t{768} << 10)) return false;
  switch (g.kh) {
    case 7: row_band_regw<T, A, Y, 7>(g, xn, wpk, bias, yn, oh, nrows); return true;
    case 9: row_band_regw<T, A, Y, 9>(g, xn, wpk, bias, yn, oh, nrows); return true;
    case 11: row_band_regw<T, A, Y, 11>(g, xn, wpk, bias, yn, oh, nrows); return true;
    default: return false;
  }
}
#endif

// Output rows [oh, oh + nrows) of one image (xn, yn: its input and output).
template <class T, class A, class Y>
void row_band_rows(const Geom& g, const T* xn, const A* wpk, const A* bias, Y* yn, int64_t oh,
                   int64_t nrows) {
#if FV_VEC_BYTES == 64
  if (row_band_regw_any<T, A, Y>(g, xn, wpk, bias, yn, oh, nrows)) return;
#endif
  // Rows per band: 24 (AVX-512) or 16 (AVX2, baseline) accumulators. N=8, C=128, 56x56,
  // 11x1, minimum of 31: 6 rows 1.49-1.65 ms, 4 rows 1.71-1.80, 8 rows x 2 vectors 1.82-2.05;
  // on the AVX2 path 4 rows 2.39 ms, 2 rows 3.12.
  constexpr int KR = FV_VEC_BYTES == 64 ? 6 : 4;
  constexpr int NV = 4;
  constexpr int64_t L = VT<A>::L;
  const int64_t XP = in_pitch(g), YP = out_pitch(g), m = g.c / L, units = g.ow * m;
  const T* xr[64 + KR];  // kh <= 63: at most KR + 62 input rows per band
  Y* yr[KR];
  int64_t xoff[NV], yoff[NV], woff[NV];
  auto offsets = [&](int64_t u0, int nv) {
    for (int v = 0; v < nv; ++v) {
      const int64_t p = (u0 + v) / m, cv = (u0 + v) % m;
      xoff[v] = p * XP + cv * L;
      yoff[v] = p * YP + cv * L;
      woff[v] = cv * L;
    }
  };
  // Column strips: a band reads KR + kh - 1 input rows; for tall kernels whole rows of
  // those would not stay in L2 (31x1 at C = 128, 56 wide: 36 rows, 1 MB) and every band
  // would read its rows again from L3. Bands run down one strip of columns whose rows fit
  // ~384 KB, then the next strip.
  const int64_t band_rows = KR + g.kh - 1, unit_bytes = L * static_cast<int64_t>(sizeof(T));
  const int64_t strip =
      std::max<int64_t>(NV, (384 * 1024 / (band_rows * unit_bytes)) / NV * NV);
  for (int64_t u0 = 0; u0 < units; u0 += strip) {
    const int64_t u1 = std::min(units, u0 + strip);
    for (int64_t b0 = oh; b0 < oh + nrows; b0 += KR) {
      const int nr = static_cast<int>(std::min<int64_t>(KR, oh + nrows - b0));
      const int64_t ih0 = b0 - g.pt;  // the input row of band slot 0
      const int64_t ns = nr + g.kh - 1;
      const int s_lo = static_cast<int>(std::min(ns, std::max<int64_t>(0, -ih0)));
      const int s_hi = static_cast<int>(std::max<int64_t>(s_lo, std::min(ns, g.h - ih0)));
      for (int s = s_lo; s < s_hi; ++s) xr[s] = xn + (ih0 + s) * g.w * XP;
      for (int r = 0; r < KR; ++r) yr[r] = yn + (b0 + std::min(r, nr - 1)) * g.ow * YP;
      int64_t u = u0;
      for (; u + NV <= u1; u += NV) {
        offsets(u, NV);
        row_band_chunk<T, A, Y, KR, NV>(g.kh, g.cp, xr, s_lo, s_hi, nr, xoff, woff, wpk, bias,
                                        yr, yoff);
      }
      for (; u < u1; ++u) {
        offsets(u, 1);
        row_band_chunk<T, A, Y, KR, 1>(g.kh, g.cp, xr, s_lo, s_hi, nr, xoff, woff, wpk, bias, yr,
                                       yoff);
      }
    }
  }
}

// Rows [r0, r1) of the flattened (image, output row) index, in row bands.
template <class T, class A, class Y>
void row_band_range(const Geom& g, const T* x, const A* wpk, const A* bias, Y* y, int64_t r0,
                    int64_t r1) {
  const int64_t XP = in_pitch(g), YP = out_pitch(g);
  for (int64_t r = r0; r < r1;) {
    const int64_t n = r / g.oh, oh = r % g.oh, nrows = std::min(r1 - r, g.oh - oh);
    row_band_rows<T, A, Y>(g, x + n * g.h * g.w * XP, wpk, bias, y + n * g.oh * g.ow * YP, oh,
                           nrows);
    r += nrows;
  }
}

// Rows [r0, r1) of the flattened (image, output row) index.
template <class T, class A, class Y>
void direct_rows(const Geom& g, const T* x, const A* wpk, const A* bias, Y* y, int64_t r0,
                 int64_t r1) {
  const int64_t XP = in_pitch(g), YP = out_pitch(g);
  const int kr = row_group(g);
  // Output rows whose kernel rows are all inside the image: [oh_in0, oh_in1). A group needs
  // kr of them in this call's range and image; other rows (the image's top and bottom
  // rows, a range's last rows) run one at a time. Both orders sum the taps alike (kernel
  // rows, then columns, in order), so the result does not depend on the grouping.
  const int64_t oh_in0 = g.pt, oh_in1 = g.h + g.pt - g.kh + 1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.oh, oh = r % g.oh;
    if (kr > 1 && r + kr <= r1 && oh + kr <= g.oh && oh >= oh_in0 && oh + kr <= oh_in1) {
      direct_row_group<T, A, Y>(g, kr, x + n * g.h * g.w * XP, wpk, bias, y + r * g.ow * YP, oh);
      r += kr - 1;
      continue;
    }
    direct_row<T, A, Y>(g, x + n * g.h * g.w * XP, wpk, bias, y + r * g.ow * YP, oh);
  }
}

template <class T, class A, class Y = T>
void forward_t(const Geom& g, const T* x, const A* wpk, const A* bias, Y* y, A* bufs, int nbufs,
               bool balance = true) {
  const bool band = use_row_band(g, sizeof(A));
  if (band || use_direct(g, sizeof(A))) {
    auto rows = [&](int64_t r0, int64_t r1) {
      if (band)
        row_band_range<T, A, Y>(g, x, wpk, bias, y, r0, r1);
      else
        direct_rows<T, A, Y>(g, x, wpk, bias, y, r0, r1);
    };
    if (!balance) return rows(0, g.n * g.oh);
    // Rows per chunk: at least ~32K multiply-adds, so small problems stay on one thread.
    const int64_t row_macs = std::max<int64_t>(1, g.ow * g.c * g.kh * g.kw);
    parallel_for(g.n * g.oh, std::max<int64_t>(1, 32768 / row_macs), rows);
    return;
  }
  const FwdPlan pl = fwd_plan(g, sizeof(A), balance);
  const int64_t items = g.n * pl.ntiles * pl.ngroups;
  auto body = [&](int slot, int64_t begin, int64_t end) {
    A* buf = bufs + std::min(slot, nbufs - 1) * pl.buf_elems;
    PackedRows held;
    for (int64_t it = begin; it < end; ++it) {
      // Tiles of one channel block follow each other, so each packs only the rows its
      // predecessor did not (fwd_item's `held`); with the channel block fastest, a
      // large kernel's one-row tiles repacked every row of their window each time.
      const int64_t tile = it % pl.ntiles, t = it / pl.ntiles, grp = t % pl.ngroups,
                    n = t / pl.ngroups;
      const int64_t b0 = grp * pl.gb, b1 = std::min(pl.nb, b0 + pl.gb);
      const int64_t oh0 = tile * pl.rt, oh1 = std::min(g.oh, oh0 + pl.rt);
      fwd_item<T, A, Y>(g, pl, x, wpk, bias, y, buf, held, n, oh0, oh1, b0, b1);
    }
  };
  if (balance)
    parallel_for_indexed(items, 1, body);
  else
    body(0, 0, items);  // serial: the caller owns the one buffer
}

// Serial: output rows [r0, r1) of image n, every channel block, in tiles of the serial plan.
template <class T, class A>
void forward_rows_t(const Geom& g, const T* x, const A* wpk, const A* bias, T* y, A* buf,
                    int64_t n, int64_t r0, int64_t r1) {
  if (use_row_band(g, sizeof(A)))
    return row_band_range<T, A, T>(g, x, wpk, bias, y, n * g.oh + r0, n * g.oh + r1);
  if (use_direct(g, sizeof(A)))
    return direct_rows<T, A, T>(g, x, wpk, bias, y, n * g.oh + r0, n * g.oh + r1);
  const FwdPlan pl = fwd_plan(g, sizeof(A), false);
  PackedRows held;
  for (int64_t grp = 0; grp < pl.ngroups; ++grp) {  // channel block outer: as forward_t
    const int64_t b0 = grp * pl.gb, b1 = std::min(pl.nb, b0 + pl.gb);
    for (int64_t oh0 = r0; oh0 < r1; oh0 += pl.rt)
      fwd_item<T, A, T>(g, pl, x, wpk, bias, y, buf, held, n, oh0, std::min(r1, oh0 + pl.rt), b0, b1);
  }
}

// ------------------------------------------------------------------ backward input (gather)

template <class T, class A, int NV>
void bwdin_row(const Geom& g, const T* gyn, const A* wpk, T* gxrow, int64_t ih, int64_t c0,
               const int64_t* ti, const int64_t* to, int nt) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L;
  const int64_t YP = out_pitch(g), XP = in_pitch(g);
  for (int64_t iw = 0; iw < g.w; ++iw) {
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V{};
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t u = iw + g.pl - j * g.dw;
      if (u < 0 || u % g.sw != 0) continue;
      const int64_t ow = u / g.sw;
      if (ow >= g.ow) continue;
      for (int p = 0; p < nt; ++p) {
        const A* wp = wpk + (ti[p] * g.kw + j) * g.cp + c0;
        const T* gp = gyn + (to[p] * g.ow + ow) * YP + c0;
        for (int v = 0; v < NV; ++v) acc[v] += vload<T, A>(gp + v * L) * vload<A, A>(wp + v * L);
      }
    }
    for (int v = 0; v < NV; ++v) vstore<T, A>(gxrow + iw * XP + c0 + v * L, acc[v]);
  }
}

template <class T, class A>
void bwdin_row_scalar(const Geom& g, const T* gyn, const A* wpk, T* gxrow, int64_t c0, int64_t cn,
                      const int64_t* ti, const int64_t* to, int nt) {
  const int64_t YP = out_pitch(g), XP = in_pitch(g);
  for (int64_t iw = 0; iw < g.w; ++iw) {
    for (int64_t c = c0; c < c0 + cn; ++c) {
      A acc = 0;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t u = iw + g.pl - j * g.dw;
        if (u < 0 || u % g.sw != 0) continue;
        const int64_t ow = u / g.sw;
        if (ow >= g.ow) continue;
        for (int p = 0; p < nt; ++p)
          acc += sload<T, A>(gyn + (to[p] * g.ow + ow) * YP + c) * wpk[(ti[p] * g.kw + j) * g.cp + c];
      }
      sstore<T, A>(gxrow + iw * XP + c, acc);
    }
  }
}

template <class T, class A>
void backward_input_t(const Geom& g, const T* gy, const A* wpk, T* gx) {
  const auto blocks = channel_blocks<A>(g.c);
  const int64_t nb = static_cast<int64_t>(blocks.size());
  parallel_for(g.n * nb * g.h, 1, [&](int64_t begin, int64_t end) {
    int64_t ti[64], to[64];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t ih = it % g.h, t = it / g.h, bi = t % nb, n = t / nb;
      int nt = 0;  // kernel rows i hitting this input row, and their output rows
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t u = ih + g.pt - i * g.dh;
        if (u < 0 || u % g.sh != 0 || u / g.sh >= g.oh) continue;
        ti[nt] = i;
        to[nt] = u / g.sh;
        ++nt;
      }
      const T* gyn = gy + n * g.oh * g.ow * out_pitch(g);
      T* gxrow = gx + (n * g.h + ih) * g.w * in_pitch(g);
      const auto& b = blocks[bi];
      if (b.second == 2)
        bwdin_row<T, A, 2>(g, gyn, wpk, gxrow, ih, b.first, ti, to, nt);
      else if (b.second == 1)
        bwdin_row<T, A, 1>(g, gyn, wpk, gxrow, ih, b.first, ti, to, nt);
      else
        bwdin_row_scalar<T, A>(g, gyn, wpk, gxrow, b.first, -b.second, ti, to, nt);
    }
  });
}

// ------------------------------------------------------------------ weight gradient

// JB taps x one channel block (two vectors) accumulated over outputs [lo, hi) of one
// packed row. off[t]: element offset in the packed input tile of tap t's pixel for
// ow = 0 (may be negative); part[t]: tap t's partial sums for this channel block.
template <class A, int JB>
inline void wg_taps(const A* gyrow, const A* xt, const int64_t* off, A* const* part, int64_t lo,
                    int64_t hi, int64_t sps) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L, CB = 2 * L;
  if (lo >= hi) return;
  V acc[JB][2];
  for (int t = 0; t < JB; ++t) acc[t][0] = acc[t][1] = V{};
  for (int64_t ow = lo; ow < hi; ++ow) {
    const V g0 = vload<A, A>(gyrow + ow * CB), g1 = vload<A, A>(gyrow + ow * CB + L);
    const A* xb = xt + ow * sps;
    for (int t = 0; t < JB; ++t) {
      acc[t][0] += vload<A, A>(xb + off[t]) * g0;
      acc[t][1] += vload<A, A>(xb + off[t] + L) * g1;
    }
  }
  for (int t = 0; t < JB; ++t) {
    vstore<A, A>(part[t], vload<A, A>(part[t]) + acc[t][0]);
    vstore<A, A>(part[t] + L, vload<A, A>(part[t] + L) + acc[t][1]);
  }
}

template <class A>
inline void wg_group(int r, const A* gyrow, const A* xt, const int64_t* off, A* const* part,
                     int64_t lo, int64_t hi, int64_t sps) {
  switch (r) {
#define FV_WG_CASE(k) \
  case k: wg_taps<A, k>(gyrow, xt, off, part, lo, hi, sps); break;
    FV_WG_CASE(1) FV_WG_CASE(2) FV_WG_CASE(3) FV_WG_CASE(4) FV_WG_CASE(5) FV_WG_CASE(6)
#undef FV_WG_CASE
    default: break;
  }
}

// One output row: its taps in (i, j) order, six at a time, each group sweeping the
// whole row (the packed tile holds the padding as zeros). Input row ih sits at packed
// row row_slot(ih, ih_base, ring).
template <class A>
void wg_row(const Geom& g, const A* gyrow, const A* xt, int64_t ih_base, int64_t ring,
            A* partial, int64_t oh, int64_t c0) {
  constexpr int JB = 6, CB = 2 * VT<A>::L;
  const int64_t wp = packed_width(g), sps = g.sw * CB, ih0 = oh * g.sh - g.pt;
  int64_t i_lo, i_hi;
  tap_range(ih0, g.dh, g.kh, g.h, i_lo, i_hi);
  int64_t off[JB];
  A* part[JB];
  int nt = 0;
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const int64_t r = row_slot(ih0 + i * g.dh, ih_base, ring);
    for (int64_t j = 0; j < g.kw; ++j) {
      off[nt] = (r * wp + j * g.dw) * CB;
      part[nt] = partial + (i * g.kw + j) * g.cp + c0;
      if (++nt == JB) {
        wg_taps<A, JB>(gyrow, xt, off, part, 0, g.ow, sps);
        nt = 0;
      }
    }
  }
  if (nt) wg_group<A>(nt, gyrow, xt, off, part, 0, g.ow, sps);
}

// Stride 1, dilation 1 along the row: taps j0 .. j0 + KC - 1 of one kernel row and one
// vector of channels, accumulated over the n_out outputs of a packed row. Blocks of B
// outputs keep their grad_y vectors in registers; each input vector then serves every
// (output, tap) pair of the block that reads it (B + KC - 1 input loads for B * KC
// multiply-adds, against one load per multiply-add in wg_taps). gy, xr: the packed
// grad_y row and the packed input row at tap j0 (pixels CB apart); part: tap j0's
// partial sums (taps pstep apart).
template <class A, int KC, int B>
inline void wg_window(const A* gy, const A* xr, int64_t n_out, A* part, int64_t pstep) {
  using V = typename VT<A>::V;
  constexpr int CB = 2 * VT<A>::L;
  V acc[KC];
  for (int j = 0; j < KC; ++j) acc[j] = V{};
  int64_t o0 = 0;
  for (; o0 + B <= n_out; o0 += B) {
    V gv[B];
#pragma GCC unroll 16
    for (int o = 0; o < B; ++o) gv[o] = vload<A, A>(gy + (o0 + o) * CB);
    const A* xp = xr + o0 * CB;
#pragma GCC unroll 32
    for (int p = 0; p < B + KC - 1; ++p) {
      const V xv = vload<A, A>(xp + p * CB);
#pragma GCC unroll 16
      for (int j = 0; j < KC; ++j) {
        const int o = p - j;
        if (o >= 0 && o < B) acc[j] += gv[o] * xv;
      }
    }
  }
  for (; o0 < n_out; ++o0) {
    const V gv = vload<A, A>(gy + o0 * CB);
#pragma GCC unroll 16
    for (int j = 0; j < KC; ++j) acc[j] += gv * vload<A, A>(xr + (o0 + j) * CB);
  }
  for (int j = 0; j < KC; ++j) vstore<A, A>(part + j * pstep, vload<A, A>(part + j * pstep) + acc[j]);
}

// wg_row for stride 1 and dilation 1 along the row: every kernel row in chunks of at
// most 7 taps, each chunk one wg_window sweep per channel vector.
template <class A>
void wg_row_window(const Geom& g, const A* gyrow, const A* xt, int64_t ih_base, int64_t ring,
                   A* partial, int64_t oh, int64_t c0) {
  constexpr int L = VT<A>::L, CB = 2 * L, B = 7;
  const int64_t wp = packed_width(g), ih0 = oh * g.sh - g.pt;
  int64_t i_lo, i_hi;
  tap_range(ih0, g.dh, g.kh, g.h, i_lo, i_hi);
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const A* xrow = xt + row_slot(ih0 + i * g.dh, ih_base, ring) * wp * CB;
    for (int64_t j0 = 0; j0 < g.kw; j0 += 7) {
      const int64_t kc = std::min<int64_t>(7, g.kw - j0);
      for (int v = 0; v < 2; ++v) {
        const A* gy = gyrow + v * L;
        const A* xr = xrow + j0 * CB + v * L;
        A* part = partial + (i * g.kw + j0) * g.cp + c0 + v * L;
        switch (kc) {
#define FV_WGW_CASE(k) \
  case k: wg_window<A, k, B>(gy, xr, g.ow, part, g.cp); break;
          FV_WGW_CASE(1) FV_WGW_CASE(2) FV_WGW_CASE(3) FV_WGW_CASE(4) FV_WGW_CASE(5)
          FV_WGW_CASE(6) FV_WGW_CASE(7)
#undef FV_WGW_CASE
          default: break;
        }
      }
    }
  }
}

// The weight gradient in row order (use_row_wgrad: k x 1 bands, and kernels up to 5x5 at
// stride 1 and dilation 1). Tap (i, j)'s gradient is, per channel, the sum over output
// pixels of grad_y(oh, ow) * x(oh - pt + i, ow - pl + j). A band of KR grad_y rows runs over
// its rows in memory order, one vector at a time (unit u: pixel u / m, channel vector u % m),
// as the forward's row bands do: per unit it loads the KR grad_y vectors and, for each of
// the KR + TI - 1 input rows the band's taps [i0, i0 + TI) reach, the KW input vectors of
// the same channels at pixels ow - pl .. ow - pl + KW - 1, and adds the KR * TI * KW
// products into the accumulators of those taps of that channel vector, which live in the
// row chunk's partial (kh x kw x C accumulators: L1) and are loaded and stored per unit.
// Input pixels left or right of the row add nothing (edge units check each column); rows
// outside the image (and grad_y rows past the band) point at a zero row. (The k x 1 path
// this started from replaced a column walk that read one vector per pixel down each
// column of a chunk: 11x1 at N=8, C=128, 56x56 took 1.9-2.7 ms, then 0.97.)
template <class T, class A, int KR, int TI, int KW>
void wg_rows_units(const T* const* xr, const T* const* gr, int64_t u0, int64_t u1, int64_t m,
                   int64_t XP, int64_t YP, int64_t cp, int nt, int64_t pl, int64_t w, A* part,
                   A* pbias) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  int64_t p = u0 / m, cv = u0 % m;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t q0 = p - pl;  // the input pixel of kernel column 0
    const int64_t xo = q0 * XP + cv * L, go = p * YP + cv * L, wo = cv * L;
    V gv[KR];
#pragma GCC unroll 8
    for (int r = 0; r < KR; ++r) gv[r] = vload<T, A>(gr[r] + go);
    V acc[TI][KW];
#pragma GCC unroll 16
    for (int i = 0; i < TI; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < KW; ++j)
        acc[i][j] = i < nt ? vload<A, A>(part + (i * KW + j) * cp + wo) : V{};
    if (KW == 1 || (q0 >= 0 && q0 + KW <= w)) {  // k x 1: pl is 0, every pixel inside
#pragma GCC unroll 32
      for (int s = 0; s < KR + TI - 1; ++s) {
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) {
          const V xv = vload<T, A>(xr[s] + (xo + j * XP));
#pragma GCC unroll 8
          for (int r = 0; r < KR; ++r) {
            const int i = s - r;
            if (i >= 0 && i < TI) acc[i][j] += gv[r] * xv;
          }
        }
      }
    } else if constexpr (KW > 1) {  // a pixel whose kernel columns pass the row's ends
      for (int s = 0; s < KR + TI - 1; ++s) {
        for (int j = 0; j < KW; ++j) {
          if (q0 + j < 0 || q0 + j >= w) continue;
          const V xv = vload<T, A>(xr[s] + (xo + j * XP));
#pragma GCC unroll 8
          for (int r = 0; r < KR; ++r) {
            const int i = s - r;
            if (i >= 0 && i < TI) acc[i][j] += gv[r] * xv;
          }
        }
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TI; ++i)
      if (i < nt)
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) vstore<A, A>(part + (i * KW + j) * cp + wo, acc[i][j]);
    if (pbias) {
      V b = vload<A, A>(pbias + wo);
#pragma GCC unroll 8
      for (int r = 0; r < KR; ++r) b += gv[r];
      vstore<A, A>(pbias + wo, b);
    }
    if (++cv == m) {
      cv = 0;
      ++p;
    }
  }
}

// grad_y rows per band, kernel rows per block of a k x 1 band (TI accumulators next to KR
// grad_y vectors), and the most accumulators (TI * kw) of a block of a wider kernel.
constexpr int kWgBandRows = FV_VEC_BYTES == 64 ? 6 : 4;
constexpr int kWgBandTaps = FV_VEC_BYTES == 64 ? 12 : 7;
constexpr int kWgRowsAcc = FV_VEC_BYTES == 64 ? 24 : 10;
constexpr int kWgRowsMaxTi = 4;  // kernel rows per block of a kernel 2..5 wide
constexpr int kWgSlots = kWgBandRows + (kWgBandTaps > kWgRowsMaxTi ? kWgBandTaps : kWgRowsMaxTi) - 1;

// Kernel rows per block for a kernel kw wide: at most kWgRowsAcc accumulators (and
// kWgRowsMaxTi rows) a block, blocks balanced (a block's work is TI rows whatever its count).
inline int64_t wg_rows_ti(int64_t kh, int64_t kw) {
  const int64_t tmax = kw == 1 ? kWgBandTaps : std::max<int64_t>(1, std::min<int64_t>(kWgRowsMaxTi, kWgRowsAcc / kw));
  const int64_t nblk = (kh + tmax - 1) / tmax;
  return (kh + nblk - 1) / nblk;
}

template <class T, class A, int KR, int KW>
void wg_rows_block(int64_t ti, const T* const* xr, const T* const* gr, int64_t u0, int64_t u1,
                   int64_t m, int64_t XP, int64_t YP, int64_t cp, int nt, int64_t pl, int64_t w,
                   A* part, A* pbias) {
#define FV_WG_ROWS(TI) \
  wg_rows_units<T, A, KR, TI, KW>(xr, gr, u0, u1, m, XP, YP, cp, nt, pl, w, part, pbias)
  if constexpr (KW == 1) {
    if (ti <= 2) FV_WG_ROWS(2);
    else if (ti <= 3) FV_WG_ROWS(3);
    else if (ti <= 5) FV_WG_ROWS(5);
    else if (ti <= 7) FV_WG_ROWS(7);
#if FV_VEC_BYTES == 64
    else if (ti <= 9) FV_WG_ROWS(9);
    else if (ti <= 11) FV_WG_ROWS(11);
    else FV_WG_ROWS(12);
#endif
  } else {
    constexpr int tmax = kWgRowsAcc / KW < kWgRowsMaxTi ? (kWgRowsAcc / KW > 1 ? kWgRowsAcc / KW : 1)
                                                        : kWgRowsMaxTi;
    if (ti <= 1 || tmax == 1) FV_WG_ROWS(1);
    else if constexpr (tmax >= 2) {
      if (ti <= 2 || tmax == 2) FV_WG_ROWS(2);
      else if constexpr (tmax >= 3) {
        if (ti <= 3 || tmax == 3) FV_WG_ROWS(3);
        else FV_WG_ROWS(4);
      }
    }
  }
#undef FV_WG_ROWS
}

// Rows [r0, r1) of the flattened (image, output row) index, all channels: adds the
// gradient of every tap into part (taps g.cp apart, k = i * kw + j) and the bias gradient
// into pbias. zero: a zero row of max(w * XP, ow * YP) elements. Blocks of kernel rows
// (wg_rows_ti) run one after another on the same band, whose rows are then in L1 / L2.
// The units of a row run in strips whose band rows fit ~384 KB, so the rows a band shares
// with the next stay in L2.
template <class T, class A>
void wg_rows(const Geom& g, const T* gy, const T* x, int64_t r0, int64_t r1, const T* zero,
             A* part, A* pbias) {
  constexpr int KR = kWgBandRows;
  constexpr int64_t L = VT<A>::L;
  const int64_t XP = in_pitch(g), YP = out_pitch(g), m = g.c / L, units = g.ow * m;
  const int64_t ti = wg_rows_ti(g.kh, g.kw), nblk = (g.kh + ti - 1) / ti;
  const int64_t band_rows = 2 * KR + ti - 1, unit_bytes = L * static_cast<int64_t>(sizeof(T));
  const int64_t strip = std::max<int64_t>(1, 384 * 1024 / (band_rows * unit_bytes));
  const T* xr[kWgSlots];
  const T* gr[KR];
  for (int64_t r = r0; r < r1;) {
    const int64_t n = r / g.oh, oh = r % g.oh, nrows = std::min(r1 - r, g.oh - oh);
    const T* xn = x + n * g.h * g.w * XP;
    const T* gn = gy + n * g.oh * g.ow * YP;
    for (int64_t u0 = 0; u0 < units; u0 += strip) {
      const int64_t u1 = std::min(units, u0 + strip);
      for (int64_t b0 = oh; b0 < oh + nrows; b0 += KR) {
        const int64_t nr = std::min<int64_t>(KR, oh + nrows - b0);
        for (int q = 0; q < KR; ++q) gr[q] = q < nr ? gn + (b0 + q) * g.ow * YP : zero;
        for (int64_t b = 0; b < nblk; ++b) {
          const int64_t i0 = b * ti;
          if (i0 >= g.kh) break;
          const int nt = static_cast<int>(std::min(g.kh, i0 + ti) - i0);
          const int64_t ih0 = b0 - g.pt + i0;  // the input row of slot 0
          // Every slot: the block's TI (the dispatch) may exceed ti; the rows of the
          // extra kernel rows are read and their products dropped (nt).
          for (int q = 0; q < kWgSlots; ++q) {
            const int64_t ih = ih0 + q;
            xr[q] = ih >= 0 && ih < g.h ? xn + ih * g.w * XP : zero;
          }
          A* pt = part + i0 * g.kw * g.cp;
          A* pb = b == 0 ? pbias : nullptr;
#define FV_WG_KW(KW) \
  wg_rows_block<T, A, KR, KW>(ti, xr, gr, u0, u1, m, XP, YP, g.cp, nt, g.pl, g.w, pt, pb)
          switch (g.kw) {
            case 1: FV_WG_KW(1); break;
            case 2: FV_WG_KW(2); break;
            case 3: FV_WG_KW(3); break;
            case 4: FV_WG_KW(4); break;
            default: FV_WG_KW(5); break;  // use_row_wgrad: kw <= 5
          }
#undef FV_WG_KW
        }
      }
    }
    r += nrows;
  }
}

template <class T, class A>
void backward_weight_t(const Geom& g, const WgradPlan& plan, const T* gy, const T* x, A* partial,
                       A* bufs, int nbufs) {
  using V = typename VT<A>::V;
  constexpr int L = VT<A>::L, CB = 2 * L;
  const int64_t nb = (g.c + CB - 1) / CB;
  const int64_t R = g.n * g.oh, RC = plan.row_chunks, KK = g.kh * g.kw;
  // grad_y rows viewed as an image packed with a 1x1 kernel and no padding.
  Geom gg = g;
  gg.h = g.oh;
  gg.w = g.ow;
  gg.kh = gg.kw = gg.sh = gg.sw = gg.dh = gg.dw = 1;
  gg.pt = gg.pl = 0;
  gg.xpitch = out_pitch(g);
  if (use_row_wgrad(g, sizeof(A))) {
    // Rows in place (wg_rows), a row chunk (all channels) per item; the thread's buffer
    // holds the zero row.
    parallel_for_indexed(RC, 1, [&](int slot, int64_t begin, int64_t end) {
      A* buf = bufs + std::min(slot, nbufs - 1) * (plan.x_elems + plan.gy_elems);
      std::memset(buf, 0, plan.x_elems * sizeof(A));
      const T* zero = reinterpret_cast<const T*>(buf);
      for (int64_t rc = begin; rc < end; ++rc) {
        A* part = partial + rc * plan.partial_elems;
        std::fill(part, part + plan.partial_elems, A(0));
        wg_rows<T, A>(g, gy, x, rc * R / RC, (rc + 1) * R / RC, zero, part, part + KK * g.cp);
      }
    });
    return;
  }
  // The input tile's rows sit in a ring of `ring` slots (row_slot), so a tile packs only
  // the rows the previous tile of the item did not: a 31x31 kernel's one-row tiles
  // otherwise repacked all 31 rows of their window each.
  const int64_t ring = tile_rows_in(g, plan.rt);
  parallel_for_indexed(nb * RC, 1, [&](int slot, int64_t begin, int64_t end) {
    A* xbuf = bufs + std::min(slot, nbufs - 1) * (plan.x_elems + plan.gy_elems);
    A* gbuf = xbuf + plan.x_elems;
    for (int64_t it = begin; it < end; ++it) {
      int64_t held_n = -1, held_hi = 0;  // the ring holds rows [.., held_hi) of image held_n
      const int64_t bi = it % nb, rc = it / nb;  // a chunk's channel blocks back to back
      const int64_t c0 = bi * CB, cw = std::min<int64_t>(CB, g.c - c0);
      A* part = partial + rc * plan.partial_elems;
      for (int64_t k = 0; k < KK; ++k) std::fill(part + k * g.cp + c0, part + k * g.cp + c0 + CB, A(0));
      A* pbias = part + KK * g.cp + c0;
      V bacc[2] = {V{}, V{}};
      const int64_t r1 = (rc + 1) * R / RC;
      for (int64_t r = rc * R / RC; r < r1;) {
        const int64_t n = r / g.oh, oh0 = r % g.oh;
        const int64_t oh1 = std::min({g.oh, oh0 + plan.rt, oh0 + (r1 - r)});
        const int64_t ih_lo = std::max<int64_t>(0, oh0 * g.sh - g.pt);
        const int64_t ih_hi =
            std::min<int64_t>(g.h, (oh1 - 1) * g.sh - g.pt + (g.kh - 1) * g.dh + 1);
        if (ih_hi > ih_lo) {
          // Tiles move down the image, so rows below held_hi are in the ring and those
          // from it overwrite only slots of rows above ih_lo (ih_hi - ih_lo <= ring).
          const bool same = held_n == n;
          const int64_t from = same ? std::min(ih_hi, std::max(ih_lo, held_hi)) : ih_lo;
          if (from < ih_hi)
            pack_rows<T, A>(g, x + n * g.h * g.w * in_pitch(g), from, ih_hi, c0, cw, xbuf, ring);
          held_hi = same ? std::max(held_hi, ih_hi) : ih_hi;
          held_n = n;
        }
        pack_rows<T, A>(gg, gy + n * g.oh * g.ow * out_pitch(g), oh0, oh1, c0, cw, gbuf);
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const A* gyrow = gbuf + (oh - oh0) * g.ow * CB;
          if (use_window(g))
            wg_row_window<A>(g, gyrow, xbuf, ih_lo, ring, part, oh, c0);
          else
            wg_row<A>(g, gyrow, xbuf, ih_lo, ring, part, oh, c0);
          for (int64_t ow = 0; ow < g.ow; ++ow) {
            bacc[0] += vload<A, A>(gyrow + ow * CB);
            bacc[1] += vload<A, A>(gyrow + ow * CB + L);
          }
        }
        r += oh1 - oh0;
      }
      vstore<A, A>(pbias, bacc[0]);
      vstore<A, A>(pbias + L, bacc[1]);
    }
  });
}

}  // namespace

void forward(DType dt, const Geom& g, const void* x, const void* wpk, const void* bias, void* y,
             void* bufs, int nbufs) {
  switch (dt) {
    case DType::Float32:
      forward_t<float, float>(g, static_cast<const float*>(x), static_cast<const float*>(wpk),
                              static_cast<const float*>(bias), static_cast<float*>(y),
                              static_cast<float*>(bufs), nbufs);
      break;
    case DType::Float64:
      forward_t<double, double>(g, static_cast<const double*>(x), static_cast<const double*>(wpk),
                                static_cast<const double*>(bias), static_cast<double*>(y),
                                static_cast<double*>(bufs), nbufs);
      break;
    case DType::BFloat16:
      forward_t<bfloat16, float>(g, static_cast<const bfloat16*>(x),
                                 static_cast<const float*>(wpk), static_cast<const float*>(bias),
                                 static_cast<bfloat16*>(y), static_cast<float*>(bufs), nbufs);
      break;
    default: break;
  }
}

void forward_tile_acc(DType dt, const Geom& g, const void* x, const void* wpk, const void* bias,
                      void* y, void* buf) {
  switch (dt) {
    case DType::Float32:
      forward_t<float, float, float>(g, static_cast<const float*>(x),
                                     static_cast<const float*>(wpk),
                                     static_cast<const float*>(bias), static_cast<float*>(y),
                                     static_cast<float*>(buf), 1, false);
      break;
    case DType::Float64:
      forward_t<double, double, double>(g, static_cast<const double*>(x),
                                        static_cast<const double*>(wpk),
                                        static_cast<const double*>(bias),
                                        static_cast<double*>(y), static_cast<double*>(buf), 1,
                                        false);
      break;
    case DType::BFloat16:
      forward_t<bfloat16, float, float>(g, static_cast<const bfloat16*>(x),
                                        static_cast<const float*>(wpk),
                                        static_cast<const float*>(bias), static_cast<float*>(y),
                                        static_cast<float*>(buf), 1, false);
      break;
    default: break;
  }
}

void forward_rows(DType dt, const Geom& g, const void* x, const void* wpk, const void* bias,
                  void* y, void* buf, int64_t n, int64_t oh0, int64_t oh1) {
  switch (dt) {
    case DType::Float32:
      forward_rows_t<float, float>(g, static_cast<const float*>(x), static_cast<const float*>(wpk),
                                   static_cast<const float*>(bias), static_cast<float*>(y),
                                   static_cast<float*>(buf), n, oh0, oh1);
      break;
    case DType::Float64:
      forward_rows_t<double, double>(g, static_cast<const double*>(x),
                                     static_cast<const double*>(wpk),
                                     static_cast<const double*>(bias), static_cast<double*>(y),
                                     static_cast<double*>(buf), n, oh0, oh1);
      break;
    case DType::BFloat16:
      forward_rows_t<bfloat16, float>(g, static_cast<const bfloat16*>(x),
                                      static_cast<const float*>(wpk),
                                      static_cast<const float*>(bias), static_cast<bfloat16*>(y),
                                      static_cast<float*>(buf), n, oh0, oh1);
      break;
    default: break;
  }
}

void backward_input_gather(DType dt, const Geom& g, const void* gy, const void* wpk, void* gx) {
  switch (dt) {
    case DType::Float32:
      backward_input_t<float, float>(g, static_cast<const float*>(gy),
                                     static_cast<const float*>(wpk), static_cast<float*>(gx));
      break;
    case DType::Float64:
      backward_input_t<double, double>(g, static_cast<const double*>(gy),
                                       static_cast<const double*>(wpk), static_cast<double*>(gx));
      break;
    case DType::BFloat16:
      backward_input_t<bfloat16, float>(g, static_cast<const bfloat16*>(gy),
                                        static_cast<const float*>(wpk),
                                        static_cast<bfloat16*>(gx));
      break;
    default: break;
  }
}

void backward_weight_partials(DType dt, const Geom& g, const WgradPlan& plan, const void* gy,
                              const void* x, void* partial, void* bufs, int nbufs) {
  switch (dt) {
    case DType::Float32:
      backward_weight_t<float, float>(g, plan, static_cast<const float*>(gy),
                                      static_cast<const float*>(x), static_cast<float*>(partial),
                                      static_cast<float*>(bufs), nbufs);
      break;
    case DType::Float64:
      backward_weight_t<double, double>(g, plan, static_cast<const double*>(gy),
                                        static_cast<const double*>(x),
                                        static_cast<double*>(partial),
                                        static_cast<double*>(bufs), nbufs);
      break;
    case DType::BFloat16:
      backward_weight_t<bfloat16, float>(g, plan, static_cast<const bfloat16*>(gy),
                                         static_cast<const bfloat16*>(x),
                                         static_cast<float*>(partial),
                                         static_cast<float*>(bufs), nbufs);
      break;
    default: break;
  }
}

}  // namespace FV_ISA
}  // namespace dwconv
}  // namespace fastvis
