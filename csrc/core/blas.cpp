#include "core/blas.h"

#include <cblas.h>  // scipy-openblas32: every symbol prefixed scipy_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "core/cpu_features.h"
#include "core/gemm_kernels.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"

namespace fastvis {
namespace core {
namespace {

// Makes this OpenBLAS single-threaded, once.
inline void single_threaded_here() {
  static std::once_flag once;
  std::call_once(once, [] { scipy_openblas_set_num_threads(1); });
}

inline blasint to_blas(int64_t v, const char* what) {
  FV_CHECK_VALUE(v >= 0 && v <= INT_MAX, "gemm: ", what, " = ", v,
                 " does not fit the 32-bit BLAS interface");
  return static_cast<blasint>(v);
}

inline CBLAS_TRANSPOSE tr(Op o) { return o == Op::N ? CblasNoTrans : CblasTrans; }

struct Provider {
  FortranSgemm fn = nullptr;
  SetThreadsLocal threads = nullptr;
  std::string name;
};
std::atomic<const Provider*> g_provider{nullptr};

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same call with the
// operands (and their transposes) swapped.
void provider_sgemm(const Provider& p, Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha,
                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                    int64_t ldc) {
  const int M = to_blas(m, "m"), N = to_blas(n, "n"), K = to_blas(k, "k");
  const int LDA = to_blas(lda, "lda"), LDB = to_blas(ldb, "ldb"), LDC = to_blas(ldc, "ldc");
  const char tra = ta == Op::N ? 'N' : 'T', trb = tb == Op::N ? 'N' : 'T';
  const int prev = p.threads ? p.threads(1) : 0;
  p.fn(&trb, &tra, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
  if (p.threads) p.threads(prev);
}

}  // namespace

void set_sgemm_provider(FortranSgemm fn, SetThreadsLocal set_threads_local, const std::string& name) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<Provider>> keep;  // installed providers stay valid
  std::lock_guard<std::mutex> lock(mu);
  if (!fn) {
    g_provider.store(nullptr);
    return;
  }
  auto p = std::make_unique<Provider>();
  p->fn = fn;
  p->threads = set_threads_local;
  p->name = name.empty() ? std::string("custom sgemm") : name;
  // Check: odd sizes, every transpose pair, padded leading dimensions, alpha and beta.
  const int64_t m = 7, n = 5, k = 3, pad = 2;
  std::vector<float> a((m + pad) * (k + pad)), b((k + pad) * (n + pad)), c0(m * (n + pad)), c1;
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>((i * 7 % 11) - 5) * 0.25f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>((i * 5 % 13) - 6) * 0.5f;
  for (size_t i = 0; i < c0.size(); ++i) c0[i] = static_cast<float>(i % 3) - 1.0f;
  for (Op ta : {Op::N, Op::T})
    for (Op tb : {Op::N, Op::T}) {
      const int64_t lda = (ta == Op::N ? k : m) + pad, ldb = (tb == Op::N ? n : k) + pad, ldc = n + pad;
      c1 = c0;
      provider_sgemm(*p, ta, tb, m, n, k, 1.5f, a.data(), lda, b.data(), ldb, 0.5f, c1.data(), ldc);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < ldc; ++j) {
          double want = c0[i * ldc + j];
          if (j < n) {
            double acc = 0;
            for (int64_t t = 0; t < k; ++t)
              acc += double(ta == Op::N ? a[i * lda + t] : a[t * lda + i]) *
                     double(tb == Op::N ? b[t * ldb + j] : b[j * ldb + t]);
            want = 1.5 * acc + 0.5 * want;
          }
          FV_CHECK_RUNTIME(std::fabs(double(c1[i * ldc + j]) - want) <= 1e-4 * (1.0 + std::fabs(want)),
                           "set_sgemm_provider: ", p->name, " computed a wrong product (transa ",
                           ta == Op::N ? 'N' : 'T', ", transb ", tb == Op::N ? 'N' : 'T', ", element (", i,
                           ", ", j, "): ", c1[i * ldc + j], " instead of ", want, "); not installed");
        }
    }
  g_provider.store(p.get());
  keep.push_back(std::move(p));
}

std::string sgemm_provider() {
  const Provider* p = g_provider.load();
  return p ? p->name : std::string("OpenBLAS");
}

bool float_gemm_is_openblas() { return g_provider.load() == nullptr; }

namespace {
std::atomic<int> g_own_mode{-1};  // set_own_gemm: -1 auto, 0 off, 1 on
}  // namespace

bool own_gemm_available() {
#if defined(FV_HAVE_ISA_AVX512)
  return cpu::selected_isa() == cpu::Isa::Avx512;
#else
  return false;
#endif
}

void set_own_gemm(int mode) {
  FV_CHECK_VALUE(mode >= -1 && mode <= 1, "set_own_gemm: expected -1 (auto), 0 (off) or 1 (on), got ", mode);
  FV_CHECK_VALUE(mode != 1 || own_gemm_available(), "set_own_gemm: the core's own GEMM needs the AVX-512 "
                 "path (selected: ", cpu::selected_isa_name(), ")");
  g_own_mode.store(mode);
}

bool own_gemm_active() {
  const int mode = g_own_mode.load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 1;
  return own_gemm_available();
}

void gemm(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if defined(FV_HAVE_ISA_AVX512)
  if (tb == Op::N && alpha == 1.0f && own_gemm_active()) {
    if (ta == Op::N)
      avx512::sgemm_nn(m, n, k, a, lda, b, ldb, beta, c, ldc);
    else
      avx512::sgemm_tn(m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (ta == Op::N && tb == Op::T && alpha == 1.0f && own_gemm_active()) {
    if (m <= kFewRows)
      avx512::sgemm_nt_few(m, n, k, a, lda, b, ldb, beta, c, ldc);
    else
      avx512::sgemm_nt(m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
#endif
  if (const Provider* p = g_provider.load(std::memory_order_acquire)) {
    provider_sgemm(*p, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  single_threaded_here();
  scipy_cblas_sgemm(CblasRowMajor, tr(ta), tr(tb), to_blas(m, "m"), to_blas(n, "n"),
                    to_blas(k, "k"), alpha, a, to_blas(lda, "lda"), b, to_blas(ldb, "ldb"), beta,
                    c, to_blas(ldc, "ldc"));
}

void gemm(Op ta, Op tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  single_threaded_here();
  scipy_cblas_dgemm(CblasRowMajor, tr(ta), tr(tb), to_blas(m, "m"), to_blas(n, "n"),
                    to_blas(k, "k"), alpha, a, to_blas(lda, "lda"), b, to_blas(ldb, "ldb"), beta,
                    c, to_blas(ldc, "ldc"));
}

namespace {

template <class A>
void gemm_split_t(Op ta, Op tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda,
                  const A* b, int64_t ldb, A beta, A* c, int64_t ldc,
                  const std::function<void(int64_t, int64_t)>* epilogue) {
  // Column blocks of a width set by n alone (results do not depend on the thread count):
  // up to 8 blocks, but at least two and, where n allows, 384 columns wide. Narrow blocks
  // of a k-major B run slowly at small m (MKL, 49 x 96 x 3072 with ldb 768: 94 GFLOP/s
  // against 117 for 384 columns; 70 vs 87 with B out of cache).
  auto up16 = [](int64_t v) { return (v + 15) / 16 * 16; };
  const int64_t per = std::max<int64_t>(
      {up16((n + 7) / 8), std::min<int64_t>(384, up16((n + 1) / 2)), 16});
  const int64_t blocks = (n + per - 1) / per;
  if (blocks <= 1) {
    gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    if (epilogue) (*epilogue)(0, n);
    return;
  }
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0; j < b1; ++j) {
      const int64_t j0 = j * per, nj = std::min(n, j0 + per) - j0;
      // op(B)'s columns j0.. : B's columns (no transpose) or rows (transposed).
      const A* bj = tb == Op::N ? b + j0 : b + j0 * ldb;
      gemm(ta, tb, m, nj, k, alpha, a, lda, bj, ldb, beta, c + j0, ldc);
      if (epilogue) (*epilogue)(j0, nj);
    }
  });
}

}  // namespace

void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_split_t<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr);
}
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_split_t<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr);
}
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                const std::function<void(int64_t, int64_t)>& epilogue) {
  gemm_split_t<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, &epilogue);
}
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc,
                const std::function<void(int64_t, int64_t)>& epilogue) {
  gemm_split_t<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, &epilogue);
}

double gemm_gflops(int64_t m, int64_t n, int64_t k, int reps, bool nn) {
  FV_CHECK_VALUE(m > 0 && n > 0 && k > 0 && reps > 0, "gemm_gflops: sizes and reps must be positive");
  std::vector<float> a(static_cast<size_t>(m * k), 1.0f), b(static_cast<size_t>(n * k), 0.5f),
      c(static_cast<size_t>(m * n));
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (nn)
      gemm(Op::N, Op::N, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(), n);
    else
      gemm(Op::N, Op::T, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, c.data(), n);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0) best = std::max(best, 2.0 * double(m) * double(n) * double(k) / dt * 1e-9);
  }
  return best;
}

std::string blas_config() { return scipy_openblas_get_config(); }

}  // namespace core
}  // namespace fastvis
