// fastvis: tile and halo index arithmetic of the CUDA depthwise-conv kernels.
//
// Everything the kernels in cuda/dwconv.cu compute about *where* things are --
// which output tile a block owns, which input window (with halo) it stages in
// shared memory, how a flat thread index maps to (pixel, channel), which taps a
// strided backward pass gathers, how the weight-gradient reduction is split --
// lives here as plain functions on plain structs. They are __host__ __device__
// under nvcc and ordinary inline functions under a host compiler, so the CPU
// test tests/cpp/test_dwconv_tile_math.cpp runs exactly this code over every
// tile of many odd shapes (it also emulates the kernels' loop structure on the
// host and compares against a naive convolution).
//
// The planners (plan_conv, plan_wgrad) are host-only: they pick tile sizes so
// that the shared-memory tiles fit a byte budget and fall back to a direct
// (global-memory) kernel when even the smallest tile would not fit.
//
// Conventions (one spatial dimension, see Dim):
//   forward:   out[o] = sum_i in[o*s - pad + i*d] * w[i],   0 <= i < k
//   gather:    gin[p] = sum over taps i with (p + pad - i*d) divisible by s and
//                       0 <= (p + pad - i*d)/s < out of gout[(p + pad - i*d)/s] * w[i]
// `pad` is the leading (top/left) padding. It may be negative: the stride-1
// backward-input pass is run as a forward correlation with the flipped kernel
// and padding (k-1)*d - pad, which is negative when pad > (k-1)*d.
#pragma once
#include <cstddef>
#include <cstdint>

#ifndef FV_HOST_DEVICE
#if defined(__CUDACC__)
#define FV_HOST_DEVICE __host__ __device__
#else
#define FV_HOST_DEVICE
#endif
#endif

namespace fastvis {
namespace dwconv {
namespace tiles {

// ------------------------------------------------------------------ constants
constexpr int kThreads = 256;   // threads per block of every kernel
constexpr int kMaxPix = 8;      // outputs per thread (register accumulators), conv kernels
constexpr int kMaxPairs = 8;    // (tap, channel) accumulators per thread, weight-grad kernel
constexpr int kMaxCb = 32;      // channels per block (a power of two dividing kThreads)
constexpr int kMaxTile = 64;    // largest tile side considered by the planners
// Shared memory every CUDA device can give a block without opting in.
constexpr size_t kDefaultSmemBudget = 48 * 1024;
// The planners never use more than this even where a device offers more (sm_80
// 163 KB, sm_90 227 KB): 99 KB is what every sm_8x / sm_9x / sm_12x part grants
// with opt-in, so the plans -- and the weight-gradient reduction order -- are the
// same on every supported GPU.
constexpr size_t kMaxSmemBudget = 99 * 1024;
// The weight-gradient partial sums are capped at this many bytes of scratch.
constexpr int64_t kWgradScratchCap = int64_t(64) << 20;
// Blocks the weight-gradient split aims for (enough to fill a large GPU).
constexpr int64_t kWgradTargetBlocks = 1024;
// Blocks below which the cost model counts a launch as under-filling the GPU.
constexpr int64_t kFillBlocks = 256;

// ------------------------------------------------------------------ integers
FV_HOST_DEVICE inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
FV_HOST_DEVICE inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
// floor(a / b) for b > 0 and any sign of a.
FV_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (q * b > a) ? q - 1 : q;
}
// ceil(a / b) for b > 0 and any sign of a.
FV_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }
// a mod b in [0, b) for b > 0.
FV_HOST_DEVICE inline int64_t pos_mod(int64_t a, int64_t b) { return a - floor_div(a, b) * b; }
// 32-bit versions for the kernels (64-bit division is a slow subroutine on GPUs).
FV_HOST_DEVICE inline int floor_div32(int a, int b) {
  int q = a / b;
  return (q * b > a) ? q - 1 : q;
}
FV_HOST_DEVICE inline int pos_mod32(int a, int b) { return a - floor_div32(a, b) * b; }
FV_HOST_DEVICE inline int gcd32(int a, int b) {
  while (b != 0) {
    int t = a % b;
    a = b;
    b = t;
  }
  return a;
}
FV_HOST_DEVICE inline int64_t gcd(int64_t a, int64_t b) {
  while (b != 0) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}
// Smallest power of two >= v (v >= 1), capped at 1 << 30.
FV_HOST_DEVICE inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v && p < (int64_t(1) << 30)) p <<= 1;
  return p;
}

// A half-open range [begin, end).
struct Span {
  int64_t begin, end;
  FV_HOST_DEVICE int64_t size() const { return end > begin ? end - begin : 0; }
};

// ------------------------------------------------------------------ one dimension
// One spatial dimension of a convolution: `in` input size, `out` output size,
// kernel size k, stride s, dilation d and leading padding `pad` (any sign).
struct Dim {
  int64_t in, out;
  int64_t k, s, d, pad;
};

// Output size of a convolution with per-side padding (0 if the window never fits).
FV_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t d,
                                            int64_t pad_lo, int64_t pad_hi) {
  int64_t span = in + pad_lo + pad_hi - d * (k - 1) - 1;
  return span < 0 ? 0 : span / s + 1;
}

// Number of tiles of size t covering n positions.
FV_HOST_DEVICE inline int64_t num_tiles(int64_t n, int64_t t) { return n <= 0 ? 0 : (n + t - 1) / t; }
// Positions owned by tile `idx`: [idx*t, min(n, (idx+1)*t)).
FV_HOST_DEVICE inline Span tile_span(int64_t idx, int64_t t, int64_t n) {
  return Span{idx * t, imin(n, (idx + 1) * t)};
}
// Intersection of a window with the image [0, n): the part read from memory.
FV_HOST_DEVICE inline Span clamp_span(Span w, int64_t n) {
  Span c;
  c.begin = imin(imax(w.begin, 0), n);
  c.end = imax(imin(w.end, n), c.begin);
  return c;
}
FV_HOST_DEVICE inline bool in_range(int64_t v, int64_t n) { return v >= 0 && v < n; }

// Forward: the input positions (unclamped; outside [0, in) is zero padding) read
// by the outputs [o.begin, o.end).
FV_HOST_DEVICE inline Span fwd_window(Span o, const Dim& d) {
  return Span{o.begin * d.s - d.pad, (o.end - 1) * d.s - d.pad + (d.k - 1) * d.d + 1};
}
// Extent of fwd_window for a full tile of t outputs (the shared-memory tile side).
FV_HOST_DEVICE inline int64_t fwd_extent(int64_t t, const Dim& d) {
  return (t - 1) * d.s + (d.k - 1) * d.d + 1;
}
// First input position of the window of the tile starting at output o0.
FV_HOST_DEVICE inline int64_t fwd_origin(int64_t o0, const Dim& d) { return o0 * d.s - d.pad; }

// Gather (backward input): the output-gradient positions (unclamped) that input
// positions [p.begin, p.end) receive from.
FV_HOST_DEVICE inline Span gather_window(Span p, const Dim& d) {
  return Span{ceil_div(p.begin + d.pad - (d.k - 1) * d.d, d.s), floor_div(p.end - 1 + d.pad, d.s) + 1};
}
// Upper bound of the size of gather_window over any t consecutive positions.
FV_HOST_DEVICE inline int64_t gather_extent(int64_t t, const Dim& d) {
  return ((t - 1) + (d.k - 1) * d.d) / d.s + 1;
}
FV_HOST_DEVICE inline int64_t gather_origin(int64_t p0, const Dim& d) {
  return ceil_div(p0 + d.pad - (d.k - 1) * d.d, d.s);
}

// The taps a gather position p receives: i = first + a*step for a < count, from
// source positions src0 - a*src_step (exact divisions; source positions may lie
// outside [0, out), where the gradient is zero).
struct TapWalk {
  int first, step, count;
  int64_t src0, src_step;
};
FV_HOST_DEVICE inline TapWalk gather_taps(int64_t p, const Dim& d) {
  // 32-bit arithmetic (spatial sizes, kernel parameters and padding fit in int;
  // the host checks it): the kernels then need no 64-bit division.
  TapWalk w{0, 1, 0, 0, 0};
  const int s = int(d.s), dd = int(d.d), k = int(d.k);
  const int a = int(p + d.pad);
  int first = -1;
  const int lim = s < k ? s : k;
  for (int i = 0; i < lim; ++i) {
    if (pos_mod32(a - i * dd, s) == 0) {
      first = i;
      break;
    }
  }
  if (first < 0) return w;
  const int step = s / gcd32(s, dd);
  w.first = first;
  w.step = step;
  w.count = (k - 1 - first) / step + 1;
  w.src0 = floor_div32(a - first * dd, s);
  w.src_step = step * dd / s;
  return w;
}

// ------------------------------------------------------------------ 2-D problems
// A depthwise convolution as the kernels see it. For the stride-1 backward-input
// pass, flipped_problem() turns the problem into a forward one over grad_y.
struct Problem2D {
  int64_t n, c;
  Dim y, x;             // rows (H) and columns (W)
  bool channels_last;   // NHWC (true) or NCHW (false) activations
};

// Stride-1 backward input as a forward correlation: input = grad_y (out), output =
// grad_x (in), kernel flipped in both dims, padding (k-1)*d - pad. The caller must
// read the weight flipped: w'[i][j] = w[k_h-1-i][k_w-1-j].
FV_HOST_DEVICE inline Dim flipped_dim(const Dim& d) {
  return Dim{d.out, d.in, d.k, 1, d.d, (d.k - 1) * d.d - d.pad};
}
FV_HOST_DEVICE inline Problem2D flipped_problem(const Problem2D& p) {
  return Problem2D{p.n, p.c, flipped_dim(p.y), flipped_dim(p.x), p.channels_last};
}

// ------------------------------------------------------------------ shared-memory tiles
// A (channel, row, col) tile of floats in shared memory. Channels-last tiles are
// stored [row][col][cb] (a warp's lanes walk channels), NCHW tiles [cb][row][col]
// (lanes walk columns); either way consecutive storage follows global memory.
struct SmemTile {
  int rows, cols, cb;
  bool cl;
  FV_HOST_DEVICE int floats() const { return rows * cols * cb; }
};
FV_HOST_DEVICE inline int smem_index(const SmemTile& t, int c, int r, int q) {
  return t.cl ? (r * t.cols + q) * t.cb + c : (c * t.rows + r) * t.cols + q;
}
// Distance in floats between horizontally adjacent pixels of one channel.
FV_HOST_DEVICE inline int pix_stride(const SmemTile& t) { return t.cl ? t.cb : 1; }
// smem_index(c, r + dr, q + dq) - smem_index(c, r, q).
FV_HOST_DEVICE inline int tap_offset(const SmemTile& t, int dr, int dq) {
  return (dr * t.cols + dq) * pix_stride(t);
}
struct SmemCoord {
  int c, r, q;
};
// Inverse of smem_index: the element at storage position e (used by the loaders,
// so consecutive threads load consecutive addresses).
FV_HOST_DEVICE inline SmemCoord smem_coord(const SmemTile& t, int e) {
  SmemCoord s;
  if (t.cl) {
    s.c = e % t.cb;
    const int pix = e / t.cb;
    s.r = pix / t.cols;
    s.q = pix % t.cols;
  } else {
    s.q = e % t.cols;
    const int rc = e / t.cols;
    s.r = rc % t.rows;
    s.c = rc / t.rows;
  }
  return s;
}

// Weights staged in shared memory as [tap][cb] (tap = i*kw + j).
struct WeightCoord {
  int c, i, j;
};
FV_HOST_DEVICE inline WeightCoord weight_coord(int e, int cb, int kw) {
  const int tap = e / cb;
  return WeightCoord{e % cb, tap / kw, tap % kw};
}
FV_HOST_DEVICE inline int weight_index(int tap, int c, int cb) { return tap * cb + c; }

// ------------------------------------------------------------------ thread mapping
// Every thread of a conv block owns one channel c of the block and the tile pixels
// u + r*step (r = 0, 1, ...). Channels-last: lanes walk channels; NCHW: lanes walk
// pixels (row-major within the tile), so global stores are coalesced either way.
struct ThreadSlot {
  int c, u, step;
};
FV_HOST_DEVICE inline ThreadSlot thread_slot(int t, int cb, bool cl) {
  const int per = kThreads / cb;  // threads per channel
  return cl ? ThreadSlot{t % cb, t / cb, per} : ThreadSlot{t / per, t % per, per};
}
struct TilePixel {
  int ly, lx;
};
FV_HOST_DEVICE inline TilePixel tile_pixel(int p, int tw) { return TilePixel{p / tw, p % tw}; }

// ------------------------------------------------------------------ conv plans
// A launch plan of the forward (gather = false) or backward-input gather
// (gather = true) kernel. For forward the destination is the output and the
// source the input; for gather the destination is grad_x and the source grad_y.
struct ConvPlan {
  bool direct;          // no tile fits the budget: use the global-memory kernel
  bool gather;
  int th, tw, cb, ppt;  // output tile, channels per block, pixels per thread
  int rows, cols;       // shared-memory source tile extents
  int in_floats, w_floats;
  size_t smem_bytes;
  int64_t tiles_h, tiles_w, cgroups, blocks;
};

FV_HOST_DEVICE inline int64_t dst_size(const Dim& d, bool gather) { return gather ? d.in : d.out; }
FV_HOST_DEVICE inline int64_t src_size(const Dim& d, bool gather) { return gather ? d.out : d.in; }
FV_HOST_DEVICE inline int64_t src_extent(int64_t t, const Dim& d, bool gather) {
  return gather ? gather_extent(t, d) : fwd_extent(t, d);
}
FV_HOST_DEVICE inline int64_t src_origin(int64_t p0, const Dim& d, bool gather) {
  return gather ? gather_origin(p0, d) : fwd_origin(p0, d);
}
FV_HOST_DEVICE inline SmemTile conv_src_tile(const ConvPlan& pl, bool cl) {
  return SmemTile{pl.rows, pl.cols, pl.cb, cl};
}

// Fills the derived fields of a plan with the given tile (no fit check).
inline ConvPlan make_conv_plan(const Problem2D& pr, bool gather, int th, int tw, int cb) {
  ConvPlan pl{};
  pl.direct = false;
  pl.gather = gather;
  pl.th = th;
  pl.tw = tw;
  pl.cb = cb;
  pl.ppt = int((int64_t(th) * tw * cb + kThreads - 1) / kThreads);
  const int64_t rows = src_extent(th, pr.y, gather), cols = src_extent(tw, pr.x, gather);
  const int64_t in_floats = rows * cols * cb, w_floats = pr.y.k * pr.x.k * cb;
  const bool huge = in_floats > (int64_t(1) << 28) || w_floats > (int64_t(1) << 28);
  pl.rows = huge ? 0 : int(rows);
  pl.cols = huge ? 0 : int(cols);
  pl.in_floats = huge ? 0 : int(in_floats);
  pl.w_floats = huge ? 0 : int(w_floats);
  pl.smem_bytes = huge ? ~size_t(0) : size_t(in_floats + w_floats) * sizeof(float);
  pl.tiles_h = num_tiles(dst_size(pr.y, gather), th);
  pl.tiles_w = num_tiles(dst_size(pr.x, gather), tw);
  pl.cgroups = num_tiles(pr.c, cb);
  pl.blocks = pr.n * pl.cgroups * pl.tiles_h * pl.tiles_w;
  return pl;
}

inline ConvPlan make_direct_conv_plan(const Problem2D& pr, bool gather) {
  ConvPlan pl{};
  pl.direct = true;
  pl.gather = gather;
  pl.th = pl.tw = pl.cb = pl.ppt = 1;
  const int64_t total = pr.n * pr.c * dst_size(pr.y, gather) * dst_size(pr.x, gather);
  pl.blocks = imin(num_tiles(total, kThreads), int64_t(1) << 20);  // grid-stride loop
  return pl;
}

inline bool conv_plan_valid(const ConvPlan& pl, size_t budget) {
  return !pl.direct && pl.ppt <= kMaxPix && pl.cb <= kMaxCb && kThreads % pl.cb == 0 &&
         pl.smem_bytes <= budget;
}

// Relative cost of a plan (arbitrary units): staging loads plus the serial FMA
// chain of a thread, times the number of blocks (at least kFillBlocks).
inline double conv_plan_cost(const Problem2D& pr, const ConvPlan& pl, int elem_bytes) {
  const double taps = double(pr.y.k * pr.x.k);
  // Global-load efficiency: contiguous run of one row of the staged tile.
  const double run_bytes = pr.channels_last ? double(pl.cb) * elem_bytes : double(pl.cols) * elem_bytes;
  const double coalesce = run_bytes >= 32.0 ? 1.0 : 32.0 / (run_bytes > 1.0 ? run_bytes : 1.0);
  const double loads = double((pl.in_floats + kThreads - 1) / kThreads) * coalesce * 4.0 +
                       double((pl.w_floats + kThreads - 1) / kThreads) * 4.0;
  // Shared-memory loads of a thread's FMA chain: forward reads one weight per tap
  // for all its ppt pixels (register blocking); gather reads both per FMA.
  double fma = double(pl.ppt + 1) * taps;
  if (pl.gather) fma = 2.0 * double(pl.ppt) * taps / double(pr.y.s * pr.x.s);
  const double per_block = loads + fma + 16.0;
  const double blocks = double(pl.blocks > kFillBlocks ? pl.blocks : kFillBlocks);
  return blocks * per_block;
}

// Picks the cheapest tile (channels per block cb, tile th x tw) whose shared
// memory fits `budget` bytes; the direct plan when none does.
inline ConvPlan plan_conv(const Problem2D& pr, bool gather, size_t budget, int elem_bytes) {
  const int64_t dh = dst_size(pr.y, gather), dw = dst_size(pr.x, gather);
  const int64_t cb_max = imin(kMaxCb, pow2_ceil(imax(pr.c, 1)));
  const int64_t th_max = imin(kMaxTile, pow2_ceil(imax(dh, 1)));
  const int64_t tw_max = imin(kMaxTile, pow2_ceil(imax(dw, 1)));
  ConvPlan best{};
  double best_cost = 0.0;
  bool found = false;
  for (int64_t cb = cb_max; cb >= 1; cb /= 2) {
    for (int64_t th = 1; th <= th_max; th *= 2) {
      for (int64_t tw = 1; tw <= tw_max; tw *= 2) {
        if (th * tw * cb > int64_t(kThreads) * kMaxPix) continue;
        const ConvPlan pl = make_conv_plan(pr, gather, int(th), int(tw), int(cb));
        if (!conv_plan_valid(pl, budget)) continue;
        const double cost = conv_plan_cost(pr, pl, elem_bytes);
        if (!found || cost < best_cost) {
          best = pl;
          best_cost = cost;
          found = true;
        }
      }
    }
  }
  return found ? best : make_direct_conv_plan(pr, gather);
}

// The block's place: image n, first channel c0, first destination pixel (y0, x0)
// and the source coordinates (sy0, sx0) of shared-memory element (row 0, col 0).
struct BlockTile {
  int64_t n, c0, y0, x0, sy0, sx0;
};
// Block order: tile column fastest, then tile row, channel group, image.
// Block counts fit in int (the launcher checks blocks <= INT_MAX), so the
// decomposition uses 32-bit division.
FV_HOST_DEVICE inline BlockTile conv_block(const ConvPlan& pl, const Problem2D& pr, int64_t block) {
  BlockTile bt;
  int b = int(block);
  const int tiles_w = int(pl.tiles_w), tiles_h = int(pl.tiles_h), cgroups = int(pl.cgroups);
  const int tx = b % tiles_w;
  b /= tiles_w;
  const int ty = b % tiles_h;
  b /= tiles_h;
  const int cg = b % cgroups;
  bt.n = b / cgroups;
  bt.c0 = int64_t(cg) * pl.cb;
  bt.y0 = int64_t(ty) * pl.th;
  bt.x0 = int64_t(tx) * pl.tw;
  bt.sy0 = src_origin(bt.y0, pr.y, pl.gather);
  bt.sx0 = src_origin(bt.x0, pr.x, pl.gather);
  return bt;
}

// Destination pixel r of a thread: whether it exists, its coordinates, and
// (forward) the shared-memory index of its tap (0, 0).
struct PixelRef {
  bool active;
  int64_t y, x;
  int base;
};
FV_HOST_DEVICE inline PixelRef conv_pixel(const ConvPlan& pl, const Problem2D& pr, const BlockTile& bt,
                                          const ThreadSlot& ts, int r, bool cl) {
  PixelRef ref;
  const int p = ts.u + r * ts.step;
  const bool in_tile = p < pl.th * pl.tw;
  const TilePixel tp = tile_pixel(in_tile ? p : 0, pl.tw);
  ref.y = bt.y0 + tp.ly;
  ref.x = bt.x0 + tp.lx;
  ref.active = in_tile && bt.c0 + ts.c < pr.c && ref.y < dst_size(pr.y, pl.gather) &&
               ref.x < dst_size(pr.x, pl.gather);
  const SmemTile st = conv_src_tile(pl, cl);
  ref.base = pl.gather ? 0 : smem_index(st, ts.c, tp.ly * int(pr.y.s), tp.lx * int(pr.x.s));
  return ref;
}

// Direct kernels: flat destination index -> (n, c, y, x); channels fastest for
// channels-last, columns fastest for NCHW (matching memory order).
struct Coord4 {
  int64_t n, c, y, x;
};
FV_HOST_DEVICE inline Coord4 direct_coord(int64_t e, int64_t c, int64_t h, int64_t w, bool cl) {
  Coord4 k;
  if (cl) {
    k.c = e % c;
    e /= c;
    k.x = e % w;
    e /= w;
    k.y = e % h;
    k.n = e / h;
  } else {
    k.x = e % w;
    e /= w;
    k.y = e % h;
    e /= h;
    k.c = e % c;
    k.n = e / c;
  }
  return k;
}

// ------------------------------------------------------------------ weight gradient
// gw[c][i][j] = sum_{n, oy, ox} gy[n][c][oy][ox] * x[n][c][oy*sh - pt + i*dh][ox*sw - pl + j*dw]
// The reduction domain is cut into items (image n, output tile th x tw); the items
// are split into `chunks` contiguous ranges. A block owns (chunk g, channel group,
// tap chunk = kernel rows [i0, i0 + rk)), keeps kMaxPairs (tap, channel) sums per
// thread in registers over its items in order, and writes them to the scratch
// buffer; a second kernel sums the chunks in order. Both orders depend on the
// shape only, so the result is bit-identical run to run.
struct WgradPlan {
  bool direct;
  int th, tw, cb, rk;     // gy tile, channels per block, kernel rows per tap chunk
  int rows, cols;         // x tile extents (for rk kernel rows)
  int gy_floats, x_floats;
  size_t smem_bytes;
  int64_t taps;           // kh * kw
  int64_t tiles_h, tiles_w, items, per_chunk, chunks, cgroups, tchunks, blocks;
  size_t scratch_bytes;   // chunks * C * (taps + 1) floats
};

FV_HOST_DEVICE inline SmemTile wgrad_gy_tile(const WgradPlan& pl, bool cl) {
  return SmemTile{pl.th, pl.tw, pl.cb, cl};
}
FV_HOST_DEVICE inline SmemTile wgrad_x_tile(const WgradPlan& pl, bool cl) {
  return SmemTile{pl.rows, pl.cols, pl.cb, cl};
}

// Splits the items into chunks: enough blocks to fill the GPU, scratch capped.
inline void wgrad_split(const Problem2D& pr, WgradPlan& pl) {
  pl.items = pr.n * pl.tiles_h * pl.tiles_w;
  if (pl.items <= 0 || pr.c <= 0) {
    pl.items = imax(pl.items, 0);
    pl.per_chunk = 0;
    pl.chunks = 0;
    pl.blocks = 0;
    pl.scratch_bytes = 0;
    return;
  }
  const int64_t per_g = pl.cgroups * pl.tchunks;
  const int64_t want = imax(1, ceil_div(kWgradTargetBlocks, per_g));
  const int64_t cap = imax(1, kWgradScratchCap / int64_t(sizeof(float)) / (pr.c * (pl.taps + 1)));
  const int64_t g = imax(1, imin(imin(want, cap), pl.items));
  pl.per_chunk = ceil_div(pl.items, g);
  pl.chunks = ceil_div(pl.items, pl.per_chunk);
  pl.blocks = pl.chunks * per_g;
  pl.scratch_bytes = size_t(pl.chunks) * size_t(pr.c) * size_t(pl.taps + 1) * sizeof(float);
}

inline WgradPlan make_wgrad_plan(const Problem2D& pr, int th, int tw, int cb, int rk) {
  WgradPlan pl{};
  pl.direct = false;
  pl.th = th;
  pl.tw = tw;
  pl.cb = cb;
  pl.rk = rk;
  const int64_t rows = (int64_t(th) - 1) * pr.y.s + (int64_t(rk) - 1) * pr.y.d + 1;
  const int64_t cols = fwd_extent(tw, pr.x);
  const int64_t xf = rows * cols * cb;
  const bool huge = xf > (int64_t(1) << 28);
  pl.rows = huge ? 0 : int(rows);
  pl.cols = huge ? 0 : int(cols);
  pl.gy_floats = th * tw * cb;
  pl.x_floats = huge ? 0 : int(xf);
  pl.smem_bytes = huge ? ~size_t(0) : size_t(xf + pl.gy_floats) * sizeof(float);
  pl.taps = pr.y.k * pr.x.k;
  pl.tiles_h = num_tiles(pr.y.out, th);
  pl.tiles_w = num_tiles(pr.x.out, tw);
  pl.cgroups = num_tiles(pr.c, cb);
  pl.tchunks = num_tiles(pr.y.k, rk);
  wgrad_split(pr, pl);
  return pl;
}

// The fallback: one block per (chunk, channel), threads over taps, global reads.
inline WgradPlan make_direct_wgrad_plan(const Problem2D& pr) {
  WgradPlan pl{};
  pl.direct = true;
  pl.th = pl.tw = 16;
  pl.cb = 1;
  pl.rk = int(pr.y.k);
  pl.taps = pr.y.k * pr.x.k;
  pl.tiles_h = num_tiles(pr.y.out, pl.th);
  pl.tiles_w = num_tiles(pr.x.out, pl.tw);
  pl.cgroups = pr.c;
  pl.tchunks = 1;
  wgrad_split(pr, pl);
  return pl;
}

inline bool wgrad_plan_valid(const Problem2D& pr, const WgradPlan& pl, size_t budget) {
  return !pl.direct && pl.cb <= kMaxCb && kThreads % pl.cb == 0 && pl.rk >= 1 &&
         pl.rk <= pr.y.k && int64_t(pl.rk) * pr.x.k * pl.cb <= int64_t(kThreads) * kMaxPairs &&
         pl.smem_bytes <= budget;
}

inline double wgrad_plan_cost(const Problem2D& pr, const WgradPlan& pl, int elem_bytes) {
  const double run_bytes = pr.channels_last ? double(pl.cb) * elem_bytes : double(pl.cols) * elem_bytes;
  const double coalesce = run_bytes >= 32.0 ? 1.0 : 32.0 / (run_bytes > 1.0 ? run_bytes : 1.0);
  const double loads = double((pl.x_floats + pl.gy_floats + kThreads - 1) / kThreads) * coalesce * 4.0;
  const int64_t pairs = int64_t(pl.rk) * pr.x.k * pl.cb;
  const double fma = double((pairs + kThreads - 1) / kThreads) * pl.th * pl.tw * 2.0;
  const double per_block = double(pl.per_chunk) * (loads + fma + 16.0);
  const double blocks = double(pl.blocks > kFillBlocks ? pl.blocks : kFillBlocks);
  const double reduce = double(pl.chunks) * double(pr.c) * double(pl.taps + 1) / kThreads * 2.0;
  return blocks * per_block + reduce;
}

// The plan depends on the shape and the budget only (not on the dtype), so the
// scratch size can be asked for before the tensors exist.
inline WgradPlan plan_wgrad(const Problem2D& pr, size_t budget) {
  const int elem_bytes = 4;
  const int64_t cb_max = imin(kMaxCb, pow2_ceil(imax(pr.c, 1)));
  const int64_t th_max = imin(32, pow2_ceil(imax(pr.y.out, 1)));
  const int64_t tw_max = imin(32, pow2_ceil(imax(pr.x.out, 1)));
  WgradPlan best{};
  double best_cost = 0.0;
  bool found = false;
  for (int64_t cb = cb_max; cb >= 1; cb /= 2) {
    const int64_t rk_max = imin(pr.y.k, int64_t(kThreads) * kMaxPairs / (pr.x.k * cb));
    for (int64_t th = 1; th <= th_max; th *= 2) {
      for (int64_t tw = 1; tw <= tw_max; tw *= 2) {
        if (th * tw > 1024) continue;
        // The most kernel rows per chunk that fit (fewer chunks re-stage less).
        for (int64_t rk = rk_max; rk >= 1; --rk) {
          const WgradPlan pl = make_wgrad_plan(pr, int(th), int(tw), int(cb), int(rk));
          if (!wgrad_plan_valid(pr, pl, budget)) continue;
          const double cost = wgrad_plan_cost(pr, pl, elem_bytes);
          if (!found || cost < best_cost) {
            best = pl;
            best_cost = cost;
            found = true;
          }
          break;
        }
      }
    }
  }
  return found ? best : make_direct_wgrad_plan(pr);
}

struct WgradBlock {
  int64_t g, c0;
  int i0, nrows;                 // kernel rows [i0, i0 + nrows)
  int64_t item_begin, item_end;  // items of chunk g
};
// Block order: tap chunk fastest, then channel group, then chunk.
FV_HOST_DEVICE inline WgradBlock wgrad_block(const WgradPlan& pl, const Problem2D& pr, int64_t block) {
  WgradBlock wb;
  int b = int(block);  // blocks <= INT_MAX (checked by the launcher)
  const int tchunks = int(pl.tchunks), cgroups = int(pl.cgroups);
  const int tc = b % tchunks;
  b /= tchunks;
  const int cg = b % cgroups;
  wb.g = b / cgroups;
  wb.c0 = int64_t(cg) * pl.cb;
  wb.i0 = tc * pl.rk;
  wb.nrows = int(imin(pr.y.k - wb.i0, pl.rk));
  wb.item_begin = wb.g * pl.per_chunk;
  wb.item_end = imin(pl.items, wb.item_begin + pl.per_chunk);
  return wb;
}

// Accumulator q (= t + r*kThreads) of a block: channel c and kernel tap (i, j),
// plus the shared-memory offset of the tap inside the x tile. Channels-last:
// lanes walk channels; NCHW: lanes walk taps of one channel (x-tile columns).
struct WgradPair {
  bool active;
  int c, i, j;
  int off;
};
FV_HOST_DEVICE inline WgradPair wgrad_pair(const WgradPlan& pl, const Problem2D& pr, const WgradBlock& wb,
                                           int q, bool cl) {
  WgradPair wp;
  const int kw = int(pr.x.k);
  const int ntl = wb.nrows * kw;  // taps in this chunk
  const int npairs = ntl * pl.cb;
  const int qq = q < npairs ? q : 0;
  int tl;
  if (cl) {
    wp.c = qq % pl.cb;
    tl = qq / pl.cb;
  } else {
    tl = qq % ntl;
    wp.c = qq / ntl;
  }
  const int ti = tl / kw;
  wp.j = tl % kw;
  wp.i = wb.i0 + ti;
  wp.active = q < npairs && wb.c0 + wp.c < pr.c;
  wp.off = tap_offset(wgrad_x_tile(pl, cl), ti * int(pr.y.d), wp.j * int(pr.x.d));
  return wp;
}

// Item `item` (= (n * tiles_h + ty) * tiles_w + tx): its image, first output
// pixel, and the x coordinates of x-tile element (row 0, col 0) for kernel row i0.
struct WgradItem {
  int64_t n, y0, x0, sy0, sx0;
};
// Items fit in int (the host checks items <= INT_MAX).
FV_HOST_DEVICE inline WgradItem wgrad_item(const WgradPlan& pl, const Problem2D& pr, const WgradBlock& wb,
                                           int64_t item64) {
  WgradItem it;
  int item = int(item64);
  const int tiles_w = int(pl.tiles_w), tiles_h = int(pl.tiles_h);
  const int tx = item % tiles_w;
  item /= tiles_w;
  const int ty = item % tiles_h;
  it.n = item / tiles_h;
  it.y0 = int64_t(ty) * pl.th;
  it.x0 = int64_t(tx) * pl.tw;
  it.sy0 = fwd_origin(it.y0, pr.y) + int64_t(wb.i0) * pr.y.d;
  it.sx0 = fwd_origin(it.x0, pr.x);
  return it;
}

// Scratch layout: partial sums [chunk][c][tap] then bias partials [chunk][c].
FV_HOST_DEVICE inline int64_t wgrad_partial_index(int64_t g, int64_t c, int64_t tap, int64_t C, int64_t taps) {
  return (g * C + c) * taps + tap;
}
FV_HOST_DEVICE inline int64_t wgrad_bias_partial_index(int64_t g, int64_t c, int64_t C, int64_t taps,
                                                       int64_t chunks) {
  return chunks * C * taps + g * C + c;
}

}  // namespace tiles
}  // namespace dwconv
}  // namespace fastvis
