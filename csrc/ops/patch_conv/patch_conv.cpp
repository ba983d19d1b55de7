// Patch convolution (stride == kernel): validation, tiling, the patch gather and the GEMMs.
// See include/fastvis/patch_conv.h for the semantics.
#include "fastvis/patch_conv.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <vector>

#include "core/blas.h"
#include "core/checks.h"
#include "core/cpu_features.h"
#include "core/scratch.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"
#include "ops/patch_conv/cpu_kernels.h"

namespace fastvis {
namespace patchconv {
namespace {

using core::align64;
using core::acc_size;

struct TilePlan {
  int64_t pixels;   // N * OH * OW
  int64_t kdim;     // Cin * kh * kw: the GEMM's inner dimension
  int64_t rows;     // output pixels per tile
  int64_t ntiles;
  bool split_gemm;  // too few tiles to share: tiles one after another, each GEMM split
};

TilePlan plan(const PatchConv2dShape& s, size_t acc, int threads) {
  TilePlan p;
  p.pixels = s.n * s.oh * s.ow;
  p.kdim = s.cin * s.kh * s.kw;
  // A tile's gathered patches stay within ~256 KB (L2), between 16 and 256 rows.
  int64_t rows = std::clamp<int64_t>(int64_t(256 * 1024) / (p.kdim * int64_t(acc)), 16, 256);
  const int64_t want = 2 * int64_t(threads);  // tiles, to balance the threads
  // Every GEMM call packs the whole weight matrix; below ~64 rows per call that costs as
  // much as the product. So when two tiles per thread would be that small (the last
  // downsampling layers at batch 1: 49 or 196 pixels), the tiles run one after another,
  // up to 256 rows each, with each GEMM split over the pool (each thread then packs only
  // its share of the weights).
  p.split_gemm = threads > 1 && p.pixels < want * 64;
  if (p.split_gemm)
    rows = 256;
  else if (p.pixels > 0 && (p.pixels + rows - 1) / rows < want)
    rows = std::max<int64_t>(64, (p.pixels + want - 1) / want);
  p.rows = std::max<int64_t>(1, std::min(rows, std::max<int64_t>(p.pixels, 1)));
  if (!p.split_gemm && threads > 1 && p.pixels > 0) {
    // A whole number of tiles per thread, of equal size (5 tiles on 2 threads run as
    // 3 + 2: ConvNeXt-T's first downsampling layer at batch 1).
    int64_t nt = (p.pixels + p.rows - 1) / p.rows;
    nt = (nt + threads - 1) / threads * threads;
    p.rows = (p.pixels + nt - 1) / nt;
  }
  p.ntiles = p.pixels > 0 ? (p.pixels + p.rows - 1) / p.rows : 0;
  return p;
}

// The fused LayerNorm's per-pixel rows: the selected instruction set's kernel.
using NormFn = void (*)(DType, int64_t, int64_t, const void*, void*, const void*, const void*,
                        double);
NormFn norm_kernel() {
  static const NormFn f = [] {
#if defined(FV_HAVE_ISA_AVX512)
    if (cpu::selected_isa() == cpu::Isa::Avx512) return &avx512::norm_pixels;
#endif
#if defined(FV_HAVE_ISA_AVX2)
    if (cpu::selected_isa() == cpu::Isa::Avx2) return &avx2::norm_pixels;
#endif
    return &generic::norm_pixels;
  }();
  return f;
}

// The norm's affine parameters as T arrays of the normalised width (1 / 0 where the op
// has none), and what the rows kernel needs besides.
template <class T> struct NormArgs {
  std::vector<T> w, b;
  double eps = 1e-6;
  NormFn fn = nullptr;
  DType dt = DType::Float32;
  // n contiguous pixels of w.size() values, normalised from src into dst (may be equal).
  void operator()(int64_t n, const T* src, T* dst) const {
    fn(dt, n, static_cast<int64_t>(w.size()), src, dst, w.data(), b.data(), eps);
  }
};

// Patch rows of output pixels [p0, p1) into col, one row of kdim values per pixel, in the
// weight's order: (ci, i, j) for a row-major weight, (i, j, ci) for a channels_last one.
// Patch positions outside the image (padding) are zeros; with `pre`, every input pixel's
// Cin values are normalised on the way (the padding stays zero).
template <class T>
void gather(const PatchConv2dShape& s, const TensorView& x, int64_t p0, int64_t p1, T* col,
            const NormArgs<T>* pre) {
  const T* xd = static_cast<const T*>(x.data);
  const int64_t xn = x.strides[0], xc = x.strides[1], xh = x.strides[2], xw = x.strides[3];
  const int64_t K = s.cin * s.kh * s.kw, khw = s.kh * s.kw;
  // One input pixel's channels, contiguous (strided inputs, or a strided destination).
  std::vector<T> px(static_cast<size_t>(s.cin));
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / (s.oh * s.ow), r = p % (s.oh * s.ow), oh = r / s.ow, ow = r % s.ow;
    T* row = col + (p - p0) * K;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t ih = oh * s.sh - s.ph + i;
      const bool row_in = ih >= 0 && ih < s.h;
      const int64_t iw0 = ow * s.sw - s.pw;
      if (s.weight_hwc && xc == 1 && xw == s.cin && row_in && iw0 >= 0 && iw0 + s.kw <= s.w) {
        // NHWC input, patch row inside the image: its kw pixels are one run in x and in
        // the row.
        const T* src = xd + n * xn + ih * xh + iw0 * xw;
        T* dst = row + i * s.kw * s.cin;
        if (pre)
          (*pre)(s.kw, src, dst);
        else
          std::copy(src, src + s.kw * s.cin, dst);
        continue;
      }
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t iw = iw0 + j;
        const bool in = row_in && iw >= 0 && iw < s.w;
        const T* src = in ? xd + n * xn + ih * xh + iw * xw : nullptr;
        if (s.weight_hwc) {  // row[(i * kw + j) * cin + c]
          T* dst = row + (i * s.kw + j) * s.cin;
          if (!in) {
            std::fill(dst, dst + s.cin, T(0));
          } else if (xc == 1) {  // NHWC input: one pixel's channels are one run
            if (pre)
              (*pre)(1, src, dst);
            else
              std::copy(src, src + s.cin, dst);
          } else {
            for (int64_t c = 0; c < s.cin; ++c) dst[c] = src[c * xc];
            if (pre) (*pre)(1, dst, dst);
          }
        } else {  // row[(c * kh + i) * kw + j]
          T* dst = row + i * s.kw + j;
          if (!in) {
            for (int64_t c = 0; c < s.cin; ++c) dst[c * khw] = T(0);
          } else if (!pre) {
            for (int64_t c = 0; c < s.cin; ++c) dst[c * khw] = src[c * xc];
          } else {
            for (int64_t c = 0; c < s.cin; ++c) px[c] = src[c * xc];
            (*pre)(1, px.data(), px.data());
            for (int64_t c = 0; c < s.cin; ++c) dst[c * khw] = px[c];
          }
        }
      }
    }
  }
}

template <class T>
void tile(const PatchConv2dShape& s, const TilePlan& pl, const TensorView& x, const T* w,
          const T* b, T* y, T* col, int64_t p0, int64_t p1, const NormArgs<T>* pre,
          const NormArgs<T>* post) {
  const int64_t m = p1 - p0, K = pl.kdim, C = s.cout;
  gather<T>(s, x, p0, p1, col, pre);
  T* out = y + p0 * C;
  if (b)
    for (int64_t r = 0; r < m; ++r) std::copy(b, b + C, out + r * C);
  const T beta = b ? T(1) : T(0);
  // out (m x C) (+)= col (m x K) * W^T: W is (C x K) row-major, or (K x C) when k-major.
  const core::Op tb = s.weight_kmajor ? core::Op::N : core::Op::T;
  const int64_t ldw = s.weight_kmajor ? C : K;
  if (pl.split_gemm)
    core::gemm_split(core::Op::N, tb, m, C, K, T(1), col, K, w, ldw, beta, out, C);
  else
    core::gemm(core::Op::N, tb, m, C, K, T(1), col, K, w, ldw, beta, out, C);
  if (post) (*post)(m, out, out);
}

template <class T>
void forward_t(const PatchConv2dShape& s, const TilePlan& pl, const TensorView& x, const T* w,
               const T* b, T* y, char* bufs, size_t buf_stride, int nbufs,
               const PatchConv2dParams& p) {
  NormArgs<T> na;
  if (p.norm != PatchNorm::None) {
    const int64_t c = p.norm == PatchNorm::Before ? s.cin : s.cout;
    const T* nw = p.norm_weight ? static_cast<const T*>(p.norm_weight->data) : nullptr;
    const T* nb = p.norm_bias ? static_cast<const T*>(p.norm_bias->data) : nullptr;
    na.w.assign(static_cast<size_t>(c), T(1));
    na.b.assign(static_cast<size_t>(c), T(0));
    if (nw) std::copy(nw, nw + c, na.w.begin());
    if (nb) std::copy(nb, nb + c, na.b.begin());
    na.eps = p.norm_eps;
    na.fn = norm_kernel();
    na.dt = x.dtype;
  }
  const NormArgs<T>* pre = p.norm == PatchNorm::Before ? &na : nullptr;
  const NormArgs<T>* post = p.norm == PatchNorm::After ? &na : nullptr;
  if (pl.split_gemm) {
    T* col = reinterpret_cast<T*>(bufs);
    for (int64_t t = 0; t < pl.ntiles; ++t)
      tile<T>(s, pl, x, w, b, y, col, t * pl.rows, std::min(pl.pixels, (t + 1) * pl.rows), pre,
              post);
    return;
  }
  parallel_for_indexed(pl.ntiles, 1, [&](int slot, int64_t t0, int64_t t1) {
    T* col = reinterpret_cast<T*>(bufs + std::min(slot, nbufs - 1) * buf_stride);
    for (int64_t t = t0; t < t1; ++t)
      tile<T>(s, pl, x, w, b, y, col, t * pl.rows, std::min(pl.pixels, (t + 1) * pl.rows), pre,
              post);
  });
}

// The weight gradient's pixel chunks: each chunk's patch rows are gathered into scratch
// (~8 MB, at least 256 rows; shape-determined, so results do not depend on the thread
// count), then one GEMM split over the pool adds gy_chunk^T * col_chunk to the gradient.
int64_t wgrad_chunk_rows(const PatchConv2dShape& s, size_t acc) {
  const int64_t pixels = s.n * s.oh * s.ow, kdim = s.cin * s.kh * s.kw;
  const int64_t rows =
      std::max<int64_t>(256, (int64_t(8) << 20) / std::max<int64_t>(1, kdim * int64_t(acc)));
  return std::max<int64_t>(1, std::min(rows, pixels));
}

template <class T>
void backward_weight_t(const PatchConv2dShape& s, const TensorView& gy, const TensorView& x,
                       T* gw, T* gb, T* col) {
  const int64_t pixels = s.n * s.oh * s.ow, K = s.cin * s.kh * s.kw, C = s.cout;
  const int64_t chunk = wgrad_chunk_rows(s, sizeof(T));
  const T* g = static_cast<const T*>(gy.data);  // NHWC dense: pixel p's Cout values at p * C
  for (int64_t p0 = 0; p0 < pixels; p0 += chunk) {
    const int64_t p1 = std::min(pixels, p0 + chunk), m = p1 - p0;
    parallel_for(m, 16, [&](int64_t q0, int64_t q1) {
      gather<T>(s, x, p0 + q0, p0 + q1, col + q0 * K, nullptr);
    });
    if (s.weight_kmajor)  // gw (K x C) (+)= col^T (K x m) * gy_chunk (m x C)
      core::gemm_split(core::Op::T, core::Op::N, K, C, m, T(1), col, K, g + p0 * C, C,
                       p0 == 0 ? T(0) : T(1), gw, C);
    else  // gw (C x K) (+)= gy_chunk^T (C x m) * col (m x K)
      core::gemm_split(core::Op::T, core::Op::N, C, K, m, T(1), g + p0 * C, C, col, K,
                       p0 == 0 ? T(0) : T(1), gw, K);
  }
  if (gb)  // column sums of gy, each in pixel order (in double)
    parallel_for(C, 8, [&](int64_t c0, int64_t c1) {
      std::vector<double> acc(static_cast<size_t>(c1 - c0), 0.0);
      for (int64_t p = 0; p < pixels; ++p) {
        const T* row = g + p * C;
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(row[c]);
      }
      for (int64_t c = c0; c < c1; ++c) gb[c] = static_cast<T>(acc[c - c0]);
    });
}

// y, or grad_y: (N, Cout, OH, OW) of s, x's dtype and device, dense channels_last.
void check_output_grid(const TensorView& t, const PatchConv2dShape& s, const TensorView& x,
                       const char* name) {
  core::check_activation_like(t, x, s.n, s.cout, s.oh, s.ow, name);
  FV_CHECK_VALUE(core::dense_layouts(t) & 2, name, ": must be dense channels_last (NHWC), got ",
                 t.describe());
}

}  // namespace
}  // namespace patchconv

using namespace patchconv;

PatchConv2dShape patch_conv2d_shape(const TensorView& x, const TensorView& weight,
                                    const TensorView* bias, const PatchConv2dParams& p) {
  const core::NchwDims d = core::activation_dims(x, "x");
  PatchConv2dShape s;
  s.n = d.n;
  s.cin = d.c;
  s.h = d.h;
  s.w = d.w;
  FV_CHECK_TYPE(x.dtype == DType::Float32 || x.dtype == DType::Float64,
                "x: patch_conv2d supports float32 and float64, got ", dtype_name(x.dtype));
  FV_CHECK_VALUE(x.device.type == DeviceType::CPU, "x: patch_conv2d runs on the CPU, got a tensor on ",
                 device_name(x.device));
  FV_CHECK_VALUE(weight.ndim == 4, "weight: expected (Cout, Cin, kh, kw), got ", weight.describe());
  FV_CHECK_TYPE(weight.dtype == x.dtype, "weight: expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(weight.dtype));
  s.cout = weight.shape[0];
  s.kh = weight.shape[2];
  s.kw = weight.shape[3];
  FV_CHECK_VALUE(weight.shape[1] == s.cin, "weight: expected ", s.cin,
                 " input channels (one group), got ", weight.describe());
  FV_CHECK_VALUE(s.cout >= 1 && s.kh >= 1 && s.kw >= 1, "weight: sizes must be positive, got ",
                 weight.describe());
  FV_CHECK_VALUE(p.stride_h >= 0 && p.stride_w >= 0, "stride: must be positive (or 0: the kernel size), got (",
                 p.stride_h, ", ", p.stride_w, ")");
  constexpr int64_t kMaxPad = int64_t(1) << 20;
  FV_CHECK_VALUE(p.pad_h >= 0 && p.pad_w >= 0 && p.pad_h <= kMaxPad && p.pad_w <= kMaxPad,
                 "padding: must be in [0, 2^20], got (", p.pad_h, ", ", p.pad_w, ")");
  if (p.norm != PatchNorm::None) {
    FV_CHECK_VALUE(p.norm == PatchNorm::Before || p.norm == PatchNorm::After,
                   "norm: expected None, Before or After");
    FV_CHECK_VALUE(std::isfinite(p.norm_eps) && p.norm_eps > 0, "norm_eps: must be positive and finite, got ",
                   p.norm_eps);
    const int64_t want_n[1] = {p.norm == PatchNorm::Before ? s.cin : s.cout};
    const char* what = p.norm == PatchNorm::Before ? "one value per input channel"
                                                   : "one value per output channel";
    if (p.norm_weight) core::check_row_major(*p.norm_weight, x, want_n, 1, x.dtype, "norm_weight", what);
    if (p.norm_bias) core::check_row_major(*p.norm_bias, x, want_n, 1, x.dtype, "norm_bias", what);
  } else {
    FV_CHECK_VALUE(!p.norm_weight && !p.norm_bias, "norm_weight / norm_bias given without a norm");
  }
  s.sh = p.stride_h ? p.stride_h : s.kh;
  s.sw = p.stride_w ? p.stride_w : s.kw;
  s.ph = p.pad_h;
  s.pw = p.pad_w;
  FV_CHECK_VALUE(s.kh <= s.h + 2 * s.ph && s.kw <= s.w + 2 * s.pw, "x: a ", s.h, "x", s.w,
                 " image (padding ", s.ph, ", ", s.pw, ") is smaller than the ", s.kh, "x", s.kw,
                 " patch");
  FV_CHECK_VALUE(weight.device == x.device, "weight: expected a tensor on ", device_name(x.device),
                 ", got one on ", device_name(weight.device));
  // Dense, either (Cout, Cin, kh, kw) row-major or channels_last ((Cout, kh, kw, Cin) in
  // memory, what Module.to(memory_format=torch.channels_last) makes of it): the gather
  // follows the weight's order, so neither needs a copy.
  const int wl = core::dense_layouts(weight);
  // K-major: (kh, kw, Cin, Cout) in memory, the GEMM's B operand as a (K x Cout) row-major
  // matrix (what the inference caches pass: the faster product for small tiles).
  // (Strides of size-1 dimensions do not matter.)
  {
    const int order[4] = {0, 1, 3, 2};  // innermost first: Cout, Cin, kw, kh
    int64_t want = 1;
    bool km = wl == 0;
    for (int d : order) {
      km = km && (weight.shape[d] == 1 || weight.strides[d] == want);
      want *= weight.shape[d];
    }
    s.weight_kmajor = km;
  }
  FV_CHECK_VALUE(wl != 0 || s.weight_kmajor,
                 "weight: must be dense, row-major (contiguous), channels_last or k-major "
                 "((kh, kw, Cin, Cout) in memory), got ", weight.describe());
  FV_CHECK_VALUE(weight.data != nullptr || weight.numel() == 0, "weight: null data pointer");
  // Both layouts match when they coincide in memory (Cin == 1 or a 1x1 patch): then the
  // (i, j, ci) order, whose gather copies whole pixels from an NHWC input.
  s.weight_hwc = s.weight_kmajor || ((wl & 2) != 0 && (wl == 2 || x.strides[1] == 1 || s.cin == 1));
  if (bias) {
    const int64_t want_b[1] = {s.cout};
    core::check_row_major(*bias, x, want_b, 1, x.dtype, "bias", "one value per output channel");
  }
  s.oh = (s.h + 2 * s.ph - s.kh) / s.sh + 1;
  s.ow = (s.w + 2 * s.pw - s.kw) / s.sw + 1;
  FV_CHECK_VALUE(x.data != nullptr || x.numel() == 0, "x: null data pointer");
  return s;
}

size_t patch_conv2d_forward_scratch_bytes(const TensorView& x, const TensorView& weight,
                                          const PatchConv2dParams& p) {
  const PatchConv2dShape s = patch_conv2d_shape(x, weight, nullptr, p);
  const int threads = get_num_threads();
  const TilePlan pl = plan(s, acc_size(x.dtype), threads);
  const size_t per = align64(size_t(pl.rows * pl.kdim) * acc_size(x.dtype));
  return pl.split_gemm ? per : per * size_t(threads);
}

void patch_conv2d_forward(const TensorView& x, const TensorView& weight, const TensorView* bias,
                          const TensorView& y, void* scratch, size_t scratch_bytes,
                          const PatchConv2dParams& p) {
  const PatchConv2dShape s = patch_conv2d_shape(x, weight, bias, p);
  check_output_grid(y, s, x, "y");
  const size_t need = patch_conv2d_forward_scratch_bytes(x, weight, p);
  FV_CHECK_VALUE(scratch_bytes >= need && (scratch != nullptr || need == 0), "scratch: need ",
                 need, " bytes, got ", scratch_bytes);
  const int threads = get_num_threads();
  const TilePlan pl = plan(s, acc_size(x.dtype), threads);
  if (pl.pixels == 0) return;
  FV_CHECK_VALUE(y.data != nullptr, "y: null data pointer");
  const size_t stride = align64(size_t(pl.rows * pl.kdim) * acc_size(x.dtype));
  char* bufs = static_cast<char*>(scratch);
  if (x.dtype == DType::Float64)
    forward_t<double>(s, pl, x, static_cast<const double*>(weight.data),
                      bias ? static_cast<const double*>(bias->data) : nullptr,
                      static_cast<double*>(y.data), bufs, stride, threads, p);
  else
    forward_t<float>(s, pl, x, static_cast<const float*>(weight.data),
                     bias ? static_cast<const float*>(bias->data) : nullptr,
                     static_cast<float*>(y.data), bufs, stride, threads, p);
}

size_t patch_conv2d_backward_weight_scratch_bytes(const TensorView& x, const TensorView& weight,
                                                  const PatchConv2dParams& p) {
  const PatchConv2dShape s = patch_conv2d_shape(x, weight, nullptr, p);
  FV_CHECK_VALUE(p.norm == PatchNorm::None,
                 "patch_conv2d backward: no fused LayerNorm (norm must be None)");
  const size_t acc = acc_size(x.dtype);
  return align64(size_t(wgrad_chunk_rows(s, acc) * s.cin * s.kh * s.kw) * acc);
}

void patch_conv2d_backward_weight(const TensorView& grad_y, const TensorView& x,
                                  const TensorView& weight, const TensorView& grad_weight,
                                  const TensorView* grad_bias, void* scratch, size_t scratch_bytes,
                                  const PatchConv2dParams& p) {
  const PatchConv2dShape s = patch_conv2d_shape(x, weight, nullptr, p);
  FV_CHECK_VALUE(p.norm == PatchNorm::None,
                 "patch_conv2d backward: no fused LayerNorm (norm must be None)");
  check_output_grid(grad_y, s, x, "grad_y");
  // The gradient in the weight's own memory order (the order the patches are gathered in).
  FV_CHECK_VALUE(grad_weight.ndim == 4 && grad_weight.dtype == weight.dtype &&
                     grad_weight.device == weight.device,
                 "grad_weight: expected the weight's shape, dtype and device, got ",
                 grad_weight.describe());
  for (int i = 0; i < 4; ++i)
    FV_CHECK_VALUE(grad_weight.shape[i] == weight.shape[i] &&
                       (grad_weight.strides[i] == weight.strides[i] || weight.shape[i] == 1),
                   "grad_weight: expected the weight's shape and strides (", weight.describe(),
                   "), got ", grad_weight.describe());
  FV_CHECK_VALUE(grad_weight.data != nullptr, "grad_weight: null data pointer");
  if (grad_bias) {
    const int64_t want_b[1] = {s.cout};
    core::check_row_major(*grad_bias, x, want_b, 1, x.dtype, "grad_bias",
                          "one value per output channel");
  }
  const size_t need = patch_conv2d_backward_weight_scratch_bytes(x, weight, p);
  FV_CHECK_VALUE(scratch_bytes >= need && scratch != nullptr, "scratch: need ", need,
                 " bytes, got ", scratch_bytes);
  const int64_t pixels = s.n * s.oh * s.ow;
  if (pixels == 0) {  // no pixel: zero gradients
    const size_t e = dtype_size(x.dtype);
    std::memset(grad_weight.data, 0, size_t(s.cout * s.cin * s.kh * s.kw) * e);
    if (grad_bias) std::memset(grad_bias->data, 0, size_t(s.cout) * e);
    return;
  }
  if (x.dtype == DType::Float64)
    backward_weight_t<double>(s, grad_y, x, static_cast<double*>(grad_weight.data),
                              grad_bias ? static_cast<double*>(grad_bias->data) : nullptr,
                              static_cast<double*>(scratch));
  else
    backward_weight_t<float>(s, grad_y, x, static_cast<float*>(grad_weight.data),
                             grad_bias ? static_cast<float*>(grad_bias->data) : nullptr,
                             static_cast<float*>(scratch));
}

}  // namespace fastvis
