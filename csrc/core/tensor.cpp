#include "fastvis/tensor.h"

#include <sstream>

#include "fastvis/error.h"

namespace fastvis {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::BFloat16: return 2;
    case DType::Float16: return 2;
    case DType::UInt8: return 1;
  }
  return 0;
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
    case DType::UInt8: return "uint8";
  }
  return "unknown";
}

std::string device_name(const Device& d) {
  if (d.type == DeviceType::CPU) return "cpu";
  return "cuda:" + std::to_string(d.index);
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

size_t TensorView::itemsize() const { return dtype_size(dtype); }

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype) << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << "] on " << device_name(device);
  return os.str();
}

TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device) {
  FV_CHECK_VALUE(shape.size() <= static_cast<size_t>(kMaxDims), "make_view: at most ", kMaxDims,
                 " dimensions are supported, got ", shape.size());
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  int64_t st = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[d] = st;
    st *= t.shape[d];
  }
  return t;
}

TensorView make_nhwc_view(void* data, DType dtype, int64_t n, int64_t c, int64_t h, int64_t w,
                          Device device) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = 4;
  t.shape[0] = n; t.shape[1] = c; t.shape[2] = h; t.shape[3] = w;
  t.strides[0] = h * w * c; t.strides[1] = 1; t.strides[2] = w * c; t.strides[3] = c;
  return t;
}

}  // namespace fastvis
