// The fused ConvNeXt block in C++ alone, against the same GEMMs as plain OpenBLAS calls.
//
// Python, the op layer and the machine's other thread pools all add to what `fastvis bench
// block` measures; this harness times the core's convnext_block_forward / _backward on
// buffers allocated once, and, in the same process and alternating with it, a "GEMM chain"
// of the block's two GEMMs per block (fc1, a ReLU pass, fc2) on two std::threads, each on
// half of the pixels with single-threaded OpenBLAS calls: what the block's GEMMs cost
// without fusion, tiling or anything else. Ratios between the two are what to read; the
// machine's speed moves between runs.
//
// Build (from the repository root, after the dev build put libfastvis_core.so into
// python/fastvis/lib):
//
//   OB=$(python -c "import scipy_openblas32 as s, os; print(os.path.dirname(s.get_lib_dir()))")
//   g++ -O2 -std=c++17 -Icsrc/include -I$OB/include bench/cpp/block_harness.cpp
//       -Lpython/fastvis/lib -lfastvis_core -L$OB/lib -lscipy_openblas
//       -Wl,-rpath,$PWD/python/fastvis/lib:$OB/lib -lpthread -o /tmp/block_harness
//
// (one command line).
//
// Run: /tmp/block_harness C S N BLOCKS   (C channels, S x S pixels, batch N, BLOCKS blocks
// with their own weights, run one after another as in a model stage), e.g.
//   /tmp/block_harness 384 14 1 9
#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "fastvis/convnext_block.h"
#include "fastvis/threading.h"
#include "harness_util.h"

using namespace fastvis;

using fastvis_bench::median;
using fastvis_bench::now;

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s C S N BLOCKS\n", argv[0]);
    return 2;
  }
  const int64_t C = std::atol(argv[1]), S = std::atol(argv[2]), N = std::atol(argv[3]),
                NB = std::atol(argv[4]), H = 4 * C, K = 7;
  if (C < 1 || S < 1 || N < 1 || NB < 1) {
    std::fprintf(stderr, "C, S, N and BLOCKS must be positive\n");
    return 2;
  }
  set_num_threads(2);
  scipy_openblas_set_num_threads(1);
  struct Block {
    std::vector<float> dw, dwb, nw, nb, w1, b1, w2, b2, g;
    std::vector<TensorView> v;
    ConvNeXtBlockWeights w;
  };
  std::vector<Block> bl(static_cast<size_t>(NB));
  for (auto& b : bl) {
    b.dw.assign(C * K * K, 0.01f);
    b.dwb.assign(C, 0.f);
    b.nw.assign(C, 1.f);
    b.nb.assign(C, 0.f);
    b.w1.assign(H * C, 0.01f);
    b.b1.assign(H, 0.f);
    b.w2.assign(C * H, 0.01f);
    b.b2.assign(C, 0.f);
    b.g.assign(C, 1e-3f);
    b.v = {make_view(b.dw.data(), DType::Float32, {C, 1, K, K}), make_view(b.dwb.data(), DType::Float32, {C}),
           make_view(b.nw.data(), DType::Float32, {C}),         make_view(b.nb.data(), DType::Float32, {C}),
           make_view(b.w1.data(), DType::Float32, {H, C}),      make_view(b.b1.data(), DType::Float32, {H}),
           make_view(b.w2.data(), DType::Float32, {C, H}),      make_view(b.b2.data(), DType::Float32, {C}),
           make_view(b.g.data(), DType::Float32, {C})};
    b.w.dw_weight = &b.v[0];
    b.w.dw_bias = &b.v[1];
    b.w.norm_weight = &b.v[2];
    b.w.norm_bias = &b.v[3];
    b.w.fc1_weight = &b.v[4];
    b.w.fc1_bias = &b.v[5];
    b.w.fc2_weight = &b.v[6];
    b.w.fc2_bias = &b.v[7];
    b.w.gamma = &b.v[8];
  }
  const int64_t P = N * S * S;
  std::vector<float> x(P * C, 1.f), y(P * C), gy(P * C, 0.01f), gx(P * C);
  const TensorView xv = make_nhwc_view(x.data(), DType::Float32, N, C, S, S);
  const TensorView yv = make_nhwc_view(y.data(), DType::Float32, N, C, S, S);
  const TensorView gyv = make_nhwc_view(gy.data(), DType::Float32, N, C, S, S);
  const TensorView gxv = make_nhwc_view(gx.data(), DType::Float32, N, C, S, S);
  const ConvNeXtBlockParams prm;
  fastvis_bench::Scratch fsc(convnext_block_forward_scratch_bytes(xv, bl[0].w, prm));
  fastvis_bench::Scratch bsc(convnext_block_backward_scratch_bytes(xv, bl[0].w, prm));
  // Parameter gradients (shared by the blocks: only the time matters here).
  std::vector<float> gdw(C * K * K), gdwb(C), gnw(C), gnb(C), gw1(H * C), gb1(H), gw2(C * H), gb2(C), gg(C);
  const TensorView v_dw = make_view(gdw.data(), DType::Float32, {C, 1, K, K});
  const TensorView v_dwb = make_view(gdwb.data(), DType::Float32, {C});
  const TensorView v_nw = make_view(gnw.data(), DType::Float32, {C});
  const TensorView v_nb = make_view(gnb.data(), DType::Float32, {C});
  const TensorView v_w1 = make_view(gw1.data(), DType::Float32, {H, C});
  const TensorView v_b1 = make_view(gb1.data(), DType::Float32, {H});
  const TensorView v_w2 = make_view(gw2.data(), DType::Float32, {C, H});
  const TensorView v_b2 = make_view(gb2.data(), DType::Float32, {C});
  const TensorView v_g = make_view(gg.data(), DType::Float32, {C});
  ConvNeXtBlockGrads G;
  G.x = &gxv;
  G.dw_weight = &v_dw;
  G.dw_bias = &v_dwb;
  G.norm_weight = &v_nw;
  G.norm_bias = &v_nb;
  G.fc1_weight = &v_w1;
  G.fc1_bias = &v_b1;
  G.fc2_weight = &v_w2;
  G.fc2_bias = &v_b2;
  G.gamma = &v_g;

  // The GEMM chain: two threads, each on half of the pixels.
  const int64_t Ph = (P + 1) / 2;
  std::vector<float> t[2], hb[2];
  for (int i = 0; i < 2; ++i) {
    t[i].assign(Ph * C, 1.f);
    hb[i].assign(Ph * H, 0.f);
  }
  auto chain = [&](int ti) {
    for (auto& b : bl) {
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Ph, H, C, 1, t[ti].data(), C,
                        b.w1.data(), C, 0, hb[ti].data(), H);
      for (auto& v : hb[ti]) v = v > 0 ? v : 0.f;
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Ph, C, H, 1, hb[ti].data(), H,
                        b.w2.data(), H, 0, t[ti].data(), C);
    }
  };

  std::vector<double> fwd, bwd, gem;
  for (int r = 0; r < 11; ++r) {
    double t0 = now();
    for (auto& b : bl) convnext_block_forward(xv, b.w, prm, yv, fsc.data(), fsc.size());
    fwd.push_back(now() - t0);
    t0 = now();
    std::thread th(chain, 1);
    chain(0);
    th.join();
    gem.push_back(now() - t0);
    t0 = now();
    for (auto& b : bl) convnext_block_backward(gyv, xv, b.w, prm, G, bsc.data(), bsc.size());
    bwd.push_back(now() - t0);
  }
  const double gf = 4.0 * double(P) * double(C) * double(H) * double(NB) * 1e-9;  // GEMM GFLOP, forward
  const double f = median(fwd), g = median(gem), b = median(bwd);
  std::printf("C=%lld %lldx%lld N=%lld, %lld block(s), medians of 11, per block:\n", (long long)C,
              (long long)S, (long long)S, (long long)N, (long long)NB);
  std::printf("  fused forward   %8.2f ms  %6.1f GFLOP/s (GEMM FLOPs)\n", f / NB * 1e3, gf / f);
  std::printf("  GEMM chain      %8.2f ms  %6.1f GFLOP/s   fused / chain %.2f\n", g / NB * 1e3, gf / g, f / g);
  std::printf("  fused backward  %8.2f ms  %6.1f GFLOP/s (5 GEMMs: recomputed fc1, 2 weight-, 2 data-gradient)\n",
              b / NB * 1e3, 2.5 * gf / b);
  return 0;
}
