// Encoder self-attention (no mask, not causal) in fp32 on CPU, for prefill / encoder sizes
// (BERT-base B8 S128); q, k, v float32, or all three bfloat16 (fp32 math on converted rows, bf16
// output rounded to nearest even):
//   attention_blocked(q (B, H, Sq, D), k (B, H, Sk, D), v (B, H, Sk, D), float scale, bool portable=False)
//     -> (B, H, Sq, D)   (portable=True forces the plain loops, for tests)
//   out[b, h, i] = softmax_j(q[b, h, i] . k[b, h, j] * scale) v[b, h, j]
// q, k, v may be any strided views with unit stride along D (e.g. the three slices of a fused QKV
// projection); the output is a (B, Sq, H, D) contiguous buffer viewed as (B, H, Sq, D), so the
// output projection reads it without a transpose copy.
// One task per (batch, head) over at::parallel_for; per task K^T is packed once (D x Sk, zero
// padded, L1/L2 resident), then blocks of 6 queries run QK^T, an exact-max softmax and PV in
// AVX-512 registers. torch's CPU SDPA reached ~120 GFLOP/s at this size (3.3 ms per layer for 0.4
// GFLOP); its blocked GEMM calls are small. Without AVX-512 (runtime check) a portable loop runs
// (correct, slow: fastlm.fused routes here only when cpu_has_avx512() holds).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTLM_ATT_X86 1
#define FASTLM_AVX512 __attribute__((target("avx512f,avx512dq,fma")))
#endif

#include "cpu_kernels.h"

namespace fastlm {
namespace {

constexpr int kRows = 6;   // queries per block (6 x 4 accumulators)
constexpr int kCols = 64;  // score columns per QK^T step (4 vectors of 16)

// The CPU has AVX-512F + DQ and the extension's ISA choice allows AVX-512 (FASTLM_CPU_ISA=avx2
// on an AVX-512 machine takes the portable loop here, as an AVX2-only CPU does).
bool cpu_has_avx512() {
#ifdef FASTLM_ATT_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return ok && cpu::avx512_allowed();
#else
  return false;
#endif
}

#ifdef FASTLM_ATT_X86
// exp(x) for x <= 0 (softmax after subtracting the row max): 2^n * p(r), r = x - n ln2 in
// [-ln2/2, ln2/2], degree-6 polynomial (Cephes expf coefficients); ~1 ulp. x below -87 gives 0.
FASTLM_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// One (batch, head): rows of q / k / v are lq / lk / lv floats apart, output rows ld_out.
// kt: scratch (D, Sp) with Sp = Sk rounded up to kCols; sc: scratch (kRows, Sp).
FASTLM_AVX512 void head_avx512(const float* q, const float* k, const float* v, float* out, int64_t lq, int64_t lk,
                               int64_t lv, int64_t ld_out, int64_t Sq, int64_t S, int64_t D, float scale, float* kt,
                               float* sc) {
  const int64_t Sp = (S + kCols - 1) / kCols * kCols;
  for (int64_t d = 0; d < D; ++d) {  // K^T * scale, zero past S
    float* row = kt + d * Sp;
    for (int64_t j = 0; j < S; ++j) row[j] = k[j * lk + d] * scale;
    for (int64_t j = S; j < Sp; ++j) row[j] = 0.f;
  }
  for (int64_t i0 = 0; i0 < Sq; i0 += kRows) {
    const float* qr[kRows];
    for (int r = 0; r < kRows; ++r) qr[r] = q + std::min<int64_t>(i0 + r, Sq - 1) * lq;  // tail rows repeat the last
    // scores: sc[r][j] = (q_r . k_j) * scale
    for (int64_t j0 = 0; j0 < Sp; j0 += kCols) {
      __m512 acc[kRows][4];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const float* kr = kt + d * Sp + j0;
        const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16), k2 = _mm512_loadu_ps(kr + 32),
                     k3 = _mm512_loadu_ps(kr + 48);
        for (int r = 0; r < kRows; ++r) {
          const __m512 a = _mm512_set1_ps(qr[r][d]);
          acc[r][0] = _mm512_fmadd_ps(a, k0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(a, k1, acc[r][1]);
          acc[r][2] = _mm512_fmadd_ps(a, k2, acc[r][2]);
          acc[r][3] = _mm512_fmadd_ps(a, k3, acc[r][3]);
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(sc + r * Sp + j0 + 16 * c, acc[r][c]);
    }
    // softmax over the S real columns (unnormalised exp kept; 1 / sum applied to the output)
    float inv[kRows];
    const int64_t Sv = S / 16 * 16;
    const __mmask16 tail = static_cast<__mmask16>((1u << (S - Sv)) - 1u);
    for (int r = 0; r < kRows; ++r) {
      float* s = sc + r * Sp;
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < Sv; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
      if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, s + Sv));
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < Sv; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      if (tail) {
        const __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + Sv), m)));
        _mm512_storeu_ps(s + Sv, e);  // zeros past S (within the padded row)
        sum = _mm512_add_ps(sum, e);
      }
      for (int64_t j = Sv + (tail ? 16 : 0); j < Sp; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
      inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    // out[r] = P[r] V / sum, 64 columns of D at a time
    const int nr = static_cast<int>(std::min<int64_t>(kRows, Sq - i0));
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (D - d0) / 16));
      __m512 acc[kRows][4];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < S; ++j) {
        const float* vr = v + j * lv + d0;
        __m512 vv[4];
        for (int c = 0; c < 4; ++c) vv[c] = c < nv ? _mm512_loadu_ps(vr + 16 * c) : _mm512_setzero_ps();
        for (int r = 0; r < kRows; ++r) {
          const __m512 p = _mm512_set1_ps(sc[r * Sp + j]);
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
        }
      }
      for (int r = 0; r < nr; ++r) {
        const __m512 s = _mm512_set1_ps(inv[r]);
        float* o = out + (i0 + r) * ld_out + d0;
        for (int c = 0; c < nv; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[r][c], s));
      }
    }
  }
}
#endif

// bf16 in and out (the encoders in bfloat16): each (batch, head) converts its q / k / v rows to
// float32 scratch (exact), runs head_avx512 unchanged (fp32 QK^T, softmax and PV) and rounds the
// output to bf16 (round to nearest even, as torch's .to(torch.bfloat16)). The conversions cost
// ~3 x S x D element moves per head against S x S x D x 4 flops.
#ifdef FASTLM_ATT_X86
FASTLM_AVX512 inline void bf16_rows_to_f32(const at::BFloat16* src, int64_t ld, int64_t rows, int64_t D, float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src + i * ld);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + d)));
      _mm512_storeu_ps(dst + i * D + d, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
  }
}

// float32 -> bf16, round to nearest even; NaN stays a quiet NaN.
FASTLM_AVX512 inline __m256i f32_to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

FASTLM_AVX512 void head_avx512_bf16(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v,
                                    at::BFloat16* out, int64_t lq, int64_t lk, int64_t lv, int64_t ld_out, int64_t Sq,
                                    int64_t S, int64_t D, float scale, float* kt, float* sc, float* qf, float* kf,
                                    float* vf, float* of) {
  bf16_rows_to_f32(q, lq, Sq, D, qf);
  bf16_rows_to_f32(k, lk, S, D, kf);
  bf16_rows_to_f32(v, lv, S, D, vf);
  head_avx512(qf, kf, vf, of, D, D, D, D, Sq, S, D, scale, kt, sc);
  for (int64_t i = 0; i < Sq; ++i) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out + i * ld_out);
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), f32_to_bf16(_mm512_loadu_ps(of + i * D + d)));
  }
}
#endif

// bf16 q / k / v on a CPU with AVX512_BF16 (Zen 4, Intel Cooper Lake / Sapphire Rapids on):
// QK^T and PV run vdpbf16ps on the bf16 inputs (bf16 products, fp32 accumulation), nothing is
// converted to fp32 scratch. Layouts per (batch, head): K as pairs along D, (D/2, Sp) 32-bit
// words (word (dp, j) = k[j, 2dp : 2dp + 2]), so one 64-column score tile per D pair is
// acc[r] += pair(q[r, 2dp:2dp+2]) . 16 words; V as pairs along the keys, (ceil(S/2), D) 32-bit
// words (word (jp, d) = (v[2jp, d], v[2jp + 1, d])). Softmax in fp32 (exact max, the same exp as
// the fp32 kernel); the probabilities are rounded to bf16 for PV (as flash attention does in bf16)
// and their sum is taken over the rounded values, so each output row is an exact convex
// combination of V's rows up to fp32 accumulation. Output rounded to nearest even (vcvtneps2bf16).
// Measured on AMD Zen 4, BERT-base B8 S128 one layer, one thread (CPU time): 5.3 ms for the
// fp32-on-converted-rows kernel; see bench/results/bert-bf16-2026-12-07-zen4-loaded.md.
#ifdef FASTLM_ATT_X86
#define FASTLM_AVX512BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")))

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// out rows r < nr of PV for NV vectors of 16 output columns at d0: acc = P[r] . V pairs, / sum.
template <int NV>
FASTLM_AVX512BF16 inline void pv_tile(const uint16_t* pb, int64_t Sp, const uint16_t* vpk, int64_t D, int64_t d0,
                                      int64_t npairs, const float* inv, int nr, uint16_t* out, int64_t ld_out) {
  __m512 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < npairs; ++jp) {
    const uint16_t* vr = vpk + (jp * D + d0) * 2;
    __m512bh vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vr + 32 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(pb + r * Sp + 2 * jp)));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, vv[c]);
    }
  }
  for (int r = 0; r < nr; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    uint16_t* o = out + r * ld_out + d0;
    for (int c = 0; c < NV; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], s)));
  }
}

// One (batch, head), bf16 rows of q / k / v lq / lk / lv elements apart, output rows ld_out.
// Scratch: ktp (D/2) x Sp words, sc kRows x Sp floats, pb kRows x Sp bf16, vpk ceil(S/2) x D words.
FASTLM_AVX512BF16 void head_dpbf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t lq,
                                   int64_t lk, int64_t lv, int64_t ld_out, int64_t Sq, int64_t S, int64_t D,
                                   float scale, uint32_t* ktp, float* sc, uint16_t* pb, uint16_t* vpk) {
  const int64_t Sp = (S + kCols - 1) / kCols * kCols, D2 = D / 2, npairs = (S + 1) / 2;
  // K pairs along D, transposed to (D/2, Sp) by 16-key gathers (a scalar transpose's strided
  // stores took a quarter of the head's time); zeros past S
  const __m512i kidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(lk)));
  for (int64_t dp = 0; dp < D2; ++dp) {
    uint32_t* dst = ktp + dp * Sp;
    for (int64_t j0 = 0; j0 < Sp; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, S - j0));
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      const __m512i w = n > 0 ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, kidx, k + j0 * lk + 2 * dp, 2)
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + j0, w);
    }
  }
  for (int64_t jp = 0; jp < npairs; ++jp) {  // V pairs along the keys (a zero row past an odd S)
    const uint16_t* a = v + 2 * jp * lv;
    const uint16_t* b = 2 * jp + 1 < S ? v + (2 * jp + 1) * lv : nullptr;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d)));
      const __m512i hi = b != nullptr
                             ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                     reinterpret_cast<const __m256i*>(b + d))), 16)
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(vpk + (jp * D + d) * 2, _mm512_or_si512(lo, hi));
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t i0 = 0; i0 < Sq; i0 += kRows) {
    const uint16_t* qr[kRows];
    for (int r = 0; r < kRows; ++r) qr[r] = q + std::min<int64_t>(i0 + r, Sq - 1) * lq;  // tail rows repeat the last
    for (int64_t j0 = 0; j0 < Sp; j0 += kCols) {  // sc[r][j] = (q_r . k_j) * scale
      __m512 acc[kRows][4];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t dp = 0; dp < D2; ++dp) {
        const uint32_t* kr = ktp + dp * Sp + j0;
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr), k1 = (__m512bh)_mm512_loadu_si512(kr + 16),
                       k2 = (__m512bh)_mm512_loadu_si512(kr + 32), k3 = (__m512bh)_mm512_loadu_si512(kr + 48);
        for (int r = 0; r < kRows; ++r) {
          const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(qr[r] + 2 * dp)));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
          acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, k2);
          acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, k3);
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(sc + r * Sp + j0 + 16 * c, _mm512_mul_ps(acc[r][c], vscale));
    }
    // softmax over the S real columns in fp32; P rounded to bf16, 1 / (sum of the rounded P) kept
    float inv[kRows];
    const int64_t Sv = S / 16 * 16;
    const __mmask16 tail = static_cast<__mmask16>((1u << (S - Sv)) - 1u);
    for (int r = 0; r < kRows; ++r) {
      const float* s = sc + r * Sp;
      uint16_t* p = pb + r * Sp;
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < Sv; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
      if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, s + Sv));
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < Sv; j += 16) {
        const __m256bh e = _mm512_cvtneps_pbh(exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)e);
        sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(e));
      }
      if (tail) {
        const __m512 ef = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + Sv), m)));
        const __m256bh e = _mm512_cvtneps_pbh(ef);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + Sv), (__m256i)e);  // zeros past S
        sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(e));
      }
      for (int64_t j = Sv + (tail ? 16 : 0); j < Sp; j += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), _mm256_setzero_si256());
      inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    const int nr = static_cast<int>(std::min<int64_t>(kRows, Sq - i0));
    uint16_t* o = out + i0 * ld_out;
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) pv_tile<4>(pb, Sp, vpk, D, d0, npairs, inv, nr, o, ld_out);
    switch ((D - d0) / 16) {
      case 3: pv_tile<3>(pb, Sp, vpk, D, d0, npairs, inv, nr, o, ld_out); break;
      case 2: pv_tile<2>(pb, Sp, vpk, D, d0, npairs, inv, nr, o, ld_out); break;
      case 1: pv_tile<1>(pb, Sp, vpk, D, d0, npairs, inv, nr, o, ld_out); break;
      default: break;
    }
  }
}
#endif

// Which bf16 kernel runs: "avx512_bf16" (head_dpbf16), "avx512" (fp32 math on converted rows,
// head_avx512_bf16) or "portable". Forced per process for tests and A/B timing
// (attention_blocked_bf16_path); auto picks the best the CPU and FASTLM_CPU_ISA allow.
std::atomic<int> g_bf16_forced{-1};  // -1 auto, 0 portable, 1 avx512, 2 avx512_bf16
const char* const kBf16AttPaths[] = {"portable", "avx512", "avx512_bf16"};

bool cpu_has_dpbf16() {
#ifdef FASTLM_ATT_X86
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok && cpu_has_avx512();
#else
  return false;
#endif
}

int bf16_att_path() {
  const int forced = g_bf16_forced.load(std::memory_order_relaxed);
  if (forced >= 0) return forced;
  return cpu_has_dpbf16() ? 2 : (cpu_has_avx512() ? 1 : 0);
}

std::string attention_blocked_bf16_path(c10::string_view path) {
  if (path == "auto") {
    g_bf16_forced.store(-1);
  } else if (!path.empty()) {
    int want = -1;
    for (int i = 0; i < 3; ++i)
      if (path == kBf16AttPaths[i]) want = i;
    TORCH_CHECK_VALUE(want >= 0, "attention_blocked_bf16_path: path must be \"\", \"auto\", \"avx512_bf16\", "
                      "\"avx512\" or \"portable\", got \"", path, "\"");
    TORCH_CHECK_VALUE(want == 0 || (want == 1 && cpu_has_avx512()) || (want == 2 && cpu_has_dpbf16()),
                      "attention_blocked_bf16_path: this CPU (or FASTLM_CPU_ISA) cannot run the \"", path, "\" path");
    g_bf16_forced.store(want);
  }
  return kBf16AttPaths[bf16_att_path()];
}

// The portable path: attention_decode.cpp's row kernel, one query row at a time.
void head_portable(const float* q, const float* k, const float* v, float* out, int64_t lq, int64_t lk, int64_t lv,
                   int64_t ld_out, int64_t Sq, int64_t S, int64_t D, float scale, float* sc) {
  for (int64_t i = 0; i < Sq; ++i) cpu::attend_row(q + i * lq, k, lk, v, lv, S, D, scale, out + i * ld_out, sc);
}

void check_qkv(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "attention_blocked: ", name,
                   " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "attention_blocked: ", name, " has dtype ", t.scalar_type(),
                   " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "attention_blocked (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 4, "attention_blocked: ", name, " must be 4-D (B, H, S, D), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(3) == q.size(3),
                    "attention_blocked: ", name, " must match q in B, H and D, got ", t.sizes(), " vs q ", q.sizes());
}

at::Tensor attention_blocked_cpu_f32(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                     double scale, bool portable) {
  TORCH_CHECK_VALUE(k_in.size(2) == v_in.size(2), "attention_blocked: k and v must have the same length, got ",
                    k_in.size(2), " and ", v_in.size(2));
  const int64_t B = q_in.size(0), H = q_in.size(1), Sq = q_in.size(2), S = k_in.size(2), D = q_in.size(3);
  TORCH_CHECK_VALUE(B > 0 && H > 0 && Sq > 0 && S > 0, "attention_blocked: empty input (q ", q_in.sizes(), ", k ",
                    k_in.sizes(), ")");
  TORCH_CHECK_VALUE(D % 16 == 0 && D <= 256, "attention_blocked: head dim must be a multiple of 16 up to 256, got ",
                    D);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attention_blocked: scale must be finite, got ", scale);
  // unit stride along D (a view of a fused QKV projection has it); anything else is copied once
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  at::Tensor out = at::empty({B, Sq, H, D}, q.options());  // (B, Sq, H, D) memory
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t ld_out = H * D;
  const int64_t Sp = (S + kCols - 1) / kCols * kCols;
  const bool fast = cpu_has_avx512() && !portable;  // portable=True: the plain loops (tests)
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(fast ? D * Sp : 0), scores(fast ? kRows * Sp : S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const float* qh = qp + b * q.stride(0) + h * q.stride(1);
      const float* kh = kp + b * k.stride(0) + h * k.stride(1);
      const float* vh = vp + b * v.stride(0) + h * v.stride(1);
      float* oh = op + b * Sq * ld_out + h * D;
#ifdef FASTLM_ATT_X86
      if (fast) {
        head_avx512(qh, kh, vh, oh, q.stride(2), k.stride(2), v.stride(2), ld_out, Sq, S, D, sc, kt.data(),
                    scores.data());
        continue;
      }
#endif
      head_portable(qh, kh, vh, oh, q.stride(2), k.stride(2), v.stride(2), ld_out, Sq, S, D, sc, scores.data());
    }
  });
  return out.transpose(1, 2);  // (B, H, Sq, D) view
}

// bf16 q / k / v: float32 math on converted rows (head_avx512_bf16 with AVX-512, else the
// float32 reference on float32 copies, rounded back).
at::Tensor attention_blocked_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float sc,
                                  bool fast) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), S = k.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Sq, H, D}, q.options());  // (B, Sq, H, D) memory, as the fp32 path
  if (!fast) {  // portable: fp32 copies through the fp32 path's plain loops
    at::Tensor o = attention_blocked_cpu_f32(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), sc, true);
    out.transpose(1, 2).copy_(o);
    return out.transpose(1, 2);
  }
#ifdef FASTLM_ATT_X86
  const at::BFloat16* qp = q.const_data_ptr<at::BFloat16>();
  const at::BFloat16* kp = k.const_data_ptr<at::BFloat16>();
  const at::BFloat16* vp = v.const_data_ptr<at::BFloat16>();
  at::BFloat16* op = out.mutable_data_ptr<at::BFloat16>();
  const int64_t ld_out = H * D;
  const int64_t Sp = (S + kCols - 1) / kCols * kCols;
  if (bf16_att_path() == 2) {  // vdpbf16ps on the bf16 rows
    const uint16_t* q16 = reinterpret_cast<const uint16_t*>(qp);
    const uint16_t* k16 = reinterpret_cast<const uint16_t*>(kp);
    const uint16_t* v16 = reinterpret_cast<const uint16_t*>(vp);
    uint16_t* o16 = reinterpret_cast<uint16_t*>(op);
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<uint32_t> ktp(D / 2 * Sp), vpk((S + 1) / 2 * D);
      std::vector<float> scores(kRows * Sp);
      std::vector<uint16_t> pb(kRows * Sp);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, h = t % H;
        head_dpbf16(q16 + b * q.stride(0) + h * q.stride(1), k16 + b * k.stride(0) + h * k.stride(1),
                    v16 + b * v.stride(0) + h * v.stride(1), o16 + b * Sq * ld_out + h * D, q.stride(2), k.stride(2),
                    v.stride(2), ld_out, Sq, S, D, sc, ktp.data(), scores.data(), pb.data(),
                    reinterpret_cast<uint16_t*>(vpk.data()));
      }
    });
    return out.transpose(1, 2);
  }
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(D * Sp), scores(kRows * Sp), qf(Sq * D), kf(S * D), vf(S * D), of(Sq * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      head_avx512_bf16(qp + b * q.stride(0) + h * q.stride(1), kp + b * k.stride(0) + h * k.stride(1),
                       vp + b * v.stride(0) + h * v.stride(1), op + b * Sq * ld_out + h * D, q.stride(2), k.stride(2),
                       v.stride(2), ld_out, Sq, S, D, sc, kt.data(), scores.data(), qf.data(), kf.data(), vf.data(),
                       of.data());
    }
  });
#endif
  return out.transpose(1, 2);  // (B, H, Sq, D) view
}

at::Tensor attention_blocked_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 double scale, bool portable) {
  check_qkv(q_in, "q", q_in);
  check_qkv(k_in, "k", q_in);
  check_qkv(v_in, "v", q_in);
  if (q_in.scalar_type() == at::kFloat) return attention_blocked_cpu_f32(q_in, k_in, v_in, scale, portable);
  TORCH_CHECK_VALUE(k_in.size(2) == v_in.size(2), "attention_blocked: k and v must have the same length, got ",
                    k_in.size(2), " and ", v_in.size(2));
  const int64_t D = q_in.size(3);
  TORCH_CHECK_VALUE(q_in.size(0) > 0 && q_in.size(1) > 0 && q_in.size(2) > 0 && k_in.size(2) > 0,
                    "attention_blocked: empty input (q ", q_in.sizes(), ", k ", k_in.sizes(), ")");
  TORCH_CHECK_VALUE(D % 16 == 0 && D <= 256, "attention_blocked: head dim must be a multiple of 16 up to 256, got ",
                    D);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attention_blocked: scale must be finite, got ", scale);
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  return attention_blocked_bf16(q, k, v, static_cast<float>(scale), !portable && bf16_att_path() >= 1);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("attention_blocked(Tensor q, Tensor k, Tensor v, float scale, bool portable=False) -> Tensor");
  m.def("cpu_has_avx512() -> bool", [] { return cpu_has_avx512(); });
  m.def("attention_blocked_bf16_path(str path='') -> str", &attention_blocked_bf16_path);
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("attention_blocked", &attention_blocked_cpu); }

}  // namespace fastlm
