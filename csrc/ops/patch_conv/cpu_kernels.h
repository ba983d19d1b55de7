// Internal: the per-instruction-set pieces of the patch convolution. cpu_kernels.cpp is
// compiled once per instruction set (FV_ISA = generic, avx2, avx512) into its own
// namespace; patch_conv.cpp picks one at run time. The gather and the GEMMs stay in
// patch_conv.cpp; the fused LayerNorm's per-pixel rows run here, on the SIMD row kernels
// of ops/layer_norm/row_kernels.h (the same math as layer_norm_channels).
#pragma once
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {
namespace patchconv {

#define FV_PATCH_KERNEL_DECLS                                                                 \
  /* LayerNorm of npix pixels of c contiguous values each (x may equal y): */                 \
  /* y = (x - mean) * rstd * w + b with the biased variance, in float (dt Float32) or */      \
  /* double (Float64); w and b: c values of that type. */                                     \
  void norm_pixels(DType dt, int64_t npix, int64_t c, const void* x, void* y, const void* w,  \
                   const void* b, double eps);

namespace generic {
FV_PATCH_KERNEL_DECLS
}
namespace avx2 {
FV_PATCH_KERNEL_DECLS
}
namespace avx512 {
FV_PATCH_KERNEL_DECLS
}

}  // namespace patchconv
}  // namespace fastvis
