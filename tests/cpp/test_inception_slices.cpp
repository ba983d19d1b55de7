// Host test of the Inception op's CUDA dispatch arithmetic (csrc/ops/inception_dwconv/
// slices.h): the CUDA path (cuda/inception_dwconv.cu) runs the depthwise CUDA kernels on
// channel_slice views with the branch_problem parameters and copies the identity channels
// with one 2-D copy described by identity_rect. This program replays exactly that on the
// host -- a depthwise convolution addressing memory only through each view's strides
// (as the CUDA kernels' act_index does) and a cudaMemcpy2D emulation -- for both layouts
// and many shapes, and compares with the Inception convolution computed from logical
// indices. Built with csrc/core/tensor.cpp; run by tests/test_inception_slices_host.py.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "ops/inception_dwconv/slices.h"

using namespace fastvis;
using namespace fastvis::incdw;

namespace {

int failures = 0, checks = 0;

void expect(bool ok, const char* what, int64_t a = 0, int64_t b = 0) {
  ++checks;
  if (!ok) {
    ++failures;
    if (failures < 20) std::printf("FAIL: %s (%lld vs %lld)\n", what, (long long)a, (long long)b);
  }
}

// A dense (N, C, H, W) float64 view of buf in the given layout.
TensorView act_view(std::vector<double>& buf, int64_t n, int64_t c, int64_t h, int64_t w, Layout l) {
  TensorView v;
  v.data = buf.data();
  v.dtype = DType::Float64;
  v.ndim = 4;
  v.shape[0] = n, v.shape[1] = c, v.shape[2] = h, v.shape[3] = w;
  if (l == Layout::NHWC) {
    v.strides[0] = h * w * c, v.strides[1] = 1, v.strides[2] = w * c, v.strides[3] = c;
  } else {
    v.strides[0] = c * h * w, v.strides[1] = h * w, v.strides[2] = w, v.strides[3] = 1;
  }
  return v;
}

double& at(const TensorView& v, int64_t n, int64_t c, int64_t y, int64_t x) {
  return static_cast<double*>(v.data)[n * v.strides[0] + c * v.strides[1] + y * v.strides[2] +
                                      x * v.strides[3]];
}

// What the CUDA forward kernel computes for one branch: a depthwise correlation of the
// source view into the destination view, through their strides only.
void dwconv_views(const TensorView& src, const TensorView& dst, const std::vector<double>& wt,
                  const std::vector<double>& bias, const DepthwiseConv2dShape& s,
                  const DepthwiseConv2dParams& p) {
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t oy = 0; oy < s.oh; ++oy)
        for (int64_t ox = 0; ox < s.ow; ++ox) {
          double acc = bias[c];
          for (int64_t i = 0; i < s.kh; ++i)
            for (int64_t j = 0; j < s.kw; ++j) {
              const int64_t y = oy * p.stride_h - p.pad_top + i * p.dilation_h;
              const int64_t x = ox * p.stride_w - p.pad_left + j * p.dilation_w;
              if (y < 0 || y >= s.h || x < 0 || x >= s.w) continue;
              acc += wt[(c * s.kh + i) * s.kw + j] * at(src, n, c, y, x);
            }
          at(dst, n, c, oy, ox) = acc;
        }
}

// cudaMemcpy2D emulation.
void memcpy2d(void* dst, const void* src, const CopyRect& r) {
  for (int64_t row = 0; row < r.height; ++row)
    std::memcpy(static_cast<char*>(dst) + row * r.pitch_bytes,
                static_cast<const char*>(src) + row * r.pitch_bytes, size_t(r.width_bytes));
}

void run_case(std::mt19937& rng, int64_t n, int64_t c, int64_t g, int64_t h, int64_t w,
              int64_t kh, int64_t kw, int64_t kbw, int64_t kbh, int64_t d, Layout l) {
  std::normal_distribution<double> nd;
  const int64_t total = n * c * h * w;
  std::vector<double> xb(total), yb(total, std::nan(""));
  for (auto& v : xb) v = nd(rng);
  const TensorView x = act_view(xb, n, c, h, w, l), y = act_view(yb, n, c, h, w, l);
  InceptionDWConv2dShape s;
  s.n = n, s.c = c, s.h = h, s.w = w, s.g = g, s.kh = kh, s.kw = kw, s.kbw = kbw, s.kbh = kbh;
  s.layout = l;
  std::vector<double> wts[3], bs[3];
  // The CUDA dispatch, replayed.
  memcpy2d(y.data, x.data, identity_rect(s, 8));
  for (int b = 0; b < 3; ++b) {
    DepthwiseConv2dShape bsh;
    DepthwiseConv2dParams bp;
    branch_problem(s, d, b, &bsh, &bp);
    expect(bsh.oh == h && bsh.ow == w, "branch output keeps the size", bsh.oh, h);
    expect(bp.pad_top == bp.pad_bottom && bp.pad_left == bp.pad_right, "symmetric padding");
    expect((bsh.h + bp.pad_top + bp.pad_bottom - bp.dilation_h * (bsh.kh - 1) - 1) + 1 == h,
           "'same' output height", bsh.h, h);
    wts[b].resize(g * bsh.kh * bsh.kw);
    bs[b].resize(g);
    for (auto& v : wts[b]) v = nd(rng);
    for (auto& v : bs[b]) v = nd(rng);
    const int64_t c0 = branch_c0(c, g, b);
    dwconv_views(channel_slice(x, c0, g), channel_slice(y, c0, g), wts[b], bs[b], bsh, bp);
  }
  // The oracle from logical indices.
  const int64_t cid = c - 3 * g;
  for (int64_t in = 0; in < n; ++in)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t oy = 0; oy < h; ++oy)
        for (int64_t ox = 0; ox < w; ++ox) {
          double ref;
          if (ch < cid) {
            ref = at(x, in, ch, oy, ox);
          } else {
            const int b = int((ch - cid) / g), cc = int((ch - cid) % g);
            const int64_t KH = b == 0 ? kh : b == 1 ? 1 : kbh, KW = b == 0 ? kw : b == 1 ? kbw : 1;
            const int64_t DH = b == 1 ? 1 : d, DW = b == 2 ? 1 : d;
            ref = bs[b][cc];
            for (int64_t i = 0; i < KH; ++i)
              for (int64_t j = 0; j < KW; ++j) {
                const int64_t yy = oy - DH * (KH - 1) / 2 + i * DH, xx = ox - DW * (KW - 1) / 2 + j * DW;
                if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
                ref += wts[b][(cc * KH + i) * KW + j] * at(x, in, ch, yy, xx);
              }
          }
          const double got = at(y, in, ch, oy, ox);
          ++checks;
          if (!(std::fabs(got - ref) <= 1e-12 * (1 + std::fabs(ref)))) {
            ++failures;
            if (failures < 20)
              std::printf("FAIL: n=%lld c=%lld (%lld,%lld) got %g want %g [C=%lld g=%lld %s]\n",
                          (long long)in, (long long)ch, (long long)oy, (long long)ox, got, ref,
                          (long long)c, (long long)g, l == Layout::NHWC ? "nhwc" : "nchw");
          }
        }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> u(0, 1 << 20);
  const int odd[] = {1, 3, 5, 7, 9, 11};
  int cases = 0;
  for (int it = 0; it < 300; ++it) {
    const Layout l = it % 2 ? Layout::NHWC : Layout::NCHW;
    const int64_t d = 1 + u(rng) % 3;
    auto k = [&]() -> int64_t {
      if (d % 2 == 0 && u(rng) % 4 == 0) return 2 + 2 * (u(rng) % 3);  // even with even d
      return odd[u(rng) % 6];
    };
    const int64_t g = 1 + u(rng) % 9, cid = u(rng) % 3 == 0 ? 0 : u(rng) % 12;
    run_case(rng, 1 + u(rng) % 3, cid + 3 * g, g, 1 + u(rng) % 13, 1 + u(rng) % 13, k(), k(), k(),
             k(), d, l);
    ++cases;
  }
  // band_rows: positive, at most h, and >= 16 items when the images allow it.
  for (int64_t n : {1, 2, 8, 64})
    for (int64_t h : {1, 7, 14, 28, 56, 224}) {
      const int64_t rb = band_rows(n, h, h, 96, 4);
      expect(rb >= 1 && rb <= h, "band rows in [1, h]", rb, h);
      const int64_t items = n * ((h + rb - 1) / rb);
      expect(items >= std::min<int64_t>(16, n * h), "enough work items", items, n * h);
    }
  std::printf("%d cases, %d checks, %d failed\n", cases, checks, failures);
  return failures == 0 ? 0 : 1;
}
