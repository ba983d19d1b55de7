// The core's own single-precision GEMM for row-major C = op(A) B (+ beta C), op(A) = A or
// A^T, B stored [k][n] (no transpose), and C = A B^T (+ beta C) (sgemm_nt, sgemm_nt_few at
// the end), AVX-512 only: the fused blocks' weight-stationary
// products (fc2 with its k-major weight, fc1 with a k-major copy, the backward's
// dg = do W2 and dt = da W1) and their weight gradients (A^T: the tile's pixels are k). Compiled once per instruction set like the ops' cpu_kernels*.cpp; the
// kernel exists in the avx512 namespace only (core/gemm_kernels.h).
//
// Why not the BLAS: OpenBLAS packs B on every call (a tile GEMM of 49..256 rows against
// a 768 x 3072 weight spends a large part of its time copying the weight), has no API to
// keep a packed weight, and, where the environment holds it to its Haswell kernels
// (OPENBLAS_CORETYPE), runs at half an AVX-512 core's rate.
//
// Scheme: no packing. The register tile is MR = 6 rows x NR = 64 columns (24 zmm
// accumulators, four B vectors and a broadcast a step); per k it loads B's row k of the
// 64-column panel (four contiguous vectors, ldb apart from the next k) and broadcasts
// A[i][k] of its six rows. K is cut into blocks of KC so one panel (KC x 64 floats,
// 64 KB) stays in L2 while every row block of A passes over it; C is read back and
// updated once per K block. A panel's first row block prefetches B's rows 24 ahead into L2
// (the weights of a late stage do not stay in L3 between calls). Column tails run masked
// vectors (any n), row tails smaller MR. The summation order over k is fixed by the shape
// (k ascending within a block, blocks ascending): results do not depend on threads or
// alignment.
#include <algorithm>
#include <cstdint>

#include "core/gemm_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef FV_ISA
#error "FV_ISA must name the instruction-set namespace"
#endif

namespace fastvis {
namespace core {
namespace FV_ISA {

#if defined(__AVX512F__)
namespace {

constexpr int kMR = 6;
constexpr int kNV = 4;  // vectors of 16 floats a row: NR = 64
constexpr int64_t kKC = 256;
// B rows prefetched ahead by a panel's first row block (later ones find it in L2).
// Measured (inception_next_tiny at batch 1, bench/stage_times.py, Zen 5): the last stage
// (49-pixel tiles against 768 x 3072 weights that do not stay in L3 between calls) 3.70 ->
// 3.00 ms; 8 rows ahead 3.46, 16 3.10, 48 3.02, 96 3.13.
constexpr int64_t kPfRows = 24;

// C[0..MR)[0..16 NV) (the last vector masked by `tail`) = (first ? beta C : C) + A B over
// kc steps.
// Accumulators in named registers: with an array of them (of __m512, declared may_alias,
// or of a plain vector type) GCC stored all 24 to the stack on every k step, the array
// being reachable through A's float pointers as far as it could tell (89 GFLOP/s).
#define FV_ACC_ROW(i) __m512 c##i##0, c##i##1, c##i##2, c##i##3;
#define FV_ZERO_ROW(i) c##i##0 = c##i##1 = c##i##2 = c##i##3 = _mm512_setzero_ps();
#define FV_FMA_ROW(i)                                                  \
  if (MR > i) {                                                       \
    const __m512 av = _mm512_set1_ps(TA ? a[p * lda + i] : a[i * lda + p]); \
    c##i##0 = _mm512_fmadd_ps(av, b0, c##i##0);                        \
    if (NV > 1) c##i##1 = _mm512_fmadd_ps(av, b1, c##i##1);            \
    if (NV > 2) c##i##2 = _mm512_fmadd_ps(av, b2, c##i##2);            \
    if (NV > 3) c##i##3 = _mm512_fmadd_ps(av, b3, c##i##3);            \
  }

// C row r's vector v (masked by m) = acc + (first ? beta C : C).
inline void store_acc(float* cp, __m512 acc, __mmask16 m, bool first, float beta) {
  if (!first)
    acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, cp));
  else if (beta != 0.0f)
    acc = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(m, cp), acc);
  _mm512_mask_storeu_ps(cp, m, acc);
}

template <bool TA, bool PF, int MR, int NV>
void micro(int64_t kc, const float* __restrict a, int64_t lda, const float* __restrict b,
           int64_t ldb, float* __restrict c, int64_t ldc, bool first, float beta, __mmask16 tail) {
  FV_ACC_ROW(0) FV_ACC_ROW(1) FV_ACC_ROW(2) FV_ACC_ROW(3) FV_ACC_ROW(4) FV_ACC_ROW(5)
  FV_ZERO_ROW(0) FV_ZERO_ROW(1) FV_ZERO_ROW(2) FV_ZERO_ROW(3) FV_ZERO_ROW(4) FV_ZERO_ROW(5)
  const __mmask16 m0 = NV == 1 ? tail : __mmask16(0xFFFF), m1 = NV == 2 ? tail : __mmask16(0xFFFF),
                  m2 = NV == 3 ? tail : __mmask16(0xFFFF), m3 = NV == 4 ? tail : __mmask16(0xFFFF);
  for (int64_t p = 0; p < kc; ++p) {
    const float* bp = b + p * ldb;
    if (PF && p + kPfRows < kc) {  // the panel's first pass: its rows ahead, into L2
      const char* q = reinterpret_cast<const char*>(bp + kPfRows * ldb);
      for (int v = 0; v < NV; ++v) _mm_prefetch(q + 64 * v, _MM_HINT_T1);
    }
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, bp);
    const __m512 b1 = NV > 1 ? _mm512_maskz_loadu_ps(m1, bp + 16) : b0;
    const __m512 b2 = NV > 2 ? _mm512_maskz_loadu_ps(m2, bp + 32) : b0;
    const __m512 b3 = NV > 3 ? _mm512_maskz_loadu_ps(m3, bp + 48) : b0;
    FV_FMA_ROW(0) FV_FMA_ROW(1) FV_FMA_ROW(2) FV_FMA_ROW(3) FV_FMA_ROW(4) FV_FMA_ROW(5)
  }
#define FV_STORE_ROW(i)                                                      \
  if (MR > i) {                                                             \
    float* cp = c + i * ldc;                                                \
    store_acc(cp, c##i##0, m0, first, beta);                                \
    if (NV > 1) store_acc(cp + 16, c##i##1, m1, first, beta);               \
    if (NV > 2) store_acc(cp + 32, c##i##2, m2, first, beta);               \
    if (NV > 3) store_acc(cp + 48, c##i##3, m3, first, beta);               \
  }
  FV_STORE_ROW(0) FV_STORE_ROW(1) FV_STORE_ROW(2) FV_STORE_ROW(3) FV_STORE_ROW(4) FV_STORE_ROW(5)
#undef FV_STORE_ROW
}
#undef FV_ACC_ROW
#undef FV_ZERO_ROW
#undef FV_FMA_ROW

template <bool TA, bool PF, int NV>
inline void row_block(int mr, int64_t kc, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool first, float beta, __mmask16 tail) {
  switch (mr) {
    case 6: micro<TA, PF, 6, NV>(kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    case 5: micro<TA, PF, 5, NV>(kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    case 4: micro<TA, PF, 4, NV>(kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    case 3: micro<TA, PF, 3, NV>(kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    case 2: micro<TA, PF, 2, NV>(kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    default: micro<TA, PF, 1, NV>(kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
  }
}

template <bool TA, bool PF>
inline void panel(int nv, int mr, int64_t kc, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float* c, int64_t ldc, bool first, float beta, __mmask16 tail) {
  switch (nv) {
    case 4: row_block<TA, PF, 4>(mr, kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    case 3: row_block<TA, PF, 3>(mr, kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    case 2: row_block<TA, PF, 2>(mr, kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
    default: row_block<TA, PF, 1>(mr, kc, a, lda, b, ldb, c, ldc, first, beta, tail); break;
  }
}

// B^T's 64-column panel [j0, j0 + nr) x [k0, k0 + kc) (rows j0.. of B stored [n][k]) into
// buf [kc][64]: what the micro-kernels read for an untransposed B. Blocks of 16 x 16
// transposed in registers; a partial block (the panel's last rows or k's tail) by element.
inline void pack_bt(const float* __restrict b, int64_t ldb, int64_t nr, int64_t kc, float* __restrict buf) {
  int64_t j = 0;
  for (; j + 16 <= nr; j += 16) {
    int64_t p = 0;
    for (; p + 16 <= kc; p += 16) {
      __m512 r[16];
      for (int q = 0; q < 16; ++q) r[q] = _mm512_loadu_ps(b + (j + q) * ldb + p);
      // 16 x 16 transpose: 32-bit, 64-bit, 128-bit and 256-bit interleaves.
      __m512 t[16];
      for (int q = 0; q < 16; q += 2) {
        t[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);
        t[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);
      }
      for (int q = 0; q < 16; q += 4) {
        for (int h = 0; h < 2; ++h) {
          r[q + h] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[q + h]), _mm512_castps_pd(t[q + 2 + h])));
          r[q + 2 + h] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[q + h]), _mm512_castps_pd(t[q + 2 + h])));
        }
      }
      // r[q]: rows q..(q & ~3)+3 interleaved; gather the 128-bit lanes of four rows.
      for (int q = 0; q < 16; q += 8) {
        for (int h = 0; h < 4; ++h) {
          t[q + h] = _mm512_shuffle_f32x4(r[q + h], r[q + 4 + h], 0x88);
          t[q + 4 + h] = _mm512_shuffle_f32x4(r[q + h], r[q + 4 + h], 0xDD);
        }
      }
      for (int h = 0; h < 8; ++h) {
        r[h] = _mm512_shuffle_f32x4(t[h], t[8 + h], 0x88);
        r[8 + h] = _mm512_shuffle_f32x4(t[h], t[8 + h], 0xDD);
      }
      // r[x] now holds column p + perm(x) of rows j..j+15.
      constexpr int perm[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
      for (int x = 0; x < 16; ++x) _mm512_storeu_ps(buf + (p + perm[x]) * 64 + j, r[x]);
    }
    for (; p < kc; ++p)
      for (int q = 0; q < 16; ++q) buf[p * 64 + j + q] = b[(j + q) * ldb + p];
  }
  for (; j < nr; ++j)
    for (int64_t p = 0; p < kc; ++p) buf[p * 64 + j] = b[j * ldb + p];
}

// The blocked loop of every form: K in blocks of KC, 64-column panels, row blocks of MR.
// PACK: B stored [n][k], each panel of B^T transposed into buf first (pack_bt, then read
// from L2 by every row block); else B stored [k][n], read in place, its rows prefetched by
// a panel's first row block.
template <bool TA, bool PACK>
void sgemm_blocks(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // C = beta C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  alignas(64) float buf[PACK ? kKC * 16 * kNV : 16];
  for (int64_t k0 = 0; k0 < k; k0 += kKC) {
    const int64_t kc = std::min(kKC, k - k0);
    const bool first = k0 == 0;
    for (int64_t j0 = 0; j0 < n; j0 += 16 * kNV) {
      const int64_t nr = std::min<int64_t>(16 * kNV, n - j0);
      const int nv = static_cast<int>((nr + 15) / 16);
      const int rem = static_cast<int>(nr - 16 * (nv - 1));
      const __mmask16 tail = static_cast<__mmask16>(rem == 16 ? 0xFFFF : (1u << rem) - 1);
      const float* bp = b + k0 * ldb + j0;
      int64_t ldp = ldb;
      if (PACK) {
        pack_bt(b + j0 * ldb + k0, ldb, nr, kc, buf);
        bp = buf;
        ldp = 16 * kNV;
      }
      for (int64_t i0 = 0; i0 < m; i0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m - i0));
        const float* ap = TA ? a + k0 * lda + i0 : a + i0 * lda + k0;
        float* cp = c + i0 * ldc + j0;
        if (!PACK && i0 == 0)
          panel<TA, true>(nv, mr, kc, ap, lda, bp, ldp, cp, ldc, first, beta, tail);
        else
          panel<TA, false>(nv, mr, kc, ap, lda, bp, ldp, cp, ldc, first, beta, tail);
      }
    }
  }
}

// ------------------------------------------------------------------ few rows, B transposed

// C[i][j] = A[i] . B[j] (+ beta C) for MR <= 4 rows of A and NB <= 4 rows of B, both read
// along k in vectors of 16 (the last one masked): one accumulator per (i, j), each reduced
// once at the end. The summation order depends only on k.
#define FV_DOT_ACC(i) __m512 d##i##0, d##i##1, d##i##2, d##i##3;
#define FV_DOT_ZERO(i) d##i##0 = d##i##1 = d##i##2 = d##i##3 = _mm512_setzero_ps();
#define FV_DOT_FMA(i)                                                \
  if (MR > i) {                                                     \
    const __m512 av = _mm512_maskz_loadu_ps(mk, a + i * lda + p);   \
    d##i##0 = _mm512_fmadd_ps(av, b0, d##i##0);                     \
    if (NB > 1) d##i##1 = _mm512_fmadd_ps(av, b1, d##i##1);         \
    if (NB > 2) d##i##2 = _mm512_fmadd_ps(av, b2, d##i##2);         \
    if (NB > 3) d##i##3 = _mm512_fmadd_ps(av, b3, d##i##3);         \
  }
#define FV_DOT_STORE_ONE(i, j)                                                          \
  {                                                                                   \
    float& out = c[i * ldc + j];                                                      \
    const float v = _mm512_reduce_add_ps(d##i##j);                                    \
    out = beta == 0.0f ? v : v + beta * out;                                          \
  }
#define FV_DOT_STORE(i)                       \
  if (MR > i) {                              \
    FV_DOT_STORE_ONE(i, 0)                   \
    if (NB > 1) FV_DOT_STORE_ONE(i, 1)       \
    if (NB > 2) FV_DOT_STORE_ONE(i, 2)       \
    if (NB > 3) FV_DOT_STORE_ONE(i, 3)       \
  }

// Each step prefetches the same columns of the next block's B rows (into L1): a classifier
// head's weight streams from DRAM (inception_next_tiny's head, (1, 768) x (2304, 768)^T
// on two threads, cache cold: 0.23 -> 0.14 ms; 8 or 16 rows ahead 0.16-0.17).
constexpr int64_t kFewPfRows = 4;
template <int MR, int NB, bool PF = true>
void dots(int64_t k, const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
          float* __restrict c, int64_t ldc, float beta) {
  FV_DOT_ACC(0) FV_DOT_ACC(1) FV_DOT_ACC(2) FV_DOT_ACC(3)
  FV_DOT_ZERO(0) FV_DOT_ZERO(1) FV_DOT_ZERO(2) FV_DOT_ZERO(3)
  for (int64_t p = 0; p < k; p += 16) {
    const int64_t left = k - p;
    const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    if (PF) {  // the same columns of the next block's rows
      const float* q = b + kFewPfRows * ldb + p;
      _mm_prefetch(reinterpret_cast<const char*>(q), _MM_HINT_T0);
      if (NB > 1) _mm_prefetch(reinterpret_cast<const char*>(q + ldb), _MM_HINT_T0);
      if (NB > 2) _mm_prefetch(reinterpret_cast<const char*>(q + 2 * ldb), _MM_HINT_T0);
      if (NB > 3) _mm_prefetch(reinterpret_cast<const char*>(q + 3 * ldb), _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_maskz_loadu_ps(mk, b + p);
    const __m512 b1 = NB > 1 ? _mm512_maskz_loadu_ps(mk, b + ldb + p) : b0;
    const __m512 b2 = NB > 2 ? _mm512_maskz_loadu_ps(mk, b + 2 * ldb + p) : b0;
    const __m512 b3 = NB > 3 ? _mm512_maskz_loadu_ps(mk, b + 3 * ldb + p) : b0;
    FV_DOT_FMA(0) FV_DOT_FMA(1) FV_DOT_FMA(2) FV_DOT_FMA(3)
  }
  FV_DOT_STORE(0) FV_DOT_STORE(1) FV_DOT_STORE(2) FV_DOT_STORE(3)
}
#undef FV_DOT_ACC
#undef FV_DOT_ZERO
#undef FV_DOT_FMA
#undef FV_DOT_STORE_ONE
#undef FV_DOT_STORE

template <int MR>
inline void dots_nb(int nb, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                    int64_t ldc, float beta) {
  switch (nb) {
    case 4: dots<MR, 4>(k, a, lda, b, ldb, c, ldc, beta); break;
    case 3: dots<MR, 3>(k, a, lda, b, ldb, c, ldc, beta); break;
    case 2: dots<MR, 2>(k, a, lda, b, ldb, c, ldc, beta); break;
    default: dots<MR, 1>(k, a, lda, b, ldb, c, ldc, beta); break;
  }
}

}  // namespace

void sgemm_nt_few(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const int nb = static_cast<int>(std::min<int64_t>(4, n - j0));
    const float* bj = b + j0 * ldb;
    for (int64_t i0 = 0; i0 < m; i0 += 4) {  // B's rows stay in L1 for the next rows of A
      const int mr = static_cast<int>(std::min<int64_t>(4, m - i0));
      const float* ai = a + i0 * lda;
      float* cij = c + i0 * ldc + j0;
      switch (mr) {
        case 4: dots_nb<4>(nb, k, ai, lda, bj, ldb, cij, ldc, beta); break;
        case 3: dots_nb<3>(nb, k, ai, lda, bj, ldb, cij, ldc, beta); break;
        case 2: dots_nb<2>(nb, k, ai, lda, bj, ldb, cij, ldc, beta); break;
        default: dots_nb<1>(nb, k, ai, lda, bj, ldb, cij, ldc, beta); break;
      }
    }
  }
}

void sgemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_blocks<false, false>(m, n, k, a, lda, b, ldb, beta, c, ldc);
}
void sgemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_blocks<false, true>(m, n, k, a, lda, b, ldb, beta, c, ldc);
}
void sgemm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_blocks<true, false>(m, n, k, a, lda, b, ldb, beta, c, ldc);
}
#endif  // __AVX512F__

}  // namespace FV_ISA
}  // namespace core
}  // namespace fastvis
