// The few vector operations the CPU kernels use, for one instruction set per build: AVX-512 (F, BW, VL,
// DQ) when the compiler targets it, else AVX2 + FMA + F16C. Every kernel is written once against these, so
// the AVX-512 build runs the same algorithm as the AVX2 build, which every machine of this project can
// test, with twice the lanes. fp16 and bf16 loads widen to fp32 exactly.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

namespace simd {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
constexpr int kWidth = 16;
using F = __m512;
inline F zero() { return _mm512_setzero_ps(); }
inline F set1(float v) { return _mm512_set1_ps(v); }
inline F load(const float* p) { return _mm512_loadu_ps(p); }
inline F load(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline F load(const c10::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// The first 8 lanes from p, the rest zero: the tail of a row whose length is a multiple of 8 only.
inline F load8(const float* p) { return _mm512_maskz_loadu_ps(0x00FF, p); }
inline F load8(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline F load8(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(
      _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
inline void store8(float* p, F v) { _mm512_mask_storeu_ps(p, 0x00FF, v); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F div(F a, F b) { return _mm512_div_ps(a, b); }
inline F max(F a, F b) { return _mm512_max_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F abs(F a) { return _mm512_abs_ps(a); }
inline F sign_of(F a) { return _mm512_and_ps(a, _mm512_set1_ps(-0.f)); }
inline F xor_(F a, F b) { return _mm512_xor_ps(a, b); }
inline F round_nearest(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F scale_by_pow2(F a, F n) {  // a * 2^n for integral n in [-126, 127]
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(a, _mm512_castsi512_ps(bits));
}
inline float sum(F v) {  // fixed order: halves added pairwise down to one lane
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float max_of(F v) { return _mm512_reduce_max_ps(v); }
#else
constexpr int kWidth = 8;
using F = __m256;
inline F zero() { return _mm256_setzero_ps(); }
inline F set1(float v) { return _mm256_set1_ps(v); }
inline F load(const float* p) { return _mm256_loadu_ps(p); }
inline F load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline F load(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <typename T>
inline F load8(const T* p) { return load(p); }
inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
inline void store8(float* p, F v) { _mm256_storeu_ps(p, v); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F div(F a, F b) { return _mm256_div_ps(a, b); }
inline F max(F a, F b) { return _mm256_max_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline F sign_of(F a) { return _mm256_and_ps(a, _mm256_set1_ps(-0.f)); }
inline F xor_(F a, F b) { return _mm256_xor_ps(a, b); }
inline F round_nearest(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F scale_by_pow2(F a, F n) {
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(a, _mm256_castsi256_ps(bits));
}
inline float sum(F v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float max_of(F v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

// exp(x) for x <= 0 (softmax weights, erf): Cody-Waite range reduction and a degree-5 polynomial (Cephes'
// expf), about 1 ulp; below -87 it gives 0.
inline F exp_nonpositive(F x) {
  x = max(x, set1(-87.f));
  const F n = round_nearest(mul(x, set1(1.44269504088896341f)));
  F r = fmadd(n, set1(-0.693359375f), x);
  r = fmadd(n, set1(2.12194440e-4f), r);
  F p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(mul(p, r), r, add(r, set1(1.f)));
  return scale_by_pow2(p, n);
}

// erf(x) by Abramowitz and Stegun 7.1.26 (absolute error <= 1.5e-7), the formula torch's vectorised CPU
// erf uses, so the fused GeGLU agrees with F.gelu to that error.
inline F erf(F x) {
  const F sign = sign_of(x), a = abs(x), one = set1(1.f);
  const F t = div(one, fmadd(set1(0.3275911f), a, one));
  F r = fmadd(set1(1.061405429f), t, set1(-1.453152027f));
  r = fmadd(r, t, set1(1.421413741f));
  r = fmadd(r, t, set1(-0.284496736f));
  r = fmadd(r, t, set1(0.254829592f));
  const F e = exp_nonpositive(xor_(mul(a, a), set1(-0.f)));
  return xor_(sign, fmadd(xor_(mul(e, t), set1(-0.f)), r, one));
}

}  // namespace simd
