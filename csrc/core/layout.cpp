#include "core/layout.h"

#include <algorithm>
#include <cstring>

#include "fastvis/threading.h"

namespace fastvis {
namespace {

// Transposes each of n matrices rows x cols (row-major) into cols x rows, in 32x32 tiles.
template <class E>
void transpose_batched(const E* src, E* dst, int64_t n, int64_t rows, int64_t cols) {
  constexpr int64_t B = 32;
  const int64_t tr = (rows + B - 1) / B, tc = (cols + B - 1) / B;
  parallel_for(n * tr, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / tr, r0 = (it % tr) * B, r1 = std::min(rows, r0 + B);
      const E* s = src + b * rows * cols;
      E* d = dst + b * rows * cols;
      for (int64_t c0 = 0; c0 < tc * B; c0 += B) {
        const int64_t c1 = std::min(cols, c0 + B);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) d[c * rows + r] = s[r * cols + c];
      }
    }
  });
}

void transpose_any(const void* src, void* dst, int64_t n, int64_t rows, int64_t cols, int64_t itemsize) {
  switch (itemsize) {
    case 1: transpose_batched(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), n, rows, cols); break;
    case 2: transpose_batched(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), n, rows, cols); break;
    case 4: transpose_batched(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), n, rows, cols); break;
    default: transpose_batched(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), n, rows, cols); break;
  }
}

}  // namespace

void nchw_to_nhwc(const void* src, void* dst, int64_t n, int64_t c, int64_t hw, int64_t itemsize) {
  transpose_any(src, dst, n, c, hw, itemsize);
}
void nhwc_to_nchw(const void* src, void* dst, int64_t n, int64_t c, int64_t hw, int64_t itemsize) {
  transpose_any(src, dst, n, hw, c, itemsize);
}

}  // namespace fastvis
