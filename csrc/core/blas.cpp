#include "core/blas.h"

#include <cblas.h>  // scipy-openblas32: every symbol prefixed scipy_

#include <algorithm>
#include <chrono>
#include <vector>
#include <climits>
#include <mutex>

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

}  // namespace

void gemm(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
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
                  const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  const int64_t per = std::max<int64_t>(64, ((n + 7) / 8 + 15) / 16 * 16);
  const int64_t blocks = (n + per - 1) / per;
  if (blocks <= 1) {
    gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0; j < b1; ++j) {
      const int64_t j0 = j * per, nj = std::min(n, j0 + per) - j0;
      // op(B)'s columns j0.. : B's columns (no transpose) or rows (transposed).
      const A* bj = tb == Op::N ? b + j0 : b + j0 * ldb;
      gemm(ta, tb, m, nj, k, alpha, a, lda, bj, ldb, beta, c + j0, ldc);
    }
  });
}

}  // namespace

void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_split_t<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_split_t<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

double gemm_gflops(int64_t m, int64_t n, int64_t k, int reps) {
  FV_CHECK_VALUE(m > 0 && n > 0 && k > 0 && reps > 0, "gemm_gflops: sizes and reps must be positive");
  std::vector<float> a(static_cast<size_t>(m * k), 1.0f), b(static_cast<size_t>(n * k), 0.5f),
      c(static_cast<size_t>(m * n));
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    gemm(Op::N, Op::T, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, c.data(), n);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0) best = std::max(best, 2.0 * double(m) * double(n) * double(k) / dt * 1e-9);
  }
  return best;
}

std::string blas_config() { return scipy_openblas_get_config(); }

}  // namespace core
}  // namespace fastvis
