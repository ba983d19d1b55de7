// fastvis: index and tile arithmetic of the CUDA fused ConvNeXt block.
//
// Everything the kernels in cuda/convnext_block.cu compute about *where* things
// are lives here as plain functions on plain structs: which pixels a CTA owns (a
// th x tw rectangle of one image, at most kM = 64 pixels, the rows of every GEMM),
// the depthwise halo it stages, how threads map to (pixel, channel), the
// shared-memory layout of every kernel (offsets, sizes, padding against bank
// conflicts), the K/N chunks in which the weights are streamed through shared
// memory, the register fragments of the tensor-core MMA (m16n8k16, the layout of
// CuTe's SM80_16x8x16_F32{F16,BF16}..._TN atoms), the grids, the scratch layout
// and the deterministic reduction split of the weight gradients.
//
// The functions are __host__ __device__ under nvcc and ordinary inline functions
// under a host compiler, so tests/cpp/test_block_tile_math.cpp runs exactly this
// code over every tile of many odd shapes (and cross-checks the fragment maps
// against CuTe's own MMA_Traits layouts when the CUTLASS headers are available).
// No CUDA-only type appears here. The planners (plan_*) are host-only.
//
// Conventions
//   C, Hd      channels and hidden units; Cp = C rounded up to 32, Hp = Hd rounded
//              up to 64 (packed weights and workspaces are zero-padded to these).
//   pixel      global pixel index (n*H + y)*W + x of an NHWC activation.
//   slot       0 <= p < kM, a row of a tile's GEMMs: (ly, lx) = (p / tw, p % tw);
//              a slot is valid when p < th*tw and the pixel lies inside the image.
//   16-bit     "T" is the 16-bit activation type (float16 or bfloat16); operand
//              buffers are counted in T elements, fp32 buffers in floats.
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
namespace cnblock {
namespace tiles {

// ------------------------------------------------------------------ constants
constexpr int kThreads = 256;  // threads per CTA of every tile kernel
constexpr int kWarps = kThreads / 32;
constexpr int kM = 64;         // pixel slots per tile = rows of the pixel GEMMs
constexpr int kNh = 64;        // hidden units per chunk (fc1 N, fc2 K)
constexpr int kNc = 128;       // output columns per chunk (fc2 / dt2 N, weight-grad N)
constexpr int kWarpsM = 2;     // warp grid of every GEMM tile: 2 (M) x 4 (N)
constexpr int kWarpsN = 4;
constexpr int kWarpRows = 32;               // rows of a warp tile
constexpr int kMI = kWarpRows / 16;         // m16 tiles per warp
constexpr int kNIh = kNh / kWarpsN / 8;     // n8 tiles per warp, 64-wide chunks (2)
constexpr int kNIc = kNc / kWarpsN / 8;     // n8 tiles per warp, 128-wide chunks (4)
constexpr int kPad = 8;        // 16-bit elements of padding per operand row (16 bytes)
constexpr int kCAlign = 32;    // Cp = round_up(C, 32)
constexpr int kHAlign = kNh;   // Hp = round_up(Hd, 64)
constexpr int kMaxCd = 32;     // channels per depthwise staging chunk
constexpr int kMaxDwPix = 8;   // depthwise accumulators per thread (kM * kMaxCd / kThreads)
constexpr int kMaxK = 31;      // largest depthwise kernel of the op
constexpr int kMaxResidentCp = 256;  // resident-t2 ("fused") forward up to this Cp
// Dynamic shared memory a CTA may use: what every sm_80 / sm_86 / sm_89 / sm_90 part
// grants with opt-in (the same cap as the depthwise family), so plans do not depend on
// the device.
constexpr size_t kSmemBudget = 99 * 1024;
constexpr size_t kSmemAlign = 16;    // every shared-memory region starts 16-byte aligned
constexpr size_t kScratchAlign = 256;
// Weight-gradient partial sums (runs x 2 x Hp x Cp floats) are capped at this.
constexpr int64_t kPartialCap = int64_t(256) << 20;
// CTAs the weight-gradient grid (runs x hidden slabs) aims for.
constexpr int64_t kTargetCtas = 256;

// ------------------------------------------------------------------ integers
FV_HOST_DEVICE inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
FV_HOST_DEVICE inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
FV_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FV_HOST_DEVICE inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
FV_HOST_DEVICE inline size_t align_up(size_t a, size_t b) { return (a + b - 1) / b * b; }

struct Span {
  int64_t begin, end;
  FV_HOST_DEVICE int64_t size() const { return end > begin ? end - begin : 0; }
};

FV_HOST_DEVICE inline int64_t padded_c(int64_t c) { return round_up(c, kCAlign); }
FV_HOST_DEVICE inline int64_t padded_h(int64_t h) { return round_up(h, kHAlign); }

// ------------------------------------------------------------------ pixel tiles
// A tile is a th x tw rectangle of one image (th*tw <= kM). Tiles are numbered image
// by image, row-major inside the image: tile = (n * tiles_h + ty) * tiles_w + tx.
struct TileGeom {
  int th, tw;
  int tiles_h, tiles_w;
  int64_t per_image;  // tiles_h * tiles_w
  int64_t ntiles;     // n * per_image
};

// Fewest tiles per image first (GEMM rows used), then the smallest depthwise halo,
// then the widest tile (longer contiguous NHWC rows).
inline TileGeom plan_tiles(int64_t n, int64_t h, int64_t w, int64_t k) {
  TileGeom best{1, 1, 1, 1, 0, 0};
  int64_t best_tiles = -1, best_halo = 0;
  const int64_t tw_max = imin(imax(w, 1), kM);
  for (int64_t tw = 1; tw <= tw_max; ++tw) {
    const int64_t th = imin(imax(h, 1), kM / tw);
    const int64_t tiles = ceil_div(imax(h, 1), th) * ceil_div(imax(w, 1), tw);
    const int64_t halo = (th + k - 1) * (tw + k - 1);
    if (best_tiles < 0 || tiles < best_tiles || (tiles == best_tiles && halo < best_halo) ||
        (tiles == best_tiles && halo == best_halo && tw > best.tw)) {
      best.th = int(th);
      best.tw = int(tw);
      best_tiles = tiles;
      best_halo = halo;
    }
  }
  best.tiles_h = int(ceil_div(imax(h, 1), best.th));
  best.tiles_w = int(ceil_div(imax(w, 1), best.tw));
  best.per_image = int64_t(best.tiles_h) * best.tiles_w;
  best.ntiles = (h > 0 && w > 0) ? n * best.per_image : 0;
  return best;
}

struct TileOrigin {
  int64_t n;
  int y0, x0;
};
FV_HOST_DEVICE inline TileOrigin tile_origin(const TileGeom& g, int64_t tile) {
  TileOrigin o;
  o.n = tile / g.per_image;
  const int r = int(tile - o.n * g.per_image);
  o.y0 = (r / g.tiles_w) * g.th;
  o.x0 = (r % g.tiles_w) * g.tw;
  return o;
}

struct Slot {
  bool valid;
  int ly, lx;  // position in the tile
  int y, x;    // position in the image (meaningful when valid)
};
FV_HOST_DEVICE inline Slot tile_slot(const TileGeom& g, const TileOrigin& o, int h, int w, int p) {
  Slot s;
  const bool in_tile = p >= 0 && p < g.th * g.tw;
  s.ly = in_tile ? p / g.tw : 0;
  s.lx = in_tile ? p % g.tw : 0;
  s.y = o.y0 + s.ly;
  s.x = o.x0 + s.lx;
  s.valid = in_tile && s.y < h && s.x < w;
  return s;
}
FV_HOST_DEVICE inline int64_t pixel_index(int64_t n, int64_t y, int64_t x, int64_t h, int64_t w) {
  return (n * h + y) * w + x;
}

// ------------------------------------------------------------------ depthwise halo
// The input window of a tile: (th + k - 1) x (tw + k - 1) pixels starting at
// (y0 - k/2, x0 - k/2), staged for a chunk of cd channels as fp32 [row][col][cd]
// (zero outside the image), followed by the chunk's weights [tap][cd] and bias [cd].
struct HaloGeom {
  int rows, cols, cd;
  int px_floats, w_floats;  // rows*cols*cd, k*k*cd
  size_t bytes;             // halo + weights + bias, each region 16-byte aligned
};
FV_HOST_DEVICE inline HaloGeom halo_geom(const TileGeom& g, int k, int cd) {
  HaloGeom hg;
  hg.rows = g.th + k - 1;
  hg.cols = g.tw + k - 1;
  hg.cd = cd;
  hg.px_floats = hg.rows * hg.cols * cd;
  hg.w_floats = k * k * cd;
  hg.bytes = align_up(size_t(hg.px_floats) * 4, kSmemAlign) +
             align_up(size_t(hg.w_floats) * 4, kSmemAlign) + align_up(size_t(cd) * 4, kSmemAlign);
  return hg;
}
// Float offsets of the weight and bias parts inside the staging region.
FV_HOST_DEVICE inline int halo_w_offset(const HaloGeom& hg) {
  return int(align_up(size_t(hg.px_floats) * 4, kSmemAlign) / 4);
}
FV_HOST_DEVICE inline int halo_b_offset(const HaloGeom& hg) {
  return halo_w_offset(hg) + int(align_up(size_t(hg.w_floats) * 4, kSmemAlign) / 4);
}
struct HaloCoord {
  int r, q, c;
};
// Element e of the staged window (consecutive threads: consecutive channels).
FV_HOST_DEVICE inline HaloCoord halo_coord(const HaloGeom& hg, int e) {
  HaloCoord h;
  h.c = e % hg.cd;
  const int pix = e / hg.cd;
  h.r = pix / hg.cols;
  h.q = pix % hg.cols;
  return h;
}
FV_HOST_DEVICE inline int halo_index(const HaloGeom& hg, int r, int q, int c) {
  return (r * hg.cols + q) * hg.cd + c;
}
// Image coordinates of window element (r, q) of the tile at origin o (may be outside).
FV_HOST_DEVICE inline int halo_y(const TileOrigin& o, int k, int r) { return o.y0 - k / 2 + r; }
FV_HOST_DEVICE inline int halo_x(const TileOrigin& o, int k, int q) { return o.x0 - k / 2 + q; }

// Depthwise thread mapping: thread t owns channel c = t % cd of the chunk and the slots
// g, g + step, ... (g = t / cd, step = kThreads / cd), at most kMaxDwPix of them.
struct DwThread {
  int c, g, step, npix;
};
FV_HOST_DEVICE inline DwThread dw_thread(int t, int cd) {
  DwThread d;
  d.c = t % cd;
  d.g = t / cd;
  d.step = kThreads / cd;
  d.npix = d.g < kM ? int(ceil_div(kM - d.g, d.step)) : 0;
  return d;
}
FV_HOST_DEVICE inline int dw_slot(const DwThread& d, int i) { return d.g + i * d.step; }

// ------------------------------------------------------------------ MMA fragments
// mma.sync.m16n8k16 (row.col), per lane: g = lane / 4, t = lane % 4.
//   A (16 x 16, K contiguous pairs): register q holds A[g + 8*(q&1)][2t + 8*(q>>1) + {0,1}]
//   B (16 x 8 as N x K):            register q holds B[n = g][k = 2t + 8q + {0,1}]
//   C (16 x 8):                      element e is C[g + 8*(e>>1)][2t + (e&1)]
// (CuTe: MMA_Traits<SM80_16x8x16_F32F16F16F32_TN>::ALayout / BLayout / CLayout.)
struct FragAB {
  int r, k;  // row (m for A, n for B) and the first k of the register's pair
};
FV_HOST_DEVICE inline FragAB frag_a(int lane, int q) {
  return FragAB{lane / 4 + 8 * (q & 1), 2 * (lane % 4) + 8 * (q >> 1)};
}
FV_HOST_DEVICE inline FragAB frag_b(int lane, int q) { return FragAB{lane / 4, 2 * (lane % 4) + 8 * q}; }
struct FragC {
  int r, c;
};
FV_HOST_DEVICE inline FragC frag_c(int lane, int e) {
  return FragC{lane / 4 + 8 * (e >> 1), 2 * (lane % 4) + (e & 1)};
}
// Shared-memory operand element (row, k) of a K-major buffer (row stride ld) and of an
// MN-major one (stored [k][row], stride ld).
FV_HOST_DEVICE inline int kmajor_off(int row, int k, int ld) { return row * ld + k; }
FV_HOST_DEVICE inline int mnmajor_off(int row, int k, int ld) { return k * ld + row; }

// A warp's place in a GEMM tile: rows [m0, m0 + 32), columns [n0, n0 + width/4).
struct WarpTile {
  int m0, n0;
};
FV_HOST_DEVICE inline WarpTile warp_tile(int warp, int width) {
  return WarpTile{(warp % kWarpsM) * kWarpRows, (warp / kWarpsM) * (width / kWarpsN)};
}
// Accumulator element (i, j, e) of a warp tile with NI n8-tiles.
FV_HOST_DEVICE inline FragC acc_coord(const WarpTile& wt, int lane, int i, int j, int e) {
  const FragC f = frag_c(lane, e);
  return FragC{wt.m0 + 16 * i + f.r, wt.n0 + 8 * j + f.c};
}

// ------------------------------------------------------------------ chunks
// K chunks over the padded channels [0, cp) of width kc (a multiple of 32; the last
// chunk may be narrower, still a multiple of 32).
FV_HOST_DEVICE inline int num_chunks(int64_t total, int64_t width) { return int(ceil_div(total, width)); }
FV_HOST_DEVICE inline Span chunk_span(int idx, int64_t width, int64_t total) {
  return Span{idx * width, imin(total, (idx + 1) * width)};
}

// 16-byte vectors (8 16-bit elements) of a rows x width operand chunk: vector v is
// row v / (width/8), elements [8*(v % (width/8)), +8). width is a multiple of 8.
struct VecCoord {
  int row, col;
};
FV_HOST_DEVICE inline VecCoord vec_coord(int v, int width) {
  const int per = width / 8;
  return VecCoord{v / per, (v % per) * 8};
}
// Scalar elements of a rows x width chunk: element e is (e / width, e % width).
FV_HOST_DEVICE inline VecCoord elem_coord(int e, int width) { return VecCoord{e / width, e % width}; }

// ------------------------------------------------------------------ shared memory
// Operand row strides (16-bit elements): width + kPad. With width a multiple of 16 the
// stride is 4 (mod 8) 32-bit words, so the 8 rows x 4 words of a fragment load fall in
// 32 different banks.
FV_HOST_DEVICE inline int op_ld(int width) { return width + kPad; }
FV_HOST_DEVICE inline size_t op_bytes(int rows, int width) {
  return align_up(size_t(rows) * size_t(op_ld(width)) * 2, kSmemAlign);
}
// The resident tile of the fused forward: fp32 rows of stride cp + 4 floats (dwconv
// output), turned in place into 16-bit rows of stride 2*(cp + 4) elements (LayerNorm
// output, fc1's A operand); 2*(cp+4) elements = cp + 4 words = 4 (mod 32) words.
FV_HOST_DEVICE inline int resident_ldf(int cp) { return cp + 4; }

// Kernel layouts: byte offsets of each region in the dynamic shared memory. Regions
// marked "union" overlay the staging area of the depthwise prologue, which is dead by
// the time the GEMMs start.
struct FwdSmem {
  bool resident;   // t2 lives in shared memory (fused); else streamed from global
  size_t t;        // resident: kM x resident_ldf(cp) floats
  size_t u;        // start of the union (prologue staging | GEMM buffers)
  size_t a;        // streamed: A chunk kM x op_ld(kc)
  size_t b1;       // W1 chunk kNh x op_ld(kc)
  size_t b2;       // W2 chunk kNc x op_ld(kNh)
  size_t hbuf;     // hidden activations kM x op_ld(kNh)
  size_t red;      // column-sum scratch 2 x 3 x kNh floats
  size_t gemm_end, stage_end, total;
};
struct BwdSmem {
  size_t u;        // union start (bwd_dx: prologue staging | GEMM buffers)
  size_t a, ady;   // A (t2) and dy*ds*gamma chunks, kM x op_ld(kc)
  size_t b1, b2;   // W1 and W2^T chunks, kNh x op_ld(kc)
  size_t da;       // dL/da, kM x op_ld(kNh)
  size_t zs;       // ds * z (bwd_dw), kM x op_ld(kNh)
  size_t bt;       // bwd_dx: W1^T chunk kNc x op_ld(kNh); bwd_dw: t2/dy chunk kM x op_ld(kNc)
  size_t red;      // 2 x 3 x kNh floats
  size_t db1;      // bwd_dw: kNh floats (the CTA's bias-gradient sums)
  size_t gemm_end, stage_end, total;
};

inline FwdSmem fwd_smem(int cp, int kc, bool resident, const HaloGeom& hg) {
  FwdSmem s{};
  s.resident = resident;
  size_t off = 0;
  s.t = off;
  if (resident) off += align_up(size_t(kM) * size_t(resident_ldf(cp)) * 4, kSmemAlign);
  s.u = off;
  s.a = off;
  if (!resident) off += op_bytes(kM, kc);
  s.b1 = off;
  off += op_bytes(kNh, kc);
  s.b2 = off;
  off += op_bytes(kNc, kNh);
  s.hbuf = off;
  off += op_bytes(kM, kNh);
  s.red = off;
  off += align_up(size_t(2 * 3 * kNh) * 4, kSmemAlign);
  s.gemm_end = off;
  s.stage_end = s.u + hg.bytes;
  s.total = s.gemm_end > s.stage_end ? s.gemm_end : s.stage_end;
  return s;
}

// dx = true: the data-gradient kernel (with the depthwise prologue); false: the
// weight-gradient kernel.
inline BwdSmem bwd_smem(int kc, bool dx, const HaloGeom& hg) {
  BwdSmem s{};
  size_t off = 0;
  s.u = off;
  s.a = off;
  off += op_bytes(kM, kc);
  s.ady = off;
  off += op_bytes(kM, kc);
  s.b1 = off;
  off += op_bytes(kNh, kc);
  s.b2 = off;
  off += op_bytes(kNh, kc);
  s.da = off;
  off += op_bytes(kM, kNh);
  s.zs = off;
  if (!dx) off += op_bytes(kM, kNh);
  s.bt = off;
  off += dx ? op_bytes(kNc, kNh) : op_bytes(kM, kNc);
  s.red = off;
  off += align_up(size_t(2 * 3 * kNh) * 4, kSmemAlign);
  s.db1 = off;
  if (!dx) off += align_up(size_t(kNh) * 4, kSmemAlign);
  s.gemm_end = off;
  s.stage_end = dx ? s.u + hg.bytes : 0;
  s.total = s.gemm_end > s.stage_end ? s.gemm_end : s.stage_end;
  return s;
}

// ------------------------------------------------------------------ column sums
// Column sums of a 64-row GEMM tile held in MMA accumulators, in a fixed order: each
// thread adds its 4 rows of a column (i = 0,1; e>>1 = 0,1), lanes with the same
// lane % 4 are combined by xor-shuffles over lane bits 2..4, and the lanes with g = 0
// write red[wm][col]; the two warp rows are then added as red[0][col] + red[1][col].
FV_HOST_DEVICE inline int red_index(int which, int wm, int col) { return (which * 2 + wm) * kNh + col; }

// ------------------------------------------------------------------ weight-gradient grid
// CTAs (run r, hidden slab s), s fastest; run r owns tiles [r*T/R, (r+1)*T/R).
struct DwBlock {
  int r, s;
};
FV_HOST_DEVICE inline DwBlock dw_block(int64_t b, int slabs) {
  return DwBlock{int(b / slabs), int(b % slabs)};
}
FV_HOST_DEVICE inline Span run_span(int r, int runs, int64_t ntiles) {
  return Span{r * ntiles / runs, (r + 1) * ntiles / runs};
}

// Partial-sum layouts (fp32 workspaces).
//   weight partials:   [run][Hp][Cp]   (dW1[j][c], and G^T[j][c] = sum dy[c] * ds * z[j])
//   bias partials:     [run][Hp]
//   per-tile partials: [tile][Cp] (LayerNorm weight/bias, sum dy*ds) and [tile][Hp] (GRN)
FV_HOST_DEVICE inline int64_t wpart_index(int64_t r, int64_t j, int64_t c, int64_t hp, int64_t cp) {
  return (r * hp + j) * cp + c;
}
FV_HOST_DEVICE inline int64_t tpart_index(int64_t tile, int64_t c, int64_t width) {
  return tile * width + c;
}

// ------------------------------------------------------------------ plans (host)
struct Shape {
  int64_t n, c, h, w, k, hidden;
};

struct Plan {
  // shape
  int n, c, h, w, k, hidden;
  int cp, hp;
  int64_t pixels;  // n*h*w
  TileGeom tg;
  // forward
  bool resident;   // fused (t2 in shared memory) or streamed (t2 through global memory)
  int kc_fwd;      // fc1 K chunk
  HaloGeom halo_fwd;
  FwdSmem fwd;
  // backward
  int kc_bwd;
  HaloGeom halo_bwd;
  BwdSmem bwd_dx, bwd_dw;
  int n_cc, n_hc;  // column chunks (of kNc), hidden chunks (of kNh)
  int runs;        // weight-gradient runs
  int64_t dw_ctas; // runs * n_hc
};

// The largest depthwise chunk (power of two <= kMaxCd) whose staging fits `room` bytes.
inline int pick_cd(const TileGeom& tg, int k, size_t room) {
  for (int cd = kMaxCd; cd >= 1; cd /= 2)
    if (halo_geom(tg, k, cd).bytes <= room) return cd;
  return 0;
}

// K-chunk candidates: all of Cp when Cp <= 256, then 128, 64, 32 (multiples of 32).
inline int kc_candidate(int i, int cp) {
  const int cands[4] = {cp <= 256 ? cp : 256, 128, 64, 32};
  const int v = cands[i];
  return v > cp ? cp : v;
}

// Plans every kernel of a call from the shape alone (not from the device), so the
// tiling and the reduction order, hence the results, are the same on every GPU.
// ok = false when no layout fits (cannot happen for the op's limits; checked anyway).
inline Plan make_plan(const Shape& s, bool* ok) {
  Plan p{};
  *ok = true;
  p.n = int(s.n);
  p.c = int(s.c);
  p.h = int(s.h);
  p.w = int(s.w);
  p.k = int(s.k);
  p.hidden = int(s.hidden);
  p.cp = int(padded_c(s.c));
  p.hp = int(padded_h(s.hidden));
  p.pixels = s.n * s.h * s.w;
  p.tg = plan_tiles(s.n, s.h, s.w, s.k);
  p.n_cc = num_chunks(p.cp, kNc);
  p.n_hc = num_chunks(p.hp, kNh);

  // Forward: fused when the resident tile and the GEMM buffers fit; else streamed.
  p.resident = false;
  p.kc_fwd = 0;
  for (int pass = 0; pass < 2 && p.kc_fwd == 0; ++pass) {
    const bool res = pass == 0;
    if (res && p.cp > kMaxResidentCp) continue;
    for (int i = 0; i < 4; ++i) {
      const int kc = kc_candidate(i, p.cp);
      const FwdSmem probe = fwd_smem(p.cp, kc, res, halo_geom(p.tg, p.k, 1));
      if (probe.gemm_end > kSmemBudget || probe.u + halo_geom(p.tg, p.k, 1).bytes > kSmemBudget)
        continue;
      const int cd = pick_cd(p.tg, p.k, kSmemBudget - probe.u);
      if (cd == 0) continue;
      p.resident = res;
      p.kc_fwd = kc;
      p.halo_fwd = halo_geom(p.tg, p.k, cd);
      p.fwd = fwd_smem(p.cp, kc, res, p.halo_fwd);
      break;
    }
  }
  if (p.kc_fwd == 0) *ok = false;

  // Backward: the data-gradient kernel stages the depthwise prologue in the union.
  p.kc_bwd = 0;
  for (int i = 0; i < 4; ++i) {
    const int kc = kc_candidate(i, p.cp);
    if (kc > 128) continue;  // four K-chunk operands: keep them small
    const HaloGeom h1 = halo_geom(p.tg, p.k, 1);
    const BwdSmem dx = bwd_smem(kc, true, h1), dw = bwd_smem(kc, false, h1);
    if (dx.gemm_end > kSmemBudget || dw.total > kSmemBudget) continue;
    const int cd = pick_cd(p.tg, p.k, kSmemBudget);
    if (cd == 0) continue;
    p.kc_bwd = kc;
    p.halo_bwd = halo_geom(p.tg, p.k, cd);
    p.bwd_dx = bwd_smem(kc, true, p.halo_bwd);
    p.bwd_dw = bwd_smem(kc, false, p.halo_bwd);
    break;
  }
  if (p.kc_bwd == 0) *ok = false;

  // Weight-gradient runs: enough CTAs (runs x slabs) to fill a GPU, partials capped.
  const int64_t want = imax(1, ceil_div(kTargetCtas, p.n_hc));
  const int64_t cap = imax(1, kPartialCap / (int64_t(2) * p.hp * p.cp * 4));
  p.runs = int(imax(1, imin(imin(want, cap), imax(p.tg.ntiles, 1))));
  p.dw_ctas = int64_t(p.runs) * p.n_hc;
  return p;
}

// ------------------------------------------------------------------ scratch (host)
// The caller's scratch, carved in this order (each region 256-byte aligned). Sizes
// depend on the plan only (the depthwise weight-gradient scratch is added by the
// caller, it depends on the device).
struct ScratchCarve {
  size_t used = 0;
  size_t take(size_t bytes) {
    const size_t off = used;
    used += align_up(bytes, kScratchAlign);
    return off;
  }
};

struct Packed {  // parameters, packed by the pack kernel
  size_t w1p;    // [Hp][Cp] T   fc1 weight (fc1 and dz^T... B operands, K = C)
  size_t w2p;    // [Cp][Hp] T   fc2 weight (forward fc2 B operand, K = Hd)
  size_t w2t;    // [Hp][Cp] T   fc2 weight transposed (backward dz B operand, K = C)
  size_t w1t;    // [Cp][Hp] T   fc1 weight transposed (backward dt2 B operand, K = Hd)
  size_t dww;    // [k*k][Cp] f32 depthwise weight, tap-major
  size_t dwb, nw, nb, b2, gam;  // [Cp] f32 (zero padded)
  size_t b1, gw, gb;            // [Hp] f32
  size_t ds;                    // [max(N,1)] f32
};
inline Packed carve_packed(ScratchCarve& sc, const Plan& p, bool forward) {
  Packed k{};
  const size_t mat = size_t(p.hp) * size_t(p.cp) * 2;
  k.w1p = sc.take(mat);
  if (forward) {
    k.w2p = sc.take(mat);
  } else {
    k.w2t = sc.take(mat);
    k.w1t = sc.take(mat);
  }
  k.dww = sc.take(size_t(p.k) * p.k * p.cp * 4);
  k.dwb = sc.take(size_t(p.cp) * 4);
  k.nw = sc.take(size_t(p.cp) * 4);
  k.nb = sc.take(size_t(p.cp) * 4);
  k.b2 = sc.take(size_t(p.cp) * 4);
  k.gam = sc.take(size_t(p.cp) * 4);
  k.b1 = sc.take(size_t(p.hp) * 4);
  k.gw = sc.take(size_t(p.hp) * 4);
  k.gb = sc.take(size_t(p.hp) * 4);
  k.ds = sc.take(size_t(p.n > 0 ? p.n : 1) * 4);
  return k;
}

struct GrnScratch {  // GRN statistics (only with grn_weight)
  size_t psq, pt, pdb;  // [ntiles][Hp] f32 per-tile sums of g^2, dz*g, dz
  size_t norm;          // [N][Hp] f32 G (the per-image L2 norms)
  size_t den;           // [N] f32 mean_j G + eps
  size_t f, u;          // [N][Hp] f32 GRN factors (see cpu_kernels.h)
  size_t dgw, dgb;      // [N][Hp] f32 per-image GRN parameter-gradient contributions
};
inline GrnScratch carve_grn(ScratchCarve& sc, const Plan& p, bool forward) {
  GrnScratch g{};
  const size_t tile_bytes = size_t(p.tg.ntiles) * p.hp * 4, img = size_t(p.n) * p.hp * 4;
  g.psq = sc.take(tile_bytes);
  g.norm = sc.take(img);
  g.den = sc.take(size_t(p.n) * 4);
  g.f = sc.take(img);
  if (!forward) {
    g.pt = sc.take(tile_bytes);
    g.pdb = sc.take(tile_bytes);
    g.u = sc.take(img);
    g.dgw = sc.take(img);
    g.dgb = sc.take(img);
  }
  return g;
}

struct FwdScratch {
  Packed pk;
  GrnScratch grn;
  bool has_grn;
  size_t t12;  // streamed mode: [pixels][Cp] f32 (dwconv output, then 16-bit t2 in place)
  size_t ows;  // more than one column chunk: [pixels][Cp] f32 fc2 accumulators
  size_t total;
};
inline FwdScratch carve_forward(const Plan& p, bool grn) {
  ScratchCarve sc;
  FwdScratch f{};
  f.pk = carve_packed(sc, p, true);
  f.has_grn = grn;
  if (grn) f.grn = carve_grn(sc, p, true);
  f.t12 = p.resident ? 0 : sc.take(size_t(p.pixels) * p.cp * 4);
  f.ows = p.n_cc > 1 ? sc.take(size_t(p.pixels) * p.cp * 4) : 0;
  f.total = sc.used;
  return f;
}

struct BwdScratch {
  Packed pk;
  GrnScratch grn;
  bool has_grn;
  size_t xh;    // [pixels][Cp] f32 normalised dwconv output (xhat), zero beyond C
  size_t rstd;  // [pixels] f32
  size_t dt2;   // [pixels][Cp] f32 dL/d(LayerNorm output)
  size_t d;     // [pixels][C] T dL/d(dwconv output), NHWC (the depthwise backward's input)
  size_t pnw, pnb, ps;  // [ntiles][Cp] f32 per-tile sums: dt2*xhat, dt2, dy*ds
  size_t pw1, pg;       // [runs][Hp][Cp] f32 weight partials
  size_t pb1;           // [runs][Hp] f32
  size_t gdw_tmp;       // [C*k*k] f32 depthwise weight gradient when only its bias is wanted
  size_t dw_scratch;    // the depthwise weight-gradient scratch (size given by the caller)
  size_t total;
};
inline BwdScratch carve_backward(const Plan& p, bool grn, size_t dw_scratch_bytes) {
  ScratchCarve sc;
  BwdScratch b{};
  b.pk = carve_packed(sc, p, false);
  b.has_grn = grn;
  if (grn) b.grn = carve_grn(sc, p, false);
  const size_t px = size_t(p.pixels);
  b.xh = sc.take(px * p.cp * 4);
  b.rstd = sc.take(px * 4);
  b.dt2 = sc.take(px * p.cp * 4);
  b.d = sc.take(px * p.c * 2);
  const size_t tp = size_t(p.tg.ntiles) * p.cp * 4;
  b.pnw = sc.take(tp);
  b.pnb = sc.take(tp);
  b.ps = sc.take(tp);
  const size_t wp = size_t(p.runs) * p.hp * p.cp * 4;
  b.pw1 = sc.take(wp);
  b.pg = sc.take(wp);
  b.pb1 = sc.take(size_t(p.runs) * p.hp * 4);
  b.gdw_tmp = sc.take(size_t(p.c) * p.k * p.k * 4);
  b.dw_scratch = sc.take(dw_scratch_bytes > 0 ? dw_scratch_bytes : 1);
  b.total = sc.used;
  return b;
}

}  // namespace tiles
}  // namespace cnblock
}  // namespace fastvis
