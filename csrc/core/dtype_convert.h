// Internal: scalar conversions between storage dtypes and accumulation types.
#pragma once
#include <cstdint>
#include <cstring>

#include "fastvis/tensor.h"

namespace fastvis {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Typed element access used by reference code and packing.
template <class T> struct Elem;
template <> struct Elem<float> {
  static double get(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static void set(void* p, int64_t i, double v) { static_cast<float*>(p)[i] = static_cast<float>(v); }
};
template <> struct Elem<double> {
  static double get(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
  static void set(void* p, int64_t i, double v) { static_cast<double*>(p)[i] = v; }
};
template <> struct Elem<bfloat16> {
  static double get(const void* p, int64_t i) {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  static void set(void* p, int64_t i, double v) {
    static_cast<uint16_t*>(p)[i] = float_to_bf16(static_cast<float>(v));
  }
};

// Reads element i (in elements, strides already applied) of a CPU buffer of dtype dt.
inline double load_as_double(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::Float32: return Elem<float>::get(p, i);
    case DType::Float64: return Elem<double>::get(p, i);
    case DType::BFloat16: return Elem<bfloat16>::get(p, i);
    default: return 0.0;
  }
}
inline void store_from_double(DType dt, void* p, int64_t i, double v) {
  switch (dt) {
    case DType::Float32: Elem<float>::set(p, i, v); break;
    case DType::Float64: Elem<double>::set(p, i, v); break;
    case DType::BFloat16: Elem<bfloat16>::set(p, i, v); break;
    default: break;
  }
}

}  // namespace fastvis
