// Internal: the core's own GEMM kernels (cpu_kernels_gemm.cpp, compiled per instruction set;
// the kernels exist where the instruction set has them). core/blas.cpp routes to them.
#pragma once
#include <cstdint>

namespace fastvis {
namespace core {
namespace avx512 {
// Row-major C[m x n] = A[m x k] B[k x n] + beta C (alpha 1), A with row stride lda, B with
// row stride ldb (B stored [k][n]), C with row stride ldc. Serial, in the calling thread.
void sgemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc);
// The same with A stored transposed: C = A^T B + beta C, A [k][m] with row stride lda (the
// weight gradients' products, k = the tile's pixels).
void sgemm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc);
}  // namespace avx512
}  // namespace core
}  // namespace fastvis
