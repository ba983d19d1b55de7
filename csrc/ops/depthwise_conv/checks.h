// Internal: argument checks shared by the depthwise-conv entry points.
#pragma once
#include <cstdint>

#include "core/checks.h"
#include "fastvis/depthwise_conv.h"

namespace fastvis {
namespace dwconv {

using core::check_cpu;
using core::dense_layouts;

// out must be a 4-D (n, c, h, w) tensor with like's dtype, device and layout.
void check_output(const TensorView& out, const TensorView& like, int64_t n, int64_t c, int64_t h,
                  int64_t w, const char* name);
// b must be a 1-D tensor of c elements with like's dtype and device.
void check_bias(const TensorView& b, const TensorView& like, int64_t c, const char* name);

// Element offset of weight[c, 0, i, j] for (C,1,kh,kw) or (C,kh,kw) weights.
struct WeightIndex {
  int64_t sc, si, sj;
  explicit WeightIndex(const TensorView& w) {
    sc = w.strides[0];
    si = w.strides[w.ndim - 2];
    sj = w.strides[w.ndim - 1];
  }
  int64_t operator()(int64_t c, int64_t i, int64_t j) const { return c * sc + i * si + j * sj; }
};

}  // namespace dwconv
}  // namespace fastvis
