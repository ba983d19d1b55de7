// The Inception depthwise convolution: validation, scratch planning, the fused CPU pass
// and the dispatch to CUDA (cuda/inception_dwconv.cu).
//
// CPU design. The depthwise family's kernels take a pixel pitch (dwconv::Geom::xpitch /
// ypitch), so each branch runs on a channel slice of the NHWC x and y in place.
// Forward = one parallel loop over (image, band of rows): per band, copy the identity
// channels, then run the square and the two band convolutions on the band's output rows
// (dwconv::forward_rows, serially in the worker, with its packed-tile kernel), so every
// input row is touched while it is in cache and nothing activation-sized is written
// besides y. With "same" symmetric padding the stride-1 input gradient of a branch is
// the same correlation with the kernel rotated by 180 degrees, so grad_x is the same
// fused pass over grad_y with flipped weights and no bias (identity channels: grad_y).
// Weight / bias gradients: the depthwise family's weight-gradient kernel per branch on
// the slices, with its shape-determined split and fixed-order reduction.
#include "fastvis/inception_dwconv.h"

#include <algorithm>
#include <cstring>

#include "core/checks.h"
#include "core/layout.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"
#include "ops/depthwise_conv/checks.h"
#include "ops/depthwise_conv/cpu_kernels.h"
#include "ops/depthwise_conv/internal.h"
#include "ops/inception_dwconv/slices.h"
#if defined(FASTVIS_WITH_CUDA)
#include "ops/inception_dwconv/inception_cuda.h"
#endif

namespace fastvis {
namespace incdw {
namespace {

using core::dense_layouts;
using dwconv::acc_size;
using dwconv::align64;
using dwconv::Geom;
using dwconv::ScratchCarver;
using dwconv::WgradPlan;

constexpr int64_t kMaxKernel = 63;
const char* const kWeightNames[3] = {"hw_weight", "w_weight", "h_weight"};
const char* const kBiasNames[3] = {"hw_bias", "w_bias", "h_bias"};

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

void check_weight(const TensorView& w, const TensorView& x, const char* name) {
  FV_CHECK_VALUE(w.ndim == 4, name, ": expected a 4-D (g, 1, kh, kw) depthwise weight, got ",
                 w.describe());
  FV_CHECK_TYPE(w.dtype == x.dtype, name, ": expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(w.dtype));
  FV_CHECK_VALUE(w.device == x.device, name, " is on ", device_name(w.device), " but x is on ",
                 device_name(x.device), "; all tensors must be on the same device");
  FV_CHECK_VALUE(w.shape[1] == 1, name,
                 ": a depthwise convolution has one input channel per group, so the weight must "
                 "be (g, 1, kh, kw); got ",
                 w.describe());
  FV_CHECK_VALUE(w.data != nullptr || w.numel() == 0, name, ": null data pointer");
}

void check_kernel_extent(int64_t k, int64_t d, const char* name, const char* dim) {
  FV_CHECK_VALUE(k >= 1 && k <= kMaxKernel, name, ": kernel ", dim, " must be between 1 and ",
                 kMaxKernel, ", got ", k);
  FV_CHECK_VALUE((d * (k - 1)) % 2 == 0, name, ": kernel ", dim, " ", k, " with dilation ", d,
                 " has no symmetric 'same' padding (dilation*(k-1) = ", d * (k - 1),
                 " is odd; timm's padding would shrink the output); use an odd kernel size");
}

Geom branch_geom(const InceptionDWConv2dShape& s, int64_t d, int b, DType dt, int64_t pitch) {
  DepthwiseConv2dShape bs;
  DepthwiseConv2dParams bp;
  branch_problem(s, d, b, &bs, &bp);
  Geom g{bs.n,       bs.c,        bs.h,          bs.w,          bs.kh,
         bs.kw,      bs.oh,       bs.ow,         bp.stride_h,   bp.stride_w,
         bp.pad_top, bp.pad_left, bp.dilation_h, bp.dilation_w,
         dwconv::padded_channels(bs.c, static_cast<int64_t>(acc_size(dt)))};
  g.xpitch = pitch;
  g.ypitch = pitch;
  return g;
}

// The layout every activation argument is dense in (NHWC preferred), or an error.
Layout common_layout(std::initializer_list<const TensorView*> ts) {
  int l = 3;
  for (const TensorView* t : ts)
    if (t) l &= dense_layouts(*t);
  FV_CHECK_VALUE(l != 0,
                 "x, y / grad_y and grad_x must all use one dense memory layout (channels_last "
                 "or contiguous NCHW)");
  return (l & 2) ? Layout::NHWC : Layout::NCHW;
}

void check_activation(const TensorView& t, const TensorView& x, const InceptionDWConv2dShape& s,
                      const char* name) {
  dwconv::check_output(t, x, s.n, s.c, s.h, s.w, name);
}

// ------------------------------------------------------------------ scratch layout

struct Regions {
  void* wpk[3] = {};
  void* bpk[3] = {};
  void* bufs = nullptr;
  void* partial = nullptr;
  void* xh = nullptr;   // NCHW: x's branch channels, NHWC (n, h, w, 3g)
  void* yh = nullptr;   // NCHW: y's (forward) / grad_y's (backward) branch channels
  void* gxh = nullptr;  // NCHW backward: grad_x's branch channels
};

int64_t fused_buf_elems(const InceptionDWConv2dShape& s, int64_t d, DType dt) {
  int64_t e = 0;
  for (int b = 0; b < 3; ++b)
    e = std::max(e, dwconv::fwd_plan(branch_geom(s, d, b, dt, 0), acc_size(dt), false).buf_elems);
  return e;
}

Regions carve(ScratchCarver& sc, const InceptionDWConv2dShape& s, int64_t d, DType dt,
              bool backward) {
  const size_t a = acc_size(dt), e = dtype_size(dt);
  const int nthreads = get_num_threads();
  Regions r;
  int64_t buf = fused_buf_elems(s, d, dt);
  size_t partial = 0;
  for (int b = 0; b < 3; ++b) {
    const Geom g = branch_geom(s, d, b, dt, 0);
    r.wpk[b] = sc.take(g.kh * g.kw * g.cp * a);
    if (!backward) r.bpk[b] = sc.take(g.cp * a);
    if (backward) {
      const WgradPlan pl = dwconv::wgrad_plan(g, static_cast<int64_t>(a));
      buf = std::max(buf, pl.x_elems + pl.gy_elems);
      partial = std::max(partial, static_cast<size_t>(pl.row_chunks * pl.partial_elems) * a);
    }
  }
  r.bufs = sc.take(align64(buf * a) * nthreads);
  if (backward) r.partial = sc.take(partial);
  if (s.layout == Layout::NCHW) {
    const size_t act = static_cast<size_t>(s.n * s.h * s.w * 3 * s.g) * e;
    r.xh = sc.take(act);
    r.yh = sc.take(act);
    if (backward) r.gxh = sc.take(act);
  }
  return r;
}

size_t scratch_bytes(const InceptionDWConv2dShape& s, int64_t d, DType dt, bool backward) {
  ScratchCarver sc(nullptr, 0);
  carve(sc, s, d, dt, backward);
  return sc.used();
}

// ------------------------------------------------------------------ the fused CPU pass

// dst = [copy of src's first `id_c` channels | the three branch convolutions of src],
// both NHWC with pixel pitch `pitch`, the branches at channels c0[b]. wpk / bpk: packed
// weights and biases (bpk[b] may be null).
void fused_pass(DType dt, const InceptionDWConv2dShape& s, int64_t d, const char* src, char* dst,
                int64_t pitch, int64_t id_c, const int64_t c0[3], void* const wpk[3],
                void* const bpk[3], void* bufs) {
  const int64_t e = static_cast<int64_t>(dtype_size(dt)), a = static_cast<int64_t>(acc_size(dt));
  Geom g[3];
  for (int b = 0; b < 3; ++b) g[b] = branch_geom(s, d, b, dt, pitch);
  const int64_t buf_stride = static_cast<int64_t>(align64(fused_buf_elems(s, d, dt) * a));
  const int64_t rb = band_rows(s.n, s.h, s.w, pitch, e);
  const int64_t nbands = (s.h + rb - 1) / rb;
  const int nbufs = get_num_threads();
  const auto& k = dwconv::kernels();
  parallel_for_indexed(s.n * nbands, 1, [&](int slot, int64_t begin, int64_t end) {
    char* buf = static_cast<char*>(bufs) + std::min(slot, nbufs - 1) * buf_stride;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / nbands, r0 = (it % nbands) * rb, r1 = std::min(s.h, r0 + rb);
      if (id_c > 0) {
        const int64_t p0 = (n * s.h + r0) * s.w, p1 = (n * s.h + r1) * s.w;
        for (int64_t p = p0; p < p1; ++p)
          std::memcpy(dst + p * pitch * e, src + p * pitch * e, static_cast<size_t>(id_c * e));
      }
      for (int b = 0; b < 3; ++b)
        k.forward_rows(dt, g[b], src + c0[b] * e, wpk[b], bpk[b], dst + c0[b] * e, buf, n, r0, r1);
    }
  });
}

// NCHW <-> NHWC of the 3g branch channels (channels [c - 3g, c) of each image).
void stage_in(const TensorView& t, const InceptionDWConv2dShape& s, void* dst) {
  const int64_t e = static_cast<int64_t>(t.itemsize()), hw = s.h * s.w, cb = 3 * s.g;
  for (int64_t n = 0; n < s.n; ++n)
    nchw_to_nhwc(static_cast<const char*>(t.data) + (n * s.c + s.c - cb) * hw * e,
                 static_cast<char*>(dst) + n * hw * cb * e, 1, cb, hw, e);
}
void stage_out(const void* src, const InceptionDWConv2dShape& s, const TensorView& t) {
  const int64_t e = static_cast<int64_t>(t.itemsize()), hw = s.h * s.w, cb = 3 * s.g;
  for (int64_t n = 0; n < s.n; ++n)
    nhwc_to_nchw(static_cast<const char*>(src) + n * hw * cb * e,
                 static_cast<char*>(t.data) + (n * s.c + s.c - cb) * hw * e, 1, cb, hw, e);
}
// NCHW: the identity channel planes of every image, src -> dst (rows of identity_rect cut
// into chunks of at most 256 KB for the threads).
void copy_identity_nchw(const TensorView& src, const TensorView& dst,
                        const InceptionDWConv2dShape& s) {
  const CopyRect r = identity_rect(s, static_cast<int64_t>(src.itemsize()));
  if (r.width_bytes == 0) return;
  constexpr int64_t kChunk = 256 * 1024;
  const int64_t per_row = (r.width_bytes + kChunk - 1) / kChunk;
  parallel_for(r.height * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t row = it / per_row, b0 = (it % per_row) * kChunk;
      const int64_t off = row * r.pitch_bytes + b0;
      std::memcpy(static_cast<char*>(dst.data) + off, static_cast<const char*>(src.data) + off,
                  static_cast<size_t>(std::min(kChunk, r.width_bytes - b0)));
    }
  });
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

void check_scratch(void* scratch, size_t bytes, size_t need) {
  FV_CHECK_VALUE(bytes >= need && (scratch != nullptr || need == 0), "scratch: need ", need,
                 " bytes, got ", bytes);
}

}  // namespace
}  // namespace incdw

using namespace incdw;

InceptionDWConv2dShape inception_dwconv2d_shape(const TensorView& x,
                                                const InceptionDWConv2dWeights& w,
                                                const InceptionDWConv2dParams& p) {
  const core::NchwDims d = core::activation_dims(x, "x");
  FV_CHECK_VALUE(d.h > 0 && d.w > 0, "x: spatial size must be positive, got ", x.describe());
  FV_CHECK_VALUE(p.dilation >= 1 && p.dilation <= 1024, "dilation: expected a value in [1, 1024], got ",
                 p.dilation);
  for (int b = 0; b < 3; ++b) {
    FV_CHECK_VALUE(weight_of(w, b) != nullptr, kWeightNames[b], ": required (got none)");
    check_weight(*weight_of(w, b), x, kWeightNames[b]);
  }
  const TensorView &hw = *w.hw_weight, &ww = *w.w_weight, &hh = *w.h_weight;
  InceptionDWConv2dShape s;
  s.n = d.n, s.c = d.c, s.h = d.h, s.w = d.w;
  s.g = hw.shape[0];
  FV_CHECK_VALUE(s.g >= 1, "hw_weight: expected at least one channel per branch, got ",
                 hw.describe());
  FV_CHECK_VALUE(ww.shape[0] == s.g && hh.shape[0] == s.g,
                 "the three branch weights must have the same number of channels g: hw_weight ",
                 hw.describe(), ", w_weight ", ww.describe(), ", h_weight ", hh.describe());
  FV_CHECK_VALUE(ww.shape[2] == 1, "w_weight: the band branch 1 x k needs a (g, 1, 1, k) weight, got ",
                 ww.describe());
  FV_CHECK_VALUE(hh.shape[3] == 1, "h_weight: the band branch k x 1 needs a (g, 1, k, 1) weight, got ",
                 hh.describe());
  FV_CHECK_VALUE(3 * s.g <= s.c, "x: the three branches need 3 * g = ", 3 * s.g,
                 " channels (g = ", s.g, " from the weights) but x has only ", s.c, " channels");
  s.kh = hw.shape[2], s.kw = hw.shape[3], s.kbw = ww.shape[3], s.kbh = hh.shape[2];
  check_kernel_extent(s.kh, p.dilation, "hw_weight", "height");
  check_kernel_extent(s.kw, p.dilation, "hw_weight", "width");
  check_kernel_extent(s.kbw, p.dilation, "w_weight", "width");
  check_kernel_extent(s.kbh, p.dilation, "h_weight", "height");
  for (int b = 0; b < 3; ++b)
    if (bias_of(w, b)) dwconv::check_bias(*bias_of(w, b), x, s.g, kBiasNames[b]);
  FV_CHECK_VALUE(x.data != nullptr || x.numel() == 0, "x: null data pointer");
  s.layout = activation_layout(x, "x");
  return s;
}

// ---------------------------------------------------------------- forward

size_t inception_dwconv2d_forward_scratch_bytes(const TensorView& x,
                                                const InceptionDWConv2dWeights& w,
                                                const InceptionDWConv2dParams& p) {
  const InceptionDWConv2dShape s = inception_dwconv2d_shape(x, w, p);
  if (x.device.type == DeviceType::CUDA) return 0;
  return scratch_bytes(s, p.dilation, x.dtype, false);
}

void inception_dwconv2d_forward(const TensorView& x, const InceptionDWConv2dWeights& w,
                                const InceptionDWConv2dParams& p, const TensorView& y,
                                void* scratch, size_t scratch_bytes_, void* stream) {
  InceptionDWConv2dShape s = inception_dwconv2d_shape(x, w, p);
  check_activation(y, x, s, "y");
  s.layout = common_layout({&x, &y});
  if (x.device.type == DeviceType::CUDA) {
    check_cuda_dtype(x);
#if defined(FASTVIS_WITH_CUDA)
    if (s.n == 0) return;
    incdw::cuda::forward(x, w, p, y, s, stream);
    return;
#else
    no_cuda();
#endif
  }
  core::check_cpu(x, "x");
  check_scratch(scratch, scratch_bytes_, scratch_bytes(s, p.dilation, x.dtype, false));
  if (s.n == 0) return;
  ScratchCarver sc(scratch, scratch_bytes_);
  const Regions r = carve(sc, s, p.dilation, x.dtype, false);
  void* bpk[3];
  for (int b = 0; b < 3; ++b) {
    const Geom g = branch_geom(s, p.dilation, b, x.dtype, 0);
    dwconv::pack_weight(*weight_of(w, b), s.g, g.kh, g.kw, g.cp, false, r.wpk[b]);
    bpk[b] = nullptr;
    if (bias_of(w, b)) {
      dwconv::pack_bias(*bias_of(w, b), s.g, g.cp, r.bpk[b]);
      bpk[b] = r.bpk[b];
    }
  }
  if (s.layout == Layout::NHWC) {
    const int64_t c0[3] = {branch_c0(s.c, s.g, 0), branch_c0(s.c, s.g, 1), branch_c0(s.c, s.g, 2)};
    fused_pass(x.dtype, s, p.dilation, static_cast<const char*>(x.data), static_cast<char*>(y.data),
               s.c, s.c - 3 * s.g, c0, r.wpk, bpk, r.bufs);
  } else {
    const int64_t c0[3] = {0, s.g, 2 * s.g};
    stage_in(x, s, r.xh);
    fused_pass(x.dtype, s, p.dilation, static_cast<const char*>(r.xh), static_cast<char*>(r.yh),
               3 * s.g, 0, c0, r.wpk, bpk, r.bufs);
    stage_out(r.yh, s, y);
    copy_identity_nchw(x, y, s);
  }
}

// ---------------------------------------------------------------- backward

size_t inception_dwconv2d_backward_scratch_bytes(const TensorView& x,
                                                 const InceptionDWConv2dWeights& w,
                                                 const InceptionDWConv2dParams& p) {
  const InceptionDWConv2dShape s = inception_dwconv2d_shape(x, w, p);
  if (x.device.type == DeviceType::CUDA) {
#if defined(FASTVIS_WITH_CUDA)
    return incdw::cuda::backward_scratch_bytes(s, p);
#else
    return 0;
#endif
  }
  return scratch_bytes(s, p.dilation, x.dtype, true);
}

void inception_dwconv2d_backward(const TensorView& grad_y, const TensorView& x,
                                 const InceptionDWConv2dWeights& w,
                                 const InceptionDWConv2dParams& p,
                                 const InceptionDWConv2dGrads& grads, void* scratch,
                                 size_t scratch_bytes_, void* stream) {
  InceptionDWConv2dShape s = inception_dwconv2d_shape(x, w, p);
  check_activation(grad_y, x, s, "grad_y");
  if (grads.x) check_activation(*grads.x, x, s, "grad_x");
  for (int b = 0; b < 3; ++b) {
    const TensorView* gw = grad_weight_of(grads, b);
    const TensorView& wt = *weight_of(w, b);
    if (gw) {
      FV_CHECK_VALUE(gw->ndim == 4 && gw->shape[0] == wt.shape[0] && gw->shape[1] == 1 &&
                         gw->shape[2] == wt.shape[2] && gw->shape[3] == wt.shape[3],
                     "grad_", kWeightNames[b], ": expected the shape of ", kWeightNames[b], " ",
                     wt.describe(), ", got ", gw->describe());
      FV_CHECK_TYPE(gw->dtype == x.dtype, "grad_", kWeightNames[b], ": expected dtype ",
                    dtype_name(x.dtype), ", got ", dtype_name(gw->dtype));
      FV_CHECK_VALUE(gw->device == x.device, "grad_", kWeightNames[b], ": expected a tensor on ",
                     device_name(x.device));
    }
    if (grad_bias_of(grads, b)) dwconv::check_bias(*grad_bias_of(grads, b), x, s.g, "grad_bias");
  }
  s.layout = common_layout({&x, &grad_y, grads.x});
  if (x.device.type == DeviceType::CUDA) {
    check_cuda_dtype(x);
#if defined(FASTVIS_WITH_CUDA)
    incdw::cuda::backward(grad_y, x, w, p, grads, s, scratch, scratch_bytes_, stream);
    return;
#else
    no_cuda();
#endif
  }
  core::check_cpu(x, "x");
  check_scratch(scratch, scratch_bytes_, scratch_bytes(s, p.dilation, x.dtype, true));
  const DType dt = x.dtype;
  const size_t a = acc_size(dt);
  ScratchCarver sc(scratch, scratch_bytes_);
  const Regions r = carve(sc, s, p.dilation, dt, true);
  const bool nhwc = s.layout == Layout::NHWC;
  bool need_w = false;
  for (int b = 0; b < 3; ++b) need_w |= grad_weight_of(grads, b) || grad_bias_of(grads, b);

  // grad_y (and x) as NHWC with the branches at c0[]: in place, or the staged branch channels.
  const char* gy = static_cast<const char*>(grad_y.data);
  const char* xs = static_cast<const char*>(x.data);
  const int64_t pitch = nhwc ? s.c : 3 * s.g;
  int64_t c0[3];
  for (int b = 0; b < 3; ++b) c0[b] = nhwc ? branch_c0(s.c, s.g, b) : b * s.g;
  if (!nhwc && s.n > 0 && (grads.x || need_w)) {
    stage_in(grad_y, s, r.yh);
    gy = static_cast<const char*>(r.yh);
  }

  if (grads.x && s.n > 0) {
    void* none[3] = {nullptr, nullptr, nullptr};
    for (int b = 0; b < 3; ++b) {
      const Geom g = branch_geom(s, p.dilation, b, dt, 0);
      dwconv::pack_weight(*weight_of(w, b), s.g, g.kh, g.kw, g.cp, true, r.wpk[b]);
    }
    if (nhwc) {
      fused_pass(dt, s, p.dilation, gy, static_cast<char*>(grads.x->data), pitch, s.c - 3 * s.g,
                 c0, r.wpk, none, r.bufs);
    } else {
      fused_pass(dt, s, p.dilation, gy, static_cast<char*>(r.gxh), pitch, 0, c0, r.wpk, none,
                 r.bufs);
      stage_out(r.gxh, s, *grads.x);
      copy_identity_nchw(grad_y, *grads.x, s);
    }
  }

  if (need_w) {
    if (!nhwc && s.n > 0) {
      stage_in(x, s, r.xh);
      xs = static_cast<const char*>(r.xh);
    }
    const int64_t e = static_cast<int64_t>(dtype_size(dt));
    for (int b = 0; b < 3; ++b) {
      const TensorView* gw = grad_weight_of(grads, b);
      const TensorView* gb = grad_bias_of(grads, b);
      if (!gw && !gb) continue;
      const Geom g = branch_geom(s, p.dilation, b, dt, pitch);
      const WgradPlan plan = dwconv::wgrad_plan(g, static_cast<int64_t>(a));
      if (s.n == 0)
        std::memset(r.partial, 0, plan.row_chunks * plan.partial_elems * a);
      else
        dwconv::kernels().backward_weight_partials(dt, g, plan, gy + c0[b] * e, xs + c0[b] * e,
                                                   r.partial, r.bufs, get_num_threads());
      dwconv::reduce_weight_partials(dt, g, plan, r.partial, gw, gb);
    }
  }
}

}  // namespace fastvis
