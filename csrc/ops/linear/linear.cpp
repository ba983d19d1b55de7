// The linear op (fastvis/linear.h): argument checks and the split of the product over
// the threads. The arithmetic is core::gemm's (core/blas.h): where the own AVX-512 kernels
// are active, the few-rows kernel for float32 products of up to kFewRows rows and the
// packed-panel one above that; else the BLAS.
#include "fastvis/linear.h"

#include <algorithm>
#include <cstdint>

#include "core/blas.h"
#include "core/gemm_kernels.h"
#include "fastvis/error.h"
#include "fastvis/threading.h"

namespace fastvis {
namespace {

// A 2-D matrix with unit stride along its last dimension.
void check_matrix(const TensorView& t, const TensorView& x, int64_t rows, int64_t cols, const char* name,
                  const char* dims) {
  FV_CHECK_VALUE(t.ndim == 2, "linear: ", name, " must be 2-D ", dims, ", got ", t.describe());
  FV_CHECK_VALUE(t.device.type == DeviceType::CPU, "linear: ", name, " must be on the CPU, got ",
                 t.describe());
  FV_CHECK_TYPE(t.dtype == x.dtype, "linear: ", name, " has dtype ", dtype_name(t.dtype), ", expected ",
                dtype_name(x.dtype), " (x's)");
  FV_CHECK_VALUE((rows < 0 || t.shape[0] == rows) && (cols < 0 || t.shape[1] == cols), "linear: ", name,
                 " must be ", dims, ", got ", t.describe());
  FV_CHECK_VALUE(t.shape[1] <= 1 || t.strides[1] == 1, "linear: ", name,
                 " needs unit stride along its last dimension, got strides (", t.strides[0], ", ",
                 t.strides[1], ")");
  FV_CHECK_VALUE(t.shape[0] <= 1 || t.strides[0] >= t.shape[1], "linear: ", name,
                 " rows overlap: row stride ", t.strides[0], " for ", t.shape[1], " columns");
  FV_CHECK_VALUE(t.numel() == 0 || t.data != nullptr, "linear: ", name, ": null data pointer");
}

template <class T>
void run(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y) {
  const int64_t m = x.shape[0], k = x.shape[1], n = w.shape[0];
  const T* xp = static_cast<const T*>(x.data);
  const T* wp = static_cast<const T*>(w.data);
  T* yp = static_cast<T*>(y.data);
  // Row strides of one-row / one-column matrices may be anything: the kernels need lda >= k.
  const int64_t ldx = m > 1 ? x.strides[0] : std::max<int64_t>(k, 1);
  const int64_t ldw = n > 1 ? w.strides[0] : std::max<int64_t>(k, 1);
  const int64_t ldy = m > 1 ? y.strides[0] : std::max<int64_t>(n, 1);
  // y = bias (then beta = 1) or nothing (beta = 0) over rows [i0, i1) and columns [j0, j1).
  auto fill = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    if (!bias) return;
    const T* bp = static_cast<const T*>(bias->data);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) yp[i * ldy + j] = bp[j * bias->strides[0]];
  };
  const T beta = bias ? T(1) : T(0);
  if (k == 0) {  // no products: y = bias or 0
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) yp[i * ldy + j] = T(0);
    fill(0, m, 0, n);
    return;
  }
  if (m <= core::kFewRows) {
    // Few rows: the product is a stream over the weight; blocks of 64 of its rows, split
    // into contiguous runs per thread.
    constexpr int64_t kCols = 64;
    const int64_t blocks = (n + kCols - 1) / kCols;
    parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
      const int64_t j0 = b0 * kCols, j1 = std::min(n, b1 * kCols);
      fill(0, m, j0, j1);
      core::gemm(core::Op::N, core::Op::T, m, j1 - j0, k, T(1), xp, ldx, wp + j0 * ldw, ldw, beta,
                 yp + j0, ldy);
    });
    return;
  }
  parallel_for(m, 64, [&](int64_t i0, int64_t i1) { fill(i0, i1, 0, n); });  // then the product
  core::gemm_split(core::Op::N, core::Op::T, m, n, k, T(1), xp, ldx, wp, ldw, beta, yp, ldy);
}

}  // namespace

void linear_forward(const TensorView& x, const TensorView& weight, const TensorView* bias,
                    const TensorView& y) {
  FV_CHECK_TYPE(x.dtype == DType::Float32 || x.dtype == DType::Float64,
                "linear: expected float32 or float64, got x ", x.describe());
  check_matrix(x, x, -1, -1, "x", "(M, K)");
  const int64_t m = x.shape[0], k = x.shape[1];
  check_matrix(weight, x, -1, k, "weight", "(N, K) with K = x.shape[1]");
  const int64_t n = weight.shape[0];
  check_matrix(y, x, m, n, "y", "(M, N) = (x.shape[0], weight.shape[0])");
  if (bias) {
    FV_CHECK_VALUE(bias->ndim == 1 && bias->shape[0] == n, "linear: bias must be 1-D (N,) with N = ", n,
                   " (weight.shape[0]), got ", bias->describe());
    FV_CHECK_VALUE(bias->device.type == DeviceType::CPU, "linear: bias must be on the CPU, got ",
                   bias->describe());
    FV_CHECK_TYPE(bias->dtype == x.dtype, "linear: bias has dtype ", dtype_name(bias->dtype), ", expected ",
                  dtype_name(x.dtype), " (x's)");
    FV_CHECK_VALUE(n == 0 || bias->data != nullptr, "linear: bias: null data pointer");
  }
  if (m == 0 || n == 0) return;
  if (x.dtype == DType::Float32)
    run<float>(x, weight, bias, y);
  else
    run<double>(x, weight, bias, y);
}

}  // namespace fastvis
