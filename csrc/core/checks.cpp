// Argument checks shared by every op family.
#include "core/checks.h"

#include <algorithm>
#include <sstream>

#include "fastvis/error.h"

namespace fastvis {
namespace core {

void check_cpu(const TensorView& t, const char* name) {
  FV_CHECK_VALUE(t.device.type == DeviceType::CPU, name, " must be a CPU tensor here, got ",
                 t.describe());
  FV_CHECK_TYPE(t.dtype == DType::Float32 || t.dtype == DType::Float64 ||
                    t.dtype == DType::BFloat16,
                name, ": the CPU backend supports float32, float64 and bfloat16, got ",
                dtype_name(t.dtype), t.dtype == DType::Float16 ? " (float16 is CUDA-only)" : "");
}

int dense_layouts(const TensorView& t) {
  if (t.ndim != 4) return 0;
  const int64_t N = t.shape[0], C = t.shape[1], H = t.shape[2], W = t.shape[3];
  auto match = [&](const int64_t* want) {
    for (int d = 0; d < 4; ++d)
      if (t.shape[d] != 1 && t.strides[d] != want[d]) return false;
    return true;
  };
  (void)N;
  const int64_t nchw[4] = {C * H * W, H * W, W, 1};
  const int64_t nhwc[4] = {H * W * C, 1, W * C, C};
  return (match(nchw) ? 1 : 0) | (match(nhwc) ? 2 : 0);
}

NchwDims activation_dims(const TensorView& x, const char* name) {
  FV_CHECK_VALUE(x.ndim == 4, name, ": expected a 4-D (N, C, H, W) tensor, got ", x.describe());
  FV_CHECK_TYPE(x.dtype != DType::UInt8, name, ": expected a floating-point tensor, got uint8");
  const NchwDims d{x.shape[0], x.shape[1], x.shape[2], x.shape[3]};
  FV_CHECK_VALUE(d.n >= 0 && d.c >= 0 && d.h >= 0 && d.w >= 0, name, ": negative size in ",
                 x.describe());
  FV_CHECK_VALUE(d.c > 0, name, ": expected at least one channel, got ", x.describe());
  constexpr int64_t kMax = int64_t(1) << 31;
  FV_CHECK_VALUE(d.n < kMax && d.c < kMax && d.h < kMax && d.w < kMax, name,
                 ": sizes beyond 2^31 per dimension are not supported, got ", x.describe());
  return d;
}

Layout common_dense_layout(const TensorView* const* ts, int count, const char* op) {
  int common = 3;
  int64_t numel = 0;
  for (int i = 0; i < count; ++i) {
    common &= dense_layouts(*ts[i]);
    numel = std::max(numel, ts[i]->numel());
  }
  if (numel == 0) return Layout::NHWC;  // nothing is read or written
  FV_CHECK_VALUE(common != 0, op,
                 ": x and the other activations (y, grad_y, grad_x) must all be dense in one "
                 "memory layout, channels_last (NHWC) or contiguous NCHW");
  return (common & 2) ? Layout::NHWC : Layout::NCHW;
}

void check_activation_like(const TensorView& t, const TensorView& x, int64_t n, int64_t c,
                           int64_t h, int64_t w, const char* name) {
  FV_CHECK_VALUE(t.ndim == 4 && t.shape[0] == n && t.shape[1] == c && t.shape[2] == h &&
                     t.shape[3] == w,
                 name, ": expected shape [", n, ", ", c, ", ", h, ", ", w, "], got ", t.describe());
  FV_CHECK_TYPE(t.dtype == x.dtype, name, ": expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(t.dtype));
  FV_CHECK_VALUE(t.device == x.device, name, ": expected a tensor on ", device_name(x.device),
                 ", got one on ", device_name(t.device));
  FV_CHECK_VALUE(t.data != nullptr || t.numel() == 0, name, ": null data pointer");
}

void check_row_major(const TensorView& t, const TensorView& x, const int64_t* want, int ndim,
                     DType dtype, const char* name, const char* what) {
  bool shape_ok = t.ndim == ndim;
  for (int d = 0; shape_ok && d < ndim; ++d) shape_ok = t.shape[d] == want[d];
  if (!shape_ok) {
    std::ostringstream os;
    for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << want[d];
    FV_CHECK_VALUE(false, name, ": expected shape [", os.str(), "] (", what, "), got ",
                   t.describe());
  }
  FV_CHECK_TYPE(t.dtype == dtype, name, ": expected dtype ", dtype_name(dtype), " for ",
                dtype_name(x.dtype), " activations, got ", dtype_name(t.dtype));
  FV_CHECK_VALUE(t.device == x.device, name, ": expected a tensor on ", device_name(x.device),
                 ", got one on ", device_name(t.device));
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0 && t.numel() > 0; --d) {
    if (t.shape[d] > 1 && t.strides[d] != stride) {
      std::ostringstream os;
      for (int e = 0; e < ndim; ++e) os << (e ? ", " : "") << t.strides[e];
      FV_CHECK_VALUE(false, name, ": must be contiguous (row-major), got strides (", os.str(), ")");
    }
    stride *= t.shape[d];
  }
  FV_CHECK_VALUE(t.data != nullptr || t.numel() == 0, name, ": null data pointer");
}

}  // namespace core
}  // namespace fastvis
