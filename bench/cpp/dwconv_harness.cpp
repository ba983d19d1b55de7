// Depthwise convolution in C++ alone, next to a plain memory pass over the same data.
//
// `fastvis bench dwconv --core` times the core through the bindings; this harness calls
// the C API (fastvis/depthwise_conv.h) on buffers allocated once, and alternates every
// timed kernel with a "stream pass" on two std::threads: y = x * x over the same tensors,
// 32-byte loads and stores. The stream pass is what reading the input and writing the
// output costs with no arithmetic; a kernel near it is bound by memory, a kernel far above
// it by its own code. Ratios within one run are what to read: this machine's speed moves.
//
// Build (from the repository root, after the dev build put libfastvis_core.so into
// python/fastvis/lib):
//
//   g++ -O2 -mavx2 -std=c++17 -Icsrc/include bench/cpp/dwconv_harness.cpp
//       -Lpython/fastvis/lib -lfastvis_core -Wl,-rpath,$PWD/python/fastvis/lib -lpthread
//       -o /tmp/dwconv_harness
//
// (one command line). Run: /tmp/dwconv_harness C S N KH KW [REPEATS], e.g.
//   /tmp/dwconv_harness 128 56 8 3 3
// "same" padding, stride 1, float32, NHWC; two core threads, or FV_HARNESS_THREADS.
#include <immintrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "fastvis/depthwise_conv.h"
#include "fastvis/threading.h"
#include "harness_util.h"

using namespace fastvis;

using fastvis_bench::median;
using fastvis_bench::now;

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    std::fprintf(stderr, "usage: %s C S N KH KW [REPEATS]\n", argv[0]);
    return 2;
  }
  const int64_t C = std::atol(argv[1]), S = std::atol(argv[2]), N = std::atol(argv[3]),
                KH = std::atol(argv[4]), KW = std::atol(argv[5]);
  const int R = argc == 7 ? std::atoi(argv[6]) : 21;
  if (C < 1 || S < 1 || N < 1 || KH < 1 || KW < 1 || R < 1 || C % 8) {
    std::fprintf(stderr, "C (a multiple of 8), S, N, KH, KW and REPEATS must be positive\n");
    return 2;
  }
  const char* th = std::getenv("FV_HARNESS_THREADS");
  set_num_threads(th ? std::atoi(th) : 2);
  const int64_t E = N * S * S * C;
  float* x = static_cast<float*>(std::aligned_alloc(64, E * 4));
  float* y = static_cast<float*>(std::aligned_alloc(64, E * 4));
  float* gy = static_cast<float*>(std::aligned_alloc(64, E * 4));
  float* gx = static_cast<float*>(std::aligned_alloc(64, E * 4));
  for (int64_t i = 0; i < E; ++i) x[i] = 0.001f * (i % 997), gy[i] = 0.002f * (i % 991), y[i] = gx[i] = 0;
  std::vector<float> w(C * KH * KW, 0.01f), b(C, 0.1f), gw(C * KH * KW), gb(C);
  const TensorView xv = make_nhwc_view(x, DType::Float32, N, C, S, S);
  const TensorView yv = make_nhwc_view(y, DType::Float32, N, C, S, S);
  const TensorView gyv = make_nhwc_view(gy, DType::Float32, N, C, S, S);
  const TensorView gxv = make_nhwc_view(gx, DType::Float32, N, C, S, S);
  const TensorView wv = make_view(w.data(), DType::Float32, {C, 1, KH, KW});
  const TensorView bv = make_view(b.data(), DType::Float32, {C});
  const TensorView gwv = make_view(gw.data(), DType::Float32, {C, 1, KH, KW});
  const TensorView gbv = make_view(gb.data(), DType::Float32, {C});
  DepthwiseConv2dParams p;
  p.pad_top = (KH - 1) / 2, p.pad_bottom = KH / 2, p.pad_left = (KW - 1) / 2, p.pad_right = KW / 2;
  fastvis_bench::Scratch sf(depthwise_conv2d_forward_scratch_bytes(xv, wv, p));
  fastvis_bench::Scratch si(depthwise_conv2d_backward_input_scratch_bytes(gyv, wv, gxv, p));
  fastvis_bench::Scratch sw(depthwise_conv2d_backward_weight_scratch_bytes(gyv, xv, gwv, p));

  auto stream = [&](int ti) {
    const int64_t h = E / 2 / 8 * 8, lo = ti ? h : 0, hi = ti ? E : h;
    for (int64_t i = lo; i + 8 <= hi; i += 8) {
      const __m256 v = _mm256_load_ps(x + i);
      _mm256_store_ps(y + i, _mm256_mul_ps(v, v));
    }
  };
  auto pass = [&] {
    std::thread th(stream, 1);
    stream(0);
    th.join();
  };
  auto fwd = [&] { depthwise_conv2d_forward(xv, wv, &bv, yv, p, sf.data(), sf.size()); };
  auto bin = [&] { depthwise_conv2d_backward_input(gyv, wv, gxv, p, si.data(), si.size()); };
  auto bwt = [&] { depthwise_conv2d_backward_weight(gyv, xv, gwv, &gbv, p, sw.data(), sw.size()); };
  std::vector<double> tf, ti, tw, ts;
  auto timed = [&](auto&& f, std::vector<double>& out) {
    f();  // settle: the previous candidate's state (caches, idle threads) is not this one's
    const double t0 = now();
    f();
    out.push_back(now() - t0);
  };
  for (int r = 0; r < R; ++r) {
    timed(pass, ts);
    timed(fwd, tf);
    timed(bin, ti);
    timed(bwt, tw);
  }
  const double gf = 2.0 * double(E) * double(KH * KW) * 1e-9;
  std::printf("C=%lld %lldx%lld N=%lld kernel %lldx%lld, medians of %d (min), ms:\n", (long long)C,
              (long long)S, (long long)S, (long long)N, (long long)KH, (long long)KW, R);
  auto row = [&](const char* name, const std::vector<double>& v) {
    std::printf("  %-16s %8.3f (%7.3f)  %6.1f GFLOP/s  %5.2fx the stream pass\n", name, median(v) * 1e3,
                *std::min_element(v.begin(), v.end()) * 1e3, gf / median(v), median(v) / median(ts));
  };
  std::printf("  %-16s %8.3f (%7.3f)\n", "stream pass", median(ts) * 1e3, *std::min_element(ts.begin(), ts.end()) * 1e3);
  row("forward", tf);
  row("backward input", ti);
  row("backward weight", tw);
  return 0;
}
