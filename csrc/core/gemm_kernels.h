// Internal: the core's own GEMM kernels (cpu_kernels_gemm.cpp, compiled per instruction set;
// the kernels exist where the instruction set has them). core/blas.cpp routes to them.
#pragma once
#include <cstdint>

namespace fastvis {
namespace core {
// Up to this many rows of A, core::gemm sends C = A B^T to sgemm_nt_few (below).
constexpr int64_t kFewRows = 8;
namespace avx512 {
// Row-major C[m x n] = A[m x k] B[k x n] + beta C (alpha 1), A with row stride lda, B with
// row stride ldb (B stored [k][n]), C with row stride ldc. Serial, in the calling thread.
void sgemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc);
// The same with A stored transposed: C = A^T B + beta C, A [k][m] with row stride lda (the
// weight gradients' products, k = the tile's pixels).
void sgemm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc);
// C = A B^T + beta C, B stored [n][k] with row stride ldb: each 64-column panel of B^T
// (KC of k) transposed into a buffer in L2, then the kernel above over it (the training
// forward's products with an nn.Linear weight, where no k-major copy is kept).
void sgemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc);
// C = A B^T + beta C for few rows of A (the kernel reads both along k: dot products, no
// packing), B stored [n][k] with row stride ldb (an nn.Linear weight): the bandwidth-bound
// products of a classifier head at small batch. Any m; meant for m <= kFewRows.
void sgemm_nt_few(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc);
}  // namespace avx512
}  // namespace core
}  // namespace fastvis
