// Depthwise convolution: validation, scratch planning and dispatch to the CPU
// fast paths (cpu_kernels.cpp, per ISA) or the CUDA kernels (cuda/dwconv.cu).
#include "fastvis/depthwise_conv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/cpu_features.h"
#include "core/dtype_convert.h"
#include "core/checks.h"
#include "core/scratch.h"
#include "core/layout.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"
#include "ops/depthwise_conv/checks.h"
#include "ops/depthwise_conv/cpu_kernels.h"
#include "ops/depthwise_conv/internal.h"
#if defined(FASTVIS_WITH_CUDA)
#include "ops/depthwise_conv/dwconv_cuda.h"
#endif

namespace fastvis {
namespace dwconv {

using core::check_cpu;
using core::dense_layouts;

constexpr int64_t kMaxKernel = 63;

void check_output(const TensorView& out, const TensorView& like, int64_t n, int64_t c, int64_t h,
                  int64_t w, const char* name) {
  FV_CHECK_VALUE(out.ndim == 4 && out.shape[0] == n && out.shape[1] == c && out.shape[2] == h &&
                     out.shape[3] == w,
                 name, ": expected shape [", n, ", ", c, ", ", h, ", ", w, "], got ",
                 out.describe());
  FV_CHECK_TYPE(out.dtype == like.dtype, name, ": expected dtype ", dtype_name(like.dtype),
                ", got ", dtype_name(out.dtype));
  FV_CHECK_VALUE(out.device == like.device, name, ": expected a tensor on ",
                 device_name(like.device), ", got one on ", device_name(out.device));
  FV_CHECK_VALUE((dense_layouts(out) & dense_layouts(like)) != 0, name,
                 ": must use the same dense memory layout (NHWC/channels_last or contiguous "
                 "NCHW) as the input");
  FV_CHECK_VALUE(out.data != nullptr || out.numel() == 0, name, ": null data pointer");
}

void check_bias(const TensorView& b, const TensorView& like, int64_t c, const char* name) {
  FV_CHECK_VALUE(b.ndim == 1 && b.shape[0] == c, name, ": expected shape [", c, "], got ",
                 b.describe());
  FV_CHECK_TYPE(b.dtype == like.dtype, name, ": expected dtype ", dtype_name(like.dtype),
                " (the input's), got ", dtype_name(b.dtype));
  FV_CHECK_VALUE(b.device == like.device, name, ": expected a tensor on ",
                 device_name(like.device), ", got one on ", device_name(b.device));
  FV_CHECK_VALUE(b.data != nullptr || c == 0, name, ": null data pointer");
}

WgradPlan wgrad_plan(const Geom& g, int64_t acc_bytes) {
  WgradPlan plan;
  plan.partial_elems = g.kh * g.kw * g.cp + g.cp;
  const int64_t rows = g.n * g.oh;
  const int64_t cblocks = std::max<int64_t>(1, g.cp / channel_block(acc_bytes));
  int64_t rc = std::max<int64_t>(1, (32 + cblocks - 1) / cblocks);  // ~32 work items
  // ... and chunks of at most ~2 MB of x and grad_y (see WgradPlan; counted in
  // accumulator-sized elements, which over-counts bfloat16 storage).
  const int64_t data_bytes = g.n * (g.h * g.w + g.oh * g.ow) * g.c * acc_bytes;
  rc = std::max<int64_t>(rc, data_bytes / (int64_t(2) << 20));
  const int64_t cap = std::max<int64_t>(1, (int64_t(64) << 20) / (plan.partial_elems * acc_bytes));
  rc = std::min({rc, cap, std::max<int64_t>(rows, 1)});
  plan.row_chunks = rc;
  const int64_t cb = channel_block(acc_bytes);
  plan.rt = block_tile_rows(g, acc_bytes);
  plan.x_elems = (tile_rows_in(g, plan.rt) * packed_width(g) * cb + 15) / 16 * 16;
  plan.gy_elems = (plan.rt * g.ow * cb + 15) / 16 * 16;
  if (use_row_wgrad(g, acc_bytes)) {
    // Rows in place (bands and small kernels): an item is a chunk of rows over all
    // channels. Chunks of at least ~12 rows (two bands of 6), at most 16 of them, an even
    // count so that two threads share them evenly (N=1, 56 rows: 4 chunks of 14; N=8: 16
    // of 28). A function of the shape only, as every plan here.
    rc = std::min<int64_t>(16, std::max<int64_t>(1, rows / 12));
    if (rc > 1 && rc % 2) ++rc;
    plan.row_chunks = std::min(rc, std::max<int64_t>(rows, 1));
    // They read x and grad_y in place; the buffer is one zero row of either, in the
    // storage type (no wider than the accumulator type).
    plan.x_elems = (std::max(g.w * in_pitch(g), g.ow * out_pitch(g)) + 15) / 16 * 16;
    plan.gy_elems = 0;
  }
  return plan;
}

void pack_weight(const TensorView& w, int64_t C, int64_t kh, int64_t kw, int64_t cp, bool flip,
                 void* out) {
  const WeightIndex wi(w);
  const size_t a = acc_size(w.dtype);
  // Channels [C, cp) of every tap are zero padding.
  if (cp > C)
    for (int64_t t = 0; t < kh * kw; ++t)
      std::memset(static_cast<char*>(out) + (t * cp + C) * a, 0, static_cast<size_t>(cp - C) * a);
  // Channel after channel (a contiguous weight is read in order), every tap of it. Typed
  // loops: through load_as_double this serial copy took ~1 ms of a 6 ms 31x31 forward at
  // N=1 (961 taps x 128 channels).
  auto copy = [&](auto* o, auto load) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t si = flip ? kh - 1 - i : i;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t sj = flip ? kw - 1 - j : j;
          o[(i * kw + j) * cp + c] = load(wi(c, si, sj));
        }
      }
  };
  if (w.dtype == DType::Float32) {
    const float* src = static_cast<const float*>(w.data);
    copy(static_cast<float*>(out), [src](int64_t k) { return src[k]; });
  } else if (w.dtype == DType::Float64) {
    const double* src = static_cast<const double*>(w.data);
    copy(static_cast<double*>(out), [src](int64_t k) { return src[k]; });
  } else {
    copy(static_cast<float*>(out),
         [&w](int64_t k) { return static_cast<float>(load_as_double(w.dtype, w.data, k)); });
  }
}

void pack_bias(const TensorView& b, int64_t C, int64_t cp, void* out) {
  std::memset(out, 0, cp * acc_size(b.dtype));
  for (int64_t c = 0; c < C; ++c) {
    const double v = load_as_double(b.dtype, b.data, c * b.strides[0]);
    if (b.dtype == DType::Float64)
      static_cast<double*>(out)[c] = v;
    else
      static_cast<float*>(out)[c] = static_cast<float>(v);
  }
}

const Kernels& kernels() {
  static const Kernels k = [] {
#if defined(FV_HAVE_ISA_AVX512)
    if (cpu::selected_isa() == cpu::Isa::Avx512)
      return Kernels{&avx512::forward, &avx512::forward_rows, &avx512::backward_input_gather,
                     &avx512::backward_weight_partials};
#endif
#if defined(FV_HAVE_ISA_AVX2)
    if (cpu::selected_isa() == cpu::Isa::Avx2)
      return Kernels{&avx2::forward, &avx2::forward_rows, &avx2::backward_input_gather,
                     &avx2::backward_weight_partials};
#endif
    return Kernels{&generic::forward, &generic::forward_rows, &generic::backward_input_gather,
                   &generic::backward_weight_partials};
  }();
  return k;
}

void reduce_weight_partials(DType dt, const Geom& g, const WgradPlan& plan, const void* partial,
                            const TensorView* grad_weight, const TensorView* grad_bias) {
  TensorView none;
  none.ndim = 4;  // strides all zero: never used when grad_weight is null
  const WeightIndex wi(grad_weight ? *grad_weight : none);
  const int64_t KK = g.kh * g.kw, RC = plan.row_chunks, PE = plan.partial_elems;
  const bool dbl = dt == DType::Float64;
  auto sum_at = [&](int64_t e_idx) {
    double acc = 0.0;
    if (dbl) {
      const double* pp = static_cast<const double*>(partial);
      for (int64_t r = 0; r < RC; ++r) acc += pp[r * PE + e_idx];
    } else {
      const float* pp = static_cast<const float*>(partial);
      float f = 0.f;
      for (int64_t r = 0; r < RC; ++r) f += pp[r * PE + e_idx];
      acc = f;
    }
    return acc;
  };
  // Blocks of 16 channels, tap after tap: the partials are read along channels (a cache
  // line per tap and chunk) and the block's gradient rows stay in L1. Channel after channel
  // with the taps inside read a line per element instead: at N=1 (640 x 7 x 7, 13x13) that
  // took 45 % of the weight gradient's time. Same sums, same order per element.
  constexpr int64_t kBlock = 16;
  const bool f32 = !dbl && grad_weight && grad_weight->dtype == DType::Float32;
  parallel_for(g.c, kBlock, [&](int64_t c0, int64_t c1) {
    double acc[kBlock];
    float facc[kBlock];
    for (int64_t cb = c0; cb < c1; cb += kBlock) {
      const int64_t ce = std::min(c1, cb + kBlock), nc = ce - cb;
      if (f32) {  // float partials into a float gradient: the same float sums, typed
        const float* pp = static_cast<const float*>(partial);
        float* gw = static_cast<float*>(grad_weight->data);
        for (int64_t k = 0; k < KK; ++k) {
          const int64_t i = k / g.kw, j = k % g.kw;
          const float* p0 = pp + k * g.cp + cb;
          for (int64_t c = 0; c < nc; ++c) facc[c] = 0.f;
          for (int64_t r = 0; r < RC; ++r)
            for (int64_t c = 0; c < nc; ++c) facc[c] += p0[r * PE + c];
          for (int64_t c = 0; c < nc; ++c) gw[wi(cb + c, i, j)] = facc[c];
        }
      } else if (grad_weight) {
        for (int64_t k = 0; k < KK; ++k) {
          const int64_t i = k / g.kw, j = k % g.kw;
          for (int64_t c = cb; c < ce; ++c) acc[c - cb] = sum_at(k * g.cp + c);
          for (int64_t c = cb; c < ce; ++c)
            store_from_double(grad_weight->dtype, grad_weight->data, wi(c, i, j), acc[c - cb]);
        }
      }
      if (grad_bias)
        for (int64_t c = cb; c < ce; ++c)
          store_from_double(grad_bias->dtype, grad_bias->data, c * grad_bias->strides[0],
                            sum_at(KK * g.cp + c));
    }
  });
}

namespace {

Geom forward_geom(const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p, DType dt) {
  return Geom{s.n,          s.c,        s.h,           s.w,          s.kh,
              s.kw,         s.oh,       s.ow,          p.stride_h,   p.stride_w,
              p.pad_top,    p.pad_left, p.dilation_h,  p.dilation_w,
              padded_channels(s.c, static_cast<int64_t>(acc_size(dt)))};
}

// The correlation that computes the stride-1 input gradient: grad_y with the flipped
// kernel, padded by dilation*(k-1) - pad (>= 0 as pads are at most that).
Geom backward_input_geom(const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p, DType dt) {
  return Geom{s.n, s.c, s.oh, s.ow, s.kh, s.kw, s.h, s.w, 1, 1,
              (s.kh - 1) * p.dilation_h - p.pad_top, (s.kw - 1) * p.dilation_w - p.pad_left,
              p.dilation_h, p.dilation_w, padded_channels(s.c, static_cast<int64_t>(acc_size(dt)))};
}

// Bytes of the per-thread tile buffers of the forward kernel for geometry g.
size_t fwd_buffer_bytes(const Geom& g, DType dt) {
  const int64_t a = static_cast<int64_t>(acc_size(dt));
  return align64(static_cast<size_t>(fwd_plan(g, a).buf_elems * a)) *
         static_cast<size_t>(get_num_threads());
}

#if !defined(FASTVIS_WITH_CUDA)
[[noreturn]] void no_cuda() {
  detail::throw_error(ErrorKind::Runtime,
                      "got CUDA tensors, but this build of fastvis has no CUDA backend "
                      "(rebuild with FASTVIS_CUDA=on and a CUDA compiler)");
}
#endif

void check_cuda_dtype(const TensorView& x) {
  FV_CHECK_TYPE(x.dtype == DType::Float32 || x.dtype == DType::Float16 ||
                    x.dtype == DType::BFloat16,
                "x: the CUDA backend supports float32, float16 and bfloat16, got ",
                dtype_name(x.dtype));
}

// The layout both activations are dense in, NHWC preferred (tensors with C == 1 or
// H == W == 1 are dense in both).
Layout common_layout(const TensorView& a, const TensorView& b) {
  return (dense_layouts(a) & dense_layouts(b) & 2) ? Layout::NHWC : Layout::NCHW;
}

bool stride_one(const DepthwiseConv2dParams& p) { return p.stride_h == 1 && p.stride_w == 1; }

}  // namespace
}  // namespace dwconv

using namespace dwconv;

Layout activation_layout(const TensorView& t, const char* name) {
  FV_CHECK_VALUE(t.ndim == 4, name, ": expected a 4-D (N, C, H, W) tensor, got ", t.describe());
  const int l = dense_layouts(t);
  FV_CHECK_VALUE(l != 0, name,
                 ": unsupported memory layout; expected channels_last (NHWC) or contiguous NCHW "
                 "strides (call .contiguous() or .contiguous(memory_format=torch.channels_last))");
  return (l & 2) ? Layout::NHWC : Layout::NCHW;
}

DepthwiseConv2dShape depthwise_conv2d_shape(const TensorView& x, const TensorView& weight,
                                            const DepthwiseConv2dParams& p) {
  const core::NchwDims d = core::activation_dims(x, "x");
  FV_CHECK_VALUE(weight.ndim == 4 || weight.ndim == 3,
                 "weight: expected shape (C, 1, kh, kw) or (C, kh, kw), got ", weight.describe());
  FV_CHECK_TYPE(weight.dtype == x.dtype, "weight: expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(weight.dtype));
  FV_CHECK_VALUE(weight.device == x.device, "weight is on ", device_name(weight.device),
                 " but x is on ", device_name(x.device), "; both must be on the same device");
  DepthwiseConv2dShape s;
  s.n = d.n;
  s.c = d.c;
  s.h = d.h;
  s.w = d.w;
  FV_CHECK_VALUE(s.h > 0 && s.w > 0, "x: spatial size must be positive, got ", x.describe());
  if (weight.ndim == 4)
    FV_CHECK_VALUE(weight.shape[1] == 1,
                   "weight: a depthwise convolution has one input channel per group, so the "
                   "weight must be (C, 1, kh, kw); got ",
                   weight.describe());
  FV_CHECK_VALUE(weight.shape[0] == s.c, "weight: expected ", s.c,
                 " output channels (one per input channel, groups=C), got ", weight.describe());
  s.kh = weight.shape[weight.ndim - 2];
  s.kw = weight.shape[weight.ndim - 1];
  FV_CHECK_VALUE(s.kh >= 1 && s.kh <= kMaxKernel && s.kw >= 1 && s.kw <= kMaxKernel,
                 "weight: kernel size must be between 1 and ", kMaxKernel,
                 " in each dimension, got ", s.kh, "x", s.kw);
  FV_CHECK_VALUE((p.stride_h == 1 || p.stride_h == 2) && (p.stride_w == 1 || p.stride_w == 2),
                 "stride: expected 1 or 2 in each dimension, got (", p.stride_h, ", ", p.stride_w,
                 ")");
  FV_CHECK_VALUE(p.dilation_h >= 1 && p.dilation_w >= 1 && p.dilation_h <= 1024 &&
                     p.dilation_w <= 1024,
                 "dilation: expected values in [1, 1024], got (", p.dilation_h, ", ",
                 p.dilation_w, ")");
  const int64_t eh = (s.kh - 1) * p.dilation_h, ew = (s.kw - 1) * p.dilation_w;
  FV_CHECK_VALUE(p.pad_top >= 0 && p.pad_bottom >= 0 && p.pad_left >= 0 && p.pad_right >= 0,
                 "padding: must be non-negative, got (top ", p.pad_top, ", bottom ", p.pad_bottom,
                 ", left ", p.pad_left, ", right ", p.pad_right, ")");
  FV_CHECK_VALUE(p.pad_top <= eh && p.pad_bottom <= eh && p.pad_left <= ew && p.pad_right <= ew,
                 "padding: each side may be at most dilation*(kernel-1) (", eh, " rows, ", ew,
                 " columns here), got (top ", p.pad_top, ", bottom ", p.pad_bottom, ", left ",
                 p.pad_left, ", right ", p.pad_right, ")");
  const int64_t ph = s.h + p.pad_top + p.pad_bottom, pw = s.w + p.pad_left + p.pad_right;
  FV_CHECK_VALUE(ph > eh && pw > ew, "x: padded input ", ph, "x", pw,
                 " is smaller than the dilated kernel ", eh + 1, "x", ew + 1);
  s.oh = (ph - eh - 1) / p.stride_h + 1;
  s.ow = (pw - ew - 1) / p.stride_w + 1;
  FV_CHECK_VALUE(x.data != nullptr || x.numel() == 0, "x: null data pointer");
  FV_CHECK_VALUE(weight.data != nullptr, "weight: null data pointer");
  s.layout = activation_layout(x, "x");
  return s;
}

// ---------------------------------------------------------------- forward

size_t depthwise_conv2d_forward_scratch_bytes(const TensorView& x, const TensorView& weight,
                                              const DepthwiseConv2dParams& p) {
  const DepthwiseConv2dShape s = depthwise_conv2d_shape(x, weight, p);
  if (x.device.type == DeviceType::CUDA) return 0;
  const size_t a = acc_size(x.dtype), e = x.itemsize();
  const Geom g = forward_geom(s, p, x.dtype);
  size_t b = align64(s.kh * s.kw * g.cp * a) + align64(g.cp * a) + fwd_buffer_bytes(g, x.dtype);
  if (dense_layouts(x) & 1) b += align64(s.n * s.c * s.h * s.w * e) + align64(s.n * s.c * s.oh * s.ow * e);
  return b;
}

void depthwise_conv2d_forward(const TensorView& x, const TensorView& weight,
                              const TensorView* bias, const TensorView& y,
                              const DepthwiseConv2dParams& p, void* scratch, size_t scratch_bytes,
                              void* stream) {
  DepthwiseConv2dShape s = depthwise_conv2d_shape(x, weight, p);
  check_output(y, x, s.n, s.c, s.oh, s.ow, "y");
  s.layout = common_layout(x, y);
  if (bias) check_bias(*bias, x, s.c, "bias");
  if (x.device.type == DeviceType::CUDA) {
    check_cuda_dtype(x);
#if defined(FASTVIS_WITH_CUDA)
    if (s.n == 0) return;
    cuda::forward(x, weight, bias, y, s, p, stream);
    return;
#else
    no_cuda();
#endif
  }
  check_cpu(x, "x");
  const size_t need = depthwise_conv2d_forward_scratch_bytes(x, weight, p);
  FV_CHECK_VALUE(scratch_bytes >= need && (scratch != nullptr || need == 0),
                 "scratch: need ", need, " bytes, got ", scratch_bytes);
  if (s.n == 0) return;
  const size_t a = acc_size(x.dtype), e = x.itemsize();
  ScratchCarver sc(scratch, scratch_bytes);
  const Geom g = forward_geom(s, p, x.dtype);
  const int nbufs = get_num_threads();
  void* wpk = sc.take(s.kh * s.kw * g.cp * a);
  void* bpk = sc.take(g.cp * a);
  void* bufs = sc.take(fwd_buffer_bytes(g, x.dtype));
  pack_weight(weight, s.c, s.kh, s.kw, g.cp, false, wpk);
  if (bias) pack_bias(*bias, s.c, g.cp, bpk);
  if (s.layout == Layout::NHWC) {
    kernels().forward(x.dtype, g, x.data, wpk, bias ? bpk : nullptr, y.data, bufs, nbufs);
  } else {
    void* xh = sc.take(s.n * s.c * s.h * s.w * e);
    void* yh = sc.take(s.n * s.c * s.oh * s.ow * e);
    nchw_to_nhwc(x.data, xh, s.n, s.c, s.h * s.w, e);
    kernels().forward(x.dtype, g, xh, wpk, bias ? bpk : nullptr, yh, bufs, nbufs);
    nhwc_to_nchw(yh, y.data, s.n, s.c, s.oh * s.ow, e);
  }
}

// ---------------------------------------------------------------- backward input

size_t depthwise_conv2d_backward_input_scratch_bytes(const TensorView& grad_y,
                                                     const TensorView& weight,
                                                     const TensorView& grad_x,
                                                     const DepthwiseConv2dParams& p) {
  const DepthwiseConv2dShape s = depthwise_conv2d_shape(grad_x, weight, p);
  if (grad_x.device.type == DeviceType::CUDA) return 0;
  const size_t a = acc_size(grad_x.dtype), e = grad_x.itemsize();
  const Geom g = forward_geom(s, p, grad_x.dtype);
  size_t b = align64(s.kh * s.kw * g.cp * a);
  if (stride_one(p)) b += fwd_buffer_bytes(backward_input_geom(s, p, grad_x.dtype), grad_x.dtype);
  if (dense_layouts(grad_x) & 1) b += align64(s.n * s.c * s.h * s.w * e) + align64(s.n * s.c * s.oh * s.ow * e);
  return b;
}

void depthwise_conv2d_backward_input(const TensorView& grad_y, const TensorView& weight,
                                     const TensorView& grad_x, const DepthwiseConv2dParams& p,
                                     void* scratch, size_t scratch_bytes, void* stream) {
  DepthwiseConv2dShape s = depthwise_conv2d_shape(grad_x, weight, p);
  check_output(grad_y, grad_x, s.n, s.c, s.oh, s.ow, "grad_y");
  s.layout = common_layout(grad_x, grad_y);
  if (grad_x.device.type == DeviceType::CUDA) {
    check_cuda_dtype(grad_x);
#if defined(FASTVIS_WITH_CUDA)
    if (s.n == 0) return;
    cuda::backward_input(grad_y, weight, grad_x, s, p, stream);
    return;
#else
    no_cuda();
#endif
  }
  check_cpu(grad_x, "grad_x");
  const size_t need = depthwise_conv2d_backward_input_scratch_bytes(grad_y, weight, grad_x, p);
  FV_CHECK_VALUE(scratch_bytes >= need && (scratch != nullptr || need == 0),
                 "scratch: need ", need, " bytes, got ", scratch_bytes);
  if (s.n == 0) return;
  const size_t a = acc_size(grad_x.dtype), e = grad_x.itemsize();
  ScratchCarver sc(scratch, scratch_bytes);
  const int64_t cp = forward_geom(s, p, grad_x.dtype).cp;
  void* wpk = sc.take(s.kh * s.kw * cp * a);
  const void* gy = grad_y.data;
  void* gx = grad_x.data;
  void* gxh = nullptr;
  if (s.layout == Layout::NCHW) {
    void* gyh = sc.take(s.n * s.c * s.oh * s.ow * e);
    gxh = sc.take(s.n * s.c * s.h * s.w * e);
    nchw_to_nhwc(grad_y.data, gyh, s.n, s.c, s.oh * s.ow, e);
    gy = gyh;
    gx = gxh;
  }
  if (stride_one(p)) {
    const Geom g = backward_input_geom(s, p, grad_x.dtype);
    void* bufs = sc.take(fwd_buffer_bytes(g, grad_x.dtype));
    pack_weight(weight, s.c, s.kh, s.kw, cp, true, wpk);
    kernels().forward(grad_x.dtype, g, gy, wpk, nullptr, gx, bufs, get_num_threads());
  } else {
    pack_weight(weight, s.c, s.kh, s.kw, cp, false, wpk);
    kernels().backward_input_gather(grad_x.dtype, forward_geom(s, p, grad_x.dtype), gy, wpk, gx);
  }
  if (gxh) nhwc_to_nchw(gxh, grad_x.data, s.n, s.c, s.h * s.w, e);
}

// ---------------------------------------------------------------- backward weight

size_t depthwise_conv2d_backward_weight_scratch_bytes(const TensorView& grad_y,
                                                      const TensorView& x,
                                                      const TensorView& grad_weight,
                                                      const DepthwiseConv2dParams& p) {
  const DepthwiseConv2dShape s = depthwise_conv2d_shape(x, grad_weight, p);
  if (x.device.type == DeviceType::CUDA) {
#if defined(FASTVIS_WITH_CUDA)
    return cuda::backward_weight_scratch_bytes(s, p);
#else
    return 0;
#endif
  }
  const size_t a = acc_size(x.dtype), e = x.itemsize();
  const WgradPlan plan = wgrad_plan(forward_geom(s, p, x.dtype), a);
  size_t b = align64(plan.row_chunks * plan.partial_elems * a) +
             align64((plan.x_elems + plan.gy_elems) * a * get_num_threads());
  if (dense_layouts(x) & 1) b += align64(s.n * s.c * s.h * s.w * e) + align64(s.n * s.c * s.oh * s.ow * e);
  return b;
}

void depthwise_conv2d_backward_weight(const TensorView& grad_y, const TensorView& x,
                                      const TensorView& grad_weight, const TensorView* grad_bias,
                                      const DepthwiseConv2dParams& p, void* scratch,
                                      size_t scratch_bytes, void* stream) {
  DepthwiseConv2dShape s = depthwise_conv2d_shape(x, grad_weight, p);
  check_output(grad_y, x, s.n, s.c, s.oh, s.ow, "grad_y");
  if (grad_bias) check_bias(*grad_bias, x, s.c, "grad_bias");
  s.layout = common_layout(x, grad_y);
  if (x.device.type == DeviceType::CUDA) {
    check_cuda_dtype(x);
#if defined(FASTVIS_WITH_CUDA)
    cuda::backward_weight(grad_y, x, grad_weight, grad_bias, s, p, scratch, scratch_bytes, stream);
    return;
#else
    no_cuda();
#endif
  }
  check_cpu(x, "x");
  const size_t need = depthwise_conv2d_backward_weight_scratch_bytes(grad_y, x, grad_weight, p);
  FV_CHECK_VALUE(scratch_bytes >= need && scratch != nullptr, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  const size_t a = acc_size(x.dtype), e = x.itemsize();
  const Geom g = forward_geom(s, p, x.dtype);
  const WgradPlan plan = wgrad_plan(g, a);
  const int nbufs = get_num_threads();
  ScratchCarver sc(scratch, scratch_bytes);
  void* partial = sc.take(plan.row_chunks * plan.partial_elems * a);
  void* bufs = sc.take((plan.x_elems + plan.gy_elems) * a * nbufs);
  if (s.n == 0) {
    std::memset(partial, 0, plan.row_chunks * plan.partial_elems * a);
  } else if (s.layout == Layout::NHWC) {
    kernels().backward_weight_partials(x.dtype, g, plan, grad_y.data, x.data, partial, bufs, nbufs);
  } else {
    void* xh = sc.take(s.n * s.c * s.h * s.w * e);
    void* gyh = sc.take(s.n * s.c * s.oh * s.ow * e);
    nchw_to_nhwc(x.data, xh, s.n, s.c, s.h * s.w, e);
    nchw_to_nhwc(grad_y.data, gyh, s.n, s.c, s.oh * s.ow, e);
    kernels().backward_weight_partials(x.dtype, g, plan, gyh, xh, partial, bufs, nbufs);
  }
  // Fixed-order reduction over the row chunks (deterministic, thread-count independent).
  reduce_weight_partials(x.dtype, g, plan, partial, &grad_weight, grad_bias);
}

}  // namespace fastvis
