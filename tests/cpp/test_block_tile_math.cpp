// Host test of the CUDA fused ConvNeXt block's index math
// (csrc/ops/convnext_block/block_tile_math.h) -- no GPU needed.
//
// Part 1 replays every index formula over many odd shapes (C not a multiple of 8,
// images smaller than the kernel, partial tiles, k up to 31, hidden not a multiple of
// 64, C above the resident limit) and checks coverage: every pixel in exactly one tile
// slot, every halo read in the staged window and in bounds, every output written
// exactly once, every shared-memory access inside its region and the regions inside
// the budget, the K/N chunks covering the padded dimensions exactly, the MMA fragments
// covering their tiles exactly (and matching CuTe's MMA_Traits layouts when built with
// -DFV_TEST_WITH_CUTE), fragment loads free of bank conflicts, the grids and the
// partial-sum layouts bijective, the scratch regions disjoint.
//
// Part 2 emulates the kernels of cuda/convnext_block.cu on the host, block by block and
// thread by thread (warp-level MMAs reassembled from the per-lane fragments), with the
// same tile_math calls and loop structure, every shared-memory read checked for bounds
// and for having been staged, and compares forward output, D = dL/d(dwconv output) and
// every parameter gradient with a float64 reference of the block -- in float (the
// 16-bit rounding of the tensor-core operands is not modelled; that needs a GPU).
//
// Build: c++ -std=c++17 -O1 -I csrc tests/cpp/test_block_tile_math.cpp
// Output ends with "N passed, M failed"; exit status is nonzero on failure.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "ops/convnext_block/block_tile_math.h"
#include "convnext_block_ref.h"

#if defined(FV_TEST_WITH_CUTE)
#include <cute/atom/mma_traits_sm80.hpp>
#endif

namespace tl = fastvis::cnblock::tiles;
using tl::kM;
using tl::kNc;
using tl::kNh;
using tl::kThreads;

// ------------------------------------------------------------------ reporting
static int g_passed = 0, g_failed = 0, g_messages = 0;
static bool g_case_ok = true;
static std::string g_case;
static bool g_quick = false;

static void begin_case(const std::string& name) {
  g_case = name;
  g_case_ok = true;
}
static void end_case() {
  if (g_case_ok)
    ++g_passed;
  else
    ++g_failed;
}
static void failf(const char* fmt, ...) {
  g_case_ok = false;
  if (g_messages >= 60) return;
  ++g_messages;
  std::fprintf(stderr, "FAIL [%s]: ", g_case.c_str());
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
}
#define CHECK(cond, ...)  \
  do {                    \
    if (!(cond)) {        \
      failf(__VA_ARGS__); \
      return false;       \
    }                     \
  } while (0)


// ================================================================== part 1: structure

static bool check_tiles(const tl::Shape& s, const tl::TileGeom& tg) {
  CHECK(tg.th >= 1 && tg.tw >= 1 && tg.th * tg.tw <= kM, "tile %dx%d", tg.th, tg.tw);
  CHECK(tg.ntiles == s.n * tg.per_image, "ntiles");
  std::vector<int> seen(size_t(s.n * s.h * s.w), 0);
  for (int64_t t = 0; t < tg.ntiles; ++t) {
    const tl::TileOrigin o = tl::tile_origin(tg, t);
    CHECK(o.n >= 0 && o.n < s.n && o.y0 >= 0 && o.y0 < s.h && o.x0 >= 0 && o.x0 < s.w,
          "tile %lld origin (%lld,%d,%d)", (long long)t, (long long)o.n, o.y0, o.x0);
    int nvalid = 0;
    for (int p = 0; p < kM; ++p) {
      const tl::Slot sl = tl::tile_slot(tg, o, int(s.h), int(s.w), p);
      if (!sl.valid) continue;
      ++nvalid;
      CHECK(sl.y >= 0 && sl.y < s.h && sl.x >= 0 && sl.x < s.w, "slot out of image");
      CHECK(sl.ly * tg.tw + sl.lx == p, "slot position");
      ++seen[size_t(tl::pixel_index(o.n, sl.y, sl.x, s.h, s.w))];
    }
    CHECK(nvalid >= 1, "tile %lld has no valid slot", (long long)t);
  }
  for (size_t i = 0; i < seen.size(); ++i) CHECK(seen[i] == 1, "pixel %zu covered %d times", i, seen[i]);
  return true;
}

static bool check_chunks(int64_t total, int64_t width) {
  const int n = tl::num_chunks(total, width);
  int64_t next = 0;
  for (int i = 0; i < n; ++i) {
    const tl::Span sp = tl::chunk_span(i, width, total);
    CHECK(sp.begin == next && sp.size() > 0 && sp.size() <= width, "chunk %d of %lld/%lld", i,
          (long long)total, (long long)width);
    next = sp.end;
  }
  CHECK(next == total, "chunks cover %lld of %lld", (long long)next, (long long)total);
  return true;
}

struct Region {
  size_t off, bytes;
  const char* name;
};
static bool disjoint(const std::vector<Region>& rs, const char* what) {
  for (size_t i = 0; i < rs.size(); ++i) {
    CHECK(rs[i].off % tl::kSmemAlign == 0, "%s: region %s misaligned", what, rs[i].name);
    for (size_t j = i + 1; j < rs.size(); ++j) {
      const bool sep = rs[i].off + rs[i].bytes <= rs[j].off || rs[j].off + rs[j].bytes <= rs[i].off;
      CHECK(sep || rs[i].bytes == 0 || rs[j].bytes == 0, "%s: regions %s and %s overlap", what, rs[i].name,
            rs[j].name);
    }
  }
  return true;
}

static bool check_smem(const tl::Plan& p) {
  CHECK(p.kc_fwd % 32 == 0 && p.kc_fwd >= 32 && p.kc_fwd <= p.cp, "kc_fwd %d", p.kc_fwd);
  CHECK(p.kc_bwd % 32 == 0 && p.kc_bwd >= 32 && p.kc_bwd <= p.cp, "kc_bwd %d", p.kc_bwd);
  CHECK(p.fwd.total <= tl::kSmemBudget && p.bwd_dx.total <= tl::kSmemBudget &&
            p.bwd_dw.total <= tl::kSmemBudget,
        "shared memory over budget: %zu %zu %zu", p.fwd.total, p.bwd_dx.total, p.bwd_dw.total);
  CHECK(!p.resident || p.cp <= tl::kMaxResidentCp, "resident with cp %d", p.cp);
  const tl::FwdSmem& f = p.fwd;
  std::vector<Region> gemm = {{f.t, f.resident ? size_t(kM) * tl::resident_ldf(p.cp) * 4 : 0, "t"},
                              {f.a, f.resident ? 0 : tl::op_bytes(kM, p.kc_fwd), "a"},
                              {f.b1, tl::op_bytes(kNh, p.kc_fwd), "b1"},
                              {f.b2, tl::op_bytes(kNc, kNh), "b2"},
                              {f.hbuf, tl::op_bytes(kM, kNh), "h"},
                              {f.red, size_t(2 * 3 * kNh) * 4, "red"}};
  if (!disjoint(gemm, "forward")) return false;
  for (const Region& r : gemm) CHECK(r.off + r.bytes <= f.gemm_end, "forward: %s past gemm_end", r.name);
  // The depthwise staging overlays the GEMM buffers but never the resident tile.
  CHECK(f.u >= f.t + (f.resident ? size_t(kM) * tl::resident_ldf(p.cp) * 4 : 0), "staging overlaps t");
  CHECK(f.u + p.halo_fwd.bytes <= f.total, "forward staging past total");
  for (int which = 0; which < 2; ++which) {
    const tl::BwdSmem& b = which ? p.bwd_dw : p.bwd_dx;
    std::vector<Region> rs = {{b.a, tl::op_bytes(kM, p.kc_bwd), "a"},
                              {b.ady, tl::op_bytes(kM, p.kc_bwd), "ady"},
                              {b.b1, tl::op_bytes(kNh, p.kc_bwd), "b1"},
                              {b.b2, tl::op_bytes(kNh, p.kc_bwd), "b2"},
                              {b.da, tl::op_bytes(kM, kNh), "da"},
                              {b.zs, which ? tl::op_bytes(kM, kNh) : 0, "zs"},
                              {b.bt, which ? tl::op_bytes(kM, kNc) : tl::op_bytes(kNc, kNh), "bt"},
                              {b.red, size_t(2 * 3 * kNh) * 4, "red"},
                              {b.db1, which ? size_t(kNh) * 4 : 0, "db1"}};
    if (!disjoint(rs, which ? "backward_dw" : "backward_dx")) return false;
    for (const Region& r : rs) CHECK(r.off + r.bytes <= b.total, "backward: %s past total", r.name);
    if (!which) CHECK(b.u + p.halo_bwd.bytes <= b.total, "backward staging past total");
  }
  // Halo staging regions of both prologues.
  for (const tl::HaloGeom* hg : {&p.halo_fwd, &p.halo_bwd}) {
    CHECK(hg->cd >= 1 && hg->cd <= tl::kMaxCd && (tl::kMaxCd % hg->cd) == 0, "cd %d", hg->cd);
    CHECK(p.cp % hg->cd == 0, "cd does not divide cp");
    CHECK(size_t(tl::halo_b_offset(*hg) + hg->cd) * 4 <= hg->bytes, "halo regions");
    CHECK(size_t(tl::halo_w_offset(*hg)) >= size_t(hg->px_floats), "halo weights overlap window");
    CHECK(size_t(tl::halo_b_offset(*hg)) >= size_t(tl::halo_w_offset(*hg) + hg->w_floats), "halo bias overlap");
  }
  return true;
}

// Operand strides: fragment loads of K-major operands are free of bank conflicts.
static bool check_banks(int ld, int mrows, bool kmajor, const char* what) {
  for (int q = 0; q < 4; ++q) {
    for (int m0 = 0; m0 + 16 <= mrows; m0 += 16) {
      int bank_word[32];
      for (int b = 0; b < 32; ++b) bank_word[b] = -1;
      for (int lane = 0; lane < 32; ++lane) {
        const tl::FragAB f = tl::frag_a(lane, q);
        const int off = kmajor ? tl::kmajor_off(m0 + f.r, f.k, ld) : tl::mnmajor_off(m0 + f.r, f.k, ld);
        const int word = off / 2, bank = word % 32;
        CHECK(bank_word[bank] < 0 || bank_word[bank] == word, "%s: bank conflict (ld %d, q %d)", what, ld, q);
        bank_word[bank] = word;
      }
    }
  }
  return true;
}

static bool check_fragments() {
  // A: 16 x 16, B: 8 x 16 (n, k), C: 16 x 8 -- each element exactly once.
  int a[16][16] = {}, b[8][16] = {}, c[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int q = 0; q < 4; ++q)
      for (int h = 0; h < 2; ++h) {
        const tl::FragAB f = tl::frag_a(lane, q);
        CHECK(f.r >= 0 && f.r < 16 && f.k + h < 16 && f.k % 2 == 0, "frag_a range");
        ++a[f.r][f.k + h];
      }
    for (int q = 0; q < 2; ++q)
      for (int h = 0; h < 2; ++h) {
        const tl::FragAB f = tl::frag_b(lane, q);
        CHECK(f.r >= 0 && f.r < 8 && f.k + h < 16 && f.k % 2 == 0, "frag_b range");
        ++b[f.r][f.k + h];
      }
    for (int e = 0; e < 4; ++e) {
      const tl::FragC f = tl::frag_c(lane, e);
      CHECK(f.r >= 0 && f.r < 16 && f.c >= 0 && f.c < 8, "frag_c range");
      ++c[f.r][f.c];
      if (e % 2 == 1) CHECK(f.c == tl::frag_c(lane, e - 1).c + 1, "C pairs must be adjacent columns");
    }
  }
  // The PTX ISA's table for mma.m16n8k16 with .f16/.bf16 operands ("Matrix Fragments for
  // mma.m16n8k16"), transcribed independently of tile_math: groupID = lane >> 2,
  // threadID_in_group = lane % 4;
  //   A: a_i, i = 0..7: row = groupID + 8 for i in {2,3,6,7}, else groupID;
  //                     col = tig*2 + (i & 1) + 8 for i >= 4
  //   B: b_i, i = 0..3: row (k) = tig*2 + (i & 1) + 8 for i >= 2; col (n) = groupID
  //   C: c_i, i = 0..3: row = groupID + 8 for i >= 2; col = tig*2 + (i & 1)
  // Register q of tile_math holds elements 2q and 2q+1.
  for (int lane = 0; lane < 32; ++lane) {
    const int gid = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = gid + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      const tl::FragAB f = tl::frag_a(lane, i / 2);
      CHECK(f.r == row && f.k + (i & 1) == col, "PTX A: lane %d a%d is (%d,%d), ours (%d,%d)", lane, i, row, col,
            f.r, f.k + (i & 1));
    }
    for (int i = 0; i < 4; ++i) {
      const int k = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      const tl::FragAB f = tl::frag_b(lane, i / 2);
      CHECK(f.r == gid && f.k + (i & 1) == k, "PTX B: lane %d b%d", lane, i);
      const tl::FragC c = tl::frag_c(lane, i);
      CHECK(c.r == gid + (i >= 2 ? 8 : 0) && c.c == tig * 2 + (i & 1), "PTX C: lane %d c%d", lane, i);
    }
  }
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) CHECK(a[i][k] == 1, "A(%d,%d) covered %d times", i, k, a[i][k]);
  for (int n = 0; n < 8; ++n)
    for (int k = 0; k < 16; ++k) CHECK(b[n][k] == 1, "B(%d,%d) covered %d times", n, k, b[n][k]);
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 8; ++n) CHECK(c[i][n] == 1, "C(%d,%d) covered %d times", i, n, c[i][n]);
#if defined(FV_TEST_WITH_CUTE)
  // The same maps from CuTe's traits of the atoms the kernels use: (thread, value) ->
  // column-major coordinate in (M, K), (N, K), (M, N).
  auto cross = [&](auto traits) -> bool {
    using Tr = decltype(traits);
    const auto al = typename Tr::ALayout{};
    const auto bl = typename Tr::BLayout{};
    const auto cl = typename Tr::CLayout{};
    for (int lane = 0; lane < 32; ++lane) {
      for (int v = 0; v < 8; ++v) {
        const int o = int(al(lane, v)), m = o % 16, k = o / 16;
        const tl::FragAB f = tl::frag_a(lane, v / 2);
        CHECK(f.r == m && f.k + v % 2 == k, "CuTe A: lane %d value %d is (%d,%d), ours (%d,%d)", lane, v, m, k,
              f.r, f.k + v % 2);
      }
      for (int v = 0; v < 4; ++v) {
        const int o = int(bl(lane, v)), n = o % 8, k = o / 8;
        const tl::FragAB f = tl::frag_b(lane, v / 2);
        CHECK(f.r == n && f.k + v % 2 == k, "CuTe B: lane %d value %d", lane, v);
        const int oc = int(cl(lane, v)), cm = oc % 16, cn = oc / 16;
        const tl::FragC fc = tl::frag_c(lane, v);
        CHECK(fc.r == cm && fc.c == cn, "CuTe C: lane %d value %d", lane, v);
      }
    }
    return true;
  };
  if (!cross(cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN>{})) return false;
  if (!cross(cute::MMA_Traits<cute::SM80_16x8x16_F32BF16BF16F32_TN>{})) return false;
#endif
  // Warp tiles: the 8 warps cover a 64 x width chunk exactly once.
  for (int width : {kNh, kNc}) {
    const int NI = width / tl::kWarpsN / 8;
    std::vector<int> cov(size_t(kM * width), 0);
    for (int w = 0; w < tl::kWarps; ++w) {
      const tl::WarpTile wt = tl::warp_tile(w, width);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < tl::kMI; ++i)
          for (int j = 0; j < NI; ++j)
            for (int e = 0; e < 4; ++e) {
              const tl::FragC f = tl::acc_coord(wt, lane, i, j, e);
              CHECK(f.r >= 0 && f.r < kM && f.c >= 0 && f.c < width, "acc_coord range");
              ++cov[size_t(f.r * width + f.c)];
            }
    }
    for (int v : cov) CHECK(v == 1, "warp tiles of width %d overlap or leave holes", width);
  }
  // Bank conflicts of the shipped operand strides.
  for (int width : {32, 64, 96, 128, 160, 192, 224, 256})
    if (!check_banks(tl::op_ld(width), kM, true, "op_ld")) return false;
  for (int cp = 32; cp <= tl::kMaxResidentCp; cp += 32)
    if (!check_banks(2 * tl::resident_ldf(cp), kM, true, "resident")) return false;
  return true;
}

// The column-sum reduction (col_sums_h): thread sums, xor-shuffles over lane bits 2..4,
// writers lane < 4 per warp row, then red[0] + red[1].
static bool check_col_sums() {
  const tl::WarpTile dummy{0, 0};
  (void)dummy;
  double red[2][kNh];
  int writes[2][kNh] = {};
  for (int w = 0; w < tl::kWarps; ++w) {
    const tl::WarpTile wt = tl::warp_tile(w, kNh);
    double lane_val[32][tl::kNIh][2];
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < tl::kNIh; ++j)
        for (int c = 0; c < 2; ++c) {
          double s = 0;
          for (int i = 0; i < tl::kMI; ++i)
            for (int r = 0; r < 2; ++r) {
              const tl::FragC f = tl::acc_coord(wt, lane, i, j, 2 * r + c);
              s += f.r * 1000.0 + f.c;  // value of element (row, col)
            }
          lane_val[lane][j][c] = s;
        }
    for (int lane = 0; lane < 4; ++lane)
      for (int j = 0; j < tl::kNIh; ++j)
        for (int c = 0; c < 2; ++c) {
          double s = 0;
          for (int g = 0; g < 8; ++g) s += lane_val[lane + 4 * g][j][c];  // the shuffles' group
          const tl::FragC f = tl::acc_coord(wt, lane, 0, j, c);
          const int wm = w % tl::kWarpsM;
          CHECK(tl::red_index(0, wm, f.c) == wm * kNh + f.c, "red_index");
          red[wm][f.c] = s;
          ++writes[wm][f.c];
        }
  }
  for (int col = 0; col < kNh; ++col) {
    CHECK(writes[0][col] == 1 && writes[1][col] == 1, "column %d written %d/%d times", col, writes[0][col],
          writes[1][col]);
    double want = 0;
    for (int r = 0; r < kM; ++r) want += r * 1000.0 + col;
    CHECK(red[0][col] + red[1][col] == want, "column %d sum %g, want %g", col, red[0][col] + red[1][col], want);
  }
  return true;
}

// The depthwise thread mapping covers every (slot, chunk channel) exactly once.
static bool check_dw_threads() {
  for (int cd = 1; cd <= tl::kMaxCd; cd *= 2) {
    std::vector<int> cov(size_t(kM * cd), 0);
    for (int t = 0; t < kThreads; ++t) {
      const tl::DwThread d = tl::dw_thread(t, cd);
      CHECK(d.npix <= tl::kMaxDwPix && d.npix >= 0, "cd %d: npix %d", cd, d.npix);
      for (int i = 0; i < d.npix; ++i) {
        const int sl = tl::dw_slot(d, i);
        CHECK(sl >= 0 && sl < kM, "cd %d: slot %d", cd, sl);
        ++cov[size_t(sl * cd + d.c)];
      }
    }
    for (int v : cov) CHECK(v == 1, "cd %d: depthwise mapping not a bijection", cd);
  }
  return true;
}

// In-place LayerNorm output (16-bit element c at byte 2c of the fp32 row): for every
// 32-column step all lanes read their float, then write; a write may only hit floats
// already read and must never hit a float read later.
static bool check_inplace_rows(int cp) {
  std::vector<int> read_step(size_t(cp), -1);
  std::vector<bool> overwritten(size_t(cp), false);
  int step = 0;
  for (int c0 = 0; c0 < cp; c0 += 32, ++step) {
    for (int lane = 0; lane < 32; ++lane) {
      const int c = c0 + lane;
      CHECK(!overwritten[size_t(c)], "cp %d: float %d read after being overwritten", cp, c);
      read_step[size_t(c)] = step;
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int c = c0 + lane;
      const int f = (2 * c) / 4;  // the float holding 16-bit element c
      CHECK(read_step[size_t(f)] >= 0 && read_step[size_t(f)] <= step, "cp %d: element %d overwrites unread float",
            cp, c);
      overwritten[size_t(f)] = true;
    }
  }
  // Rows of the resident tile: the 16-bit row p lies inside the fp32 row p.
  const int ldf = tl::resident_ldf(cp);
  for (int p = 0; p < kM; ++p) {
    const size_t b16 = size_t(p) * 2 * ldf * 2, e16 = b16 + size_t(cp) * 2;
    const size_t b32 = size_t(p) * ldf * 4, e32 = b32 + size_t(cp) * 4;
    CHECK(b16 >= b32 && e16 <= e32, "resident row %d: 16-bit row outside its fp32 row", p);
  }
  return true;
}

static bool check_grid_and_partials(const tl::Plan& p) {
  CHECK(p.runs >= 1 && (p.tg.ntiles == 0 || p.runs <= p.tg.ntiles), "runs %d for %lld tiles", p.runs,
        (long long)p.tg.ntiles);
  CHECK(int64_t(p.runs) * 2 * p.hp * p.cp * 4 <= tl::kPartialCap || p.runs == 1, "partials over the cap");
  int64_t next = 0;
  for (int r = 0; r < p.runs; ++r) {
    const tl::Span sp = tl::run_span(r, p.runs, p.tg.ntiles);
    CHECK(sp.begin == next && (p.tg.ntiles == 0 || sp.size() >= 1), "run %d", r);
    next = sp.end;
  }
  CHECK(next == p.tg.ntiles, "runs cover %lld of %lld tiles", (long long)next, (long long)p.tg.ntiles);
  std::vector<int> seen(size_t(p.dw_ctas), 0);
  for (int64_t b = 0; b < p.dw_ctas; ++b) {
    const tl::DwBlock blk = tl::dw_block(b, p.n_hc);
    CHECK(blk.r >= 0 && blk.r < p.runs && blk.s >= 0 && blk.s < p.n_hc, "dw block %lld", (long long)b);
    ++seen[size_t(blk.r * p.n_hc + blk.s)];
  }
  for (int v : seen) CHECK(v == 1, "dw grid not a bijection");
  // Each CTA (r, s) owns rows [s*64, s*64+64) of run r's partials, all Cp columns.
  const int64_t size = int64_t(p.runs) * p.hp * p.cp;
  CHECK(tl::wpart_index(p.runs - 1, p.hp - 1, p.cp - 1, p.hp, p.cp) == size - 1, "wpart last");
  CHECK(tl::wpart_index(0, 0, 0, p.hp, p.cp) == 0, "wpart first");
  CHECK(check_chunks(p.hp, kNh) && check_chunks(p.cp, kNc) && check_chunks(p.cp, p.kc_fwd) &&
            check_chunks(p.cp, p.kc_bwd),
        "chunks");
  for (int i = 0; i < tl::num_chunks(p.cp, p.kc_fwd); ++i) CHECK(tl::chunk_span(i, p.kc_fwd, p.cp).size() % 32 == 0, "kc chunk width");
  for (int i = 0; i < tl::num_chunks(p.cp, p.kc_bwd); ++i) CHECK(tl::chunk_span(i, p.kc_bwd, p.cp).size() % 32 == 0, "kc chunk width");
  // Column chunks: warps entirely inside or entirely beyond Cp.
  for (int cc = 0; cc < p.n_cc; ++cc)
    for (int w = 0; w < tl::kWarps; ++w) {
      const tl::WarpTile wt = tl::warp_tile(w, kNc);
      const int c0 = cc * kNc + wt.n0;
      CHECK(c0 >= p.cp || c0 + kNc / tl::kWarpsN <= p.cp, "warp straddles Cp");
    }
  return true;
}

static bool check_scratch(const tl::Plan& p) {
  for (int grn = 0; grn < 2; ++grn) {
    const tl::FwdScratch f = tl::carve_forward(p, grn != 0);
    std::vector<std::pair<size_t, size_t>> rs;
    const size_t mat = size_t(p.hp) * p.cp * 2;
    rs.push_back({f.pk.w1p, mat});
    rs.push_back({f.pk.w2p, mat});
    rs.push_back({f.pk.dww, size_t(p.k) * p.k * p.cp * 4});
    for (size_t o : {f.pk.dwb, f.pk.nw, f.pk.nb, f.pk.b2, f.pk.gam}) rs.push_back({o, size_t(p.cp) * 4});
    for (size_t o : {f.pk.b1, f.pk.gw, f.pk.gb}) rs.push_back({o, size_t(p.hp) * 4});
    rs.push_back({f.pk.ds, size_t(std::max(p.n, 1)) * 4});
    if (!p.resident) rs.push_back({f.t12, size_t(p.pixels) * p.cp * 4});
    if (p.n_cc > 1) rs.push_back({f.ows, size_t(p.pixels) * p.cp * 4});
    if (grn) {
      rs.push_back({f.grn.psq, size_t(p.tg.ntiles) * p.hp * 4});
      rs.push_back({f.grn.norm, size_t(p.n) * p.hp * 4});
      rs.push_back({f.grn.f, size_t(p.n) * p.hp * 4});
      rs.push_back({f.grn.den, size_t(p.n) * 4});
    }
    for (size_t i = 0; i < rs.size(); ++i) {
      CHECK(rs[i].first % tl::kScratchAlign == 0, "forward scratch region %zu misaligned", i);
      CHECK(rs[i].first + rs[i].second <= f.total, "forward scratch region %zu past total", i);
      for (size_t j = i + 1; j < rs.size(); ++j)
        CHECK(rs[i].first + rs[i].second <= rs[j].first || rs[j].first + rs[j].second <= rs[i].first,
              "forward scratch regions %zu and %zu overlap", i, j);
    }
    const tl::BwdScratch b = tl::carve_backward(p, grn != 0, 1000);
    std::vector<std::pair<size_t, size_t>> bs;
    bs.push_back({b.pk.w1p, mat});
    bs.push_back({b.pk.w2t, mat});
    bs.push_back({b.pk.w1t, mat});
    bs.push_back({b.pk.dww, size_t(p.k) * p.k * p.cp * 4});
    bs.push_back({b.xh, size_t(p.pixels) * p.cp * 4});
    bs.push_back({b.rstd, size_t(p.pixels) * 4});
    bs.push_back({b.dt2, size_t(p.pixels) * p.cp * 4});
    bs.push_back({b.d, size_t(p.pixels) * p.c * 2});
    for (size_t o : {b.pnw, b.pnb, b.ps}) bs.push_back({o, size_t(p.tg.ntiles) * p.cp * 4});
    for (size_t o : {b.pw1, b.pg}) bs.push_back({o, size_t(p.runs) * p.hp * p.cp * 4});
    bs.push_back({b.pb1, size_t(p.runs) * p.hp * 4});
    bs.push_back({b.gdw_tmp, size_t(p.c) * p.k * p.k * 4});
    bs.push_back({b.dw_scratch, 1000});
    if (grn)
      for (size_t o : {b.grn.psq, b.grn.pt, b.grn.pdb}) bs.push_back({o, size_t(p.tg.ntiles) * p.hp * 4});
    for (size_t i = 0; i < bs.size(); ++i) {
      CHECK(bs[i].first % tl::kScratchAlign == 0, "backward scratch region %zu misaligned", i);
      CHECK(bs[i].first + bs[i].second <= b.total, "backward scratch region %zu past total", i);
      for (size_t j = i + 1; j < bs.size(); ++j)
        CHECK(bs[i].first + bs[i].second <= bs[j].first || bs[j].first + bs[j].second <= bs[i].first,
              "backward scratch regions %zu and %zu overlap", i, j);
    }
  }
  return true;
}

// The depthwise prologue of every tile: staging of the window (each element once, zero
// outside the image, the right input pixel otherwise), the thread mapping's reads (in
// the window, the pixel the convolution needs), outputs (each slot x channel once).
static bool check_prologue(const tl::Plan& p, const tl::HaloGeom& hg) {
  const int k = p.k, cd = hg.cd;
  for (int64_t t = 0; t < p.tg.ntiles; ++t) {
    const tl::TileOrigin o = tl::tile_origin(p.tg, t);
    // staging: element e holds window (r, q, c)
    std::vector<int> hit(size_t(hg.px_floats), 0);
    for (int e = 0; e < hg.px_floats; ++e) {
      const tl::HaloCoord hc = tl::halo_coord(hg, e);
      CHECK(hc.r >= 0 && hc.r < hg.rows && hc.q >= 0 && hc.q < hg.cols && hc.c >= 0 && hc.c < cd, "halo coord");
      CHECK(tl::halo_index(hg, hc.r, hc.q, hc.c) == e, "halo_index inverse");
      ++hit[size_t(e)];
    }
    for (int v : hit) CHECK(v == 1, "halo staging not a bijection");
    std::vector<int> out(size_t(kM) * cd, 0);
    for (int th = 0; th < kThreads; ++th) {
      const tl::DwThread d = tl::dw_thread(th, cd);
      for (int i = 0; i < d.npix; ++i) {
        const int sl = tl::dw_slot(d, i);
        const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, sl);
        const int base = sl < p.tg.th * p.tg.tw ? tl::halo_index(hg, s.ly, s.lx, d.c) : d.c;
        for (int ti = 0; ti < k; ++ti)
          for (int tj = 0; tj < k; ++tj) {
            const int idx = base + tl::halo_index(hg, ti, tj, 0);
            CHECK(idx >= 0 && idx < hg.px_floats, "tile %lld: window read %d out of %d", (long long)t, idx,
                  hg.px_floats);
            if (s.valid) {
              const tl::HaloCoord hc = tl::halo_coord(hg, idx);
              CHECK(hc.c == d.c && tl::halo_y(o, k, hc.r) == s.y - k / 2 + ti &&
                        tl::halo_x(o, k, hc.q) == s.x - k / 2 + tj,
                    "tile %lld slot %d tap (%d,%d): reads the wrong pixel", (long long)t, sl, ti, tj);
            }
          }
        ++out[size_t(sl * cd + d.c)];
      }
    }
    for (int v : out) CHECK(v == 1, "prologue outputs not a bijection");
  }
  return true;
}

static bool structure_case(const tl::Shape& s) {
  bool ok = false;
  const tl::Plan p = tl::make_plan(s, &ok);
  CHECK(ok, "no plan");
  CHECK(p.cp == tl::round_up(s.c, 32) && p.hp == tl::round_up(s.hidden, 64), "padding");
  if (!check_tiles(s, p.tg)) return false;
  if (!check_smem(p)) return false;
  if (!check_grid_and_partials(p)) return false;
  if (!check_scratch(p)) return false;
  if (p.pixels <= 20000 && !check_prologue(p, p.halo_fwd)) return false;
  if (p.pixels <= 20000 && p.halo_bwd.cd != p.halo_fwd.cd && !check_prologue(p, p.halo_bwd)) return false;
  return true;
}

// ================================================================== part 2: emulation

// A shared-memory (or scratch) buffer of "16-bit" values held as floats, with a staged
// flag per element: reading an element never written since the last reset fails.
struct Buf {
  std::vector<float> v;
  std::vector<char> ok;
  std::string name;
  Buf() = default;
  Buf(size_t n, const char* nm) : v(n, 0.0f), ok(n, 0), name(nm) {}
  void reset() { std::fill(ok.begin(), ok.end(), 0); }
  void put(int64_t i, float x) {
    if (i < 0 || size_t(i) >= v.size()) {
      failf("%s: write %lld out of %zu", name.c_str(), (long long)i, v.size());
      return;
    }
    v[size_t(i)] = x;
    ok[size_t(i)] = 1;
  }
  float get(int64_t i) const {
    if (i < 0 || size_t(i) >= v.size()) {
      failf("%s: read %lld out of %zu", name.c_str(), (long long)i, v.size());
      return 0.0f;
    }
    if (!ok[size_t(i)]) failf("%s: read of unstaged element %lld", name.c_str(), (long long)i);
    return v[size_t(i)];
  }
};

// One warp's MMA over kdim, per lane accumulators acc[lane][i][j][e], emulated from the
// per-lane fragments exactly as warp_mma loads them.
template <int MI, int NI>
static void emu_warp_mma(float (&acc)[32][MI][NI][4], const Buf& A, int lda, bool ak, const Buf& B, int ldb,
                         bool bk, int kdim, int m0, int n0) {
  for (int ks = 0; ks < kdim; ks += 16) {
    float a[32][MI][4][2], b[32][NI][2][2];
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < MI; ++i)
        for (int q = 0; q < 4; ++q) {
          const tl::FragAB f = tl::frag_a(lane, q);
          const int r = m0 + 16 * i + f.r, k = ks + f.k;
          for (int h = 0; h < 2; ++h)
            a[lane][i][q][h] = A.get(ak ? tl::kmajor_off(r, k, lda) + h : tl::mnmajor_off(r, k + h, lda));
        }
      for (int j = 0; j < NI; ++j)
        for (int q = 0; q < 2; ++q) {
          const tl::FragAB f = tl::frag_b(lane, q);
          const int r = n0 + 8 * j + f.r, k = ks + f.k;
          for (int h = 0; h < 2; ++h)
            b[lane][j][q][h] = B.get(bk ? tl::kmajor_off(r, k, ldb) + h : tl::mnmajor_off(r, k + h, ldb));
        }
    }
    for (int i = 0; i < MI; ++i)
      for (int j = 0; j < NI; ++j) {
        float am[16][16], bm[8][16];
        for (int lane = 0; lane < 32; ++lane) {
          for (int q = 0; q < 4; ++q)
            for (int h = 0; h < 2; ++h) {
              const tl::FragAB f = tl::frag_a(lane, q);
              am[f.r][f.k + h] = a[lane][i][q][h];
            }
          for (int q = 0; q < 2; ++q)
            for (int h = 0; h < 2; ++h) {
              const tl::FragAB f = tl::frag_b(lane, q);
              bm[f.r][f.k + h] = b[lane][j][q][h];
            }
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int e = 0; e < 4; ++e) {
            const tl::FragC f = tl::frag_c(lane, e);
            float s = acc[lane][i][j][e];
            for (int kk = 0; kk < 16; ++kk) s += am[f.r][kk] * bm[f.c][kk];
            acc[lane][i][j][e] = s;
          }
      }
  }
}

// A whole-CTA 64 x width GEMM chunk: per warp accumulators, skipping warps beyond ncols.
template <int NI>
struct CtaAcc {
  float acc[tl::kWarps][32][tl::kMI][NI][4];
  void zero() { std::memset(acc, 0, sizeof acc); }
  // Visits (warp, lane, i, j, e, row, col, value&).
  template <class F>
  void each(int width, F f) {
    for (int w = 0; w < tl::kWarps; ++w) {
      const tl::WarpTile wt = tl::warp_tile(w, width);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < tl::kMI; ++i)
          for (int j = 0; j < NI; ++j)
            for (int e = 0; e < 4; ++e) {
              const tl::FragC c = tl::acc_coord(wt, lane, i, j, e);
              f(w, c.r, c.c, acc[w][lane][i][j][e]);
            }
    }
  }
};
template <int NI>
static void cta_mma(CtaAcc<NI>& ca, int width, int col0, int ncols_total, const Buf& A, int lda, bool ak,
                    const Buf& B, int ldb, bool bk, int kdim) {
  for (int w = 0; w < tl::kWarps; ++w) {
    const tl::WarpTile wt = tl::warp_tile(w, width);
    if (col0 + wt.n0 >= ncols_total) continue;  // inactive warp (beyond Cp)
    emu_warp_mma<tl::kMI, NI>(ca.acc[w], A, lda, ak, B, ldb, bk, kdim, wt.m0, wt.n0);
  }
}

// ------------------------------------------------------------------ emulated kernels
// Global buffers of the emulation (float, 16-bit values unrounded).
struct Packed {
  std::vector<float> w1p, w2p, w2t, w1t, dww, dwb, nw, nb, b1, b2, gam, gw, gb, ds;
};
static Packed pack(const Problem& P, const tl::Plan& p) {
  Packed k;
  const int C = p.c, Hd = p.hidden, cp = p.cp, hp = p.hp;
  k.w1p.assign(size_t(hp) * cp, 0.f);
  k.w2p.assign(size_t(cp) * hp, 0.f);
  k.w2t.assign(size_t(hp) * cp, 0.f);
  k.w1t.assign(size_t(cp) * hp, 0.f);
  for (int j = 0; j < Hd; ++j)
    for (int c = 0; c < C; ++c) {
      k.w1p[size_t(j) * cp + c] = float(P.w1[size_t(j * C + c)]);
      k.w1t[size_t(c) * hp + j] = float(P.w1[size_t(j * C + c)]);
      k.w2p[size_t(c) * hp + j] = float(P.w2[size_t(c * Hd + j)]);
      k.w2t[size_t(j) * cp + c] = float(P.w2[size_t(c * Hd + j)]);
    }
  k.dww.assign(size_t(p.k) * p.k * cp, 0.f);
  for (int t = 0; t < p.k * p.k; ++t)
    for (int c = 0; c < C; ++c) k.dww[size_t(t) * cp + c] = float(P.dw[size_t(c * p.k * p.k + t)]);
  auto vec = [](const std::vector<double>& src, int len, int valid, bool present, float fill) {
    std::vector<float> v(size_t(len), 0.f);
    for (int i = 0; i < valid; ++i) v[size_t(i)] = present ? float(src[size_t(i)]) : fill;
    return v;
  };
  k.dwb = vec(P.dwb, cp, C, true, 0);
  k.nw = vec(P.nw, cp, C, true, 1);
  k.nb = vec(P.nb, cp, C, true, 0);
  k.b2 = vec(P.b2, cp, C, true, 0);
  k.gam = vec(P.gam, cp, C, true, 1);
  k.b1 = vec(P.b1, hp, Hd, true, 0);
  k.gw = vec(P.gw, hp, Hd, P.grn, 0);
  k.gb = vec(P.gb, hp, Hd, P.grn, 0);
  k.ds = vec(P.ds, std::max(p.n, 1), p.n, true, 1);
  return k;
}

// dw_prologue + ln_rows: writes the tile's rows through rowf(slot) (float* or null) and
// returns the 16-bit t2 (to_t) or xhat + rstd.
static void emu_prologue(const Problem& P, const tl::Plan& p, const Packed& k, const tl::HaloGeom& hg,
                         const tl::TileOrigin& o, const std::function<float*(int)>& rowf, bool to_t,
                         const std::function<void(int, int, float)>& put_t16, std::vector<float>* rstd) {
  const int K = p.k, cd = hg.cd, C = p.c;
  std::vector<float> sx(static_cast<size_t>(hg.px_floats)), sw(static_cast<size_t>(hg.w_floats)),
      sb(static_cast<size_t>(cd));
  for (int c0 = 0; c0 < p.cp; c0 += cd) {
    for (int e = 0; e < hg.px_floats; ++e) {
      const tl::HaloCoord hc = tl::halo_coord(hg, e);
      const int yy = tl::halo_y(o, K, hc.r), xx = tl::halo_x(o, K, hc.q), ch = c0 + hc.c;
      float v = 0.f;
      if (ch < C && yy >= 0 && yy < p.h && xx >= 0 && xx < p.w)
        v = float(P.x[size_t(tl::pixel_index(o.n, yy, xx, p.h, p.w) * C + ch)]);
      sx[size_t(e)] = v;
    }
    for (int e = 0; e < hg.w_floats; ++e) sw[size_t(e)] = k.dww[size_t((e / cd) * p.cp + c0 + e % cd)];
    for (int e = 0; e < cd; ++e) sb[size_t(e)] = k.dwb[size_t(c0 + e)];
    for (int t = 0; t < kThreads; ++t) {
      const tl::DwThread d = tl::dw_thread(t, cd);
      for (int i = 0; i < d.npix; ++i) {
        const int sl = tl::dw_slot(d, i);
        const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, sl);
        const int base = sl < p.tg.th * p.tg.tw ? tl::halo_index(hg, s.ly, s.lx, d.c) : d.c;
        float acc = 0.f;
        for (int ti = 0; ti < K; ++ti)
          for (int tj = 0; tj < K; ++tj)
            acc = std::fma(sw[size_t((ti * K + tj) * cd + d.c)], sx[size_t(base + tl::halo_index(hg, ti, tj, 0))], acc);
        float* r = rowf(sl);
        if (r) r[c0 + d.c] = s.valid ? acc + sb[size_t(d.c)] : 0.f;
      }
    }
  }
  for (int sl = 0; sl < kM; ++sl) {
    const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, sl);
    if (!s.valid) continue;
    float* r = rowf(sl);
    float sum = 0;
    for (int c = 0; c < C; ++c) sum += r[c];
    const float mean = sum / float(C);
    float sq = 0;
    for (int c = 0; c < C; ++c) sq += (r[c] - mean) * (r[c] - mean);
    const float rs = 1.0f / std::sqrt(sq / float(C) + float(P.eps));
    for (int c = 0; c < p.cp; ++c) {
      const float xh = c < C ? (r[c] - mean) * rs : 0.f;
      if (to_t)
        put_t16(sl, c, c < C ? xh * k.nw[size_t(c)] + k.nb[size_t(c)] : 0.f);
      else
        r[c] = xh;
    }
    if (!to_t) (*rstd)[size_t(tl::pixel_index(o.n, s.y, s.x, p.h, p.w))] = rs;
  }
}

static void stage_packed_emu(Buf& dst, int ld_dst, const std::vector<float>& src, int64_t src_off, int64_t ld_src,
                             int nrows, int width) {
  for (int v = 0; v < nrows * (width / 8); ++v) {
    const tl::VecCoord vc = tl::vec_coord(v, width);
    for (int e = 0; e < 8; ++e) {
      const int64_t si = src_off + vc.row * ld_src + vc.col + e;
      if (si < 0 || size_t(si) >= src.size()) failf("stage_packed: source %lld out of %zu", (long long)si, src.size());
      if (size_t(si) < src.size()) dst.put(vc.row * ld_dst + vc.col + e, src[size_t(si)]);
    }
    if (((src_off + vc.row * ld_src + vc.col) % 8) != 0) failf("stage_packed: source vector misaligned");
    if (((vc.row * ld_dst + vc.col) % 8) != 0) failf("stage_packed: shared vector misaligned");
  }
}

struct FwdOut {
  std::vector<float> y;
};

// cnb_forward (+ its GRN statistics phase and cnb_grn_finish), all tiles.
static std::vector<float> emu_forward(const Problem& P, const tl::Plan& p) {
  const Packed k = pack(P, p);
  const int C = p.c, cp = p.cp, hp = p.hp, ldf = tl::resident_ldf(cp);
  std::vector<float> y(size_t(p.pixels) * C, std::nanf("")), t12, ows;
  if (!p.resident) t12.assign(size_t(p.pixels) * cp, std::nanf(""));
  if (p.n_cc > 1) ows.assign(size_t(p.pixels) * cp, std::nanf(""));
  std::vector<float> psq(size_t(p.tg.ntiles) * hp, std::nanf("")), f(size_t(p.n) * hp, 0.f);
  // T12 16-bit view: element c of pixel q at float index q*cp + c/2 ... held separately.
  std::vector<float> t12_16(size_t(p.pixels) * cp * 2, std::nanf(""));
  const int phases = P.grn ? 2 : 1;
  for (int phase = 2 - phases; phase < 2; ++phase) {
    for (int64_t tile = 0; tile < p.tg.ntiles; ++tile) {
      const tl::TileOrigin o = tl::tile_origin(p.tg, tile);
      const float ds = k.ds[size_t(o.n)];
      std::vector<float> res(size_t(kM) * ldf, std::nanf(""));
      Buf res16(size_t(kM) * 2 * ldf, "resident16");
      const bool prologue = p.resident || phase == 0 || !P.grn;
      if (p.resident) {
        emu_prologue(P, p, k, p.halo_fwd, o, [&](int sl) { return res.data() + sl * ldf; }, true,
                     [&](int sl, int c, float v) { res16.put(sl * 2 * ldf + c, v); }, nullptr);
        // rows never written as 16-bit (invalid slots) are zero fp32 rows = zero 16-bit rows
        for (int sl = 0; sl < kM; ++sl)
          if (!tl::tile_slot(p.tg, o, p.h, p.w, sl).valid)
            for (int c = 0; c < cp; ++c) {
              if (res[size_t(sl * ldf + c / 2)] != 0.f) failf("resident invalid row not zero");
              res16.put(sl * 2 * ldf + c, 0.f);
            }
      } else if (prologue) {
        emu_prologue(
            P, p, k, p.halo_fwd, o,
            [&](int sl) -> float* {
              const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, sl);
              return s.valid ? t12.data() + tl::pixel_index(o.n, s.y, s.x, p.h, p.w) * cp : nullptr;
            },
            true,
            [&](int sl, int c, float v) {
              const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, sl);
              t12_16[size_t(tl::pixel_index(o.n, s.y, s.x, p.h, p.w) * cp * 2 + c)] = v;
            },
            nullptr);
      }
      const int ldk = tl::op_ld(p.kc_fwd), ldh = tl::op_ld(kNh);
      Buf sa(size_t(kM) * ldk, "a"), sb1(size_t(kNh) * ldk, "b1"), sb2(size_t(kNc) * ldh, "b2"), sh(size_t(kM) * ldh, "h");
      const int nk = tl::num_chunks(cp, p.kc_fwd);
      static CtaAcc<tl::kNIc> acc_o;
      static CtaAcc<tl::kNIh> acc_h;
      acc_o.zero();
      for (int hc = 0; hc < p.n_hc; ++hc) {
        acc_h.zero();
        for (int ki = 0; ki < nk; ++ki) {
          const tl::Span ks = tl::chunk_span(ki, p.kc_fwd, cp);
          const int kw = int(ks.size());
          sa.reset();
          sb1.reset();
          if (!p.resident) {
            for (int v = 0; v < kM * (kw / 8); ++v) {
              const tl::VecCoord vc = tl::vec_coord(v, kw);
              const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, vc.row);
              for (int e = 0; e < 8; ++e) {
                float val = 0.f;
                if (s.valid) {
                  const int64_t q = tl::pixel_index(o.n, s.y, s.x, p.h, p.w);
                  const int64_t at = q * cp * 2 + ks.begin + vc.col + e;  // 16-bit index in the fp32 rows
                  if ((at * 2) / 4 >= (q + 1) * cp) failf("t12 16-bit read past its row");
                  val = t12_16[size_t(at)];
                }
                sa.put(vc.row * ldk + vc.col + e, val);
              }
            }
          }
          stage_packed_emu(sb1, ldk, k.w1p, int64_t(hc) * kNh * cp + ks.begin, cp, kNh, kw);
          if (p.resident) {
            // A = the resident rows, offset by the chunk's first column
            Buf view(res16.v.size() - size_t(ks.begin), "resident16+k");
            for (size_t i = 0; i < view.v.size(); ++i) {
              view.v[i] = res16.v[i + size_t(ks.begin)];
              view.ok[i] = res16.ok[i + size_t(ks.begin)];
            }
            cta_mma<tl::kNIh>(acc_h, kNh, 0, 1 << 30, view, 2 * ldf, true, sb1, ldk, true, kw);
          } else {
            cta_mma<tl::kNIh>(acc_h, kNh, 0, 1 << 30, sa, ldk, true, sb1, ldk, true, kw);
          }
        }
        acc_h.each(kNh, [&](int, int r, int c, float& v) {
          const int jg = hc * kNh + c;
          const float g = float(gelu_d(double(v + k.b1[size_t(jg)]), P.tanh_gelu));
          v = tl::tile_slot(p.tg, o, p.h, p.w, r).valid ? g : 0.f;
        });
        if (phase == 0) {
          std::vector<double> col(kNh, 0.0);
          acc_h.each(kNh, [&](int, int, int c, float& v) { col[size_t(c)] += double(v) * v; });
          for (int c = 0; c < kNh; ++c) psq[size_t(tl::tpart_index(tile, hc * kNh + c, hp))] = float(col[size_t(c)]);
          continue;
        }
        sh.reset();
        acc_h.each(kNh, [&](int, int r, int c, float& v) {
          const int jg = hc * kNh + c;
          float z = v;
          if (P.grn) z = z * f[size_t(o.n * hp + jg)] + k.gb[size_t(jg)];
          sh.put(r * ldh + c, tl::tile_slot(p.tg, o, p.h, p.w, r).valid ? z : 0.f);
        });
        const bool last = hc == p.n_hc - 1;
        for (int cc = 0; cc < p.n_cc; ++cc) {
          const int col0 = cc * kNc, rows = int(std::min<int64_t>(kNc, cp - col0));
          sb2.reset();
          stage_packed_emu(sb2, ldh, k.w2p, int64_t(col0) * hp + hc * kNh, hp, rows, kNh);
          auto orow = [&](int r) -> float* {
            const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, r);
            return s.valid ? ows.data() + tl::pixel_index(o.n, s.y, s.x, p.h, p.w) * cp : nullptr;
          };
          if (p.n_cc > 1) {
            acc_o.each(kNc, [&](int w, int r, int c, float& v) {
              if (hc == 0) {
                v = 0.f;
              } else if (col0 + tl::warp_tile(w, kNc).n0 < cp) {
                float* row = orow(r);
                v = row ? row[col0 + c] : 0.f;
                if (row && std::isnan(v)) failf("fc2 accumulators read before written");
              }
            });
          }
          cta_mma<tl::kNIc>(acc_o, kNc, col0, cp, sh, ldh, true, sb2, ldh, true, kNh);
          acc_o.each(kNc, [&](int w, int r, int c, float& v) {
            if (col0 + tl::warp_tile(w, kNc).n0 >= cp) return;
            if (last) {
              const int ch = col0 + c;
              const tl::Slot s = tl::tile_slot(p.tg, o, p.h, p.w, r);
              if (s.valid && ch < C) {
                const int64_t at = tl::pixel_index(o.n, s.y, s.x, p.h, p.w) * C + ch;
                if (!std::isnan(y[size_t(at)])) failf("y written twice");
                y[size_t(at)] = float(P.x[size_t(at)]) + ds * k.gam[size_t(ch)] * (v + k.b2[size_t(ch)]);
              }
            } else if (p.n_cc > 1) {
              float* row = orow(r);
              if (row) row[col0 + c] = v;
            }
          });
        }
      }
    }
    if (phase == 0) {  // cnb_grn_finish (forward)
      for (int n = 0; n < p.n; ++n) {
        std::vector<float> G(static_cast<size_t>(hp));
        float part = 0;
        for (int j = 0; j < hp; ++j) {
          float s = 0;
          if (j < p.hidden)
            for (int64_t t = 0; t < p.tg.per_image; ++t) s += psq[size_t((n * p.tg.per_image + t) * hp + j)];
          G[size_t(j)] = std::sqrt(s);
          part += G[size_t(j)];
        }
        const float den = part / float(p.hidden) + float(P.grn_eps);
        for (int j = 0; j < hp; ++j) f[size_t(n * hp + j)] = j < p.hidden ? 1.f + k.gw[size_t(j)] * G[size_t(j)] / den : 0.f;
      }
    }
  }
  return y;
}

struct BwdOut {
  std::vector<float> d, gw1, gw2, gb1, gb2, gnw, gnb, ggam, ggw, ggb;
};

// cnb_backward_dx (both phases), cnb_grn_finish (backward), cnb_backward_dw, cnb_reduce.
static BwdOut emu_backward(const Problem& P, const tl::Plan& p) {
  const Packed k = pack(P, p);
  const int C = p.c, cp = p.cp, hp = p.hp, Hd = p.hidden;
  const float NaN = std::nanf("");
  std::vector<float> xh(size_t(p.pixels) * cp, NaN), rstd(size_t(p.pixels), NaN), dt2(size_t(p.pixels) * cp, NaN);
  std::vector<float> d(size_t(p.pixels) * C, NaN);
  std::vector<float> pnw(size_t(p.tg.ntiles) * cp, NaN), pnb = pnw, ps = pnw;
  std::vector<float> pw1(size_t(p.runs) * hp * cp, NaN), pg = pw1, pb1(size_t(p.runs) * hp, NaN);
  std::vector<float> psq(size_t(p.tg.ntiles) * hp, NaN), pt = psq, pdb = psq;
  std::vector<float> f(size_t(p.n) * hp, 0.f), u(size_t(p.n) * hp, 0.f), dgw(size_t(p.n) * hp, 0.f), dgb = dgw;
  const int ldk = tl::op_ld(p.kc_bwd), ldh = tl::op_ld(kNh), ldc = tl::op_ld(kNc);
  Buf sa(size_t(kM) * ldk, "a"), sdy(size_t(kM) * ldk, "ady"), sb1(size_t(kNh) * ldk, "b1"), sb2(size_t(kNh) * ldk, "b2");
  Buf sda(size_t(kM) * ldh, "da"), szs(size_t(kM) * ldh, "zs"), sbt(size_t(kNc) * ldh, "bt"), sbw(size_t(kM) * ldc, "bw");
  static CtaAcc<tl::kNIh> acc_a, acc_dz;
  static CtaAcc<tl::kNIc> acc_t;
  auto slot = [&](const tl::TileOrigin& o, int r) { return tl::tile_slot(p.tg, o, p.h, p.w, r); };
  auto pix = [&](const tl::TileOrigin& o, const tl::Slot& s) { return tl::pixel_index(o.n, s.y, s.x, p.h, p.w); };
  auto stage_xh = [&](Buf& dst, int ld, const tl::TileOrigin& o, int col0, int width) {
    dst.reset();
    for (int v = 0; v < kM * (width / 8); ++v) {
      const tl::VecCoord vc = tl::vec_coord(v, width);
      const tl::Slot s = slot(o, vc.row);
      for (int e = 0; e < 8; ++e) {
        float val = 0.f;
        if (s.valid) {
          const int c = col0 + vc.col + e;
          const float xv = xh[size_t(pix(o, s) * cp + c)];
          if (std::isnan(xv)) failf("xhat read before written");
          val = xv * k.nw[size_t(c)] + k.nb[size_t(c)];
        }
        dst.put(vc.row * ld + vc.col + e, val);
      }
    }
  };
  auto stage_gy = [&](Buf& dst, int ld, const tl::TileOrigin& o, float ds, int col0, int width, bool scaled) {
    dst.reset();
    for (int e = 0; e < kM * width; ++e) {
      const tl::VecCoord vc = tl::elem_coord(e, width);
      const int c = col0 + vc.col;
      const tl::Slot s = slot(o, vc.row);
      float v = 0.f;
      if (s.valid && c < C) {
        const float raw = float(P.gy[size_t(pix(o, s) * C + c)]);
        v = scaled ? raw * ds * k.gam[size_t(c)] : raw;
      }
      dst.put(vc.row * ld + vc.col, v);
    }
  };
  auto kloop = [&](const tl::TileOrigin& o, float ds, int hc) {
    acc_a.zero();
    acc_dz.zero();
    for (int ki = 0; ki < tl::num_chunks(cp, p.kc_bwd); ++ki) {
      const tl::Span ks = tl::chunk_span(ki, p.kc_bwd, cp);
      const int kw = int(ks.size());
      stage_xh(sa, ldk, o, int(ks.begin), kw);
      stage_gy(sdy, ldk, o, ds, int(ks.begin), kw, true);
      sb1.reset();
      sb2.reset();
      stage_packed_emu(sb1, ldk, k.w1p, int64_t(hc) * kNh * cp + ks.begin, cp, kNh, kw);
      stage_packed_emu(sb2, ldk, k.w2t, int64_t(hc) * kNh * cp + ks.begin, cp, kNh, kw);
      cta_mma<tl::kNIh>(acc_a, kNh, 0, 1 << 30, sa, ldk, true, sb1, ldk, true, kw);
      cta_mma<tl::kNIh>(acc_dz, kNh, 0, 1 << 30, sdy, ldk, true, sb2, ldk, true, kw);
    }
  };
  // chunk gradients: acc_dz := da; returns z per (warp, lane, ...) through acc_a when want_z
  auto chunk_grads = [&](const tl::TileOrigin& o, int hc, bool want_z) {
    for (int w = 0; w < tl::kWarps; ++w) {
      const tl::WarpTile wt = tl::warp_tile(w, kNh);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < tl::kMI; ++i)
          for (int j = 0; j < tl::kNIh; ++j)
            for (int e = 0; e < 4; ++e) {
              const tl::FragC fc = tl::acc_coord(wt, lane, i, j, e);
              const int jg = hc * kNh + fc.c;
              float& A = acc_a.acc[w][lane][i][j][e];
              float& DZ = acc_dz.acc[w][lane][i][j][e];
              const float av = A + k.b1[size_t(jg)];
              const float g = float(gelu_d(av, P.tanh_gelu));
              float dg = DZ, z = g;
              if (P.grn) {
                const size_t at = size_t(o.n * hp + jg);
                dg = dg * f[at] + u[at] * g;
                z = g * f[at] + k.gb[size_t(jg)];
              }
              const bool valid = slot(o, fc.r).valid;
              DZ = valid ? dg * float(gelu_grad_d(av, P.tanh_gelu)) : 0.f;
              if (want_z) A = valid ? z : 0.f;
            }
    }
  };
  const int phases = P.grn ? 2 : 1;
  for (int phase = 2 - phases; phase < 2; ++phase) {
    for (int64_t tile = 0; tile < p.tg.ntiles; ++tile) {
      const tl::TileOrigin o = tl::tile_origin(p.tg, tile);
      const float ds = k.ds[size_t(o.n)];
      auto xrow = [&](int sl) -> float* {
        const tl::Slot s = slot(o, sl);
        return s.valid ? xh.data() + pix(o, s) * cp : nullptr;
      };
      if (phase == 0 || !P.grn)
        emu_prologue(P, p, k, p.halo_bwd, o, xrow, false, nullptr, &rstd);
      auto trow = [&](int r) -> float* {
        const tl::Slot s = slot(o, r);
        return s.valid ? dt2.data() + pix(o, s) * cp : nullptr;
      };
      for (int hc = 0; hc < p.n_hc; ++hc) {
        kloop(o, ds, hc);
        if (phase == 0) {
          std::vector<double> s0(kNh, 0), s1(kNh, 0), s2(kNh, 0);
          acc_a.each(kNh, [&](int w, int r, int c, float& v) {
            const bool valid = slot(o, r).valid;
            const float g = valid ? float(gelu_d(v + k.b1[size_t(hc * kNh + c)], P.tanh_gelu)) : 0.f;
            (void)w;
            v = g;
          });
          for (int w = 0; w < tl::kWarps; ++w)
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < tl::kMI; ++i)
                for (int j = 0; j < tl::kNIh; ++j)
                  for (int e = 0; e < 4; ++e) {
                    const tl::FragC fc = tl::acc_coord(tl::warp_tile(w, kNh), lane, i, j, e);
                    const float g = acc_a.acc[w][lane][i][j][e];
                    const float dz = slot(o, fc.r).valid ? acc_dz.acc[w][lane][i][j][e] : 0.f;
                    s0[size_t(fc.c)] += double(g) * g;
                    s1[size_t(fc.c)] += double(dz) * g;
                    s2[size_t(fc.c)] += dz;
                  }
          for (int c = 0; c < kNh; ++c) {
            const size_t at = size_t(tl::tpart_index(tile, hc * kNh + c, hp));
            psq[at] = float(s0[size_t(c)]);
            pt[at] = float(s1[size_t(c)]);
            pdb[at] = float(s2[size_t(c)]);
          }
          continue;
        }
        chunk_grads(o, hc, false);
        sda.reset();
        acc_dz.each(kNh, [&](int, int r, int c, float& v) { sda.put(r * ldh + c, v); });
        for (int cc = 0; cc < p.n_cc; ++cc) {
          const int col0 = cc * kNc, rows = int(std::min<int64_t>(kNc, cp - col0));
          sbt.reset();
          stage_packed_emu(sbt, ldh, k.w1t, int64_t(col0) * hp + hc * kNh, hp, rows, kNh);
          acc_t.each(kNc, [&](int w, int r, int c, float& v) {
            const bool active = col0 + tl::warp_tile(w, kNc).n0 < cp;
            if (hc == 0 || !active) {
              v = 0.f;
            } else {
              float* row = trow(r);
              v = row ? row[col0 + c] : 0.f;
              if (row && std::isnan(v)) failf("dt2 read before written");
            }
          });
          cta_mma<tl::kNIc>(acc_t, kNc, col0, cp, sda, ldh, true, sbt, ldh, true, kNh);
          acc_t.each(kNc, [&](int w, int r, int c, float& v) {
            if (col0 + tl::warp_tile(w, kNc).n0 >= cp) return;
            float* row = trow(r);
            if (row) row[col0 + c] = v;
          });
        }
      }
      if (phase == 0) continue;
      for (int sl = 0; sl < kM; ++sl) {  // LayerNorm backward
        const tl::Slot s = slot(o, sl);
        if (!s.valid) continue;
        const int64_t q = pix(o, s);
        float s1 = 0, s2 = 0;
        for (int c = 0; c < C; ++c) {
          const float v = k.nw[size_t(c)] * dt2[size_t(q * cp + c)];
          s1 += v;
          s2 += v * xh[size_t(q * cp + c)];
        }
        s1 /= float(C);
        s2 /= float(C);
        for (int c = 0; c < C; ++c)
          d[size_t(q * C + c)] =
              rstd[size_t(q)] * (k.nw[size_t(c)] * dt2[size_t(q * cp + c)] - s1 - xh[size_t(q * cp + c)] * s2);
      }
      for (int c = 0; c < cp; ++c) {
        float snw = 0, snb = 0, sdy = 0;
        for (int sl = 0; sl < kM; ++sl) {
          const tl::Slot s = slot(o, sl);
          if (!s.valid) continue;
          const int64_t q = pix(o, s);
          const float t = dt2[size_t(q * cp + c)];
          if (std::isnan(t)) failf("dt2 column %d not written", c);
          snw += t * xh[size_t(q * cp + c)];
          snb += t;
          if (c < C) sdy += float(P.gy[size_t(q * C + c)]) * ds;
        }
        const size_t at = size_t(tl::tpart_index(tile, c, cp));
        pnw[at] = snw;
        pnb[at] = snb;
        ps[at] = sdy;
      }
    }
    if (phase == 0) {  // cnb_grn_finish (backward)
      for (int n = 0; n < p.n; ++n) {
        std::vector<float> G(static_cast<size_t>(hp)), T(static_cast<size_t>(hp));
        float part = 0;
        for (int j = 0; j < hp; ++j) {
          float s = 0, t = 0, tb = 0;
          if (j < Hd)
            for (int64_t q = 0; q < p.tg.per_image; ++q) {
              const size_t at = size_t((n * p.tg.per_image + q) * hp + j);
              s += psq[at];
              t += pt[at];
              tb += pdb[at];
            }
          G[size_t(j)] = std::sqrt(s);
          T[size_t(j)] = t;
          dgb[size_t(n * hp + j)] = tb;
          part += G[size_t(j)];
        }
        const float den = part / float(Hd) + float(P.grn_eps);
        float sg = 0;
        for (int j = 0; j < hp; ++j) {
          f[size_t(n * hp + j)] = j < Hd ? 1.f + k.gw[size_t(j)] * G[size_t(j)] / den : 0.f;
          dgw[size_t(n * hp + j)] = G[size_t(j)] / den * T[size_t(j)];
          sg += k.gw[size_t(j)] * T[size_t(j)] * G[size_t(j)];
        }
        for (int j = 0; j < hp; ++j) {
          const float dG = k.gw[size_t(j)] * T[size_t(j)] / den - sg / (den * den * float(Hd));
          u[size_t(n * hp + j)] = (j < Hd && G[size_t(j)] > 0) ? dG / G[size_t(j)] : 0.f;
        }
      }
    }
  }
  // cnb_backward_dw
  static CtaAcc<tl::kNIc> acc_w;
  for (int64_t b = 0; b < p.dw_ctas; ++b) {
    const tl::DwBlock blk = tl::dw_block(b, p.n_hc);
    const tl::Span run = tl::run_span(blk.r, p.runs, p.tg.ntiles);
    const int hc = blk.s;
    std::vector<float> db1(kNh, 0.f);
    for (int64_t tile = run.begin; tile < run.end; ++tile) {
      const tl::TileOrigin o = tl::tile_origin(p.tg, tile);
      const float ds = k.ds[size_t(o.n)];
      kloop(o, ds, hc);
      chunk_grads(o, hc, true);
      sda.reset();
      szs.reset();
      std::vector<double> col(kNh, 0.0);
      for (int w = 0; w < tl::kWarps; ++w)
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < tl::kMI; ++i)
            for (int j = 0; j < tl::kNIh; ++j)
              for (int e = 0; e < 4; ++e) {
                const tl::FragC fc = tl::acc_coord(tl::warp_tile(w, kNh), lane, i, j, e);
                sda.put(fc.r * ldh + fc.c, acc_dz.acc[w][lane][i][j][e]);
                szs.put(fc.r * ldh + fc.c, ds * acc_a.acc[w][lane][i][j][e]);
                col[size_t(fc.c)] += acc_dz.acc[w][lane][i][j][e];
              }
      for (int c = 0; c < kNh; ++c) db1[size_t(c)] += float(col[size_t(c)]);
      const bool first = tile == run.begin;
      for (int cc = 0; cc < p.n_cc; ++cc) {
        const int col0 = cc * kNc, width = int(std::min<int64_t>(kNc, cp - col0));
        for (int which = 0; which < 2; ++which) {
          if (which == 0)
            stage_xh(sbw, ldc, o, col0, width);
          else
            stage_gy(sbw, ldc, o, ds, col0, width, false);
          acc_w.zero();
          cta_mma<tl::kNIc>(acc_w, kNc, col0, cp, which == 0 ? sda : szs, ldh, false, sbw, ldc, false, kM);
          std::vector<float>& part = which == 0 ? pw1 : pg;
          acc_w.each(kNc, [&](int w, int r, int c, float& v) {
            if (col0 + tl::warp_tile(w, kNc).n0 >= cp) return;
            const size_t at = size_t(tl::wpart_index(blk.r, int64_t(hc) * kNh + r, col0 + c, hp, cp));
            if (!first && std::isnan(part[at])) failf("weight partial read before written");
            part[at] = first ? v : part[at] + v;
          });
        }
      }
    }
    for (int c = 0; c < kNh; ++c) pb1[size_t(int64_t(blk.r) * hp + hc * kNh + c)] = db1[size_t(c)];
  }
  // cnb_reduce
  BwdOut out;
  out.d = d;
  out.gw1.assign(size_t(Hd) * C, 0.f);
  out.gw2.assign(size_t(C) * Hd, 0.f);
  out.gb1.assign(size_t(Hd), 0.f);
  out.gb2.assign(size_t(C), 0.f);
  out.gnw.assign(size_t(C), 0.f);
  out.gnb.assign(size_t(C), 0.f);
  out.ggam.assign(size_t(C), 0.f);
  out.ggw.assign(size_t(Hd), 0.f);
  out.ggb.assign(size_t(Hd), 0.f);
  for (int j = 0; j < Hd; ++j)
    for (int c = 0; c < C; ++c) {
      float s1 = 0, s2 = 0;
      for (int r = 0; r < p.runs; ++r) {
        s1 += pw1[size_t(tl::wpart_index(r, j, c, hp, cp))];
        s2 += pg[size_t(tl::wpart_index(r, j, c, hp, cp))];
      }
      out.gw1[size_t(j) * C + c] = s1;
      out.gw2[size_t(c) * Hd + j] = k.gam[size_t(c)] * s2;
    }
  for (int j = 0; j < Hd; ++j) {
    float s = 0;
    for (int r = 0; r < p.runs; ++r) s += pb1[size_t(int64_t(r) * hp + j)];
    out.gb1[size_t(j)] = s;
    float sw = 0, sb = 0;
    for (int n = 0; n < p.n; ++n) {
      sw += dgw[size_t(n * hp + j)];
      sb += dgb[size_t(n * hp + j)];
    }
    out.ggw[size_t(j)] = sw;
    out.ggb[size_t(j)] = sb;
  }
  for (int c = 0; c < C; ++c) {
    float snw = 0, snb = 0, sdy = 0;
    for (int64_t t = 0; t < p.tg.ntiles; ++t) {
      snw += pnw[size_t(tl::tpart_index(t, c, cp))];
      snb += pnb[size_t(tl::tpart_index(t, c, cp))];
      sdy += ps[size_t(tl::tpart_index(t, c, cp))];
    }
    out.gnw[size_t(c)] = snw;
    out.gnb[size_t(c)] = snb;
    out.gb2[size_t(c)] = k.gam[size_t(c)] * sdy;
    float s = 0;
    for (int j = 0; j < Hd; ++j) {
      float gsum = 0;
      for (int r = 0; r < p.runs; ++r) gsum += pg[size_t(tl::wpart_index(r, j, c, hp, cp))];
      s += k.w2t[size_t(j) * cp + c] * gsum;
    }
    out.ggam[size_t(c)] = s + k.b2[size_t(c)] * sdy;
  }
  return out;
}

static bool close_all(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                      const std::vector<double>* mag, double rtol) {
  CHECK(got.size() == want.size(), "%s: size %zu vs %zu", what, got.size(), want.size());
  double scale = 1e-6;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    const double m = mag ? (*mag)[i] : scale;
    const double err = std::fabs(double(got[i]) - want[i]);
    CHECK(std::isfinite(got[i]) && err <= rtol * (std::fabs(want[i]) + m + scale * 1e-3),
          "%s[%zu]: got %.9g, want %.9g (err %.3g, scale %.3g)", what, i, double(got[i]), want[i], err, m);
  }
  return true;
}

static bool emulation_case(const tl::Shape& s, bool grn, bool tanh_gelu, int force /*0 none, 1 streamed, 2 small kc*/,
                           uint64_t seed) {
  bool ok = false;
  tl::Plan p = tl::make_plan(s, &ok);
  CHECK(ok, "no plan");
  if (force == 1 && p.resident) {  // the streamed forward on a small C
    p.resident = false;
    p.kc_fwd = 32;
    p.fwd = tl::fwd_smem(p.cp, p.kc_fwd, false, p.halo_fwd);
  }
  if (force == 2) {  // several K chunks
    p.kc_bwd = 32;
    p.bwd_dx = tl::bwd_smem(32, true, p.halo_bwd);
    p.bwd_dw = tl::bwd_smem(32, false, p.halo_bwd);
    if (p.resident) {
      p.kc_fwd = 32;
      p.fwd = tl::fwd_smem(p.cp, 32, true, p.halo_fwd);
    }
  }
  if (!check_smem(p)) return false;
  const Problem P = make_problem(s, grn, tanh_gelu, seed);
  const RefOut R = reference(P);
  const std::vector<float> y = emu_forward(P, p);
  if (!g_case_ok) return false;
  if (!close_all("y", y, R.y, &R.mag_y, 2e-5)) return false;
  const BwdOut b = emu_backward(P, p);
  if (!g_case_ok) return false;
  const double rt = 1e-4;
  if (!close_all("D", b.d, R.d, &R.mag_d, rt)) return false;
  if (!close_all("grad_fc1_weight", b.gw1, R.gw1, nullptr, rt)) return false;
  if (!close_all("grad_fc2_weight", b.gw2, R.gw2, nullptr, rt)) return false;
  if (!close_all("grad_fc1_bias", b.gb1, R.gb1, nullptr, rt)) return false;
  if (!close_all("grad_fc2_bias", b.gb2, R.gb2, nullptr, rt)) return false;
  if (!close_all("grad_norm_weight", b.gnw, R.gnw, nullptr, rt)) return false;
  if (!close_all("grad_norm_bias", b.gnb, R.gnb, nullptr, rt)) return false;
  if (!close_all("grad_gamma", b.ggam, R.ggam, nullptr, rt)) return false;
  if (grn) {
    if (!close_all("grad_grn_weight", b.ggw, R.ggw, nullptr, rt)) return false;
    if (!close_all("grad_grn_bias", b.ggb, R.ggb, nullptr, rt)) return false;
  }
  return true;
}

// ================================================================== main
static std::string shape_name(const tl::Shape& s) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "N=%lld C=%lld H=%lld W=%lld k=%lld hidden=%lld", (long long)s.n, (long long)s.c,
                (long long)s.h, (long long)s.w, (long long)s.k, (long long)s.hidden);
  return buf;
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--quick") == 0) g_quick = true;

  begin_case("fragments");
  check_fragments();
  end_case();
  begin_case("column sums");
  check_col_sums();
  end_case();
  begin_case("depthwise threads");
  check_dw_threads();
  end_case();
  for (int cp = 32; cp <= 1024; cp += 32) {
    begin_case("in-place rows cp=" + std::to_string(cp));
    check_inplace_rows(cp);
    end_case();
  }

  // Structure over hand-picked shapes: ConvNeXt stages, odd C / hidden, tiny images,
  // images smaller than the kernel, big kernels, C above the resident limit.
  std::vector<tl::Shape> shapes = {
      {2, 96, 56, 56, 7, 384},   {2, 192, 28, 28, 7, 768},  {2, 384, 14, 14, 7, 1536},
      {2, 768, 7, 7, 7, 3072},   {1, 1024, 7, 7, 7, 4096},  {1, 2048, 7, 7, 7, 8192},
      {1, 2816, 3, 3, 7, 11264}, {3, 5, 9, 11, 3, 7},       {1, 1, 1, 1, 1, 1},
      {2, 7, 3, 2, 7, 13},       {1, 33, 5, 4, 31, 65},     {2, 17, 40, 3, 31, 33},
      {1, 255, 13, 17, 5, 100},  {1, 257, 6, 9, 9, 130},    {4, 130, 11, 10, 7, 520},
      {1, 3, 64, 1, 3, 5},       {1, 3, 1, 64, 3, 5},       {1, 40, 65, 65, 1, 160},
      {2, 96, 57, 55, 13, 384},  {1, 8, 2, 2, 31, 8},       {5, 64, 8, 8, 7, 256},
  };
  Rng rng(12345);
  const int nrand = g_quick ? 40 : 200;
  for (int i = 0; i < nrand; ++i) {
    tl::Shape s;
    s.n = rng.range(1, 3);
    s.c = rng.range(1, 600);
    s.h = rng.range(1, 40);
    s.w = rng.range(1, 40);
    s.k = 2 * rng.range(0, 15) + 1;
    s.hidden = rng.range(1, 2400);
    shapes.push_back(s);
  }
  for (const tl::Shape& s : shapes) {
    begin_case("structure " + shape_name(s));
    structure_case(s);
    end_case();
  }

  // Numeric emulation: small shapes reaching every path (resident / streamed forward,
  // one and several column chunks, several K chunks, several hidden chunks, partial
  // tiles, images smaller than the kernel, GRN, tanh GELU, drop_scale 0).
  struct EmuCase {
    tl::Shape s;
    bool grn, tanh_gelu;
    int force;
  };
  std::vector<EmuCase> emu = {
      {{2, 5, 3, 4, 3, 7}, false, false, 0},      {{2, 5, 3, 4, 3, 7}, true, false, 0},
      {{3, 9, 5, 6, 7, 70}, true, true, 0},       {{1, 33, 9, 10, 5, 65}, false, false, 2},
      {{2, 33, 4, 3, 9, 130}, true, false, 1},    {{1, 130, 5, 3, 3, 70}, false, true, 0},
      {{2, 130, 3, 5, 1, 64}, true, false, 2},    {{1, 260, 3, 3, 3, 64}, true, false, 0},
      {{1, 16, 10, 9, 31, 40}, false, false, 0},  {{4, 12, 2, 2, 5, 24}, true, false, 1},
  };
  if (g_quick) emu.resize(6);
  uint64_t seed = 1;
  for (const EmuCase& e : emu) {
    begin_case(std::string("emulation ") + shape_name(e.s) + (e.grn ? " grn" : "") + (e.tanh_gelu ? " tanh" : "") +
               (e.force == 1 ? " streamed" : e.force == 2 ? " kc32" : ""));
    emulation_case(e.s, e.grn, e.tanh_gelu, e.force, seed++);
    end_case();
  }

  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
