// Internal: GELU and its derivative for files compiled once per instruction set (FV_ISA
// defined), shared by the fused blocks and the GRN family's GELU prologue. Everything
// lives in fastvis::simd::FV_ISA, next to the SIMD vocabulary of core/simd.h.
//
// Exact GELU: gelu(x) = x * Phi(x), Phi the standard normal CDF, gelu'(x) = Phi(x) +
// x * phi(x). Phi(x) = erfc(-x / sqrt 2) / 2, and erfc(z) for z >= 0 comes from the
// Abramowitz-Stegun 7.1.26 rational form erfc(z) ~ t (a1 + t (a2 + ... + t a5)) exp(-z^2),
// t = 1 / (1 + p z), |error| < 1.5e-7, which is float's resolution of Phi. For z < 0,
// erfc(z) = 2 - erfc(-z). exp(-z^2) = exp(-x^2 / 2) is also phi's exponential. That form
// serves the derivative (which needs phi's exponential anyway). GELU alone takes Phi
// without an exponential: erf(x / sqrt 2) ~ x P(x^2) / Q(x^2) for |x| <= 5.5437 (erf there
// is 1 - 3e-8), P and Q of degree 5 with positive coefficients (Q >= 1), a rational
// minimax fit of our own (float64 Lawson iteration on 30000 Chebyshev points; absolute
// error 2e-8 in float64, 4e-7 with float32 arithmetic); |x| is clamped to 5.5437 beyond.
// About 20 vector operations instead of ~35 (the exponential is most of them).
// tanh GELU: gelu(x) = x * s, s = 1 / (1 + exp(-2u)) = (1 + tanh u) / 2,
// u = sqrt(2/pi) (x + 0.044715 x^3); gelu'(x) = s + x * 2 s (1 - s) u'(x), with 1 - s
// taken as exp(-2u) s (no cancellation where s ~ 1).
// float runs vectorised (an own exp: range reduction by ln 2, degree-7 Taylor
// polynomial, exponent bits), double runs the C library scalar functions.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/simd.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastvis {
namespace simd {
namespace FV_ISA {

using VF = VT<float>::V;
typedef int32_t IV __attribute__((vector_size(FV_VEC_BYTES)));  // an int32 per float lane

inline VF splatf(float a) { return VF{} + a; }
inline VF vsel(IV m, VF a, VF b) {  // m ? a : b, lane by lane (m is 0 or -1)
#if defined(__AVX512F__)
  return (VF)_mm512_mask_blend_ps(_mm512_movepi32_mask((__m512i)m), (__m512)b, (__m512)a);
#elif defined(__AVX2__)
  return (VF)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)m);
#else
  IV ia, ib;
  std::memcpy(&ia, &a, sizeof ia);
  std::memcpy(&ib, &b, sizeof ib);
  const IV r = (m & ia) | (~m & ib);
  VF out;
  std::memcpy(&out, &r, sizeof out);
  return out;
#endif
}

// exp(x) for float lanes, x clamped to [-87, 88]: x = n ln2 + r, |r| <= ln2/2 (n the
// nearest integer of x / ln2; ties either way), exp(r) by its degree-7 Taylor polynomial,
// 2^n by the exponent bits.
inline VF vexp(VF x) {
#if defined(__AVX512F__)
  x = (VF)_mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const VF nf = (VF)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const IV ni = (IV)_mm512_cvtps_epi32((__m512)nf);
#elif defined(__AVX2__)
  x = (VF)_mm256_min_ps(_mm256_max_ps((__m256)x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const VF nf = (VF)_mm256_round_ps((__m256)(x * 1.44269504088896341f),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const IV ni = (IV)_mm256_cvtps_epi32((__m256)nf);
#else
  x = vsel((IV)(x < -87.0f), splatf(-87.0f), x);
  x = vsel((IV)(x > 88.0f), splatf(88.0f), x);
  const VF t = x * 1.44269504088896341f;
  const VF half = vsel((IV)(t < 0.0f), splatf(-0.5f), splatf(0.5f));
  const IV ni = __builtin_convertvector(t + half, IV);  // round half away from zero
  const VF nf = __builtin_convertvector(ni, VF);
#endif
  const VF r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187045e-6f;  // |r| <= ln2/2
  VF p = splatf(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IV bits = (ni + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 1 / d for d >= 1 (the only divisors below): with AVX the 12-bit reciprocal estimate and
// one Newton step (relative error ~1e-7, float's resolution), a fraction of a division's
// cost; a plain division otherwise.
inline VF vrecip(VF d) {
#if defined(__AVX512F__)
  const VF r = (VF)_mm512_rcp14_ps((__m512)d);  // 14-bit estimate
  return r * (2.0f - d * r);
#elif defined(__AVX2__)
  const VF r = (VF)_mm256_rcp_ps((__m256)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

constexpr float kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f, kP = 0.3275911f;
constexpr double kSqrt2OverPi = 0.79788456080286535588, kCoef = 0.044715,
                 kInvSqrt2Pi = 0.39894228040143267794, kInvSqrt2 = 0.70710678118654752440;

// Phi(x) and phi(x) for exact GELU.
inline void vphi(VF x, VF& cdf, VF& pdf) {
  const VF e = vexp(x * x * -0.5f);
#if defined(__AVX512F__)
  const VF z = (VF)_mm512_abs_ps((__m512)x) * static_cast<float>(kInvSqrt2);
#elif defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const VF z = (VF)_mm256_andnot_ps(sign, (__m256)x) * static_cast<float>(kInvSqrt2);
#else
  const IV neg = (IV)(x < 0.0f);
  const VF z = vsel(neg, -x, x) * static_cast<float>(kInvSqrt2);
#endif
  const VF t = vrecip(1.0f + kP * z);
  const VF q = t * (kA1 + t * (kA2 + t * (kA3 + t * (kA4 + t * kA5)))) * e;  // erfc(|x|/sqrt2)
#if defined(__AVX512F__)
  // Phi(x) = q / 2 where the sign bit of x is set (-0 included: q = 1 there), else 1 - q / 2.
  cdf = (VF)_mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512((__m512)x)),
                                 (__m512)(1.0f - 0.5f * q), (__m512)(0.5f * q));
#elif defined(__AVX2__)
  // Phi(x) = q / 2 for x < 0 (sign bit set, -0 included: q = 1 there), else 1 - q / 2.
  cdf = (VF)_mm256_blendv_ps((__m256)(1.0f - 0.5f * q), (__m256)(0.5f * q), (__m256)x);
#else
  cdf = vsel(neg, 0.5f * q, 1.0f - 0.5f * q);
#endif
  pdf = e * static_cast<float>(kInvSqrt2Pi);
}

// erf(x / sqrt 2) by the rational form (see the top of the file).
constexpr float kErfXMax = 5.543717165f;
constexpr float kErfP0 = 7.978844585e-01f, kErfP1 = 6.815215065e-02f, kErfP2 = 9.379837769e-03f,
                kErfP3 = 3.419120769e-04f, kErfP4 = 1.270484409e-05f, kErfP5 = 4.496159782e-08f;
constexpr float kErfQ1 = 2.520818873e-01f, kErfQ2 = 2.877108186e-02f, kErfQ3 = 1.896528658e-03f,
                kErfQ4 = 7.425658559e-05f, kErfQ5 = 1.189703197e-06f;

inline VF verf_scaled(VF x) {
#if defined(__AVX512F__)
  const VF xc = (VF)_mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(-kErfXMax)),
                                  _mm512_set1_ps(kErfXMax));
#elif defined(__AVX2__)
  const VF xc = (VF)_mm256_min_ps(_mm256_max_ps((__m256)x, _mm256_set1_ps(-kErfXMax)),
                                  _mm256_set1_ps(kErfXMax));
#else
  VF xc = vsel((IV)(x < -kErfXMax), splatf(-kErfXMax), x);
  xc = vsel((IV)(xc > kErfXMax), splatf(kErfXMax), xc);
#endif
  // (a NaN x may leave xc finite; the callers multiply by x, which keeps the NaN)
  const VF t = xc * xc;
  VF p = splatf(kErfP5);
  p = p * t + kErfP4;
  p = p * t + kErfP3;
  p = p * t + kErfP2;
  p = p * t + kErfP1;
  p = p * t + kErfP0;
  VF q = splatf(kErfQ5);
  q = q * t + kErfQ4;
  q = q * t + kErfQ3;
  q = q * t + kErfQ2;
  q = q * t + kErfQ1;
  q = q * t + 1.0f;
  return xc * p * vrecip(q);  // q >= 1
}

inline VF vgelu(VF x, bool tanh_form) {
  if (tanh_form) {
    const VF u = static_cast<float>(kSqrt2OverPi) * (x + static_cast<float>(kCoef) * x * x * x);
    return x * vrecip(1.0f + vexp(-2.0f * u));
  }
  const VF h = 0.5f * x;  // gelu = x (1 + erf(x / sqrt 2)) / 2
  return h + h * verf_scaled(x);
}

inline VF vgelu_grad(VF x, bool tanh_form) {
  if (tanh_form) {
    const VF u = static_cast<float>(kSqrt2OverPi) * (x + static_cast<float>(kCoef) * x * x * x);
    const VF e = vexp(-2.0f * u);
    const VF s = vrecip(1.0f + e);  // 1 - s = e s, without cancellation where s ~ 1
    const VF du = static_cast<float>(kSqrt2OverPi) * (1.0f + static_cast<float>(3 * kCoef) * x * x);
    return s + x * 2.0f * s * (e * s) * du;
  }
  VF cdf, pdf;
  vphi(x, cdf, pdf);
  return cdf + x * pdf;
}

// gelu(x) and gelu'(x) together (one exp).
inline void vgelu_both(VF x, bool tanh_form, VF& g, VF& dg) {
  if (tanh_form) {
    const VF u = static_cast<float>(kSqrt2OverPi) * (x + static_cast<float>(kCoef) * x * x * x);
    const VF e = vexp(-2.0f * u);
    const VF s = vrecip(1.0f + e);
    const VF du = static_cast<float>(kSqrt2OverPi) * (1.0f + static_cast<float>(3 * kCoef) * x * x);
    g = x * s;
    dg = s + x * 2.0f * s * (e * s) * du;
    return;
  }
  VF cdf, pdf;
  vphi(x, cdf, pdf);
  g = x * cdf;
  dg = cdf + x * pdf;
}

inline double sgelu(double x, bool tanh_form) {
  if (tanh_form) {
    const double u = kSqrt2OverPi * (x + kCoef * x * x * x);
    return 0.5 * x * (1.0 + std::tanh(u));
  }
  return 0.5 * x * std::erfc(-x * kInvSqrt2);
}

inline double sgelu_grad(double x, bool tanh_form) {
  if (tanh_form) {
    const double u = kSqrt2OverPi * (x + kCoef * x * x * x);
    const double th = std::tanh(u);
    const double du = kSqrt2OverPi * (1.0 + 3.0 * kCoef * x * x);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
  }
  return 0.5 * std::erfc(-x * kInvSqrt2) + x * kInvSqrt2Pi * std::exp(-0.5 * x * x);
}

}  // namespace FV_ISA
}  // namespace simd
}  // namespace fastvis
