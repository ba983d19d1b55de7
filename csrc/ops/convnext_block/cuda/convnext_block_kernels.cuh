// fastvis: the device code of the CUDA fused ConvNeXt block -- kernels, device helpers,
// kernel arguments -- and the host launch sequences, parameterised by a launcher
// (`launch(kernel, grid, shared_bytes, args)`).
//
// Included by cuda/convnext_block.cu (nvcc, with cuda_fp16.h, cuda_bf16.h and CuTe's
// cute/arch/mma_sm80.hpp included first) and by the host emulation
// tests/cpp/test_block_cuda_emu.cpp, which compiles this very source with a host compiler
// after tests/cpp/cuda_host_emu.h has defined the CUDA built-ins it uses (threads as
// cooperative fibers, barriers, shuffles, the 16-bit types, and the two MMA atoms
// emulated warp-collectively). Keep to that vocabulary: threadIdx / blockIdx / gridDim,
// __syncthreads, __syncwarp, __shfl_xor_sync, the __half / __nv_bfloat16 conversions,
// fmaf / erfcf / tanhf / expf / sqrtf, float2 / float4 / uint4, FV_DYNAMIC_SMEM and
// __shared__ arrays, cute::SM80_16x8x16_F32{F16F16,BF16BF16}F32_TN::fma.
//
// All index arithmetic comes from ../block_tile_math.h. See README.md beside this file.
//
// COMPILED, NEVER RUN ON A GPU.
#pragma once
#include <climits>
#include <cstdint>

#include "fastvis/convnext_block.h"
#include "fastvis/error.h"
#include "ops/convnext_block/block_tile_math.h"

#ifndef FV_DYNAMIC_SMEM
#define FV_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastvis {
namespace cnblock {
namespace cuda {
namespace {

namespace tl = ::fastvis::cnblock::tiles;

constexpr int kThreads = tl::kThreads;
constexpr int kM = tl::kM;
constexpr int kNh = tl::kNh;
constexpr int kNc = tl::kNc;
constexpr int kMI = tl::kMI;
constexpr int kNIh = tl::kNIh;
constexpr int kNIc = tl::kNIc;

// Runtime dtype codes of parameters and gradients (read once per element).
enum : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

int dtype_code(DType dt) {
  switch (dt) {
    case DType::Float32: return kF32;
    case DType::Float16: return kF16;
    case DType::BFloat16: return kBF16;
    case DType::Float64: return kF64;
    default: break;
  }
  detail::throw_error(ErrorKind::Type, "convnext_block (CUDA): unsupported dtype ", dtype_name(dt));
}

// ------------------------------------------------------------------ element access
struct F16 {
  using Mma = cute::SM80_16x8x16_F32F16F16F32_TN;
  static __device__ __forceinline__ float to_f(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ uint16_t from_f(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
struct BF16 {
  using Mma = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  static __device__ __forceinline__ float to_f(uint16_t b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ uint16_t from_f(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

__device__ __forceinline__ float load_any(const void* p, int64_t i, int dt) {
  switch (dt) {
    case kF32: return static_cast<const float*>(p)[i];
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<float>(static_cast<const double*>(p)[i]);
  }
}
__device__ __forceinline__ void store_any(void* p, int64_t i, int dt, float v) {
  switch (dt) {
    case kF32: static_cast<float*>(p)[i] = v; break;
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<double*>(p)[i] = v; break;
  }
}

constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kCoef = 0.044715f;
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

__device__ __forceinline__ float gelu_f(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = kSqrt2OverPi * (x + kCoef * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  }
  return 0.5f * x * erfcf(-x * kInvSqrt2);
}
__device__ __forceinline__ float gelu_grad_f(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = kSqrt2OverPi * (x + kCoef * x * x * x);
    const float th = tanhf(u);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kCoef * x * x);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
  }
  return 0.5f * erfcf(-x * kInvSqrt2) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

// Butterfly sums: every lane ends with the same value (a + b == b + a exactly), and the
// order is fixed, so the result is the same run to run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sum over the 8 lanes with the same lane % 4 (the rows g of an MMA fragment).
__device__ __forceinline__ float sum_over_g(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  return v;
}

// ------------------------------------------------------------------ kernel arguments
struct Common {
  tl::Plan p;
  const uint16_t* x;  // [pixels][C], the block input (NHWC dense)
  // packed parameters (see tl::Packed)
  const uint16_t* w1p;
  const uint16_t* w2p;
  const uint16_t* w2t;
  const uint16_t* w1t;
  const float* dww;
  const float* dwb;
  const float* nw;
  const float* nb;
  const float* b1;
  const float* b2;
  const float* gam;
  const float* gw;
  const float* gb;
  const float* ds;
  // GRN factors [N][Hp] (null without GRN, or before the statistics exist)
  const float* grn_f;
  const float* grn_u;
  float eps;
  int tanh_gelu;
};

struct FwdArgs {
  Common cm;
  uint16_t* y;   // [pixels][C]
  float* t12;    // streamed mode: [pixels][Cp]
  float* ows;    // [pixels][Cp] fc2 accumulators (more than one column chunk)
  float* psq;    // GRN statistics phase: [ntiles][Hp]
  int phase;     // 0: GRN statistics (sum of g^2 per tile), 1: output
  int prologue;  // run the depthwise + LayerNorm prologue (streamed mode may skip it)
};

struct BwdArgs {
  Common cm;
  const uint16_t* gy;  // [pixels][C]
  float* xh;           // [pixels][Cp]
  float* rstd;         // [pixels]
  float* dt2;          // [pixels][Cp]
  uint16_t* d;         // [pixels][C]
  float* pnw;
  float* pnb;
  float* ps;   // [ntiles][Cp]
  float* pw1;
  float* pg;   // [runs][Hp][Cp]
  float* pb1;  // [runs][Hp]
  float* psq;
  float* pt;
  float* pdb;  // GRN statistics: [ntiles][Hp]
  int phase;     // bwd_dx: 0 = GRN statistics, 1 = data gradient
  int prologue;  // bwd_dx: run the depthwise + LayerNorm prologue (writes xh, rstd)
};

__device__ __forceinline__ tl::Slot slot_of(const tl::Plan& p, const tl::TileOrigin& o, int s) {
  return tl::tile_slot(p.tg, o, p.h, p.w, s);
}
__device__ __forceinline__ int64_t pix_of(const tl::Plan& p, const tl::TileOrigin& o, const tl::Slot& s) {
  return tl::pixel_index(o.n, s.y, s.x, p.h, p.w);
}

// ------------------------------------------------------------------ tensor-core GEMM
// A K-major operand element pair (row, k), (row, k+1) is one 32-bit word; an MN-major
// one (stored [k][row]) is two 16-bit loads.
template <bool KMajor>
__device__ __forceinline__ uint32_t ld_pair(const uint16_t* P, int ld, int row, int k) {
  if (KMajor) return *reinterpret_cast<const uint32_t*>(P + tl::kmajor_off(row, k, ld));
  return uint32_t(P[tl::mnmajor_off(row, k, ld)]) | (uint32_t(P[tl::mnmajor_off(row, k + 1, ld)]) << 16);
}

// acc[MI][NI] += A[m0 : m0+16*MI][0:kdim] * B[n0 : n0+8*NI][0:kdim]^T for one warp, from
// shared memory, in k-steps of 16 (kdim a multiple of 16).
template <class Tr, int MI, int NI, bool AK, bool BK>
__device__ __forceinline__ void warp_mma(float (&acc)[MI][NI][4], const uint16_t* A, int lda,
                                         const uint16_t* B, int ldb, int kdim, int m0, int n0,
                                         int lane) {
  for (int ks = 0; ks < kdim; ks += 16) {
    uint32_t a[MI][4], b[NI][2];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const tl::FragAB f = tl::frag_a(lane, q);
        a[i][q] = ld_pair<AK>(A, lda, m0 + 16 * i + f.r, ks + f.k);
      }
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const tl::FragAB f = tl::frag_b(lane, q);
        b[j][q] = ld_pair<BK>(B, ldb, n0 + 8 * j + f.r, ks + f.k);
      }
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
        Tr::Mma::fma(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3], a[i][0], a[i][1],
                     a[i][2], a[i][3], b[j][0], b[j][1], acc[i][j][0], acc[i][j][1], acc[i][j][2],
                     acc[i][j][3]);
  }
}

template <int MI, int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
}

// Accumulator pairs (e = 0,1 and e = 2,3 are adjacent columns) from / to fp32 rows:
// rowptr(row) is the row's base (null: skip the row), columns col0 + local column.
template <int NI, class RowF>
__device__ __forceinline__ void acc_load(float (&acc)[kMI][NI][4], const tl::WarpTile& wt, int lane,
                                         int col0, RowF rowptr) {
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const tl::FragC f = tl::acc_coord(wt, lane, i, j, 2 * h);
        const float* row = rowptr(f.r);
        float2 v = make_float2(0.0f, 0.0f);
        if (row) v = *reinterpret_cast<const float2*>(row + col0 + f.c);
        acc[i][j][2 * h] = v.x;
        acc[i][j][2 * h + 1] = v.y;
      }
}
template <int NI, class RowF>
__device__ __forceinline__ void acc_store(const float (&acc)[kMI][NI][4], const tl::WarpTile& wt,
                                          int lane, int col0, RowF rowptr) {
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const tl::FragC f = tl::acc_coord(wt, lane, i, j, 2 * h);
        float* row = rowptr(f.r);
        if (row) *reinterpret_cast<float2*>(row + col0 + f.c) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
}

// Column sums (over the 64 rows) of a 64 x 64 chunk held as kNIh accumulators; v(i, j, e)
// gives the value to sum (0 for rows that do not count). Result in red[which][wm][col]
// for both warp rows; the caller adds the two after a barrier.
template <class ValF>
__device__ __forceinline__ void col_sums_h(const tl::WarpTile& wt, int warp, int lane, float* red,
                                           int which, ValF v) {
#pragma unroll
  for (int j = 0; j < kNIh; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kMI; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r) s += v(i, j, 2 * r + c);
      s = sum_over_g(s);
      if (lane < 4) {
        const tl::FragC f = tl::acc_coord(wt, lane, 0, j, c);
        red[tl::red_index(which, warp % tl::kWarpsM, f.c)] = s;
      }
    }
}

// ------------------------------------------------------------------ staging
// nrows x width (width a multiple of 8) of a packed 16-bit matrix, src at (row0, col0)
// with row stride ld_src, into shared memory rows of stride ld_dst (16-byte vectors).
__device__ __forceinline__ void stage_packed(uint16_t* dst, int ld_dst, const uint16_t* src,
                                             int64_t ld_src, int nrows, int width) {
  const int nv = nrows * (width / 8);
  for (int v = threadIdx.x; v < nv; v += kThreads) {
    const tl::VecCoord vc = tl::vec_coord(v, width);
    *reinterpret_cast<uint4*>(dst + vc.row * ld_dst + vc.col) =
        *reinterpret_cast<const uint4*>(src + vc.row * ld_src + vc.col);
  }
}

// The tile's t2 rows, columns [col0, col0 + width), from the streamed buffer (16-bit t2
// in place of the fp32 rows: row pixel starts at t12 + pixel*Cp floats). Invalid slots: 0.
__device__ __forceinline__ void stage_t12(uint16_t* dst, int ld_dst, const Common& cm, const float* t12,
                                          const tl::TileOrigin& o, int col0, int width) {
  const int nv = kM * (width / 8);
  for (int v = threadIdx.x; v < nv; v += kThreads) {
    const tl::VecCoord vc = tl::vec_coord(v, width);
    const tl::Slot s = slot_of(cm.p, o, vc.row);
    uint4 val = make_uint4(0, 0, 0, 0);
    if (s.valid) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(t12 + pix_of(cm.p, o, s) * cm.p.cp);
      val = *reinterpret_cast<const uint4*>(row + col0 + vc.col);
    }
    *reinterpret_cast<uint4*>(dst + vc.row * ld_dst + vc.col) = val;
  }
}

// t2 = xhat * norm_weight + norm_bias (16-bit) from the fp32 xhat rows. Beyond C, xhat,
// norm_weight and norm_bias are all zero, so the padded columns come out zero.
template <class Tr>
__device__ __forceinline__ void stage_xh(uint16_t* dst, int ld_dst, const Common& cm, const float* xh,
                                         const tl::TileOrigin& o, int col0, int width) {
  const int nv = kM * (width / 8);
  for (int v = threadIdx.x; v < nv; v += kThreads) {
    const tl::VecCoord vc = tl::vec_coord(v, width);
    const tl::Slot s = slot_of(cm.p, o, vc.row);
    uint32_t w[4] = {0, 0, 0, 0};
    if (s.valid) {
      const int c0 = col0 + vc.col;
      const float* row = xh + pix_of(cm.p, o, s) * cm.p.cp + c0;
      const float4 lo = *reinterpret_cast<const float4*>(row);
      const float4 hi = *reinterpret_cast<const float4*>(row + 4);
      const float f[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint16_t e0 = Tr::from_f(f[2 * q] * cm.nw[c0 + 2 * q] + cm.nb[c0 + 2 * q]);
        const uint16_t e1 = Tr::from_f(f[2 * q + 1] * cm.nw[c0 + 2 * q + 1] + cm.nb[c0 + 2 * q + 1]);
        w[q] = uint32_t(e0) | (uint32_t(e1) << 16);
      }
    }
    *reinterpret_cast<uint4*>(dst + vc.row * ld_dst + vc.col) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// grad_y rows (columns [col0, col0 + width), zero beyond C and for invalid slots):
// scaled = true: grad_y * drop_scale * gamma, rounded once (fc2's output gradient);
// scaled = false: grad_y as is.
template <class Tr>
__device__ __forceinline__ void stage_gy(uint16_t* dst, int ld_dst, const Common& cm, const uint16_t* gy,
                                         const tl::TileOrigin& o, float ds, int col0, int width,
                                         bool scaled) {
  const int ne = kM * width;
  const int C = cm.p.c;
  for (int e = threadIdx.x; e < ne; e += kThreads) {
    const tl::VecCoord vc = tl::elem_coord(e, width);
    const int c = col0 + vc.col;
    const tl::Slot s = slot_of(cm.p, o, vc.row);
    uint16_t v = 0;
    if (s.valid && c < C) {
      const uint16_t raw = gy[pix_of(cm.p, o, s) * C + c];
      v = scaled ? Tr::from_f(Tr::to_f(raw) * ds * cm.gam[c]) : raw;
    }
    dst[vc.row * ld_dst + vc.col] = v;
  }
}

// ------------------------------------------------------------------ prologue
// Depthwise convolution of the tile into fp32 rows: row(p) gives slot p's row (null:
// no row, the slot is outside the image in the global-memory modes). Every row gets
// all Cp columns (zero beyond C; zero rows for invalid slots). Channel chunk by chunk:
// the window with its halo and the chunk's weights are staged in shared memory.
template <class Tr, class RowF>
__device__ __forceinline__ void dw_prologue(const Common& cm, const tl::HaloGeom& hg,
                                            const tl::TileOrigin& o, float* stage, RowF row) {
  const tl::Plan& p = cm.p;
  const int k = p.k, cd = hg.cd, C = p.c;
  float* s_x = stage;
  float* s_w = stage + tl::halo_w_offset(hg);
  float* s_b = stage + tl::halo_b_offset(hg);
  const tl::DwThread dt = tl::dw_thread(threadIdx.x, cd);
  int base[tl::kMaxDwPix];
#pragma unroll
  for (int i = 0; i < tl::kMaxDwPix; ++i) {
    const tl::Slot s = slot_of(p, o, tl::dw_slot(dt, i));
    base[i] = (i < dt.npix && tl::dw_slot(dt, i) < p.tg.th * p.tg.tw) ? tl::halo_index(hg, s.ly, s.lx, dt.c)
                                                                        : dt.c;
  }
  for (int c0 = 0; c0 < p.cp; c0 += cd) {
    for (int e = threadIdx.x; e < hg.px_floats; e += kThreads) {
      const tl::HaloCoord hc = tl::halo_coord(hg, e);
      const int yy = tl::halo_y(o, k, hc.r), xx = tl::halo_x(o, k, hc.q), ch = c0 + hc.c;
      float v = 0.0f;
      if (ch < C && yy >= 0 && yy < p.h && xx >= 0 && xx < p.w)
        v = Tr::to_f(cm.x[tl::pixel_index(o.n, yy, xx, p.h, p.w) * C + ch]);
      s_x[e] = v;
    }
    for (int e = threadIdx.x; e < hg.w_floats; e += kThreads) s_w[e] = cm.dww[(e / cd) * p.cp + c0 + e % cd];
    if (int(threadIdx.x) < cd) s_b[threadIdx.x] = cm.dwb[c0 + threadIdx.x];
    __syncthreads();
    float acc[tl::kMaxDwPix];
#pragma unroll
    for (int i = 0; i < tl::kMaxDwPix; ++i) acc[i] = 0.0f;
    if (dt.npix > 0) {
      for (int ti = 0; ti < k; ++ti) {
        for (int tj = 0; tj < k; ++tj) {
          const float wv = s_w[(ti * k + tj) * cd + dt.c];
          const int off = tl::halo_index(hg, ti, tj, 0);
#pragma unroll
          for (int i = 0; i < tl::kMaxDwPix; ++i)
            if (i < dt.npix) acc[i] = fmaf(wv, s_x[base[i] + off], acc[i]);
        }
      }
    }
    const float bias = s_b[dt.c];
#pragma unroll
    for (int i = 0; i < tl::kMaxDwPix; ++i) {
      if (i < dt.npix) {
        const int sl = tl::dw_slot(dt, i);
        float* r = row(sl);
        if (r) r[c0 + dt.c] = slot_of(p, o, sl).valid ? acc[i] + bias : 0.0f;
      }
    }
    __syncthreads();
  }
}

// LayerNorm of the valid slots' fp32 rows in place, one warp per slot. to_t: write the
// 16-bit t2 = xhat * norm_weight + norm_bias over the row (element c at byte 2c of the
// row; each 32-column step reads its floats before any lane writes, and only writes
// bytes of floats already read); otherwise write xhat (fp32) and rstd[pixel].
template <class Tr, bool ToT, class RowF>
__device__ __forceinline__ void ln_rows(const Common& cm, const tl::TileOrigin& o, RowF row, float* rstd_out) {
  const tl::Plan& p = cm.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, C = p.c;
  for (int sl = warp; sl < kM; sl += tl::kWarps) {
    const tl::Slot s = slot_of(p, o, sl);
    if (!s.valid) continue;
    float* r = row(sl);
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += r[c];
    const float mean = warp_sum(sum) / float(C);
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) {
      const float d = r[c] - mean;
      sq += d * d;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(sq) / float(C) + cm.eps);
    for (int c0 = 0; c0 < p.cp; c0 += 32) {
      const int c = c0 + lane;
      const float v = r[c];
      __syncwarp();
      const float xh = c < C ? (v - mean) * rstd : 0.0f;
      if (ToT)
        reinterpret_cast<uint16_t*>(r)[c] = c < C ? Tr::from_f(xh * cm.nw[c] + cm.nb[c]) : uint16_t(0);
      else
        r[c] = xh;
    }
    if (!ToT && lane == 0) rstd_out[pix_of(p, o, s)] = rstd;
  }
}

// ------------------------------------------------------------------ forward
// One CTA per tile. Prologue: depthwise conv + LayerNorm into shared memory (resident
// mode) or into the tile's rows of a global buffer (streamed mode, large C). Then per
// hidden chunk of 64: fc1 (W1 streamed in K chunks) -> bias, GELU (, GRN) -> 16-bit H in
// shared memory -> fc2 into the output columns, chunk by chunk of 128 (W2 streamed);
// with one column chunk the fc2 accumulators stay in registers over the hidden loop,
// with more they are kept in the tile's rows of a global fp32 buffer between chunks.
// The last hidden chunk's epilogue writes y = x + ds * gamma * (o + b2).
// phase 0 (GRN statistics) stops after GELU and writes the tile's column sums of g^2.
template <class Tr>
__global__ void __launch_bounds__(kThreads, 1) cnb_forward(const FwdArgs a) {
  FV_DYNAMIC_SMEM(smem);
  const Common& cm = a.cm;
  const tl::Plan& p = cm.p;
  const int tile = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const tl::TileOrigin o = tl::tile_origin(p.tg, tile);
  const tl::FwdSmem& L = p.fwd;
  const float ds = cm.ds[o.n];
  const int ldf = tl::resident_ldf(p.cp);
  float* res = reinterpret_cast<float*>(smem + L.t);

  if (L.resident) {
    dw_prologue<Tr>(cm, p.halo_fwd, o, reinterpret_cast<float*>(smem + L.u),
                    [&](int sl) -> float* { return res + sl * ldf; });
    ln_rows<Tr, true>(cm, o, [&](int sl) -> float* { return res + sl * ldf; }, nullptr);
    __syncthreads();
  } else if (a.prologue) {
    auto grow = [&](int sl) -> float* {
      const tl::Slot s = slot_of(p, o, sl);
      return s.valid ? a.t12 + pix_of(p, o, s) * p.cp : nullptr;
    };
    dw_prologue<Tr>(cm, p.halo_fwd, o, reinterpret_cast<float*>(smem + L.u), grow);
    ln_rows<Tr, true>(cm, o, grow, nullptr);
    __syncthreads();
  }

  uint16_t* sa = reinterpret_cast<uint16_t*>(smem + L.a);
  uint16_t* sb1 = reinterpret_cast<uint16_t*>(smem + L.b1);
  uint16_t* sb2 = reinterpret_cast<uint16_t*>(smem + L.b2);
  uint16_t* sh = reinterpret_cast<uint16_t*>(smem + L.hbuf);
  float* red = reinterpret_cast<float*>(smem + L.red);
  const uint16_t* A = L.resident ? reinterpret_cast<const uint16_t*>(res) : sa;
  const int lda = L.resident ? 2 * ldf : tl::op_ld(p.kc_fwd);
  const int ldk = tl::op_ld(p.kc_fwd), ldh = tl::op_ld(kNh);
  const tl::WarpTile wth = tl::warp_tile(warp, kNh), wtc = tl::warp_tile(warp, kNc);
  const int nk = tl::num_chunks(p.cp, p.kc_fwd);
  const bool grn = cm.grn_f != nullptr;
  auto orow = [&](int r) -> float* {
    const tl::Slot s = slot_of(p, o, r);
    return s.valid ? a.ows + pix_of(p, o, s) * p.cp : nullptr;
  };

  float acc_o[kMI][kNIc][4];
  zero_acc(acc_o);
  for (int hc = 0; hc < p.n_hc; ++hc) {
    float acc_h[kMI][kNIh][4];
    zero_acc(acc_h);
    for (int ki = 0; ki < nk; ++ki) {
      const tl::Span ks = tl::chunk_span(ki, p.kc_fwd, p.cp);
      if (!L.resident) stage_t12(sa, ldk, cm, a.t12, o, int(ks.begin), int(ks.size()));
      stage_packed(sb1, ldk, cm.w1p + int64_t(hc) * kNh * p.cp + ks.begin, p.cp, kNh, int(ks.size()));
      __syncthreads();
      warp_mma<Tr, kMI, kNIh, true, true>(acc_h, L.resident ? A + ks.begin : A, lda, sb1, ldk,
                                          int(ks.size()), wth.m0, wth.n0, lane);
      __syncthreads();
    }
    // bias + GELU (+ GRN) of the chunk
#pragma unroll
    for (int i = 0; i < kMI; ++i)
#pragma unroll
      for (int j = 0; j < kNIh; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const tl::FragC f = tl::acc_coord(wth, lane, i, j, e);
          const int jg = hc * kNh + f.c;
          const float g = gelu_f(acc_h[i][j][e] + cm.b1[jg], cm.tanh_gelu != 0);
          acc_h[i][j][e] = slot_of(p, o, f.r).valid ? g : 0.0f;
        }
    if (a.phase == 0) {
      col_sums_h(wth, warp, lane, red, 0,
                 [&](int i, int j, int e) { return acc_h[i][j][e] * acc_h[i][j][e]; });
      __syncthreads();
      if (threadIdx.x < kNh)
        a.psq[tl::tpart_index(tile, hc * kNh + threadIdx.x, p.hp)] =
            red[tl::red_index(0, 0, threadIdx.x)] + red[tl::red_index(0, 1, threadIdx.x)];
      __syncthreads();
      continue;
    }
#pragma unroll
    for (int i = 0; i < kMI; ++i)
#pragma unroll
      for (int j = 0; j < kNIh; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const tl::FragC f = tl::acc_coord(wth, lane, i, j, e);
          const int jg = hc * kNh + f.c;
          float z = acc_h[i][j][e];
          if (grn) z = z * cm.grn_f[o.n * int64_t(p.hp) + jg] + cm.gb[jg];
          sh[f.r * ldh + f.c] = slot_of(p, o, f.r).valid ? Tr::from_f(z) : uint16_t(0);
        }
    const bool last = hc == p.n_hc - 1;
    for (int cc = 0; cc < p.n_cc; ++cc) {
      const int col0 = cc * kNc;
      const int rows = int(tl::imin(kNc, p.cp - col0));
      stage_packed(sb2, ldh, cm.w2p + int64_t(col0) * p.hp + hc * kNh, p.hp, rows, kNh);
      const bool active = col0 + wtc.n0 < p.cp;
      if (p.n_cc > 1) {
        if (hc == 0)
          zero_acc(acc_o);
        else if (active)
          acc_load(acc_o, wtc, lane, col0, orow);
      }
      __syncthreads();
      if (active) warp_mma<Tr, kMI, kNIc, true, true>(acc_o, sh, ldh, sb2, ldh, kNh, wtc.m0, wtc.n0, lane);
      __syncthreads();
      if (!active) continue;
      if (last) {
#pragma unroll
        for (int i = 0; i < kMI; ++i)
#pragma unroll
          for (int j = 0; j < kNIc; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const tl::FragC f = tl::acc_coord(wtc, lane, i, j, e);
              const int c = col0 + f.c;
              const tl::Slot s = slot_of(p, o, f.r);
              if (s.valid && c < p.c) {
                const int64_t at = pix_of(p, o, s) * p.c + c;
                a.y[at] = Tr::from_f(Tr::to_f(cm.x[at]) + ds * cm.gam[c] * (acc_o[i][j][e] + cm.b2[c]));
              }
            }
      } else if (p.n_cc > 1) {
        acc_store(acc_o, wtc, lane, col0, orow);
      }
    }
  }
}

// ------------------------------------------------------------------ backward
// The K loop shared by both backward kernels for hidden chunk hc:
//   acc_a  = t2 W1[hc]^T            (t2 = xhat * nw + nb, staged from the fp32 xhat rows)
//   acc_dz = (dy ds gamma) W2[:,hc]  (fc2's input gradient, before GRN)
template <class Tr>
__device__ __forceinline__ void bwd_kloop(const Common& cm, const BwdArgs& a, const tl::BwdSmem& L,
                                          unsigned char* smem, const tl::TileOrigin& o, float ds, int hc,
                                          const tl::WarpTile& wth, int lane,
                                          float (&acc_a)[kMI][kNIh][4], float (&acc_dz)[kMI][kNIh][4]) {
  const tl::Plan& p = cm.p;
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem + L.a);
  uint16_t* sdy = reinterpret_cast<uint16_t*>(smem + L.ady);
  uint16_t* sb1 = reinterpret_cast<uint16_t*>(smem + L.b1);
  uint16_t* sb2 = reinterpret_cast<uint16_t*>(smem + L.b2);
  const int ldk = tl::op_ld(p.kc_bwd);
  zero_acc(acc_a);
  zero_acc(acc_dz);
  const int nk = tl::num_chunks(p.cp, p.kc_bwd);
  for (int ki = 0; ki < nk; ++ki) {
    const tl::Span ks = tl::chunk_span(ki, p.kc_bwd, p.cp);
    const int kw = int(ks.size());
    stage_xh<Tr>(sa, ldk, cm, a.xh, o, int(ks.begin), kw);
    stage_gy<Tr>(sdy, ldk, cm, a.gy, o, ds, int(ks.begin), kw, true);
    stage_packed(sb1, ldk, cm.w1p + int64_t(hc) * kNh * p.cp + ks.begin, p.cp, kNh, kw);
    stage_packed(sb2, ldk, cm.w2t + int64_t(hc) * kNh * p.cp + ks.begin, p.cp, kNh, kw);
    __syncthreads();
    warp_mma<Tr, kMI, kNIh, true, true>(acc_a, sa, ldk, sb1, ldk, kw, wth.m0, wth.n0, lane);
    warp_mma<Tr, kMI, kNIh, true, true>(acc_dz, sdy, ldk, sb2, ldk, kw, wth.m0, wth.n0, lane);
    __syncthreads();
  }
}

// dL/da of the chunk from the K loop's accumulators (acc_a becomes a, then g):
//   g = gelu(a);  dg = dz (* f + u * g with GRN);  da = dg * gelu'(a)   (0 for invalid slots)
// also returns z (GRN output, or g) in acc_z when wanted.
template <class Tr, bool WantZ>
__device__ __forceinline__ void bwd_chunk_grads(const Common& cm, const tl::TileOrigin& o, int hc,
                                                const tl::WarpTile& wth, int lane,
                                                float (&acc_a)[kMI][kNIh][4],
                                                float (&acc_dz)[kMI][kNIh][4],
                                                float (&acc_z)[kMI][kNIh][4]) {
  const tl::Plan& p = cm.p;
  const bool grn = cm.grn_f != nullptr, th = cm.tanh_gelu != 0;
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < kNIh; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const tl::FragC f = tl::acc_coord(wth, lane, i, j, e);
        const int jg = hc * kNh + f.c;
        const float av = acc_a[i][j][e] + cm.b1[jg];
        const float g = gelu_f(av, th);
        float dg = acc_dz[i][j][e];
        float z = g;
        if (grn) {
          const int64_t at = o.n * int64_t(p.hp) + jg;
          dg = dg * cm.grn_f[at] + cm.grn_u[at] * g;
          z = g * cm.grn_f[at] + cm.gb[jg];
        }
        const bool valid = slot_of(p, o, f.r).valid;
        acc_dz[i][j][e] = valid ? dg * gelu_grad_f(av, th) : 0.0f;  // da
        if (WantZ) acc_z[i][j][e] = valid ? z : 0.0f;
      }
}

// Data gradient, one CTA per tile.
//   prologue: depthwise conv + LayerNorm of the tile -> xhat rows, rstd (global)
//   per hidden chunk: K loop (a, dz), then
//     phase 0 (GRN statistics): the tile's column sums of g^2, dz*g and dz
//     phase 1: da -> shared memory; dt2[:, cc] += da W1[hc, cc] for every column chunk
//              (the tile's rows of a global fp32 buffer, read-modify-write)
//   phase 1 end: LayerNorm backward per pixel -> D = dL/d(dwconv output) (16-bit), and
//              the tile's column sums of dt2*xhat, dt2 and dy*ds (fixed order).
template <class Tr>
__global__ void __launch_bounds__(kThreads, 1) cnb_backward_dx(const BwdArgs a) {
  FV_DYNAMIC_SMEM(smem);
  const Common& cm = a.cm;
  const tl::Plan& p = cm.p;
  const int tile = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const tl::TileOrigin o = tl::tile_origin(p.tg, tile);
  const tl::BwdSmem& L = p.bwd_dx;
  const float ds = cm.ds[o.n];
  auto xrow = [&](int sl) -> float* {
    const tl::Slot s = slot_of(p, o, sl);
    return s.valid ? a.xh + pix_of(p, o, s) * p.cp : nullptr;
  };
  if (a.prologue) {
    dw_prologue<Tr>(cm, p.halo_bwd, o, reinterpret_cast<float*>(smem + L.u), xrow);
    ln_rows<Tr, false>(cm, o, xrow, a.rstd);
    __syncthreads();
  }
  uint16_t* sda = reinterpret_cast<uint16_t*>(smem + L.da);
  uint16_t* sbt = reinterpret_cast<uint16_t*>(smem + L.bt);
  float* red = reinterpret_cast<float*>(smem + L.red);
  const int ldh = tl::op_ld(kNh);
  const tl::WarpTile wth = tl::warp_tile(warp, kNh), wtc = tl::warp_tile(warp, kNc);
  auto trow = [&](int r) -> float* {
    const tl::Slot s = slot_of(p, o, r);
    return s.valid ? a.dt2 + pix_of(p, o, s) * p.cp : nullptr;
  };

  for (int hc = 0; hc < p.n_hc; ++hc) {
    float acc_a[kMI][kNIh][4], acc_dz[kMI][kNIh][4];
    bwd_kloop<Tr>(cm, a, L, smem, o, ds, hc, wth, lane, acc_a, acc_dz);
    if (a.phase == 0) {  // GRN statistics: g^2, dz*g, dz over the valid slots
#pragma unroll
      for (int i = 0; i < kMI; ++i)
#pragma unroll
        for (int j = 0; j < kNIh; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const tl::FragC f = tl::acc_coord(wth, lane, i, j, e);
            const bool valid = slot_of(p, o, f.r).valid;
            acc_a[i][j][e] = valid ? gelu_f(acc_a[i][j][e] + cm.b1[hc * kNh + f.c], cm.tanh_gelu != 0) : 0.0f;
            acc_dz[i][j][e] = valid ? acc_dz[i][j][e] : 0.0f;
          }
      col_sums_h(wth, warp, lane, red, 0, [&](int i, int j, int e) { return acc_a[i][j][e] * acc_a[i][j][e]; });
      col_sums_h(wth, warp, lane, red, 1, [&](int i, int j, int e) { return acc_dz[i][j][e] * acc_a[i][j][e]; });
      col_sums_h(wth, warp, lane, red, 2, [&](int i, int j, int e) { return acc_dz[i][j][e]; });
      __syncthreads();
      if (threadIdx.x < kNh) {
        const int64_t at = tl::tpart_index(tile, hc * kNh + threadIdx.x, p.hp);
        a.psq[at] = red[tl::red_index(0, 0, threadIdx.x)] + red[tl::red_index(0, 1, threadIdx.x)];
        a.pt[at] = red[tl::red_index(1, 0, threadIdx.x)] + red[tl::red_index(1, 1, threadIdx.x)];
        a.pdb[at] = red[tl::red_index(2, 0, threadIdx.x)] + red[tl::red_index(2, 1, threadIdx.x)];
      }
      __syncthreads();
      continue;
    }
    bwd_chunk_grads<Tr, false>(cm, o, hc, wth, lane, acc_a, acc_dz, acc_a);
#pragma unroll
    for (int i = 0; i < kMI; ++i)
#pragma unroll
      for (int j = 0; j < kNIh; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const tl::FragC f = tl::acc_coord(wth, lane, i, j, e);
          sda[f.r * ldh + f.c] = Tr::from_f(acc_dz[i][j][e]);
        }
    for (int cc = 0; cc < p.n_cc; ++cc) {
      const int col0 = cc * kNc;
      const int rows = int(tl::imin(kNc, p.cp - col0));
      stage_packed(sbt, ldh, cm.w1t + int64_t(col0) * p.hp + hc * kNh, p.hp, rows, kNh);
      const bool active = col0 + wtc.n0 < p.cp;
      float acc_t[kMI][kNIc][4];
      if (hc == 0 || !active)
        zero_acc(acc_t);
      else
        acc_load(acc_t, wtc, lane, col0, trow);
      __syncthreads();
      if (active) warp_mma<Tr, kMI, kNIc, true, true>(acc_t, sda, ldh, sbt, ldh, kNh, wtc.m0, wtc.n0, lane);
      __syncthreads();
      if (active) acc_store(acc_t, wtc, lane, col0, trow);
    }
  }
  if (a.phase == 0) return;
  __syncthreads();  // the tile's dt2 rows (global) are complete and visible to the CTA

  // LayerNorm backward, one warp per slot.
  const int C = p.c;
  for (int sl = warp; sl < kM; sl += tl::kWarps) {
    const tl::Slot s = slot_of(p, o, sl);
    if (!s.valid) continue;
    const int64_t pix = pix_of(p, o, s);
    const float* t = a.dt2 + pix * p.cp;
    const float* xr = a.xh + pix * p.cp;
    float s1 = 0.0f, s2 = 0.0f;
    for (int c = lane; c < C; c += 32) {
      const float v = cm.nw[c] * t[c];
      s1 += v;
      s2 += v * xr[c];
    }
    s1 = warp_sum(s1) / float(C);
    s2 = warp_sum(s2) / float(C);
    const float rs = a.rstd[pix];
    for (int c = lane; c < C; c += 32)
      a.d[pix * C + c] = Tr::from_f(rs * (cm.nw[c] * t[c] - s1 - xr[c] * s2));
  }
  // The tile's per-channel sums (thread per channel, slots in order).
  for (int c = threadIdx.x; c < p.cp; c += kThreads) {
    float snw = 0.0f, snb = 0.0f, sdy = 0.0f;
    for (int sl = 0; sl < kM; ++sl) {
      const tl::Slot s = slot_of(p, o, sl);
      if (!s.valid) continue;
      const int64_t pix = pix_of(p, o, s);
      const float t = a.dt2[pix * p.cp + c];
      snw += t * a.xh[pix * p.cp + c];
      snb += t;
      if (c < C) sdy += Tr::to_f(a.gy[pix * C + c]) * ds;
    }
    const int64_t at = tl::tpart_index(tile, c, p.cp);
    a.pnw[at] = snw;
    a.pnb[at] = snb;
    a.ps[at] = sdy;
  }
}

// Weight gradients: CTA (run r, hidden slab s = one chunk of 64 hidden units) walks the
// run's tiles in order, recomputing a, dz and da of its slab (K loop over C), and
// accumulates into its own slices of the run's partials:
//   dW1[s-rows]  += da^T t2        (K = the tile's 64 slots; A = da, M-major; B = t2, N-major)
//   G^T[s-rows]  += (ds z)^T dy    (G[c][j] = sum dy[c] ds z[j]; dW2 = gamma G)
//   db1[s]       += column sums of da
// Read-modify-write of the CTA's own slice in tile order: deterministic.
template <class Tr>
__global__ void __launch_bounds__(kThreads, 1) cnb_backward_dw(const BwdArgs a) {
  FV_DYNAMIC_SMEM(smem);
  const Common& cm = a.cm;
  const tl::Plan& p = cm.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const tl::DwBlock blk = tl::dw_block(blockIdx.x, p.n_hc);
  const tl::Span run = tl::run_span(blk.r, p.runs, p.tg.ntiles);
  const int hc = blk.s;
  const tl::BwdSmem& L = p.bwd_dw;
  uint16_t* sda = reinterpret_cast<uint16_t*>(smem + L.da);
  uint16_t* szs = reinterpret_cast<uint16_t*>(smem + L.zs);
  uint16_t* sbw = reinterpret_cast<uint16_t*>(smem + L.bt);
  float* red = reinterpret_cast<float*>(smem + L.red);
  float* db1 = reinterpret_cast<float*>(smem + L.db1);
  const int ldh = tl::op_ld(kNh), ldc = tl::op_ld(kNc);
  const tl::WarpTile wth = tl::warp_tile(warp, kNh), wtc = tl::warp_tile(warp, kNc);
  if (threadIdx.x < kNh) db1[threadIdx.x] = 0.0f;
  __syncthreads();

  for (int64_t tile = run.begin; tile < run.end; ++tile) {
    const tl::TileOrigin o = tl::tile_origin(p.tg, tile);
    const float ds = cm.ds[o.n];
    float acc_a[kMI][kNIh][4], acc_dz[kMI][kNIh][4];
    bwd_kloop<Tr>(cm, a, L, smem, o, ds, hc, wth, lane, acc_a, acc_dz);
    bwd_chunk_grads<Tr, true>(cm, o, hc, wth, lane, acc_a, acc_dz, acc_a);  // acc_a := z
#pragma unroll
    for (int i = 0; i < kMI; ++i)
#pragma unroll
      for (int j = 0; j < kNIh; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const tl::FragC f = tl::acc_coord(wth, lane, i, j, e);
          sda[f.r * ldh + f.c] = Tr::from_f(acc_dz[i][j][e]);
          szs[f.r * ldh + f.c] = Tr::from_f(ds * acc_a[i][j][e]);
        }
    col_sums_h(wth, warp, lane, red, 0, [&](int i, int j, int e) { return acc_dz[i][j][e]; });
    __syncthreads();
    if (threadIdx.x < kNh)
      db1[threadIdx.x] += red[tl::red_index(0, 0, threadIdx.x)] + red[tl::red_index(0, 1, threadIdx.x)];
    const bool first = tile == run.begin;
    for (int cc = 0; cc < p.n_cc; ++cc) {
      const int col0 = cc * kNc;
      const int width = int(tl::imin(kNc, p.cp - col0));
      const bool active = col0 + wtc.n0 < p.cp;
      for (int which = 0; which < 2; ++which) {
        if (which == 0)
          stage_xh<Tr>(sbw, ldc, cm, a.xh, o, col0, width);
        else
          stage_gy<Tr>(sbw, ldc, cm, a.gy, o, ds, col0, width, false);
        __syncthreads();
        float acc_w[kMI][kNIc][4];
        zero_acc(acc_w);
        if (active)
          warp_mma<Tr, kMI, kNIc, false, false>(acc_w, which == 0 ? sda : szs, ldh, sbw, ldc, kM,
                                                wtc.m0, wtc.n0, lane);
        __syncthreads();
        if (!active) continue;
        float* part = which == 0 ? a.pw1 : a.pg;
        auto prow = [&](int r) -> float* {
          return part + tl::wpart_index(blk.r, int64_t(hc) * kNh + r, 0, p.hp, p.cp);
        };
        if (!first) {
          float prev[kMI][kNIc][4];
          acc_load(prev, wtc, lane, col0, prow);
#pragma unroll
          for (int i = 0; i < kMI; ++i)
#pragma unroll
            for (int j = 0; j < kNIc; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc_w[i][j][e] += prev[i][j][e];
        }
        acc_store(acc_w, wtc, lane, col0, prow);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < kNh) a.pb1[int64_t(blk.r) * p.hp + hc * kNh + threadIdx.x] = db1[threadIdx.x];
}

// ------------------------------------------------------------------ small kernels
// Parameter packing: job j (blockIdx.y) fills dst[rows][cols] (16-bit or fp32) with the
// source element (r / rdiv)*sr + (r % rdiv)*sr2 + c*sc inside [vrows, vcols) (`fill` there
// when src is null) and 0 outside. rdiv splits a row index in two (the depthwise kernel's
// taps i*k + j, any strides); rdiv = 1 for plain matrices.
struct PackJob {
  void* dst;
  int dst_f32;
  int64_t rows, cols, vrows, vcols;
  const void* src;
  int src_dt;
  int64_t rdiv, sr, sr2, sc;
  float fill;
};
constexpr int kMaxJobs = 16;
struct PackArgs {
  PackJob job[kMaxJobs];
  int njobs;
  int t16;  // kF16 or kBF16: the 16-bit destination type
};

__global__ void __launch_bounds__(kThreads) cnb_pack(const PackArgs a) {
  const PackJob& j = a.job[blockIdx.y];
  const int64_t total = j.rows * j.cols;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const int64_t r = e / j.cols, c = e % j.cols;
    float v = 0.0f;
    if (r < j.vrows && c < j.vcols)
      v = j.src ? load_any(j.src, (r / j.rdiv) * j.sr + (r % j.rdiv) * j.sr2 + c * j.sc, j.src_dt) : j.fill;
    if (j.dst_f32)
      static_cast<float*>(j.dst)[e] = v;
    else
      store_any(j.dst, e, a.t16, v);
  }
}

// GRN statistics of image n (one CTA per image): norms G, den = mean G + eps and
// f = 1 + w G / den; backward also t = sum dz*g, u = dG/G and the per-image GRN
// parameter-gradient contributions. Sums over tiles in tile order, over hidden units in
// a fixed tree order.
struct GrnArgs {
  int n, hidden, hp;
  int64_t per_image;
  const float* psq;
  const float* pt;
  const float* pdb;
  const float* gw;
  float eps;
  float* norm;
  float* den;
  float* f;
  float* u;
  float* dgw;
  float* dgb;
  int backward;
};

__device__ float block_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(kThreads) cnb_grn_finish(const GrnArgs a) {
  __shared__ float sh[kThreads];
  const int n = blockIdx.x;
  const int64_t t0 = int64_t(n) * a.per_image;
  float part = 0.0f;
  for (int j = threadIdx.x; j < a.hp; j += kThreads) {
    float s = 0.0f;
    if (j < a.hidden)
      for (int64_t t = 0; t < a.per_image; ++t) s += a.psq[(t0 + t) * a.hp + j];
    const float g = sqrtf(s);
    a.norm[int64_t(n) * a.hp + j] = g;
    part += g;
  }
  const float den = block_sum(part, sh) / float(a.hidden) + a.eps;
  if (threadIdx.x == 0) a.den[n] = den;
  float sg = 0.0f;
  for (int j = threadIdx.x; j < a.hp; j += kThreads) {
    const int64_t at = int64_t(n) * a.hp + j;
    const float g = a.norm[at];
    a.f[at] = j < a.hidden ? 1.0f + a.gw[j] * g / den : 0.0f;
    if (a.backward) {
      float t = 0.0f, tb = 0.0f;
      if (j < a.hidden)
        for (int64_t q = 0; q < a.per_image; ++q) {
          t += a.pt[(t0 + q) * a.hp + j];
          tb += a.pdb[(t0 + q) * a.hp + j];
        }
      a.dgw[at] = g / den * t;
      a.dgb[at] = tb;
      a.u[at] = t;  // t for now; u below
      sg += a.gw[j] * t * g;
    }
  }
  if (!a.backward) return;
  sg = block_sum(sg, sh);
  for (int j = threadIdx.x; j < a.hp; j += kThreads) {
    const int64_t at = int64_t(n) * a.hp + j;
    const float g = a.norm[at], t = a.u[at];
    const float dG = a.gw[j] * t / den - sg / (den * den * float(a.hidden));
    a.u[at] = (j < a.hidden && g > 0.0f) ? dG / g : 0.0f;
  }
}

// The parameter gradients from the partial sums, each a fixed-order sum, in the
// gradients' dtype (contiguous). Index space: dW1 [Hd][C], dW2 [C][Hd], db1 [Hd], the
// per-channel gradients [C], the GRN gradients [Hd].
struct ReduceArgs {
  int c, hidden, cp, hp, runs, n;
  int64_t ntiles;
  const float* pw1;
  const float* pg;
  const float* pb1;
  const float* pnw;
  const float* pnb;
  const float* ps;
  const float* gam;
  const float* b2;
  const uint16_t* w2t;  // [Hp][Cp] 16-bit
  const float* dgw;
  const float* dgb;     // [N][Hp] (GRN)
  void* g_w1;
  void* g_w2;
  void* g_b1;
  void* g_nw;
  void* g_nb;
  void* g_b2;
  void* g_gamma;
  void* g_gw;
  void* g_gb;
  int dt;  // dtype code of the gradients (the activations')
  int t16;
};

__device__ __forceinline__ float to_f16any(uint16_t b, int t16) {
  return t16 == kF16 ? F16::to_f(b) : BF16::to_f(b);
}

__global__ void __launch_bounds__(kThreads) cnb_reduce(const ReduceArgs a) {
  const int64_t hc = int64_t(a.hidden) * a.c;
  const int64_t total = 2 * hc + 2 * int64_t(a.hidden) + a.c;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    if (e < hc) {  // dW1[j][c]
      if (!a.g_w1) continue;
      const int64_t j = e / a.c, c = e % a.c;
      float s = 0.0f;
      for (int r = 0; r < a.runs; ++r) s += a.pw1[tl::wpart_index(r, j, c, a.hp, a.cp)];
      store_any(a.g_w1, e, a.dt, s);
    } else if (e < 2 * hc) {  // dW2[c][j] = gamma_c G[c][j]
      if (!a.g_w2) continue;
      const int64_t f = e - hc, c = f / a.hidden, j = f % a.hidden;
      float s = 0.0f;
      for (int r = 0; r < a.runs; ++r) s += a.pg[tl::wpart_index(r, j, c, a.hp, a.cp)];
      store_any(a.g_w2, f, a.dt, a.gam[c] * s);
    } else if (e < 2 * hc + a.hidden) {  // db1
      if (!a.g_b1) continue;
      const int64_t j = e - 2 * hc;
      float s = 0.0f;
      for (int r = 0; r < a.runs; ++r) s += a.pb1[int64_t(r) * a.hp + j];
      store_any(a.g_b1, j, a.dt, s);
    } else if (e < 2 * hc + a.hidden + a.c) {  // per channel
      const int64_t c = e - 2 * hc - a.hidden;
      float snw = 0.0f, snb = 0.0f, sdy = 0.0f;
      for (int64_t t = 0; t < a.ntiles; ++t) {
        snw += a.pnw[tl::tpart_index(t, c, a.cp)];
        snb += a.pnb[tl::tpart_index(t, c, a.cp)];
        sdy += a.ps[tl::tpart_index(t, c, a.cp)];
      }
      if (a.g_nw) store_any(a.g_nw, c, a.dt, snw);
      if (a.g_nb) store_any(a.g_nb, c, a.dt, snb);
      if (a.g_b2) store_any(a.g_b2, c, a.dt, a.gam[c] * sdy);
      if (a.g_gamma) {  // sum_j W2[c][j] G[c][j] + b2_c sum dy ds
        float s = 0.0f;
        for (int j = 0; j < a.hidden; ++j) {
          float gsum = 0.0f;
          for (int r = 0; r < a.runs; ++r) gsum += a.pg[tl::wpart_index(r, j, c, a.hp, a.cp)];
          s += to_f16any(a.w2t[int64_t(j) * a.cp + c], a.t16) * gsum;
        }
        store_any(a.g_gamma, c, a.dt, s + a.b2[c] * sdy);
      }
    } else {  // GRN weight / bias
      const int64_t j = e - 2 * hc - a.hidden - a.c;
      if (!a.g_gw && !a.g_gb) continue;
      float sw = 0.0f, sb = 0.0f;
      for (int n = 0; n < a.n; ++n) {
        if (a.dgw) sw += a.dgw[int64_t(n) * a.hp + j];
        if (a.dgb) sb += a.dgb[int64_t(n) * a.hp + j];
      }
      if (a.g_gw) store_any(a.g_gw, j, a.dt, sw);
      if (a.g_gb) store_any(a.g_gb, j, a.dt, sb);
    }
  }
}

// grad_x += grad_y (dense, same 16-bit dtype), summed in float and rounded once.
struct ResidualArgs {
  uint16_t* gx;
  const uint16_t* gy;
  int64_t n;
};
template <class Tr>
__global__ void __launch_bounds__(kThreads) cnb_residual(const ResidualArgs a) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < a.n; e += int64_t(gridDim.x) * kThreads)
    a.gx[e] = Tr::from_f(Tr::to_f(a.gx[e]) + Tr::to_f(a.gy[e]));
}

// ------------------------------------------------------------------ launch sequences
// Host code shared by the CUDA build and the host emulation: `launch(kernel, grid, smem,
// args)` runs one kernel (on a stream, or emulated).
int64_t grid_for(int64_t total) {
  return tl::imax(1, tl::imin(tl::ceil_div(total, kThreads), int64_t(1) << 16));
}

// 2-D (rows, cols) strides of a parameter (1-D: one row).
void strides2(const TensorView& t, int64_t* sr, int64_t* sc) {
  if (t.ndim == 2) {
    *sr = t.strides[0];
    *sc = t.strides[1];
  } else {
    *sr = 0;
    *sc = t.strides[t.ndim - 1];
  }
}

PackJob mat_job(void* dst, int64_t rows, int64_t cols, const TensorView& src, bool transpose) {
  PackJob j{};
  j.dst = dst;
  j.dst_f32 = 0;
  j.rows = rows;
  j.cols = cols;
  j.src = src.data;
  j.src_dt = dtype_code(src.dtype);
  int64_t sr, sc;
  strides2(src, &sr, &sc);
  j.vrows = transpose ? src.shape[1] : src.shape[0];
  j.vcols = transpose ? src.shape[0] : src.shape[1];
  j.rdiv = 1;
  j.sr = transpose ? sc : sr;
  j.sc = transpose ? sr : sc;
  return j;
}
PackJob vec_job(float* dst, int64_t len, int64_t valid, const TensorView* src, float fill) {
  PackJob j{};
  j.dst = dst;
  j.dst_f32 = 1;
  j.rows = 1;
  j.cols = len;
  j.vrows = 1;
  j.vcols = valid;
  j.src = src ? src->data : nullptr;
  j.src_dt = src ? dtype_code(src->dtype) : kF32;
  j.rdiv = 1;
  j.sc = src ? src->strides[0] : 0;
  j.fill = fill;
  return j;
}

template <class P>
P* at(void* base, size_t off) {
  return reinterpret_cast<P*>(static_cast<char*>(base) + off);
}

// Packs the parameters (one launch; see tl::Packed for the layouts) and fills the
// Common block of the tile kernels.
template <class Launch>
Common pack_params(const Launch& launch, const tl::Plan& p, const tl::Packed& k, const TensorView& x,
                   const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& prm, void* base,
                   bool forward) {
  PackArgs pa{};
  pa.t16 = x.dtype == DType::Float16 ? kF16 : kBF16;
  int nj = 0;
  pa.job[nj++] = mat_job(at<void>(base, k.w1p), p.hp, p.cp, *w.fc1_weight, false);
  if (forward) {
    pa.job[nj++] = mat_job(at<void>(base, k.w2p), p.cp, p.hp, *w.fc2_weight, false);
  } else {
    pa.job[nj++] = mat_job(at<void>(base, k.w2t), p.hp, p.cp, *w.fc2_weight, true);
    pa.job[nj++] = mat_job(at<void>(base, k.w1t), p.cp, p.hp, *w.fc1_weight, true);
  }
  {  // depthwise weight (C, 1, k, k) -> [tap = i*k + j][Cp], fp32
    const TensorView& dwt = *w.dw_weight;
    PackJob j{};
    j.dst = at<void>(base, k.dww);
    j.dst_f32 = 1;
    j.rows = j.vrows = int64_t(p.k) * p.k;
    j.cols = p.cp;
    j.vcols = p.c;
    j.src = dwt.data;
    j.src_dt = dtype_code(dwt.dtype);
    j.rdiv = p.k;
    j.sr = dwt.strides[2];
    j.sr2 = dwt.strides[3];
    j.sc = dwt.strides[0];
    pa.job[nj++] = j;
  }
  pa.job[nj++] = vec_job(at<float>(base, k.dwb), p.cp, p.c, w.dw_bias, 0.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.nw), p.cp, p.c, w.norm_weight, 1.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.nb), p.cp, p.c, w.norm_bias, 0.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.b2), p.cp, p.c, w.fc2_bias, 0.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.gam), p.cp, p.c, w.gamma, 1.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.b1), p.hp, p.hidden, w.fc1_bias, 0.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.gw), p.hp, p.hidden, w.grn_weight, 0.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.gb), p.hp, p.hidden, w.grn_bias, 0.0f);
  pa.job[nj++] = vec_job(at<float>(base, k.ds), tl::imax(p.n, 1), p.n, w.drop_scale, 1.0f);
  pa.njobs = nj;
  int64_t most = 1;
  for (int i = 0; i < nj; ++i) most = tl::imax(most, pa.job[i].rows * pa.job[i].cols);
  launch(cnb_pack, dim3(unsigned(grid_for(most)), unsigned(nj)), 0, pa);

  Common cm{};
  cm.p = p;
  cm.x = static_cast<const uint16_t*>(x.data);
  cm.w1p = at<const uint16_t>(base, k.w1p);
  cm.w2p = forward ? at<const uint16_t>(base, k.w2p) : nullptr;
  cm.w2t = forward ? nullptr : at<const uint16_t>(base, k.w2t);
  cm.w1t = forward ? nullptr : at<const uint16_t>(base, k.w1t);
  cm.dww = at<const float>(base, k.dww);
  cm.dwb = at<const float>(base, k.dwb);
  cm.nw = at<const float>(base, k.nw);
  cm.nb = at<const float>(base, k.nb);
  cm.b1 = at<const float>(base, k.b1);
  cm.b2 = at<const float>(base, k.b2);
  cm.gam = at<const float>(base, k.gam);
  cm.gw = at<const float>(base, k.gw);
  cm.gb = at<const float>(base, k.gb);
  cm.ds = at<const float>(base, k.ds);
  cm.eps = float(prm.eps);
  cm.tanh_gelu = prm.gelu_tanh ? 1 : 0;
  return cm;
}

// The forward: pack, (GRN statistics phase, per-image finish,) output phase.
template <class Tr, class Launch>
void run_forward(const Launch& launch, const tl::Plan& p, const tl::FwdScratch& fs, const TensorView& x,
                 const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& prm, const TensorView& y,
                 void* base) {
  const Common cm = pack_params(launch, p, fs.pk, x, w, prm, base, true);
  FwdArgs a{};
  a.cm = cm;
  a.y = static_cast<uint16_t*>(y.data);
  a.t12 = p.resident ? nullptr : at<float>(base, fs.t12);
  a.ows = p.n_cc > 1 ? at<float>(base, fs.ows) : nullptr;
  const dim3 grid(unsigned(p.tg.ntiles));
  if (fs.has_grn) {
    a.phase = 0;
    a.prologue = 1;
    a.psq = at<float>(base, fs.grn.psq);
    launch(cnb_forward<Tr>, grid, p.fwd.total, a);
    GrnArgs g{};
    g.n = p.n;
    g.hidden = p.hidden;
    g.hp = p.hp;
    g.per_image = p.tg.per_image;
    g.psq = a.psq;
    g.gw = cm.gw;
    g.eps = float(prm.grn_eps);
    g.norm = at<float>(base, fs.grn.norm);
    g.den = at<float>(base, fs.grn.den);
    g.f = at<float>(base, fs.grn.f);
    g.backward = 0;
    launch(cnb_grn_finish, dim3(unsigned(p.n)), 0, g);
    a.cm.grn_f = g.f;
    a.prologue = 0;  // streamed mode: t2 rows already written by the statistics phase
  } else {
    a.prologue = 1;
  }
  a.phase = 1;
  launch(cnb_forward<Tr>, grid, p.fwd.total, a);
}

// The backward up to D = dL/d(dwconv output) (returned, in the scratch) and every
// parameter gradient but the depthwise ones: pack, (GRN statistics phase, per-image
// finish,) data-gradient kernel, weight-gradient kernel, reduction.
template <class Tr, class Launch>
uint16_t* run_backward(const Launch& launch, const tl::Plan& p, const tl::BwdScratch& bs,
                       const TensorView& gy, const TensorView& x, const ConvNeXtBlockWeights& w,
                       const ConvNeXtBlockParams& prm, const ConvNeXtBlockGrads& g, void* base) {
  const Common cm = pack_params(launch, p, bs.pk, x, w, prm, base, false);
  BwdArgs a{};
  a.cm = cm;
  a.gy = static_cast<const uint16_t*>(gy.data);
  a.xh = at<float>(base, bs.xh);
  a.rstd = at<float>(base, bs.rstd);
  a.dt2 = at<float>(base, bs.dt2);
  a.d = at<uint16_t>(base, bs.d);
  a.pnw = at<float>(base, bs.pnw);
  a.pnb = at<float>(base, bs.pnb);
  a.ps = at<float>(base, bs.ps);
  a.pw1 = at<float>(base, bs.pw1);
  a.pg = at<float>(base, bs.pg);
  a.pb1 = at<float>(base, bs.pb1);
  const dim3 tiles(unsigned(p.tg.ntiles));
  GrnArgs gr{};
  if (bs.has_grn) {
    a.psq = at<float>(base, bs.grn.psq);
    a.pt = at<float>(base, bs.grn.pt);
    a.pdb = at<float>(base, bs.grn.pdb);
    a.phase = 0;
    a.prologue = 1;
    launch(cnb_backward_dx<Tr>, tiles, p.bwd_dx.total, a);
    gr.n = p.n;
    gr.hidden = p.hidden;
    gr.hp = p.hp;
    gr.per_image = p.tg.per_image;
    gr.psq = a.psq;
    gr.pt = a.pt;
    gr.pdb = a.pdb;
    gr.gw = cm.gw;
    gr.eps = float(prm.grn_eps);
    gr.norm = at<float>(base, bs.grn.norm);
    gr.den = at<float>(base, bs.grn.den);
    gr.f = at<float>(base, bs.grn.f);
    gr.u = at<float>(base, bs.grn.u);
    gr.dgw = at<float>(base, bs.grn.dgw);
    gr.dgb = at<float>(base, bs.grn.dgb);
    gr.backward = 1;
    launch(cnb_grn_finish, dim3(unsigned(p.n)), 0, gr);
    a.cm.grn_f = gr.f;
    a.cm.grn_u = gr.u;
    a.prologue = 0;  // xhat and rstd are in place
  } else {
    a.prologue = 1;
  }
  a.phase = 1;
  launch(cnb_backward_dx<Tr>, tiles, p.bwd_dx.total, a);
  if (g.fc1_weight || g.fc2_weight || g.fc1_bias || g.gamma)
    launch(cnb_backward_dw<Tr>, dim3(unsigned(p.dw_ctas)), p.bwd_dw.total, a);

  ReduceArgs r{};
  r.c = p.c;
  r.hidden = p.hidden;
  r.cp = p.cp;
  r.hp = p.hp;
  r.runs = p.runs;
  r.n = p.n;
  r.ntiles = p.tg.ntiles;
  r.pw1 = a.pw1;
  r.pg = a.pg;
  r.pb1 = a.pb1;
  r.pnw = a.pnw;
  r.pnb = a.pnb;
  r.ps = a.ps;
  r.gam = cm.gam;
  r.b2 = cm.b2;
  r.w2t = cm.w2t;
  r.dgw = bs.has_grn ? gr.dgw : nullptr;
  r.dgb = bs.has_grn ? gr.dgb : nullptr;
  auto ptr = [](const TensorView* t) -> void* { return t ? t->data : nullptr; };
  r.g_w1 = ptr(g.fc1_weight);
  r.g_w2 = ptr(g.fc2_weight);
  r.g_b1 = ptr(g.fc1_bias);
  r.g_nw = ptr(g.norm_weight);
  r.g_nb = ptr(g.norm_bias);
  r.g_b2 = ptr(g.fc2_bias);
  r.g_gamma = ptr(g.gamma);
  r.g_gw = ptr(g.grn_weight);
  r.g_gb = ptr(g.grn_bias);
  r.dt = dtype_code(x.dtype);
  r.t16 = x.dtype == DType::Float16 ? kF16 : kBF16;
  const int64_t total = 2 * int64_t(p.hidden) * p.c + 2 * int64_t(p.hidden) + p.c;
  launch(cnb_reduce, dim3(unsigned(grid_for(total))), 0, r);
  return a.d;
}

}  // namespace
}  // namespace cuda
}  // namespace cnblock
}  // namespace fastvis
