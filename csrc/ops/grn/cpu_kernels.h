// Internal: the CPU fast paths of global_response_norm. cpu_kernels.cpp is compiled once
// per instruction set (FV_ISA = generic, avx2) into its own namespace; grn.cpp picks one
// at run time and does the small per-(n, c) arithmetic between the two passes.
//
// Storage type T: float, double or bfloat16; accumulation type A: float for
// float32/bfloat16, double for float64. Per-(n, c) arrays are N*C values of type A,
// row-major (image n's channels at n*C).
//
// Both passes over the activations are memory-bound sweeps:
// * pass 1 (reductions over each image's pixels): work items are (image n, pixel chunk
//   r); chunk r of an image holds pixels [r*HW/R, (r+1)*HW/R) and writes its own C
//   partial sums (two sets in the backward pass). `reduction_chunks` is a function of
//   the shape only, and every partial sum is taken in a fixed order, so the results do
//   not depend on the thread count.
// * pass 2 (elementwise): y = x * scale[n, c] + bias[c] in the forward pass,
//   grad_x = grad_y * scale[n, c] + x * coef[n, c] in the backward pass.
#pragma once
#include <algorithm>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {
namespace grn {

struct Geom {
  int64_t n, c, hw;  // images, channels, pixels per image
  bool nhwc;         // dense NHWC (else dense NCHW)
};

// R, the number of pixel chunks of each image in pass 1: enough for N*R >= 64 work items
// when the images are large enough, but no chunk below ~16K values (fewer, longer chunks
// mean fewer partial sums to write and reduce), at most 64; NCHW chunks keep at least 256
// pixels (each chunk reads C runs of its pixels, which should be long enough for the
// SIMD loop). A function of the shape only.
inline int64_t reduction_chunks(const Geom& g) {
  if (g.hw <= 0 || g.n <= 0) return 1;
  const int64_t want = (64 + g.n - 1) / g.n;
  const int64_t by_size = (g.hw * g.c + 16383) / 16384;
  const int64_t by_len = g.nhwc ? g.hw : std::max<int64_t>(1, g.hw / 256);
  return std::max<int64_t>(1, std::min(std::min(want, by_size), by_len));
}

// The activation applied to x before the normalization (GrnActivation of fastvis/grn.h):
// the kernels read x and compute act(x) (and act'(x) in the backward) on the fly.
constexpr int kActNone = 0, kActGelu = 1, kActGeluTanh = 2;

// Every pass takes `act` (one of the above); with an activation, x below stands for act(x)
// and the backward's grad_input also multiplies by act'(x).
#define FV_GRN_KERNEL_DECLS                                                                 \
  /* partial[(n*chunks + r)*C + c] = sum of x^2 over chunk r of image n, channel c. With */  \
  /* out (else null): out = x * os[n*C + c] + ot[c] in the same pass. */                     \
  void sum_squares(DType dt, const Geom& g, int act, int64_t chunks, const void* x,         \
                   void* partial, void* out, const void* os, const void* ot);               \
  /* y = x * scale[n*C + c] + shift[c] (y may be x: in place). */                           \
  void apply(DType dt, const Geom& g, int act, const void* x, const void* scale,            \
             const void* shift, void* y);                                                   \
  /* Over chunk r of image n, channel c: partial[((n*chunks + r)*2)*C + c] = sum of */      \
  /* grad_y * x and partial[((n*chunks + r)*2 + 1)*C + c] = sum of grad_y. With out: */     \
  /* out = x * os[n*C + c] + ot[c] in the same pass (the forward output, recomputed). */    \
  void sum_grads(DType dt, const Geom& g, int act, int64_t chunks, const void* gy,          \
                 const void* x, void* partial, void* out, const void* os, const void* ot);  \
  /* gx = gy * scale[n*C + c] + x * coef[n*C + c]. */                                       \
  void grad_input(DType dt, const Geom& g, int act, const void* gy, const void* x,          \
                  const void* scale, const void* coef, void* gx);

namespace generic {
FV_GRN_KERNEL_DECLS
}
namespace avx2 {
FV_GRN_KERNEL_DECLS
}
namespace avx512 {
FV_GRN_KERNEL_DECLS
}

}  // namespace grn
}  // namespace fastvis
