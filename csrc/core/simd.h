// Internal: the SIMD vocabulary of the CPU kernels, for files compiled once per
// instruction set (FV_ISA defined, see CMakeLists.txt). Everything lives in
// fastvis::simd::FV_ISA, so each ISA's copy has its own symbols (an inline function
// compiled with AVX2 must never be picked by the linker for the baseline path).
//
// 32-byte vectors through GCC/Clang vector extensions: one AVX register when built for
// AVX2, two SSE/NEON registers on the baseline. VT<A> is the vector of accumulation
// type A (8 floats or 4 doubles); vload/vstore convert from/to the storage type T
// (float, double, or bfloat16 widened to float, rounded to nearest even on store).
#pragma once
#include <cstdint>
#include <cstring>

#include "core/dtype_convert.h"
#include "fastvis/tensor.h"

#ifndef FV_ISA
#error "core/simd.h belongs to per-ISA kernel files (FV_ISA undefined)"
#endif

namespace fastvis {
namespace simd {
namespace FV_ISA {

template <class A> struct VT;
template <> struct VT<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <> struct VT<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

template <class T, class A> inline typename VT<A>::V vload(const T* p) {
  typename VT<A>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <> inline VT<float>::V vload<bfloat16, float>(const bfloat16* p) {
  U16x8 h;
  std::memcpy(&h, p, sizeof h);
  const U32x8 u = __builtin_convertvector(h, U32x8) << 16;
  VT<float>::V v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
template <class T, class A> inline void vstore(T* p, typename VT<A>::V v) {
  std::memcpy(p, &v, sizeof v);
}
// Round to nearest even; NaN stays a quiet NaN (as float_to_bf16).
template <> inline void vstore<bfloat16, float>(bfloat16* p, VT<float>::V v) {
  U32x8 u;
  std::memcpy(&u, &v, sizeof u);
  const U32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U32x8 quiet = (u >> 16) | 0x40u;
  const U32x8 is_nan = (U32x8)((u & 0x7fffffffu) > 0x7f800000u);
  const U16x8 h = __builtin_convertvector((quiet & is_nan) | (rounded & ~is_nan), U16x8);
  std::memcpy(p, &h, sizeof h);
}

template <class T, class A> inline A sload(const T* p) { return static_cast<A>(*p); }
template <> inline float sload<bfloat16, float>(const bfloat16* p) { return bf16_to_float(p->bits); }
template <class T, class A> inline void sstore(T* p, A v) { *p = static_cast<T>(v); }
template <> inline void sstore<bfloat16, float>(bfloat16* p, float v) { p->bits = float_to_bf16(v); }

// The first n (0 < n <= L) elements; the other lanes are zero.
template <class T, class A> inline typename VT<A>::V vload_n(const T* p, int64_t n) {
  constexpr int L = VT<A>::L;
  if (n >= L) return vload<T, A>(p);
  T tmp[L];
  std::memset(static_cast<void*>(tmp), 0, sizeof tmp);
  std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
  return vload<T, A>(tmp);
}
template <class T, class A> inline void vstore_n(T* p, typename VT<A>::V v, int64_t n) {
  constexpr int L = VT<A>::L;
  if (n >= L) return vstore<T, A>(p, v);
  T tmp[L];
  vstore<T, A>(tmp, v);
  std::memcpy(static_cast<void*>(p), tmp, static_cast<size_t>(n) * sizeof(T));
}

}  // namespace FV_ISA
}  // namespace simd
}  // namespace fastvis
