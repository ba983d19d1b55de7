// Host test of the CUDA depthwise-conv tile math (csrc/ops/depthwise_conv/tile_math.h).
//
// No GPU is needed: for many odd shapes (primes, partial tiles, band kernels,
// large kernels, stride 1 and 2, dilation, asymmetric and over-size padding,
// NHWC and NCHW, strided weights) this program
//   * checks the primitives (tiles cover every output once, windows clamp into
//     the image, halo windows hold every pixel a tile reads, gather tap walks,
//     thread and shared-memory mappings are bijections, plans fit the budget);
//   * emulates every CUDA kernel of cuda/dwconv.cu on the host with the same
//     loop structure and the same tile_math.h calls (block by block, thread by
//     thread, staging shared memory, then computing), checking every shared-
//     memory read for bounds and for holding the input pixel the convolution
//     needs, and compares the results with a naive convolution. Data are small
//     integers, so float sums are exact and the comparison is exact.
//
// Build: c++ -std=c++17 -O1 -I csrc tests/cpp/test_dwconv_tile_math.cpp
// Output ends with "N passed, M failed"; exit status is nonzero on failure.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ops/depthwise_conv/tile_math.h"

namespace tl = fastvis::dwconv::tiles;
using tl::kThreads;

// ------------------------------------------------------------------ reporting
static int g_passed = 0, g_failed = 0;
static bool g_case_ok = true;
static int g_messages = 0;
static std::string g_case;

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
  if (g_messages >= 40) return;
  ++g_messages;
  std::fprintf(stderr, "FAIL [%s]: ", g_case.c_str());
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
}
#define CHECK(cond, ...)      \
  do {                        \
    if (!(cond)) {            \
      failf(__VA_ARGS__);     \
      return false;           \
    }                         \
  } while (0)

// ------------------------------------------------------------------ data
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return uint32_t(s >> 33);
  }
  int64_t range(int64_t lo, int64_t hi) { return lo + int64_t(next() % uint64_t(hi - lo + 1)); }  // [lo, hi]
  template <class T>
  T pick(const std::vector<T>& v) {
    return v[next() % v.size()];
  }
};

// A logical (N, C, H, W) activation stored NHWC or NCHW.
struct Act {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
  std::vector<float> v;
  Act() = default;
  Act(int64_t n_, int64_t c_, int64_t h_, int64_t w_, bool cl) : n(n_), c(c_), h(h_), w(w_) {
    if (cl) {
      sc = 1;
      sw = c;
      sh = w * c;
      sn = h * w * c;
    } else {
      sw = 1;
      sh = w;
      sc = h * w;
      sn = c * h * w;
    }
    v.assign(size_t(n * c * h * w), 0.0f);
  }
  int64_t idx(int64_t in, int64_t ic, int64_t y, int64_t x) const { return in * sn + ic * sc + y * sh + x * sw; }
  float at(int64_t in, int64_t ic, int64_t y, int64_t x) const { return v[size_t(idx(in, ic, y, x))]; }
  float& at(int64_t in, int64_t ic, int64_t y, int64_t x) { return v[size_t(idx(in, ic, y, x))]; }
};

static void fill_ints(std::vector<float>& v, Rng& rng, int lo, int hi) {
  for (float& f : v) f = float(rng.range(lo, hi));
}

// A (C, kh, kw) weight with one of two memory orders: (C, kh, kw) dense, or
// (kh, kw, C) dense (as a channels-last (C, 1, kh, kw) tensor would be).
struct Weight {
  int64_t c, kh, kw;
  int64_t sc, si, sj;
  std::vector<float> v;
  Weight(int64_t c_, int64_t kh_, int64_t kw_, bool tap_major) : c(c_), kh(kh_), kw(kw_) {
    if (tap_major) {
      sc = 1;
      sj = c;
      si = kw * c;
    } else {
      sj = 1;
      si = kw;
      sc = kh * kw;
    }
    v.assign(size_t(c * kh * kw), 0.0f);
  }
  float at(int64_t ic, int64_t i, int64_t j) const { return v[size_t(ic * sc + i * si + j * sj)]; }
};

// The kernels' weight view: p[off + c*sc + i*si + j*sj] (negative strides flip).
struct WView {
  const float* p;
  int64_t off, sc, si, sj;
  float load(int64_t c, int64_t i, int64_t j) const { return p[off + c * sc + i * si + j * sj]; }
};
static WView view_of(const Weight& w, bool flip) {
  WView v{w.v.data(), 0, w.sc, w.si, w.sj};
  if (flip) {
    v.off = (w.kh - 1) * w.si + (w.kw - 1) * w.sj;
    v.si = -v.si;
    v.sj = -v.sj;
  }
  return v;
}

// ------------------------------------------------------------------ naive oracle
static void naive_forward(const Act& x, const Weight& w, const std::vector<float>* bias, Act& y,
                          const tl::Problem2D& pr) {
  for (int64_t n = 0; n < y.n; ++n)
    for (int64_t c = 0; c < y.c; ++c)
      for (int64_t oy = 0; oy < y.h; ++oy)
        for (int64_t ox = 0; ox < y.w; ++ox) {
          double s = bias ? (*bias)[size_t(c)] : 0.0;
          for (int64_t i = 0; i < pr.y.k; ++i) {
            const int64_t iy = oy * pr.y.s - pr.y.pad + i * pr.y.d;
            if (iy < 0 || iy >= x.h) continue;
            for (int64_t j = 0; j < pr.x.k; ++j) {
              const int64_t ix = ox * pr.x.s - pr.x.pad + j * pr.x.d;
              if (ix < 0 || ix >= x.w) continue;
              s += double(x.at(n, c, iy, ix)) * w.at(c, i, j);
            }
          }
          y.at(n, c, oy, ox) = float(s);
        }
}

// Scatter form (independent of the gather formulation under test).
static void naive_backward_input(const Act& gy, const Weight& w, Act& gx, const tl::Problem2D& pr) {
  std::vector<double> acc(gx.v.size(), 0.0);
  for (int64_t n = 0; n < gy.n; ++n)
    for (int64_t c = 0; c < gy.c; ++c)
      for (int64_t oy = 0; oy < gy.h; ++oy)
        for (int64_t ox = 0; ox < gy.w; ++ox)
          for (int64_t i = 0; i < pr.y.k; ++i) {
            const int64_t iy = oy * pr.y.s - pr.y.pad + i * pr.y.d;
            if (iy < 0 || iy >= gx.h) continue;
            for (int64_t j = 0; j < pr.x.k; ++j) {
              const int64_t ix = ox * pr.x.s - pr.x.pad + j * pr.x.d;
              if (ix < 0 || ix >= gx.w) continue;
              acc[size_t(gx.idx(n, c, iy, ix))] += double(gy.at(n, c, oy, ox)) * w.at(c, i, j);
            }
          }
  for (size_t k = 0; k < acc.size(); ++k) gx.v[k] = float(acc[k]);
}

static void naive_backward_weight(const Act& gy, const Act& x, std::vector<float>& gw, std::vector<float>& gb,
                                  const tl::Problem2D& pr) {
  const int64_t kh = pr.y.k, kw = pr.x.k;
  gw.assign(size_t(pr.c * kh * kw), 0.0f);
  gb.assign(size_t(pr.c), 0.0f);
  for (int64_t c = 0; c < pr.c; ++c) {
    double b = 0.0;
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        double s = 0.0;
        for (int64_t n = 0; n < pr.n; ++n)
          for (int64_t oy = 0; oy < gy.h; ++oy) {
            const int64_t iy = oy * pr.y.s - pr.y.pad + i * pr.y.d;
            if (iy < 0 || iy >= x.h) continue;
            for (int64_t ox = 0; ox < gy.w; ++ox) {
              const int64_t ix = ox * pr.x.s - pr.x.pad + j * pr.x.d;
              if (ix < 0 || ix >= x.w) continue;
              s += double(gy.at(n, c, oy, ox)) * x.at(n, c, iy, ix);
            }
          }
        gw[size_t((c * kh + i) * kw + j)] = float(s);
      }
    for (int64_t n = 0; n < pr.n; ++n)
      for (int64_t oy = 0; oy < gy.h; ++oy)
        for (int64_t ox = 0; ox < gy.w; ++ox) b += gy.at(n, c, oy, ox);
    gb[size_t(c)] = float(b);
  }
}

static bool same_act(const Act& got, const Act& want, const char* what) {
  for (int64_t n = 0; n < want.n; ++n)
    for (int64_t c = 0; c < want.c; ++c)
      for (int64_t y = 0; y < want.h; ++y)
        for (int64_t x = 0; x < want.w; ++x) {
          const float g = got.at(n, c, y, x), w = want.at(n, c, y, x);
          CHECK(g == w, "%s: mismatch at (n=%lld, c=%lld, y=%lld, x=%lld): got %g want %g", what, (long long)n,
                (long long)c, (long long)y, (long long)x, double(g), double(w));
        }
  return true;
}

// ------------------------------------------------------------------ emulated kernels
// What was staged into a shared-memory element (for the halo checks), packed in
// one int64: kUnwritten, kPadding (zero fill), or key(c, y, x) of a pixel.
using Staged = int64_t;
constexpr Staged kUnwritten = -2, kPadding = -1;
static Staged key(int64_t c, int64_t y, int64_t x) {  // y, x >= 0 and < 2^20
  return (c << 40) | (y << 20) | x;
}

// Emulates stage_conv(): every shared-memory element is written exactly once,
// with the source pixel tl::smem_coord names, zero outside the image.
static bool emulate_stage_conv(const Act& src, const WView& w, const tl::Problem2D& pr, const tl::ConvPlan& pl,
                               const tl::BlockTile& bt, std::vector<float>& s_in, std::vector<float>& s_w,
                               std::vector<Staged>& staged) {
  const bool CL = pr.channels_last;
  const tl::SmemTile st = tl::conv_src_tile(pl, CL);
  const int cb = pl.cb, kw = int(pr.x.k);
  const int64_t C = pr.c;
  const int64_t sh = tl::src_size(pr.y, pl.gather), sw = tl::src_size(pr.x, pl.gather);
  CHECK(sh == src.h && sw == src.w, "source size mismatch");
  CHECK(st.floats() == pl.in_floats, "smem tile floats %d != plan %d", st.floats(), pl.in_floats);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  s_in.assign(size_t(pl.in_floats), nan);
  s_w.assign(size_t(pl.w_floats), nan);
  staged.assign(size_t(pl.in_floats), kUnwritten);
  std::vector<int> wn(size_t(pl.w_floats), 0);
  for (int t = 0; t < kThreads; ++t) {
    for (int e = t; e < pl.w_floats; e += kThreads) {
      const tl::WeightCoord wc = tl::weight_coord(e, cb, kw);
      CHECK(wc.c >= 0 && wc.c < cb && wc.i >= 0 && wc.i < pr.y.k && wc.j >= 0 && wc.j < pr.x.k,
            "weight_coord out of range");
      CHECK(tl::weight_index(wc.i * kw + wc.j, wc.c, cb) == e, "weight_index(weight_coord(e)) != e");
      const int64_t ch = bt.c0 + wc.c;
      s_w[size_t(e)] = ch < C ? w.load(ch, wc.i, wc.j) : 0.0f;
      ++wn[size_t(e)];
    }
    for (int e = t; e < pl.in_floats; e += kThreads) {
      const tl::SmemCoord sc = tl::smem_coord(st, e);
      CHECK(sc.c >= 0 && sc.c < st.cb && sc.r >= 0 && sc.r < st.rows && sc.q >= 0 && sc.q < st.cols,
            "smem_coord(%d) out of the tile", e);
      CHECK(tl::smem_index(st, sc.c, sc.r, sc.q) == e, "smem_index(smem_coord(%d)) != %d", e, e);
      const int64_t ch = bt.c0 + sc.c, yy = bt.sy0 + sc.r, xx = bt.sx0 + sc.q;
      float v = 0.0f;
      const bool inside = ch < C && tl::in_range(yy, sh) && tl::in_range(xx, sw);
      if (inside) {
        CHECK(bt.n >= 0 && bt.n < src.n, "block image out of range");
        v = src.at(bt.n, ch, yy, xx);
      }
      s_in[size_t(e)] = v;
      CHECK(staged[size_t(e)] == kUnwritten, "input smem %d written twice", e);
      staged[size_t(e)] = inside ? key(ch, yy, xx) : kPadding;
    }
  }
  for (int e = 0; e < pl.w_floats; ++e) CHECK(wn[size_t(e)] == 1, "weight smem %d written %d times", e, wn[size_t(e)]);
  for (int e = 0; e < pl.in_floats; ++e) CHECK(staged[size_t(e)] != kUnwritten, "input smem %d never written", e);
  return true;
}

// Checks that a shared-memory read for destination (ch, y, x) and tap (i, j)
// holds the source pixel the convolution needs (or zero padding).
static inline bool check_staged(Staged s, int64_t ch, int64_t sy, int64_t sx, int64_t sh, int64_t sw) {
  const bool inside = tl::in_range(sy, sh) && tl::in_range(sx, sw);
  const Staged want = inside ? key(ch, sy, sx) : kPadding;
  if (s != want) {
    failf("halo read holds key %llx, want (c=%lld, y=%lld, x=%lld, inside=%d)", (unsigned long long)s,
          (long long)ch, (long long)sy, (long long)sx, int(inside));
    return false;
  }
  return true;
}

// conv_fwd_tiled, thread by thread.
static bool emulate_conv_fwd_tiled(const Act& src, Act& dst, const WView& w, const std::vector<float>* bias,
                                   const tl::Problem2D& pr, const tl::ConvPlan& pl) {
  const bool CL = pr.channels_last;
  CHECK(!pl.direct && !pl.gather, "not a forward tiled plan");
  CHECK(pl.ppt >= 1 && pl.ppt <= tl::kMaxPix, "ppt %d out of range", pl.ppt);
  CHECK(dst.h == pr.y.out && dst.w == pr.x.out, "destination size mismatch");
  std::vector<int> writes(dst.v.size(), 0);
  std::vector<float> s_in, s_w;
  std::vector<Staged> staged;
  for (int64_t b = 0; b < pl.blocks; ++b) {
    const tl::BlockTile bt = tl::conv_block(pl, pr, b);
    if (!emulate_stage_conv(src, w, pr, pl, bt, s_in, s_w, staged)) return false;
    const tl::SmemTile st = tl::conv_src_tile(pl, CL);
    for (int t = 0; t < kThreads; ++t) {
      const tl::ThreadSlot ts = tl::thread_slot(t, pl.cb, CL);
      const int ppt = pl.ppt, cb = pl.cb;
      int base[tl::kMaxPix];
      float acc[tl::kMaxPix];
      tl::PixelRef refs[tl::kMaxPix];
      for (int r = 0; r < ppt; ++r) {  // (the kernel also computes r >= ppt, unused)
        refs[r] = tl::conv_pixel(pl, pr, bt, ts, r, CL);
        base[r] = refs[r].base;
        acc[r] = 0.0f;
      }
      const int kh = int(pr.y.k), kw = int(pr.x.k);
      const int row_step = tl::tap_offset(st, int(pr.y.d), 0);
      const int col_step = tl::tap_offset(st, 0, int(pr.x.d));
      bool any_active = false;
      for (int r = 0; r < ppt; ++r) any_active = any_active || refs[r].active;
      if (!any_active) {
        // The kernel still runs the loop (results unused): its reads must stay in
        // the tile. Offsets grow with i and j, so the extremes suffice.
        const int last = (kh - 1) * row_step + (kw - 1) * col_step;
        for (int r = 0; r < ppt; ++r)
          CHECK(base[r] >= 0 && base[r] + last < pl.in_floats, "idle thread reads outside the tile");
        CHECK(tl::weight_index((kh - 1) * kw + kw - 1, ts.c, cb) < pl.w_floats, "idle weight read");
        continue;
      }
      for (int i = 0; i < kh; ++i) {
        const int wrow = tl::weight_index(i * kw, ts.c, cb);
        const int srow = i * row_step;
        for (int j = 0; j < kw; ++j) {
          const int wi = wrow + j * cb;
          CHECK(wi >= 0 && wi < pl.w_floats, "weight smem index %d out of range", wi);
          const float wv = s_w[size_t(wi)];
          const int sp = srow + j * col_step;
          for (int r = 0; r < tl::kMaxPix; ++r) {
            if (r < ppt) {
              const int k = sp + base[r];
              CHECK(k >= 0 && k < pl.in_floats, "input smem index %d out of [0, %d)", k, pl.in_floats);
              if (refs[r].active) {
                const int64_t ch = bt.c0 + ts.c;
                if (!check_staged(staged[size_t(k)], ch, refs[r].y * pr.y.s - pr.y.pad + i * pr.y.d,
                                  refs[r].x * pr.x.s - pr.x.pad + j * pr.x.d, src.h, src.w))
                  return false;
              }
              acc[r] = acc[r] + wv * s_in[size_t(k)];
            }
          }
        }
      }
      const int64_t ch = bt.c0 + ts.c;
      const float bv = (bias != nullptr && ch < pr.c) ? (*bias)[size_t(ch)] : 0.0f;
      for (int r = 0; r < tl::kMaxPix; ++r) {
        if (r < ppt) {
          const tl::PixelRef ref = tl::conv_pixel(pl, pr, bt, ts, r, CL);
          if (ref.active) {
            CHECK(ref.y >= 0 && ref.y < dst.h && ref.x >= 0 && ref.x < dst.w && ch < dst.c,
                  "store outside the output");
            dst.at(bt.n, ch, ref.y, ref.x) = acc[r] + bv;
            ++writes[size_t(dst.idx(bt.n, ch, ref.y, ref.x))];
          }
        }
      }
    }
  }
  for (size_t k = 0; k < writes.size(); ++k) CHECK(writes[k] == 1, "output element %zu written %d times", k, writes[k]);
  return true;
}

// conv_gather_tiled, thread by thread.
static bool emulate_conv_gather_tiled(const Act& src, Act& dst, const WView& w, const tl::Problem2D& pr,
                                      const tl::ConvPlan& pl) {
  const bool CL = pr.channels_last;
  CHECK(!pl.direct && pl.gather, "not a gather tiled plan");
  CHECK(pl.ppt >= 1 && pl.ppt <= tl::kMaxPix, "ppt %d out of range", pl.ppt);
  CHECK(dst.h == pr.y.in && dst.w == pr.x.in, "destination size mismatch");
  std::vector<int> writes(dst.v.size(), 0);
  std::vector<float> s_in, s_w;
  std::vector<Staged> staged;
  for (int64_t b = 0; b < pl.blocks; ++b) {
    const tl::BlockTile bt = tl::conv_block(pl, pr, b);
    if (!emulate_stage_conv(src, w, pr, pl, bt, s_in, s_w, staged)) return false;
    const tl::SmemTile st = tl::conv_src_tile(pl, CL);
    for (int t = 0; t < kThreads; ++t) {
      const tl::ThreadSlot ts = tl::thread_slot(t, pl.cb, CL);
      const int ppt = pl.ppt, cb = pl.cb, kw = int(pr.x.k);
      const int64_t ch = bt.c0 + ts.c;
      const int ps = tl::pix_stride(st);
      for (int r = 0; r < ppt; ++r) {
        const tl::PixelRef ref = tl::conv_pixel(pl, pr, bt, ts, r, CL);
        if (!ref.active) continue;
        const tl::TapWalk wy = tl::gather_taps(ref.y, pr.y);
        const tl::TapWalk wx = tl::gather_taps(ref.x, pr.x);
        const int r0 = int(wy.src0 - bt.sy0), q0 = int(wx.src0 - bt.sx0);
        const int rstep = int(wy.src_step), qstep = int(wx.src_step) * ps;
        float acc = 0.0f;
        for (int ay = 0; ay < wy.count; ++ay) {
          const int i = wy.first + ay * wy.step;
          const int wrow = tl::weight_index(i * kw + wx.first, ts.c, cb);
          const int sp = tl::smem_index(st, ts.c, r0 - ay * rstep, q0);
          CHECK(r0 - ay * rstep >= 0 && r0 - ay * rstep < st.rows, "gather row %d outside [0, %d)",
                r0 - ay * rstep, st.rows);
          for (int ax = 0; ax < wx.count; ++ax) {
            const int wi = wrow + ax * wx.step * cb;
            const int k = sp - ax * qstep;
            const int j = wx.first + ax * wx.step;
            CHECK(q0 - ax * int(wx.src_step) >= 0 && q0 - ax * int(wx.src_step) < st.cols,
                  "gather col outside the tile");
            CHECK(wi >= 0 && wi < pl.w_floats && wi == tl::weight_index(i * kw + j, ts.c, cb),
                  "gather weight index %d wrong", wi);
            CHECK(k >= 0 && k < pl.in_floats, "gather smem index %d out of [0, %d)", k, pl.in_floats);
            // The tap must be one the convolution really has.
            const int64_t ny = ref.y + pr.y.pad - i * pr.y.d, nx = ref.x + pr.x.pad - j * pr.x.d;
            CHECK(tl::pos_mod(ny, pr.y.s) == 0 && tl::pos_mod(nx, pr.x.s) == 0, "gather tap not divisible");
            if (!check_staged(staged[size_t(k)], ch, ny / pr.y.s, nx / pr.x.s, src.h, src.w)) return false;
            acc = acc + s_w[size_t(wi)] * s_in[size_t(k)];
          }
        }
        CHECK(ref.y < dst.h && ref.x < dst.w && ch < dst.c, "store outside grad_x");
        dst.at(bt.n, ch, ref.y, ref.x) = acc;
        ++writes[size_t(dst.idx(bt.n, ch, ref.y, ref.x))];
      }
    }
  }
  for (size_t k = 0; k < writes.size(); ++k) CHECK(writes[k] == 1, "grad_x element %zu written %d times", k, writes[k]);
  return true;
}

// conv_fwd_direct / conv_gather_direct: grid-stride loops over destination elements.
static bool emulate_conv_direct(const Act& src, Act& dst, const WView& w, const std::vector<float>* bias,
                                const tl::Problem2D& pr, const tl::ConvPlan& pl) {
  const bool CL = pr.channels_last;
  CHECK(pl.direct && pl.blocks >= 1, "not a direct plan");
  const int64_t DH = tl::dst_size(pr.y, pl.gather), DW = tl::dst_size(pr.x, pl.gather);
  const int64_t total = pr.n * pr.c * DH * DW;
  std::vector<int> writes(dst.v.size(), 0);
  const int64_t grid = pl.blocks * kThreads;
  for (int64_t g = 0; g < grid; ++g) {
    for (int64_t e = g; e < total; e += grid) {
      const tl::Coord4 k = tl::direct_coord(e, pr.c, DH, DW, CL);
      CHECK(k.n >= 0 && k.n < pr.n && k.c >= 0 && k.c < pr.c && k.y >= 0 && k.y < DH && k.x >= 0 && k.x < DW,
            "direct_coord out of range");
      // Channels-last order must follow memory order (coalescing).
      CHECK(dst.idx(k.n, k.c, k.y, k.x) == e, "direct_coord(%lld) does not follow memory order", (long long)e);
      float acc = 0.0f;
      if (!pl.gather) {
        for (int64_t i = 0; i < pr.y.k; ++i) {
          const int64_t yy = k.y * pr.y.s - pr.y.pad + i * pr.y.d;
          if (!tl::in_range(yy, pr.y.in)) continue;
          for (int64_t j = 0; j < pr.x.k; ++j) {
            const int64_t xx = k.x * pr.x.s - pr.x.pad + j * pr.x.d;
            if (!tl::in_range(xx, pr.x.in)) continue;
            acc = acc + w.load(k.c, i, j) * src.at(k.n, k.c, yy, xx);
          }
        }
        if (bias != nullptr) acc += (*bias)[size_t(k.c)];
      } else {
        const tl::TapWalk wy = tl::gather_taps(k.y, pr.y);
        const tl::TapWalk wx = tl::gather_taps(k.x, pr.x);
        for (int ay = 0; ay < wy.count; ++ay) {
          const int64_t oy = wy.src0 - ay * wy.src_step;
          if (!tl::in_range(oy, pr.y.out)) continue;
          const int64_t i = wy.first + ay * wy.step;
          for (int ax = 0; ax < wx.count; ++ax) {
            const int64_t ox = wx.src0 - ax * wx.src_step;
            if (!tl::in_range(ox, pr.x.out)) continue;
            const int64_t j = wx.first + ax * wx.step;
            acc = acc + w.load(k.c, i, j) * src.at(k.n, k.c, oy, ox);
          }
        }
      }
      dst.at(k.n, k.c, k.y, k.x) = acc;
      ++writes[size_t(dst.idx(k.n, k.c, k.y, k.x))];
    }
  }
  for (size_t k = 0; k < writes.size(); ++k) CHECK(writes[k] == 1, "direct: element %zu written %d times", k, writes[k]);
  return true;
}

// wgrad_tiled / wgrad_direct + wgrad_reduce.
static bool emulate_wgrad(const Act& gy, const Act& x, const tl::Problem2D& pr, const tl::WgradPlan& pl,
                          std::vector<float>& gw, std::vector<float>& gb) {
  const bool CL = pr.channels_last;
  const int64_t C = pr.c, OH = pr.y.out, OW = pr.x.out, H = pr.y.in, W = pr.x.in;
  const int64_t taps = pl.taps;
  CHECK(taps == pr.y.k * pr.x.k, "taps");
  CHECK(pl.scratch_bytes == size_t(pl.chunks) * size_t(C) * size_t(taps + 1) * sizeof(float), "scratch size");
  const size_t nparts = pl.scratch_bytes / sizeof(float);
  std::vector<float> part(nparts, std::numeric_limits<float>::quiet_NaN());
  std::vector<int> pwrites(nparts, 0);
  // Items: every (n, tile) in exactly one chunk.
  {
    std::vector<int> seen(size_t(pl.items), 0);
    for (int64_t g = 0; g < pl.chunks; ++g) {
      tl::WgradBlock wb = tl::wgrad_block(pl, pr, g * pl.cgroups * pl.tchunks);
      CHECK(wb.g == g && wb.item_begin < wb.item_end, "chunk %lld is empty", (long long)g);
      for (int64_t it = wb.item_begin; it < wb.item_end; ++it) ++seen[size_t(it)];
    }
    for (int64_t it = 0; it < pl.items; ++it) CHECK(seen[size_t(it)] == 1, "item %lld in %d chunks", (long long)it, seen[size_t(it)]);
  }
  const bool bias = true;
  if (!pl.direct) {
    CHECK(pl.cb >= 1 && pl.cb <= tl::kMaxCb && tl::kThreads % pl.cb == 0, "cb");
    const tl::SmemTile gt = tl::wgrad_gy_tile(pl, CL), xt = tl::wgrad_x_tile(pl, CL);
    CHECK(gt.floats() == pl.gy_floats && xt.floats() == pl.x_floats, "tile floats");
    std::vector<float> s_gy, s_x;
    std::vector<Staged> st_gy, st_x;
    for (int64_t b = 0; b < pl.blocks; ++b) {
      const tl::WgradBlock wb = tl::wgrad_block(pl, pr, b);
      CHECK(wb.nrows >= 1 && wb.nrows <= pl.rk && wb.i0 + wb.nrows <= pr.y.k, "tap chunk rows");
      const int npairs = wb.nrows * int(pr.x.k) * pl.cb;
      const int nr = (npairs + kThreads - 1) / kThreads;
      CHECK(nr <= tl::kMaxPairs, "%d pairs per thread > kMaxPairs", nr);
      // Pair mapping: each (channel, tap of the chunk) exactly once.
      std::vector<int> pseen(size_t(npairs), 0);
      // Per-thread registers of the kernel, [t][r] flattened.
      constexpr int R = tl::kMaxPairs;
      std::vector<float> acc(size_t(kThreads * R), 0.0f), bacc(size_t(kThreads), 0.0f);
      std::vector<int> gbase(size_t(kThreads * R)), xbase(size_t(kThreads * R));
      std::vector<tl::WgradPair> pairs(size_t(kThreads * R));
      for (int t = 0; t < kThreads; ++t) {
        for (int r = 0; r < tl::kMaxPairs; ++r) {
          const tl::WgradPair wp = tl::wgrad_pair(pl, pr, wb, t + r * kThreads, CL);
          pairs[size_t(t * R + r)] = wp;
          gbase[size_t(t * R + r)] = tl::smem_index(gt, wp.c, 0, 0);
          xbase[size_t(t * R + r)] = tl::smem_index(xt, wp.c, 0, 0) + wp.off;
          const int q = t + r * kThreads;
          if (q < npairs) {
            CHECK(wp.c >= 0 && wp.c < pl.cb && wp.i >= wb.i0 && wp.i < wb.i0 + wb.nrows && wp.j >= 0 &&
                      wp.j < pr.x.k,
                  "pair %d maps outside the chunk", q);
            ++pseen[size_t(((wp.i - wb.i0) * pr.x.k + wp.j) * pl.cb + wp.c)];
          } else {
            CHECK(!wp.active, "pair %d beyond npairs is active", q);
          }
        }
      }
      for (int k = 0; k < npairs; ++k) CHECK(pseen[size_t(k)] == 1, "pair slot %d seen %d times", k, pseen[size_t(k)]);

      const int gps = tl::pix_stride(gt);
      const int xrow = tl::tap_offset(xt, int(pr.y.s), 0), xcol = tl::tap_offset(xt, 0, int(pr.x.s));
      for (int64_t item = wb.item_begin; item < wb.item_end; ++item) {
        const tl::WgradItem it = tl::wgrad_item(pl, pr, wb, item);
        CHECK(it.n >= 0 && it.n < pr.n, "item image");
        const float nan = std::numeric_limits<float>::quiet_NaN();
        s_gy.assign(size_t(pl.gy_floats), nan);
        s_x.assign(size_t(pl.x_floats), nan);
        st_gy.assign(size_t(pl.gy_floats), kUnwritten);
        st_x.assign(size_t(pl.x_floats), kUnwritten);
        for (int t = 0; t < kThreads; ++t) {
          for (int e = t; e < pl.gy_floats; e += kThreads) {
            const tl::SmemCoord sc = tl::smem_coord(gt, e);
            CHECK(tl::smem_index(gt, sc.c, sc.r, sc.q) == e, "gy smem bijection");
            const int64_t ch = wb.c0 + sc.c, oy = it.y0 + sc.r, ox = it.x0 + sc.q;
            float v = 0.0f;
            const bool inside = ch < C && oy < OH && ox < OW;
            if (inside) v = gy.at(it.n, ch, oy, ox);
            s_gy[size_t(e)] = v;
            CHECK(st_gy[size_t(e)] == kUnwritten, "gy smem written twice");
            st_gy[size_t(e)] = key(ch, oy, ox);  // (also outside: holds zero)
          }
          for (int e = t; e < pl.x_floats; e += kThreads) {
            const tl::SmemCoord sc = tl::smem_coord(xt, e);
            CHECK(tl::smem_index(xt, sc.c, sc.r, sc.q) == e, "x smem bijection");
            const int64_t ch = wb.c0 + sc.c, yy = it.sy0 + sc.r, xx = it.sx0 + sc.q;
            float v = 0.0f;
            const bool inside = ch < C && tl::in_range(yy, H) && tl::in_range(xx, W);
            if (inside) v = x.at(it.n, ch, yy, xx);
            s_x[size_t(e)] = v;
            CHECK(st_x[size_t(e)] == kUnwritten, "x smem written twice");
            st_x[size_t(e)] = inside ? key(ch, yy, xx) : kPadding;
          }
        }
        for (int e = 0; e < pl.gy_floats; ++e) CHECK(st_gy[size_t(e)] != kUnwritten, "gy smem never written");
        for (int e = 0; e < pl.x_floats; ++e) CHECK(st_x[size_t(e)] != kUnwritten, "x smem never written");
        for (int t = 0; t < kThreads; ++t) {
          bool any_active = false;
          for (int r = 0; r < nr; ++r) any_active = any_active || pairs[size_t(t * R + r)].active;
          if (!any_active) {
            // Idle thread: the kernel's reads (results unused) must stay in the tiles.
            const int glast = ((pl.th - 1) * pl.tw + pl.tw - 1) * gps;
            const int xlast = (pl.th - 1) * xrow + (pl.tw - 1) * xcol;
            for (int r = 0; r < nr; ++r) {
              CHECK(gbase[size_t(t * R + r)] >= 0 && gbase[size_t(t * R + r)] + glast < pl.gy_floats,
                    "idle gy read outside");
              CHECK(xbase[size_t(t * R + r)] >= 0 && xbase[size_t(t * R + r)] + xlast < pl.x_floats,
                    "idle x read outside");
            }
          } else {
          for (int ly = 0; ly < pl.th; ++ly) {
            for (int lx = 0; lx < pl.tw; ++lx) {
              const int gp = (ly * pl.tw + lx) * gps;
              const int xp = ly * xrow + lx * xcol;
              for (int r = 0; r < tl::kMaxPairs; ++r) {
                if (r < nr) {
                  const int gi = gbase[size_t(t * R + r)] + gp, xi = xbase[size_t(t * R + r)] + xp;
                  CHECK(gi >= 0 && gi < pl.gy_floats, "gy smem index %d out of [0, %d)", gi, pl.gy_floats);
                  CHECK(xi >= 0 && xi < pl.x_floats, "x smem index %d out of [0, %d)", xi, pl.x_floats);
                  const tl::WgradPair& wp = pairs[size_t(t * R + r)];
                  if (wp.active) {
                    const int64_t ch = wb.c0 + wp.c, oy = it.y0 + ly, ox = it.x0 + lx;
                    CHECK(st_gy[size_t(gi)] == key(ch, oy, ox), "gy read holds the wrong pixel");
                    if (oy < OH && ox < OW) {
                      if (!check_staged(st_x[size_t(xi)], ch, oy * pr.y.s - pr.y.pad + wp.i * pr.y.d,
                                        ox * pr.x.s - pr.x.pad + wp.j * pr.x.d, H, W))
                        return false;
                    }
                  }
                  acc[size_t(t * R + r)] = acc[size_t(t * R + r)] + s_gy[size_t(gi)] * s_x[size_t(xi)];
                }
              }
            }
          }
          }
          if (bias && wb.i0 == 0 && t < pl.cb) {
            for (int ly = 0; ly < pl.th; ++ly)
              for (int lx = 0; lx < pl.tw; ++lx) bacc[size_t(t)] += s_gy[size_t(tl::smem_index(gt, t, ly, lx))];
          }
        }
      }
      for (int t = 0; t < kThreads; ++t) {
        for (int r = 0; r < tl::kMaxPairs; ++r) {
          if (r < nr) {
            const tl::WgradPair wp = tl::wgrad_pair(pl, pr, wb, t + r * kThreads, CL);
            if (wp.active) {
              const int64_t k = tl::wgrad_partial_index(wb.g, wb.c0 + wp.c, int64_t(wp.i) * pr.x.k + wp.j, C, taps);
              CHECK(k >= 0 && size_t(k) < nparts, "partial index out of range");
              part[size_t(k)] = acc[size_t(t * R + r)];
              ++pwrites[size_t(k)];
            }
          }
        }
        if (bias && wb.i0 == 0 && t < pl.cb && wb.c0 + t < C) {
          const int64_t k = tl::wgrad_bias_partial_index(wb.g, wb.c0 + t, C, taps, pl.chunks);
          CHECK(k >= 0 && size_t(k) < nparts, "bias partial index out of range");
          part[size_t(k)] = bacc[size_t(t)];
          ++pwrites[size_t(k)];
        }
      }
    }
  } else {
    // wgrad_direct
    CHECK(pl.cgroups == C && pl.tchunks == 1 && pl.cb == 1, "direct wgrad plan shape");
    const int tapsi = int(taps), kw = int(pr.x.k);
    for (int64_t b = 0; b < pl.blocks; ++b) {
      const tl::WgradBlock wb = tl::wgrad_block(pl, pr, b);
      const int64_t c = wb.c0;
      CHECK(c >= 0 && c < C && wb.i0 == 0, "direct wgrad block");
      for (int t = 0; t < kThreads; ++t) {
        for (int tap = t; tap <= tapsi; tap += kThreads) {
          const bool is_bias = tap == tapsi;
          if (is_bias && !bias) continue;
          const int i = is_bias ? 0 : tap / kw, j = is_bias ? 0 : tap % kw;
          float acc = 0.0f;
          for (int64_t item = wb.item_begin; item < wb.item_end; ++item) {
            const tl::WgradItem it = tl::wgrad_item(pl, pr, wb, item);
            for (int64_t oy = it.y0; oy < tl::imin(it.y0 + pl.th, OH); ++oy) {
              const int64_t yy = it.sy0 + (oy - it.y0) * pr.y.s + i * pr.y.d;
              if (!is_bias && !tl::in_range(yy, H)) continue;
              for (int64_t ox = it.x0; ox < tl::imin(it.x0 + pl.tw, OW); ++ox) {
                const float g = gy.at(it.n, c, oy, ox);
                if (is_bias) {
                  acc += g;
                } else {
                  const int64_t xx = it.sx0 + (ox - it.x0) * pr.x.s + j * pr.x.d;
                  if (tl::in_range(xx, W)) acc = acc + g * x.at(it.n, c, yy, xx);
                }
              }
            }
          }
          const int64_t k = is_bias ? tl::wgrad_bias_partial_index(wb.g, c, C, taps, pl.chunks)
                                    : tl::wgrad_partial_index(wb.g, c, tap, C, taps);
          CHECK(k >= 0 && size_t(k) < nparts, "partial index out of range");
          part[size_t(k)] = acc;
          ++pwrites[size_t(k)];
        }
      }
    }
  }
  for (size_t k = 0; k < nparts; ++k) CHECK(pwrites[k] == 1, "partial %zu written %d times", k, pwrites[k]);
  // wgrad_reduce (chunk order), into a dense (C, kh, kw) gradient.
  gw.assign(size_t(C * taps), std::numeric_limits<float>::quiet_NaN());
  gb.assign(size_t(C), std::numeric_limits<float>::quiet_NaN());
  const int64_t nw = C * taps;
  for (int64_t e = 0; e < nw + C; ++e) {
    float s = 0.0f;
    if (e < nw) {
      const int64_t c = e / taps, tap = e % taps;
      for (int64_t g = 0; g < pl.chunks; ++g) s += part[size_t(tl::wgrad_partial_index(g, c, tap, C, taps))];
      gw[size_t(c * taps + tap)] = s;
    } else {
      const int64_t c = e - nw;
      for (int64_t g = 0; g < pl.chunks; ++g) s += part[size_t(tl::wgrad_bias_partial_index(g, c, C, taps, pl.chunks))];
      gb[size_t(c)] = s;
    }
  }
  return true;
}

// ------------------------------------------------------------------ primitive checks
static bool check_tiles_1d(const tl::Dim& d) {
  // gather_taps against brute force; windows against their definitions.
  for (int64_t p = 0; p < d.in; ++p) {
    const tl::TapWalk w = tl::gather_taps(p, d);
    std::vector<int64_t> want;
    for (int64_t i = 0; i < d.k; ++i)
      if (tl::pos_mod(p + d.pad - i * d.d, d.s) == 0) want.push_back(i);
    CHECK(int64_t(w.count) == int64_t(want.size()), "gather_taps(%lld) count %d want %zu", (long long)p, w.count,
          want.size());
    for (int a = 0; a < w.count; ++a) {
      const int64_t i = w.first + a * w.step;
      CHECK(i == want[size_t(a)], "gather_taps tap %d is %lld want %lld", a, (long long)i, (long long)want[size_t(a)]);
      CHECK(w.src0 - a * w.src_step == tl::floor_div(p + d.pad - i * d.d, d.s), "gather_taps source");
    }
  }
  for (int64_t t : {1, 2, 3, 4, 8, 16, 32, 64}) {
    const int64_t dst_f = d.out, dst_g = d.in;
    // Forward: tiles cover [0, out) exactly once; windows span what outputs read.
    std::vector<int> cover(size_t(dst_f), 0);
    for (int64_t k = 0; k < tl::num_tiles(dst_f, t); ++k) {
      const tl::Span o = tl::tile_span(k, t, dst_f);
      CHECK(o.begin < o.end && o.size() <= t, "empty or oversize tile");
      for (int64_t v = o.begin; v < o.end; ++v) ++cover[size_t(v)];
      const tl::Span win = tl::fwd_window(o, d);
      CHECK(win.begin == tl::fwd_origin(o.begin, d), "fwd origin");
      CHECK(win.size() <= tl::fwd_extent(t, d), "fwd window %lld > extent %lld", (long long)win.size(),
            (long long)tl::fwd_extent(t, d));
      const tl::Span cl = tl::clamp_span(win, d.in);
      CHECK(cl.begin >= 0 && cl.end <= d.in && cl.begin <= cl.end, "clamped window outside the image");
      for (int64_t v = o.begin; v < o.end; ++v)
        for (int64_t i = 0; i < d.k; ++i) {
          const int64_t src = v * d.s - d.pad + i * d.d;
          CHECK(src >= win.begin && src < win.end, "fwd halo misses a read");
          if (tl::in_range(src, d.in)) CHECK(src >= cl.begin && src < cl.end, "clamped window misses a read");
        }
    }
    for (int64_t v = 0; v < dst_f; ++v) CHECK(cover[size_t(v)] == 1, "output %lld covered %d times", (long long)v, cover[size_t(v)]);
    // Gather: tiles cover [0, in); windows span every source a position reads.
    std::vector<int> cg(size_t(dst_g), 0);
    for (int64_t k = 0; k < tl::num_tiles(dst_g, t); ++k) {
      const tl::Span o = tl::tile_span(k, t, dst_g);
      for (int64_t v = o.begin; v < o.end; ++v) ++cg[size_t(v)];
      const tl::Span win = tl::gather_window(o, d);
      CHECK(win.begin == tl::gather_origin(o.begin, d), "gather origin");
      CHECK(win.end >= win.begin, "gather window negative");
      CHECK(win.size() <= tl::gather_extent(t, d), "gather window %lld > extent %lld", (long long)win.size(),
            (long long)tl::gather_extent(t, d));
      const tl::Span cl = tl::clamp_span(win, d.out);
      CHECK(cl.begin >= 0 && cl.end <= d.out, "clamped gather window outside");
      for (int64_t v = o.begin; v < o.end; ++v)
        for (int64_t i = 0; i < d.k; ++i) {
          const int64_t num = v + d.pad - i * d.d;
          if (tl::pos_mod(num, d.s) != 0) continue;
          const int64_t src = tl::floor_div(num, d.s);
          CHECK(src >= win.begin && src < win.end, "gather halo misses a source");
        }
    }
    for (int64_t v = 0; v < dst_g; ++v) CHECK(cg[size_t(v)] == 1, "gather position covered %d times", cg[size_t(v)]);
  }
  return true;
}

static bool check_conv_plan_mapping(const tl::Problem2D& pr, const tl::ConvPlan& pl) {
  const bool CL = pr.channels_last;
  // Thread mapping: each (pixel, channel) of a tile exactly once.
  std::vector<int> seen(size_t(pl.th * pl.tw * pl.cb), 0);
  for (int t = 0; t < kThreads; ++t) {
    const tl::ThreadSlot ts = tl::thread_slot(t, pl.cb, CL);
    CHECK(ts.c >= 0 && ts.c < pl.cb && ts.step * pl.cb == kThreads, "thread_slot");
    for (int r = 0; r < pl.ppt; ++r) {
      const int p = ts.u + r * ts.step;
      if (p < pl.th * pl.tw) ++seen[size_t(p * pl.cb + ts.c)];
    }
    // Pixels beyond ppt must not exist in the tile.
    CHECK(ts.u + pl.ppt * ts.step >= pl.th * pl.tw, "thread %d leaves tile pixels uncovered", t);
  }
  for (size_t k = 0; k < seen.size(); ++k) CHECK(seen[k] == 1, "tile item %zu covered %d times", k, seen[k]);
  // Blocks: each (n, channel group, tile) exactly once; extents hold the windows.
  std::vector<int> bseen(size_t(pl.blocks), 0);
  for (int64_t b = 0; b < pl.blocks; ++b) {
    const tl::BlockTile bt = tl::conv_block(pl, pr, b);
    const int64_t ty = bt.y0 / pl.th, tx = bt.x0 / pl.tw, cg = bt.c0 / pl.cb;
    CHECK(bt.n >= 0 && bt.n < pr.n && ty < pl.tiles_h && tx < pl.tiles_w && cg < pl.cgroups, "block out of range");
    const int64_t id = ((bt.n * pl.cgroups + cg) * pl.tiles_h + ty) * pl.tiles_w + tx;
    ++bseen[size_t(id)];
    const tl::Span oy = tl::tile_span(ty, pl.th, tl::dst_size(pr.y, pl.gather));
    const tl::Span ox = tl::tile_span(tx, pl.tw, tl::dst_size(pr.x, pl.gather));
    const tl::Span wy = pl.gather ? tl::gather_window(oy, pr.y) : tl::fwd_window(oy, pr.y);
    const tl::Span wx = pl.gather ? tl::gather_window(ox, pr.x) : tl::fwd_window(ox, pr.x);
    CHECK(wy.begin == bt.sy0 && wx.begin == bt.sx0, "block origin differs from its window");
    CHECK(wy.size() <= pl.rows && wx.size() <= pl.cols, "window (%lld x %lld) exceeds smem tile (%d x %d)",
          (long long)wy.size(), (long long)wx.size(), pl.rows, pl.cols);
  }
  for (size_t k = 0; k < bseen.size(); ++k) CHECK(bseen[k] == 1, "block id %zu seen %d times", k, bseen[k]);
  return true;
}

// ------------------------------------------------------------------ one problem
struct Shape {
  int64_t n, c, h, w, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr;
  bool cl, tap_major_w;
};

static std::string describe(const Shape& s) {
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "N%lld C%lld %lldx%lld k%lldx%lld s%lldx%lld d%lldx%lld pad(t%lld b%lld l%lld r%lld) %s%s",
                (long long)s.n, (long long)s.c, (long long)s.h, (long long)s.w, (long long)s.kh, (long long)s.kw,
                (long long)s.sh, (long long)s.sw, (long long)s.dh, (long long)s.dw, (long long)s.pt,
                (long long)s.pb, (long long)s.pl, (long long)s.pr, s.cl ? "NHWC" : "NCHW",
                s.tap_major_w ? " w(kh,kw,C)" : "");
  return buf;
}

static tl::Problem2D problem_of(const Shape& s) {
  tl::Problem2D p;
  p.n = s.n;
  p.c = s.c;
  p.y = tl::Dim{s.h, tl::conv_out_size(s.h, s.kh, s.sh, s.dh, s.pt, s.pb), s.kh, s.sh, s.dh, s.pt};
  p.x = tl::Dim{s.w, tl::conv_out_size(s.w, s.kw, s.sw, s.dw, s.pl, s.pr), s.kw, s.sw, s.dw, s.pl};
  p.channels_last = s.cl;
  return p;
}

static const size_t kBudgets[] = {tl::kDefaultSmemBudget, tl::kMaxSmemBudget};

static bool check_plans_fit(const tl::Problem2D& pr, const tl::ConvPlan& pl, size_t budget) {
  if (pl.direct) return true;
  CHECK(tl::conv_plan_valid(pl, budget), "planner returned an invalid plan (ppt %d, cb %d, smem %zu > %zu?)", pl.ppt,
        pl.cb, pl.smem_bytes, budget);
  CHECK(pl.smem_bytes == size_t(pl.in_floats + pl.w_floats) * sizeof(float), "smem bytes");
  CHECK(pl.rows == tl::src_extent(pl.th, pr.y, pl.gather) && pl.cols == tl::src_extent(pl.tw, pr.x, pl.gather),
        "smem extents");
  return true;
}

// Forward plans to emulate: the planner's at each budget, some forced tiles, and
// the direct fallback.
static std::vector<tl::ConvPlan> conv_plans(const tl::Problem2D& pr, bool gather, Rng& rng, bool heavy) {
  std::vector<tl::ConvPlan> plans;
  for (size_t b : kBudgets) {
    plans.push_back(tl::plan_conv(pr, gather, b, 4));
    if (!check_plans_fit(pr, plans.back(), b)) plans.back().th = -1;  // reported; skipped below
  }
  plans.push_back(tl::plan_conv(pr, gather, tl::kDefaultSmemBudget, 2));
  if (!check_plans_fit(pr, plans.back(), tl::kDefaultSmemBudget)) plans.back().th = -1;
  if (!heavy) {
    static const int shapes[][3] = {{1, 1, 1}, {2, 8, 4}, {8, 8, 32}, {16, 16, 1}, {4, 32, 2},
                                    {64, 2, 8}, {3, 5, 1}, {16, 8, 16}, {1, 64, 32}, {7, 1, 8}};
    for (int k = 0; k < 2; ++k) {
      const int* sh = shapes[rng.next() % (sizeof(shapes) / sizeof(shapes[0]))];
      const tl::ConvPlan pl = tl::make_conv_plan(pr, gather, sh[0], sh[1], sh[2]);
      // (Tiny forced tiles on big problems would only make the emulation slow.)
      if (pl.ppt <= tl::kMaxPix && pl.in_floats > 0 && pl.blocks <= 3000) plans.push_back(pl);
    }
  }
  plans.push_back(tl::make_direct_conv_plan(pr, gather));
  // Drop repeats (the budgets often agree on small kernels).
  std::vector<tl::ConvPlan> unique;
  for (const tl::ConvPlan& p : plans) {
    bool dup = false;
    for (const tl::ConvPlan& u : unique)
      dup = dup || (u.direct == p.direct && u.th == p.th && u.tw == p.tw && u.cb == p.cb);
    if (!dup) unique.push_back(p);
  }
  return unique;
}

static bool run_conv_plans(const char* what, const Act& src, const Act& want, const WView& w,
                           const std::vector<float>* bias, const tl::Problem2D& pr, bool gather, Rng& rng,
                           bool heavy) {
  for (const tl::ConvPlan& pl : conv_plans(pr, gather, rng, heavy)) {
    CHECK(pl.th > 0, "%s: the planner returned a plan that does not fit", what);
    Act got(want.n, want.c, want.h, want.w, pr.channels_last);
    std::fill(got.v.begin(), got.v.end(), std::numeric_limits<float>::quiet_NaN());
    bool ok;
    if (pl.direct) {
      ok = emulate_conv_direct(src, got, w, bias, pr, pl);
    } else {
      if (!check_conv_plan_mapping(pr, pl)) return false;
      ok = gather ? emulate_conv_gather_tiled(src, got, w, pr, pl)
                  : emulate_conv_fwd_tiled(src, got, w, bias, pr, pl);
    }
    if (!ok) {
      failf("%s plan th=%d tw=%d cb=%d direct=%d", what, pl.th, pl.tw, pl.cb, int(pl.direct));
      return false;
    }
    char label[160];
    std::snprintf(label, sizeof(label), "%s (plan th=%d tw=%d cb=%d direct=%d)", what, pl.th, pl.tw, pl.cb,
                  int(pl.direct));
    if (!same_act(got, want, label)) return false;
  }
  return true;
}

static bool same_vec(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  CHECK(got.size() == want.size(), "%s: size", what);
  for (size_t k = 0; k < got.size(); ++k)
    CHECK(got[k] == want[k], "%s: element %zu got %g want %g", what, k, double(got[k]), double(want[k]));
  return true;
}

static bool run_problem(const Shape& s, uint64_t seed, bool heavy) {
  const tl::Problem2D pr = problem_of(s);
  CHECK(pr.y.out >= 1 && pr.x.out >= 1, "empty output");
  Rng rng(seed);
  for (const tl::Dim* d : {&pr.y, &pr.x})
    if (!check_tiles_1d(*d)) return false;

  Act x(s.n, s.c, s.h, s.w, s.cl), gy(s.n, s.c, pr.y.out, pr.x.out, s.cl);
  Weight w(s.c, s.kh, s.kw, s.tap_major_w);
  std::vector<float> bias(size_t(s.c));
  fill_ints(x.v, rng, -3, 3);
  fill_ints(gy.v, rng, -3, 3);
  fill_ints(w.v, rng, -2, 2);
  fill_ints(bias, rng, -4, 4);

  // Forward.
  Act y_ref(s.n, s.c, pr.y.out, pr.x.out, s.cl);
  naive_forward(x, w, &bias, y_ref, pr);
  if (!run_conv_plans("forward", x, y_ref, view_of(w, false), &bias, pr, false, rng, heavy)) return false;

  // Backward input: gather (any stride; the kernels use it for stride 2) and,
  // for stride 1, the flipped forward correlation the kernels use there.
  Act gx_ref(s.n, s.c, s.h, s.w, s.cl);
  naive_backward_input(gy, w, gx_ref, pr);
  if (!run_conv_plans("backward_input gather", gy, gx_ref, view_of(w, false), nullptr, pr, true, rng, heavy))
    return false;
  if (pr.y.s == 1 && pr.x.s == 1) {
    const tl::Problem2D fp = tl::flipped_problem(pr);
    CHECK(fp.y.out == s.h && fp.x.out == s.w, "flipped problem output %lldx%lld != input %lldx%lld",
          (long long)fp.y.out, (long long)fp.x.out, (long long)s.h, (long long)s.w);
    CHECK(tl::conv_out_size(fp.y.in, fp.y.k, 1, fp.y.d, fp.y.pad, (s.kh - 1) * s.dh - s.pb) == s.h,
          "flipped output size formula");
    if (!run_conv_plans("backward_input flipped", gy, gx_ref, view_of(w, true), nullptr, fp, false, rng, heavy))
      return false;
  }

  // Backward weight + bias.
  std::vector<float> gw_ref, gb_ref;
  naive_backward_weight(gy, x, gw_ref, gb_ref, pr);
  std::vector<tl::WgradPlan> wplans;
  for (size_t b : kBudgets) {
    const tl::WgradPlan pl = tl::plan_wgrad(pr, b);
    if (!pl.direct) {
      CHECK(tl::wgrad_plan_valid(pr, pl, b), "wgrad planner returned an invalid plan (smem %zu, budget %zu)",
            pl.smem_bytes, b);
    }
    CHECK(pl.scratch_bytes <= size_t(tl::kWgradScratchCap) ||
              pl.chunks == 1,
          "wgrad scratch %zu over the cap", pl.scratch_bytes);
    wplans.push_back(pl);
  }
  if (!heavy) {
    const int cb = int(rng.pick(std::vector<int64_t>{1, 2, 4, 8, 32}));
    // Odd tile sides too (the kernels take any), but not far beyond the output.
    const int th = int(tl::imin(rng.pick(std::vector<int64_t>{1, 3, 4, 8, 16}), tl::pow2_ceil(pr.y.out)));
    const int tw = int(tl::imin(rng.pick(std::vector<int64_t>{1, 2, 5, 8, 16}), tl::pow2_ceil(pr.x.out)));
    const int64_t rk_max = tl::imin(pr.y.k, int64_t(kThreads) * tl::kMaxPairs / (pr.x.k * cb));
    if (rk_max >= 1) {
      const int rk = int(rng.range(1, rk_max));
      wplans.push_back(tl::make_wgrad_plan(pr, th, tw, cb, rk));
    }
  }
  wplans.push_back(tl::make_direct_wgrad_plan(pr));
  std::vector<tl::WgradPlan> unique;
  for (const tl::WgradPlan& p : wplans) {
    bool dup = false;
    for (const tl::WgradPlan& u : unique)
      dup = dup || (u.direct == p.direct && u.th == p.th && u.tw == p.tw && u.cb == p.cb && u.rk == p.rk);
    if (!dup) unique.push_back(p);
  }
  for (const tl::WgradPlan& pl : unique) {
    std::vector<float> gw, gb;
    if (!emulate_wgrad(gy, x, pr, pl, gw, gb)) {
      failf("wgrad plan th=%d tw=%d cb=%d rk=%d direct=%d", pl.th, pl.tw, pl.cb, pl.rk, int(pl.direct));
      return false;
    }
    char label[160];
    std::snprintf(label, sizeof(label), "grad_weight (plan th=%d tw=%d cb=%d rk=%d chunks=%lld direct=%d)", pl.th,
                  pl.tw, pl.cb, pl.rk, (long long)pl.chunks, int(pl.direct));
    if (!same_vec(gw, gw_ref, label)) return false;
    std::snprintf(label, sizeof(label), "grad_bias (plan direct=%d)", int(pl.direct));
    if (!same_vec(gb, gb_ref, label)) return false;
  }
  return true;
}

// ------------------------------------------------------------------ case lists
static int64_t work_of(const Shape& s) {
  const tl::Problem2D p = problem_of(s);
  return s.n * s.c * tl::imax(p.y.out * p.x.out, s.h * s.w) * s.kh * s.kw;
}

static bool legal(const Shape& s) {
  const tl::Problem2D p = problem_of(s);
  return p.y.out >= 1 && p.x.out >= 1;
}

static bool g_timing = false;
static const char* g_only = nullptr;
static void run_case(const Shape& s, uint64_t seed, bool heavy) {
  if (g_only != nullptr && describe(s).find(g_only) == std::string::npos) return;
  begin_case(describe(s));
  const auto t0 = std::chrono::steady_clock::now();
  run_problem(s, seed, heavy);
  if (g_timing)
    std::fprintf(stderr, "%8.3f s  %s\n",
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), g_case.c_str());
  end_case();
}

static bool unit_checks() {
  // Integer helpers.
  for (int64_t a = -20; a <= 20; ++a)
    for (int64_t b = 1; b <= 5; ++b) {
      const double q = double(a) / double(b);
      CHECK(tl::floor_div(a, b) == int64_t(std::floor(q)), "floor_div(%lld, %lld)", (long long)a, (long long)b);
      CHECK(tl::ceil_div(a, b) == int64_t(std::ceil(q)), "ceil_div(%lld, %lld)", (long long)a, (long long)b);
      CHECK(tl::floor_div32(int(a), int(b)) == int(std::floor(q)), "floor_div32");
      CHECK(tl::pos_mod(a, b) >= 0 && tl::pos_mod(a, b) < b && (a - tl::pos_mod(a, b)) % b == 0, "pos_mod");
    }
  CHECK(tl::num_tiles(0, 8) == 0 && tl::num_tiles(1, 8) == 1 && tl::num_tiles(8, 8) == 1 && tl::num_tiles(9, 8) == 2,
        "num_tiles");
  // Shared-memory tiles: smem_coord is the inverse of smem_index, both layouts.
  for (int rows : {1, 3, 7, 66})
    for (int cols : {1, 2, 13, 66})
      for (int cb : {1, 2, 8, 32})
        for (bool cl : {false, true}) {
          const tl::SmemTile st{rows, cols, cb, cl};
          for (int e = 0; e < st.floats(); ++e) {
            const tl::SmemCoord c = tl::smem_coord(st, e);
            CHECK(tl::smem_index(st, c.c, c.r, c.q) == e, "smem bijection");
          }
          CHECK(tl::tap_offset(st, 1, 0) == tl::smem_index(st, 0, 1, 0) - tl::smem_index(st, 0, 0, 0) || rows == 1,
                "tap_offset rows");
        }
  // The 51x51 kernel on a 16x16 output tile would need 66x66 floats per channel:
  // the planner must never hand out such a tile beyond the budget.
  {
    tl::Problem2D pr{8, 96, {56, 56, 51, 1, 1, 25}, {56, 56, 51, 1, 1, 25}, true};
    const tl::ConvPlan big = tl::make_conv_plan(pr, false, 16, 16, 8);
    CHECK(big.smem_bytes > tl::kMaxSmemBudget, "a 51x51 16x16x8 tile should exceed the budget");
    for (size_t b : kBudgets)
      for (bool cl : {false, true}) {
        pr.channels_last = cl;
        const tl::ConvPlan pl = tl::plan_conv(pr, false, b, 4);
        CHECK(!pl.direct && pl.smem_bytes <= b, "51x51 plan must be tiled and fit %zu bytes", b);
        const tl::WgradPlan wp = tl::plan_wgrad(pr, b);
        CHECK(!wp.direct && wp.smem_bytes <= b, "51x51 wgrad plan must be tiled and fit");
      }
  }
  // Huge dilation: no tile fits the default budget -> direct fallback.
  {
    tl::Problem2D pr{1, 4, {9, 9, 63, 1, 2, 62}, {9, 9, 63, 1, 2, 62}, true};
    const tl::ConvPlan pl = tl::plan_conv(pr, false, tl::kDefaultSmemBudget, 4);
    CHECK(pl.direct, "63x63 dilation-2 should fall back to the direct kernel at 48 KB");
    pr.y.d = pr.x.d = 500;  // one kernel row of x needs 31001 floats per channel
    pr.y.pad = pr.x.pad = 15500;
    const tl::WgradPlan wp = tl::plan_wgrad(pr, tl::kMaxSmemBudget);
    CHECK(wp.direct, "63x63 dilation-500 weight grad should fall back to the direct kernel");
  }
  // Realistic shapes: plans exist, fit, and keep ppt <= kMaxPix.
  {
    const int64_t ks[] = {3, 5, 7, 13, 31, 51};
    for (int64_t k : ks)
      for (int64_t s : {1, 2})
        for (int64_t hw : {7, 14, 28, 56, 112})
          for (int64_t c : {3, 64, 96, 768})
            for (bool cl : {false, true}) {
              const int64_t pad = (k - 1) / 2;
              tl::Problem2D pr{32, c, {hw, tl::conv_out_size(hw, k, s, 1, pad, pad), k, s, 1, pad},
                               {hw, tl::conv_out_size(hw, k, s, 1, pad, pad), k, s, 1, pad}, cl};
              for (size_t b : kBudgets) {
                for (bool g : {false, true}) {
                  const tl::ConvPlan pl = tl::plan_conv(pr, g, b, 2);
                  CHECK(pl.direct || tl::conv_plan_valid(pl, b), "plan invalid");
                  CHECK(!pl.direct, "k=%lld plan should be tiled", (long long)k);
                  CHECK(pl.blocks <= int64_t(INT32_MAX), "blocks");
                }
                const tl::WgradPlan wp = tl::plan_wgrad(pr, b);
                CHECK(!wp.direct && tl::wgrad_plan_valid(pr, wp, b), "wgrad plan invalid");
                CHECK(wp.scratch_bytes <= size_t(tl::kWgradScratchCap) || wp.chunks == 1, "wgrad scratch cap");
                CHECK(tl::plan_wgrad(pr, b).scratch_bytes == wp.scratch_bytes, "wgrad plan not deterministic");
              }
            }
  }
  return true;
}

int main(int argc, char** argv) {
  bool quick = false;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--quick") == 0) quick = true;
    if (std::strcmp(argv[a], "--timing") == 0) g_timing = true;
    if (std::strcmp(argv[a], "--only") == 0 && a + 1 < argc) g_only = argv[++a];
  }
  begin_case("unit checks");
  unit_checks();
  end_case();

  // Hand-picked shapes: primes, band kernels, large kernels, pads beyond (k-1)*d.
  const std::vector<Shape> fixed = {
      {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, true, false},
      {1, 3, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, false},
      {2, 5, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, false},
      {2, 5, 7, 7, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, false, true},
      {1, 33, 13, 11, 7, 7, 1, 1, 1, 1, 3, 3, 3, 3, true, true},
      {1, 17, 17, 19, 5, 5, 2, 2, 2, 2, 4, 3, 2, 4, true, false},
      {1, 8, 23, 29, 1, 15, 1, 1, 1, 1, 0, 0, 7, 7, true, false},   // band 1x15
      {1, 8, 29, 23, 15, 1, 1, 2, 1, 1, 7, 7, 0, 0, false, false},  // band 15x1
      {1, 1, 40, 40, 51, 51, 1, 1, 1, 1, 25, 25, 25, 25, true, false},
      {1, 2, 21, 19, 51, 51, 1, 1, 1, 1, 25, 25, 25, 25, false, false},
      {1, 2, 37, 31, 51, 51, 2, 2, 1, 1, 25, 25, 25, 25, false, true},
      {1, 3, 33, 37, 31, 31, 2, 1, 1, 1, 15, 15, 15, 15, true, true},
      {1, 2, 20, 20, 31, 31, 1, 1, 1, 1, 30, 30, 0, 30, false, false},
      {1, 4, 16, 16, 4, 4, 1, 1, 1, 1, 1, 2, 2, 1, true, false},      // even kernel, "same"
      {1, 4, 9, 11, 3, 3, 1, 1, 3, 3, 5, 4, 7, 6, true, false},       // pad > (k-1)*d
      {1, 4, 9, 11, 3, 5, 2, 2, 3, 2, 7, 0, 9, 1, false, false},      // pad > (k-1)*d, stride 2
      {1, 2, 5, 6, 63, 63, 1, 1, 2, 2, 62, 62, 62, 62, true, false},  // direct fallback at 48 KB
      {1, 3, 1, 40, 1, 51, 1, 2, 1, 1, 0, 0, 25, 25, true, false},
      {2, 40, 12, 12, 3, 3, 2, 2, 1, 1, 0, 1, 0, 1, true, false},
      {1, 64, 8, 8, 7, 7, 1, 1, 1, 1, 3, 3, 3, 3, true, false},
      {1, 37, 5, 3, 2, 3, 2, 1, 3, 1, 3, 0, 1, 1, false, true},
  };
  for (size_t k = 0; k < fixed.size(); ++k) run_case(fixed[k], 1000 + k, work_of(fixed[k]) > 3000000);

  // Random sweep with a fixed seed.
  Rng rng(12345);
  const int ncases = quick ? 60 : 240;
  const std::vector<int64_t> sizes = {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 19, 23, 24, 29, 31, 32, 37, 40};
  const std::vector<int64_t> kernels = {1, 1, 2, 3, 3, 3, 4, 5, 5, 7, 7, 9, 11, 13, 15};
  const std::vector<int64_t> chans = {1, 2, 3, 5, 8, 17, 32, 33, 40};
  int made = 0, tries = 0;
  while (made < ncases && tries < ncases * 50) {
    ++tries;
    Shape s{};
    s.n = rng.range(1, 2);
    s.c = rng.pick(chans);
    s.h = rng.pick(sizes);
    s.w = rng.pick(sizes);
    const int band = int(rng.range(0, 5));
    s.kh = rng.pick(kernels);
    s.kw = rng.pick(kernels);
    if (band == 0) s.kh = 1;
    if (band == 1) s.kw = 1;
    if (rng.range(0, 15) == 0) s.kh = s.kw = rng.pick(std::vector<int64_t>{31, 51});
    s.sh = rng.range(1, 2);
    s.sw = rng.range(0, 3) == 0 ? 3 - s.sh : s.sh;
    s.dh = rng.range(1, 3);
    s.dw = rng.range(0, 2) == 0 ? rng.range(1, 3) : s.dh;
    const int64_t mh = (s.kh - 1) * s.dh, mw = (s.kw - 1) * s.dw;
    const int extra = rng.range(0, 7) == 0 ? 2 : 0;  // sometimes pad beyond (k-1)*d
    s.pt = rng.range(0, mh + extra);
    s.pb = rng.range(0, 2) == 0 ? s.pt : rng.range(0, mh + extra);
    s.pl = rng.range(0, mw + extra);
    s.pr = rng.range(0, 2) == 0 ? s.pl : rng.range(0, mw + extra);
    s.cl = rng.range(0, 1) == 1;
    s.tap_major_w = rng.range(0, 1) == 1;
    if (!legal(s)) continue;
    // Keep each case cheap: shrink the channels, then the batch.
    while (work_of(s) > 150000 && s.c > 1) s.c = (s.c + 1) / 2;
    while (work_of(s) > 150000 && s.n > 1) s.n -= 1;
    if (work_of(s) > 1500000) continue;
    run_case(s, 77 + uint64_t(made), false);
    ++made;
  }

  std::printf("dwconv tile math: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
