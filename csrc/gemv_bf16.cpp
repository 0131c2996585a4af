// bf16 packed linear layers on the CPU: y = act(x @ W^T + bias) + residual with W in bf16 and
// x, the accumulation and y in fp32. For decode (one row) the GEMV streams half the bytes of the
// fp32 panels of gemv.cpp, so it runs up to twice as fast where memory bandwidth is the limit.
//
// Layout (packed once at load, fastlm/linear.py pack_bf16_panels): "pair panels" of 16 output
// channels, (ceil(N / 16), ceil(K / 2), 32) bf16, element [p, kk, 2j + t] = W[16p + j, 2kk + t]
// (zeros past N and K). One 64-byte row of a panel holds two k's for 16 channels, the operand
// layout of vdpbf16ps; the other paths read the same bytes:
//   avx512_bf16 (AVX512_BF16): vdpbf16ps. x is split into bf16 pairs hi = bf16(x) and
//       lo = bf16(x - hi) (x = hi + lo to ~2^-17 relative), two vdpbf16ps per panel row: the
//       products of bf16 numbers are exact in fp32, so this computes fp32 x times bf16 W.
//   avx512 (AVX-512F):  the even k's are the low halves of each 32-bit lane: (w << 16) is them
//       as fp32, (w & 0xffff0000) the odd k's; two FMAs with broadcasts of x[2kk], x[2kk + 1].
//   avx2 (AVX2 + FMA):  the same shift / mask on two ymm per panel row.
//   portable:           scalar loops (FASTLM_CPU_ISA=portable).
// Runtime dispatch: the best path the CPU runs, capped by FASTLM_CPU_ISA / cpu_isa() (gemv.cpp);
// torch.ops.fastlm.bf16_gemv_path("avx512") etc. forces one (tests run each).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_BF16_X86 1
#include <immintrin.h>
#define FASTLM_BF16_AVX2 __attribute__((target("avx2,fma")))
#define FASTLM_BF16_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define FASTLM_BF16_AVX512BF16 __attribute__((target("avx512f,avx512bf16,avx2,fma")))
#endif

#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "fast_math.h"
#include "gemv_bf16.h"

namespace fastlm {
namespace {

constexpr int64_t kNR = 16;     // output channels per panel
constexpr int64_t kRow = 32;    // bf16 per panel row (two k's x 16 channels)
const char* const kPathNames[] = {"portable", "avx2", "avx512", "avx512_bf16"};

bool cpu_has_avx512_bf16() {
#ifdef FASTLM_BF16_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// the best path allowed by the packed-GEMV ISA (gemv.cpp: CPU, FASTLM_CPU_ISA, cpu_isa())
int auto_path() {
  const int isa = cpu::isa_level();  // 0 portable, 1 avx2, 2 avx512
  if (isa >= 2) return cpu_has_avx512_bf16() ? cpu::kBf16Avx512Bf16 : cpu::kBf16Avx512;
  return isa == 1 ? cpu::kBf16Avx2 : cpu::kBf16Portable;
}

std::atomic<int> g_forced{-1};  // -1: auto_path()

// Query ("") or force ("auto", "avx512_bf16", "avx512", "avx2", "portable") the bf16 GEMV path.
std::string bf16_gemv_path(c10::string_view path) {
  if (path == "auto") {
    g_forced.store(-1);
  } else if (!path.empty()) {
    int want = -1;
    for (int i = 0; i < 4; ++i)
      if (path == kPathNames[i]) want = i;
    TORCH_CHECK_VALUE(want >= 0, "bf16_gemv_path: path must be \"\", \"auto\", \"avx512_bf16\", \"avx512\", \"avx2\" "
                      "or \"portable\", got \"", path, "\"");
#ifdef FASTLM_BF16_X86
    const bool ok = want == cpu::kBf16Portable || (want == cpu::kBf16Avx2 && __builtin_cpu_supports("avx2") &&
                                                   __builtin_cpu_supports("fma")) ||
                    (want == cpu::kBf16Avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                     __builtin_cpu_supports("fma")) ||
                    (want == cpu::kBf16Avx512Bf16 && cpu_has_avx512_bf16());
#else
    const bool ok = want == cpu::kBf16Portable;
#endif
    TORCH_CHECK_VALUE(ok, "bf16_gemv_path: this CPU cannot run the \"", path, "\" path");
    g_forced.store(want);
  }
  return kPathNames[cpu::bf16_path()];
}

struct Ep {
  const float* bias;      // (N,) or null
  const float* residual;  // (M, N) or null
  float* y;               // (M, N) fp32 output, or null when yb is set
  int64_t N;
  int act;
  const uint16_t* rb = nullptr;  // (M, N) bf16 residual (instead of residual), or null
  uint16_t* yb = nullptr;        // (M, N) bf16 output (rounded to nearest even), or null
};

// acc (mr, 16) -> y rows r0.., channels n0..n0+nv: + bias, activation, + residual
inline void finish(const float* acc, int mr, const Ep& e, int64_t r0, int64_t n0, int64_t nv) {
  float bi[kNR], v[kNR];
  for (int64_t j = 0; j < kNR; ++j) bi[j] = 0.0f;
  if (e.bias != nullptr)
    for (int64_t j = 0; j < nv; ++j) bi[j] = e.bias[n0 + j];
  for (int r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < kNR; ++j) v[j] = acc[r * kNR + j] + bi[j];
    if (e.act == 1) {
      for (int64_t j = 0; j < kNR; ++j) v[j] = fm::gelu_erf(v[j]);
    } else if (e.act == 2) {
      for (int64_t j = 0; j < kNR; ++j) v[j] = fm::gelu_tanh(v[j]);
    }
    const int64_t o = (r0 + r) * e.N + n0;
    if (e.residual != nullptr)
      for (int64_t j = 0; j < nv; ++j) v[j] += e.residual[o + j];
    else if (e.rb != nullptr)
      for (int64_t j = 0; j < nv; ++j) v[j] += cpu::bf16_to_f32(e.rb[o + j]);
    if (e.yb != nullptr)
      for (int64_t j = 0; j < nv; ++j) e.yb[o + j] = cpu::f32_to_bf16(v[j]);
    else
      for (int64_t j = 0; j < nv; ++j) e.y[o + j] = v[j];
  }
}

// x operands of one row tile: fp32 rows (ldx >= 2 * K2 floats, zero-padded to even K) for the
// FMA paths, or bf16 hi / lo pairs (K2 uint32 per row) for vdpbf16ps
struct XRows {
  const float* x;
  int64_t ldx;
  const uint32_t* hi;
  const uint32_t* lo;
};

// ---- portable -----------------------------------------------------------------------------
template <int MR>
void tile_portable(const XRows& xr, int64_t K2, const uint16_t* p, const Ep& e, int64_t r0, int64_t n0, int64_t nv,
                   int64_t) {
  float a[MR * kNR];
  for (int i = 0; i < MR * kNR; ++i) a[i] = 0.0f;
  for (int64_t kk = 0; kk < K2; ++kk) {
    float w0[kNR], w1[kNR];
    for (int64_t j = 0; j < kNR; ++j) {
      w0[j] = cpu::bf16_to_f32(p[kk * kRow + 2 * j]);
      w1[j] = cpu::bf16_to_f32(p[kk * kRow + 2 * j + 1]);
    }
    for (int r = 0; r < MR; ++r) {
      const float x0 = xr.x[r * xr.ldx + 2 * kk], x1 = xr.x[r * xr.ldx + 2 * kk + 1];
      for (int64_t j = 0; j < kNR; ++j) a[r * kNR + j] += x0 * w0[j] + x1 * w1[j];
    }
  }
  finish(a, MR, e, r0, n0, nv);
}

#ifdef FASTLM_BF16_X86
// ---- AVX2 + FMA: two ymm per panel row (channels 0-7, 8-15), even / odd k by shift / mask ----
#define FASTLM_BF16_STEP(U_, KK_) \
  do { \
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (KK_) * kRow)); \
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (KK_) * kRow + 16)); \
    const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)); \
    const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, mask)), o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, mask)); \
    for (int r = 0; r < MR; ++r) { \
      const __m256 xe = _mm256_broadcast_ss(xr.x + r * xr.ldx + 2 * (KK_)); \
      const __m256 xo = _mm256_broadcast_ss(xr.x + r * xr.ldx + 2 * (KK_) + 1); \
      a[U_][r][0] = _mm256_fmadd_ps(xe, e0, a[U_][r][0]); \
      a[U_][r][1] = _mm256_fmadd_ps(xe, e1, a[U_][r][1]); \
      a[U_][r][2] = _mm256_fmadd_ps(xo, o0, a[U_][r][2]); \
      a[U_][r][3] = _mm256_fmadd_ps(xo, o1, a[U_][r][3]); \
    } \
  } while (0)
template <int MR>
FASTLM_BF16_AVX2 void tile_avx2(const XRows& xr, int64_t K2, const uint16_t* p, const Ep& e, int64_t r0, int64_t n0,
                                int64_t nv, int64_t pf) {
  constexpr int U = MR == 1 ? 2 : 1;  // U * MR * 4 accumulators + 4 weights + 2 broadcasts <= 16 ymm
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const char* pb = reinterpret_cast<const char*>(p);
  __m256 a[U][MR][4];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < 4; ++i) a[u][r][i] = _mm256_setzero_ps();
  int64_t kk = 0;
  for (; kk + U <= K2; kk += U) {
    if (pf > 0)
      for (int u = 0; u < U; ++u) _mm_prefetch(pb + (kk + u) * kRow * 2 + pf, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) FASTLM_BF16_STEP(u, kk + u);
  }
  for (; kk < K2; ++kk) FASTLM_BF16_STEP(0, kk);
  alignas(32) float acc[MR * kNR];
  for (int r = 0; r < MR; ++r) {
    __m256 s0 = _mm256_add_ps(a[0][r][0], a[0][r][2]), s1 = _mm256_add_ps(a[0][r][1], a[0][r][3]);
    for (int u = 1; u < U; ++u) {
      s0 = _mm256_add_ps(s0, _mm256_add_ps(a[u][r][0], a[u][r][2]));
      s1 = _mm256_add_ps(s1, _mm256_add_ps(a[u][r][1], a[u][r][3]));
    }
    _mm256_store_ps(acc + r * kNR, s0);
    _mm256_store_ps(acc + r * kNR + 8, s1);
  }
  finish(acc, MR, e, r0, n0, nv);
}
#undef FASTLM_BF16_STEP

// One row (the decode GEMV, M = 1), AVX2. tile_avx2<1> kept its 2 x 4 accumulators in an array
// that gcc 12 stored to the stack on every step of the loop (objdump: 9 ymm stores per two panel
// rows, and reloads), as gemv.cpp's tile1_avx2 found for the int8 tile; named accumulators stay in
// registers (8 accumulators, the mask, 4 widened weights and 2 broadcasts: 15 of 16 ymm). Same sums
// in the same order as tile_avx2<1> (bit-equal).
FASTLM_BF16_AVX2 void tile1_avx2(const XRows& xr, int64_t K2, const uint16_t* p, const Ep& e, int64_t r0, int64_t n0,
                                 int64_t nv, int64_t pf) {
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const char* pb = reinterpret_cast<const char*>(p);
  const float* x = xr.x;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
#define FASTLM_BF16_ROW(KK_, C0, C1, C2, C3) \
  do { \
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (KK_) * kRow)); \
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (KK_) * kRow + 16)); \
    const __m256 xe = _mm256_broadcast_ss(x + 2 * (KK_)), xo = _mm256_broadcast_ss(x + 2 * (KK_) + 1); \
    C0 = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), C0); \
    C1 = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), C1); \
    C2 = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(w0, mask)), C2); \
    C3 = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(w1, mask)), C3); \
  } while (0)
  int64_t kk = 0;
  for (; kk + 2 <= K2; kk += 2) {
    if (pf > 0) {
      _mm_prefetch(pb + kk * kRow * 2 + pf, _MM_HINT_T0);
      _mm_prefetch(pb + (kk + 1) * kRow * 2 + pf, _MM_HINT_T0);
    }
    FASTLM_BF16_ROW(kk, a0, a1, a2, a3);
    FASTLM_BF16_ROW(kk + 1, b0, b1, b2, b3);
  }
  for (; kk < K2; ++kk) FASTLM_BF16_ROW(kk, a0, a1, a2, a3);
#undef FASTLM_BF16_ROW
  alignas(32) float acc[kNR];
  _mm256_store_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(b0, b2)));
  _mm256_store_ps(acc + 8, _mm256_add_ps(_mm256_add_ps(a1, a3), _mm256_add_ps(b1, b3)));
  finish(acc, 1, e, r0, n0, nv);
}

// ---- AVX-512F: one zmm per panel row, even / odd k by shift / mask ------------------------
#define FASTLM_BF16_STEP(U_, KK_) \
  do { \
    const __m512i w = _mm512_loadu_si512(p + (KK_) * kRow); \
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); \
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, mask)); \
    for (int r = 0; r < MR; ++r) { \
      a[U_][r][0] = _mm512_fmadd_ps(_mm512_set1_ps(xr.x[r * xr.ldx + 2 * (KK_)]), we, a[U_][r][0]); \
      a[U_][r][1] = _mm512_fmadd_ps(_mm512_set1_ps(xr.x[r * xr.ldx + 2 * (KK_) + 1]), wo, a[U_][r][1]); \
    } \
  } while (0)
template <int MR>
FASTLM_BF16_AVX512 void tile_avx512(const XRows& xr, int64_t K2, const uint16_t* p, const Ep& e, int64_t r0,
                                    int64_t n0, int64_t nv, int64_t pf) {
  constexpr int U = MR == 1 ? 4 : (MR == 2 ? 2 : 1);  // U * MR * 2 <= 12 accumulators
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const char* pb = reinterpret_cast<const char*>(p);
  __m512 a[U][MR][2];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < MR; ++r) a[u][r][0] = a[u][r][1] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + U <= K2; kk += U) {
    if (pf > 0)
      for (int u = 0; u < U; ++u) _mm_prefetch(pb + (kk + u) * kRow * 2 + pf, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) FASTLM_BF16_STEP(u, kk + u);
  }
  for (; kk < K2; ++kk) FASTLM_BF16_STEP(0, kk);
  alignas(64) float acc[MR * kNR];
  for (int r = 0; r < MR; ++r) {
    __m512 s = _mm512_add_ps(a[0][r][0], a[0][r][1]);
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, _mm512_add_ps(a[u][r][0], a[u][r][1]));
    _mm512_store_ps(acc + r * kNR, s);
  }
  finish(acc, MR, e, r0, n0, nv);
}
#undef FASTLM_BF16_STEP

// ---- AVX512_BF16: vdpbf16ps on hi / lo pairs of x -------------------------------------------
#define FASTLM_BF16_STEP(U_, KK_) \
  do { \
    const __m512bh w = (__m512bh)_mm512_loadu_si512(p + (KK_) * kRow); \
    for (int r = 0; r < MR; ++r) { \
      const __m512bh xh = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr.hi[r * K2 + (KK_)])); \
      const __m512bh xl = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr.lo[r * K2 + (KK_)])); \
      a[U_][r][0] = _mm512_dpbf16_ps(a[U_][r][0], xh, w); \
      a[U_][r][1] = _mm512_dpbf16_ps(a[U_][r][1], xl, w); \
    } \
  } while (0)
template <int MR>
FASTLM_BF16_AVX512BF16 void tile_avx512_bf16(const XRows& xr, int64_t K2, const uint16_t* p, const Ep& e, int64_t r0,
                                             int64_t n0, int64_t nv, int64_t pf) {
  constexpr int U = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  const char* pb = reinterpret_cast<const char*>(p);
  __m512 a[U][MR][2];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < MR; ++r) a[u][r][0] = a[u][r][1] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + U <= K2; kk += U) {
    if (pf > 0)
      for (int u = 0; u < U; ++u) _mm_prefetch(pb + (kk + u) * kRow * 2 + pf, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) FASTLM_BF16_STEP(u, kk + u);
  }
  for (; kk < K2; ++kk) FASTLM_BF16_STEP(0, kk);
  alignas(64) float acc[MR * kNR];
  for (int r = 0; r < MR; ++r) {
    __m512 s = _mm512_add_ps(a[0][r][0], a[0][r][1]);
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, _mm512_add_ps(a[u][r][0], a[u][r][1]));
    _mm512_store_ps(acc + r * kNR, s);
  }
  finish(acc, MR, e, r0, n0, nv);
}
#undef FASTLM_BF16_STEP
#endif

// avx2_tile1 knob (bf16_gemv_knob): 1 (default) the register-only one-row AVX2 tile, 0 the array
// tile it replaced (for A/B runs in one process)
std::atomic<int64_t> g_avx2_tile1{1};

template <int MR>
void run_tile(int path, const XRows& xr, int64_t K2, const uint16_t* p, const Ep& e, int64_t r0, int64_t n0,
              int64_t nv, int64_t pf) {
#ifdef FASTLM_BF16_X86
  if (path == cpu::kBf16Avx512Bf16) return tile_avx512_bf16<MR>(xr, K2, p, e, r0, n0, nv, pf);
  if (path == cpu::kBf16Avx512) return tile_avx512<MR>(xr, K2, p, e, r0, n0, nv, pf);
  if (path == cpu::kBf16Avx2) {
    if constexpr (MR == 1) {
      if (g_avx2_tile1.load(std::memory_order_relaxed) != 0) return tile1_avx2(xr, K2, p, e, r0, n0, nv, pf);
    }
    if constexpr (MR <= 2) return tile_avx2<MR>(xr, K2, p, e, r0, n0, nv, pf);
  }
#endif
  tile_portable<MR>(xr, K2, p, e, r0, n0, nv, pf);
}

void tile(int mr, int path, const XRows& xr, int64_t K2, const uint16_t* p, const Ep& e, int64_t r0, int64_t n0,
          int64_t nv, int64_t pf) {
  switch (mr) {
    case 1: return run_tile<1>(path, xr, K2, p, e, r0, n0, nv, pf);
    case 2: return run_tile<2>(path, xr, K2, p, e, r0, n0, nv, pf);
    case 3: return run_tile<3>(path, xr, K2, p, e, r0, n0, nv, pf);
    case 4: return run_tile<4>(path, xr, K2, p, e, r0, n0, nv, pf);
    case 5: return run_tile<5>(path, xr, K2, p, e, r0, n0, nv, pf);
    default: return run_tile<6>(path, xr, K2, p, e, r0, n0, nv, pf);
  }
}

int max_rows(int path) { return path == cpu::kBf16Avx2 ? 2 : (path == cpu::kBf16Portable ? 4 : 6); }

// Tuning knobs (torch.ops.fastlm.bf16_gemv_knob, for benchmarks): read at every call.
//   prefetch: software prefetch distance in bytes of panel ahead (0: off, the default: on Zen 4
//             with huge-page panels the hardware prefetchers alone streamed 10-12% faster, one
//             thread, both the vdpbf16ps and the AVX2 path; 1024 was the default before)
//   chunk_kb: the largest chunk of panels a thread claims (default 512: long streams for the
//             hardware prefetchers, gemv.cpp's measurement)
//   tail_kb:  the smallest (default 64); chunks shrink from chunk_kb to tail_kb towards the end of
//             the job (OpenMP's "guided" schedule), so the threads finish within ~tail_kb of each
//             other instead of up to one 512 KB chunk apart (~25 us per GEMV at 20 GB/s a core);
//             0: uniform chunks of chunk_kb (the schedule before)
//   avx2_tile1: 1 the register-only one-row AVX2 tile (tile1_avx2, default), 0 the one before
std::atomic<int64_t> g_prefetch{0}, g_chunk_kb{512}, g_tail_kb{64};

int64_t bf16_gemv_knob(c10::string_view name, int64_t value) {
  std::atomic<int64_t>* k = name == "prefetch"     ? &g_prefetch
                            : name == "chunk_kb"   ? &g_chunk_kb
                            : name == "tail_kb"    ? &g_tail_kb
                            : name == "avx2_tile1" ? &g_avx2_tile1
                                                   : nullptr;
  TORCH_CHECK_VALUE(k != nullptr, "bf16_gemv_knob: name must be \"prefetch\", \"chunk_kb\", \"tail_kb\" or "
                    "\"avx2_tile1\", got \"", name, "\"");
  TORCH_CHECK_VALUE(value >= -1 && value <= (int64_t{1} << 30), "bf16_gemv_knob: value must be -1 (query) or in [0, 2^30], got ",
                    value);
  TORCH_CHECK_VALUE(value != 0 || name != "chunk_kb", "bf16_gemv_knob: chunk_kb must be >= 1");
  if (value >= 0) k->store(value);
  return k->load();
}

// x (M, K) fp32 -> bf16 pairs hi = bf16(x), lo = bf16(x - hi), (M, 2 * K2) each, zero past K; the
// pairs of one row read as K2 uint32 (k even in the low half). Vectorised where the CPU has
// VCVTNEPS2BF16 (round to nearest even as f32_to_bf16; it reads denormal inputs as zero, which
// moves x by < 2^-126).
#ifdef FASTLM_BF16_X86
FASTLM_BF16_AVX512BF16 void split_row_avx512bf16(const float* x, int64_t K, uint16_t* hi, uint16_t* lo) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), l);
  }
  for (; k < K; ++k) {
    hi[k] = cpu::f32_to_bf16(x[k]);
    lo[k] = cpu::f32_to_bf16(x[k] - cpu::bf16_to_f32(hi[k]));
  }
}
#endif

void split_rows(int path, const float* x, int64_t M, int64_t K, int64_t K2, uint16_t* hi, uint16_t* lo) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    uint16_t* h = hi + m * 2 * K2;
    uint16_t* l = lo + m * 2 * K2;
#ifdef FASTLM_BF16_X86
    if (path == cpu::kBf16Avx512Bf16) {
      split_row_avx512bf16(xr, K, h, l);
    } else
#endif
    {
      for (int64_t k = 0; k < K; ++k) {
        h[k] = cpu::f32_to_bf16(xr[k]);
        l[k] = cpu::f32_to_bf16(xr[k] - cpu::bf16_to_f32(h[k]));
      }
    }
    if (K & 1) h[K] = l[K] = 0;
  }
}

// Panel boundaries of a job's chunks into `bounds` (chunk c: panels [bounds[c], bounds[c + 1])):
// ~chunk_kb each, shrinking towards tail_kb at the end (see g_tail_kb), at least one per thread once
// the work holds 64 KB per thread; small layers stay one chunk on the calling thread.
void chunk_bounds(int64_t NB, int64_t panel_bytes, int64_t rows_factor, std::vector<int64_t>& bounds) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, g_chunk_kb.load(std::memory_order_relaxed)) << 10;
  const int64_t tail = std::min(chunk, g_tail_kb.load(std::memory_order_relaxed) << 10);
  const int64_t pw = panel_bytes * rows_factor;  // work per panel
  const int64_t work = NB * pw;
  bounds.clear();
  bounds.push_back(0);
  if (tail <= 0 || threads == 1) {  // uniform chunks (as gemv.cpp's packed_gemm)
    int64_t want = std::max<int64_t>(1, work / chunk);
    if (work >= threads * (int64_t{64} << 10)) want = std::max(want, threads);
    if (want >= threads) want = (want + threads / 2) / threads * threads;
    const int64_t grain = std::max<int64_t>(1, (NB + want - 1) / want);
    for (int64_t b = grain; b < NB; b += grain) bounds.push_back(b);
    bounds.push_back(NB);
    return;
  }
  if (work < threads * (int64_t{64} << 10)) {  // too small to share
    bounds.push_back(NB);
    return;
  }
  const int64_t big = std::max<int64_t>(1, chunk / pw), small = std::max<int64_t>(1, tail / pw);
  // guided: each chunk takes 1 / (2 * threads) of what is left, between `small` and `big` panels
  for (int64_t b = 0; b < NB;) {
    const int64_t left = NB - b;
    const int64_t g = std::min(left, std::max(small, std::min(big, left / (2 * threads))));
    b += g;
    bounds.push_back(b);
  }
}

// y = act(x (M, K) fp32 @ W^T + bias) + residual into e's output (see cpu::packed_gemm_bf16).
// No heap allocation per call after the first: the x operands and the chunk table live in
// per-thread buffers of the calling thread.
void gemm(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const Ep& e) {
  const int path = cpu::bf16_path();
  const int64_t K2 = (K + 1) / 2, NB = (N + kNR - 1) / kNR;
  thread_local std::vector<uint16_t> hl;
  thread_local std::vector<float> xpad;
  thread_local std::vector<int64_t> bounds;
  XRows xr{x, K, nullptr, nullptr};
  if (path == cpu::kBf16Avx512Bf16) {  // x -> bf16 pairs hi = bf16(x), lo = bf16(x - hi); zero past K
    if (static_cast<int64_t>(hl.size()) < 4 * M * K2) hl.resize(4 * M * K2);
    split_rows(path, x, M, K, K2, hl.data(), hl.data() + 2 * M * K2);
    xr.hi = reinterpret_cast<const uint32_t*>(hl.data());
    xr.lo = reinterpret_cast<const uint32_t*>(hl.data() + 2 * M * K2);
  } else if (K & 1) {  // rows padded to 2 * K2 with a zero
    if (static_cast<int64_t>(xpad.size()) < M * 2 * K2) xpad.resize(M * 2 * K2);
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(xpad.data() + m * 2 * K2, x + m * K, K * sizeof(float));
      xpad[m * 2 * K2 + K] = 0.0f;
    }
    xr.x = xpad.data();
    xr.ldx = 2 * K2;
  }
  const int64_t panel_elems = K2 * kRow;
  const int64_t mr_max = max_rows(path);
  chunk_bounds(NB, panel_elems * 2, std::max<int64_t>(1, M / mr_max), bounds);
  const int64_t* bd = bounds.data();
  const int64_t pf = g_prefetch.load(std::memory_order_relaxed);
  SharePool::get().run(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t c) {
    for (int64_t nb = bd[c]; nb < bd[c + 1]; ++nb) {
      const uint16_t* panel = w + nb * panel_elems;
      const int64_t n0 = nb * kNR, nv = std::min(kNR, N - n0);
      for (int64_t r0 = 0; r0 < M; r0 += mr_max) {
        const int mr = static_cast<int>(std::min<int64_t>(mr_max, M - r0));
        const XRows t{xr.x + r0 * xr.ldx, xr.ldx, xr.hi != nullptr ? xr.hi + r0 * K2 : nullptr,
                      xr.lo != nullptr ? xr.lo + r0 * K2 : nullptr};
        tile(mr, path, t, K2, panel, e, r0, n0, nv, pf);
      }
    }
  });
}

int parse_act(c10::string_view a) {
  TORCH_CHECK_VALUE(a == "none" || a == "gelu" || a == "gelu_tanh",
                    "packed_linear_bf16: activation must be \"none\", \"gelu\" or \"gelu_tanh\", got \"", a, "\"");
  return a == "none" ? 0 : (a == "gelu" ? 1 : 2);
}

at::Tensor packed_linear_bf16_cpu(const at::Tensor& x_in, const at::Tensor& w, int64_t n,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                  c10::string_view activation) {
  const int act = parse_act(activation);
  TORCH_CHECK_VALUE(x_in.defined() && w.defined(), "packed_linear_bf16: x and w must be defined");
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
                   "packed_linear_bf16: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && w.device().is_cpu(), "packed_linear_bf16: x and w must be CPU tensors");
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.numel() > 0, "packed_linear_bf16: x is empty (shape ", x_in.sizes(), ")");
  TORCH_CHECK_VALUE(n > 0, "packed_linear_bf16: n (output features) must be positive, got ", n);
  const int64_t K = x_in.size(-1), K2 = (K + 1) / 2, NB = (n + kNR - 1) / kNR;
  TORCH_CHECK_TYPE(w.scalar_type() == at::kBFloat16, "packed_linear_bf16: w must be bfloat16 pair panels, got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.is_contiguous() && w.dim() == 3 && w.size(0) == NB && w.size(1) == K2 && w.size(2) == kRow,
                    "packed_linear_bf16: w must be contiguous pair panels of shape (ceil(n/16), ceil(K/2), 32) = (",
                    NB, ", ", K2, ", 32) for n = ", n, " and K = x.shape[-1] = ", K, ", got ", w.sizes());
  std::vector<int64_t> out(x_in.sizes().begin(), x_in.sizes().end());
  out.back() = n;
  // conversions on the calling thread, no ATen op between the GEMVs (an OpenMP region next to
  // the pool's spinning helpers stalls for a time slice on a busy machine)
  std::vector<float> bf;
  at::Tensor bi, r;
  const float* bias_p = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16,
                     "packed_linear_bf16: bias must be float32 or bfloat16, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n,
                      "packed_linear_bf16: bias must be a CPU tensor of shape (", n, ",), got ", bias->sizes());
    bi = bias->contiguous();
    if (bi.scalar_type() == at::kFloat) {
      bias_p = bi.const_data_ptr<float>();
    } else {
      const auto* b16 = reinterpret_cast<const uint16_t*>(bi.const_data_ptr<at::BFloat16>());
      bf.resize(n);
      for (int64_t i = 0; i < n; ++i) bf[i] = cpu::bf16_to_f32(b16[i]);
      bias_p = bf.data();
    }
  }
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == x_in.scalar_type(), "packed_linear_bf16: residual has dtype ",
                     residual->scalar_type(), " but x has ", x_in.scalar_type());
    TORCH_CHECK_VALUE(residual->device().is_cpu() && residual->sizes() == at::IntArrayRef(out),
                      "packed_linear_bf16: residual must be a CPU tensor of shape ", at::IntArrayRef(out), ", got ",
                      residual->sizes());
    r = residual->contiguous();
  }
  const bool b16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor xc = x_in.reshape({-1, K}).contiguous();
  const int64_t M = xc.size(0);
  std::vector<float> xf;
  const float* xp = nullptr;
  if (b16) {
    const auto* s = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
    xf.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = cpu::bf16_to_f32(s[i]);
    xp = xf.data();
  } else {
    xp = xc.const_data_ptr<float>();
  }
  at::Tensor y = at::empty(out, x_in.options());
  Ep e{bias_p, nullptr, nullptr, n, act};
  if (b16) {
    e.yb = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>());
    if (residual.has_value()) e.rb = reinterpret_cast<const uint16_t*>(r.const_data_ptr<at::BFloat16>());
  } else {
    e.y = y.mutable_data_ptr<float>();
    if (residual.has_value()) e.residual = r.const_data_ptr<float>();
  }
  gemm(xp, M, K, reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>()), n, e);
  return y;
}

}  // namespace

namespace cpu {

int bf16_path() {
  const int f = g_forced.load(std::memory_order_relaxed);
  return f >= 0 ? f : auto_path();
}

void packed_gemm_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
                      const float* residual, float* y, int act) {
  gemm(x, M, K, w, N, Ep{bias, residual, y, N, act});
}

}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("packed_linear_bf16(Tensor x, Tensor w, int n, Tensor? bias=None, Tensor? residual=None, "
        "str activation='none') -> Tensor");
  m.def("bf16_gemv_path(str path='') -> str", &bf16_gemv_path);
  m.def("bf16_gemv_knob(str name, int value=-1) -> int", &bf16_gemv_knob);
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("packed_linear_bf16", &packed_linear_bf16_cpu); }

}  // namespace fastlm
