// Internal: the channel arithmetic of the Inception depthwise op, shared by the CPU path
// and the CUDA dispatch (host-only; the CPU tests exercise it through the CPU path).
#pragma once
#include <algorithm>
#include <cstdint>

#include "fastvis/depthwise_conv.h"
#include "fastvis/inception_dwconv.h"
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

// Branch b as a depthwise problem on its g channels: kernel extent, dilation d along it,
// stride 1, symmetric "same" padding d*(k-1)/2 (the shape check guarantees d*(k-1) even).
inline void branch_problem(const InceptionDWConv2dShape& s, int64_t d, int b,
                           DepthwiseConv2dShape* bs, DepthwiseConv2dParams* bp) {
  bs->n = s.n, bs->c = s.g, bs->h = s.h, bs->w = s.w, bs->oh = s.h, bs->ow = s.w;
  bs->layout = s.layout;
  int64_t dh = d, dw = d;
  if (b == kSquare) {
    bs->kh = s.kh, bs->kw = s.kw;
  } else if (b == kBandW) {
    bs->kh = 1, bs->kw = s.kbw, dh = 1;
  } else {
    bs->kh = s.kbh, bs->kw = 1, dw = 1;
  }
  *bp = DepthwiseConv2dParams{};
  bp->dilation_h = dh, bp->dilation_w = dw;
  bp->pad_top = bp->pad_bottom = dh * (bs->kh - 1) / 2;
  bp->pad_left = bp->pad_right = dw * (bs->kw - 1) / 2;
}

// The identity channels of every image as a 2-D copy: `height` rows of `width_bytes`,
// `pitch_bytes` apart, at the same offsets in source and destination. NHWC: one row per
// pixel; NCHW: one row per image (its identity planes are contiguous).
struct CopyRect {
  int64_t width_bytes, height, pitch_bytes;
};
inline CopyRect identity_rect(const InceptionDWConv2dShape& s, int64_t itemsize) {
  const int64_t cid = s.c - 3 * s.g;
  if (s.layout == Layout::NHWC) return CopyRect{cid * itemsize, s.n * s.h * s.w, s.c * itemsize};
  return CopyRect{cid * s.h * s.w * itemsize, s.n, s.c * s.h * s.w * itemsize};
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
  rb = std::min(rb, std::max<int64_t>(1, h / std::max<int64_t>(bands_wanted, 1)));
  return std::max<int64_t>(1, std::min(rb, h));
}

}  // namespace incdw
}  // namespace fastvis
