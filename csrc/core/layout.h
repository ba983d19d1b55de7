// Internal: copies between the NCHW and NHWC layouts of a logical (N, C, H, W)
// tensor (CPU, threaded). Element type by dtype size only (a copy).
#pragma once
#include <cstdint>

namespace fastvis {

// src: dense NCHW, dst: dense NHWC.
void nchw_to_nhwc(const void* src, void* dst, int64_t n, int64_t c, int64_t hw, int64_t itemsize);
// src: dense NHWC, dst: dense NCHW.
void nhwc_to_nchw(const void* src, void* dst, int64_t n, int64_t c, int64_t hw, int64_t itemsize);

}  // namespace fastvis
