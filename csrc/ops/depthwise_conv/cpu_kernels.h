// Internal: the CPU fast paths of depthwise convolution. cpu_kernels.cpp is
// compiled once per instruction set (FV_ISA = generic, avx2, ...) into its own
// namespace; depthwise_conv.cpp picks one at run time.
//
// Every kernel works on dense NHWC buffers. Weights arrive packed as
// [kh][kw][C] in the accumulation type A (float for float32/bfloat16, double for
// float64). Storage type T: float, double or bfloat16 (uint16 bits).
#pragma once
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {
namespace dwconv {

struct Geom {
  int64_t n, c, h, w;    // input (of the correlation this kernel computes)
  int64_t kh, kw;
  int64_t oh, ow;        // output
  int64_t sh, sw;        // stride
  int64_t pt, pl;        // top/left padding (>= 0)
  int64_t dh, dw;        // dilation
};

// The split of the weight-gradient reduction, a function of the shape only.
struct WgradPlan {
  int64_t row_chunks;     // number of partial sums per weight element
  int64_t partial_elems;  // kh*kw*C + C (weights then bias) per chunk
};
WgradPlan wgrad_plan(const Geom& g);

#define FV_DWCONV_KERNEL_DECLS                                                                 \
  /* y = correlate(x, wpk) + bias; bias may be null. */                                        \
  void forward(DType dt, const Geom& g, const void* x, const void* wpk, const void* bias,      \
               void* y);                                                                       \
  /* Transposed correlation (any stride): gx from gy and the packed, unflipped weight. */      \
  /* g describes the forward problem (x of g.h x g.w, gy of g.oh x g.ow). */                  \
  void backward_input_gather(DType dt, const Geom& g, const void* gy, const void* wpk,         \
                             void* gx);                                                        \
  /* partial: plan.row_chunks * plan.partial_elems accumulators of type A. */                  \
  void backward_weight_partials(DType dt, const Geom& g, const WgradPlan& plan,                \
                                const void* gy, const void* x, void* partial);

namespace generic {
FV_DWCONV_KERNEL_DECLS
}
namespace avx2 {
FV_DWCONV_KERNEL_DECLS
}

}  // namespace dwconv
}  // namespace fastvis
