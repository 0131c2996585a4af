// Packed linear layers for decode: y = act(x @ W^T * scale + bias) + residual.
//
// CPU: W is packed once at load (fastlm/linear.py) into panels of 16 output channels,
// (ceil(N / 16), K, 16), fp32 or int8 (per-channel symmetric, `scale` (N,)). Each thread streams
// a contiguous run of panels; a register tile of up to 6 rows x 16 channels broadcasts x[m, k] and
// FMAs into two 8-float accumulators per row, so every weight byte is read once for all rows
// (M <= 16 in one pass; larger M in blocks of 96 rows). int8 pair panels (Int8Linear's CPU layout) run
// the int16-activation kernels up to 16 rows (the decode ops up to 64; register tiles of up to 16 rows
// on AVX-512BW, 4 on AVX2, see i16_rows); past that (prefill) they keep fp32 activations: each panel
// is widened to exact fp32 values once per block of rows, inside the block's first row tile
// (tile2w_avx512, tile_avx2w; the portable path in a pass before, dequant_pairs), and the fp32 prefill
// tiles run on it, so int8 prefill at 17-95 rows runs at the fp32 panels' rate (before: a scalar
// dequantisation pass, 0.45-0.88x; bench/int8_prefill_rate.py).
// Elsewhere int8 is widened in registers (cvtepi8 -> cvtepi32_ps) and the scale applied after the dot.
// Runtime ISA dispatch: an AVX2+FMA path and a portable path (FASTLM_CPU_ISA=portable or
// torch.ops.fastlm.cpu_isa("portable") forces it).
//
// CUDA (FASTLM_WITH_CUDA): int8 weight-only GEMV on row-major (N, K) int8 weights, see
// cuda/gemv_int8.cu; fp16 / bf16 / fp32 activations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <sys/mman.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define FASTLM_AVX2 __attribute__((target("avx2,fma")))
#define FASTLM_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define FASTLM_AVX512BW __attribute__((target("avx512f,avx512bw,avx2,fma")))
#define FASTLM_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))
#endif

#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "fast_math.h"

#ifdef FASTLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/gemv_int8_cuda.h"
#endif

namespace fastlm {
namespace {

constexpr int64_t kNR = 16;  // output channels per panel
constexpr int kMR = 6;       // rows per register tile: 12 accumulators + 2 weight vectors + 1 broadcast
constexpr int64_t kMC = 96;  // rows per block of x (L2-sized); int8 panels are widened to fp32 once per block
constexpr int64_t kDequantRows = 16;  // blocks with more rows than this dequantise the panel to fp32 first
// the decode ops (cpu::packed_gemm: gpt2_decode_cpu, gpt2_decode_batch_cpu) run int8 pair panels in
// the int16-activation kernels (no dequantisation) up to this many rows: a batched decode step
// (M = B) streams the int8 panels once; dequantising them per call to fp32
// for M = 32 made int8 B = 32 decode slower than fp32 (bench/results/cpu-2026-12-07c-zen4.md)
constexpr int64_t kI16Rows = 64;

enum Act : int { kNone = 0, kGeluErf = 1, kGeluTanh = 2 };
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

#ifdef FASTLM_X86
#define FASTLM_CPU_HAS(feature) __builtin_cpu_supports(feature)
#else
#define FASTLM_CPU_HAS(feature) false
#endif
bool cpu_has_avx2() { return FASTLM_CPU_HAS("avx2") && FASTLM_CPU_HAS("fma"); }
bool cpu_has_avx512() { return cpu_has_avx2() && FASTLM_CPU_HAS("avx512f"); }
bool cpu_has_avx512bw() { return cpu_has_avx512() && FASTLM_CPU_HAS("avx512bw"); }
bool cpu_has_avx512vnni() { return cpu_has_avx512bw() && FASTLM_CPU_HAS("avx512vnni"); }
#undef FASTLM_CPU_HAS

// The best ISA this CPU runs, capped by FASTLM_CPU_ISA ("portable", "avx2" or "avx512").
int best_isa() {
  const char* env = std::getenv("FASTLM_CPU_ISA");
  const std::string cap = env != nullptr ? std::string(env) : std::string("avx512");
  if (cap == "portable") return kPortable;
  if (cap != "avx2" && cpu_has_avx512()) return kAvx512;
  return cpu_has_avx2() ? kAvx2 : kPortable;
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = best_isa();
    g_isa.store(v, std::memory_order_relaxed);
  }
  return v;
}

// Query ("") or set ("auto", "avx512", "avx2", "portable") the ISA of the CPU packed-linear kernels.
std::string cpu_isa(c10::string_view isa) {
  if (isa == "auto") {
    g_isa.store(-1);
  } else if (isa == "portable") {
    g_isa.store(kPortable);
  } else if (isa == "avx2") {
    TORCH_CHECK_VALUE(cpu_has_avx2(), "cpu_isa: this CPU has no AVX2+FMA");
    g_isa.store(kAvx2);
  } else if (isa == "avx512") {
    TORCH_CHECK_VALUE(cpu_has_avx512(), "cpu_isa: this CPU has no AVX-512F");
    g_isa.store(kAvx512);
  } else {
    TORCH_CHECK_VALUE(isa.empty(), "cpu_isa: isa must be \"\", \"auto\", \"avx512\", \"avx2\" or \"portable\", got \"",
                      isa, "\"");
  }
  return kIsaNames[current_isa()];
}

// int8 pair panels (see "int8 pair panels" below): 2 (default) quantizes the activation row to int16
// per block and runs the integer dot (AVX-512 VNNI vpdpwssd where the CPU has it), 1 the same without
// VNNI (vpmaddwd + vpaddd), 0 keeps fp32 activations (the panel dequantised to fp32 once per call, as
// prefill does: the exact weight-only path, for A/B runs and accuracy checks).
// torch.ops.fastlm.int8_gemv_mode(level) sets it (-1 queries).
std::atomic<int> g_i8mode{2};
inline int i8_mode() { return g_i8mode.load(std::memory_order_relaxed); }

int64_t int8_gemv_mode(int64_t level) {
  TORCH_CHECK_VALUE(level >= -1 && level <= 2, "int8_gemv_mode: level must be -1 (query), 0 (fp32 activations), "
                    "1 (int16 activations, no VNNI) or 2 (int16 activations, VNNI where the CPU has it), got ", level);
  if (level >= 0) g_i8mode.store(static_cast<int>(level));
  return i8_mode();
}

int parse_act(c10::string_view a) {
  TORCH_CHECK_VALUE(a == "none" || a == "gelu" || a == "gelu_tanh",
                    "packed_linear: activation must be \"none\", \"gelu\" or \"gelu_tanh\", got \"", a, "\"");
  return a == "none" ? kNone : (a == "gelu" ? kGeluErf : kGeluTanh);
}

struct Epilogue {
  const float* scale;     // (N,) or null
  const float* bias;      // (N,) or null
  const float* residual;  // (M, N) or null
  float* y;               // (M, N)
  int64_t N;
  int act;
};

// acc (mr, 16) -> y rows r0.., channels n0..n0+nv: * scale + bias, activation, + residual.
// Fixed-width loops over the 16 lanes, so gcc vectorises them. One source, compiled three ways
// (baseline SSE2, AVX2, AVX-512F with 512-bit vectors) with floating-point contraction off, so every
// version does the same IEEE operations in the same order: the same bits on any ISA (before, only the
// out-of-line SSE2 copy ran, ~10% of the int16 prefill tiles' time with GELU).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// dst[j] = src[j] for the nv live lanes of a panel: a full panel in a fixed-count loop (vector moves; a
// variable count became memcpy calls, two per tile: a one-row decode GEMV runs ~3000 tiles for GPT-2's
// LM head)
__attribute__((always_inline)) inline void load_lanes(float* dst, const float* src, int64_t nv) {
  if (nv == kNR)
    for (int64_t j = 0; j < kNR; ++j) dst[j] = src[j];
  else
    for (int64_t j = 0; j < nv; ++j) dst[j] = src[j];
}

__attribute__((always_inline)) inline void finish_tile_body(const float* acc, int mr, const Epilogue& e, int64_t r0,
                                                            int64_t n0, int64_t nv) {
#ifdef __clang__
#pragma clang fp contract(off)  // clang ignores the GCC optimize pragma above
#endif
  float sc[kNR], bi[kNR], v[kNR];
  for (int64_t j = 0; j < kNR; ++j) {
    sc[j] = 1.0f;
    bi[j] = 0.0f;
  }
  if (e.scale != nullptr) load_lanes(sc, e.scale + n0, nv);
  if (e.bias != nullptr) load_lanes(bi, e.bias + n0, nv);
  for (int r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < kNR; ++j) v[j] = acc[r * kNR + j] * sc[j] + bi[j];
    if (e.act == kGeluErf) {
      for (int64_t j = 0; j < kNR; ++j) v[j] = fm::gelu_erf(v[j]);
    } else if (e.act == kGeluTanh) {
      for (int64_t j = 0; j < kNR; ++j) v[j] = fm::gelu_tanh(v[j]);
    }
    float* yr = e.y + (r0 + r) * e.N + n0;
    const float* rr = e.residual != nullptr ? e.residual + (r0 + r) * e.N + n0 : nullptr;
    if (nv == kNR) {
      if (rr != nullptr)
        for (int64_t j = 0; j < kNR; ++j) yr[j] = v[j] + rr[j];
      else
        for (int64_t j = 0; j < kNR; ++j) yr[j] = v[j];
    } else {
      for (int64_t j = 0; j < nv; ++j) yr[j] = rr != nullptr ? v[j] + rr[j] : v[j];
    }
  }
}

__attribute__((noinline)) void finish_tile_base(const float* acc, int mr, const Epilogue& e, int64_t r0, int64_t n0,
                                                int64_t nv) {
  finish_tile_body(acc, mr, e, r0, n0, nv);
}

#ifdef FASTLM_X86
__attribute__((noinline, target("avx2"))) void finish_tile_avx2(const float* acc, int mr, const Epilogue& e, int64_t r0,
                                                                int64_t n0, int64_t nv) {
  finish_tile_body(acc, mr, e, r0, n0, nv);
}

__attribute__((noinline, target("avx512f,avx2,prefer-vector-width=512"))) void finish_tile_avx512(
    const float* acc, int mr, const Epilogue& e, int64_t r0, int64_t n0, int64_t nv) {
  finish_tile_body(acc, mr, e, r0, n0, nv);
}
#endif
#pragma GCC pop_options

inline void finish_tile(const float* acc, int mr, const Epilogue& e, int64_t r0, int64_t n0, int64_t nv) {
#ifdef FASTLM_X86
  const int isa = current_isa();
  if (isa == kAvx512) return finish_tile_avx512(acc, mr, e, r0, n0, nv);
  if (isa == kAvx2) return finish_tile_avx2(acc, mr, e, r0, n0, nv);
#endif
  finish_tile_base(acc, mr, e, r0, n0, nv);
}

// ---- portable path ------------------------------------------------------------------------
template <typename WT, int MR>
void tile_portable(const float* x, int64_t K, const WT* p, const Epilogue& e, int64_t r0, int64_t n0, int64_t nv) {
  float a[MR * kNR];
  for (int i = 0; i < MR * kNR; ++i) a[i] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float w[kNR];
    for (int64_t j = 0; j < kNR; ++j) w[j] = static_cast<float>(p[k * kNR + j]);
    for (int r = 0; r < MR; ++r) {
      const float xv = x[r * K + k];
      for (int64_t j = 0; j < kNR; ++j) a[r * kNR + j] += xv * w[j];
    }
  }
  finish_tile(a, MR, e, r0, n0, nv);
}

// ---- AVX2 + FMA path ----------------------------------------------------------------------
#ifdef FASTLM_X86
template <bool kInt8>
FASTLM_AVX2 inline void load_panel_row(const void* p, int64_t k, __m256& w0, __m256& w1) {
  if constexpr (kInt8) {
    // two 8-byte halves, each widened straight from memory (vpmovsxbd ymm, m64): no shuffle uop for
    // the upper half, which competes with the widening for the same vector pipes
    const int8_t* q = static_cast<const int8_t*>(p) + k * kNR;
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8))));
  } else {
    const float* f = static_cast<const float*>(p) + k * kNR;
    w0 = _mm256_loadu_ps(f);
    w1 = _mm256_loadu_ps(f + 8);
  }
}

// MR rows x 16 channels. Few rows leave the FMA latency exposed, so K is unrolled into U
// independent accumulator sets (U * MR * 2 <= 12 vector registers).
// Software prefetch distance in bytes of panel ahead of the loads (0: off): one knob for the fp32 /
// int8 (K, 16) panel kernels (FASTLM_GEMV_PREFETCH, default 1024) and one for the int8 pair-panel
// int16 kernels (FASTLM_INT8_GEMV_PREFETCH, default 0, 2048 on Intel (below): on Zen 4 the hardware prefetchers alone
// streamed the B = 1 int8 decode faster than with _mm_prefetch 1 KB ahead, one thread, CPU time,
// alternating in one process: 0.81-0.87x the step time with the panels in one huge-page arena;
// docs/design.md "CPU threads"). torch.ops.fastlm.gemv_prefetch / int8_gemv_prefetch(bytes) change
// them at run time (-1 queries), for A/B runs.
struct PrefetchKnob {
  const char* op;
  std::atomic<int64_t> bytes;
  PrefetchKnob(const char* op_name, const char* env_name, int64_t dflt) : op(op_name) {
    const char* env = std::getenv(env_name);
    bytes.store(env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : dflt);
  }
  int64_t get() const { return bytes.load(std::memory_order_relaxed); }
  int64_t set(int64_t v) {
    TORCH_CHECK_VALUE(v >= -1 && v <= (int64_t{1} << 20), op, ": bytes must be -1 (query) or in [0, 1 MiB] (0: no "
                      "software prefetch), got ", v);
    if (v >= 0) bytes.store(v);
    return get();
  }
};
PrefetchKnob g_prefetch{"gemv_prefetch", "FASTLM_GEMV_PREFETCH", 1024};
// On Intel the hardware prefetchers alone fell short: a 2-vCPU Xeon with AMX (2026-12-08), GPT-2
// small int8 decode B = 1, one process alternating the knob: 2048 bytes ahead 0.92x the step time at
// 2 threads (6.37 vs 6.92 ms), 0.955x at 1 (1024: 0.94x, 4096 / 8192: 0.97x). So the default is 2048
// on Intel CPUs, 0 elsewhere (measured on AMD Zen 4, above).
bool cpu_is_intel() {
#ifdef FASTLM_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  return ebx == 0x756e6547u && edx == 0x49656e69u && ecx == 0x6c65746eu;  // "GenuineIntel"
#else
  return false;
#endif
}
PrefetchKnob g_i16_prefetch{"int8_gemv_prefetch", "FASTLM_INT8_GEMV_PREFETCH", cpu_is_intel() ? 2048 : 0};
int64_t prefetch_bytes() { return g_prefetch.get(); }
int64_t i16_prefetch_bytes() { return g_i16_prefetch.get(); }
int64_t gemv_prefetch(int64_t bytes) { return g_prefetch.set(bytes); }
int64_t int8_gemv_prefetch(int64_t bytes) { return g_i16_prefetch.set(bytes); }

// Accumulators as named variables, not an array: gcc 12 kept an `__m256 a[U][MR][2]` array in
// memory and stored all 2 * MR accumulators on every k (the disassembly of tile_avx2<false, 6>: 12
// ymm stores per 12 FMAs), which held this kernel to ~44 GFLOP/s on a Zen 4 core with AVX2 forced
// (~40% of its FMA peak; gemm_avx2.cpp's tile, named accumulators, 93). Unused rows are compiled
// out (if constexpr). MR <= 2 keeps two accumulator sets (even / odd k, summed at the end: the FMA
// latency), MR >= 3 one; the per-row FMA order is that of the array kernel (bit-equal results).
#define FASTLM_ROW(R, A0, A1, KK)                                  \
  if constexpr (MR > R) {                                          \
    const __m256 xb = _mm256_broadcast_ss(x + R * K + (KK));       \
    A0 = _mm256_fmadd_ps(xb, w0, A0);                              \
    A1 = _mm256_fmadd_ps(xb, w1, A1);                              \
  }
#define FASTLM_ROWS(KK)                \
  FASTLM_ROW(0, c00, c01, KK)          \
  FASTLM_ROW(1, c10, c11, KK)          \
  FASTLM_ROW(2, c20, c21, KK)          \
  FASTLM_ROW(3, c30, c31, KK)          \
  FASTLM_ROW(4, c40, c41, KK)          \
  FASTLM_ROW(5, c50, c51, KK)
#define FASTLM_STORE(R, A0, A1, B0, B1)                                                   \
  if constexpr (MR > R) {                                                                 \
    _mm256_store_ps(acc + R * kNR, U == 2 ? _mm256_add_ps(A0, B0) : A0);                  \
    _mm256_store_ps(acc + R * kNR + 8, U == 2 ? _mm256_add_ps(A1, B1) : A1);              \
  }

template <bool kInt8, int MR>
FASTLM_AVX2 void tile_avx2(const float* x, int64_t K, const void* p, const Epilogue& e, int64_t r0, int64_t n0,
                           int64_t nv) {
  static_assert(MR >= 2 && MR <= kMR, "tile_avx2: 2 to 6 rows (one row: tile1_avx2)");
  constexpr int U = MR == 2 ? 2 : 1;
  constexpr int64_t kRowBytes = kNR * (kInt8 ? 1 : 4);  // panel bytes per k
  const int64_t pf = prefetch_bytes();
  const char* pbytes = static_cast<const char*>(p);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  __m256 d00 = c00, d01 = c00, d10 = c00, d11 = c00;  // the odd-k set (U == 2)
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    // one prefetch per cache line of panel (prefetches never fault past the end)
    if (pf > 0 && ((k * kRowBytes) & 63) < U * kRowBytes)
      _mm_prefetch(pbytes + k * kRowBytes + pf, _MM_HINT_T0);
    __m256 w0, w1;
    load_panel_row<kInt8>(p, k, w0, w1);
    FASTLM_ROWS(k)
    if constexpr (U == 2) {
      load_panel_row<kInt8>(p, k + 1, w0, w1);
      FASTLM_ROW(0, d00, d01, k + 1)
      FASTLM_ROW(1, d10, d11, k + 1)
    }
  }
  for (; k < K; ++k) {
    __m256 w0, w1;
    load_panel_row<kInt8>(p, k, w0, w1);
    FASTLM_ROWS(k)
  }
  alignas(32) float acc[MR * kNR];
  FASTLM_STORE(0, c00, c01, d00, d01)
  FASTLM_STORE(1, c10, c11, d10, d11)
  FASTLM_STORE(2, c20, c21, c00, c00)
  FASTLM_STORE(3, c30, c31, c00, c00)
  FASTLM_STORE(4, c40, c41, c00, c00)
  FASTLM_STORE(5, c50, c51, c00, c00)
  finish_tile(acc, MR, e, r0, n0, nv);
}
#undef FASTLM_STORE  // FASTLM_ROW(S) serve tile_avx2w below too

// One row (the decode GEMV, M = 1), 16 channels, AVX2. tile_avx2<kInt8, 1> kept its 4 x 2
// accumulators in an array that gcc 12 stored to the stack on every step of K (8 ymm stores and
// as many register moves per 4 rows of panel: ~40% more instructions than the math); named
// accumulators stay in registers (objdump: no stack store in the loop). The int8 dequantisation
// (vpmovsxbd from memory, vcvtdq2ps, FMA: 3 vector instructions per 8 weights) bounds this kernel
// on a core, not the memory: measured in L2, 1 thread, 768 x 2048 int8 on Zen 4 with AVX2 forced,
// 14.2 G weights/s before. Sums the 4 accumulator sets in that array kernel's order (the same bits).
template <bool kInt8>
FASTLM_AVX2 void tile1_avx2(const float* x, int64_t K, const void* p, const Epilogue& e, int64_t r0, int64_t n0,
                            int64_t nv) {
  constexpr int64_t kRowBytes = kNR * (kInt8 ? 1 : 4);
  const int64_t pf = prefetch_bytes();
  const char* pbytes = static_cast<const char*>(p);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 a4 = _mm256_setzero_ps(), a5 = _mm256_setzero_ps(), a6 = _mm256_setzero_ps(), a7 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    if (pf > 0)  // one prefetch per cache line entered in these 4 rows (prefetches never fault)
      for (int64_t b = (k * kRowBytes + 63) & ~int64_t{63}; b < (k + 4) * kRowBytes; b += 64)
        _mm_prefetch(pbytes + b + pf, _MM_HINT_T0);
    __m256 w0, w1, xb;
    load_panel_row<kInt8>(p, k, w0, w1);
    xb = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(xb, w0, a0);
    a1 = _mm256_fmadd_ps(xb, w1, a1);
    load_panel_row<kInt8>(p, k + 1, w0, w1);
    xb = _mm256_broadcast_ss(x + k + 1);
    a2 = _mm256_fmadd_ps(xb, w0, a2);
    a3 = _mm256_fmadd_ps(xb, w1, a3);
    load_panel_row<kInt8>(p, k + 2, w0, w1);
    xb = _mm256_broadcast_ss(x + k + 2);
    a4 = _mm256_fmadd_ps(xb, w0, a4);
    a5 = _mm256_fmadd_ps(xb, w1, a5);
    load_panel_row<kInt8>(p, k + 3, w0, w1);
    xb = _mm256_broadcast_ss(x + k + 3);
    a6 = _mm256_fmadd_ps(xb, w0, a6);
    a7 = _mm256_fmadd_ps(xb, w1, a7);
  }
  for (; k < K; ++k) {
    __m256 w0, w1;
    load_panel_row<kInt8>(p, k, w0, w1);
    const __m256 xb = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(xb, w0, a0);
    a1 = _mm256_fmadd_ps(xb, w1, a1);
  }
  alignas(32) float acc[kNR];
  _mm256_store_ps(acc, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a2), a4), a6));
  _mm256_store_ps(acc + 8, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a1, a3), a5), a7));
  finish_tile(acc, 1, e, r0, n0, nv);
}

// ---- AVX-512 path -------------------------------------------------------------------------
// One panel row (16 channels) is one zmm: 64 bytes of fp32 (a cache line) or 16 bytes of int8
// (vpmovsxbd straight from memory, then vcvtdq2ps), half the instructions of the AVX2 path per
// weight, which matters for int8 (its conversions, not the memory, bound the AVX2 path).
template <bool kInt8>
FASTLM_AVX512 inline __m512 load_panel_row512(const void* p, int64_t k) {
  if constexpr (kInt8) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(p) + k * kNR));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(p) + k * kNR);
  }
}

template <bool kInt8, int MR>
FASTLM_AVX512 void tile_avx512(const float* x, int64_t K, const void* p, const Epilogue& e, int64_t r0, int64_t n0,
                               int64_t nv) {
  // U independent accumulator sets hide the FMA latency when MR is small (U * MR <= 16 of 32 zmm)
  constexpr int U = MR == 1 ? 8 : (MR == 2 ? 8 : (MR <= 4 ? 4 : 2));
  constexpr int64_t kRowBytes = kNR * (kInt8 ? 1 : 4);
  const int64_t pf = prefetch_bytes();
  const char* pbytes = static_cast<const char*>(p);
  __m512 a[U][MR];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < MR; ++r) a[u][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    // one prefetch per cache line of panel entered in this step (prefetches never fault)
    if (pf > 0)
      for (int64_t b = (k * kRowBytes + 63) & ~int64_t{63}; b < (k + U) * kRowBytes; b += 64)
        _mm_prefetch(pbytes + b + pf, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const __m512 w = load_panel_row512<kInt8>(p, k + u);
      for (int r = 0; r < MR; ++r) a[u][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k + u]), w, a[u][r]);
    }
  }
  for (; k < K; ++k) {
    const __m512 w = load_panel_row512<kInt8>(p, k);
    for (int r = 0; r < MR; ++r) a[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, a[0][r]);
  }
  alignas(64) float acc[MR * kNR];
  for (int r = 0; r < MR; ++r) {
    __m512 s = a[0][r];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, a[u][r]);
    _mm512_store_ps(acc + r * kNR, s);
  }
  finish_tile(acc, MR, e, r0, n0, nv);
}

// Prefill (blocks of more than kDequantRows rows, fp32 panels or int8 ones dequantised first):
// MR rows x two panels (32 channels) per register tile, 2 * MR accumulators. Each k loads two
// panel rows and MR broadcasts for 2 * MR FMAs, against one row for MR FMAs in tile_avx512,
// which leaves the FMA units, not the loads, the limit (measured 1.4x at 128-512 rows).
constexpr int kMR2 = 12;  // 24 accumulators + 2 weight vectors + 1 broadcast of 32 zmm

template <int MR>
FASTLM_AVX512 void tile2_avx512(const float* x, int64_t K, const float* p0, const float* p1, const Epilogue& e,
                                int64_t r0, int64_t n0, int64_t nv1) {
  __m512 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(p0 + k * kNR), w1 = _mm512_loadu_ps(p1 + k * kNR);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      a0[r] = _mm512_fmadd_ps(xb, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xb, w1, a1[r]);
    }
  }
  alignas(64) float acc[MR * kNR];
  for (int r = 0; r < MR; ++r) _mm512_store_ps(acc + r * kNR, a0[r]);
  finish_tile(acc, MR, e, r0, n0, kNR);  // the first panel of a pair is full
  for (int r = 0; r < MR; ++r) _mm512_store_ps(acc + r * kNR, a1[r]);
  finish_tile(acc, MR, e, r0, n0 + kNR, nv1);
}

template <int... MRs>
void tile2_dispatch(std::integer_sequence<int, MRs...>, int mr, const float* x, int64_t K, const float* p0,
                    const float* p1, const Epilogue& e, int64_t r0, int64_t n0, int64_t nv1) {
  ((mr == MRs + 1 ? tile2_avx512<MRs + 1>(x, K, p0, p1, e, r0, n0, nv1) : void()), ...);
}

void tile2(int mr, const float* x, int64_t K, const float* p0, const float* p1, const Epilogue& e, int64_t r0,
           int64_t n0, int64_t nv1) {
  tile2_dispatch(std::make_integer_sequence<int, kMR2>{}, mr, x, K, p0, p1, e, r0, n0, nv1);
}
#endif


// ---- int8 pair panels: int16 activations, integer dot products -----------------------------
// Layout (fastlm/linear.py pack_int8_panels): (ceil(N / 16), ceil(K / 2), 32) int8, element
// [p, kk, 2j + t] = q[16p + j, 2kk + t] (zero past N and K): the two weights of channel j at k = 2kk
// and 2kk + 1 are adjacent, as vpmaddwd / vpdpwssd read them (the bf16 pair panels' layout).
// The activation row x (K floats) is quantized once per call, per block of kQB elements:
// s_b = absmax_b / 32767, xq = round(x / s_b) in int16 (|x - s_b xq| <= s_b / 2, i.e. 2^-16 of the
// block's absmax: per-block, so one of GPT-2's outlier dimensions only coarsens its own block). Then
// per block int32 sums of int8 x int16 products (exact: at most kQB * 127 * 32767 < 2^31), converted
// and scaled by s_b into fp32 accumulators; the per-channel weight scale in the epilogue.
// The inner loop is vpmovsxbw + vpdpwssd (AVX-512 VNNI: 2 instructions per 32 multiply-adds), or
// vpmovsxbw + vpmaddwd + vpaddd (AVX-512BW; AVX2 twice per 16 channels), against vpmovsxbd +
// vcvtdq2ps + vfmadd per 16 (AVX-512) or 8 (AVX2) weights in the fp32-activation kernels above.
constexpr int64_t kQB = 64;       // activation elements per int16 scale (even: blocks hold whole pairs)
constexpr int64_t kQP = kQB / 2;  // pairs per block
constexpr int64_t kPairRow = 2 * kNR;  // bytes of pair panel per pair of k

// Whether an int16 tile of mr rows is a wide one (its activation pairs interleaved, see pair_slot).
bool i16_wide(int isa, int mr) {
  if (isa == kAvx512 && cpu_has_avx512bw()) return mr > 4;
  return isa != kPortable && mr > 2;
}

// Where row m of x (M rows) puts its int16 pairs in xq, in int32 units: pair kk at base + kk * step.
// The int16 tiles take the rows in tiles of `rows` from row 0 (packed_gemm); a wide tile (i16_wide)
// of mr rows reads them interleaved, (K2, mr) at its row offset r0 * K2 (one pointer and constant
// offsets for the mr broadcasts of each pair row: mr row pointers did not fit the general registers),
// any other tile row by row.
struct PairSlot {
  int64_t base, step;
};

PairSlot pair_slot(int isa, int64_t rows, int64_t M, int64_t K2, int64_t m) {
  const int64_t r0 = m / rows * rows, mr = std::min(rows, M - r0);
  return i16_wide(isa, static_cast<int>(mr)) ? PairSlot{r0 * K2 + (m - r0), mr} : PairSlot{m * K2, 1};
}

// A block's scale from its lanes' |x| maxima ml and x * 0 sums cl: *s = absmax / 32767, NaN where the
// block holds inf / NaN. Returns the factor x is multiplied by before rounding to int16.
inline float block_scale(const float* ml, const float* cl, int lanes, float* s) {
  float amax = 0.0f, chk = 0.0f;
  for (int j = 0; j < lanes; ++j) {
    amax = std::max(amax, ml[j]);
    chk += cl[j];
  }
  const bool finite = chk == 0.0f;
  *s = finite ? amax / 32767.0f : std::numeric_limits<float>::quiet_NaN();
  return finite && amax > 0.0f ? 32767.0f / amax : 0.0f;
}

// One block of n <= kQB activations -> its scale *s and int16 values, element k at q[2 (k / 2) step + k % 2]
// (a pair per int32, pairs step int32 apart). A block holding inf / NaN gets a NaN scale, so the output
// is NaN as with fp32 activations.
void quantize_block_i16(const float* xr, int64_t n, int16_t* q, int64_t step, float* s) {
  // 16 lanes of elementwise max / sum (gcc vectorises these; a scalar max chain does not)
  float ml[16] = {}, cl[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) {
      ml[j] = std::max(ml[j], std::fabs(xr[k + j]));
      cl[j] += xr[k + j] * 0.0f;  // NaN if any element is inf or NaN
    }
  for (; k < n; ++k) {
    ml[0] = std::max(ml[0], std::fabs(xr[k]));
    cl[0] += xr[k] * 0.0f;
  }
  const float inv = block_scale(ml, cl, 16, s);
  for (int64_t k = 0; k < n; ++k)  // round to nearest even, as vcvtps2dq
    q[2 * (k >> 1) * step + (k & 1)] =
        static_cast<int16_t>(std::nearbyint(std::min(32767.0f, std::max(-32767.0f, xr[k] * inv))));
}

// Rows of x (M, K) -> xq (M * 2 * ceil(K / 2) int16, zero padded; rows placed by pair_slot for tiles of
// `rows`), xs (M, ceil(K / kQB)) fp32.
void quantize_rows_i16(const float* x, int64_t M, int64_t K, int16_t* q, float* s, int isa, int64_t rows) {
  const int64_t K2 = (K + 1) / 2, nbk = (K + kQB - 1) / kQB;
  for (int64_t m = 0; m < M; ++m) {
    const PairSlot slot = pair_slot(isa, rows, M, K2, m);
    int16_t* qr = q + 2 * slot.base;
    for (int64_t b = 0; b < nbk; ++b) {
      const int64_t k0 = b * kQB;  // even: element k0 starts pair k0 / 2
      quantize_block_i16(x + m * K + k0, std::min(kQB, K - k0), qr + k0 * slot.step, slot.step, s + m * nbk + b);
    }
    if (K & 1) qr[2 * (K >> 1) * slot.step + 1] = 0;
  }
}

#ifdef FASTLM_X86
// quantize_rows_i16 with AVX2 (the same values: |x| max, x * 0 sums for inf / NaN, vcvtps2dq rounds
// to nearest even as std::nearbyint): one call per GEMV on the calling thread, before the pool runs.
FASTLM_AVX2 void quantize_rows_i16_avx2(const float* x, int64_t M, int64_t K, int16_t* q, float* s, int isa,
                                        int64_t rows) {
  const int64_t K2 = (K + 1) / 2, nbk = (K + kQB - 1) / kQB;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    const PairSlot slot = pair_slot(isa, rows, M, K2, m);
    const int64_t step = slot.step;
    int16_t* qr = q + 2 * slot.base;
    float* sr = s + m * nbk;
    for (int64_t b = 0; b < nbk; ++b) {
      const int64_t k0 = b * kQB, k1 = std::min(K, k0 + kQB);
      if (k1 - k0 < kQB) {  // a short last block: the scalar code
        quantize_block_i16(xr + k0, k1 - k0, qr + k0 * step, step, sr + b);
        continue;
      }
      __m256 mx = _mm256_setzero_ps(), ck = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
        ck = _mm256_add_ps(ck, _mm256_mul_ps(v, _mm256_setzero_ps()));
      }
      alignas(32) float ml[8], cl[8];
      _mm256_store_ps(ml, mx);
      _mm256_store_ps(cl, ck);
      const float inv = block_scale(ml, cl, 8, sr + b);
      const __m256 iv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(32767.0f), lo = _mm256_set1_ps(-32767.0f);
      for (int64_t k = k0; k < k1; k += 16) {
        const __m256 v0 = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(xr + k), iv)));
        const __m256 v1 = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), iv)));
        const __m256i p16 = _mm256_permute4x64_epi64(
            _mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1)), 0xD8);  // pairs k / 2 ..
        if (step == 1) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), p16);
        } else {  // a wide tile's row: its 8 pairs step int32 apart
          alignas(32) int32_t t[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(t), p16);
          for (int64_t i = 0; i < 8; ++i) std::memcpy(qr + (k + 2 * i) * step, t + i, sizeof(int32_t));
        }
      }
    }
    if (K & 1) qr[2 * (K >> 1) * step + 1] = 0;
  }
}
#endif

// Portable: the same integer math, scalar.
template <int MR>
void tile_i16_portable(const int16_t* xq, const float* xs, int64_t K, const int8_t* p, const Epilogue& e,
                       int64_t r0, int64_t n0, int64_t nv) {
  const int64_t K2 = (K + 1) / 2, nbk = (K + kQB - 1) / kQB;
  float f[MR * kNR] = {};
  for (int64_t b = 0; b < nbk; ++b) {
    const int64_t kk1 = std::min(K2, (b + 1) * kQP);
    int32_t a[MR * kNR] = {};
    for (int64_t kk = b * kQP; kk < kk1; ++kk) {
      const int8_t* w = p + kk * kPairRow;
      for (int r = 0; r < MR; ++r) {
        const int32_t x0 = xq[r * 2 * K2 + 2 * kk], x1 = xq[r * 2 * K2 + 2 * kk + 1];
        for (int64_t j = 0; j < kNR; ++j) a[r * kNR + j] += w[2 * j] * x0 + w[2 * j + 1] * x1;
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int64_t j = 0; j < kNR; ++j) f[r * kNR + j] += static_cast<float>(a[r * kNR + j]) * xs[r * nbk + b];
  }
  finish_tile(f, MR, e, r0, n0, nv);
}

#ifdef FASTLM_X86
// AVX-512: one pair row (16 channels x 2 k) is one zmm of int16 (vpmovsxbw from 32 bytes).
// U independent int32 accumulator sets per row hide the dot-product latency.
#define FASTLM_I16_TILE_512(NAME, TARGET, DOT)                                                                 \
  template <int MR>                                                                                            \
  TARGET void NAME(const int16_t* xq, const float* xs, int64_t K, const int8_t* p, const Epilogue& e,          \
                   int64_t r0, int64_t n0, int64_t nv) {                                                       \
    constexpr int U = MR == 2 ? 2 : 1;                                                                         \
    const int64_t K2 = (K + 1) / 2, nbk = (K + kQB - 1) / kQB;                                                 \
    const int64_t pf = i16_prefetch_bytes();                                                                       \
    if constexpr (MR == 1) { /* named accumulators: an array of them went through the stack each step */      \
      const int32_t* x1 = reinterpret_cast<const int32_t*>(xq);                                                \
      const char* pc = reinterpret_cast<const char*>(p);                                                       \
      __m512 f0 = _mm512_setzero_ps();                                                                         \
      for (int64_t b = 0; b < nbk; ++b) {                                                                      \
        const int64_t kk1 = std::min(K2, (b + 1) * kQP);                                                       \
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;    \
        int64_t kk = b * kQP;                                                                                  \
        for (; kk + 8 <= kk1; kk += 8) {                                                                       \
          const char* q = pc + kk * kPairRow;                                                                  \
          if (pf > 0) { /* 8 pair rows: 4 cache lines */                                                       \
            _mm_prefetch(q + pf, _MM_HINT_T0);                                                                 \
            _mm_prefetch(q + pf + 64, _MM_HINT_T0);                                                            \
            _mm_prefetch(q + pf + 128, _MM_HINT_T0);                                                           \
            _mm_prefetch(q + pf + 192, _MM_HINT_T0);                                                           \
          }                                                                                                    \
          a0 = DOT(a0, FASTLM_W512(q), _mm512_set1_epi32(x1[kk]));                                             \
          a1 = DOT(a1, FASTLM_W512(q + 32), _mm512_set1_epi32(x1[kk + 1]));                                    \
          a2 = DOT(a2, FASTLM_W512(q + 64), _mm512_set1_epi32(x1[kk + 2]));                                    \
          a3 = DOT(a3, FASTLM_W512(q + 96), _mm512_set1_epi32(x1[kk + 3]));                                    \
          a4 = DOT(a4, FASTLM_W512(q + 128), _mm512_set1_epi32(x1[kk + 4]));                                   \
          a5 = DOT(a5, FASTLM_W512(q + 160), _mm512_set1_epi32(x1[kk + 5]));                                   \
          a6 = DOT(a6, FASTLM_W512(q + 192), _mm512_set1_epi32(x1[kk + 6]));                                   \
          a7 = DOT(a7, FASTLM_W512(q + 224), _mm512_set1_epi32(x1[kk + 7]));                                   \
        }                                                                                                      \
        for (; kk < kk1; ++kk) a0 = DOT(a0, FASTLM_W512(pc + kk * kPairRow), _mm512_set1_epi32(x1[kk]));       \
        const __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)), \
                                           _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7))); \
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xs[b]), f0);                                \
      }                                                                                                        \
      alignas(64) float acc1[kNR];                                                                             \
      _mm512_store_ps(acc1, f0);                                                                               \
      finish_tile(acc1, 1, e, r0, n0, nv);                                                                     \
      return;                                                                                                  \
    }                                                                                                          \
    const int32_t* xp[MR];                                                                                     \
    for (int r = 0; r < MR; ++r) xp[r] = reinterpret_cast<const int32_t*>(xq + r * 2 * K2);                    \
    __m512 f[MR];                                                                                              \
    for (int r = 0; r < MR; ++r) f[r] = _mm512_setzero_ps();                                                   \
    for (int64_t b = 0; b < nbk; ++b) {                                                                        \
      const int64_t kk1 = std::min(K2, (b + 1) * kQP);                                                         \
      __m512i a[U][MR];                                                                                        \
      for (int u = 0; u < U; ++u)                                                                              \
        for (int r = 0; r < MR; ++r) a[u][r] = _mm512_setzero_si512();                                         \
      int64_t kk = b * kQP;                                                                                    \
      for (; kk + U <= kk1; kk += U) {                                                                         \
        if (pf > 0)                                                                                            \
          for (int64_t o = (kk * kPairRow + 63) & ~int64_t{63}; o < (kk + U) * kPairRow; o += 64)              \
            _mm_prefetch(reinterpret_cast<const char*>(p) + o + pf, _MM_HINT_T0);                              \
        for (int u = 0; u < U; ++u) {                                                                          \
          const __m512i w = _mm512_cvtepi8_epi16(                                                              \
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (kk + u) * kPairRow)));                  \
          for (int r = 0; r < MR; ++r) a[u][r] = DOT(a[u][r], w, _mm512_set1_epi32(xp[r][kk + u]));            \
        }                                                                                                      \
      }                                                                                                        \
      for (; kk < kk1; ++kk) {                                                                                 \
        const __m512i w =                                                                                      \
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kk * kPairRow)));     \
        for (int r = 0; r < MR; ++r) a[0][r] = DOT(a[0][r], w, _mm512_set1_epi32(xp[r][kk]));                 \
      }                                                                                                        \
      for (int r = 0; r < MR; ++r) {                                                                           \
        __m512i s = a[0][r];                                                                                   \
        for (int u = 1; u < U; ++u) s = _mm512_add_epi32(s, a[u][r]);                                          \
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xs[r * nbk + b]), f[r]);                  \
      }                                                                                                        \
    }                                                                                                          \
    alignas(64) float acc[MR * kNR];                                                                           \
    for (int r = 0; r < MR; ++r) _mm512_store_ps(acc + r * kNR, f[r]);                                         \
    finish_tile(acc, MR, e, r0, n0, nv);                                                                       \
  }

#define FASTLM_W512(q) _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)))
#define FASTLM_DOT_VNNI(a, w, x) _mm512_dpwssd_epi32((a), (w), (x))
#define FASTLM_DOT_BW(a, w, x) _mm512_add_epi32((a), _mm512_madd_epi16((w), (x)))
FASTLM_I16_TILE_512(tile_i16_vnni, FASTLM_AVX512VNNI, FASTLM_DOT_VNNI)
FASTLM_I16_TILE_512(tile_i16_avx512bw, FASTLM_AVX512BW, FASTLM_DOT_BW)

// Wide int16 tiles (AVX-512BW, 5..16 rows): each widened pair row of panel (vpmovsxbw) feeds MR dots,
// one per row's int32 block sum (MR zmm, named: gcc kept an array of them in memory, or rotated it
// through register copies, ~2 moves per dot), so a 16-row prefill reads each panel once and widens
// each pair row once per 16 dots. The rows' activation pairs come interleaved, (K2, MR) int32
// (pair_slot), for one pointer with constant offsets; the fp32 sums live in a stack tile, touched once
// per block. Every row's int32 block sums and its fp32 sum order are those of the narrow tiles, so
// the outputs are the same bits at any tile size.
#define FASTLM_R16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define FASTLM_WDOT_VNNI(a, w, xp) asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(a) : "v"(w), "m"(*(xp)))
#define FASTLM_WDOT_BW(a, w, xp) ((a) = _mm512_add_epi32((a), _mm512_madd_epi16((w), _mm512_set1_epi32(*(xp)))))
#define FASTLM_I16_WIDE_512(NAME, TARGET, WDOT)                                                                \
  template <int MR>                                                                                            \
  TARGET void NAME(const int16_t* xq, const float* xs, int64_t K, const int8_t* p, const Epilogue& e,          \
                   int64_t r0, int64_t n0, int64_t nv) {                                                       \
    static_assert(MR >= 1 && MR <= 16, "wide int16 tiles hold 1..16 rows");                                   \
    const int64_t K2 = (K + 1) / 2, nbk = (K + kQB - 1) / kQB;                                                 \
    const int32_t* xt = reinterpret_cast<const int32_t*>(xq);                                                  \
    alignas(64) float fw[MR * kNR];                                                                            \
    for (int i = 0; i < MR * kNR; ++i) fw[i] = 0.0f;                                                           \
    for (int64_t b = 0; b < nbk; ++b) {                                                                        \
      const int64_t kk1 = std::min(K2, (b + 1) * kQP);                                                         \
      FASTLM_R16(FASTLM_WIDE_DECL)                                                                             \
      for (int64_t kk = b * kQP; kk < kk1; ++kk) {                                                             \
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kk * kPairRow))); \
        const int32_t* xk = xt + kk * MR;                                                                      \
        FASTLM_R16(FASTLM_WIDE_DOT)                                                                            \
      }                                                                                                        \
      FASTLM_R16(FASTLM_WIDE_FIN)                                                                              \
    }                                                                                                          \
    finish_tile(fw, MR, e, r0, n0, nv);                                                                        \
  }
#define FASTLM_WIDE_DECL(i) __m512i a##i = _mm512_setzero_si512();
#define FASTLM_WIDE_FIN(i)                                                                                     \
  if constexpr (MR > i)                                                                                        \
    _mm512_store_ps(fw + i * kNR, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##i), _mm512_set1_ps(xs[i * nbk + b]),   \
                                                  _mm512_load_ps(fw + i * kNR)));
#define FASTLM_WIDE_DOT(i) \
  if constexpr (MR > i) FASTLM_WDOT_VNNI(a##i, w, xk + i);
FASTLM_I16_WIDE_512(tile_i16_wide_vnni, FASTLM_AVX512VNNI, FASTLM_WDOT_VNNI)
#undef FASTLM_WIDE_DOT
#define FASTLM_WIDE_DOT(i) \
  if constexpr (MR > i) FASTLM_WDOT_BW(a##i, w, xk + i);
FASTLM_I16_WIDE_512(tile_i16_wide_avx512bw, FASTLM_AVX512BW, FASTLM_WDOT_BW)
#undef FASTLM_WIDE_DOT
#undef FASTLM_WIDE_DECL
#undef FASTLM_WIDE_FIN
#undef FASTLM_I16_WIDE_512
#undef FASTLM_WDOT_VNNI
#undef FASTLM_WDOT_BW
#undef FASTLM_R16
#undef FASTLM_I16_TILE_512
#undef FASTLM_DOT_VNNI
#undef FASTLM_DOT_BW
#undef FASTLM_W512

// AVX2: a pair row is two ymm of int16 (channels 0-7 and 8-15), vpmaddwd + vpaddd each.
#define FASTLM_W256(q) _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))
template <int MR>
FASTLM_AVX2 void tile_i16_avx2(const int16_t* xq, const float* xs, int64_t K, const int8_t* p, const Epilogue& e,
                               int64_t r0, int64_t n0, int64_t nv) {
  const int64_t K2 = (K + 1) / 2, nbk = (K + kQB - 1) / kQB;
  const int64_t pf = i16_prefetch_bytes();
  if constexpr (MR == 1) {  // named accumulators (an array of them went through the stack each step)
    const int32_t* x1 = reinterpret_cast<const int32_t*>(xq);
    const char* pc = reinterpret_cast<const char*>(p);
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nbk; ++b) {
      const int64_t kk1 = std::min(K2, (b + 1) * kQP);
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      int64_t kk = b * kQP;
      for (; kk + 4 <= kk1; kk += 4) {
        const char* q = pc + kk * kPairRow;
        if (pf > 0) {  // 4 pair rows: 2 cache lines
          _mm_prefetch(q + pf, _MM_HINT_T0);
          _mm_prefetch(q + pf + 64, _MM_HINT_T0);
        }
        __m256i xb = _mm256_set1_epi32(x1[kk]);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(FASTLM_W256(q), xb));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(FASTLM_W256(q + 16), xb));
        xb = _mm256_set1_epi32(x1[kk + 1]);
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(FASTLM_W256(q + 32), xb));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(FASTLM_W256(q + 48), xb));
        xb = _mm256_set1_epi32(x1[kk + 2]);
        a4 = _mm256_add_epi32(a4, _mm256_madd_epi16(FASTLM_W256(q + 64), xb));
        a5 = _mm256_add_epi32(a5, _mm256_madd_epi16(FASTLM_W256(q + 80), xb));
        xb = _mm256_set1_epi32(x1[kk + 3]);
        a6 = _mm256_add_epi32(a6, _mm256_madd_epi16(FASTLM_W256(q + 96), xb));
        a7 = _mm256_add_epi32(a7, _mm256_madd_epi16(FASTLM_W256(q + 112), xb));
      }
      for (; kk < kk1; ++kk) {
        const char* q = pc + kk * kPairRow;
        const __m256i xb = _mm256_set1_epi32(x1[kk]);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(FASTLM_W256(q), xb));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(FASTLM_W256(q + 16), xb));
      }
      const __m256 sc = _mm256_set1_ps(xs[b]);
      const __m256i s0 = _mm256_add_epi32(_mm256_add_epi32(a0, a2), _mm256_add_epi32(a4, a6));
      const __m256i s1 = _mm256_add_epi32(_mm256_add_epi32(a1, a3), _mm256_add_epi32(a5, a7));
      f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), sc, f0);
      f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), sc, f1);
    }
    alignas(32) float acc1[kNR];
    _mm256_store_ps(acc1, f0);
    _mm256_store_ps(acc1 + 8, f1);
    finish_tile(acc1, 1, e, r0, n0, nv);
    return;
  }
  if constexpr (MR > 2) {  // wide tile: 2 widened half rows feed 2 * MR dots; fp32 sums in a stack tile
    const int32_t* xt = reinterpret_cast<const int32_t*>(xq);  // interleaved: (K2, MR) pairs
    alignas(32) float fw[MR * kNR];
    for (int i = 0; i < MR * kNR; ++i) fw[i] = 0.0f;
    for (int64_t b = 0; b < nbk; ++b) {
      const int64_t kk1 = std::min(K2, (b + 1) * kQP);
      __m256i a[MR][2];
      for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
      for (int64_t kk = b * kQP; kk < kk1; ++kk) {
        const int8_t* w = p + kk * kPairRow;
        if (pf > 0 && (kk & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w) + pf, _MM_HINT_T0);
        const __m256i w0 = FASTLM_W256(w), w1 = FASTLM_W256(w + 16);
        for (int r = 0; r < MR; ++r) {
          const __m256i xb = _mm256_set1_epi32(xt[kk * MR + r]);
          a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(w0, xb));
          a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(w1, xb));
        }
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 sc = _mm256_set1_ps(xs[r * nbk + b]);
        _mm256_store_ps(fw + r * kNR, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][0]), sc, _mm256_load_ps(fw + r * kNR)));
        _mm256_store_ps(fw + r * kNR + 8,
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][1]), sc, _mm256_load_ps(fw + r * kNR + 8)));
      }
    }
    finish_tile(fw, MR, e, r0, n0, nv);
    return;
  }
  const int32_t* xp[MR];
  for (int r = 0; r < MR; ++r) xp[r] = reinterpret_cast<const int32_t*>(xq + r * 2 * K2);
  __m256 f[MR][2];
  for (int r = 0; r < MR; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nbk; ++b) {
    const int64_t kk1 = std::min(K2, (b + 1) * kQP);
    __m256i a[MR][2];
    for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
    for (int64_t kk = b * kQP; kk < kk1; ++kk) {
      const int8_t* w = p + kk * kPairRow;
      if (pf > 0 && (kk & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w) + pf, _MM_HINT_T0);
      const __m256i w0 = FASTLM_W256(w), w1 = FASTLM_W256(w + 16);
      for (int r = 0; r < MR; ++r) {
        const __m256i xb = _mm256_set1_epi32(xp[r][kk]);
        a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(w0, xb));
        a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(w1, xb));
      }
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 sc = _mm256_set1_ps(xs[r * nbk + b]);
      f[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][0]), sc, f[r][0]);
      f[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][1]), sc, f[r][1]);
    }
  }
  alignas(32) float acc[MR * kNR];
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(acc + r * kNR, f[r][0]);
    _mm256_store_ps(acc + r * kNR + 8, f[r][1]);
  }
  finish_tile(acc, MR, e, r0, n0, nv);
}
#endif

// Rows per int16 tile: AVX-512 up to 4 (4 x U int32 + 4 fp32 of 32 zmm), AVX2 and portable 2.
// Rows per int16 tile (the most each ISA's kernels take, and the default):
//   AVX-512BW 16 for K <= 768, else 4 (see kI16WideXBytes): MR int32 block sums in zmm + the widened
//     pair row (MR + 1 of 32; fp32 sums in a stack tile from MR 5 on): a 16-row prefill reads each
//     panel once and widens each pair row once per 16 dots, against 4 passes of 4-row tiles;
//   AVX2 4 (2 MR int32 sums + 2 widened halves + broadcast + product: 12 of 16 ymm; 6 rows spilled
//     and ran slower than 2, forced AVX2 on Zen 4, 1 thread: 4 rows 1.05-1.27x the speed of 2); portable 2.
// torch.ops.fastlm.int8_tile_rows(rows) caps them at run time for A/B runs (0: the defaults, -1 queries);
// every row's int32 block sums and fp32 sum order are the same at any tile size, so the outputs are too.
constexpr int kI16MaxRows512 = 16, kI16MaxRowsAvx2 = 4;
std::atomic<int> g_i16_tile{0};

int64_t int8_tile_rows(int64_t rows) {
  TORCH_CHECK_VALUE(rows >= -1 && rows <= kI16MaxRows512, "int8_tile_rows: rows must be -1 (query), 0 (the "
                    "defaults) or a cap in [1, ", kI16MaxRows512, "], got ", rows);
  if (rows >= 0) g_i16_tile.store(static_cast<int>(rows));
  return g_i16_tile.load();
}

// The AVX-512 default depends on K: a wide tile streams its rows' interleaved pairs (K2 * 4 bytes a row)
// once per panel, and past ~24 KB of them (K > 768 at 16 rows) they no longer stay in L1 beside the
// panel: measured 1 thread, thread CPU time, M = 16, best of 10 alternating rounds, on the loaded
// Zen 4: K = 768 16 rows 0.98-1.0x the time of 4; K = 1024 / 2048 / 3072 4 rows 0.98 / 0.97 / 0.96x
// the time of 16 (and of 6, 8, 12; 5 rows, tiled 5 + 5 + 5 + 1, was the slowest).
constexpr int64_t kI16WideXBytes = int64_t{24} << 10;

int i16_rows(int isa, int64_t K) {
  const int cap = g_i16_tile.load(std::memory_order_relaxed);
  int most = 2, dflt = 2;
  if (isa == kAvx512 && cpu_has_avx512bw()) {
    most = kI16MaxRows512;
    dflt = (K + 1) / 2 * 4 * kI16MaxRows512 <= kI16WideXBytes ? kI16MaxRows512 : 4;
  } else if (isa != kPortable) {
    most = dflt = kI16MaxRowsAvx2;
  }
  return cap > 0 ? std::min(cap, most) : dflt;
}

template <int MR>
void run_tile_i16(int isa, const int16_t* xq, const float* xs, int64_t K, const int8_t* p, const Epilogue& e,
                  int64_t r0, int64_t n0, int64_t nv) {
#ifdef FASTLM_X86
  if (isa == kAvx512 && cpu_has_avx512bw()) {
    const bool vnni = i8_mode() >= 2 && cpu_has_avx512vnni();
    if constexpr (MR > 4) {  // i16_wide
      if (vnni) tile_i16_wide_vnni<MR>(xq, xs, K, p, e, r0, n0, nv);
      else tile_i16_wide_avx512bw<MR>(xq, xs, K, p, e, r0, n0, nv);
    } else {
      if (vnni) tile_i16_vnni<MR>(xq, xs, K, p, e, r0, n0, nv);
      else tile_i16_avx512bw<MR>(xq, xs, K, p, e, r0, n0, nv);
    }
    return;
  }
  if (isa != kPortable) {
    if constexpr (MR <= kI16MaxRowsAvx2) {
      tile_i16_avx2<MR>(xq, xs, K, p, e, r0, n0, nv);
      return;
    }
  }
#endif
  tile_i16_portable<MR>(xq, xs, K, p, e, r0, n0, nv);
}

template <int... MRs>
void tile_i16_dispatch(std::integer_sequence<int, MRs...>, int mr, int isa, const int16_t* xq, const float* xs,
                       int64_t K, const int8_t* p, const Epilogue& e, int64_t r0, int64_t n0, int64_t nv) {
  ((mr == MRs + 1 ? run_tile_i16<MRs + 1>(isa, xq, xs, K, p, e, r0, n0, nv) : void()), ...);
}

void tile_i16(int mr, int isa, const int16_t* xq, const float* xs, int64_t K, const int8_t* p, const Epilogue& e,
              int64_t r0, int64_t n0, int64_t nv) {
  tile_i16_dispatch(std::make_integer_sequence<int, kI16MaxRows512>{}, mr, isa, xq, xs, K, p, e, r0, n0, nv);
}

template <int MR>
void run_tile(int isa, bool int8, const float* x, int64_t K, const void* p, const Epilogue& e, int64_t r0, int64_t n0,
              int64_t nv) {
#ifdef FASTLM_X86
  if (isa == kAvx512) {
    if (int8) tile_avx512<true, MR>(x, K, p, e, r0, n0, nv);
    else tile_avx512<false, MR>(x, K, p, e, r0, n0, nv);
    return;
  }
  if (isa == kAvx2) {
    if constexpr (MR == 1) {  // the decode GEMV
      if (int8) tile1_avx2<true>(x, K, p, e, r0, n0, nv);
      else tile1_avx2<false>(x, K, p, e, r0, n0, nv);
    } else {
      if (int8) tile_avx2<true, MR>(x, K, p, e, r0, n0, nv);
      else tile_avx2<false, MR>(x, K, p, e, r0, n0, nv);
    }
    return;
  }
#endif
  if (int8) tile_portable<int8_t, MR>(x, K, static_cast<const int8_t*>(p), e, r0, n0, nv);
  else tile_portable<float, MR>(x, K, static_cast<const float*>(p), e, r0, n0, nv);
}

void tile(int mr, int isa, bool int8, const float* x, int64_t K, const void* p, const Epilogue& e, int64_t r0,
          int64_t n0, int64_t nv) {
  switch (mr) {
    case 1: return run_tile<1>(isa, int8, x, K, p, e, r0, n0, nv);
    case 2: return run_tile<2>(isa, int8, x, K, p, e, r0, n0, nv);
    case 3: return run_tile<3>(isa, int8, x, K, p, e, r0, n0, nv);
    case 4: return run_tile<4>(isa, int8, x, K, p, e, r0, n0, nv);
    case 5: return run_tile<5>(isa, int8, x, K, p, e, r0, n0, nv);
    default: return run_tile<6>(isa, int8, x, K, p, e, r0, n0, nv);
  }
}

// Weight kinds of packed_gemm: fp32 panels, int8 panels (ceil(N / 16), K, 16), int8 pair panels
// (ceil(N / 16), ceil(K / 2), 32).
enum WKind : int { kWF32 = 0, kWI8 = 1, kWI8Pairs = 2 };

// One int8 pair panel (ceil(K / 2), 32) -> an fp32 (K, 16) panel (the exact values q, the scale is
// applied in the epilogue): the prefill blocks (more than kDequantRows rows) run the fp32 register
// tiles on it. Each pair row is 16 int16 lanes (k even in the low byte, k odd in the high byte) widened
// to int32; an arithmetic shift right by 8 gives the odd k, a shift left by 24 then right by 24 the even
// one (both sign-extended), then vcvtdq2ps: ~4 vector instructions per 16 weights. Before this was a
// scalar loop, ~0.4 ns a weight on Zen 4 (1 thread), which at 17-95 rows cost as much as the FMAs
// (int8 prefill ran 0.45-0.88x the rate of fp32 panels there, bench/int8_prefill_rate.py).
void dequant_pairs_portable(const int8_t* q, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* row = q + (k >> 1) * kPairRow + (k & 1);
    for (int64_t j = 0; j < kNR; ++j) out[k * kNR + j] = static_cast<float>(row[2 * j]);
  }
}

#ifdef FASTLM_X86
FASTLM_AVX2 void dequant_pairs_avx2(const int8_t* q, int64_t K, float* out) {
  const int64_t K2 = K / 2;  // whole pairs; an odd K's last k below
  for (int64_t kk = 0; kk < K2; ++kk) {
    const int8_t* r = q + kk * kPairRow;
    float* o = out + 2 * kk * kNR;
    for (int h = 0; h < 2; ++h) {  // channels 0-7, 8-15
      const __m256i v = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16 * h)));
      _mm256_storeu_ps(o + 8 * h, _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24)));
      _mm256_storeu_ps(o + kNR + 8 * h, _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 8)));
    }
  }
  if (K & 1)
    for (int64_t j = 0; j < kNR; ++j) out[(K - 1) * kNR + j] = static_cast<float>(q[K2 * kPairRow + 2 * j]);
}

// AVX2: the first row tile (3 to 6 rows: a block of more than 16 rows splits into tiles of at least
// 3) of a prefill block on one int8 pair panel, tile_avx2<false, MR>'s FMAs in its order (the same bits)
// with the panel widened in registers and stored to the block's fp32 panel p for the other row tiles.
// 2 MR accumulators + 2 weight vectors + a broadcast fill the 16 ymm, so the odd k's weights are widened
// again from memory (vpmovsxwd m128) instead of keeping the int32 pair vectors.
#define FASTLM_WSTORE(R, A0, A1)              \
  if constexpr (MR > R) {                     \
    _mm256_store_ps(acc + R * kNR, A0);       \
    _mm256_store_ps(acc + R * kNR + 8, A1);   \
  }
template <int MR>
FASTLM_AVX2 void tile_avx2w(const float* x, int64_t K, const int8_t* q, float* p, const Epilogue& e, int64_t r0,
                            int64_t n0, int64_t nv) {
  static_assert(MR >= 3 && MR <= kMR, "tile_avx2w: 3 to 6 rows (tile_avx2's one-accumulator-set tiles)");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const int64_t K2 = K / 2;
  for (int64_t kk = 0; kk < K2; ++kk) {
    const __m128i* r = reinterpret_cast<const __m128i*>(q + kk * kPairRow);
    const int64_t k = 2 * kk;
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128(r)), 24), 24));
    __m256 w1 =
        _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128(r + 1)), 24), 24));
    _mm256_storeu_ps(p + k * kNR, w0);
    _mm256_storeu_ps(p + k * kNR + 8, w1);
    FASTLM_ROWS(k)
    w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128(r)), 8));
    w1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128(r + 1)), 8));
    _mm256_storeu_ps(p + (k + 1) * kNR, w0);
    _mm256_storeu_ps(p + (k + 1) * kNR + 8, w1);
    FASTLM_ROWS(k + 1)
  }
  if (K & 1) {  // the last k: the even half of a zero-padded pair row
    for (int64_t j = 0; j < kNR; ++j) p[(K - 1) * kNR + j] = static_cast<float>(q[K2 * kPairRow + 2 * j]);
    const __m256 w0 = _mm256_loadu_ps(p + (K - 1) * kNR), w1 = _mm256_loadu_ps(p + (K - 1) * kNR + 8);
    FASTLM_ROWS(K - 1)
  }
  alignas(32) float acc[MR * kNR];
  FASTLM_WSTORE(0, c00, c01)
  FASTLM_WSTORE(1, c10, c11)
  FASTLM_WSTORE(2, c20, c21)
  FASTLM_WSTORE(3, c30, c31)
  FASTLM_WSTORE(4, c40, c41)
  FASTLM_WSTORE(5, c50, c51)
  finish_tile(acc, MR, e, r0, n0, nv);
}
#undef FASTLM_ROW
#undef FASTLM_ROWS
#undef FASTLM_WSTORE

FASTLM_AVX512 void dequant_pairs_avx512(const int8_t* q, int64_t K, float* out) {
  const int64_t K2 = K / 2;
  for (int64_t kk = 0; kk < K2; ++kk) {
    const __m512i v = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + kk * kPairRow)));
    _mm512_storeu_ps(out + 2 * kk * kNR, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)));
    _mm512_storeu_ps(out + (2 * kk + 1) * kNR, _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 8)));
  }
  if (K & 1)
    for (int64_t j = 0; j < kNR; ++j) out[(K - 1) * kNR + j] = static_cast<float>(q[K2 * kPairRow + 2 * j]);
}

// The first row tile of an AVX-512 prefill block on two int8 pair panels: tile2_avx512's MR rows x 32
// channels, with each pair row widened in registers (dequant_pairs_avx512's instructions) and the fp32
// values both fed to the FMAs and stored to the block's fp32 panels p0 / p1, which the block's other row
// tiles then read (tile2). The conversion then overlaps the first tile's FMAs instead of running as a
// pass of its own before them (the FMAs bound the tile, the widening runs beside them on other vector
// pipes). Same fp32 values, same FMA order per accumulator as tile2_avx512: the same bits.
template <int MR>
FASTLM_AVX512 void tile2w_avx512(const float* x, int64_t K, const int8_t* q0, const int8_t* q1, float* p0, float* p1,
                                 const Epilogue& e, int64_t r0, int64_t n0, int64_t nv1) {
  __m512 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  for (int64_t kk = 0; kk < K2; ++kk) {
    const int64_t k = 2 * kk;
    const __m512i v0 = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + kk * kPairRow)));
    const __m512i v1 = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + kk * kPairRow)));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v0, 24), 24));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v1, 24), 24));
    _mm512_storeu_ps(p0 + k * kNR, w0);
    _mm512_storeu_ps(p1 + k * kNR, w1);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      a0[r] = _mm512_fmadd_ps(xb, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xb, w1, a1[r]);
    }
    const __m512 u0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(v0, 8));
    const __m512 u1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(v1, 8));
    _mm512_storeu_ps(p0 + (k + 1) * kNR, u0);
    _mm512_storeu_ps(p1 + (k + 1) * kNR, u1);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k + 1]);
      a0[r] = _mm512_fmadd_ps(xb, u0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xb, u1, a1[r]);
    }
  }
  if (K & 1) {  // the last k: the even half of a zero-padded pair row
    for (int64_t j = 0; j < kNR; ++j) {
      p0[(K - 1) * kNR + j] = static_cast<float>(q0[K2 * kPairRow + 2 * j]);
      p1[(K - 1) * kNR + j] = static_cast<float>(q1[K2 * kPairRow + 2 * j]);
    }
    const __m512 w0 = _mm512_loadu_ps(p0 + (K - 1) * kNR), w1 = _mm512_loadu_ps(p1 + (K - 1) * kNR);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + K - 1]);
      a0[r] = _mm512_fmadd_ps(xb, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xb, w1, a1[r]);
    }
  }
  alignas(64) float acc[MR * kNR];
  for (int r = 0; r < MR; ++r) _mm512_store_ps(acc + r * kNR, a0[r]);
  finish_tile(acc, MR, e, r0, n0, kNR);
  for (int r = 0; r < MR; ++r) _mm512_store_ps(acc + r * kNR, a1[r]);
  finish_tile(acc, MR, e, r0, n0 + kNR, nv1);
}

template <int... MRs>
void tile2w_dispatch(std::integer_sequence<int, MRs...>, int mr, const float* x, int64_t K, const int8_t* q0,
                     const int8_t* q1, float* p0, float* p1, const Epilogue& e, int64_t r0, int64_t n0, int64_t nv1) {
  ((mr == MRs + 1 ? tile2w_avx512<MRs + 1>(x, K, q0, q1, p0, p1, e, r0, n0, nv1) : void()), ...);
}
#endif

void dequant_pairs(int isa, const int8_t* q, int64_t K, float* out) {
#ifdef FASTLM_X86
  if (isa == kAvx512) return dequant_pairs_avx512(q, K, out);
  if (isa == kAvx2) return dequant_pairs_avx2(q, K, out);
#endif
  dequant_pairs_portable(q, K, out);
}

// The older (K, 16) int8 panels: n int8 -> fp32 (packed_gemm itself is built for the baseline ISA).
#ifdef FASTLM_X86
FASTLM_AVX2 void dequant_i8_avx2(const int8_t* q, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)))));
  for (; i < n; ++i) out[i] = static_cast<float>(q[i]);
}
#endif

void dequant_i8(int isa, const int8_t* q, int64_t n, float* out) {
#ifdef FASTLM_X86
  if (isa != kPortable) return dequant_i8_avx2(q, n, out);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]);
}

// i16_max_rows: int8 pair panels with M <= this run the int16-activation kernels (packed_linear:
// kDequantRows, so prefill / forward numerics stay fp32-activation past 16 rows; the decode ops:
// kI16Rows, so a batched decode row equals the B = 1 step's).
void packed_gemm(const float* x, int64_t M, int64_t K, const void* w, int wkind, int64_t N, const Epilogue& e,
                 int64_t i16_max_rows = kDequantRows) {
  const int isa = current_isa();
  const bool int8 = wkind != kWF32, pairs8 = wkind == kWI8Pairs;
  const int64_t NB = (N + kNR - 1) / kNR;
  const int64_t K2 = (K + 1) / 2;
  const int64_t panel_bytes = pairs8 ? K2 * kPairRow : K * kNR * (int8 ? 1 : 4);
  // int8 pair panels, decode-sized M (<= kI16Rows): int16 activations quantized once here, on the
  // calling thread; each row's result is independent of M (exact int32 block sums per row)
  const bool i16 = pairs8 && M <= i16_max_rows && i8_mode() >= 1;
  const int mri = i16_rows(isa, K);
  thread_local std::vector<int16_t> xq_buf;
  thread_local std::vector<float> xs_buf;
  if (i16) {
    const int64_t nbk = (K + kQB - 1) / kQB;
    if (static_cast<int64_t>(xq_buf.size()) < M * 2 * K2) xq_buf.resize(M * 2 * K2);
    if (static_cast<int64_t>(xs_buf.size()) < M * nbk) xs_buf.resize(M * nbk);
#ifdef FASTLM_X86
    if (isa != kPortable) quantize_rows_i16_avx2(x, M, K, xq_buf.data(), xs_buf.data(), isa, mri);
    else
#endif
      quantize_rows_i16(x, M, K, xq_buf.data(), xs_buf.data(), isa, mri);
  }
  const int16_t* xq = xq_buf.data();  // a tile of rows from r0 reads from xq + r0 * xq_stride (pair_slot)
  const float* xs = xs_buf.data();
  const int64_t xq_stride = 2 * K2, xs_stride = (K + kQB - 1) / kQB;
  static_assert(kI16Rows <= kMC, "int16 tiles are laid out from row 0: one block of rows");
  // chunks of at least ~512 KB of weights (FASTLM_GEMV_CHUNK_KB): long contiguous streams per thread
  // for the prefetchers (measured: 64 KB chunks 14.2 ms/token fp32, 256 KB 12.6, 512 KB ~2% faster
  // again in the decode step); small layers stay on the calling thread
  static const int64_t chunk_bytes = [] {
    const char* env = std::getenv("FASTLM_GEMV_CHUNK_KB");
    return (env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : int64_t{512}) << 10;
  }();
  // prefill blocks on AVX-512 run two panels per tile: chunks hold an even number of panels
  const bool pairs = isa == kAvx512 && M > kDequantRows && !i16;
  // as many chunks as the work holds chunk_bytes, rounded to a multiple of the threads so that
  // none waits on a last odd chunk (a 768 x 768 fp32 GEMV in 5 chunks ran 3 : 2), and at least
  // one per thread once the work holds 64 KB per thread (int8 768 x 768 is 590 KB: one chunk
  // left a core idle)
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t work = NB * panel_bytes * std::max<int64_t>(1, M / kMR);
  int64_t want = std::max<int64_t>(1, work / chunk_bytes);
  if (work >= threads * (int64_t{64} << 10)) want = std::max(want, threads);
  if (want >= threads) want = (want + threads / 2) / threads * threads;
  int64_t grain = std::max<int64_t>(1, (NB + want - 1) / want);
  if (pairs) grain = std::max<int64_t>(2, grain + (grain & 1));
  const int64_t chunks = (NB + grain - 1) / grain;
  // panels [b0, b1) of every row of x
  auto panels = [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> deq;
    for (int64_t m0 = 0; m0 < M; m0 += kMC) {
      const int64_t mc = std::min(kMC, M - m0);
      const bool dequant = int8 && !i16 && (mc > kDequantRows || pairs8);
      const bool pair_block = pairs && mc > kDequantRows;
      if (dequant && static_cast<int64_t>(deq.size()) < 2 * K * kNR) deq.resize(2 * K * kNR);
      for (int64_t nb = b0; nb < b1;) {
        const int64_t np = pair_block && nb + 1 < b1 ? 2 : 1;  // panels in this step
        const void* panel = static_cast<const char*>(w) + nb * panel_bytes;
        const bool panel_int8 = int8 && !dequant;
        // pair panels in a prefill block: widened in the block's first row tile (AVX-512, two panels:
        // tile2w_avx512; AVX2, one panel of at least 3 rows a tile: tile_avx2w), below
        const bool widen_first = dequant && pairs8 && mc > kDequantRows && (np == 2 || isa == kAvx2);
        const int8_t* q_pairs = static_cast<const int8_t*>(panel);
        if (dequant && !widen_first) {  // int8 panels -> fp32 once per block of rows
          const int8_t* q = static_cast<const int8_t*>(panel);
          if (pairs8) {  // pair panels -> (K, 16) fp32 panels
            for (int64_t pi = 0; pi < np; ++pi) dequant_pairs(isa, q + pi * panel_bytes, K, deq.data() + pi * K * kNR);
          } else {
            dequant_i8(isa, q, np * K * kNR, deq.data());
          }
        }
        if (dequant) panel = deq.data();
        const int64_t n0 = nb * kNR;
#ifdef FASTLM_X86
        if (np == 2) {
          const float* p0 = static_cast<const float*>(panel);
          const int64_t nv1 = std::min(kNR, N - n0 - kNR);
          for (int64_t r0 = m0; r0 < m0 + mc; r0 += kMR2) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR2, m0 + mc - r0));
            if (widen_first && r0 == m0)
              tile2w_dispatch(std::make_integer_sequence<int, kMR2>{}, mr, x + r0 * K, K, q_pairs,
                              q_pairs + panel_bytes, deq.data(), deq.data() + K * kNR, e, r0, n0, nv1);
            else
              tile2(mr, x + r0 * K, K, p0, p0 + K * kNR, e, r0, n0, nv1);
          }
          nb += 2;
          continue;
        }
#endif
        const int64_t nv = std::min(kNR, N - n0);
        if (i16) {
          for (int64_t r0 = m0; r0 < m0 + mc; r0 += mri) {
            const int mr = static_cast<int>(std::min<int64_t>(mri, m0 + mc - r0));
            tile_i16(mr, isa, xq + r0 * xq_stride, xs + r0 * xs_stride, K, static_cast<const int8_t*>(panel), e, r0,
                     n0, nv);
          }
          nb += 1;
          continue;
        }
        // the rows in ceil(mc / kMR) tiles of balanced height (32 rows: 6, 6, 5, 5, 5, 5, not
        // 6 x 5 + 2): no thin last tile that streams the panel again for one or two rows
        const int64_t nt = (mc + kMR - 1) / kMR;
        for (int64_t t = 0, r0 = m0; t < nt; ++t) {
          const int mr = static_cast<int>(mc / nt + (t < mc % nt ? 1 : 0));
#ifdef FASTLM_X86
          if (widen_first && t == 0) {  // AVX2: widened in the first row tile (tile_avx2w)
            float* pd = deq.data();
            if (mr == 3) tile_avx2w<3>(x + r0 * K, K, q_pairs, pd, e, r0, n0, nv);
            else if (mr == 4) tile_avx2w<4>(x + r0 * K, K, q_pairs, pd, e, r0, n0, nv);
            else if (mr == 5) tile_avx2w<5>(x + r0 * K, K, q_pairs, pd, e, r0, n0, nv);
            else tile_avx2w<6>(x + r0 * K, K, q_pairs, pd, e, r0, n0, nv);
            r0 += mr;
            continue;
          }
#endif
          tile(mr, isa, panel_int8, x + r0 * K, K, panel, e, r0, n0, nv);
          r0 += mr;
        }
        nb += 1;
      }
    }
  };
  SharePool::get().run(chunks, [&](int64_t c) { panels(c * grain, std::min(NB, c * grain + grain)); });
}

// ---- checks shared by the CPU and CUDA entry points ----------------------------------------
void check_vec(const c10::optional<at::Tensor>& t, const char* name, int64_t n, at::ScalarType dt,
               const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK_TYPE(t->scalar_type() == dt, "packed_linear: ", name, " must be ", dt, ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), "packed_linear: ", name, " is on ", t->device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, "packed_linear: ", name, " must have shape (", n, ",), got ",
                    t->sizes());
}

std::vector<int64_t> check_common(const at::Tensor& x, const at::Tensor& w, int64_t n,
                                  const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(x.defined() && w.defined(), "packed_linear: x and w must be defined");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0, "packed_linear: x is empty (shape ", x.sizes(), ")");
  TORCH_CHECK_VALUE(n > 0, "packed_linear: n (output features) must be positive, got ", n);
  TORCH_CHECK_VALUE(w.device() == x.device(), "packed_linear: w is on ", w.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(w.is_contiguous(), "packed_linear: w must be contiguous (packed once at load)");
  check_vec(scale, "scale", n, at::kFloat, x);
  check_vec(bias, "bias", n, x.scalar_type(), x);
  std::vector<int64_t> out(x.sizes().begin(), x.sizes().end());
  out.back() = n;
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "packed_linear: residual has dtype ",
                     residual->scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(residual->device() == x.device(), "packed_linear: residual is on ", residual->device(),
                      " but x is on ", x.device());
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(out), "packed_linear: residual must have shape ",
                      at::IntArrayRef(out), ", got ", residual->sizes());
  }
  return out;
}

at::Tensor packed_linear_cpu(const at::Tensor& x_in, const at::Tensor& w, int64_t n,
                             const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& residual, c10::string_view activation) {
  const int act = parse_act(activation);
  TORCH_CHECK_TYPE(x_in.defined() && x_in.scalar_type() == at::kFloat,
                   "packed_linear (CPU): x must be float32 (the CPU kernels are fp32), got ",
                   x_in.defined() ? c10::toString(x_in.scalar_type()) : "undefined");
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "packed_linear (CPU): x must be a CPU tensor, got ", x_in.device());
  const auto out = check_common(x_in, w, n, scale, bias, residual);
  const int64_t K = x_in.size(-1);
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar,
                   "packed_linear (CPU): w must be float32 or int8 panels, got ", w.scalar_type());
  const bool int8 = w.scalar_type() == at::kChar;
  const bool pairs8 = int8 && w.dim() == 3 && w.size(2) == kPairRow;
  TORCH_CHECK_VALUE(pairs8 || (w.dim() == 3 && w.size(0) == (n + kNR - 1) / kNR && w.size(1) == K && w.size(2) == kNR),
                    "packed_linear (CPU): w must be packed panels of shape (ceil(n/16), K, 16) = (", (n + kNR - 1) / kNR,
                    ", ", K, ", 16) for n = ", n, " and K = x.shape[-1]",
                    int8 ? " (or int8 pair panels (ceil(n/16), ceil(K/2), 32))" : "", ", got ", w.sizes());
  TORCH_CHECK_VALUE(!pairs8 || (w.size(0) == (n + kNR - 1) / kNR && w.size(1) == (K + 1) / 2),
                    "packed_linear (CPU): int8 pair panels must have shape (ceil(n/16), ceil(K/2), 32) = (",
                    (n + kNR - 1) / kNR, ", ", (K + 1) / 2, ", 32) for n = ", n, " and K = x.shape[-1], got ", w.sizes());
  TORCH_CHECK_VALUE(!int8 || scale.has_value(), "packed_linear: int8 w needs its per-channel scale");
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty(out, x.options());
  at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  at::Tensor bi = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const Epilogue e{scale.has_value() ? sc.const_data_ptr<float>() : nullptr,
                   bias.has_value() ? bi.const_data_ptr<float>() : nullptr,
                   residual.has_value() ? r.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), n, act};
  packed_gemm(x.const_data_ptr<float>(), M, K, w.const_data_ptr(), pairs8 ? kWI8Pairs : (int8 ? kWI8 : kWF32), n, e);
  return y;
}

#ifdef FASTLM_WITH_CUDA
cuda::DType cuda_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_CHECK_TYPE(false, "packed_linear (CUDA): x must be float32, float16 or bfloat16, got ", dt);
  }
}

// CUDA: int8 (N, K) row-major weights. M <= 16 rows run the int8 GEMV; more rows (prefill)
// dequantise into a temporary and run cuBLAS through ATen.
at::Tensor packed_linear_cuda(const at::Tensor& x_in, const at::Tensor& w, int64_t n,
                              const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& residual, c10::string_view activation) {
  const int act = parse_act(activation);
  TORCH_CHECK_VALUE(x_in.defined() && x_in.is_cuda(), "packed_linear (CUDA): x must be a CUDA tensor");
  const cuda::DType dt = cuda_dtype(x_in.scalar_type());
  const auto out = check_common(x_in, w, n, scale, bias, residual);
  const int64_t K = x_in.size(-1);
  TORCH_CHECK_TYPE(w.scalar_type() == at::kChar, "packed_linear (CUDA): w must be int8, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == n && w.size(1) == K,
                    "packed_linear (CUDA): w must be int8 of shape (n, K) = (", n, ", ", K, "), got ", w.sizes());
  TORCH_CHECK_VALUE(scale.has_value(), "packed_linear: int8 w needs its per-channel scale");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  const at::Tensor sc = scale->contiguous();
  if (M > cuda::kGemvInt8MaxRows) {
    at::Tensor wd = (w.to(at::kFloat) * sc.unsqueeze(1)).to(x.scalar_type());  // (n, K)
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x, wd.t()) : at::mm(x, wd.t());
    if (act != kNone) y = at::gelu(y, act == kGeluTanh ? "tanh" : "none");
    if (residual.has_value()) y.add_(residual->reshape({-1, n}));
    return y.view(out);
  }
  at::Tensor y = at::empty(out, x.options());
  const at::Tensor bi = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const cudaError_t err = cuda::gemv_int8(
      x.const_data_ptr(), w.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(),
      bias.has_value() ? bi.const_data_ptr() : nullptr, residual.has_value() ? r.const_data_ptr() : nullptr,
      y.mutable_data_ptr(), M, n, K, act, dt, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "packed_linear: int8 GEMV launch failed: ", cudaGetErrorString(err));
  return y;
}
#endif

}  // namespace

// A copy of `src` (CPU, any layout; the copy is contiguous) in 2 MiB-aligned memory advised
// MADV_HUGEPAGE before its first touch, so Linux backs it with transparent huge pages (in the
// "madvise" THP mode too). Packed decode weights are streamed once per token: with 4 KiB pages
// the hardware prefetchers stop at every page boundary and each page costs a TLB walk; measured
// on this project's 2-core Zen 5, GPT-2 small decode ran ~8% faster per token with huge pages.
// Where madvise or THP is unavailable the copy is still correct (plain pages).
at::Tensor hugepage_copy(const at::Tensor& src) {
  TORCH_CHECK_VALUE(src.defined() && src.device().is_cpu(), "hugepage_copy: src must be a CPU tensor");
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t nbytes = src.numel() * src.element_size();
  const size_t rounded = std::max(kHuge, (nbytes + kHuge - 1) / kHuge * kHuge);
  void* p = nullptr;
  TORCH_CHECK(posix_memalign(&p, kHuge, rounded) == 0 && p != nullptr, "hugepage_copy: out of memory (",
              rounded, " bytes)");
#ifdef MADV_HUGEPAGE
  (void)madvise(p, rounded, MADV_HUGEPAGE);  // advice only: EINVAL where THP is off changes nothing
#endif
  at::Tensor out = at::from_blob(p, src.sizes(), [](void* q) { std::free(q); }, src.options());
  out.copy_(src);
  return out;
}

namespace cpu {
bool avx512_allowed() { return current_isa() == kAvx512; }
bool avx512vnni_allowed() { return avx512_allowed() && cpu_has_avx512vnni(); }
int isa_level() { return current_isa(); }

void packed_gemm(const float* x, int64_t M, int64_t K, const void* w, int wkind, int64_t N, const float* scale,
                 const float* bias, const float* residual, float* y, int act) {
  fastlm::packed_gemm(x, M, K, w, wkind, N, Epilogue{scale, bias, residual, y, N, act}, kI16Rows);
}
}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("packed_linear(Tensor x, Tensor w, int n, Tensor? scale=None, Tensor? bias=None, Tensor? residual=None, "
        "str activation='none') -> Tensor");
  m.def("cpu_isa(str isa='') -> str", &cpu_isa);
  m.def("int8_gemv_mode(int level=-1) -> int", &int8_gemv_mode);
  m.def("gemv_prefetch(int bytes=-1) -> int", &gemv_prefetch);
  m.def("int8_gemv_prefetch(int bytes=-1) -> int", &int8_gemv_prefetch);
  m.def("int8_tile_rows(int rows=-1) -> int", &int8_tile_rows);
  m.def("hugepage_copy(Tensor src) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("packed_linear", &packed_linear_cpu);
  m.impl("hugepage_copy", &hugepage_copy);
}

#ifdef FASTLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastlm, CUDA, m) { m.impl("packed_linear", &packed_linear_cuda); }
#endif

}  // namespace fastlm
