// Internal: the CPU fast paths of depthwise convolution. cpu_kernels.cpp is
// compiled once per instruction set (FV_ISA = generic, avx2, ...) into its own
// namespace; depthwise_conv.cpp picks one at run time.
//
// Every kernel works on NHWC buffers: pixels `pitch` elements apart (Geom::xpitch /
// ypitch, default C: dense), so a channel slice of a wider NHWC tensor is served in
// place (the Inception depthwise op runs its branches that way). Weights arrive packed as
// [kh][kw][C] in the accumulation type A (float for float32/bfloat16, double for
// float64). Storage type T: float, double or bfloat16 (uint16 bits).
#pragma once
#include <algorithm>
#include <cstdint>

#include "core/cpu_features.h"
#include "fastvis/tensor.h"

namespace fastvis {
namespace dwconv {

struct Geom {
  int64_t n, c, h, w;    // input (of the correlation this kernel computes)
  int64_t kh, kw;
  int64_t oh, ow;        // output
  int64_t sh, sw;        // stride
  int64_t pt, pl;        // top/left padding (>= 0)
  int64_t dh, dw;        // dilation
  int64_t cp;            // channel stride of the packed weights (C rounded up to a block)
  // Pixel pitch (elements between consecutive pixels; rows are w * pitch, images
  // h * w * pitch apart) of the tensor on the input grid (h x w) and of the one on the
  // output grid (oh x ow). 0 means c (dense NHWC). A pitch > c serves the channel slice
  // [c0, c0 + c) of an NHWC tensor of `pitch` channels, given pointers offset by c0.
  int64_t xpitch = 0, ypitch = 0;
};

inline int64_t in_pitch(const Geom& g) { return g.xpitch ? g.xpitch : g.c; }
inline int64_t out_pitch(const Geom& g) { return g.ypitch ? g.ypitch : g.c; }

// Forward tiling: work items are (image, tile of output rows, channel block). Each
// item packs the input rows its tile reads, for its channel block only, into a
// per-thread buffer [rows][packed_width][CB] (CB = 64 bytes of accumulators: 16 floats or 8
// doubles). A channel block's window is then contiguous, whatever C is, which keeps
// the kernel's loads in L1/L2 instead of striding by C (that stride maps every pixel
// of an NHWC row to the same few cache sets when C is a power of two).
struct FwdPlan {
  int64_t cb;           // channels per block
  int64_t nb;           // channel blocks
  int64_t gb;           // channel blocks per work item (1, or nb: see fwd_plan)
  int64_t ngroups;      // channel-block groups: ceil(nb / gb)
  int64_t rt;           // output rows per tile
  int64_t ntiles;       // tiles per image
  int64_t block_elems;  // accumulator elements of one block's packed tile
  int64_t buf_elems;    // accumulator elements of one per-thread buffer (gb tiles)
};

// Channels per packed block: two vectors of the selected CPU path (the kernels' CB = 2 L;
// 64 bytes with AVX2 and on the baseline, 128 with AVX-512).
inline int64_t channel_block(int64_t acc_bytes) { return 2 * cpu::vector_bytes() / acc_bytes; }
// Width of a packed tile row: the input columns -pl .. (ow-1)*sw - pl + (kw-1)*dw, the
// padding stored as zeros so every output pixel runs the full, unchecked tap loop.
inline int64_t packed_width(const Geom& g) { return (g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1; }
inline int64_t padded_channels(int64_t c, int64_t acc_bytes) {
  const int64_t cb = channel_block(acc_bytes);
  return (c + cb - 1) / cb * cb;
}

// Small kernels skip the packed tiles: the direct path (cpu_kernels.cpp) reads the NHWC
// rows in place, all channel blocks of a few output pixels at a time, and needs no
// buffer (fwd_plan's sizes are then unused but harmless). Measured on 2 cores (issue 2
// notes): faster than packing for up to ~15 taps (3x3, 3x5, bands up to 1x11 / 11x1,
// stride 2) when C is a whole number of vectors; slower for 5x5 and up, for
// long bands (1x31) and for channel tails (C = 12: masked loads dominate). With AVX-512
// (32 registers, 16-float vectors) the direct path also wins up to 25 taps (session 17,
// N=8, forward: 5x5 4-17 % faster, 1x17 12 %, 21x1 9 %, 1x21 / 3x7 / 13x1 equal).
constexpr int64_t kDirectMaxTaps = 49;  // the largest limit of any path (array bound)
inline int64_t direct_max_taps() { return cpu::vector_bytes() >= 64 ? 25 : 15; }
// Square 3x3, 5x5 and 7x7 kernels at stride 1 and dilation 1, AVX-512 only: the direct path
// computes their rows in groups of 2-3 output rows that share the input rows they read
// (cpu_kernels.cpp, direct_row_group), which takes 7x7 onto the direct path too. Measured
// (session 25, Zen 5, C=128, 56x56, forward, one process, the two paths alternating): N=1
// 3x3 0.052 -> 0.036 ms, 5x5 0.086 -> 0.068, 7x7 0.145 (packed) -> 0.139; N=8 3x3 0.36 ->
// 0.21-0.35, 7x7 1.77 (packed) -> 1.02-1.33, depending on the memory traffic of the
// machine's other tenants. The group's accumulators and weights need 32 vector registers.
inline bool use_row_groups(const Geom& g) {
  return cpu::vector_bytes() >= 64 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 &&
         g.kh == g.kw && (g.kh == 3 || g.kh == 5 || g.kh == 7);
}
inline bool use_direct(const Geom& g, int64_t acc_bytes) {
  return (g.kh * g.kw <= direct_max_taps() || use_row_groups(g)) &&
         g.c % (cpu::vector_bytes() / acc_bytes) == 0;
}

// k x 1 kernels of any height (stride 1 and dilation 1 down the column, no horizontal
// padding or stride, C a whole number of vectors) run in bands of whole output rows
// (cpu_kernels.cpp, row_band_rows): each output row is a per-channel weighted sum of k
// contiguous input rows. They take precedence over the direct and packed paths.
inline bool use_row_band(const Geom& g, int64_t acc_bytes) {
  return g.kw == 1 && g.kh > 1 && g.sh == 1 && g.dh == 1 && g.sw == 1 && g.pl == 0 &&
         g.c % (cpu::vector_bytes() / acc_bytes) == 0;
}

// The weight gradient reads x and grad_y in place, in row order (cpu_kernels.cpp, wg_rows),
// for k x 1 bands (use_row_band) and for kernels up to 5x5 at stride 1 and dilation 1 (C a
// whole number of vectors); other shapes pack tiles of rows. (N=8, C=128, 56x56, two
// threads: 3x3 2.54 -> 0.99 ms, 5x5 3.00 -> 2.40; 7x7 ran 5.8 ms in row order against 3.7
// packed: its blocks of 3 kernel rows re-read every input vector three times.)
inline bool use_row_wgrad(const Geom& g, int64_t acc_bytes) {
  if (use_row_band(g, acc_bytes)) return true;
  return g.kw >= 2 && g.kw <= 5 && g.kh >= 1 && g.kh <= 5 && g.sh == 1 && g.sw == 1 &&
         g.dh == 1 && g.dw == 1 && g.c % (cpu::vector_bytes() / acc_bytes) == 0;
}

// Two regimes. When a tile of input rows holding *all* channels fits the budget (small
// kernels: few rows), an item packs every channel block of its tile at once, reading
// the NHWC rows front to back; each channel block then runs from its own packed tile.
// Otherwise (large kernels) an item is one channel block of a taller tile, so the
// window of that block stays in L2 while its rows are swept.
// balance=false: the plan of a serial call (one tile inside another op's parallel loop),
// which need not split rows into more work items.
// Input rows a tile of rt output rows reads.
inline int64_t tile_rows_in(const Geom& g, int64_t rt) {
  return std::min(g.h, (rt - 1) * g.sh + (g.kh - 1) * g.dh + 1);
}
// The most output rows whose input rows fit budget_rows packed rows (at least 1).
inline int64_t tile_rows_for(const Geom& g, int64_t budget_rows) {
  if (g.h <= budget_rows) return g.oh;
  const int64_t ext = (g.kh - 1) * g.dh + 1;
  return std::max<int64_t>(1, std::min<int64_t>(g.oh, (budget_rows - ext) / g.sh + 1));
}
// Output rows of a tile holding one channel block's window (the gb = 1 regime below).
inline int64_t block_tile_rows(const Geom& g, int64_t acc_bytes) {
  constexpr int64_t kBlockBudget = 192 * 1024;
  const int64_t block_row_bytes = packed_width(g) * channel_block(acc_bytes) * acc_bytes;
  return tile_rows_for(g, std::max<int64_t>(1, kBlockBudget / block_row_bytes));
}

inline FwdPlan fwd_plan(const Geom& g, int64_t acc_bytes, bool balance = true) {
  constexpr int64_t kGroupBudget = 256 * 1024;
  FwdPlan p;
  p.cb = channel_block(acc_bytes);
  p.nb = (g.c + p.cb - 1) / p.cb;
  const int64_t ext = (g.kh - 1) * g.dh + 1;
  const int64_t block_row_bytes = packed_width(g) * p.cb * acc_bytes;
  const int64_t group_rows = kGroupBudget / (block_row_bytes * p.nb);
  int64_t rt;
  if (p.nb > 1 && group_rows >= std::min(g.h, ext + g.sh)) {
    p.gb = p.nb;
    rt = tile_rows_for(g, group_rows);
  } else {
    p.gb = 1;
    rt = block_tile_rows(g, acc_bytes);
  }
  p.ngroups = (p.nb + p.gb - 1) / p.gb;
  // Keep enough work items to balance threads.
  while (balance && rt > 1 && g.n * p.ngroups * ((g.oh + rt - 1) / rt) < 16) rt = (rt + 1) / 2;
  p.rt = rt;
  p.ntiles = (g.oh + rt - 1) / rt;
  p.block_elems = tile_rows_in(g, rt) * packed_width(g) * p.cb;
  p.buf_elems = p.gb * p.block_elems;
  return p;
}

// The weight gradient: work items are (chunk of output rows, channel block); each
// chunk writes its own partial sums, reduced afterwards in a fixed order. The split
// is a function of the shape only, so results do not depend on the thread count.
// Chunks are small enough (~2 MB of input and grad_y) to stay in the last-level cache
// while every channel block of the chunk runs, one after the other. Within a chunk,
// tiles of `rt` output rows (block_tile_rows: one channel block's window) are packed per
// channel block like the forward pass: input rows into a buffer of x_elems and grad_y
// rows into one of gy_elems.
struct WgradPlan {
  int64_t row_chunks;     // number of partial sums per weight element
  int64_t partial_elems;  // kh*kw*cp + cp accumulators (weights then bias) per chunk
  int64_t rt;             // output rows per packed tile
  int64_t x_elems;        // per-thread input tile buffer
  int64_t gy_elems;       // per-thread grad_y tile buffer
};
WgradPlan wgrad_plan(const Geom& g, int64_t acc_bytes);

#define FV_DWCONV_KERNEL_DECLS                                                                 \
  /* y = correlate(x, wpk) + bias; bias (cp elements) may be null. bufs: nbufs per-thread */  \
  /* buffers of fwd_plan(g).buf_elems accumulators each (nbufs >= get_num_threads()). */      \
  void forward(DType dt, const Geom& g, const void* x, const void* wpk, const void* bias,      \
               void* y, void* bufs, int nbufs);                                                \
  /* As forward, serially in the calling thread (for the fused blocks, from inside their */  \
  /* own parallel loop), writing accumulators (A) to y; buf: fwd_plan(g, sizeof(A), */          \
  /* false).buf_elems accumulators. */                                                         \
  void forward_tile_acc(DType dt, const Geom& g, const void* x, const void* wpk,               \
                        const void* bias, void* y, void* buf);                                 \
  /* As forward, serially in the calling thread: output rows [oh0, oh1) of image n, all */ \
  /* channels, tiled with fwd_plan(g, sizeof(A), false); buf: that plan's buf_elems. */      \
  void forward_rows(DType dt, const Geom& g, const void* x, const void* wpk,                 \
                    const void* bias, void* y, void* buf, int64_t n, int64_t oh0,             \
                    int64_t oh1);                                                             \
  /* Transposed correlation (any stride): gx from gy and the packed, unflipped weight. */      \
  /* g describes the forward problem (x of g.h x g.w, gy of g.oh x g.ow). */                  \
  void backward_input_gather(DType dt, const Geom& g, const void* gy, const void* wpk,         \
                             void* gx);                                                        \
  /* partial: plan.row_chunks * plan.partial_elems accumulators of type A; bufs: nbufs */    \
  /* per-thread buffers of plan.x_elems + plan.gy_elems accumulators. */                       \
  void backward_weight_partials(DType dt, const Geom& g, const WgradPlan& plan,                \
                                const void* gy, const void* x, void* partial, void* bufs,      \
                                int nbufs);

namespace generic {
FV_DWCONV_KERNEL_DECLS
}
namespace avx2 {
FV_DWCONV_KERNEL_DECLS
}
namespace avx512 {
FV_DWCONV_KERNEL_DECLS
}

}  // namespace dwconv
}  // namespace fastvis
