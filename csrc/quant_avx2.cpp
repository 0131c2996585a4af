// Exact int8 x int8 -> int32 GEMM for x86 CPUs without an int8 dot-product instruction (AVX2 + FMA,
// no AVX-512 VNNI / AVX-VNNI / AMX-INT8: e.g. AMD Zen 3, Intel Haswell..Comet Lake), the GEMM of
// quantize="int8_dynamic" there (fastlm.linear.int_mm picks it, see fastlm/cpu_features.py).
//
//   int8_gemm_avx2(a int8 (M, K), b int8 (K, N)) -> int32 (M, N), c[m, n] = sum_k a[m, k] * b[k, n]
//     b (K, N) with unit column stride, any row stride (Int8DynamicLinear's qweight.t() where its
//     GEMM is torch._int_mm), packed into int16 panels per call. a needs a unit column stride.
//   int8_gemm_avx2_panels(a int8 (M, K), panels int8 (ceil(N / 16), ceil(K / 2), 32), n = N) -> the same
//     product on b packed once into int8 pair panels (fastlm.linear.pack_int8_panels of b.t(), the
//     layout of Int8Linear's weight): Int8DynamicLinear's one weight layout on CPUs whose int8 GEMM
//     is this kernel. The panels are widened in the row tiles (vpmovsxbw from memory) below
//     kWidenPanelRows rows, else into an int16 copy once per call (a vpmovsxbw stream).
//
// Why this route: torch._int_mm without VNNI is either oneDNN's AVX2 int8 GEMM, whose u8 x s8
// vpmaddubsw saturates its int16 pair sums (255 * 127 * 2 > 32767: wrong by up to ~1e5, see
// cpu_features.int8_gemm_exact), or a scalar loop (~0.8 GOP/s measured on a Zen 3). Here both
// operands are sign-extended to int16 (vpmovsxbw) and multiplied with vpmaddwd, which sums adjacent
// pairs of int16 products into int32 lanes: |a * b + a' * b'| <= 2 * 128 * 128 = 32768 < 2^31, so
// every product and pair sum is exact, and the int32 accumulation is exact while
// |sum| < 2^31 (K < 2^31 / 128^2 = 131072), the contract of torch._int_mm.
//
// Blocking: a is widened once to int16 rows of ceil(K / 2) pairs (zero-padded); b's panels of 16
// output channels in int16 (k, k + 1) pairs, (ceil(K / 2), 16, 2) (packed or widened per call, or
// int8 read in place), and each work item (16 panels x a block of rows whose int16 copy is ~256 KB,
// L2-resident) runs row tiles of 6 rows x 16 channels over them (12 int32 accumulators; per pair of
// k: 2 panel loads, 6 broadcasts, 12 vpmaddwd, 12 vpaddd). Work items go to the pool of the decode
// kernels (cpu_pool.h). A portable path (plain C++ int32 sums) runs where the CPU has no AVX2 or
// FASTLM_CPU_ISA=portable caps it (cpu::isa_level() == 0).
//
// Where the time goes (Zen 4 at 3.65 GHz capped at AVX2, one thread, thread CPU time, 2026-12-07):
// the tiles are bound by the vector ALU work, one vpmaddwd (2 per cycle) + one vpaddd per 16
// multiply-adds: an L1-resident tile ran ~190 G int8 ops/s whatever its shape (6 x 16, 4 x 24,
// 3 x 32, 2 x 48: the broadcasts and loads are not the limit), the whole GEMM at M 512-1024 ~165-175
// (int8_gemm_avx2: the per-call pack 1.5-3% of it there, 12% at M = 128, 27-46% at M 12-36;
// widen_rows 0.6-2.6%). Tried and not taken (standalone, same process, against this kernel):
// 4 x 24 tiles (1.02-1.07x on pre-packed int16 panels, 0.95-1.03x in the op with the pack per
// call), K blocking so a panel slice stays in L1 (0.89-0.95x), int8 panels widened per work item
// into an L1 buffer (0.96-1.03x), int8 panels widened in the tiles at M >= 512 (0.96-1.0x: 2 more
// ALU ops per 24). The sign trick (vpsignb + vpmaddubsw on |a| and sign(a) * b, then vpmaddwd with
// ones and vpaddd; exact for b in [-127, 127]) needs 4 ALU ops per 32 multiply-adds, 2 of them
// multiplies, as vpmovsxbw + vpmaddwd + vpaddd do: no fewer. oneDNN's u8 x s8 AVX2 kernel (inexact)
// skips the sign op: 3 per 32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_pool.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_Q_X86 1
#include <immintrin.h>
#define FASTLM_Q_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace fastlm {
namespace {

constexpr int64_t kNR = 16;  // output channels per panel: two ymm of 8 int32
#ifndef FASTLM_Q_MR
#define FASTLM_Q_MR 6
#endif
constexpr int kMR = FASTLM_Q_MR;  // rows per register tile (<= 6): 12 accumulators + 2 panel vectors + broadcast + product
constexpr int64_t kChunkPanels = 16;            // panels per work item (256 channels)
constexpr int64_t kABlockBytes = int64_t{256} << 10;  // x's int16 rows per work item: about 256 KB

// a (M, K) int8 -> a16 (M, K2 * 2) int16, zero past K.
void widen_rows(const int8_t* a, int64_t lda, int64_t M, int64_t K, int64_t K2, int16_t* a16) {
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      const int8_t* src = a + m * lda;
      int16_t* dst = a16 + m * K2 * 2;
      for (int64_t k = 0; k < K; ++k) dst[k] = src[k];  // gcc vectorises this (vpmovsxbw)
      if (K2 * 2 > K) dst[K] = 0;
    }
  });
}

// b columns n0 .. n0 + nv (nv <= 16) -> out (K2, 16, 2) int16: out[(p * 16 + j) * 2 + t] = b[2p + t, n0 + j],
// zero past K and past nv.
void pack_panel_portable(const int8_t* b, int64_t ldb, int64_t K, int64_t K2, int64_t n0, int64_t nv, int16_t* out) {
  for (int64_t p = 0; p < K2; ++p)
    for (int64_t j = 0; j < kNR; ++j)
      for (int64_t t = 0; t < 2; ++t) {
        const int64_t k = 2 * p + t;
        out[(p * kNR + j) * 2 + t] = (k < K && j < nv) ? b[k * ldb + n0 + j] : 0;
      }
}

#ifdef FASTLM_Q_X86
FASTLM_Q_AVX2 void pack_panel_avx2(const int8_t* b, int64_t ldb, int64_t K, int64_t K2, int64_t n0, int64_t nv,
                                   int16_t* out) {
  if (nv < kNR) return pack_panel_portable(b, ldb, K, K2, n0, nv, out);
  const int64_t full = K / 2;  // pairs with both rows present
  for (int64_t p = 0; p < full; ++p) {
    const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (2 * p) * ldb + n0));
    const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (2 * p + 1) * ldb + n0));
    const __m128i lo = _mm_unpacklo_epi8(r0, r1);  // channels 0..7: (k, k + 1) byte pairs
    const __m128i hi = _mm_unpackhi_epi8(r0, r1);  // channels 8..15
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * 32), _mm256_cvtepi8_epi16(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * 32 + 16), _mm256_cvtepi8_epi16(hi));
  }
  if (full < K2) {  // odd K: the last pair's second row is zero
    const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (2 * full) * ldb + n0));
    const __m128i z = _mm_setzero_si128();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + full * 32), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, z)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + full * 32 + 16),
                        _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, z)));
  }
}

// MR rows of a16 (K2 int32-sized pairs each, rows lda32 pairs apart) x one packed panel -> c rows
// (ldc apart), channels 0 .. nv. Accumulators are named variables: as an array gcc copied all of
// them with a vmovdqa per accumulator on every k (seen in the disassembly).
#define FASTLM_Q_ROW(R, A0, A1)                                                    \
  if constexpr (MR > R) {                                                          \
    const __m256i xb = _mm256_set1_epi32(a32[R * lda32 + p]);                      \
    A0 = _mm256_add_epi32(A0, _mm256_madd_epi16(xb, w0));                          \
    A1 = _mm256_add_epi32(A1, _mm256_madd_epi16(xb, w1));                          \
  }
#define FASTLM_Q_STORE(R, A0, A1)                                                  \
  if constexpr (MR > R) {                                                          \
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + R * kNR), A0);               \
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + R * kNR + 8), A1);           \
  }

// panel: int16 pairs (K2, 16, 2), or (W = int8_t) the int8 pair panels of pack_int8_panels, widened
// in registers (vpmovsxbw from memory: 2 more ALU ops per 24).
template <int MR, typename W>
FASTLM_Q_AVX2 void tile_avx2(const int16_t* a16, int64_t lda32, const W* panel, int64_t K2, int32_t* c,
                             int64_t ldc, int64_t nv) {
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a16);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
          c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t p = 0; p < K2; ++p) {
    __m256i w0, w1;
    if constexpr (sizeof(W) == 1) {
      w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + p * 32)));
      w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + p * 32 + 16)));
    } else {
      w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 32));
      w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 32 + 16));
    }
    FASTLM_Q_ROW(0, c00, c01)
    FASTLM_Q_ROW(1, c10, c11)
    FASTLM_Q_ROW(2, c20, c21)
    FASTLM_Q_ROW(3, c30, c31)
    FASTLM_Q_ROW(4, c40, c41)
    FASTLM_Q_ROW(5, c50, c51)
  }
  alignas(32) int32_t t[MR * kNR];
  FASTLM_Q_STORE(0, c00, c01)
  FASTLM_Q_STORE(1, c10, c11)
  FASTLM_Q_STORE(2, c20, c21)
  FASTLM_Q_STORE(3, c30, c31)
  FASTLM_Q_STORE(4, c40, c41)
  FASTLM_Q_STORE(5, c50, c51)
  for (int r = 0; r < MR; ++r) std::memcpy(c + r * ldc, t + r * kNR, nv * sizeof(int32_t));
}
#undef FASTLM_Q_ROW
#undef FASTLM_Q_STORE

template <typename W>
FASTLM_Q_AVX2 void panel_rows_avx2(const int16_t* a16, int64_t M, int64_t K2, const W* panel, int32_t* c, int64_t N,
                                   int64_t nv) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) tile_avx2<kMR, W>(a16 + m * K2 * 2, K2, panel, K2, c + m * N, N, nv);
  const int64_t rest = M - m;
  const int16_t* a = a16 + m * K2 * 2;
  int32_t* cm = c + m * N;
  if (rest == 5) tile_avx2<5, W>(a, K2, panel, K2, cm, N, nv);
  if (rest == 4) tile_avx2<4, W>(a, K2, panel, K2, cm, N, nv);
  if (rest == 3) tile_avx2<3, W>(a, K2, panel, K2, cm, N, nv);
  if (rest == 2) tile_avx2<2, W>(a, K2, panel, K2, cm, N, nv);
  if (rest == 1) tile_avx2<1, W>(a, K2, panel, K2, cm, N, nv);
}

// int8 pair panels -> the same panels in int16 (n int8 elements, a multiple of 16)
FASTLM_Q_AVX2 void widen_panels_avx2(const int8_t* src, int64_t n, int16_t* out) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}
#endif

template <typename W>
void panel_rows_portable(const int16_t* a16, int64_t M, int64_t K2, const W* panel, int32_t* c, int64_t N,
                         int64_t nv) {
  for (int64_t m = 0; m < M; ++m) {
    int32_t acc[kNR] = {0};
    const int16_t* ar = a16 + m * K2 * 2;
    for (int64_t p = 0; p < K2; ++p)
      for (int64_t j = 0; j < kNR; ++j)
        acc[j] += int32_t{ar[2 * p]} * int32_t{panel[(p * kNR + j) * 2]} +
                  int32_t{ar[2 * p + 1]} * int32_t{panel[(p * kNR + j) * 2 + 1]};
    std::memcpy(c + m * N, acc, nv * sizeof(int32_t));
  }
}

// Rows of M at which int8_gemm_avx2_panels widens the int8 panels to an int16 temporary (a
// vpmovsxbw stream, once per call) instead of in the tiles (2 more ALU ops per 24 on every row tile).
constexpr int64_t kWidenPanelRows = 256;

bool use_avx2() {
#ifdef FASTLM_Q_X86
  return cpu::isa_level() >= 1;
#else
  return false;
#endif
}

// a (M, K) int8, rows lda apart -> a16 (M, ceil(K / 2) pairs) int16 in a new buffer
std::vector<int16_t> widen_a(const int8_t* a, int64_t lda, int64_t M, int64_t K) {
  const int64_t K2 = (K + 1) / 2;
  std::vector<int16_t> a16(static_cast<size_t>(M * K2 * 2));
  widen_rows(a, lda, M, K, K2, a16.data());
  return a16;
}

// c (M, N) = a16 x the NB panels (K2, 16, 2) of W (int16 pairs or int8 pair panels), panels K2 * 32 apart.
// Work items: kChunkPanels panels x mc rows; x's int16 block (mc rows, ~kABlockBytes) stays in L2
// while the chunk's panels stream past it (one panel per pass over all of x re-read x from L3 for
// every 16 channels: 288 MB per BERT FFN GEMM).
template <typename W>
void run_panels(const int16_t* a16, int64_t M, int64_t K2, const W* panels, int64_t N, int32_t* c) {
  const int64_t NB = (N + kNR - 1) / kNR;
  const bool avx2 = use_avx2();
  const int64_t mc = std::min<int64_t>(std::max<int64_t>(kMR * 4, (kABlockBytes / (K2 * 4)) / kMR * kMR), 512);
  const int64_t m_blocks = (M + mc - 1) / mc, n_chunks = (NB + kChunkPanels - 1) / kChunkPanels;
  SharePool::get().run(m_blocks * n_chunks, [&](int64_t it) {
    const int64_t nc = it / m_blocks, m0 = (it % m_blocks) * mc, rows = std::min(mc, M - m0);
    const int64_t b1 = std::min(NB, (nc + 1) * kChunkPanels);
    for (int64_t nb = nc * kChunkPanels; nb < b1; ++nb) {
      const int64_t n0 = nb * kNR, nv = std::min(kNR, N - n0);
      const W* panel = panels + nb * K2 * kNR * 2;
      const int16_t* ab = a16 + m0 * K2 * 2;
      int32_t* cb = c + m0 * N + n0;
#ifdef FASTLM_Q_X86
      if (avx2) {
        panel_rows_avx2<W>(ab, rows, K2, panel, cb, N, nv);
        continue;
      }
#endif
      panel_rows_portable<W>(ab, rows, K2, panel, cb, N, nv);
    }
  });
}

}  // namespace

// The kernel on raw pointers: a (M, K) rows lda apart, b (K, N) rows ldb apart (unit column
// stride both), c (M, N) contiguous.
void int8_gemm_avx2_raw(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t M, int64_t K,
                        int64_t N) {
  const int64_t K2 = (K + 1) / 2;
  const std::vector<int16_t> a16 = widen_a(a, lda, M, K);
  const int64_t NB = (N + kNR - 1) / kNR;
  const bool avx2 = use_avx2();
  // every panel packed once per call into one temporary (the weight itself stays int8 (K, N))
  std::vector<int16_t> packed(static_cast<size_t>(NB * K2 * kNR * 2));
  at::parallel_for(0, NB, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * kNR, nv = std::min(kNR, N - n0);
      int16_t* out = packed.data() + nb * K2 * kNR * 2;
#ifdef FASTLM_Q_X86
      if (avx2) {
        pack_panel_avx2(b, ldb, K, K2, n0, nv, out);
        continue;
      }
#endif
      pack_panel_portable(b, ldb, K, K2, n0, nv, out);
    }
  });
  run_panels<int16_t>(a16.data(), M, K2, packed.data(), N, c);
}

// The same on int8 pair panels (ceil(N / 16), ceil(K / 2), 32) (fastlm.linear.pack_int8_panels).
void int8_gemm_avx2_panels_raw(const int8_t* a, int64_t lda, const int8_t* panels, int32_t* c, int64_t M, int64_t K,
                               int64_t N) {
  const int64_t K2 = (K + 1) / 2, NB = (N + kNR - 1) / kNR;
  const std::vector<int16_t> a16 = widen_a(a, lda, M, K);
  if (M < kWidenPanelRows) return run_panels<int8_t>(a16.data(), M, K2, panels, N, c);
  std::vector<int16_t> wide(static_cast<size_t>(NB * K2 * kNR * 2));
  const bool avx2 = use_avx2();
  at::parallel_for(0, NB, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t b0, int64_t b1) {
    const int8_t* src = panels + b0 * K2 * kNR * 2;
    int16_t* out = wide.data() + b0 * K2 * kNR * 2;
    const int64_t n = (b1 - b0) * K2 * kNR * 2;
#ifdef FASTLM_Q_X86
    if (avx2) return widen_panels_avx2(src, n, out);
#endif
    for (int64_t i = 0; i < n; ++i) out[i] = src[i];
  });
  run_panels<int16_t>(a16.data(), M, K2, wide.data(), N, c);
}

at::Tensor int8_gemm_avx2(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "int8_gemm_avx2";
  TORCH_CHECK_TYPE(a_in.scalar_type() == at::kChar && b_in.scalar_type() == at::kChar, op,
                   ": a and b must be int8, got ", a_in.scalar_type(), " and ", b_in.scalar_type());
  TORCH_CHECK_VALUE(a_in.device().is_cpu() && b_in.device().is_cpu(), op, ": a and b must be CPU tensors, got ",
                    a_in.device(), " and ", b_in.device());
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2, op, ": a (M, K) and b (K, N) must be 2-D, got shapes ",
                    a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK_VALUE(a_in.size(1) == b_in.size(0), op, ": a is (M, K) = ", a_in.sizes(), " but b is ", b_in.sizes(),
                    " (b must be (K, N))");
  TORCH_CHECK_VALUE(a_in.size(1) < 131072, op, ": K must be < 131072 for exact int32 sums, got ", a_in.size(1));
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(1);
  at::Tensor c = at::empty({M, N}, a_in.options().dtype(at::kInt));
  if (M == 0 || N == 0) return c;
  if (K == 0) return c.zero_();
  const at::Tensor a = a_in.stride(1) == 1 ? a_in : a_in.contiguous();
  const at::Tensor b = b_in.stride(1) == 1 ? b_in : b_in.contiguous();
  int8_gemm_avx2_raw(a.const_data_ptr<int8_t>(), std::max<int64_t>(a.stride(0), 1), b.const_data_ptr<int8_t>(),
                     std::max<int64_t>(b.stride(0), 1), c.mutable_data_ptr<int32_t>(), M, K, N);
  return c;
}

at::Tensor int8_gemm_avx2_panels(const at::Tensor& a_in, const at::Tensor& panels, int64_t n) {
  const char* op = "int8_gemm_avx2_panels";
  TORCH_CHECK_TYPE(a_in.scalar_type() == at::kChar && panels.scalar_type() == at::kChar, op,
                   ": a and panels must be int8, got ", a_in.scalar_type(), " and ", panels.scalar_type());
  TORCH_CHECK_VALUE(a_in.device().is_cpu() && panels.device().is_cpu(), op, ": a and panels must be CPU tensors, got ",
                    a_in.device(), " and ", panels.device());
  TORCH_CHECK_VALUE(a_in.dim() == 2, op, ": a must be 2-D (M, K), got shape ", a_in.sizes());
  const int64_t M = a_in.size(0), K = a_in.size(1);
  TORCH_CHECK_VALUE(K < 131072, op, ": K must be < 131072 for exact int32 sums, got ", K);
  TORCH_CHECK_VALUE(n >= 0, op, ": n must be >= 0, got ", n);
  const int64_t NB = (n + kNR - 1) / kNR, K2 = (K + 1) / 2;
  TORCH_CHECK_VALUE(panels.dim() == 3 && panels.size(0) == NB && panels.size(1) == K2 && panels.size(2) == 2 * kNR &&
                        panels.is_contiguous(),
                    op, ": panels must be contiguous int8 pair panels of shape (ceil(n / 16), ceil(K / 2), 32) = (",
                    NB, ", ", K2, ", 32) for a of shape ", a_in.sizes(), " and n = ", n, ", got ", panels.sizes(),
                    panels.is_contiguous() ? "" : " (not contiguous)");
  at::Tensor c = at::empty({M, n}, a_in.options().dtype(at::kInt));
  if (M == 0 || n == 0) return c;
  if (K == 0) return c.zero_();
  const at::Tensor a = a_in.stride(1) == 1 ? a_in : a_in.contiguous();
  int8_gemm_avx2_panels_raw(a.const_data_ptr<int8_t>(), std::max<int64_t>(a.stride(0), 1),
                            panels.const_data_ptr<int8_t>(), c.mutable_data_ptr<int32_t>(), M, K, n);
  return c;
}

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("int8_gemm_avx2(Tensor a, Tensor b) -> Tensor");
  m.def("int8_gemm_avx2_panels(Tensor a, Tensor panels, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("int8_gemm_avx2", &int8_gemm_avx2);
  m.impl("int8_gemm_avx2_panels", &int8_gemm_avx2_panels);
}

}  // namespace fastlm
