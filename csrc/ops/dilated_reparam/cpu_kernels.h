// Internal: the CPU statistics pass of dilated_reparam (the fused multi-branch depthwise
// conv + BatchNorm). cpu_kernels.cpp is compiled once per instruction set (FV_ISA =
// generic, avx2) into its own namespace; dilated_reparam.cpp picks one at run time.
//
// Work items are tiles of `rt` output rows of one image. Per tile, every branch's
// convolution output z_b is computed into a per-thread buffer [rt*W][C] in the
// accumulation type A (dwconv::FV_ISA::forward_tile_acc: the depthwise family's packed-tile
// kernel, serial, reading NHWC x), and the tile's per-channel mean and sum of squared
// deviations about that mean are accumulated in double and written to the tile's own slot
// of `partial`. The tiling depends on the shape only; dilated_reparam.cpp combines the
// tiles in a fixed order (Chan et al.'s pairwise update), so the statistics do not depend
// on the thread count.
#pragma once
#include <algorithm>
#include <cstdint>

#include "fastvis/tensor.h"
#include "ops/depthwise_conv/cpu_kernels.h"

namespace fastvis {
namespace dilrep {

constexpr int kMaxBranches = 16;

struct Shape {
  int64_t n, c, h, w;
  int64_t cp;                    // C rounded up to the depthwise channel block
  int64_t nb;                    // branches
  int64_t k[kMaxBranches];       // kernel sizes
  int64_t d[kMaxBranches];       // dilations
  int64_t extent;                // E = d_0*(k_0-1)+1
};

struct StatsPlan {
  int64_t rt;          // output rows per tile
  int64_t tpi;         // tiles per image
  int64_t ntiles;      // n * tpi
  int64_t z_elems;     // per-thread buffer of one branch's tile output: rt*W*C accumulators
  int64_t dw_elems;    // per-thread buffer of forward_tile_acc (max over branches and tiles)
  int64_t buf_elems;   // z_elems + dw_elems, rounded to 16
};

inline int64_t pad_of(const Shape& s, int64_t b) { return s.d[b] * (s.k[b] - 1) / 2; }

// The depthwise geometry of branch b for output rows [r0, r1) of one image; s0 receives the
// first input row of the window.
inline dwconv::Geom tile_geom(const Shape& s, int64_t b, int64_t r0, int64_t r1, int64_t& s0) {
  const int64_t p = pad_of(s, b);
  s0 = std::max<int64_t>(0, r0 - p);
  const int64_t s1 = std::min<int64_t>(s.h, r1 + p);
  return dwconv::Geom{1, s.c, s1 - s0, s.w, s.k[b], s.k[b], r1 - r0, s.w, 1, 1,
                      p - (r0 - s0), p, s.d[b], s.d[b], s.cp};
}

// A function of the shape only. Tiles hold at most ~256 KB of one branch's outputs, and
// there are at least 16 of them when the batch allows it (work for every thread) without
// tiles shorter than the largest padding (at least two tiles, though).
inline StatsPlan stats_plan(const Shape& s, int64_t acc) {
  StatsPlan p;
  const int64_t max_pixels = std::max<int64_t>(1, (256 * 1024 / acc) / std::max<int64_t>(1, s.c));
  int64_t rt = std::clamp<int64_t>(max_pixels / std::max<int64_t>(1, s.w), 1, std::max<int64_t>(1, s.h));
  // Halve towards 16 tiles (work for every thread), but once there are two tiles not
  // below the largest branch's padding: a tile of rt rows convolves rt + 2*pad input rows
  // per branch, so one-row tiles of a 13x13 kernel read each input row 13 times.
  // UniRepLKNet-T's 13x13 blocks at N=1, forward (statistics pass + merged conv), medians
  // of interleaved calls: 160x28x28 2.58 -> 2.06 ms (28 one-row tiles -> 4 of 7 rows),
  // 320x14x14 2.49 -> 2.06-2.10 (14 -> 2 tiles), 640x7x7 2.59 -> 2.37 (7 -> 2); N=8 even.
  int64_t max_pad = 0;
  for (int64_t b = 0; b < s.nb; ++b) max_pad = std::max(max_pad, pad_of(s, b));
  while (rt > 1) {
    const int64_t tiles = s.n * ((s.h + rt - 1) / rt), half = (rt + 1) / 2;
    if (tiles >= 16 || (tiles >= 2 && half < max_pad)) break;
    rt = half;
  }
  p.rt = rt;
  p.tpi = s.h > 0 ? (s.h + rt - 1) / rt : 0;
  p.ntiles = s.n * p.tpi;
  p.z_elems = (rt * s.w * s.c + 15) / 16 * 16;
  // Every tile height a tile can have at every position (the window shrinks at borders).
  p.dw_elems = 0;
  for (int64_t b = 0; b < s.nb; ++b) {
    const int64_t pad = pad_of(s, b);
    for (int64_t r = 1; r <= std::min(rt, s.h); ++r)
      for (int64_t hs = r; hs <= std::min(s.h, r + 2 * pad); ++hs) {
        const dwconv::Geom g{1, s.c, hs, s.w, s.k[b], s.k[b], r, s.w, 1, 1, 0, pad,
                             s.d[b], s.d[b], s.cp};
        p.dw_elems = std::max(p.dw_elems, dwconv::fwd_plan(g, acc, false).buf_elems);
      }
  }
  p.dw_elems = (p.dw_elems + 15) / 16 * 16;
  p.buf_elems = p.z_elems + p.dw_elems;
  return p;
}

#define FV_DILREP_KERNEL_DECLS                                                              \
  /* x: dense NHWC; wpk[b]: branch b's weight packed [k][k][cp] in A. partial: for tile t */ \
  /* (image-major) and branch b, partial[((t*nb + b)*2)*C + c] = the tile's mean of z_b */   \
  /* and partial[((t*nb + b)*2 + 1)*C + c] = its sum of squared deviations from that mean. */ \
  /* bufs: nbufs per-thread buffers of plan.buf_elems accumulators. */                       \
  void stats_partials(DType dt, const Shape& s, const StatsPlan& plan, const void* x,        \
                      const void* const* wpk, double* partial, void* bufs, int nbufs);

namespace generic {
FV_DILREP_KERNEL_DECLS
}
namespace avx2 {
FV_DILREP_KERNEL_DECLS
}
namespace avx512 {
FV_DILREP_KERNEL_DECLS
}

}  // namespace dilrep
}  // namespace fastvis
