// Argument checks shared by every op family.
#include "core/checks.h"

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

}  // namespace core
}  // namespace fastvis
