// Internal: the SIMD vocabulary of the CPU kernels, for files compiled once per
// instruction set (FV_ISA defined, see CMakeLists.txt). Everything lives in
// fastvis::simd::FV_ISA, so each ISA's copy has its own symbols (an inline function
// compiled with AVX2 must never be picked by the linker for the baseline path).
//
// Vectors through GCC/Clang vector extensions, FV_VEC_BYTES wide: 64 bytes (one ZMM
// register) when built for AVX-512, else 32 (one AVX register when built for AVX2, two
// SSE/NEON registers on the baseline). VT<A> is the vector of accumulation type A
// (L = 16 / 8 floats or 8 / 4 doubles); kernels are written in L, never in a lane count.
// vload/vstore convert from/to the storage type T (float, double, or bfloat16 widened to
// float, rounded to nearest even on store). The width of the selected path is known
// outside the per-ISA files as cpu::vector_bytes() (core/cpu_features.h), for plans and
// scratch sizes that depend on it.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/dtype_convert.h"
#include "fastvis/tensor.h"

#ifndef FV_ISA
#error "core/simd.h belongs to per-ISA kernel files (FV_ISA undefined)"
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define FV_VEC_BYTES 64
#else
#define FV_VEC_BYTES 32
#endif

namespace fastvis {
namespace simd {
namespace FV_ISA {

template <class A> struct VT;
template <> struct VT<float> {
  typedef float V __attribute__((vector_size(FV_VEC_BYTES)));
  static constexpr int L = FV_VEC_BYTES / 4;
};
template <> struct VT<double> {
  typedef double V __attribute__((vector_size(FV_VEC_BYTES)));
  static constexpr int L = FV_VEC_BYTES / 8;
};

// bfloat16 <-> float conversion lanes: one 16-bit value per float lane.
typedef uint16_t U16xL __attribute__((vector_size(FV_VEC_BYTES / 2)));
typedef uint32_t U32xL __attribute__((vector_size(FV_VEC_BYTES)));

template <class T, class A> inline typename VT<A>::V vload(const T* p) {
  typename VT<A>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <> inline VT<float>::V vload<bfloat16, float>(const bfloat16* p) {
  U16xL h;
  std::memcpy(&h, p, sizeof h);
  const U32xL u = __builtin_convertvector(h, U32xL) << 16;
  VT<float>::V v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
template <class T, class A> inline void vstore(T* p, typename VT<A>::V v) {
  std::memcpy(p, &v, sizeof v);
}
// Round to nearest even; NaN stays a quiet NaN (as float_to_bf16).
template <> inline void vstore<bfloat16, float>(bfloat16* p, VT<float>::V v) {
  U32xL u;
  std::memcpy(&u, &v, sizeof u);
  const U32xL rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U32xL quiet = (u >> 16) | 0x40u;
  const U32xL is_nan = (U32xL)((u & 0x7fffffffu) > 0x7f800000u);
  const U16xL h = __builtin_convertvector((quiet & is_nan) | (rounded & ~is_nan), U16xL);
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
#if defined(__AVX512F__)
  // Masked loads: no bytes past p + n are touched (faults are suppressed on masked lanes).
  if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
    return (typename VT<A>::V)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  } else if constexpr (std::is_same<T, double>::value && std::is_same<A, double>::value) {
    return (typename VT<A>::V)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1u), p);
  }
#endif
  T tmp[L];
  std::memset(static_cast<void*>(tmp), 0, sizeof tmp);
  std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
  return vload<T, A>(tmp);
}
template <class T, class A> inline void vstore_n(T* p, typename VT<A>::V v, int64_t n) {
  constexpr int L = VT<A>::L;
  if (n >= L) return vstore<T, A>(p, v);
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
    return _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), (__m512)v);
  } else if constexpr (std::is_same<T, double>::value && std::is_same<A, double>::value) {
    return _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1u), (__m512d)v);
  }
#endif
  T tmp[L];
  vstore<T, A>(tmp, v);
  std::memcpy(static_cast<void*>(p), tmp, static_cast<size_t>(n) * sizeof(T));
}

}  // namespace FV_ISA
}  // namespace simd
}  // namespace fastvis
