// Runs the CUDA source of the fused ConvNeXt block on the host: the device code and the
// launch sequences of csrc/ops/convnext_block/cuda/convnext_block_kernels.cuh, compiled
// with a host compiler over the emulated CUDA built-ins of cuda_host_emu.h (256 fibers
// per block, barriers with deadlock detection, warp shuffles, the tensor-core MMA atoms
// emulated warp-collectively, exact float16 / bfloat16 rounding, poisoned shared memory).
//
// For each case the forward output y, D = dL/d(dwconv output) and every parameter
// gradient but the depthwise ones (those come from the depthwise family's kernels) are
// compared with the float64 reference of convnext_block_ref.h on the same 16-bit inputs,
// normwise: max |got - ref| <= tol * max |ref|, tol = 5e-3 (float16) / 3e-2 (bfloat16),
// the tolerances of tests/test_cuda_convnext_block.py. Every case runs twice, threads
// scheduled in ascending and in descending order: the results must be bit-identical
// (a missing barrier would make some thread read data before it is written).
//
// This is an emulation, not a GPU: it checks the kernels' logic, indexing, barriers and
// numerics; not timing, memory ordering beyond barriers, or the hardware's arithmetic.
//
// Build: c++ -std=c++17 -O2 -fno-strict-aliasing -Wno-unknown-pragmas -I csrc -I csrc/include
//        tests/cpp/test_block_cuda_emu.cpp
#include "cuda_host_emu.h"  // before the kernels: the emulated CUDA built-ins

#include "ops/convnext_block/cuda/convnext_block_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "convnext_block_ref.h"

namespace kern = fastvis::cnblock::cuda;
using fastvis::ConvNeXtBlockGrads;
using fastvis::ConvNeXtBlockParams;
using fastvis::ConvNeXtBlockWeights;
using fastvis::DType;
using fastvis::TensorView;

static int g_passed = 0, g_failed = 0;
static bool g_quick = false;

static TensorView view(void* data, DType dt, std::vector<int64_t> shape, std::vector<int64_t> strides) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.device = fastvis::Device{fastvis::DeviceType::CUDA, 0};
  v.ndim = int(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  return v;
}
static std::vector<int64_t> dense(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

struct Half16 {  // storage of one 16-bit tensor and its rounding
  bool bf16;
  uint16_t enc(double v) const { return bf16 ? emu::f2bf(float(v)) : emu::f2h(float(v)); }
  double dec(uint16_t b) const { return bf16 ? emu::bf2f(b) : emu::h2f(b); }
  // Rounds v in place to the 16-bit type and returns its storage.
  std::vector<uint16_t> store(std::vector<double>& v) const {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      out[i] = enc(v[i]);
      v[i] = dec(out[i]);
    }
    return out;
  }
};

struct Aligned {
  std::vector<unsigned char> buf;
  unsigned char* p = nullptr;
  explicit Aligned(size_t bytes) : buf(bytes + 512, 0xFF) {
    p = buf.data();
    while (reinterpret_cast<uintptr_t>(p) % 256) ++p;
  }
};

struct Result {
  std::vector<double> y, d, gw1, gw2, gb1, gb2, gnw, gnb, ggam, ggw, ggb;
};

static bool run_case(const Problem& P, const tl::Plan& p, bool bf16, Result& out, std::string& err) {
  const Half16 h{bf16};
  Problem Q = P;  // values already rounded by the caller
  std::vector<uint16_t> x = h.store(Q.x), dw = h.store(Q.dw), dwb = h.store(Q.dwb), nw = h.store(Q.nw),
                        nb = h.store(Q.nb), w1 = h.store(Q.w1), b1 = h.store(Q.b1), w2 = h.store(Q.w2),
                        b2 = h.store(Q.b2), gam = h.store(Q.gam), gw = h.store(Q.gw), gb = h.store(Q.gb),
                        gy = h.store(Q.gy);
  std::vector<float> ds(Q.ds.begin(), Q.ds.end());
  const tl::Shape& s = P.s;
  const DType dt = bf16 ? DType::BFloat16 : DType::Float16;
  const int64_t C = s.c, Hd = s.hidden, k = s.k;
  const TensorView xv = view(x.data(), dt, {s.n, C, s.h, s.w}, {s.h * s.w * C, 1, s.w * C, C});
  const TensorView gyv = view(gy.data(), dt, {s.n, C, s.h, s.w}, {s.h * s.w * C, 1, s.w * C, C});
  const TensorView dwv = view(dw.data(), dt, {C, 1, k, k}, dense({C, 1, k, k}));
  const TensorView dwbv = view(dwb.data(), dt, {C}, {1}), nwv = view(nw.data(), dt, {C}, {1}),
                   nbv = view(nb.data(), dt, {C}, {1}), b2v = view(b2.data(), dt, {C}, {1}),
                   gamv = view(gam.data(), dt, {C}, {1});
  const TensorView w1v = view(w1.data(), dt, {Hd, C}, {C, 1}), w2v = view(w2.data(), dt, {C, Hd}, {Hd, 1});
  const TensorView b1v = view(b1.data(), dt, {Hd}, {1}), gwv = view(gw.data(), dt, {Hd}, {1}),
                   gbv = view(gb.data(), dt, {Hd}, {1});
  const TensorView dsv = view(ds.data(), DType::Float32, {s.n}, {1});
  ConvNeXtBlockWeights w{&dwv, &dwbv, &nwv,  &nbv, &w1v,                     &b1v,
                         &w2v, &b2v,  &gamv, &dsv, P.grn ? &gwv : nullptr, P.grn ? &gbv : nullptr};
  ConvNeXtBlockParams prm;
  prm.eps = P.eps;
  prm.gelu_tanh = P.tanh_gelu;
  prm.grn_eps = P.grn_eps;
  emu::S().failed = false;

  // forward
  const tl::FwdScratch fs = tl::carve_forward(p, P.grn);
  Aligned fscr(fs.total);
  std::vector<uint16_t> y(size_t(s.n * s.h * s.w * C), 0xFFFF);
  const TensorView yv = view(y.data(), dt, {s.n, C, s.h, s.w}, {s.h * s.w * C, 1, s.w * C, C});
  if (bf16)
    kern::run_forward<kern::BF16>(emu::Launch{}, p, fs, xv, w, prm, yv, fscr.p);
  else
    kern::run_forward<kern::F16>(emu::Launch{}, p, fs, xv, w, prm, yv, fscr.p);
  if (emu::S().failed) {
    err = std::string("forward: ") + emu::S().failure;
    return false;
  }
  out.y.resize(y.size());
  for (size_t i = 0; i < y.size(); ++i) out.y[i] = h.dec(y[i]);

  // backward (no grad_x / depthwise gradients: those are the depthwise family's kernels)
  const tl::BwdScratch bs = tl::carve_backward(p, P.grn, 0);
  Aligned bscr(bs.total);
  std::vector<uint16_t> g_w1(size_t(Hd * C), 0xFFFF), g_w2(size_t(C * Hd), 0xFFFF), g_b1(size_t(Hd), 0xFFFF),
      g_b2(size_t(C), 0xFFFF), g_nw(size_t(C), 0xFFFF), g_nb(size_t(C), 0xFFFF), g_gam(size_t(C), 0xFFFF),
      g_gw(size_t(Hd), 0xFFFF), g_gb(size_t(Hd), 0xFFFF);
  const TensorView gw1v = view(g_w1.data(), dt, {Hd, C}, {C, 1}), gw2v = view(g_w2.data(), dt, {C, Hd}, {Hd, 1});
  const TensorView gb1v = view(g_b1.data(), dt, {Hd}, {1}), gb2v = view(g_b2.data(), dt, {C}, {1}),
                   gnwv = view(g_nw.data(), dt, {C}, {1}), gnbv = view(g_nb.data(), dt, {C}, {1}),
                   ggamv = view(g_gam.data(), dt, {C}, {1}), ggwv = view(g_gw.data(), dt, {Hd}, {1}),
                   ggbv = view(g_gb.data(), dt, {Hd}, {1});
  ConvNeXtBlockGrads g;
  g.fc1_weight = &gw1v;
  g.fc2_weight = &gw2v;
  g.fc1_bias = &gb1v;
  g.fc2_bias = &gb2v;
  g.norm_weight = &gnwv;
  g.norm_bias = &gnbv;
  g.gamma = &ggamv;
  if (P.grn) {
    g.grn_weight = &ggwv;
    g.grn_bias = &ggbv;
  }
  uint16_t* d = bf16 ? kern::run_backward<kern::BF16>(emu::Launch{}, p, bs, gyv, xv, w, prm, g, bscr.p)
                     : kern::run_backward<kern::F16>(emu::Launch{}, p, bs, gyv, xv, w, prm, g, bscr.p);
  if (emu::S().failed) {
    err = std::string("backward: ") + emu::S().failure;
    return false;
  }
  auto dec = [&](const uint16_t* v, size_t n) {
    std::vector<double> r(n);
    for (size_t i = 0; i < n; ++i) r[i] = h.dec(v[i]);
    return r;
  };
  out.d = dec(d, size_t(s.n * s.h * s.w * C));
  out.gw1 = dec(g_w1.data(), g_w1.size());
  out.gw2 = dec(g_w2.data(), g_w2.size());
  out.gb1 = dec(g_b1.data(), g_b1.size());
  out.gb2 = dec(g_b2.data(), g_b2.size());
  out.gnw = dec(g_nw.data(), g_nw.size());
  out.gnb = dec(g_nb.data(), g_nb.size());
  out.ggam = dec(g_gam.data(), g_gam.size());
  out.ggw = dec(g_gw.data(), g_gw.size());
  out.ggb = dec(g_gb.data(), g_gb.size());
  return true;
}

// Normwise error max|got - ref| / max|ref|; NaN when the sizes differ or a value is not finite.
static double normwise(const std::vector<double>& got, const std::vector<double>& ref) {
  if (got.size() != ref.size()) return NAN;
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return NAN;
    err = std::max(err, std::fabs(got[i] - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  return err / scale;
}

struct Case {
  tl::Shape s;
  bool grn, tanh_gelu;
  int force;  // 0: the planner's plan; 1: streamed forward; 2: K chunks of 32
};

static void run(const Case& c, bool bf16, uint64_t seed) {
  char name[256];
  std::snprintf(name, sizeof name, "%s N=%lld C=%lld H=%lld W=%lld k=%lld hidden=%lld%s%s%s",
                bf16 ? "bf16" : "fp16", (long long)c.s.n, (long long)c.s.c, (long long)c.s.h, (long long)c.s.w,
                (long long)c.s.k, (long long)c.s.hidden, c.grn ? " grn" : "", c.tanh_gelu ? " tanh" : "",
                c.force == 1 ? " streamed" : c.force == 2 ? " kc32" : "");
  bool ok_plan = false;
  tl::Plan p = tl::make_plan(c.s, &ok_plan);
  if (c.force == 1 && p.resident) {
    p.resident = false;
    p.kc_fwd = 32;
    p.fwd = tl::fwd_smem(p.cp, 32, false, p.halo_fwd);
  }
  if (c.force == 2) {
    p.kc_bwd = 32;
    p.bwd_dx = tl::bwd_smem(32, true, p.halo_bwd);
    p.bwd_dw = tl::bwd_smem(32, false, p.halo_bwd);
    if (p.resident) {
      p.kc_fwd = 32;
      p.fwd = tl::fwd_smem(p.cp, 32, true, p.halo_fwd);
    }
  }
  Problem P = make_problem(c.s, c.grn, c.tanh_gelu, seed);
  {  // round the inputs once, so the reference sees the kernel's values
    const Half16 h{bf16};
    for (std::vector<double>* v : {&P.x, &P.dw, &P.dwb, &P.nw, &P.nb, &P.w1, &P.b1, &P.w2, &P.b2, &P.gam, &P.gw,
                                   &P.gb, &P.gy})
      h.store(*v);
  }
  const RefOut R = reference(P);
  Result a, b;
  std::string err;
  bool ok = ok_plan;
  emu::set_reverse(false);
  ok = ok && run_case(P, p, bf16, a, err);
  emu::set_reverse(true);
  ok = ok && run_case(P, p, bf16, b, err);
  emu::set_reverse(false);
  const double tol = bf16 ? 3e-2 : 5e-3;
  std::string report;
  if (ok) {
    struct Item {
      const char* name;
      const std::vector<double>* got;
      const std::vector<double>* other;
      const std::vector<double>* ref;
    };
    std::vector<Item> items = {{"y", &a.y, &b.y, &R.y},
                               {"D", &a.d, &b.d, &R.d},
                               {"grad_fc1_weight", &a.gw1, &b.gw1, &R.gw1},
                               {"grad_fc2_weight", &a.gw2, &b.gw2, &R.gw2},
                               {"grad_fc1_bias", &a.gb1, &b.gb1, &R.gb1},
                               {"grad_fc2_bias", &a.gb2, &b.gb2, &R.gb2},
                               {"grad_norm_weight", &a.gnw, &b.gnw, &R.gnw},
                               {"grad_norm_bias", &a.gnb, &b.gnb, &R.gnb},
                               {"grad_gamma", &a.ggam, &b.ggam, &R.ggam}};
    if (c.grn) {
      items.push_back({"grad_grn_weight", &a.ggw, &b.ggw, &R.ggw});
      items.push_back({"grad_grn_bias", &a.ggb, &b.ggb, &R.ggb});
    }
    double worst = 0;
    const char* worst_name = "";
    for (const Item& it : items) {
      const double e = normwise(*it.got, *it.ref);
      if (!(e <= tol)) {
        ok = false;
        char buf[160];
        std::snprintf(buf, sizeof buf, " %s: normwise error %.3g > %.3g;", it.name, e, tol);
        report += buf;
      }
      if (e > worst) {
        worst = e;
        worst_name = it.name;
      }
      bool same = it.got->size() == it.other->size();
      for (size_t i = 0; same && i < it.got->size(); ++i)
        same = (*it.got)[i] == (*it.other)[i] || (std::isnan((*it.got)[i]) && std::isnan((*it.other)[i]));
      if (!same) {
        ok = false;
        report += std::string(" ") + it.name + " differs between thread orders;";
      }
    }
    char buf[160];
    std::snprintf(buf, sizeof buf, " (worst normwise error %.3g in %s, tolerance %.3g)", worst, worst_name, tol);
    report += buf;
  } else {
    report = ok_plan ? " " + err : " no plan";
  }
  if (ok)
    ++g_passed;
  else
    ++g_failed;
  std::printf("%s %s:%s\n", ok ? "ok  " : "FAIL", name, report.c_str());
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--quick") g_quick = true;
  // Shapes reaching every path: resident / streamed forward, one and several column
  // chunks, several hidden and K chunks, hidden not a multiple of 64, partial tiles,
  // images smaller than the kernel, k = 31, GRN, tanh GELU, drop_scale = 0 (sample 1).
  std::vector<Case> cases = {
      {{2, 5, 3, 4, 3, 7}, false, false, 0},   {{3, 9, 5, 6, 7, 70}, true, true, 0},
      {{2, 33, 4, 3, 9, 130}, true, false, 1}, {{1, 130, 5, 3, 3, 70}, false, true, 0},
      {{1, 33, 9, 10, 5, 65}, false, false, 2}, {{2, 130, 3, 5, 1, 64}, true, false, 2},
      {{1, 260, 3, 3, 3, 64}, true, false, 0}, {{1, 16, 10, 9, 31, 40}, false, false, 0},
      // two shapes of tests/test_cuda_convnext_block.py (its tolerances, on its shapes)
      {{2, 96, 14, 14, 7, 384}, false, false, 0}, {{1, 300, 5, 6, 3, 260}, false, false, 0},
  };
  // --quick (the sanitized run): the first three shapes, each in one dtype, alternating.
  // fp16 and bf16 are both 2-byte types through the same kernel template, so the memory
  // accesses a sanitizer checks are the same; the full run checks both dtypes' values.
  if (g_quick) cases.resize(3);
  uint64_t seed = 100;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (!g_quick || i % 2 == 0) run(cases[i], false, seed);
    if (!g_quick || i % 2 == 1) run(cases[i], true, seed);
    ++seed;
  }
  std::printf("%d passed, %d failed (%ld emulated blocks, %ld block barriers)\n", g_passed, g_failed,
              emu::S().blocks_run, emu::S().barriers);
  return g_failed == 0 ? 0 : 1;
}
