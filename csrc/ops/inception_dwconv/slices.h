// Internal: the channel arithmetic of the Inception depthwise op, shared by the CPU path
// and the CUDA dispatch (host-only; the CPU tests exercise it through the CPU path).
#pragma once
#include <algorithm>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {
namespace incdw {

// Branch order in the channel dimension: identity, square, band 1 x k, band k x 1.
enum Branch : int { kSquare = 0, kBandW = 1, kBandH = 2 };

// First channel of branch b (0..2) when C channels hold 3 branches of g channels at the end.
inline int64_t branch_c0(int64_t c, int64_t g, int b) { return c - 3 * g + b * g; }

// Channels [c0, c0 + cn) of a logical (N, C, H, W) view, any layout: same strides, the
// data pointer advanced by c0 channel steps.
inline TensorView channel_slice(const TensorView& t, int64_t c0, int64_t cn) {
  TensorView s = t;
  s.data = static_cast<char*>(t.data) + c0 * t.strides[1] * static_cast<int64_t>(t.itemsize());
  s.shape[1] = cn;
  return s;
}

// Rows of the fused forward loop: work items are (image, band of `rows` image rows); a band
// holds about 256 KB of NHWC input so the identity copy and the three branches of a band
// run while its rows sit in L2, and there are at least 16 items when the images allow it.
inline int64_t band_rows(int64_t n, int64_t h, int64_t w, int64_t pitch, int64_t itemsize) {
  constexpr int64_t kBandBytes = 256 * 1024;
  const int64_t row_bytes = std::max<int64_t>(1, w * pitch * itemsize);
  int64_t rb = std::max<int64_t>(1, kBandBytes / row_bytes);
  const int64_t bands_wanted = std::min<int64_t>(h, (16 + std::max<int64_t>(n, 1) - 1) /
                                                        std::max<int64_t>(n, 1));
  rb = std::min(rb, (h + bands_wanted - 1) / std::max<int64_t>(bands_wanted, 1));
  return std::max<int64_t>(1, std::min(rb, h));
}

}  // namespace incdw
}  // namespace fastvis
