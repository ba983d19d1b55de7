// A small host emulation of the CUDA built-ins the fused ConvNeXt block's device code
// uses (csrc/ops/convnext_block/cuda/convnext_block_kernels.cuh), so that the very
// source of the kernels can be compiled with a host compiler and run on a CPU:
//
//   * a thread block is 256 cooperative fibers (ucontext), run one after the other until
//     each reaches a barrier; __syncthreads / __syncwarp are barriers over the block /
//     the warp, and a state in which no fiber can move (e.g. a barrier that only some
//     threads reach) is reported as a deadlock;
//   * __shfl_xor_sync exchanges values through the warp; the tensor-core MMA atoms
//     (cute::SM80_16x8x16_F32F16F16F32_TN and ..._F32BF16BF16F32_TN) are warp-collective:
//     every lane deposits its fragments, then each lane computes its own results from the
//     matrices reassembled with the PTX ISA's fragment tables (transcribed here
//     independently of block_tile_math.h), products in double, rounded to float;
//   * __half / __nv_bfloat16 with round-to-nearest-even conversions (fp16 through the
//     compiler's _Float16), so the 16-bit rounding of the GEMM operands is modelled;
//   * dynamic shared memory is a fresh allocation per block, filled with 0xFF bytes (NaN
//     as float and as fp16/bf16) and followed by a guard zone checked after the block;
//     fibers run in ascending or descending thread order (set_reverse), so a missing
//     barrier makes some thread read unwritten (NaN) data.
//
// This is not a GPU: it checks the kernels' logic, indexing, barriers and numerics, not
// timing, memory ordering beyond barriers, or the real hardware's arithmetic.
#pragma once
#include <math.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define FV_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dyn_smem()

namespace emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
}  // namespace emu

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline emu::Dim3 threadIdx, blockIdx, gridDim, blockDim;

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ------------------------------------------------------------------ 16-bit types
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
namespace emu {
inline float h2f(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return float(h);
}
inline uint16_t f2h(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float bf2f(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
}  // namespace emu
inline float __half2float(__half h) { return emu::h2f(h.x); }
inline __half __float2half_rn(float f) { return __half{emu::f2h(f)}; }
inline __half __ushort_as_half(uint16_t b) { return __half{b}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf2f(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{emu::f2bf(f)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t b) { return __nv_bfloat16{b}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

// ------------------------------------------------------------------ fibers
namespace emu {
constexpr int kMaxThreads = 256;
constexpr size_t kStack = 256 * 1024;
constexpr size_t kGuard = 4096;

struct Sched {
  int nthreads = 0;
  ucontext_t main_ctx;
  ucontext_t ctx[kMaxThreads];
  std::vector<char> stacks;
  bool done[kMaxThreads];
  int cur = -1;
  int blk_arrived = 0;
  unsigned blk_gen = 0;
  int warp_arrived[kMaxThreads / 32];
  unsigned warp_gen[kMaxThreads / 32];
  long progress = 0;
  float shfl[kMaxThreads / 32][32];
  uint32_t ma[kMaxThreads / 32][32][4], mb[kMaxThreads / 32][32][2];
  float mc[kMaxThreads / 32][32][4];
  std::function<void()> body;
  bool reverse = false;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  long blocks_run = 0, barriers = 0;
  bool failed = false;
  char failure[256] = {0};
};
inline Sched& S() {
  static Sched s;
  return s;
}
inline void set_reverse(bool r) { S().reverse = r; }
inline unsigned char* dyn_smem() { return S().smem; }

inline void fail(const char* msg) {
  Sched& s = S();
  if (!s.failed) std::snprintf(s.failure, sizeof s.failure, "%s", msg);
  s.failed = true;
}

inline void yield() {
  Sched& s = S();
  swapcontext(&s.ctx[s.cur], &s.main_ctx);
}

inline void block_barrier() {
  Sched& s = S();
  const unsigned g = s.blk_gen;
  ++s.progress;
  ++s.barriers;
  if (++s.blk_arrived == s.nthreads) {
    s.blk_arrived = 0;
    ++s.blk_gen;
    return;
  }
  while (s.blk_gen == g) yield();
}

inline void warp_barrier() {
  Sched& s = S();
  const int w = s.cur / 32;
  const unsigned g = s.warp_gen[w];
  ++s.progress;
  if (++s.warp_arrived[w] == 32) {
    s.warp_arrived[w] = 0;
    ++s.warp_gen[w];
    return;
  }
  while (s.warp_gen[w] == g) yield();
}

inline void trampoline() {
  Sched& s = S();
  s.body();
  s.done[s.cur] = true;
  ++s.progress;
}

// Runs `body` as a block of n threads; false (with S().failure) on a deadlock.
inline bool run_block(const std::function<void()>& body, int n) {
  Sched& s = S();
  if (s.stacks.empty()) s.stacks.resize(size_t(kMaxThreads) * kStack);
  s.nthreads = n;
  s.body = body;
  s.blk_arrived = 0;
  for (int w = 0; w < kMaxThreads / 32; ++w) s.warp_arrived[w] = 0;
  for (int t = 0; t < n; ++t) {
    getcontext(&s.ctx[t]);
    s.ctx[t].uc_stack.ss_sp = s.stacks.data() + size_t(t) * kStack;
    s.ctx[t].uc_stack.ss_size = kStack;
    s.ctx[t].uc_link = &s.main_ctx;
    makecontext(&s.ctx[t], trampoline, 0);
    s.done[t] = false;
  }
  blockDim.x = unsigned(n);
  for (;;) {
    const long before = s.progress;
    bool any = false;
    for (int k = 0; k < n; ++k) {
      const int t = s.reverse ? n - 1 - k : k;
      if (s.done[t]) continue;
      any = true;
      s.cur = t;
      threadIdx.x = unsigned(t);
      swapcontext(&s.main_ctx, &s.ctx[t]);
    }
    if (!any) break;
    if (s.progress == before) {
      fail("deadlock: no thread of the block can proceed (a barrier not reached by all threads?)");
      return false;
    }
  }
  ++s.blocks_run;
  return true;
}

// Launches kernel<<<grid, 256, smem>>>(args), block by block.
struct Launch {
  template <class Kernel, class Args>
  void operator()(Kernel kernel, dim3 grid, size_t smem, const Args& args) const {
    Sched& s = S();
    if (s.failed) return;
    gridDim.x = grid.x;
    gridDim.y = grid.y;
    gridDim.z = 1;
    const size_t bytes = (smem + 15) / 16 * 16;
    std::vector<unsigned char> buf(bytes + kGuard + 16);
    unsigned char* base = buf.data();
    while (reinterpret_cast<uintptr_t>(base) % 16) ++base;
    for (unsigned by = 0; by < grid.y && !s.failed; ++by)
      for (unsigned bx = 0; bx < grid.x && !s.failed; ++bx) {
        std::memset(base, 0xFF, bytes + kGuard);
        s.smem = base;
        s.smem_bytes = smem;
        blockIdx.x = bx;
        blockIdx.y = by;
        blockIdx.z = 0;
        run_block([&] { kernel(args); }, 256);
        for (size_t i = bytes; i < bytes + kGuard; ++i)
          if (base[i] != 0xFF) {
            fail("write past the end of the dynamic shared memory");
            break;
          }
      }
    s.smem = nullptr;
  }
};

// The warp-collective m16n8k16 MMA: D = A * B + C for this lane's four D elements.
// Fragment tables of the PTX ISA (groupID = lane >> 2, threadID_in_group = lane % 4):
//   A element (row, k): lane = (row % 8) * 4 + (k % 8) / 2, value index
//                       (k % 2) + 2 * (row >= 8) + 4 * (k >= 8)
//   B element (k, n):   lane = n * 4 + (k % 8) / 2, value index (k % 2) + 2 * (k >= 8)
//   C element i of a lane: row = groupID + 8 * (i >= 2), col = threadID_in_group * 2 + i % 2
// A register holds values 2q (low 16 bits) and 2q + 1 (high 16 bits).
inline void mma(bool bf16, float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4],
                const uint32_t (&b)[2], const float (&c)[4]) {
  Sched& s = S();
  const int w = s.cur / 32, lane = s.cur % 32;
  for (int q = 0; q < 4; ++q) s.ma[w][lane][q] = a[q];
  for (int q = 0; q < 2; ++q) s.mb[w][lane][q] = b[q];
  for (int q = 0; q < 4; ++q) s.mc[w][lane][q] = c[q];
  warp_barrier();
  auto val = [&](uint32_t reg, int half) {
    const uint16_t bits = uint16_t(half ? reg >> 16 : reg & 0xffffu);
    return double(bf16 ? bf2f(bits) : h2f(bits));
  };
  auto A = [&](int row, int k) {
    const int l = (row % 8) * 4 + (k % 8) / 2, v = (k % 2) + 2 * (row >= 8) + 4 * (k >= 8);
    return val(s.ma[w][l][v / 2], v % 2);
  };
  auto B = [&](int k, int n) {
    const int l = n * 4 + (k % 8) / 2, v = (k % 2) + 2 * (k >= 8);
    return val(s.mb[w][l][v / 2], v % 2);
  };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i >= 2), col = (lane % 4) * 2 + i % 2;
    double acc = double(s.mc[w][lane][i]);
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = float(acc);
  }
  warp_barrier();  // every lane has read the deposits before the next MMA overwrites them
  d0 = out[0];
  d1 = out[1];
  d2 = out[2];
  d3 = out[3];
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::warp_barrier();
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask is not emulated");
  emu::Sched& s = emu::S();
  const int w = s.cur / 32, lane = s.cur % 32;
  s.shfl[w][lane] = v;
  emu::warp_barrier();
  const float r = s.shfl[w][lane ^ lane_mask];
  emu::warp_barrier();
  return r;
}

namespace cute {
struct SM80_16x8x16_F32F16F16F32_TN {
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1,
                  float const& c0, float const& c1, float const& c2, float const& c3) {
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    const float c[4] = {c0, c1, c2, c3};
    emu::mma(false, d0, d1, d2, d3, a, b, c);
  }
};
struct SM80_16x8x16_F32BF16BF16F32_TN {
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1,
                  float const& c0, float const& c1, float const& c2, float const& c3) {
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    const float c[4] = {c0, c1, c2, c3};
    emu::mma(true, d0, d1, d2, d3, a, b, c);
  }
};
}  // namespace cute
