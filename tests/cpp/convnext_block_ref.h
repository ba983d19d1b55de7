// The fused ConvNeXt block in float64, forward and backward, written out directly from
// its definition (include/fastvis/convnext_block.h) -- the oracle of the host tests of the
// CUDA kernels (test_block_tile_math.cpp, test_block_cuda_emu.cpp). Shapes as
// cnblock::tiles::Shape; activations NHWC, weights in nn.Linear / Conv2d layouts.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "ops/convnext_block/block_tile_math.h"

namespace tl = fastvis::cnblock::tiles;

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return uint32_t(s >> 33);
  }
  double uniform() { return (next() + 0.5) / 4294967296.0; }  // (0, 1)
  double normal() { return std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform()); }
  int64_t range(int64_t lo, int64_t hi) { return lo + int64_t(next() % uint64_t(hi - lo + 1)); }
};

inline double gelu_d(double x, bool th) {
  if (th) return 0.5 * x * (1.0 + std::tanh(0.79788456080286535588 * (x + 0.044715 * x * x * x)));
  return 0.5 * x * std::erfc(-x * 0.70710678118654752440);
}
inline double gelu_grad_d(double x, bool th) {
  if (th) {
    const double u = 0.79788456080286535588 * (x + 0.044715 * x * x * x), t = std::tanh(u);
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.79788456080286535588 * (1 + 3 * 0.044715 * x * x);
  }
  return 0.5 * std::erfc(-x * 0.70710678118654752440) + x * 0.39894228040143267794 * std::exp(-0.5 * x * x);
}

// The block's inputs, values in double (the emulation reads them as float).
struct Problem {
  tl::Shape s;
  bool tanh_gelu = false, grn = false, has_gamma = true, has_ds = true;
  double eps = 1e-6, grn_eps = 1e-6;
  std::vector<double> x, dw, dwb, nw, nb, w1, b1, w2, b2, gam, ds, gw, gb, gy;
};

inline Problem make_problem(const tl::Shape& s, bool grn, bool tanh_gelu, uint64_t seed) {
  Problem P;
  P.s = s;
  P.grn = grn;
  P.tanh_gelu = tanh_gelu;
  Rng rng(seed);
  auto fill = [&](std::vector<double>& v, size_t n, double scale, double mean = 0.0) {
    v.resize(n);
    for (double& e : v) e = mean + scale * rng.normal();
  };
  const size_t C = size_t(s.c), H = size_t(s.hidden), px = size_t(s.n * s.h * s.w);
  fill(P.x, px * C, 1.0);
  fill(P.dw, C * size_t(s.k * s.k), 1.0 / double(s.k));
  fill(P.dwb, C, 0.3);
  fill(P.nw, C, 0.2, 1.0);
  fill(P.nb, C, 0.2);
  fill(P.w1, H * C, 1.0 / std::sqrt(double(C)));
  fill(P.b1, H, 0.2);
  fill(P.w2, C * H, 1.0 / std::sqrt(double(H)));
  fill(P.b2, C, 0.2);
  fill(P.gam, C, 0.5, 1.0);
  P.ds.resize(size_t(s.n));
  for (size_t n = 0; n < P.ds.size(); ++n) P.ds[n] = (n % 3 == 1) ? 0.0 : 1.25;
  fill(P.gw, H, 0.5);
  fill(P.gb, H, 0.2);
  fill(P.gy, px * C, 1.0);
  return P;
}

// float64 reference: forward y, D = dL/dt1 and the parameter gradients.
struct RefOut {
  std::vector<double> y, d, gw1, gw2, gb1, gb2, gnw, gnb, ggam, ggw, ggb;
  std::vector<double> mag_y, mag_d;
};
inline RefOut reference(const Problem& P) {
  const tl::Shape& s = P.s;
  const int64_t C = s.c, Hd = s.hidden, k = s.k, px = s.n * s.h * s.w, hw = s.h * s.w;
  std::vector<double> t1(static_cast<size_t>(px * C)), xh(static_cast<size_t>(px * C)),
      t2(static_cast<size_t>(px * C)), rs(static_cast<size_t>(px));
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t y = 0; y < s.h; ++y)
      for (int64_t x = 0; x < s.w; ++x)
        for (int64_t c = 0; c < C; ++c) {
          double a = P.dwb[size_t(c)];
          for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < k; ++j) {
              const int64_t yy = y - k / 2 + i, xx = x - k / 2 + j;
              if (yy < 0 || yy >= s.h || xx < 0 || xx >= s.w) continue;
              a += P.dw[size_t((c * k + i) * k + j)] * P.x[size_t(((n * s.h + yy) * s.w + xx) * C + c)];
            }
          t1[size_t(((n * s.h + y) * s.w + x) * C + c)] = a;
        }
  for (int64_t q = 0; q < px; ++q) {
    double m = 0, v = 0;
    for (int64_t c = 0; c < C; ++c) m += t1[size_t(q * C + c)];
    m /= double(C);
    for (int64_t c = 0; c < C; ++c) v += (t1[size_t(q * C + c)] - m) * (t1[size_t(q * C + c)] - m);
    rs[size_t(q)] = 1.0 / std::sqrt(v / double(C) + P.eps);
    for (int64_t c = 0; c < C; ++c) {
      xh[size_t(q * C + c)] = (t1[size_t(q * C + c)] - m) * rs[size_t(q)];
      t2[size_t(q * C + c)] = xh[size_t(q * C + c)] * P.nw[size_t(c)] + P.nb[size_t(c)];
    }
  }
  std::vector<double> a(size_t(px * Hd)), g(size_t(px * Hd)), z(size_t(px * Hd));
  for (int64_t q = 0; q < px; ++q)
    for (int64_t j = 0; j < Hd; ++j) {
      double v = P.b1[size_t(j)];
      for (int64_t c = 0; c < C; ++c) v += P.w1[size_t(j * C + c)] * t2[size_t(q * C + c)];
      a[size_t(q * Hd + j)] = v;
      g[size_t(q * Hd + j)] = gelu_d(v, P.tanh_gelu);
    }
  std::vector<double> G(size_t(s.n * Hd), 0.0), den(size_t(s.n), 0.0), f(size_t(s.n * Hd), 1.0);
  if (P.grn) {
    for (int64_t n = 0; n < s.n; ++n) {
      double mean = 0;
      for (int64_t j = 0; j < Hd; ++j) {
        double sq = 0;
        for (int64_t q = n * hw; q < (n + 1) * hw; ++q) sq += g[size_t(q * Hd + j)] * g[size_t(q * Hd + j)];
        G[size_t(n * Hd + j)] = std::sqrt(sq);
        mean += std::sqrt(sq);
      }
      den[size_t(n)] = mean / double(Hd) + P.grn_eps;
      for (int64_t j = 0; j < Hd; ++j) f[size_t(n * Hd + j)] = 1.0 + P.gw[size_t(j)] * G[size_t(n * Hd + j)] / den[size_t(n)];
    }
  }
  for (int64_t q = 0; q < px; ++q)
    for (int64_t j = 0; j < Hd; ++j)
      z[size_t(q * Hd + j)] = P.grn ? g[size_t(q * Hd + j)] * f[size_t((q / hw) * Hd + j)] + P.gb[size_t(j)]
                                    : g[size_t(q * Hd + j)];
  RefOut R;
  R.y.resize(size_t(px * C));
  R.mag_y.resize(size_t(px * C));
  std::vector<double> o(size_t(px * C));
  for (int64_t q = 0; q < px; ++q)
    for (int64_t c = 0; c < C; ++c) {
      double v = 0, m = 0;
      for (int64_t j = 0; j < Hd; ++j) {
        v += P.w2[size_t(c * Hd + j)] * z[size_t(q * Hd + j)];
        m += std::fabs(P.w2[size_t(c * Hd + j)] * z[size_t(q * Hd + j)]);
      }
      o[size_t(q * C + c)] = v;
      const double sc = P.ds[size_t(q / hw)] * P.gam[size_t(c)];
      R.y[size_t(q * C + c)] = P.x[size_t(q * C + c)] + sc * (v + P.b2[size_t(c)]);
      R.mag_y[size_t(q * C + c)] = std::fabs(P.x[size_t(q * C + c)]) + std::fabs(sc) * (m + std::fabs(P.b2[size_t(c)]));
    }
  // backward
  std::vector<double> dob(size_t(px * C));
  R.gb2.assign(size_t(C), 0.0);
  R.ggam.assign(size_t(C), 0.0);
  for (int64_t q = 0; q < px; ++q)
    for (int64_t c = 0; c < C; ++c) {
      const double gds = P.gy[size_t(q * C + c)] * P.ds[size_t(q / hw)];
      dob[size_t(q * C + c)] = gds * P.gam[size_t(c)];
      R.gb2[size_t(c)] += dob[size_t(q * C + c)];
      R.ggam[size_t(c)] += gds * (o[size_t(q * C + c)] + P.b2[size_t(c)]);
    }
  R.gw2.assign(size_t(C * Hd), 0.0);
  std::vector<double> dz(size_t(px * Hd), 0.0);
  for (int64_t q = 0; q < px; ++q)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < Hd; ++j) {
        R.gw2[size_t(c * Hd + j)] += dob[size_t(q * C + c)] * z[size_t(q * Hd + j)];
        dz[size_t(q * Hd + j)] += dob[size_t(q * C + c)] * P.w2[size_t(c * Hd + j)];
      }
  std::vector<double> dg = dz;
  R.ggw.assign(size_t(Hd), 0.0);
  R.ggb.assign(size_t(Hd), 0.0);
  if (P.grn) {
    for (int64_t n = 0; n < s.n; ++n) {
      std::vector<double> t(size_t(Hd), 0.0);
      for (int64_t q = n * hw; q < (n + 1) * hw; ++q)
        for (int64_t j = 0; j < Hd; ++j) {
          t[size_t(j)] += dz[size_t(q * Hd + j)] * g[size_t(q * Hd + j)];
          R.ggb[size_t(j)] += dz[size_t(q * Hd + j)];
        }
      double sg = 0;
      for (int64_t j = 0; j < Hd; ++j) {
        R.ggw[size_t(j)] += G[size_t(n * Hd + j)] / den[size_t(n)] * t[size_t(j)];
        sg += P.gw[size_t(j)] * t[size_t(j)] * G[size_t(n * Hd + j)];
      }
      for (int64_t j = 0; j < Hd; ++j) {
        const double Gk = G[size_t(n * Hd + j)];
        const double dG = P.gw[size_t(j)] * t[size_t(j)] / den[size_t(n)] -
                          sg / (den[size_t(n)] * den[size_t(n)] * double(Hd));
        const double u = Gk > 0 ? dG / Gk : 0.0;
        for (int64_t q = n * hw; q < (n + 1) * hw; ++q)
          dg[size_t(q * Hd + j)] = dz[size_t(q * Hd + j)] * f[size_t(n * Hd + j)] + u * g[size_t(q * Hd + j)];
      }
    }
  }
  std::vector<double> da(size_t(px * Hd));
  R.gb1.assign(size_t(Hd), 0.0);
  for (int64_t q = 0; q < px * Hd; ++q) {
    da[size_t(q)] = dg[size_t(q)] * gelu_grad_d(a[size_t(q)], P.tanh_gelu);
    R.gb1[size_t(q % Hd)] += da[size_t(q)];
  }
  R.gw1.assign(size_t(Hd * C), 0.0);
  std::vector<double> dt2(size_t(px * C), 0.0);
  for (int64_t q = 0; q < px; ++q)
    for (int64_t j = 0; j < Hd; ++j)
      for (int64_t c = 0; c < C; ++c) {
        R.gw1[size_t(j * C + c)] += da[size_t(q * Hd + j)] * t2[size_t(q * C + c)];
        dt2[size_t(q * C + c)] += da[size_t(q * Hd + j)] * P.w1[size_t(j * C + c)];
      }
  R.gnw.assign(size_t(C), 0.0);
  R.gnb.assign(size_t(C), 0.0);
  R.d.resize(size_t(px * C));
  R.mag_d.resize(size_t(px * C));
  for (int64_t q = 0; q < px; ++q) {
    double s1 = 0, s2 = 0, m1 = 0;
    for (int64_t c = 0; c < C; ++c) {
      R.gnw[size_t(c)] += dt2[size_t(q * C + c)] * xh[size_t(q * C + c)];
      R.gnb[size_t(c)] += dt2[size_t(q * C + c)];
      const double v = P.nw[size_t(c)] * dt2[size_t(q * C + c)];
      s1 += v;
      s2 += v * xh[size_t(q * C + c)];
      m1 += std::fabs(v);
    }
    s1 /= double(C);
    s2 /= double(C);
    for (int64_t c = 0; c < C; ++c) {
      R.d[size_t(q * C + c)] =
          rs[size_t(q)] * (P.nw[size_t(c)] * dt2[size_t(q * C + c)] - s1 - xh[size_t(q * C + c)] * s2);
      R.mag_d[size_t(q * C + c)] = rs[size_t(q)] * (std::fabs(P.nw[size_t(c)] * dt2[size_t(q * C + c)]) + 2 * m1 / double(C) * (1 + std::fabs(xh[size_t(q * C + c)])));
    }
  }
  return R;
}

