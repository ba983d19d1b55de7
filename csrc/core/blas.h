// Internal: the BLAS the fused blocks call on cache-sized tiles (OpenBLAS from the
// scipy-openblas32 wheel, see third_party/cmake/fastvis_blas.cmake, unless another float
// GEMM is installed with set_sgemm_provider). Row-major GEMMs.
//
// fastvis' own pool provides the parallelism: each GEMM runs single-threaded in the
// calling thread. The first GEMM sets this OpenBLAS to one thread. The setting is
// process-wide for this copy of the library only: the prefixed scipy_openblas32 build is
// not the one NumPy (scipy_openblas64_, another prefix) or SciPy wheels (their own
// bundled copy, another soname) use.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace fastvis {
namespace core {

enum class Op { N, T };

// C[m x n] = alpha * op(A) * op(B) + beta * C, all row-major; op(A) is m x k, op(B) k x n.
void gemm(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(Op ta, Op tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// The same product split into column blocks of op(B) / C whose width depends only on n
// (multiples of 16: up to 8 blocks, but at least two and, where n allows, 384 columns
// wide), computed on fastvis' pool (serially
// when called from inside a parallel region). Each block is one GEMM call whatever the
// thread count, so results do not depend on it.
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// As gemm_split, and after each column block's product, on the thread that computed it,
// epilogue(j0, nj) for C's columns [j0, j0 + nj) (an elementwise pass over the block while
// it is in that core's cache, run in parallel with the other blocks).
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                const std::function<void(int64_t, int64_t)>& epilogue);
void gemm_split(Op ta, Op tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc,
                const std::function<void(int64_t, int64_t)>& epilogue);

// GFLOP/s of one single-threaded float gemm(N, T) (or gemm(N, N) with nn) of m x n x k on
// this thread, best of `reps` calls: the ceiling the fused blocks' tile GEMMs are compared
// with.
double gemm_gflops(int64_t m, int64_t n, int64_t k, int reps, bool nn = false);

// The core's own AVX-512 kernels for float gemm(N, N), gemm(T, N) and gemm(N, T) with
// alpha 1 (core/gemm_kernels.h):
// available where the AVX-512 path is compiled and selected; active by default there
// (mode -1), or forced off (0) / on (1). When active it serves every such product in
// place of the BLAS (or the installed provider).
bool own_gemm_available();
void set_own_gemm(int mode);
bool own_gemm_active();

// "OpenBLAS <version> <core>" as the library reports it.
std::string blas_config();

// Another single-precision GEMM for gemm(float) / gemm_split(float): a Fortran-interface
// sgemm (the reference BLAS signature, 32-bit integers, column-major), e.g. the MKL that
// PyTorch's CPU library carries (fastvis' Python layer installs it; the core links no
// framework). `set_threads_local`, if given, is called with 1 before each GEMM and with its
// return value after (MKL's mkl_set_num_threads_local), so the GEMM runs single-threaded in
// the calling thread as OpenBLAS does. Before installing, a few small products with every
// transpose combination are checked against a plain loop; a mismatch throws and leaves the
// previous provider. fn = nullptr goes back to OpenBLAS. Not to be called while GEMMs run.
using FortranSgemm = void (*)(const char* transa, const char* transb, const int* m, const int* n,
                              const int* k, const float* alpha, const float* a, const int* lda,
                              const float* b, const int* ldb, const float* beta, float* c,
                              const int* ldc);
using SetThreadsLocal = int (*)(int);
void set_sgemm_provider(FortranSgemm fn, SetThreadsLocal set_threads_local, const std::string& name);
// The float GEMM in use: "OpenBLAS" or the name given to set_sgemm_provider.
std::string sgemm_provider();
// True when gemm(float) runs OpenBLAS (no provider installed).
bool float_gemm_is_openblas();

}  // namespace core
}  // namespace fastvis
