// Internal: the CPU fast paths of layer_norm_channels. cpu_kernels.cpp is compiled once
// per instruction set (FV_ISA = generic, avx2) into its own namespace; layer_norm.cpp
// picks one at run time. The per-pixel kernels themselves are inline templates in
// row_kernels.h so that other per-ISA kernel files (the block-fusion op) can run them
// on the pixel rows they hold.
//
// Storage type T: float, double or bfloat16; accumulation type A: float for
// float32/bfloat16, double for float64. Weight and bias arrive packed as C values of
// type A (1 and 0 when the op has none). mean / rstd are per-pixel arrays of type A.
#pragma once
#include <algorithm>
#include <cstdint>

#include "core/cpu_features.h"
#include "fastvis/tensor.h"

namespace fastvis {
namespace layernorm {

struct Geom {
  int64_t n, c, hw;  // images, channels, pixels per image
  bool nhwc;         // dense NHWC (else dense NCHW)
};

// SIMD width: vectors of the selected CPU path (32 or 64 bytes) in the accumulation type.
inline int64_t lanes(int64_t acc_bytes) { return cpu::vector_bytes() / acc_bytes; }
// NCHW kernels work on blocks of consecutive pixels of one image: forward 4 vectors,
// backward 2 vectors of pixels (what fits in registers next to the statistics).
inline int64_t nchw_fwd_block(int64_t acc_bytes) { return 4 * lanes(acc_bytes); }
inline int64_t nchw_bwd_block(int64_t acc_bytes) { return 2 * lanes(acc_bytes); }

// Accumulator elements of one per-thread buffer: NCHW forward keeps the block's input
// [C][block] (widened once); NCHW backward keeps x_hat and g = grad_y*weight
// ([2][C][block]) and per-channel lane sums of the weight/bias gradients ([2][C][lanes]).
inline int64_t fwd_buffer_elems(const Geom& g, int64_t acc_bytes) {
  return g.nhwc ? 0 : g.c * nchw_fwd_block(acc_bytes);
}
inline int64_t bwd_buffer_elems(const Geom& g, int64_t acc_bytes) {
  return g.nhwc ? 0 : 2 * g.c * nchw_bwd_block(acc_bytes) + 2 * g.c * lanes(acc_bytes);
}

// The weight/bias-gradient split: the N*H*W pixels (in (n, h, w) order) are cut into
// `chunks` contiguous ranges, chunk r = [r*P/chunks, (r+1)*P/chunks); each writes its own
// partial sums. A function of the shape only, so results do not depend on threads.
inline int64_t bwd_chunks(const Geom& g) {
  const int64_t p = g.n * g.hw;
  return std::min<int64_t>(64, std::max<int64_t>(1, (p + 255) / 256));
}

#define FV_LN_KERNEL_DECLS                                                                     \
  /* y = normalise(x) * w + b over each pixel's channels; mean/rstd (N*H*W) may be null. */   \
  /* bufs: nbufs per-thread buffers of fwd_buffer_elems(g) accumulators. */                   \
  void forward(DType dt, const Geom& g, const void* x, const void* w, const void* b,           \
               double eps, void* y, void* mean, void* rstd, void* bufs, int nbufs);             \
  /* gx (may be null) and, when partial is not null, per-chunk partial sums: chunk r */        \
  /* writes partial[r*2C + c] (weight) and partial[r*2C + C + c] (bias). */                   \
  /* bufs: nbufs per-thread buffers of bwd_buffer_elems(g) accumulators. */                   \
  void backward(DType dt, const Geom& g, int64_t chunks, const void* gy, const void* x,        \
                const void* w, const void* mean, const void* rstd, void* gx, void* partial,    \
                void* bufs, int nbufs);

namespace generic {
FV_LN_KERNEL_DECLS
}
namespace avx2 {
FV_LN_KERNEL_DECLS
}
namespace avx512 {
FV_LN_KERNEL_DECLS
}

}  // namespace layernorm
}  // namespace fastvis
