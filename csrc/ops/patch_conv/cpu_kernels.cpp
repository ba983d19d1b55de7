// Per-instruction-set pieces of the patch convolution (see cpu_kernels.h). Compiled once
// per instruction set: FV_ISA names the namespace.
#include "ops/patch_conv/cpu_kernels.h"

#include "ops/layer_norm/row_kernels.h"

namespace fastvis {
namespace patchconv {
namespace FV_ISA {

void norm_pixels(DType dt, int64_t npix, int64_t c, const void* x, void* y, const void* w,
                 const void* b, double eps) {
  using ::fastvis::layernorm::FV_ISA::fwd_nhwc;
  if (dt == DType::Float64)
    fwd_nhwc<double, double>(npix, c, static_cast<const double*>(x), static_cast<const double*>(w),
                             static_cast<const double*>(b), eps, static_cast<double*>(y),
                             nullptr, nullptr);
  else
    fwd_nhwc<float, float>(npix, c, static_cast<const float*>(x), static_cast<const float*>(w),
                           static_cast<const float*>(b), static_cast<float>(eps),
                           static_cast<float*>(y), nullptr, nullptr);
}

}  // namespace FV_ISA
}  // namespace patchconv
}  // namespace fastvis
