// One query row against S key / value rows on the CPU, the single-row attention that the decode
// steps (fp32 and bf16 KV caches) and the small-attention op share:
//
//   out[t] = sum_j p_j * v_j[t],  p = softmax(scale * q . k_j over j < S)
//
// q and out: D fp32 values; k_j = k + j * ks and v_j = v + j * vs (elements); KV elements are
// float (fp32 cache) or uint16_t (bf16 bits, widened exactly to fp32). All math is fp32: the q . k
// dots, the softmax (max-subtracted exp), the weighted sum of values. s is a scratch of S floats.
// Two bodies: `attend::portable` (plain C++, written for the compiler to vectorise: 8 partial sums
// per dot) and, on x86, `attend::avx2` (AVX2 + FMA intrinsics, run by the AVX-512 CPUs too: at
// D = 64 a head row is 8 ymm and the step is bound by the few hundred keys, not the vector width).
// They differ only in the order of the partial sums of the dots. The caller picks by
// cpu::isa_level().
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gemv_bf16.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_ATTEND_X86 1
#include <immintrin.h>
#define FASTLM_ATTEND_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace fastlm {
namespace attend {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return cpu::bf16_to_f32(x); }

// Softmax of s[0, S) in place (max-subtracted), returning 1 / sum.
inline float softmax_unnormalised(float* s, int64_t S) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; ++j) mx = std::max(mx, s[j]);
  float sum = 0.0f;
  for (int64_t j = 0; j < S; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return 1.0f / sum;
}

template <class T>
__attribute__((always_inline)) inline void portable(const float* q, const T* k, int64_t ks, const T* v, int64_t vs,
                                                    int64_t S, int64_t D, float scale, float* out, float* s) {
  for (int64_t j = 0; j < S; ++j) {
    const T* kj = k + j * ks;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: the compiler vectorises the dot
    int64_t t = 0;
    for (; t + 8 <= D; t += 8)
      for (int l = 0; l < 8; ++l) acc[l] += q[t + l] * to_f32(kj[t + l]);
    float d = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; t < D; ++t) d += q[t] * to_f32(kj[t]);
    s[j] = d * scale;
  }
  const float inv = softmax_unnormalised(s, S);
  for (int64_t t = 0; t < D; ++t) out[t] = 0.0f;
  for (int64_t j = 0; j < S; ++j) {
    const float p = s[j] * inv;
    const T* vj = v + j * vs;
    for (int64_t t = 0; t < D; ++t) out[t] += p * to_f32(vj[t]);
  }
}

#ifdef FASTLM_ATTEND_X86
FASTLM_ATTEND_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// 8 bf16 -> 8 fp32: zero-extend to 32 bits, shift into the high half (exact)
FASTLM_ATTEND_AVX2 inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

FASTLM_ATTEND_AVX2 inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// The dots as two FMA chains per key; the values accumulate in 8 registers per 64 output columns
// (the baseline SSE2 build had stored `out` back every key: it may alias v as far as the compiler
// knows), then 8 columns a register, then a scalar tail for D % 8.
template <class T>
FASTLM_ATTEND_AVX2 void avx2(const float* q, const T* k, int64_t ks, const T* v, int64_t vs, int64_t S, int64_t D,
                             float scale, float* out, float* s) {
  const int64_t D8 = D & ~int64_t{7};
  for (int64_t j = 0; j < S; ++j) {
    const T* kj = k + j * ks;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= D8; t += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + t), load8(kj + t), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + t + 8), load8(kj + t + 8), a1);
    }
    if (t < D8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + t), load8(kj + t), a0);
    float d = hsum8(_mm256_add_ps(a0, a1));
    for (t = D8; t < D; ++t) d += q[t] * to_f32(kj[t]);
    s[j] = d * scale;
  }
  const float inv = softmax_unnormalised(s, S);
  int64_t t0 = 0;
  for (; t0 + 64 <= D8; t0 += 64) {  // 64 columns: 8 accumulators
    __m256 a[8];
    for (int b = 0; b < 8; ++b) a[b] = _mm256_setzero_ps();
    for (int64_t j = 0; j < S; ++j) {
      const __m256 p = _mm256_set1_ps(s[j] * inv);
      const T* vj = v + j * vs + t0;
      for (int b = 0; b < 8; ++b) a[b] = _mm256_fmadd_ps(p, load8(vj + 8 * b), a[b]);
    }
    for (int b = 0; b < 8; ++b) _mm256_storeu_ps(out + t0 + 8 * b, a[b]);
  }
  for (; t0 < D8; t0 += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t j = 0; j < S; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(s[j] * inv), load8(v + j * vs + t0), a);
    _mm256_storeu_ps(out + t0, a);
  }
  for (int64_t t = D8; t < D; ++t) {
    float a = 0.0f;
    for (int64_t j = 0; j < S; ++j) a += s[j] * inv * to_f32(v[j * vs + t]);
    out[t] = a;
  }
}
#endif

}  // namespace attend
}  // namespace fastlm
