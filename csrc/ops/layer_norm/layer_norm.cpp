// LayerNorm over channels: validation, weight packing, scratch planning, dispatch to
// the CPU kernels (cpu_kernels.cpp, per ISA) and the deterministic reduction of the
// weight/bias gradients.
#include "fastvis/layer_norm.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/cpu_features.h"
#include "core/dtype_convert.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"
#include "core/checks.h"
#include "core/scratch.h"
#include "ops/layer_norm/checks.h"
#include "ops/layer_norm/cpu_kernels.h"

namespace fastvis {
namespace layernorm {

void check_activation(const TensorView& t, const TensorView& x, const LayerNormShape& s,
                      const char* name) {
  core::check_activation_like(t, x, s.n, s.c, s.h, s.w, name);
}

void check_channel_vector(const TensorView& t, const TensorView& x, const LayerNormShape& s,
                          const char* name) {
  FV_CHECK_VALUE(t.ndim == 1 && t.shape[0] == s.c, name, ": expected shape [", s.c,
                 "] (one value per channel), got ", t.describe());
  FV_CHECK_TYPE(t.dtype == x.dtype, name, ": expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(t.dtype));
  FV_CHECK_VALUE(t.device == x.device, name, " is on ", device_name(t.device), " but x is on ",
                 device_name(x.device), "; both must be on the same device");
  FV_CHECK_VALUE(t.data != nullptr, name, ": null data pointer");
}

void check_stats(const TensorView& t, const TensorView& x, const LayerNormShape& s,
                 const char* name) {
  const int64_t want[3] = {s.n, s.h, s.w};
  core::check_row_major(t, x, want, 3, layer_norm_stats_dtype(x.dtype), name,
                        "one value per pixel");
}

Layout common_layout(const TensorView* const* ts, int count) {
  return core::common_dense_layout(ts, count, "layer_norm_channels");
}

namespace {

using core::acc_size;
using core::align64;
using core::ScratchCarver;

Geom geom_of(const LayerNormShape& s, Layout layout) {
  return Geom{s.n, s.c, s.h * s.w, layout == Layout::NHWC};
}

// A channel vector (any stride) in the accumulation type, or `fill` when absent.
void pack_channels(const TensorView* t, int64_t C, DType dt, double fill, void* out) {
  for (int64_t c = 0; c < C; ++c) {
    const double v = t ? load_as_double(t->dtype, t->data, c * t->strides[0]) : fill;
    if (dt == DType::Float64)
      static_cast<double*>(out)[c] = v;
    else
      static_cast<float*>(out)[c] = static_cast<float>(v);
  }
}

struct Kernels {
  void (*forward)(DType, const Geom&, const void*, const void*, const void*, double, void*, void*,
                  void*, void*, int);
  void (*backward)(DType, const Geom&, int64_t, const void*, const void*, const void*,
                   const void*, const void*, void*, void*, void*, int);
};

const Kernels& kernels() {
  static const Kernels k = [] {
#if defined(FV_HAVE_ISA_AVX512)
    if (cpu::selected_isa() == cpu::Isa::Avx512) return Kernels{&avx512::forward, &avx512::backward};
#endif
#if defined(FV_HAVE_ISA_AVX2)
    if (cpu::selected_isa() == cpu::Isa::Avx2) return Kernels{&avx2::forward, &avx2::backward};
#endif
    return Kernels{&generic::forward, &generic::backward};
  }();
  return k;
}

void refuse_cuda(const TensorView& x) {
  FV_CHECK_RUNTIME(x.device.type != DeviceType::CUDA,
                   "layer_norm_channels: no CUDA kernels yet (got ", x.describe(),
                   "); the Python op runs the PyTorch reference on CUDA tensors");
  core::check_cpu(x, "x");
}

// Bytes for a geometry: packed weight/bias (or weight only) + per-thread buffers.
size_t forward_bytes(const Geom& g, DType dt) {
  const size_t a = acc_size(dt);
  return 2 * align64(g.c * a) +
         align64(fwd_buffer_elems(g, static_cast<int64_t>(a)) * a) * get_num_threads();
}

size_t backward_bytes(const Geom& g, DType dt) {
  const size_t a = acc_size(dt);
  return align64(g.c * a) + align64(bwd_chunks(g) * 2 * g.c * a) +
         align64(bwd_buffer_elems(g, static_cast<int64_t>(a)) * a) * get_num_threads();
}

Layout layout_of(const TensorView& x, const LayerNormShape& s) {
  const TensorView* ts[1] = {&x};
  return common_layout(ts, 1);
}

}  // namespace
}  // namespace layernorm

using namespace layernorm;

DType layer_norm_stats_dtype(DType dt) {
  return dt == DType::Float64 ? DType::Float64 : DType::Float32;
}

LayerNormShape layer_norm_channels_shape(const TensorView& x, const TensorView* weight,
                                         const TensorView* bias, double eps) {
  const core::NchwDims d = core::activation_dims(x, "x");
  LayerNormShape s;
  s.n = d.n;
  s.c = d.c;
  s.h = d.h;
  s.w = d.w;
  FV_CHECK_VALUE(std::isfinite(eps) && eps > 0.0,
                 "eps: expected a positive finite number, got ", eps);
  if (weight) check_channel_vector(*weight, x, s, "weight");
  if (bias) check_channel_vector(*bias, x, s, "bias");
  FV_CHECK_VALUE(x.data != nullptr || x.numel() == 0, "x: null data pointer");
  // The fast paths require a dense layout (common_layout); the references take any strides.
  s.layout = (core::dense_layouts(x) & 2) ? Layout::NHWC : Layout::NCHW;
  return s;
}

size_t layer_norm_channels_forward_scratch_bytes(const TensorView& x) {
  const LayerNormShape s = layer_norm_channels_shape(x, nullptr, nullptr, 1.0);
  if (x.device.type == DeviceType::CUDA) return 0;
  return forward_bytes(geom_of(s, layout_of(x, s)), x.dtype);
}

void layer_norm_channels_forward(const TensorView& x, const TensorView* weight,
                                 const TensorView* bias, double eps, const TensorView& y,
                                 const TensorView* mean, const TensorView* rstd, void* scratch,
                                 size_t scratch_bytes) {
  const LayerNormShape s = layer_norm_channels_shape(x, weight, bias, eps);
  check_activation(y, x, s, "y");
  if (mean) check_stats(*mean, x, s, "mean");
  if (rstd) check_stats(*rstd, x, s, "rstd");
  refuse_cuda(x);
  const TensorView* acts[2] = {&x, &y};
  const Layout layout = common_layout(acts, 2);
  const Geom g = geom_of(s, layout);
  const size_t need = forward_bytes(g, x.dtype);
  FV_CHECK_VALUE(scratch_bytes >= need && scratch != nullptr, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  if (s.n * s.h * s.w == 0) return;
  const size_t a = acc_size(x.dtype);
  ScratchCarver sc(scratch, scratch_bytes);
  void* wpk = sc.take(s.c * a);
  void* bpk = sc.take(s.c * a);
  const int nbufs = get_num_threads();
  void* bufs = sc.take(fwd_buffer_elems(g, static_cast<int64_t>(a)) * a * nbufs);
  pack_channels(weight, s.c, x.dtype, 1.0, wpk);
  pack_channels(bias, s.c, x.dtype, 0.0, bpk);
  kernels().forward(x.dtype, g, x.data, wpk, bpk, eps, y.data, mean ? mean->data : nullptr,
                    rstd ? rstd->data : nullptr, bufs, nbufs);
}

size_t layer_norm_channels_backward_scratch_bytes(const TensorView& x) {
  const LayerNormShape s = layer_norm_channels_shape(x, nullptr, nullptr, 1.0);
  if (x.device.type == DeviceType::CUDA) return 0;
  return backward_bytes(geom_of(s, layout_of(x, s)), x.dtype);
}

void layer_norm_channels_backward(const TensorView& grad_y, const TensorView& x,
                                  const TensorView* weight, const TensorView& mean,
                                  const TensorView& rstd, const TensorView* grad_x,
                                  const TensorView* grad_weight, const TensorView* grad_bias,
                                  void* scratch, size_t scratch_bytes) {
  const LayerNormShape s = layer_norm_channels_shape(x, weight, nullptr, 1.0);
  check_activation(grad_y, x, s, "grad_y");
  if (grad_x) check_activation(*grad_x, x, s, "grad_x");
  check_stats(mean, x, s, "mean");
  check_stats(rstd, x, s, "rstd");
  if (grad_weight) check_channel_vector(*grad_weight, x, s, "grad_weight");
  if (grad_bias) check_channel_vector(*grad_bias, x, s, "grad_bias");
  refuse_cuda(x);
  const TensorView* acts[3] = {&x, &grad_y, grad_x ? grad_x : &x};
  const Layout layout = common_layout(acts, 3);
  const Geom g = geom_of(s, layout);
  const size_t need = backward_bytes(g, x.dtype);
  FV_CHECK_VALUE(scratch_bytes >= need && scratch != nullptr, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  const size_t a = acc_size(x.dtype);
  const int64_t chunks = bwd_chunks(g);
  const bool want_params = grad_weight != nullptr || grad_bias != nullptr;
  ScratchCarver sc(scratch, scratch_bytes);
  void* wpk = sc.take(s.c * a);
  void* partial = sc.take(chunks * 2 * s.c * a);
  const int nbufs = get_num_threads();
  void* bufs = sc.take(bwd_buffer_elems(g, static_cast<int64_t>(a)) * a * nbufs);
  pack_channels(weight, s.c, x.dtype, 1.0, wpk);
  if (s.n * s.h * s.w == 0) {
    std::memset(partial, 0, chunks * 2 * s.c * a);
  } else if (grad_x || want_params) {
    kernels().backward(x.dtype, g, chunks, grad_y.data, x.data, wpk, mean.data, rstd.data,
                       grad_x ? grad_x->data : nullptr, want_params ? partial : nullptr, bufs,
                       nbufs);
  }
  if (!want_params) return;
  // Fixed-order reduction over the chunks (deterministic, thread-count independent).
  const bool dbl = x.dtype == DType::Float64;
  const int64_t C = s.c;
  auto sum_at = [&](int64_t i) {
    if (dbl) {
      const double* pp = static_cast<const double*>(partial);
      double acc = 0.0;
      for (int64_t r = 0; r < chunks; ++r) acc += pp[r * 2 * C + i];
      return acc;
    }
    const float* pp = static_cast<const float*>(partial);
    float acc = 0.f;
    for (int64_t r = 0; r < chunks; ++r) acc += pp[r * 2 * C + i];
    return static_cast<double>(acc);
  };
  for (int64_t c = 0; c < C; ++c) {
    if (grad_weight)
      store_from_double(grad_weight->dtype, grad_weight->data, c * grad_weight->strides[0],
                        sum_at(c));
    if (grad_bias)
      store_from_double(grad_bias->dtype, grad_bias->data, c * grad_bias->strides[0],
                        sum_at(C + c));
  }
}

}  // namespace fastvis
