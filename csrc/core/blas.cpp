#include "core/blas.h"

#include <cblas.h>  // scipy-openblas32: every symbol prefixed scipy_

#include <climits>
#include <mutex>

#include "fastvis/error.h"

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

std::string blas_config() { return scipy_openblas_get_config(); }

}  // namespace core
}  // namespace fastvis
