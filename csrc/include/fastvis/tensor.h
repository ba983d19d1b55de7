// fastvis: a small non-owning view of strided memory. The core never owns
// activations: callers (PyTorch through DLPack, NumPy, native programs) allocate.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace fastvis {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3, UInt8 = 4 };
enum class DeviceType : int { CPU = 0, CUDA = 1 };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

// Memory layout of a logical (N, C, H, W) activation tensor.
enum class Layout : int { NCHW = 0, NHWC = 1 };

constexpr int kMaxDims = 8;

// Strides are in elements, not bytes (as in PyTorch and DLPack).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  int64_t numel() const;
  size_t itemsize() const;
  bool is_contiguous() const;  // row-major dense
  std::string describe() const;  // e.g. "float32[2, 3, 4] on cpu"
};

// Builds a dense row-major view (convenience for native programs).
TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device = Device{});
// Builds a dense view of a logical (N, C, H, W) tensor stored channels-last (N, H, W, C).
TensorView make_nhwc_view(void* data, DType dtype, int64_t n, int64_t c, int64_t h, int64_t w,
                          Device device = Device{});

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);
std::string device_name(const Device& d);

// A 16-bit bfloat16 value (the upper half of an IEEE float32).
struct bfloat16 {
  uint16_t bits;
};
// A 16-bit IEEE half value (storage only on the CPU).
struct float16 {
  uint16_t bits;
};

}  // namespace fastvis
