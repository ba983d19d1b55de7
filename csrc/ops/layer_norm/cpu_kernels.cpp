// CPU fast paths of layer_norm_channels: threading over pixel rows around the
// per-pixel kernels of row_kernels.h. Compiled once per instruction set (see
// CMakeLists.txt): FV_ISA names the namespace and the flags differ.
#include <algorithm>
#include <cstring>

#include "fastvis/threading.h"
#include "ops/layer_norm/cpu_kernels.h"
#include "ops/layer_norm/row_kernels.h"

namespace fastvis {
namespace layernorm {
namespace FV_ISA {
namespace {

template <class T, class A>
void forward_t(const Geom& g, const T* x, const A* w, const A* b, A eps, T* y, A* mean, A* rstd,
               A* bufs, int nbufs) {
  const int64_t C = g.c, P = g.n * g.hw;
  if (g.nhwc) {
    // Work items are pixels; at least ~16K values per chunk.
    const int64_t grain = std::max<int64_t>(16, 16384 / C);
    parallel_for(P, grain, [&](int64_t p0, int64_t p1) {
      fwd_nhwc<T, A>(p1 - p0, C, x + p0 * C, w, b, eps, y + p0 * C, mean ? mean + p0 : nullptr,
                     rstd ? rstd + p0 : nullptr);
    });
    return;
  }
  const int64_t PB = nchw_fwd_block(sizeof(A));
  const int64_t nblk = (g.hw + PB - 1) / PB;
  const int64_t be = fwd_buffer_elems(g, sizeof(A));
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * PB));
  parallel_for_indexed(g.n * nblk, grain, [&](int slot, int64_t i0, int64_t i1) {
    A* buf = bufs + static_cast<int64_t>(std::min(slot, nbufs - 1)) * be;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t img = it / nblk, p0 = (it % nblk) * PB;
      const int64_t np = std::min(PB, g.hw - p0);
      const int64_t off = img * C * g.hw + p0, soff = img * g.hw + p0;
      fwd_nchw<T, A>(np, C, g.hw, x + off, w, b, eps, y + off, mean ? mean + soff : nullptr,
                     rstd ? rstd + soff : nullptr, buf);
    }
  });
}

template <class T, class A>
void backward_t(const Geom& g, int64_t chunks, const T* gy, const T* x, const A* w,
                const A* mean, const A* rstd, T* gx, A* partial, A* bufs, int nbufs) {
  const int64_t C = g.c, P = g.n * g.hw;
  const int64_t L = lanes(sizeof(A));
  const int64_t be = bwd_buffer_elems(g, sizeof(A));
  parallel_for_indexed(chunks, 1, [&](int slot, int64_t r0, int64_t r1) {
    A* buf = bufs ? bufs + static_cast<int64_t>(std::min(slot, nbufs - 1)) * be : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t q0 = r * P / chunks, q1 = (r + 1) * P / chunks;
      A* pw = partial ? partial + r * 2 * C : nullptr;
      A* pb = partial ? pw + C : nullptr;
      if (pw) std::fill(pw, pw + 2 * C, A(0));
      if (g.nhwc) {
        bwd_nhwc<T, A>(q1 - q0, C, gy + q0 * C, x + q0 * C, w, mean + q0, rstd + q0,
                       gx ? gx + q0 * C : nullptr, pw, pb);
        continue;
      }
      A* lw = pw ? buf : nullptr;
      A* lb = pw ? buf + C * L : nullptr;
      A* blk = buf + 2 * C * L;
      if (lw) std::fill(lw, lw + 2 * C * L, A(0));
      for (int64_t q = q0; q < q1;) {  // runs of pixels within one image
        const int64_t img = q / g.hw, p = q % g.hw;
        const int64_t len = std::min(g.hw - p, q1 - q);
        const int64_t off = img * C * g.hw + p;
        bwd_nchw<T, A>(len, C, g.hw, gy + off, x + off, w, mean + q, rstd + q,
                       gx ? gx + off : nullptr, lw, lb, blk);
        q += len;
      }
      if (lw)
        for (int64_t c = 0; c < C; ++c) {
          pw[c] = hsum<A>(vload<A, A>(lw + c * L));
          pb[c] = hsum<A>(vload<A, A>(lb + c * L));
        }
    }
  });
}

}  // namespace

void forward(DType dt, const Geom& g, const void* x, const void* w, const void* b, double eps,
             void* y, void* mean, void* rstd, void* bufs, int nbufs) {
  switch (dt) {
    case DType::Float32:
      forward_t<float, float>(g, static_cast<const float*>(x), static_cast<const float*>(w),
                              static_cast<const float*>(b), static_cast<float>(eps),
                              static_cast<float*>(y), static_cast<float*>(mean),
                              static_cast<float*>(rstd), static_cast<float*>(bufs), nbufs);
      break;
    case DType::Float64:
      forward_t<double, double>(g, static_cast<const double*>(x), static_cast<const double*>(w),
                                static_cast<const double*>(b), eps, static_cast<double*>(y),
                                static_cast<double*>(mean), static_cast<double*>(rstd),
                                static_cast<double*>(bufs), nbufs);
      break;
    case DType::BFloat16:
      forward_t<bfloat16, float>(g, static_cast<const bfloat16*>(x), static_cast<const float*>(w),
                                 static_cast<const float*>(b), static_cast<float>(eps),
                                 static_cast<bfloat16*>(y), static_cast<float*>(mean),
                                 static_cast<float*>(rstd), static_cast<float*>(bufs), nbufs);
      break;
    default: break;
  }
}

void backward(DType dt, const Geom& g, int64_t chunks, const void* gy, const void* x,
              const void* w, const void* mean, const void* rstd, void* gx, void* partial,
              void* bufs, int nbufs) {
  switch (dt) {
    case DType::Float32:
      backward_t<float, float>(g, chunks, static_cast<const float*>(gy),
                               static_cast<const float*>(x), static_cast<const float*>(w),
                               static_cast<const float*>(mean), static_cast<const float*>(rstd),
                               static_cast<float*>(gx), static_cast<float*>(partial),
                               static_cast<float*>(bufs), nbufs);
      break;
    case DType::Float64:
      backward_t<double, double>(g, chunks, static_cast<const double*>(gy),
                                 static_cast<const double*>(x), static_cast<const double*>(w),
                                 static_cast<const double*>(mean),
                                 static_cast<const double*>(rstd), static_cast<double*>(gx),
                                 static_cast<double*>(partial), static_cast<double*>(bufs), nbufs);
      break;
    case DType::BFloat16:
      backward_t<bfloat16, float>(g, chunks, static_cast<const bfloat16*>(gy),
                                  static_cast<const bfloat16*>(x), static_cast<const float*>(w),
                                  static_cast<const float*>(mean), static_cast<const float*>(rstd),
                                  static_cast<bfloat16*>(gx), static_cast<float*>(partial),
                                  static_cast<float*>(bufs), nbufs);
      break;
    default: break;
  }
}

}  // namespace FV_ISA
}  // namespace layernorm
}  // namespace fastvis
