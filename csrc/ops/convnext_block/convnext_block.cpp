// The fused ConvNeXt block: validation, planning, parameter packing, scratch carving,
// dispatch to the per-ISA tile kernels, the fixed-order reduction of the parameter
// gradients, and the depthwise backward (through the depthwise family's entry points).
// The same tile engine serves the MetaNeXt block (inference, the inception mixer) and the
// MLP op (training and inference, no mixer): their entry points are at the end.
#include "fastvis/convnext_block.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/blas.h"
#include "core/checks.h"
#include "core/scratch.h"
#include "core/cpu_features.h"
#include "core/dtype_convert.h"
#include "core/profile.h"
#include "fastvis/depthwise_conv.h"
#include "fastvis/metanext_block.h"
#include "fastvis/mlp.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"
#include "ops/convnext_block/cpu_kernels.h"
#if defined(FASTVIS_WITH_CUDA)
#include "ops/convnext_block/convnext_block_cuda.h"  // CUDA tensors: cuda/convnext_block.cu
#endif

namespace fastvis {
namespace cnblock {

Plan plan(const Shape& s, int64_t acc) {
  Plan p;
  const int64_t rows = s.n * s.h;
  // Tiles of ~512 KB of hidden activations (L2-sized), but at least 256 and at most 512
  // pixels: OpenBLAS packs the weight matrix at every call, and its small-M GEMMs are slow
  // (measured on ConvNeXt-T stage shapes at N=8, fused forward: C=384 at 140-pixel tiles
  // 94 GFLOP/s, at 266-392 pixels 107-115; C=768 at 70 pixels 89, at 196 pixels 116).
  const int64_t target = std::clamp<int64_t>((512 * 1024) / (s.hidden * acc), 256, 512);
  int64_t rt = std::max<int64_t>(1, (target + s.w - 1) / std::max<int64_t>(s.w, 1));
  rt = std::max<int64_t>(1, std::min(rt, rows));
  // Enough tiles to share between threads: halve the tiles towards 8 while they keep 256
  // pixels, and below two tiles while they keep min2 pixels. Small images at batch 1 (one
  // tile) thus run as two tiles, each GEMM on one thread, or as one tile with every GEMM
  // split over the pool by columns. Which is faster depends on the GEMM: with PyTorch's
  // MKL (Xeon, session 18) two tiles of 98 pixels were; with OpenBLAS, which packs the
  // weight matrix at every call (two tiles pack both weights twice, split columns half of
  // each once), one tile of 196 is: InceptionNeXt-T's 14x14 stage at N=1 (Zen 5), 13.2-13.3
  // -> 11.8-12.0 ms on its SkylakeX kernels, 20.7 -> 19.3-19.9 on its Haswell ones, the
  // training step unchanged. float64 blocks always multiply with OpenBLAS.
  const int64_t min2 = (acc == 8 || core::float_gemm_is_openblas()) ? 128 : 64;
  for (;;) {
    const int64_t nt = (rows + rt - 1) / rt, half = (rt + 1) / 2;
    if (rt > 1 && ((nt < 8 && half * s.w >= 256) || (nt < 2 && half * s.w >= min2)))
      rt = half;
    else
      break;
  }
  // Equal tiles: the same count with the rows spread evenly (2 tiles of 37 and 19 rows
  // would leave one thread half idle).
  if (rows > 0) {
    const int64_t nt = (rows + rt - 1) / rt;
    rt = (rows + nt - 1) / nt;
  }
  // Few tiles: an odd count leaves a thread idle for a whole tile (3 tiles on 2 threads
  // run as 2 + 1; ConvNeXt-T at N=1 has 3 tiles at stage 2 with the rule above). Take the
  // nearest tile height that gives an even count of equal tiles, if one keeps tiles of at
  // least 64 pixels. Depends on the shape only (the backward's deterministic partial sums
  // follow the tiles), not on the thread count.
  const int64_t nt0 = (rows + rt - 1) / rt;
  if (nt0 > 1 && nt0 < 16 && nt0 % 2 == 1) {
    int64_t best = 0;
    for (int64_t d = 1; d <= rt && best == 0; ++d)
      for (int64_t cand : {rt + d, rt - d}) {
        if (cand < 1 || cand > rows || cand * s.w < 64) continue;
        const int64_t nt = (rows + cand - 1) / cand;
        if (nt % 2 == 0 && rows % cand == 0) {
          best = cand;
          break;
        }
      }
    if (best) rt = best;
  }
  p.rt = rt;
  p.ntiles = rows > 0 ? (rows + rt - 1) / rt : 0;
  p.P = rt * s.w;
  // The depthwise tile kernel's buffer for any tile: every row count a tile can have in
  // one image, at every position (the input window shrinks at the image borders).
  auto up = [](int64_t e) { return (e + 15) / 16 * 16; };
  // The depthwise tile kernel's buffer for a kh x kw kernel at dilation dil over c
  // channels, for every tile height and input window a tile can have.
  auto dw_buf = [&](int64_t c, int64_t kh, int64_t kw, int64_t dil, int64_t cp) {
    int64_t e = 0;
    const int64_t ph = (kh - 1) * dil / 2, pw = (kw - 1) * dil / 2;
    for (int64_t r = 1; r <= std::min(rt, s.h); ++r)
      for (int64_t hs = r; hs <= std::min(s.h, r + 2 * ph); ++hs) {
        const dwconv::Geom g{1, c, hs, s.w, kh, kw, r, s.w, 1, 1, 0, pw, dil, dil, cp};
        e = std::max(e, dwconv::fwd_plan(g, acc, false).buf_elems);
      }
    return e;
  };
  if (s.mix.kind == Mixer::Inception) {
    const Mixer& m = s.mix;
    int64_t rows_in = 0, dwb = 0;
    for (int b = 0; b < 3; ++b) {
      int64_t kh, kw, off;
      inception_branch(m, b, kh, kw, off);
      rows_in = std::max(rows_in, std::min(s.h, rt + (kh - 1) * m.dil));
      dwb = std::max(dwb, dw_buf(m.g, kh, kw, m.dil, m.cpg));
    }
    p.inc_slice_elems = up(rows_in * s.w * m.g);  // storage type T fits in an accumulator slot
    p.inc_out_elems = up(rt * s.w * m.g);
    p.dw_elems = p.inc_slice_elems + p.inc_out_elems + dwb;
  } else if (s.mix.kind == Mixer::Identity) {
    p.dw_elems = 0;
  } else {
    p.dw_elems = dw_buf(s.c, s.k, s.k, 1, s.cp);
  }
  p.fwd_elems = up(p.P * s.c) + up(p.P * s.hidden) + up(p.dw_elems);
  p.bwd_elems = 4 * up(p.P * s.c) + 2 * up(p.P) + 3 * up(p.P * s.hidden) + up(p.dw_elems);
  // Backward partial sums: at most 16 runs of tiles and 128 MiB of partials, but at least
  // two runs (so two threads share the tiles) whatever the size.
  const int64_t part = partial_layout(s).total;
  p.partial_elems = up(part);
  const int64_t cap = std::max<int64_t>(2, (int64_t(128) << 20) / (p.partial_elems * acc));
  // Each run zeroes and later reduces its partials: give it >= ~512 pixels of work.
  const int64_t by_work = std::max<int64_t>(2, rows * s.w / 512);
  p.chunks = std::max<int64_t>(1, std::min<int64_t>({p.ntiles, 16, cap, by_work}));
  // An odd count of runs leaves a thread of two idle for a run (3 runs of 2 tiles each for
  // ConvNeXt-T's 384-channel blocks at N=8): one more run when there are tiles for it
  // (then each half of the runs covers half of the tiles).
  if (p.chunks > 1 && p.chunks % 2 == 1 && p.chunks < p.ntiles && p.chunks < cap) ++p.chunks;
  // A single tile (small images at batch 1): each GEMM is split over the pool instead.
  // From two tiles on, the threads share the tiles and each GEMM is one call on its
  // thread (a split inside a thread's tile ran its column blocks one after another:
  // ConvNeXt-T's 384-channel blocks at batch 1, two tiles, 2.95 -> 2.7 ms a block).
  p.split_gemm = p.ntiles == 1;
  return p;
}

}  // namespace cnblock

namespace {

using cnblock::Packed;
using cnblock::Plan;
using cnblock::Shape;

using core::acc_size;
using core::align64;
using core::ScratchCarver;

struct Kernels {
  void (*forward)(DType, const Shape&, const Plan&, const Packed&, const void*, void*, void*, int);
  void (*backward_tiles)(DType, const Shape&, const Plan&, const Packed&, const void*,
                         const void*, void*, void*, void*, void*, void*, int, bool);
  void (*grn_forward_stats)(DType, const Shape&, const Plan&, const Packed&, const void*, void*,
                            void*, int);
  void (*grn_backward_stats)(DType, const Shape&, const Plan&, const Packed&, const void*,
                             const void*, void*, void*, void*, int);
  void (*se_stats)(DType, const Shape&, const Plan&, const Packed&, const void*, void*, void*,
                   int);
};

const Kernels& kernels() {
  static const Kernels k = [] {
#if defined(FV_HAVE_ISA_AVX512)
    if (cpu::selected_isa() == cpu::Isa::Avx512)
      return Kernels{&cnblock::avx512::forward, &cnblock::avx512::backward_tiles,
                     &cnblock::avx512::grn_forward_stats, &cnblock::avx512::grn_backward_stats,
                     &cnblock::avx512::se_stats};
#endif
#if defined(FV_HAVE_ISA_AVX2)
    if (cpu::selected_isa() == cpu::Isa::Avx2)
      return Kernels{&cnblock::avx2::forward, &cnblock::avx2::backward_tiles,
                     &cnblock::avx2::grn_forward_stats, &cnblock::avx2::grn_backward_stats,
                     &cnblock::avx2::se_stats};
#endif
    return Kernels{&cnblock::generic::forward, &cnblock::generic::backward_tiles,
                   &cnblock::generic::grn_forward_stats, &cnblock::generic::grn_backward_stats,
                   &cnblock::generic::se_stats};
  }();
  return k;
}

void check_param(const TensorView* t, const TensorView& x, std::initializer_list<int64_t> shape,
                 const char* name, bool required) {
  if (!t) {
    FV_CHECK_TYPE(!required, name, ": required, got none");
    return;
  }
  core::check_cpu(*t, name);
  FV_CHECK_TYPE(t->dtype == x.dtype, name, ": expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(t->dtype));
  bool ok = t->ndim == static_cast<int>(shape.size());
  int d = 0;
  for (int64_t v : shape) ok = ok && t->shape[d++] == v;
  if (!ok) {
    std::string want = "[";
    d = 0;
    for (int64_t v : shape) want += (d++ ? ", " : "") + std::to_string(v);
    detail::throw_error(ErrorKind::Value, name, ": expected shape ", want, "], got ",
                        t->describe());
  }
  FV_CHECK_VALUE(t->data != nullptr || t->numel() == 0, name, ": null data pointer");
}

// The MLP's fc1 (hidden, C) / fc2 (C, hidden) weights and biases; returns hidden.
int64_t check_mlp_params(const TensorView& x, int64_t c, const TensorView* fc1_weight,
                         const TensorView* fc1_bias, const TensorView* fc2_weight,
                         const TensorView* fc2_bias) {
  FV_CHECK_TYPE(fc1_weight != nullptr, "fc1_weight: required, got none");
  FV_CHECK_VALUE(fc1_weight->ndim == 2 && fc1_weight->shape[1] == c && fc1_weight->shape[0] >= 1,
                 "fc1_weight: expected shape [hidden, ", c, "], got ", fc1_weight->describe());
  const int64_t hidden = fc1_weight->shape[0];
  FV_CHECK_VALUE(hidden * c < (int64_t(1) << 31), "fc1_weight: hidden x C = ", hidden * c,
                 " is too large for the 32-bit BLAS interface");
  check_param(fc1_weight, x, {hidden, c}, "fc1_weight", true);
  check_param(fc2_weight, x, {c, hidden}, "fc2_weight", true);
  check_param(fc1_bias, x, {hidden}, "fc1_bias", false);
  check_param(fc2_bias, x, {c}, "fc2_bias", false);
  return hidden;
}

bool is_nhwc(const TensorView& t) { return (core::dense_layouts(t) & 2) != 0; }

// x and y (both dense) must not share memory: each tile reads rows of x around the rows
// it writes.
void check_no_overlap(const TensorView& x, const TensorView& y) {
  const char* xb = static_cast<const char*>(x.data);
  const char* yb = static_cast<const char*>(y.data);
  const size_t xn = static_cast<size_t>(x.numel()) * dtype_size(x.dtype);
  const size_t yn = static_cast<size_t>(y.numel()) * dtype_size(y.dtype);
  FV_CHECK_VALUE(yb + yn <= xb || xb + xn <= yb,
                 "y: must not overlap x (each tile reads rows of x around the rows it writes)");
}

// GRN's row sums kept between a forward and its backward (convnext_block.h, mlp.h):
// (N, H, hidden), contiguous, in the accumulation type, CPU; only with GRN.
void check_grn_stats(const TensorView* t, bool has_grn, int64_t n, int64_t h, int64_t hidden,
                     DType dt) {
  if (!t) return;
  FV_CHECK_VALUE(has_grn, "grn_stats: given, but there is no GRN");
  core::check_cpu(*t, "grn_stats");
  const DType want = dt == DType::Float64 ? DType::Float64 : DType::Float32;
  FV_CHECK_TYPE(t->dtype == want, "grn_stats: expected dtype ", dtype_name(want),
                " (the accumulation type), got ", dtype_name(t->dtype));
  FV_CHECK_VALUE(t->ndim == 3 && t->shape[0] == n && t->shape[1] == h && t->shape[2] == hidden &&
                     t->is_contiguous(),
                 "grn_stats: expected a contiguous [", n, ", ", h, ", ", hidden, "] tensor, got ",
                 t->describe());
}

Shape shape_of(const TensorView& x, const ConvNeXtBlockWeights& w) {
  const ConvNeXtBlockShape s = convnext_block_shape(x, w, ConvNeXtBlockParams{});
  return Shape{s.n, s.c, s.h, s.w, s.k, s.hidden,
               dwconv::padded_channels(s.c, static_cast<int64_t>(acc_size(x.dtype)))};
}

// Row-major [rows][cols] copy of a 2-D (or 1-D when rows == 1) tensor in type A, in
// 64 x 64 blocks (a transposed source is then read and written a cache line at a time).
template <class A> void pack_matrix(const TensorView& t, int64_t rows, int64_t cols, A* out) {
  const int64_t sr = t.ndim == 2 ? t.strides[0] : 0, sc = t.strides[t.ndim - 1];
  constexpr int64_t B = 64;
  for (int64_t r0 = 0; r0 < rows; r0 += B)
    for (int64_t c0 = 0; c0 < cols; c0 += B)
      for (int64_t r = r0; r < std::min(rows, r0 + B); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + B); ++c)
          out[r * cols + c] = static_cast<A>(load_as_double(t.dtype, t.data, r * sr + c * sc));
}

// A (rows, cols) matrix stored column by column: strides (1, rows), as `w.t().contiguous().t()`
// leaves a row-major (cols, rows) tensor. Not when it is also row-major (a single row or
// column).
bool is_kmajor(const TensorView& t, int64_t rows, int64_t cols) {
  return t.ndim == 2 && t.shape[0] == rows && t.shape[1] == cols && rows > 1 && cols > 1 &&
         t.strides[0] == 1 && t.strides[1] == rows;
}

// A depthwise weight (c, 1, kh, kw), any strides, as [kh][kw][cp] in A (padding zero).
template <class A>
void pack_dw(const TensorView& t, int64_t kh, int64_t kw, int64_t c, int64_t cp, A* out) {
  std::fill(out, out + kh * kw * cp, A(0));
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t ch = 0; ch < c; ++ch)
        out[(i * kw + j) * cp + ch] = static_cast<A>(load_as_double(
            t.dtype, t.data, ch * t.strides[0] + i * t.strides[2] + j * t.strides[3]));
}

template <class A> void pack_vector(const TensorView* t, int64_t n, int64_t len, A fill, A* out) {
  for (int64_t i = 0; i < len; ++i)
    out[i] = (t && i < n) ? static_cast<A>(load_as_double(t->dtype, t->data, i * t->strides[0]))
             : (i < n ? fill : A(0));
}

// The parameters in A: matrices used in place when they already are contiguous A. A
// k-major fc1 / fc2 weight (is_kmajor) gives w1t / w2t, used in place when it is of type A,
// and, unless fwd_only (the forward reads only those), a row-major copy for the backward.
template <class A>
Packed pack_all(const TensorView& x, const Shape& s, const ConvNeXtBlockWeights& w,
                const ConvNeXtBlockParams& p, ScratchCarver& sc, bool dry, bool fwd_only) {
  Packed pk{};
  auto take = [&](int64_t n) { return static_cast<A*>(sc.take(static_cast<size_t>(n) * sizeof(A))); };
  const bool native = (x.dtype == DType::Float32 && sizeof(A) == 4) ||
                      (x.dtype == DType::Float64 && sizeof(A) == 8);
  A* dw = take(s.k * s.k * s.cp);
  A* dwb = take(s.cp);
  A* nw = take(s.c);
  A* nb = take(s.c);
  A* b1 = take(s.hidden);
  A* b2 = take(s.c);
  A* gm = take(s.c);
  A* ds = take(std::max<int64_t>(s.n, 1));
  const bool grn = w.grn_weight != nullptr;
  A* gf = grn ? take(s.n * s.hidden) : nullptr;  // filled by the statistics pass
  A* gu = grn ? take(s.n * s.hidden) : nullptr;  // backward only
  A* gbias = grn ? take(s.hidden) : nullptr;
  const A* w1 = nullptr;
  const A* w2 = nullptr;
  // A k-major matrix (rows, cols) used in place when native, else converted in memory order.
  auto kmajor_of = [&](const TensorView& t, int64_t rows, int64_t cols) -> const A* {
    if (!is_kmajor(t, rows, cols)) return nullptr;
    if (native) return static_cast<const A*>(t.data);
    A* m = take(rows * cols);
    if (!dry)
      for (int64_t i = 0; i < rows * cols; ++i) m[i] = static_cast<A>(load_as_double(t.dtype, t.data, i));
    return m;
  };
  // Row-major weights are used as they are: the forward's products with them (fc1, fc2 and
  // the backward's recomputation) are gemm(N, T), which the own kernel serves by packing
  // B^T's panels. (Until session 28 calls of 256+ pixels transposed the weights once per
  // call for its gemm(N, N) and smaller ones ran the BLAS: the tiled MLP's forward + backward
  // at 7x7, N=8, C=768 went 39.7 -> 32.6 ms without the copies.)
  const A* w1t = kmajor_of(*w.fc1_weight, s.hidden, s.c);
  if (w1t && fwd_only) {
    // the forward's fc1 reads w1t only
  } else if (native && w.fc1_weight->is_contiguous()) {
    w1 = static_cast<const A*>(w.fc1_weight->data);
  } else {
    A* m = take(s.hidden * s.c);
    if (!dry) pack_matrix<A>(*w.fc1_weight, s.hidden, s.c, m);
    w1 = m;
  }
  const A* w2t = kmajor_of(*w.fc2_weight, s.c, s.hidden);
  if (w2t && fwd_only) {
    // the forward's fc2 reads w2t only
  } else if (native && w.fc2_weight->is_contiguous()) {
    w2 = static_cast<const A*>(w.fc2_weight->data);
  } else {
    A* m = take(s.c * s.hidden);
    if (!dry) pack_matrix<A>(*w.fc2_weight, s.c, s.hidden, m);
    w2 = m;
  }
  if (!dry) {
    if (w.dw_weight) pack_dw<A>(*w.dw_weight, s.k, s.k, s.c, s.cp, dw);
    pack_vector<A>(w.dw_bias, s.c, s.cp, A(0), dwb);
    pack_vector<A>(w.norm_weight, s.c, s.c, A(1), nw);
    pack_vector<A>(w.norm_bias, s.c, s.c, A(0), nb);
    pack_vector<A>(w.fc1_bias, s.hidden, s.hidden, A(0), b1);
    pack_vector<A>(w.fc2_bias, s.c, s.c, A(0), b2);
    pack_vector<A>(w.gamma, s.c, s.c, A(1), gm);
    pack_vector<A>(w.drop_scale, s.n, s.n, A(1), ds);
    if (grn) pack_vector<A>(w.grn_bias, s.hidden, s.hidden, A(0), gbias);
  }
  pk.grn_f = gf;
  pk.grn_u = gu;
  pk.grn_b = gbias;
  pk.dw = dw;
  pk.dwb = dwb;
  pk.nw = nw;
  pk.nb = nb;
  pk.w1 = w1;
  pk.w1t = w1t;
  pk.b1 = b1;
  pk.w2 = w2;
  pk.w2t = w2t;
  pk.b2 = b2;
  pk.gamma = gm;
  pk.ds = ds;
  pk.eps = p.eps;
  pk.tanh = p.gelu_tanh;
  pk.norm = p.layer_norm;
  pk.se_scale = w.se_down_weight ? take(std::max<int64_t>(s.n * s.c, 1)) : nullptr;  // se_scales()
  return pk;
}

Packed pack(const TensorView& x, const Shape& s, const ConvNeXtBlockWeights& w,
            const ConvNeXtBlockParams& p, ScratchCarver& sc, bool dry, bool fwd_only) {
  if (x.dtype == DType::Float64) return pack_all<double>(x, s, w, p, sc, dry, fwd_only);
  return pack_all<float>(x, s, w, p, sc, dry, fwd_only);
}

// See set_grn_store_bytes (fastvis/convnext_block.h).
std::atomic<size_t> g_grn_store_bytes{size_t(40) << 20};

// Forward scratch: packed parameters, then one tile buffer set per thread.
size_t forward_layout(const TensorView& x, const Shape& s, const ConvNeXtBlockWeights& w,
                      const ConvNeXtBlockParams& p, void* base, size_t bytes, Packed* pk,
                      void** bufs, void** rowsq = nullptr, void** serows = nullptr) {
  const Plan pl = cnblock::plan(s, static_cast<int64_t>(acc_size(x.dtype)));
  ScratchCarver sc(base, bytes);
  const Packed packed = pack(x, s, w, p, sc, base == nullptr, /*fwd_only=*/true);
  void* b = sc.take(static_cast<size_t>(pl.fwd_elems) * acc_size(x.dtype) *
                    static_cast<size_t>(get_num_threads()));
  void* rsq = w.grn_weight ? sc.take(static_cast<size_t>(s.n * s.h * s.hidden) * acc_size(x.dtype))
                           : nullptr;
  void* ser = w.se_down_weight
                  ? sc.take(static_cast<size_t>(s.n * s.h * s.c) * acc_size(x.dtype))
                  : nullptr;
  // GRN: keep the statistics pass's hidden activations for the output pass when they fit
  // in grn_store_bytes() (the bindings keep up to 128 MiB of scratch per calling thread, so
  // a buffer this size is reused, not faulted in, from call to call): the output pass then
  // skips the mixer, SE and fc1 (a third of the block's GEMM work).
  const size_t hidden_bytes =
      static_cast<size_t>(s.n * s.h * s.w * s.hidden) * acc_size(x.dtype);
  void* hid = (w.grn_weight && hidden_bytes <= grn_store_bytes()) ? sc.take(hidden_bytes) : nullptr;
  if (pk) {
    *pk = packed;
    pk->hidden = hid;
  }
  if (bufs) *bufs = b;
  if (rowsq) *rowsq = rsq;
  if (serows) *serows = ser;
  return sc.used();
}

// GRN statistics of image n from the per-row sums of squares: G[j] (the norms), the
// mean of the norms plus eps (returned), and f[n][j] = 1 + grn_weight[j] * Nx[j].
// Sums run in double, in row order.
template <class A>
void grn_norms(const Shape& s, const A* rowsq, const TensorView& gw, double eps,
               std::vector<double>& G, std::vector<double>& den, A* f) {
  const int64_t Hd = s.hidden;
  G.assign(static_cast<size_t>(s.n * Hd), 0.0);
  den.assign(static_cast<size_t>(s.n), 0.0);
  for (int64_t n = 0; n < s.n; ++n) {
    double* g = G.data() + n * Hd;
    for (int64_t r = 0; r < s.h; ++r) {
      const A* q = rowsq + (n * s.h + r) * Hd;
      for (int64_t j = 0; j < Hd; ++j) g[j] += static_cast<double>(q[j]);
    }
    double mean = 0;
    for (int64_t j = 0; j < Hd; ++j) {
      g[j] = std::sqrt(g[j]);
      mean += g[j];
    }
    den[n] = mean / static_cast<double>(Hd) + eps;
    for (int64_t j = 0; j < Hd; ++j)
      f[n * Hd + j] = static_cast<A>(
          1.0 + load_as_double(gw.dtype, gw.data, j * gw.strides[0]) * g[j] / den[n]);
  }
}

}  // namespace

namespace {

// The SE scales from the per-row sums of the mixer output, per image (in double, rows
// added in order): m = sums / (H*W), s = sigmoid(up(relu(down(m)))).
template <class A>
void se_scales(const Shape& s, const A* rowsum, const ConvNeXtBlockWeights& w, A* out) {
  const TensorView& dw = *w.se_down_weight;
  const TensorView& uw = *w.se_up_weight;
  const int64_t C = s.c, cr = dw.shape[0];
  std::vector<double> m(C), hid(cr);
  for (int64_t n = 0; n < s.n; ++n) {
    std::fill(m.begin(), m.end(), 0.0);
    for (int64_t r = 0; r < s.h; ++r)
      for (int64_t c = 0; c < C; ++c) m[c] += rowsum[(n * s.h + r) * C + c];
    for (int64_t c = 0; c < C; ++c) m[c] /= static_cast<double>(s.h * s.w);
    for (int64_t j = 0; j < cr; ++j) {
      double a = w.se_down_bias ? load_as_double(w.se_down_bias->dtype, w.se_down_bias->data,
                                                 j * w.se_down_bias->strides[0])
                                : 0.0;
      for (int64_t c = 0; c < C; ++c)
        a += load_as_double(dw.dtype, dw.data, j * dw.strides[0] + c * dw.strides[1]) * m[c];
      hid[j] = a > 0 ? a : 0;
    }
    for (int64_t c = 0; c < C; ++c) {
      double a = w.se_up_bias ? load_as_double(w.se_up_bias->dtype, w.se_up_bias->data,
                                               c * w.se_up_bias->strides[0])
                              : 0.0;
      for (int64_t j = 0; j < cr; ++j)
        a += load_as_double(uw.dtype, uw.data, c * uw.strides[0] + j * uw.strides[1]) * hid[j];
      out[n * C + c] = static_cast<A>(1.0 / (1.0 + std::exp(-a)));
    }
  }
}

// The forward's passes over the tiles (SE statistics, GRN statistics, then the output
// pass) on the scratch forward_layout carved.
void run_forward(const TensorView& x, const Shape& s, const ConvNeXtBlockWeights& w,
                 const ConvNeXtBlockParams& p, Packed pk, void* bufs, void* rowsq, void* serows,
                 void* y) {
  const Plan pl = cnblock::plan(s, static_cast<int64_t>(acc_size(x.dtype)));
  const int nt = get_num_threads();
  if (pk.se_scale) {  // channel means of the mixer output, then the SE scales
    const void* scale = pk.se_scale;
    pk.se_scale = nullptr;  // the statistics pass sees the unscaled mixer output
    kernels().se_stats(x.dtype, s, pl, pk, x.data, serows, bufs, nt);
    if (x.dtype == DType::Float64)
      se_scales<double>(s, static_cast<const double*>(serows), w,
                        static_cast<double*>(const_cast<void*>(scale)));
    else
      se_scales<float>(s, static_cast<const float*>(serows), w,
                       static_cast<float*>(const_cast<void*>(scale)));
    pk.se_scale = scale;
  }
  if (w.grn_weight) {  // statistics pass, then the output pass
    prof::Scope ps(prof::kGrnStats);
    kernels().grn_forward_stats(x.dtype, s, pl, pk, x.data, rowsq, bufs, nt);
    std::vector<double> G, den;
    if (x.dtype == DType::Float64)
      grn_norms<double>(s, static_cast<const double*>(rowsq), *w.grn_weight, p.grn_eps, G, den,
                        static_cast<double*>(const_cast<void*>(pk.grn_f)));
    else
      grn_norms<float>(s, static_cast<const float*>(rowsq), *w.grn_weight, p.grn_eps, G, den,
                       static_cast<float*>(const_cast<void*>(pk.grn_f)));
  }
  kernels().forward(x.dtype, s, pl, pk, x.data, y, bufs, nt);
}

// Blocks only the forward path serves (no LayerNorm, SE): refused by the backward and
// by the CUDA kernels.
bool forward_only(const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p) {
  return !p.layer_norm || w.se_down_weight || w.se_up_weight || w.se_down_bias || w.se_up_bias;
}

}  // namespace

#if !defined(FASTVIS_WITH_CUDA)
namespace {
[[noreturn]] void cnblock_no_cuda() {
  detail::throw_error(ErrorKind::Runtime,
                      "got CUDA tensors, but this build of fastvis has no CUDA backend "
                      "(rebuild with FASTVIS_CUDA=on and a CUDA compiler)");
}
}  // namespace
#endif

void set_grn_store_bytes(size_t bytes) { g_grn_store_bytes.store(bytes); }
size_t grn_store_bytes() { return g_grn_store_bytes.load(); }

ConvNeXtBlockShape convnext_block_shape(const TensorView& x, const ConvNeXtBlockWeights& w,
                                        const ConvNeXtBlockParams& p) {
  const core::NchwDims d = core::activation_dims(x, "x");
  core::check_cpu(x, "x");
  FV_CHECK_VALUE(is_nhwc(x), "x: the fused ConvNeXt block needs a channels-last (NHWC) dense "
                 "tensor, got ", x.describe(), " with other strides");
  FV_CHECK_VALUE(std::isfinite(p.eps) && p.eps > 0, "eps: expected a positive finite number, got ",
                 p.eps);
  check_param(w.dw_weight, x, {d.c, 1, w.dw_weight ? w.dw_weight->shape[2] : 0,
                               w.dw_weight ? w.dw_weight->shape[3] : 0}, "dw_weight", true);
  const int64_t k = w.dw_weight->shape[2];
  FV_CHECK_VALUE(k == w.dw_weight->shape[3] && k % 2 == 1 && k >= 1 && k <= 31,
                 "dw_weight: expected a square odd kernel of size 1..31, got ", k, "x",
                 w.dw_weight->shape[3]);
  const int64_t hidden = check_mlp_params(x, d.c, w.fc1_weight, w.fc1_bias, w.fc2_weight,
                                          w.fc2_bias);
  check_param(w.dw_bias, x, {d.c}, "dw_bias", false);
  check_param(w.norm_weight, x, {d.c}, "norm_weight", false);
  check_param(w.norm_bias, x, {d.c}, "norm_bias", false);
  check_param(w.gamma, x, {d.c}, "gamma", false);
  check_param(w.grn_weight, x, {hidden}, "grn_weight", false);
  check_param(w.grn_bias, x, {hidden}, "grn_bias", false);
  FV_CHECK_VALUE((w.grn_weight == nullptr) == (w.grn_bias == nullptr),
                 "grn_weight and grn_bias: give both (ConvNeXt-V2 GRN) or neither");
  FV_CHECK_VALUE(std::isfinite(p.grn_eps) && p.grn_eps > 0,
                 "grn_eps: expected a positive finite number, got ", p.grn_eps);
  FV_CHECK_VALUE(p.layer_norm || (w.norm_weight == nullptr && w.norm_bias == nullptr),
                 "norm_weight / norm_bias given with layer_norm = false (no LayerNorm)");
  if (w.se_down_weight || w.se_up_weight || w.se_down_bias || w.se_up_bias) {
    FV_CHECK_TYPE(w.se_down_weight && w.se_up_weight,
                  "se_down_weight and se_up_weight: both are required for the SE step");
    FV_CHECK_VALUE(w.se_down_weight->ndim == 2 && w.se_down_weight->shape[1] == d.c &&
                       w.se_down_weight->shape[0] >= 1,
                   "se_down_weight: expected shape [Cr, ", d.c, "], got ",
                   w.se_down_weight->describe());
    const int64_t cr = w.se_down_weight->shape[0];
    check_param(w.se_down_weight, x, {cr, d.c}, "se_down_weight", true);
    check_param(w.se_up_weight, x, {d.c, cr}, "se_up_weight", true);
    check_param(w.se_down_bias, x, {cr}, "se_down_bias", false);
    check_param(w.se_up_bias, x, {d.c}, "se_up_bias", false);
  }
  if (w.drop_scale) {
    core::check_cpu(*w.drop_scale, "drop_scale");
    FV_CHECK_VALUE(w.drop_scale->ndim == 1 && w.drop_scale->shape[0] == d.n,
                   "drop_scale: expected shape [", d.n, "] (one factor per sample), got ",
                   w.drop_scale->describe());
  }
  return ConvNeXtBlockShape{d.n, d.c, d.h, d.w, k, hidden};
}

size_t convnext_block_forward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                                            const ConvNeXtBlockParams& p) {
  FV_CHECK_VALUE(x.device.type != DeviceType::CUDA || !forward_only(w, p),
                 "convnext_block: the CUDA kernels have no SE step and always a LayerNorm");
  if (x.device.type == DeviceType::CUDA) {  // validated by cnblock::cuda
#if defined(FASTVIS_WITH_CUDA)
    return cnblock::cuda::forward_scratch_bytes(x, w, p);
#else
    cnblock_no_cuda();
#endif
  }
  const ConvNeXtBlockShape s = convnext_block_shape(x, w, p);
  if (s.n * s.h * s.w == 0) return 0;
  return forward_layout(x, shape_of(x, w), w, p, nullptr, 0, nullptr, nullptr);
}

void convnext_block_forward(const TensorView& x, const ConvNeXtBlockWeights& w,
                            const ConvNeXtBlockParams& p, const TensorView& y, void* scratch,
                            size_t scratch_bytes, void* stream, const TensorView* grn_stats) {
  FV_CHECK_VALUE(x.device.type != DeviceType::CUDA || !forward_only(w, p),
                 "convnext_block: the CUDA kernels have no SE step and always a LayerNorm");
  FV_CHECK_VALUE(x.device.type != DeviceType::CUDA || grn_stats == nullptr,
                 "grn_stats: CPU only (the CUDA kernels recompute GRN's statistics)");
  if (x.device.type == DeviceType::CUDA) {  // validated by cnblock::cuda
#if defined(FASTVIS_WITH_CUDA)
    return cnblock::cuda::forward(x, w, p, y, scratch, scratch_bytes, stream);
#else
    cnblock_no_cuda();
#endif
  }
  const ConvNeXtBlockShape s0 = convnext_block_shape(x, w, p);
  core::check_cpu(y, "y");
  FV_CHECK_VALUE(y.ndim == 4 && y.shape[0] == s0.n && y.shape[1] == s0.c && y.shape[2] == s0.h &&
                     y.shape[3] == s0.w && y.dtype == x.dtype && is_nhwc(y),
                 "y: expected a channels-last ", dtype_name(x.dtype), " tensor of x's shape, got ",
                 y.describe());
  check_grn_stats(grn_stats, w.grn_weight != nullptr, s0.n, s0.h, s0.hidden, x.dtype);
  if (s0.n * s0.h * s0.w == 0) return;
  check_no_overlap(x, y);
  FV_CHECK_VALUE(scratch != nullptr, "scratch: null pointer");
  const Shape s = shape_of(x, w);
  Packed pk;
  void* bufs;
  void* rowsq = nullptr;
  void* serows = nullptr;
  // Carving checks the size as it goes (before anything is written).
  forward_layout(x, s, w, p, scratch, scratch_bytes, &pk, &bufs, &rowsq, &serows);
  if (grn_stats) rowsq = grn_stats->data;  // the statistics pass writes the caller's copy
  run_forward(x, s, w, p, pk, bufs, rowsq, serows, y.data);
}

// ------------------------------------------------------------------ backward

namespace {

struct BwdScratch {
  Packed pk;
  void* d = nullptr;         // dL/d(dwconv output), NHWC, x's dtype
  void* partials = nullptr;  // plan.chunks x plan.partial_elems accumulators
  void* bufs = nullptr;      // per-thread tile buffers
  void* dw_scratch = nullptr;
  size_t dw_bytes = 0;
  void* rowsq = nullptr;  // GRN: per-row sums (N*H x hidden accumulators each)
  void* rowt = nullptr;
  void* rowdb = nullptr;
};

size_t dw_backward_bytes(const TensorView& x, const TensorView& d, const ConvNeXtBlockWeights& w,
                         const ConvNeXtBlockGrads& g, const DepthwiseConv2dParams& dp) {
  size_t b = 0;
  if (g.x) b = std::max(b, depthwise_conv2d_backward_input_scratch_bytes(d, *w.dw_weight, x, dp));
  if (g.dw_weight || g.dw_bias) {
    const TensorView& gw = g.dw_weight ? *g.dw_weight : *w.dw_weight;
    b = std::max(b, depthwise_conv2d_backward_weight_scratch_bytes(d, x, gw, dp));
  }
  return b;
}

DepthwiseConv2dParams dw_params(int64_t k) {
  DepthwiseConv2dParams dp;
  dp.pad_top = dp.pad_bottom = dp.pad_left = dp.pad_right = k / 2;
  return dp;
}

// Backward scratch: packed parameters, D, the partials, the tile buffers, GRN's row sums
// and the depthwise backward's scratch. Without a mixer (the MLP op) D is the caller's
// input gradient and there is no depthwise backward: neither is reserved.
size_t backward_layout(const TensorView& x, const Shape& s, const ConvNeXtBlockWeights& w,
                       const ConvNeXtBlockParams& p, const ConvNeXtBlockGrads* g, void* base,
                       size_t bytes, BwdScratch* out) {
  const size_t a = acc_size(x.dtype);
  const Plan pl = cnblock::plan(s, static_cast<int64_t>(a));
  ScratchCarver sc(base, bytes);
  BwdScratch bs;
  bs.pk = pack(x, s, w, p, sc, base == nullptr, /*fwd_only=*/false);
  const bool dw = s.mix.kind == cnblock::Mixer::Dwconv;
  if (dw) bs.d = sc.take(static_cast<size_t>(s.n * s.h * s.w * s.c) * dtype_size(x.dtype));
  bs.partials = sc.take(static_cast<size_t>(pl.chunks * pl.partial_elems) * a);
  bs.bufs = sc.take(static_cast<size_t>(pl.bwd_elems) * a * static_cast<size_t>(get_num_threads()));
  if (w.grn_weight) {
    const size_t rb = static_cast<size_t>(s.n * s.h * s.hidden) * a;
    bs.rowsq = sc.take(rb);
    bs.rowt = sc.take(rb);
    bs.rowdb = sc.take(rb);
    // The statistics pass keeps dz (then also a) for the gradient pass when they fit in
    // grn_store_bytes(): one GEMM fewer per tile each in the gradient pass.
    const size_t hb = static_cast<size_t>(s.n * s.h * s.w * s.hidden) * a;
    const size_t cap = grn_store_bytes();
    if (hb <= cap) bs.pk.grn_dz = sc.take(hb);
    if (2 * hb <= cap) bs.pk.grn_a = sc.take(hb);
  }
  if (!dw) {
    if (out) *out = bs;
    return sc.used();
  }
  // The depthwise backward's scratch (its size does not depend on D's address).
  const TensorView dv = make_nhwc_view(bs.d ? bs.d : reinterpret_cast<void*>(64), x.dtype, s.n,
                                       s.c, s.h, s.w);
  ConvNeXtBlockGrads all;
  all.x = &x;
  all.dw_weight = w.dw_weight;
  bs.dw_bytes = dw_backward_bytes(x, dv, w, g ? *g : all, dw_params(s.k));
  bs.dw_scratch = sc.take(std::max<size_t>(bs.dw_bytes, 1));
  if (out) *out = bs;
  return sc.used();
}

void check_grad(const TensorView* g, const TensorView* like, const TensorView& x,
                std::initializer_list<int64_t> shape, const char* name) {
  if (!g) return;
  check_param(g, x, shape, name, true);
  FV_CHECK_VALUE(g->is_contiguous(), name, ": must be contiguous, got ", g->describe());
}

// Where run 0 of the backward can write a weight-gradient sum: the caller's gradient tensor
// itself when it is dense and of the accumulation type A (float32 or float64 blocks; a
// bfloat16 block's gradients are not), so the reduction need not copy the sum there. For
// ConvNeXt-T's 768-channel blocks at batch 1 (one run) the two copies were 2 x 9.4 MB read
// and written per call, half of the reduction's time.
template <class A> A* direct_grad(const TensorView* g) {
  const DType want = sizeof(A) == sizeof(double) ? DType::Float64 : DType::Float32;
  return g && g->dtype == want && g->is_contiguous() ? static_cast<A*>(g->data) : nullptr;
}

// Sums the runs' partials in run order, then writes the parameter gradients. w1_0 / w2_0:
// run 0's fc1 / fc2 weight-gradient sums when they are not in its partial slots (the
// gradient tensors themselves, direct_grad).
template <class A>
void reduce_partials(const Shape& s, const Plan& pl, const Packed& pk, A* partials, A* w1_0,
                     A* w2_0, const ConvNeXtBlockGrads& g) {
  const cnblock::PartialLayout lay = cnblock::partial_layout(s);
  // The runs' partials summed in run order into run 0's (0 + p0 + p1 + ... as before, so
  // the same bits): no separate buffer, whose zeroing and page faults cost more than the
  // sum for the wide stages at batch 1 (19 MB for ConvNeXt-T's 768-channel blocks).
  A* sum = partials;
  // Run 0's sums, by segment of the layout (w1, w2, then the small sums): its w1 / w2
  // slots may live in the gradient tensors instead.
  A* const w1_sum = w1_0 ? w1_0 : sum + lay.w1;
  A* const w2_sum = w2_0 ? w2_0 : sum + lay.w2;
  if (pl.chunks > 1)
    parallel_for(lay.total, 4096, [&](int64_t b, int64_t e) {
      const int64_t seg[4] = {lay.w1, lay.w2, lay.b1, lay.total};
      A* const home[3] = {w1_sum, w2_sum, sum + lay.b1};  // element seg[k] lives at home[k]
      for (int k = 0; k < 3; ++k) {
        const int64_t lo = std::max(b, seg[k]), hi = std::min(e, seg[k + 1]);
        if (lo >= hi) continue;
        A* dst = home[k] + (lo - seg[k]);
        for (int64_t ch = 1; ch < pl.chunks; ++ch) {
          const A* src = partials + ch * pl.partial_elems;
          for (int64_t i = lo; i < hi; ++i) dst[i - lo] += src[i];
        }
      }
    });
  // The fc2 slots hold M = sum_p e_p z_p^T and E = sum_p e_p (e = dy * drop_scale): the
  // fc2 gradients are gamma-scaled, and dgamma_c = sum_j W2_cj M_cj + b2_c E_c (in double:
  // four running sums per row, added in a fixed order). Channels are independent: split
  // over the pool.
  const A* w2 = static_cast<const A*>(pk.w2);
  const A* gm = static_cast<const A*>(pk.gamma);
  const A* b2 = static_cast<const A*>(pk.b2);
  A* M = w2_sum;
  A* E = sum + lay.b2;
  A* dgam = sum + lay.gamma;
  const int64_t Hd = s.hidden;
  parallel_for(s.c, std::max<int64_t>(1, 4096 / std::max<int64_t>(Hd, 1)),
               [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const A* wr = w2 + c * Hd;
      A* mr = M + c * Hd;
      const A gc = gm[c];
      double acc[4] = {0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 4 <= Hd; j += 4)
        for (int l = 0; l < 4; ++l) {
          acc[l] += static_cast<double>(wr[j + l]) * static_cast<double>(mr[j + l]);
          mr[j + l] *= gc;
        }
      for (; j < Hd; ++j) {
        acc[0] += static_cast<double>(wr[j]) * static_cast<double>(mr[j]);
        mr[j] *= gc;
      }
      dgam[c] = static_cast<A>(static_cast<double>(b2[c]) * static_cast<double>(E[c]) +
                               ((acc[0] + acc[1]) + (acc[2] + acc[3])));
      E[c] *= gc;
    }
  });
  auto write = [&](const TensorView* t, const A* src, int64_t n) {
    if (!t || static_cast<const void*>(src) == t->data) return;  // already in place
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
      switch (t->dtype) {
        case DType::Float32:
          for (int64_t i = b; i < e; ++i) static_cast<float*>(t->data)[i] = static_cast<float>(src[i]);
          break;
        case DType::Float64:
          for (int64_t i = b; i < e; ++i) static_cast<double*>(t->data)[i] = static_cast<double>(src[i]);
          break;
        default:
          for (int64_t i = b; i < e; ++i)
            store_from_double(t->dtype, t->data, i, static_cast<double>(src[i]));
      }
    });
  };
  write(g.fc1_weight, w1_sum, s.hidden * s.c);
  write(g.fc2_weight, w2_sum, s.c * s.hidden);
  write(g.fc1_bias, sum + lay.b1, s.hidden);
  write(g.fc2_bias, sum + lay.b2, s.c);
  write(g.norm_weight, sum + lay.nw, s.c);
  write(g.norm_bias, sum + lay.nb, s.c);
  write(g.gamma, sum + lay.gamma, s.c);
}

// out += gy elementwise (dense, same dtype); bfloat16 sums in float, rounded once.
void add_residual(DType dt, const void* gy, void* out, int64_t ne) {
  parallel_for(ne, 1 << 14, [&](int64_t b, int64_t e) {
    switch (dt) {
      case DType::Float32: {
        float* o = static_cast<float*>(out);
        const float* a = static_cast<const float*>(gy);
        for (int64_t i = b; i < e; ++i) o[i] += a[i];
        break;
      }
      case DType::Float64: {
        double* o = static_cast<double*>(out);
        const double* a = static_cast<const double*>(gy);
        for (int64_t i = b; i < e; ++i) o[i] += a[i];
        break;
      }
      default: {
        uint16_t* o = static_cast<uint16_t*>(out);
        const uint16_t* a = static_cast<const uint16_t*>(gy);
        for (int64_t i = b; i < e; ++i) o[i] = float_to_bf16(bf16_to_float(o[i]) + bf16_to_float(a[i]));
      }
    }
  });
}

void zero_grad(const TensorView* t) {
  if (t && t->numel() > 0) std::memset(t->data, 0, static_cast<size_t>(t->numel()) * t->itemsize());
}

// GRN's two statistics passes of the backward and their reductions (double, in row
// order): f and u for the gradient pass, and the GRN parameter gradients.
//   t[n][j] = sum_p dz g,  dbeta_j = sum dz,  dgamma_grn_j = sum_n Nx[n][j] t[n][j],
//   s_j = grn_weight_j t_j,  dG_k = s_k / den - (sum_j s_j G_j) / (den^2 hidden),
//   u[n][k] = dG_k / G_k (0 where G_k = 0, as PyTorch's norm gradient).
template <class A>
void grn_backward_prepare(const Shape& s, const Plan& pl, const BwdScratch& bs,
                          const TensorView& x, const TensorView& grad_y,
                          const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p,
                          const ConvNeXtBlockGrads& g, const void* saved_rowsq) {
  const int nt = get_num_threads();
  const int64_t Hd = s.hidden;
  // The forward's per-row sums of g^2 when its caller kept them (the same numbers this
  // pass would compute: the tiling and summation order depend on the shape only).
  const void* rowsq = saved_rowsq;
  if (!rowsq) {
    kernels().grn_forward_stats(x.dtype, s, pl, bs.pk, x.data, bs.rowsq, bs.bufs, nt);
    rowsq = bs.rowsq;
  }
  std::vector<double> G, den;
  A* f = static_cast<A*>(const_cast<void*>(bs.pk.grn_f));
  A* u = static_cast<A*>(const_cast<void*>(bs.pk.grn_u));
  grn_norms<A>(s, static_cast<const A*>(rowsq), *w.grn_weight, p.grn_eps, G, den, f);
  kernels().grn_backward_stats(x.dtype, s, pl, bs.pk, x.data, grad_y.data, bs.rowt, bs.rowdb,
                               bs.bufs, nt);
  const A* rowt = static_cast<const A*>(bs.rowt);
  const A* rowdb = static_cast<const A*>(bs.rowdb);
  const TensorView& gw = *w.grn_weight;
  std::vector<double> dgw(static_cast<size_t>(Hd), 0.0), dgb(static_cast<size_t>(Hd), 0.0),
      t(static_cast<size_t>(Hd));
  for (int64_t n = 0; n < s.n; ++n) {
    std::fill(t.begin(), t.end(), 0.0);
    for (int64_t r = 0; r < s.h; ++r) {
      const A* qt = rowt + (n * s.h + r) * Hd;
      const A* qb = rowdb + (n * s.h + r) * Hd;
      for (int64_t j = 0; j < Hd; ++j) {
        t[j] += static_cast<double>(qt[j]);
        dgb[j] += static_cast<double>(qb[j]);
      }
    }
    const double* Gn = G.data() + n * Hd;
    double sg = 0;
    for (int64_t j = 0; j < Hd; ++j) {
      dgw[j] += Gn[j] / den[n] * t[j];
      sg += load_as_double(gw.dtype, gw.data, j * gw.strides[0]) * t[j] * Gn[j];
    }
    for (int64_t k = 0; k < Hd; ++k) {
      const double sk = load_as_double(gw.dtype, gw.data, k * gw.strides[0]) * t[k];
      const double dG = sk / den[n] - sg / (den[n] * den[n] * static_cast<double>(Hd));
      u[n * Hd + k] = Gn[k] > 0 ? static_cast<A>(dG / Gn[k]) : A(0);
    }
  }
  for (int64_t j = 0; j < Hd; ++j) {
    if (g.grn_weight) store_from_double(g.grn_weight->dtype, g.grn_weight->data, j, dgw[j]);
    if (g.grn_bias) store_from_double(g.grn_bias->dtype, g.grn_bias->data, j, dgb[j]);
  }
}

// The backward's passes over the tiles (GRN's statistics passes, then the gradient pass
// writing D and the partials) and the reduction of the parameter gradients, on the
// scratch backward_layout carved. d: where D goes (null: not wanted, see backward_tiles).
// saved_rowsq: the forward's GRN row sums, or null (recomputed).
void run_backward_tiles(const TensorView& grad_y, const TensorView& x, const Shape& s,
                        const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p,
                        const ConvNeXtBlockGrads& g, const BwdScratch& bs, void* d,
                        const void* saved_rowsq = nullptr) {
  const Plan pl = cnblock::plan(s, static_cast<int64_t>(acc_size(x.dtype)));
  if (w.grn_weight) {
    prof::Scope ps(prof::kGrnStats);
    if (x.dtype == DType::Float64)
      grn_backward_prepare<double>(s, pl, bs, x, grad_y, w, p, g, saved_rowsq);
    else
      grn_backward_prepare<float>(s, pl, bs, x, grad_y, w, p, g, saved_rowsq);
  }
  // Run 0's weight-gradient sums straight into the gradient tensors where they can be.
  const bool f64 = x.dtype == DType::Float64;
  void* w1_0 = f64 ? static_cast<void*>(direct_grad<double>(g.fc1_weight))
                   : static_cast<void*>(direct_grad<float>(g.fc1_weight));
  void* w2_0 = f64 ? static_cast<void*>(direct_grad<double>(g.fc2_weight))
                   : static_cast<void*>(direct_grad<float>(g.fc2_weight));
  // Phase A: the tiles -> D and the per-chunk partial sums.
  kernels().backward_tiles(x.dtype, s, pl, bs.pk, x.data, grad_y.data, d, bs.partials, w1_0,
                           w2_0, bs.bufs, get_num_threads(), g.gamma != nullptr);
  prof::Scope ps(prof::kReduce);
  if (f64)
    reduce_partials<double>(s, pl, bs.pk, static_cast<double*>(bs.partials),
                            static_cast<double*>(w1_0), static_cast<double*>(w2_0), g);
  else
    reduce_partials<float>(s, pl, bs.pk, static_cast<float*>(bs.partials),
                           static_cast<float*>(w1_0), static_cast<float*>(w2_0), g);
}

}  // namespace

size_t convnext_block_backward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                                             const ConvNeXtBlockParams& p) {
  FV_CHECK_VALUE(!forward_only(w, p), "convnext_block: no backward for blocks without a "
                 "LayerNorm or with an SE step (inference-only forms); compute gradients "
                 "through the separate ops");
  if (x.device.type == DeviceType::CUDA) {  // validated by cnblock::cuda
#if defined(FASTVIS_WITH_CUDA)
    return cnblock::cuda::backward_scratch_bytes(x, w, p);
#else
    cnblock_no_cuda();
#endif
  }
  const ConvNeXtBlockShape s = convnext_block_shape(x, w, p);
  if (s.n * s.h * s.w == 0) return 0;
  return backward_layout(x, shape_of(x, w), w, p, nullptr, nullptr, 0, nullptr);
}

void convnext_block_backward(const TensorView& grad_y, const TensorView& x,
                             const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p,
                             const ConvNeXtBlockGrads& g, void* scratch, size_t scratch_bytes,
                             void* stream, const TensorView* grn_stats) {
  FV_CHECK_VALUE(!forward_only(w, p), "convnext_block: no backward for blocks without a "
                 "LayerNorm or with an SE step (inference-only forms); compute gradients "
                 "through the separate ops");
  FV_CHECK_VALUE(x.device.type != DeviceType::CUDA || grn_stats == nullptr,
                 "grn_stats: CPU only (the CUDA kernels recompute GRN's statistics)");
  if (x.device.type == DeviceType::CUDA) {  // validated by cnblock::cuda
#if defined(FASTVIS_WITH_CUDA)
    return cnblock::cuda::backward(grad_y, x, w, p, g, scratch, scratch_bytes, stream);
#else
    cnblock_no_cuda();
#endif
  }
  const ConvNeXtBlockShape s0 = convnext_block_shape(x, w, p);
  const int64_t C = s0.c, Hd = s0.hidden, k = s0.k;
  auto check_act = [&](const TensorView& t, const char* name) {
    core::check_cpu(t, name);
    FV_CHECK_VALUE(t.ndim == 4 && t.shape[0] == s0.n && t.shape[1] == C && t.shape[2] == s0.h &&
                       t.shape[3] == s0.w && t.dtype == x.dtype && is_nhwc(t),
                   name, ": expected a channels-last ", dtype_name(x.dtype),
                   " tensor of x's shape, got ", t.describe());
  };
  check_act(grad_y, "grad_y");
  if (g.x) check_act(*g.x, "grad_x");
  check_grad(g.dw_weight, w.dw_weight, x, {C, 1, k, k}, "grad_dw_weight");
  check_grad(g.dw_bias, nullptr, x, {C}, "grad_dw_bias");
  check_grad(g.norm_weight, nullptr, x, {C}, "grad_norm_weight");
  check_grad(g.norm_bias, nullptr, x, {C}, "grad_norm_bias");
  check_grad(g.fc1_weight, nullptr, x, {Hd, C}, "grad_fc1_weight");
  check_grad(g.fc1_bias, nullptr, x, {Hd}, "grad_fc1_bias");
  check_grad(g.fc2_weight, nullptr, x, {C, Hd}, "grad_fc2_weight");
  check_grad(g.fc2_bias, nullptr, x, {C}, "grad_fc2_bias");
  check_grad(g.gamma, nullptr, x, {C}, "grad_gamma");
  check_grad(g.grn_weight, nullptr, x, {Hd}, "grad_grn_weight");
  check_grad(g.grn_bias, nullptr, x, {Hd}, "grad_grn_bias");
  FV_CHECK_VALUE(w.grn_weight || (!g.grn_weight && !g.grn_bias),
                 "grad_grn_weight / grad_grn_bias: the block has no GRN");
  check_grn_stats(grn_stats, w.grn_weight != nullptr, s0.n, s0.h, Hd, x.dtype);

  if (s0.n * s0.h * s0.w == 0) {  // nothing flows: zero parameter gradients
    for (const TensorView* t : {g.dw_weight, g.dw_bias, g.norm_weight, g.norm_bias, g.fc1_weight,
                                g.fc1_bias, g.fc2_weight, g.fc2_bias, g.gamma, g.grn_weight,
                                g.grn_bias})
      zero_grad(t);
    return;
  }
  FV_CHECK_VALUE(scratch != nullptr, "scratch: null pointer");
  const Shape s = shape_of(x, w);
  const size_t need = backward_layout(x, s, w, p, &g, nullptr, 0, nullptr);
  FV_CHECK_VALUE(scratch_bytes >= need, "scratch buffer too small: need at least ", need,
                 " bytes, got ", scratch_bytes);
  BwdScratch bs;
  backward_layout(x, s, w, p, &g, scratch, scratch_bytes, &bs);
  run_backward_tiles(grad_y, x, s, w, p, g, bs, bs.d, grn_stats ? grn_stats->data : nullptr);
  prof::Scope ps_dw(prof::kDwconvBwd);

  // Phase B: the depthwise convolution's backward on D, and the residual.
  const TensorView dv = make_nhwc_view(bs.d, x.dtype, s.n, s.c, s.h, s.w);
  const DepthwiseConv2dParams dp = dw_params(k);
  if (g.dw_weight || g.dw_bias) {
    if (g.dw_weight) {
      depthwise_conv2d_backward_weight(dv, x, *g.dw_weight, g.dw_bias, dp, bs.dw_scratch,
                                       bs.dw_bytes);
    } else {  // bias only: the sum of D over pixels, in a fixed order
      const int64_t npx = s.n * s.h * s.w;
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0;
        for (int64_t q = 0; q < npx; ++q) acc += load_as_double(x.dtype, bs.d, q * C + c);
        store_from_double(g.dw_bias->dtype, g.dw_bias->data, c, acc);
      }
    }
  }
  if (g.x) {
    depthwise_conv2d_backward_input(dv, *w.dw_weight, *g.x, dp, bs.dw_scratch, bs.dw_bytes);
    add_residual(x.dtype, grad_y.data, g.x->data, s.n * s.h * s.w * C);
  }
}


// ------------------------------------------------------------------ MetaNeXt (inference)

namespace {

int64_t padded(int64_t c, DType dt) {
  return dwconv::padded_channels(c, static_cast<int64_t>(acc_size(dt)));
}

// The MLP part as ConvNeXt-block weights without a depthwise conv or a norm.
ConvNeXtBlockWeights mlp_weights(const MetaNeXtBlockWeights& w) {
  ConvNeXtBlockWeights c;
  c.fc1_weight = w.fc1_weight;
  c.fc1_bias = w.fc1_bias;
  c.fc2_weight = w.fc2_weight;
  c.fc2_bias = w.fc2_bias;
  c.gamma = w.gamma;
  c.drop_scale = w.drop_scale;
  return c;
}

Shape metanext_shape(const MetaNeXtBlockShape& m, const MetaNeXtBlockParams& p, DType dt) {
  Shape s{m.n, m.c, m.h, m.w, 1, m.hidden, padded(m.c, dt)};
  s.mix.kind = cnblock::Mixer::Inception;
  s.mix.cid = m.identity;
  s.mix.g = m.g;
  s.mix.ks = m.ks;
  s.mix.kb = m.kb;
  s.mix.dil = p.dilation;
  s.mix.cpg = padded(m.g, dt);
  return s;
}

template <class A>
void pack_branches(const MetaNeXtBlockWeights& w, const Shape& s, ScratchCarver& sc, bool dry,
                   Packed& pk) {
  const TensorView* ws[3] = {w.hw_weight, w.w_weight, w.h_weight};
  const TensorView* bs[3] = {w.hw_bias, w.w_bias, w.h_bias};
  for (int b = 0; b < 3; ++b) {
    int64_t kh, kw, off;
    cnblock::inception_branch(s.mix, b, kh, kw, off);
    A* wp = static_cast<A*>(sc.take(static_cast<size_t>(kh * kw * s.mix.cpg) * sizeof(A)));
    A* bp = static_cast<A*>(sc.take(static_cast<size_t>(s.mix.cpg) * sizeof(A)));
    if (!dry) {
      pack_dw<A>(*ws[b], kh, kw, s.mix.g, s.mix.cpg, wp);
      pack_vector<A>(bs[b], s.mix.g, s.mix.cpg, A(0), bp);
    }
    pk.mw[b] = wp;
    pk.mb[b] = bp;
  }
}

size_t metanext_layout(const TensorView& x, const MetaNeXtBlockWeights& w,
                       const MetaNeXtBlockParams& p, const Shape& s, void* base, size_t bytes,
                       Packed* pk, void** bufs) {
  const Plan pl = cnblock::plan(s, static_cast<int64_t>(acc_size(x.dtype)));
  ScratchCarver sc(base, bytes);
  const bool dry = base == nullptr;
  ConvNeXtBlockParams cp;
  cp.gelu_tanh = p.gelu_tanh;
  Packed packed = pack(x, s, mlp_weights(w), cp, sc, dry, /*fwd_only=*/true);
  if (x.dtype == DType::Float64)
    pack_branches<double>(w, s, sc, dry, packed);
  else
    pack_branches<float>(w, s, sc, dry, packed);
  packed.norm = false;
  void* b = sc.take(static_cast<size_t>(pl.fwd_elems) * acc_size(x.dtype) *
                    static_cast<size_t>(get_num_threads()));
  if (pk) *pk = packed;
  if (bufs) *bufs = b;
  return sc.used();
}

void check_branch(const TensorView* t, const TensorView& x, int64_t g, int64_t kh, int64_t kw,
                  const char* name) {
  check_param(t, x, {g, 1, kh, kw}, name, true);
}

}  // namespace

MetaNeXtBlockShape metanext_block_shape(const TensorView& x, const MetaNeXtBlockWeights& w,
                                        const MetaNeXtBlockParams& p) {
  const core::NchwDims d = core::activation_dims(x, "x");
  FV_CHECK_VALUE(x.device.type == DeviceType::CPU,
                 "metanext_block: CPU only (no CUDA kernels for the fused MetaNeXt block yet), "
                 "got ", x.describe());
  core::check_cpu(x, "x");
  FV_CHECK_VALUE(is_nhwc(x), "x: the fused MetaNeXt block needs a channels-last (NHWC) dense "
                 "tensor, got ", x.describe(), " with other strides");
  FV_CHECK_TYPE(w.hw_weight && w.w_weight && w.h_weight,
                "hw_weight, w_weight and h_weight: the three mixer branches are required");
  for (const TensorView* t : {w.hw_weight, w.w_weight, w.h_weight})
    FV_CHECK_VALUE(t->ndim == 4 && t->shape[1] == 1, "mixer weights: expected (g, 1, kh, kw) "
                   "depthwise weights, got ", t->describe());
  const int64_t g = w.hw_weight->shape[0], ks = w.hw_weight->shape[2], kb = w.w_weight->shape[3];
  FV_CHECK_VALUE(g >= 1 && 3 * g <= d.c, "hw_weight: g = ", g, " branch channels need 1 <= 3g <= C = ",
                 d.c);
  FV_CHECK_VALUE(ks == w.hw_weight->shape[3] && ks % 2 == 1,
                 "hw_weight: expected a square odd kernel, got ", w.hw_weight->describe());
  FV_CHECK_VALUE(kb % 2 == 1, "w_weight: expected an odd band length, got ", w.w_weight->describe());
  check_branch(w.hw_weight, x, g, ks, ks, "hw_weight");
  check_branch(w.w_weight, x, g, 1, kb, "w_weight");
  check_branch(w.h_weight, x, g, kb, 1, "h_weight");
  check_param(w.hw_bias, x, {g}, "hw_bias", false);
  check_param(w.w_bias, x, {g}, "w_bias", false);
  check_param(w.h_bias, x, {g}, "h_bias", false);
  FV_CHECK_VALUE(p.dilation >= 1 && (std::max(ks, kb) - 1) * p.dilation < 4096,
                 "dilation: expected an integer >= 1 (with a kernel extent below 4096), got ",
                 p.dilation);
  const int64_t hidden = check_mlp_params(x, d.c, w.fc1_weight, w.fc1_bias, w.fc2_weight,
                                          w.fc2_bias);
  check_param(w.gamma, x, {d.c}, "gamma", false);
  if (w.drop_scale) {
    core::check_cpu(*w.drop_scale, "drop_scale");
    FV_CHECK_VALUE(w.drop_scale->ndim == 1 && w.drop_scale->shape[0] == d.n,
                   "drop_scale: expected shape [", d.n, "] (one factor per sample), got ",
                   w.drop_scale->describe());
  }
  return MetaNeXtBlockShape{d.n, d.c, d.h, d.w, d.c - 3 * g, g, ks, kb, hidden};
}

size_t metanext_block_forward_scratch_bytes(const TensorView& x, const MetaNeXtBlockWeights& w,
                                            const MetaNeXtBlockParams& p) {
  const MetaNeXtBlockShape m = metanext_block_shape(x, w, p);
  if (m.n * m.h * m.w == 0) return 0;
  return metanext_layout(x, w, p, metanext_shape(m, p, x.dtype), nullptr, 0, nullptr, nullptr);
}

void metanext_block_forward(const TensorView& x, const MetaNeXtBlockWeights& w,
                            const MetaNeXtBlockParams& p, const TensorView& y, void* scratch,
                            size_t scratch_bytes, void* stream) {
  (void)stream;  // CPU only: metanext_block_shape refuses other devices
  const MetaNeXtBlockShape m = metanext_block_shape(x, w, p);
  core::check_cpu(y, "y");
  FV_CHECK_VALUE(y.ndim == 4 && y.shape[0] == m.n && y.shape[1] == m.c && y.shape[2] == m.h &&
                     y.shape[3] == m.w && y.dtype == x.dtype && is_nhwc(y),
                 "y: expected a channels-last ", dtype_name(x.dtype), " tensor of x's shape, got ",
                 y.describe());
  if (m.n * m.h * m.w == 0) return;
  check_no_overlap(x, y);
  FV_CHECK_VALUE(scratch != nullptr, "scratch: null pointer");
  const Shape s = metanext_shape(m, p, x.dtype);
  Packed pk;
  void* bufs;
  metanext_layout(x, w, p, s, scratch, scratch_bytes, &pk, &bufs);
  const Plan pl = cnblock::plan(s, static_cast<int64_t>(acc_size(x.dtype)));
  kernels().forward(x.dtype, s, pl, pk, x.data, y.data, bufs, get_num_threads());
}


// ------------------------------------------------------------------ MLP (no mixer)

namespace {

ConvNeXtBlockWeights block_weights(const MlpWeights& w) {
  ConvNeXtBlockWeights c;
  c.fc1_weight = w.fc1_weight;
  c.fc1_bias = w.fc1_bias;
  c.fc2_weight = w.fc2_weight;
  c.fc2_bias = w.fc2_bias;
  c.grn_weight = w.grn_weight;
  c.grn_bias = w.grn_bias;
  return c;
}

ConvNeXtBlockParams block_params(const MlpParams& p) {
  ConvNeXtBlockParams c;
  c.gelu_tanh = p.gelu_tanh;
  c.grn_eps = p.grn_eps;
  c.layer_norm = false;
  return c;
}

Shape mlp_engine_shape(const MlpShape& m, DType dt) {
  Shape s{m.n, m.c, m.h, m.w, 1, m.hidden, padded(m.c, dt)};
  s.mix.kind = cnblock::Mixer::Identity;
  return s;
}

void check_disjoint(const TensorView& a, const TensorView& b, const char* an, const char* bn) {
  const char* ab = static_cast<const char*>(a.data);
  const char* bb = static_cast<const char*>(b.data);
  const size_t na = static_cast<size_t>(a.numel()) * dtype_size(a.dtype);
  const size_t nb = static_cast<size_t>(b.numel()) * dtype_size(b.dtype);
  FV_CHECK_VALUE(ab + na <= bb || bb + nb <= ab, an, ": must not overlap ", bn);
}

void check_mlp_act(const TensorView& t, const MlpShape& m, DType dt, const char* name) {
  core::check_cpu(t, name);
  FV_CHECK_VALUE(t.ndim == 4 && t.shape[0] == m.n && t.shape[1] == m.c && t.shape[2] == m.h &&
                     t.shape[3] == m.w && t.dtype == dt && is_nhwc(t),
                 name, ": expected a channels-last ", dtype_name(dt), " tensor of x's shape, got ",
                 t.describe());
}

}  // namespace

MlpShape mlp_shape(const TensorView& x, const MlpWeights& w, const MlpParams& p) {
  const core::NchwDims d = core::activation_dims(x, "x");
  FV_CHECK_VALUE(x.device.type == DeviceType::CPU,
                 "mlp: CPU only (no CUDA kernels for the tiled MLP), got ", x.describe());
  core::check_cpu(x, "x");
  FV_CHECK_VALUE(is_nhwc(x), "x: the tiled MLP needs dense channels-last (NHWC) tokens, got ",
                 x.describe(), " with other strides");
  const int64_t hidden = check_mlp_params(x, d.c, w.fc1_weight, w.fc1_bias, w.fc2_weight,
                                          w.fc2_bias);
  check_param(w.grn_weight, x, {hidden}, "grn_weight", false);
  check_param(w.grn_bias, x, {hidden}, "grn_bias", false);
  FV_CHECK_VALUE((w.grn_weight == nullptr) == (w.grn_bias == nullptr),
                 "grn_weight and grn_bias: give both (GRN) or neither");
  FV_CHECK_VALUE(std::isfinite(p.grn_eps) && p.grn_eps > 0,
                 "grn_eps: expected a positive finite number, got ", p.grn_eps);
  return MlpShape{d.n, d.c, d.h, d.w, hidden};
}

size_t mlp_forward_scratch_bytes(const TensorView& x, const MlpWeights& w, const MlpParams& p) {
  const MlpShape m = mlp_shape(x, w, p);
  if (m.n * m.h * m.w == 0) return 0;
  return forward_layout(x, mlp_engine_shape(m, x.dtype), block_weights(w), block_params(p),
                        nullptr, 0, nullptr, nullptr);
}

void mlp_forward(const TensorView& x, const MlpWeights& w, const MlpParams& p,
                 const TensorView& y, void* scratch, size_t scratch_bytes,
                 const TensorView* grn_stats) {
  const MlpShape m = mlp_shape(x, w, p);
  check_mlp_act(y, m, x.dtype, "y");
  check_grn_stats(grn_stats, w.grn_weight != nullptr, m.n, m.h, m.hidden, x.dtype);
  if (m.n * m.h * m.w == 0) return;
  check_disjoint(y, x, "y", "x");
  FV_CHECK_VALUE(scratch != nullptr, "scratch: null pointer");
  const Shape s = mlp_engine_shape(m, x.dtype);
  const ConvNeXtBlockWeights bw = block_weights(w);
  const ConvNeXtBlockParams bp = block_params(p);
  Packed pk;
  void* bufs;
  void* rowsq = nullptr;
  forward_layout(x, s, bw, bp, scratch, scratch_bytes, &pk, &bufs, &rowsq);
  pk.residual = false;
  if (grn_stats) rowsq = grn_stats->data;  // the statistics pass writes the caller's copy
  run_forward(x, s, bw, bp, pk, bufs, rowsq, nullptr, y.data);
}

size_t mlp_backward_scratch_bytes(const TensorView& x, const MlpWeights& w, const MlpParams& p) {
  const MlpShape m = mlp_shape(x, w, p);
  if (m.n * m.h * m.w == 0) return 0;
  return backward_layout(x, mlp_engine_shape(m, x.dtype), block_weights(w), block_params(p),
                         nullptr, nullptr, 0, nullptr);
}

void mlp_backward(const TensorView& grad_y, const TensorView& x, const MlpWeights& w,
                  const MlpParams& p, const MlpGrads& g, void* scratch, size_t scratch_bytes,
                  const TensorView* grn_stats) {
  const MlpShape m = mlp_shape(x, w, p);
  const int64_t C = m.c, Hd = m.hidden;
  check_mlp_act(grad_y, m, x.dtype, "grad_y");
  check_grn_stats(grn_stats, w.grn_weight != nullptr, m.n, m.h, m.hidden, x.dtype);
  if (g.x) check_mlp_act(*g.x, m, x.dtype, "grad_x");
  check_grad(g.fc1_weight, nullptr, x, {Hd, C}, "grad_fc1_weight");
  check_grad(g.fc1_bias, nullptr, x, {Hd}, "grad_fc1_bias");
  check_grad(g.fc2_weight, nullptr, x, {C, Hd}, "grad_fc2_weight");
  check_grad(g.fc2_bias, nullptr, x, {C}, "grad_fc2_bias");
  check_grad(g.grn_weight, nullptr, x, {Hd}, "grad_grn_weight");
  check_grad(g.grn_bias, nullptr, x, {Hd}, "grad_grn_bias");
  FV_CHECK_VALUE(w.grn_weight || (!g.grn_weight && !g.grn_bias),
                 "grad_grn_weight / grad_grn_bias: the MLP has no GRN");
  if (m.n * m.h * m.w == 0) {  // nothing flows: zero parameter gradients
    for (const TensorView* t : {g.fc1_weight, g.fc1_bias, g.fc2_weight, g.fc2_bias, g.grn_weight,
                                g.grn_bias})
      zero_grad(t);
    return;
  }
  if (g.x) {
    check_disjoint(*g.x, x, "grad_x", "x");
    check_disjoint(*g.x, grad_y, "grad_x", "grad_y");
  }
  FV_CHECK_VALUE(scratch != nullptr, "scratch: null pointer");
  const Shape s = mlp_engine_shape(m, x.dtype);
  const ConvNeXtBlockWeights bw = block_weights(w);
  const ConvNeXtBlockParams bp = block_params(p);
  ConvNeXtBlockGrads bg;
  bg.x = g.x;
  bg.fc1_weight = g.fc1_weight;
  bg.fc1_bias = g.fc1_bias;
  bg.fc2_weight = g.fc2_weight;
  bg.fc2_bias = g.fc2_bias;
  bg.grn_weight = g.grn_weight;
  bg.grn_bias = g.grn_bias;
  const size_t need = backward_layout(x, s, bw, bp, &bg, nullptr, 0, nullptr);
  FV_CHECK_VALUE(scratch_bytes >= need, "scratch buffer too small: need at least ", need,
                 " bytes, got ", scratch_bytes);
  BwdScratch bs;
  backward_layout(x, s, bw, bp, &bg, scratch, scratch_bytes, &bs);
  bs.pk.residual = false;
  run_backward_tiles(grad_y, x, s, bw, bp, bg, bs, g.x ? g.x->data : nullptr,
                     grn_stats ? grn_stats->data : nullptr);
}

}  // namespace fastvis
