// fastvis: CUDA kernels of depthwise 2-D convolution (forward, backward input,
// backward weight/bias). float32, float16 and bfloat16 activations with float32
// accumulation; NHWC and NCHW; any kernel size, stride, dilation and per-side
// padding. All index arithmetic comes from ../tile_math.h, which the CPU tests
// exercise tile by tile. See README.md beside this file.
//
// COMPILED, NEVER RUN: no machine of this project has a GPU. These kernels have
// been compiled for sm_80 and sm_90 and their index math tested on the host, but
// they have not executed on a device; tests/test_cuda_dwconv.py is the first
// thing to run on a machine with one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <initializer_list>
#include <cstdint>

#include "fastvis/error.h"
#include "ops/depthwise_conv/dwconv_cuda.h"
#include "ops/depthwise_conv/tile_math.h"

#define FV_CUDA_CHECK(expr)                                                                  \
  do {                                                                                       \
    const cudaError_t fv_err_ = (expr);                                                      \
    FV_CHECK_RUNTIME(fv_err_ == cudaSuccess, "fastvis depthwise_conv2d (CUDA): ", #expr,     \
                     " failed: ", cudaGetErrorName(fv_err_), ": ", cudaGetErrorString(fv_err_)); \
  } while (0)

namespace fastvis {
namespace dwconv {
namespace cuda {
namespace {

namespace tl = ::fastvis::dwconv::tiles;
constexpr int kThreads = tl::kThreads;
constexpr int kMaxPix = tl::kMaxPix;
constexpr int kMaxPairs = tl::kMaxPairs;
// Every kernel runs 256-thread blocks and asks for at least 2 resident blocks per
// SM, i.e. at most 128 registers per thread. Without the explicit minimum, ptxas
// (CUDA 13) picks a tighter register target for some kernels and spills.
constexpr int kMinBlocks = 2;

// ------------------------------------------------------------------ element access
// Runtime dtype codes of weights, biases and their gradients (read/written once
// per block, so a switch costs nothing; activations are template types).
enum : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float load_any(const void* p, int64_t i, int dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
__device__ __forceinline__ void store_any(void* p, int64_t i, int dt, float v) {
  if (dt == kF32)
    static_cast<float*>(p)[i] = v;
  else if (dt == kF16)
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

// Element strides of a logical (N, C, H, W) activation.
struct Act {
  int64_t sn, sc, sh, sw;
};
__device__ __forceinline__ int64_t act_index(const Act& a, int64_t n, int64_t c, int64_t y, int64_t x) {
  return n * a.sn + c * a.sc + y * a.sh + x * a.sw;
}
// A weight (C, kh, kw) read as p[off + c*sc + i*si + j*sj]; negative strides
// read it flipped (stride-1 backward input).
struct WView {
  const void* p;
  int dt;
  int64_t off, sc, si, sj;
};
__device__ __forceinline__ float load_weight(const WView& w, int64_t c, int64_t i, int64_t j) {
  return load_any(w.p, w.off + c * w.sc + i * w.si + j * w.sj, w.dt);
}

template <class T>
struct ConvArgs {
  const T* src;  // forward: x;  gather / flipped: grad_y
  T* dst;        // forward: y;  gather / flipped: grad_x
  Act ss, ds;
  WView w;
  const void* bias;  // nullptr: none
  int bdt;
  int64_t bs;
  tl::Problem2D pr;
  tl::ConvPlan pl;
};

// ------------------------------------------------------------------ conv kernels
// Stages the block's weights ([tap][cb]) and source tile with halo (zero outside
// the image) in shared memory, as float.
template <class T, bool CL>
__device__ __forceinline__ void stage_conv(const ConvArgs<T>& a, const tl::BlockTile& bt, float* s_in,
                                           float* s_w) {
  const tl::SmemTile st = tl::conv_src_tile(a.pl, CL);
  const int cb = a.pl.cb, kw = int(a.pr.x.k);
  const int64_t C = a.pr.c;
  const int64_t sh = tl::src_size(a.pr.y, a.pl.gather), sw = tl::src_size(a.pr.x, a.pl.gather);
  for (int e = threadIdx.x; e < a.pl.w_floats; e += kThreads) {
    const tl::WeightCoord wc = tl::weight_coord(e, cb, kw);
    const int64_t ch = bt.c0 + wc.c;
    s_w[e] = ch < C ? load_weight(a.w, ch, wc.i, wc.j) : 0.0f;
  }
  for (int e = threadIdx.x; e < a.pl.in_floats; e += kThreads) {
    const tl::SmemCoord sc = tl::smem_coord(st, e);
    const int64_t ch = bt.c0 + sc.c, yy = bt.sy0 + sc.r, xx = bt.sx0 + sc.q;
    float v = 0.0f;
    if (ch < C && tl::in_range(yy, sh) && tl::in_range(xx, sw))
      v = to_float(a.src[act_index(a.ss, bt.n, ch, yy, xx)]);
    s_in[e] = v;
  }
}

// Forward correlation (also the stride-1 backward input with a flipped view).
// Each thread owns one channel and up to kMaxPix tile pixels; per tap it reads
// one weight and accumulates all its pixels in registers.
template <class T, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) conv_fwd_tiled(const ConvArgs<T> a) {
  extern __shared__ float smem[];
  float* s_in = smem;
  float* s_w = smem + a.pl.in_floats;
  const tl::BlockTile bt = tl::conv_block(a.pl, a.pr, blockIdx.x);
  stage_conv<T, CL>(a, bt, s_in, s_w);
  __syncthreads();

  const tl::ThreadSlot ts = tl::thread_slot(threadIdx.x, a.pl.cb, CL);
  const tl::SmemTile st = tl::conv_src_tile(a.pl, CL);
  const int ppt = a.pl.ppt, cb = a.pl.cb;
  int base[kMaxPix];
  float acc[kMaxPix];
#pragma unroll
  for (int r = 0; r < kMaxPix; ++r) {
    base[r] = tl::conv_pixel(a.pl, a.pr, bt, ts, r, CL).base;
    acc[r] = 0.0f;
  }
  const int kh = int(a.pr.y.k), kw = int(a.pr.x.k);
  const int row_step = tl::tap_offset(st, int(a.pr.y.d), 0);
  const int col_step = tl::tap_offset(st, 0, int(a.pr.x.d));
  for (int i = 0; i < kh; ++i) {
    const float* wrow = s_w + tl::weight_index(i * kw, ts.c, cb);
    const float* srow = s_in + i * row_step;
    for (int j = 0; j < kw; ++j) {
      const float wv = wrow[j * cb];
      const float* sp = srow + j * col_step;
#pragma unroll
      for (int r = 0; r < kMaxPix; ++r)
        if (r < ppt) acc[r] = fmaf(wv, sp[base[r]], acc[r]);
    }
  }
  const int64_t ch = bt.c0 + ts.c;
  const float bv = (a.bias != nullptr && ch < a.pr.c) ? load_any(a.bias, ch * a.bs, a.bdt) : 0.0f;
#pragma unroll
  for (int r = 0; r < kMaxPix; ++r) {
    if (r < ppt) {
      const tl::PixelRef ref = tl::conv_pixel(a.pl, a.pr, bt, ts, r, CL);
      if (ref.active) a.dst[act_index(a.ds, bt.n, ch, ref.y, ref.x)] = from_float<T>(acc[r] + bv);
    }
  }
}

// Backward input as a gather (any stride): grad_x[p] sums the taps i whose
// source (p + pad - i*d) / s is an integer; the walks come from tl::gather_taps.
template <class T, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) conv_gather_tiled(const ConvArgs<T> a) {
  extern __shared__ float smem[];
  float* s_in = smem;
  float* s_w = smem + a.pl.in_floats;
  const tl::BlockTile bt = tl::conv_block(a.pl, a.pr, blockIdx.x);
  stage_conv<T, CL>(a, bt, s_in, s_w);
  __syncthreads();

  const tl::ThreadSlot ts = tl::thread_slot(threadIdx.x, a.pl.cb, CL);
  const tl::SmemTile st = tl::conv_src_tile(a.pl, CL);
  const int ppt = a.pl.ppt, cb = a.pl.cb, kw = int(a.pr.x.k);
  const int64_t ch = bt.c0 + ts.c;
  const int ps = tl::pix_stride(st);
  for (int r = 0; r < ppt; ++r) {
    const tl::PixelRef ref = tl::conv_pixel(a.pl, a.pr, bt, ts, r, CL);
    if (!ref.active) continue;
    const tl::TapWalk wy = tl::gather_taps(ref.y, a.pr.y);
    const tl::TapWalk wx = tl::gather_taps(ref.x, a.pr.x);
    const int r0 = int(wy.src0 - bt.sy0), q0 = int(wx.src0 - bt.sx0);
    const int rstep = int(wy.src_step), qstep = int(wx.src_step) * ps;
    float acc = 0.0f;
    for (int ay = 0; ay < wy.count; ++ay) {
      const int i = wy.first + ay * wy.step;
      const float* wrow = s_w + tl::weight_index(i * kw + wx.first, ts.c, cb);
      const float* sp = s_in + tl::smem_index(st, ts.c, r0 - ay * rstep, q0);
      for (int ax = 0; ax < wx.count; ++ax)
        acc = fmaf(wrow[ax * wx.step * cb], sp[-ax * qstep], acc);
    }
    a.dst[act_index(a.ds, bt.n, ch, ref.y, ref.x)] = from_float<T>(acc);
  }
}

// Fallbacks when no shared-memory tile fits (e.g. huge dilations): one thread
// per destination element, global reads with bounds checks.
template <class T, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) conv_fwd_direct(const ConvArgs<T> a) {
  const int64_t OH = a.pr.y.out, OW = a.pr.x.out, H = a.pr.y.in, W = a.pr.x.in;
  const int64_t total = a.pr.n * a.pr.c * OH * OW;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const tl::Coord4 k = tl::direct_coord(e, a.pr.c, OH, OW, CL);
    float acc = 0.0f;
    for (int64_t i = 0; i < a.pr.y.k; ++i) {
      const int64_t yy = k.y * a.pr.y.s - a.pr.y.pad + i * a.pr.y.d;
      if (!tl::in_range(yy, H)) continue;
      for (int64_t j = 0; j < a.pr.x.k; ++j) {
        const int64_t xx = k.x * a.pr.x.s - a.pr.x.pad + j * a.pr.x.d;
        if (!tl::in_range(xx, W)) continue;
        acc = fmaf(load_weight(a.w, k.c, i, j), to_float(a.src[act_index(a.ss, k.n, k.c, yy, xx)]), acc);
      }
    }
    if (a.bias != nullptr) acc += load_any(a.bias, k.c * a.bs, a.bdt);
    a.dst[act_index(a.ds, k.n, k.c, k.y, k.x)] = from_float<T>(acc);
  }
}

template <class T, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) conv_gather_direct(const ConvArgs<T> a) {
  const int64_t H = a.pr.y.in, W = a.pr.x.in, OH = a.pr.y.out, OW = a.pr.x.out;
  const int64_t total = a.pr.n * a.pr.c * H * W;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const tl::Coord4 k = tl::direct_coord(e, a.pr.c, H, W, CL);
    const tl::TapWalk wy = tl::gather_taps(k.y, a.pr.y);
    const tl::TapWalk wx = tl::gather_taps(k.x, a.pr.x);
    float acc = 0.0f;
    for (int ay = 0; ay < wy.count; ++ay) {
      const int64_t oy = wy.src0 - ay * wy.src_step;
      if (!tl::in_range(oy, OH)) continue;
      const int64_t i = wy.first + ay * wy.step;
      for (int ax = 0; ax < wx.count; ++ax) {
        const int64_t ox = wx.src0 - ax * wx.src_step;
        if (!tl::in_range(ox, OW)) continue;
        const int64_t j = wx.first + ax * wx.step;
        acc = fmaf(load_weight(a.w, k.c, i, j), to_float(a.src[act_index(a.ss, k.n, k.c, oy, ox)]), acc);
      }
    }
    a.dst[act_index(a.ds, k.n, k.c, k.y, k.x)] = from_float<T>(acc);
  }
}

// ------------------------------------------------------------------ weight gradient
template <class T>
struct WgradArgs {
  const T* gy;
  const T* x;
  Act gs, xs;
  float* part;  // scratch: [chunk][c][tap] then [chunk][c] (bias)
  bool bias;
  tl::Problem2D pr;
  tl::WgradPlan pl;
};

// Partial sums of one (chunk, channel group, kernel-row chunk): every thread
// keeps up to kMaxPairs (tap, channel) sums in registers while the block walks
// the chunk's items (output tiles) in order.
template <class T, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) wgrad_tiled(const WgradArgs<T> a) {
  extern __shared__ float smem[];
  float* s_gy = smem;
  float* s_x = smem + a.pl.gy_floats;
  const tl::WgradBlock wb = tl::wgrad_block(a.pl, a.pr, blockIdx.x);
  const tl::SmemTile gt = tl::wgrad_gy_tile(a.pl, CL);
  const tl::SmemTile xt = tl::wgrad_x_tile(a.pl, CL);
  const int t = threadIdx.x;
  const int npairs = wb.nrows * int(a.pr.x.k) * a.pl.cb;
  const int nr = (npairs + kThreads - 1) / kThreads;
  const int64_t C = a.pr.c, OH = a.pr.y.out, OW = a.pr.x.out, H = a.pr.y.in, W = a.pr.x.in;

  int gbase[kMaxPairs], xbase[kMaxPairs];
  float acc[kMaxPairs];
#pragma unroll
  for (int r = 0; r < kMaxPairs; ++r) {
    const tl::WgradPair wp = tl::wgrad_pair(a.pl, a.pr, wb, t + r * kThreads, CL);
    gbase[r] = tl::smem_index(gt, wp.c, 0, 0);
    xbase[r] = tl::smem_index(xt, wp.c, 0, 0) + wp.off;
    acc[r] = 0.0f;
  }
  const bool do_bias = a.bias && wb.i0 == 0 && t < a.pl.cb;
  float bacc = 0.0f;
  const int gps = tl::pix_stride(gt), xps = tl::pix_stride(xt);
  const int xrow = tl::tap_offset(xt, int(a.pr.y.s), 0), xcol = tl::tap_offset(xt, 0, int(a.pr.x.s));

  for (int64_t item = wb.item_begin; item < wb.item_end; ++item) {
    const tl::WgradItem it = tl::wgrad_item(a.pl, a.pr, wb, item);
    for (int e = t; e < a.pl.gy_floats; e += kThreads) {
      const tl::SmemCoord sc = tl::smem_coord(gt, e);
      const int64_t ch = wb.c0 + sc.c, oy = it.y0 + sc.r, ox = it.x0 + sc.q;
      float v = 0.0f;
      if (ch < C && oy < OH && ox < OW) v = to_float(a.gy[act_index(a.gs, it.n, ch, oy, ox)]);
      s_gy[e] = v;
    }
    for (int e = t; e < a.pl.x_floats; e += kThreads) {
      const tl::SmemCoord sc = tl::smem_coord(xt, e);
      const int64_t ch = wb.c0 + sc.c, yy = it.sy0 + sc.r, xx = it.sx0 + sc.q;
      float v = 0.0f;
      if (ch < C && tl::in_range(yy, H) && tl::in_range(xx, W)) v = to_float(a.x[act_index(a.xs, it.n, ch, yy, xx)]);
      s_x[e] = v;
    }
    __syncthreads();
    for (int ly = 0; ly < a.pl.th; ++ly) {
      for (int lx = 0; lx < a.pl.tw; ++lx) {
        const int gp = (ly * a.pl.tw + lx) * gps;
        const int xp = ly * xrow + lx * xcol;
#pragma unroll
        for (int r = 0; r < kMaxPairs; ++r)
          if (r < nr) acc[r] = fmaf(s_gy[gbase[r] + gp], s_x[xbase[r] + xp], acc[r]);
      }
    }
    if (do_bias) {
      for (int ly = 0; ly < a.pl.th; ++ly)
        for (int lx = 0; lx < a.pl.tw; ++lx) bacc += s_gy[tl::smem_index(gt, t, ly, lx)];
    }
    __syncthreads();
  }
  const int64_t taps = a.pl.taps;
#pragma unroll
  for (int r = 0; r < kMaxPairs; ++r) {
    if (r < nr) {
      const tl::WgradPair wp = tl::wgrad_pair(a.pl, a.pr, wb, t + r * kThreads, CL);
      if (wp.active)
        a.part[tl::wgrad_partial_index(wb.g, wb.c0 + wp.c, int64_t(wp.i) * a.pr.x.k + wp.j, C, taps)] = acc[r];
    }
  }
  if (do_bias && wb.c0 + t < C)
    a.part[tl::wgrad_bias_partial_index(wb.g, wb.c0 + t, C, taps, a.pl.chunks)] = bacc;
}

// Fallback: one block per (chunk, channel); a thread per tap (tap == taps is the
// bias), global reads.
template <class T, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) wgrad_direct(const WgradArgs<T> a) {
  const tl::WgradBlock wb = tl::wgrad_block(a.pl, a.pr, blockIdx.x);
  const int64_t C = a.pr.c, OH = a.pr.y.out, OW = a.pr.x.out, H = a.pr.y.in, W = a.pr.x.in;
  const int taps = int(a.pl.taps), kw = int(a.pr.x.k);
  const int64_t c = wb.c0;
  for (int tap = threadIdx.x; tap <= taps; tap += kThreads) {
    const bool is_bias = tap == taps;
    if (is_bias && !a.bias) continue;
    const int i = is_bias ? 0 : tap / kw, j = is_bias ? 0 : tap % kw;
    float acc = 0.0f;
    for (int64_t item = wb.item_begin; item < wb.item_end; ++item) {
      const tl::WgradItem it = tl::wgrad_item(a.pl, a.pr, wb, item);
      for (int64_t oy = it.y0; oy < tl::imin(it.y0 + a.pl.th, OH); ++oy) {
        const int64_t yy = it.sy0 + (oy - it.y0) * a.pr.y.s + i * a.pr.y.d;
        if (!is_bias && !tl::in_range(yy, H)) continue;
        for (int64_t ox = it.x0; ox < tl::imin(it.x0 + a.pl.tw, OW); ++ox) {
          const float g = to_float(a.gy[act_index(a.gs, it.n, c, oy, ox)]);
          if (is_bias) {
            acc += g;
          } else {
            const int64_t xx = it.sx0 + (ox - it.x0) * a.pr.x.s + j * a.pr.x.d;
            if (tl::in_range(xx, W)) acc = fmaf(g, to_float(a.x[act_index(a.xs, it.n, c, yy, xx)]), acc);
          }
        }
      }
    }
    if (is_bias)
      a.part[tl::wgrad_bias_partial_index(wb.g, c, C, taps, a.pl.chunks)] = acc;
    else
      a.part[tl::wgrad_partial_index(wb.g, c, tap, C, taps)] = acc;
  }
}

struct ReduceArgs {
  const float* part;
  int64_t C, taps, kw, chunks;
  void* gw;
  int gwdt;
  int64_t gsc, gsi, gsj;
  void* gb;  // nullptr: no bias gradient
  int gbdt;
  int64_t gbs;
};

// Sums the chunks' partials in chunk order (deterministic) and writes the
// gradients in their dtype and strides.
__global__ void __launch_bounds__(kThreads, kMinBlocks) wgrad_reduce(const ReduceArgs a) {
  const int64_t nw = a.C * a.taps;
  const int64_t total = nw + (a.gb != nullptr ? a.C : 0);
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    float s = 0.0f;
    if (e < nw) {
      const int64_t c = e / a.taps, tap = e % a.taps;
      for (int64_t g = 0; g < a.chunks; ++g) s += a.part[tl::wgrad_partial_index(g, c, tap, a.C, a.taps)];
      store_any(a.gw, c * a.gsc + (tap / a.kw) * a.gsi + (tap % a.kw) * a.gsj, a.gwdt, s);
    } else {
      const int64_t c = e - nw;
      for (int64_t g = 0; g < a.chunks; ++g)
        s += a.part[tl::wgrad_bias_partial_index(g, c, a.C, a.taps, a.chunks)];
      store_any(a.gb, c * a.gbs, a.gbdt, s);
    }
  }
}

// ------------------------------------------------------------------ host side
// Makes `dev` current for the scope of a call (PyTorch may call from any device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    FV_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != dev) {
      FV_CUDA_CHECK(cudaSetDevice(dev));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// Dynamic shared memory the planners may use on the current device.
size_t smem_budget() {
  int dev = 0, optin = 0;
  FV_CUDA_CHECK(cudaGetDevice(&dev));
  FV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  size_t b = optin > 0 ? size_t(optin) : tl::kDefaultSmemBudget;
  if (b > tl::kMaxSmemBudget) b = tl::kMaxSmemBudget;
  if (b < tl::kDefaultSmemBudget) b = tl::kDefaultSmemBudget;
  return b;
}

int dtype_code(DType dt, const char* what) {
  switch (dt) {
    case DType::Float32: return kF32;
    case DType::Float16: return kF16;
    case DType::BFloat16: return kBF16;
    default: break;
  }
  detail::throw_error(ErrorKind::Type, "depthwise_conv2d (CUDA): ", what, " has dtype ", dtype_name(dt),
                      "; the CUDA backend supports float32, float16 and bfloat16");
}

Act act_strides(const TensorView& t, const char* what) {
  FV_CHECK_VALUE(t.ndim == 4, "depthwise_conv2d (CUDA): ", what, " must be 4-D, got ", t.describe());
  return Act{t.strides[0], t.strides[1], t.strides[2], t.strides[3]};
}

// Strides (c, i, j) of a (C, 1, kh, kw) or (C, kh, kw) weight or weight gradient.
void weight_strides(const TensorView& w, int64_t* sc, int64_t* si, int64_t* sj, const char* what) {
  if (w.ndim == 4) {
    *sc = w.strides[0];
    *si = w.strides[2];
    *sj = w.strides[3];
  } else {
    FV_CHECK_VALUE(w.ndim == 3, "depthwise_conv2d (CUDA): ", what, " must be (C, 1, kh, kw) or (C, kh, kw), got ",
                   w.describe());
    *sc = w.strides[0];
    *si = w.strides[1];
    *sj = w.strides[2];
  }
}

WView weight_view(const TensorView& w, bool flip, int64_t kh, int64_t kw) {
  WView v{};
  v.p = w.data;
  v.dt = dtype_code(w.dtype, "weight");
  weight_strides(w, &v.sc, &v.si, &v.sj, "weight");
  if (flip) {
    v.off = (kh - 1) * v.si + (kw - 1) * v.sj;
    v.si = -v.si;
    v.sj = -v.sj;
  }
  return v;
}

tl::Problem2D make_problem(const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p) {
  tl::Problem2D pr;
  pr.n = s.n;
  pr.c = s.c;
  pr.y = tl::Dim{s.h, s.oh, s.kh, p.stride_h, p.dilation_h, p.pad_top};
  pr.x = tl::Dim{s.w, s.ow, s.kw, p.stride_w, p.dilation_w, p.pad_left};
  pr.channels_last = s.layout == Layout::NHWC;
  // The kernels do spatial index arithmetic in 32 bits.
  const int64_t lim = int64_t(1) << 30;
  for (const tl::Dim* d : {&pr.y, &pr.x}) {
    FV_CHECK_VALUE(d->in < lim && d->out < lim && d->k < lim && d->s >= 1 && d->s < lim && d->d >= 1 &&
                       (d->k - 1) * d->d < lim && d->pad > -lim && d->pad < lim,
                   "depthwise_conv2d (CUDA): spatial sizes, kernel, stride, dilation and padding must be "
                   "below 2^30");
  }
  return pr;
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

template <class Kernel, class Args>
void launch(Kernel kernel, int64_t blocks, size_t smem, cudaStream_t stream, const Args& args) {
  if (blocks <= 0) return;
  FV_CHECK_RUNTIME(blocks <= int64_t(INT_MAX), "depthwise_conv2d (CUDA): problem too large (", blocks,
                   " blocks)");
  if (smem > tl::kDefaultSmemBudget)
    FV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<dim3(unsigned(blocks)), dim3(kThreads), smem, stream>>>(args);
  FV_CUDA_CHECK(cudaGetLastError());
}

template <class T, bool CL>
void run_conv_cl(const ConvArgs<T>& a, cudaStream_t stream) {
  if (a.pl.direct) {
    if (a.pl.gather)
      launch(conv_gather_direct<T, CL>, a.pl.blocks, 0, stream, a);
    else
      launch(conv_fwd_direct<T, CL>, a.pl.blocks, 0, stream, a);
  } else {
    if (a.pl.gather)
      launch(conv_gather_tiled<T, CL>, a.pl.blocks, a.pl.smem_bytes, stream, a);
    else
      launch(conv_fwd_tiled<T, CL>, a.pl.blocks, a.pl.smem_bytes, stream, a);
  }
}

template <class T>
void run_conv(const TensorView& src, const TensorView& dst, const WView& w, const TensorView* bias,
              const tl::Problem2D& pr, bool gather, cudaStream_t stream) {
  ConvArgs<T> a{};
  a.src = static_cast<const T*>(src.data);
  a.dst = static_cast<T*>(dst.data);
  a.ss = act_strides(src, "input");
  a.ds = act_strides(dst, "output");
  a.w = w;
  a.bias = nullptr;
  if (bias != nullptr && bias->data != nullptr) {
    a.bias = bias->data;
    a.bdt = dtype_code(bias->dtype, "bias");
    a.bs = bias->ndim >= 1 ? bias->strides[0] : 1;
  }
  a.pr = pr;
  a.pl = tl::plan_conv(pr, gather, smem_budget(), int(sizeof(T)));
  if (pr.channels_last)
    run_conv_cl<T, true>(a, stream);
  else
    run_conv_cl<T, false>(a, stream);
}

void dispatch_conv(const TensorView& src, const TensorView& dst, const WView& w, const TensorView* bias,
                   const tl::Problem2D& pr, bool gather, cudaStream_t stream) {
  FV_CHECK_TYPE(src.dtype == dst.dtype, "depthwise_conv2d (CUDA): input and output dtypes differ (",
                dtype_name(src.dtype), " vs ", dtype_name(dst.dtype), ")");
  switch (dtype_code(src.dtype, "input")) {
    case kF32: run_conv<float>(src, dst, w, bias, pr, gather, stream); break;
    case kF16: run_conv<__half>(src, dst, w, bias, pr, gather, stream); break;
    default: run_conv<__nv_bfloat16>(src, dst, w, bias, pr, gather, stream); break;
  }
}

tl::WgradPlan wgrad_plan(const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p) {
  return tl::plan_wgrad(make_problem(s, p), smem_budget());
}

template <class T>
void run_wgrad(const TensorView& gy, const TensorView& x, bool bias, const tl::Problem2D& pr,
               const tl::WgradPlan& pl, float* part, cudaStream_t stream) {
  WgradArgs<T> a{};
  a.gy = static_cast<const T*>(gy.data);
  a.x = static_cast<const T*>(x.data);
  a.gs = act_strides(gy, "grad_output");
  a.xs = act_strides(x, "input");
  a.part = part;
  a.bias = bias;
  a.pr = pr;
  a.pl = pl;
  if (pl.direct) {
    if (pr.channels_last)
      launch(wgrad_direct<T, true>, pl.blocks, 0, stream, a);
    else
      launch(wgrad_direct<T, false>, pl.blocks, 0, stream, a);
  } else {
    if (pr.channels_last)
      launch(wgrad_tiled<T, true>, pl.blocks, pl.smem_bytes, stream, a);
    else
      launch(wgrad_tiled<T, false>, pl.blocks, pl.smem_bytes, stream, a);
  }
}

}  // namespace

// ------------------------------------------------------------------ entry points
void forward(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y,
             const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p, void* stream) {
  DeviceGuard guard(x.device.index);
  const tl::Problem2D pr = make_problem(s, p);
  dispatch_conv(x, y, weight_view(w, false, s.kh, s.kw), bias, pr, /*gather=*/false, as_stream(stream));
}

void backward_input(const TensorView& gy, const TensorView& w, const TensorView& gx,
                    const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p, void* stream) {
  DeviceGuard guard(gx.device.index);
  const tl::Problem2D pr = make_problem(s, p);
  if (p.stride_h == 1 && p.stride_w == 1) {
    // A forward correlation of grad_y with the flipped kernel (the fast tiles).
    dispatch_conv(gy, gx, weight_view(w, true, s.kh, s.kw), nullptr, tl::flipped_problem(pr),
                  /*gather=*/false, as_stream(stream));
  } else {
    dispatch_conv(gy, gx, weight_view(w, false, s.kh, s.kw), nullptr, pr, /*gather=*/true,
                  as_stream(stream));
  }
}

size_t backward_weight_scratch_bytes(const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p) {
  return wgrad_plan(s, p).scratch_bytes;
}

void backward_weight(const TensorView& gy, const TensorView& x, const TensorView& gw,
                     const TensorView* gb, const DepthwiseConv2dShape& s,
                     const DepthwiseConv2dParams& p, void* scratch, size_t scratch_bytes,
                     void* stream) {
  DeviceGuard guard(x.device.index);
  const tl::Problem2D pr = make_problem(s, p);
  const tl::WgradPlan pl = wgrad_plan(s, p);
  FV_CHECK_VALUE(scratch_bytes >= pl.scratch_bytes && (pl.scratch_bytes == 0 || scratch != nullptr),
                 "depthwise_conv2d backward_weight (CUDA): scratch of ", scratch_bytes,
                 " bytes is too small; ", pl.scratch_bytes, " are needed");
  FV_CHECK_VALUE(reinterpret_cast<uintptr_t>(scratch) % alignof(float) == 0,
                 "depthwise_conv2d backward_weight (CUDA): scratch must be 4-byte aligned");
  FV_CHECK_TYPE(gy.dtype == x.dtype, "depthwise_conv2d (CUDA): grad_output and input dtypes differ");
  FV_CHECK_VALUE(pl.items <= int64_t(INT_MAX), "depthwise_conv2d backward_weight (CUDA): too many tiles (",
                 pl.items, ")");
  const bool bias = gb != nullptr && gb->data != nullptr;
  float* part = static_cast<float*>(scratch);
  const cudaStream_t st = as_stream(stream);

  if (pl.chunks > 0) {
    switch (dtype_code(x.dtype, "input")) {
      case kF32: run_wgrad<float>(gy, x, bias, pr, pl, part, st); break;
      case kF16: run_wgrad<__half>(gy, x, bias, pr, pl, part, st); break;
      default: run_wgrad<__nv_bfloat16>(gy, x, bias, pr, pl, part, st); break;
    }
  }

  ReduceArgs r{};
  r.part = part;
  r.C = s.c;
  r.taps = s.kh * s.kw;
  r.kw = s.kw;
  r.chunks = pl.chunks;
  r.gw = gw.data;
  r.gwdt = dtype_code(gw.dtype, "grad_weight");
  weight_strides(gw, &r.gsc, &r.gsi, &r.gsj, "grad_weight");
  r.gb = nullptr;
  if (bias) {
    r.gb = gb->data;
    r.gbdt = dtype_code(gb->dtype, "grad_bias");
    r.gbs = gb->ndim >= 1 ? gb->strides[0] : 1;
  }
  const int64_t total = r.C * r.taps + (bias ? r.C : 0);
  launch(wgrad_reduce, tl::imin(tl::num_tiles(total, kThreads), int64_t(1) << 16), 0, st, r);
}

}  // namespace cuda
}  // namespace dwconv
}  // namespace fastvis
