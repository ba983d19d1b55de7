// fastvis: the Inception depthwise op on CUDA. No kernels of its own: the depthwise
// family's CUDA kernels address activations through full (n, c, h, w) strides, so each
// branch runs on a channel-slice view of x / y / grad_y / grad_x in place (any layout),
// and the identity channels are one cudaMemcpy2DAsync. Everything is enqueued on the
// caller's stream, in order, so the weight-gradient scratch is reused across branches.
//
// COMPILED, NEVER RUN: no machine of this project has a GPU. The slice and copy
// arithmetic (../slices.h) is shared with the CPU path, which the CPU tests exercise;
// tests/test_cuda_inception_dwconv.py is what to run on a machine with a GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fastvis/error.h"
#include "ops/depthwise_conv/dwconv_cuda.h"
#include "ops/inception_dwconv/inception_cuda.h"
#include "ops/inception_dwconv/slices.h"

#define FV_INC_CUDA_CHECK(expr)                                                              \
  do {                                                                                       \
    const cudaError_t fv_err_ = (expr);                                                      \
    FV_CHECK_RUNTIME(fv_err_ == cudaSuccess, "fastvis inception_dwconv2d (CUDA): ", #expr,   \
                     " failed: ", cudaGetErrorName(fv_err_), ": ", cudaGetErrorString(fv_err_)); \
  } while (0)

namespace fastvis {
namespace incdw {
namespace cuda {
namespace {

const TensorView* weight_of(const InceptionDWConv2dWeights& w, int b) {
  return b == kSquare ? w.hw_weight : b == kBandW ? w.w_weight : w.h_weight;
}
const TensorView* bias_of(const InceptionDWConv2dWeights& w, int b) {
  return b == kSquare ? w.hw_bias : b == kBandW ? w.w_bias : w.h_bias;
}
const TensorView* grad_weight_of(const InceptionDWConv2dGrads& g, int b) {
  return b == kSquare ? g.hw_weight : b == kBandW ? g.w_weight : g.h_weight;
}
const TensorView* grad_bias_of(const InceptionDWConv2dGrads& g, int b) {
  return b == kSquare ? g.hw_bias : b == kBandW ? g.w_bias : g.h_bias;
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    FV_INC_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != dev) {
      FV_INC_CUDA_CHECK(cudaSetDevice(dev));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

void copy_identity(const TensorView& src, const TensorView& dst, const InceptionDWConv2dShape& s,
                   cudaStream_t stream) {
  const CopyRect r = identity_rect(s, static_cast<int64_t>(src.itemsize()));
  if (r.width_bytes == 0 || r.height == 0) return;
  FV_INC_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, size_t(r.pitch_bytes), src.data,
                                      size_t(r.pitch_bytes), size_t(r.width_bytes),
                                      size_t(r.height), cudaMemcpyDeviceToDevice, stream));
}

inline size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

// Bytes of a temporary weight gradient (when only the bias gradient is wanted).
size_t tmp_weight_bytes(const InceptionDWConv2dShape& s) {
  const int64_t taps = std::max({s.kh * s.kw, s.kbw, s.kbh});
  return align256(size_t(s.g * taps) * sizeof(float));
}

}  // namespace

void forward(const TensorView& x, const InceptionDWConv2dWeights& w,
             const InceptionDWConv2dParams& p, const TensorView& y,
             const InceptionDWConv2dShape& s, void* stream) {
  DeviceGuard guard(x.device.index);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  copy_identity(x, y, s, st);
  for (int b = 0; b < 3; ++b) {
    DepthwiseConv2dShape bs;
    DepthwiseConv2dParams bp;
    branch_problem(s, p.dilation, b, &bs, &bp);
    const int64_t c0 = branch_c0(s.c, s.g, b);
    dwconv::cuda::forward(channel_slice(x, c0, s.g), *weight_of(w, b), bias_of(w, b),
                          channel_slice(y, c0, s.g), bs, bp, stream);
  }
}

size_t backward_scratch_bytes(const InceptionDWConv2dShape& s, const InceptionDWConv2dParams& p) {
  size_t need = 0;
  for (int b = 0; b < 3; ++b) {
    DepthwiseConv2dShape bs;
    DepthwiseConv2dParams bp;
    branch_problem(s, p.dilation, b, &bs, &bp);
    need = std::max(need, dwconv::cuda::backward_weight_scratch_bytes(bs, bp));
  }
  return align256(need) + tmp_weight_bytes(s);
}

void backward(const TensorView& grad_y, const TensorView& x, const InceptionDWConv2dWeights& w,
              const InceptionDWConv2dParams& p, const InceptionDWConv2dGrads& grads,
              const InceptionDWConv2dShape& s, void* scratch, size_t scratch_bytes, void* stream) {
  DeviceGuard guard(x.device.index);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (s.n > 0 && grads.x) copy_identity(grad_y, *grads.x, s, st);
  const size_t need = backward_scratch_bytes(s, p);
  FV_CHECK_VALUE(scratch_bytes >= need && (need == 0 || scratch != nullptr),
                 "inception_dwconv2d backward (CUDA): scratch of ", scratch_bytes,
                 " bytes is too small; ", need, " are needed");
  char* tmp_w = static_cast<char*>(scratch) + (need - tmp_weight_bytes(s));
  for (int b = 0; b < 3; ++b) {
    DepthwiseConv2dShape bs;
    DepthwiseConv2dParams bp;
    branch_problem(s, p.dilation, b, &bs, &bp);
    const int64_t c0 = branch_c0(s.c, s.g, b);
    const TensorView gys = channel_slice(grad_y, c0, s.g), xs = channel_slice(x, c0, s.g);
    if (s.n > 0 && grads.x)
      dwconv::cuda::backward_input(gys, *weight_of(w, b), channel_slice(*grads.x, c0, s.g), bs,
                                   bp, stream);
    const TensorView* gw = grad_weight_of(grads, b);
    const TensorView* gb = grad_bias_of(grads, b);
    if (!gw && !gb) continue;
    TensorView tmp;
    if (!gw) {  // bias only: the weight gradient goes to scratch, float32 (g, 1, kh, kw)
      tmp = make_view(tmp_w, DType::Float32, {s.g, 1, bs.kh, bs.kw}, x.device);
      gw = &tmp;
    }
    dwconv::cuda::backward_weight(gys, xs, *gw, gb, bs, bp, scratch, need - tmp_weight_bytes(s),
                                  stream);
  }
}

}  // namespace cuda
}  // namespace incdw
}  // namespace fastvis
