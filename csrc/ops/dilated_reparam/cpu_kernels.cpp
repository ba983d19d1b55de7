// CPU statistics pass of dilated_reparam, compiled once per instruction set (FV_ISA names
// the namespace). See cpu_kernels.h for the tiling.
#include <algorithm>
#include <cstring>

#include "core/dtype_convert.h"
#include "fastvis/threading.h"
#include "ops/depthwise_conv/cpu_kernels.h"
#include "ops/dilated_reparam/cpu_kernels.h"

#ifndef FV_ISA
#error "FV_ISA must name the instruction-set namespace"
#endif

namespace fastvis {
namespace dilrep {
namespace FV_ISA {
namespace {

// Per channel over P pixels of z ([P][C]): the mean (in double) and the sum of squared
// deviations from it (two passes over a buffer that sits in L2).
template <class A>
void tile_moments(const A* z, int64_t P, int64_t C, double* mean, double* m2) {
  std::fill(mean, mean + C, 0.0);
  std::fill(m2, m2 + C, 0.0);
  for (int64_t p = 0; p < P; ++p) {
    const A* zp = z + p * C;
    for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<double>(zp[c]);
  }
  const double inv = 1.0 / static_cast<double>(P);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  for (int64_t p = 0; p < P; ++p) {
    const A* zp = z + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const double dv = static_cast<double>(zp[c]) - mean[c];
      m2[c] += dv * dv;
    }
  }
}

template <class T, class A>
void stats_t(DType dt, const Shape& s, const StatsPlan& plan, const T* x, const void* const* wpk,
             double* partial, A* bufs, int nbufs) {
  const int64_t C = s.c;
  parallel_for_indexed(plan.ntiles, 1, [&](int slot, int64_t begin, int64_t end) {
    A* z = bufs + std::min(slot, nbufs - 1) * plan.buf_elems;
    A* dwbuf = z + plan.z_elems;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / plan.tpi, tile = t % plan.tpi;
      const int64_t r0 = tile * plan.rt, r1 = std::min(s.h, r0 + plan.rt);
      for (int64_t b = 0; b < s.nb; ++b) {
        int64_t s0;
        const dwconv::Geom g = tile_geom(s, b, r0, r1, s0);
        ::fastvis::dwconv::FV_ISA::forward_tile_acc(dt, g, x + (n * s.h + s0) * s.w * C, wpk[b],
                                                    nullptr, z, dwbuf);
        double* pm = partial + (t * s.nb + b) * 2 * C;
        tile_moments<A>(z, (r1 - r0) * s.w, C, pm, pm + C);
      }
    }
  });
}

}  // namespace

void stats_partials(DType dt, const Shape& s, const StatsPlan& plan, const void* x,
                    const void* const* wpk, double* partial, void* bufs, int nbufs) {
  switch (dt) {
    case DType::Float32:
      stats_t<float, float>(dt, s, plan, static_cast<const float*>(x), wpk, partial,
                            static_cast<float*>(bufs), nbufs);
      break;
    case DType::Float64:
      stats_t<double, double>(dt, s, plan, static_cast<const double*>(x), wpk, partial,
                              static_cast<double*>(bufs), nbufs);
      break;
    case DType::BFloat16:
      stats_t<bfloat16, float>(dt, s, plan, static_cast<const bfloat16*>(x), wpk, partial,
                               static_cast<float*>(bufs), nbufs);
      break;
    default: break;
  }
}

}  // namespace FV_ISA
}  // namespace dilrep
}  // namespace fastvis
