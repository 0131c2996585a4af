// Exact int8 x int8 -> int32 GEMM for x86 CPUs without an int8 dot-product instruction (AVX2 + FMA,
// no AVX-512 VNNI / AVX-VNNI / AMX-INT8: e.g. AMD Zen 3, Intel Haswell..Comet Lake), the GEMM of
// quantize="int8_dynamic" there (fastlm.linear.int_mm picks it, see fastlm/cpu_features.py).
//
//   int8_gemm_avx2(a int8 (M, K), b int8 (K, N)) -> int32 (M, N), c[m, n] = sum_k a[m, k] * b[k, n]
//     b is read in the layout Int8DynamicLinear keeps (qweight.t(): (K, N) with unit column stride,
//     any row stride): no second copy of the weight. a needs a unit column stride.
//
// Why this route: torch._int_mm without VNNI is either oneDNN's AVX2 int8 GEMM, whose u8 x s8
// vpmaddubsw saturates its int16 pair sums (255 * 127 * 2 > 32767: wrong by up to ~1e5, see
// cpu_features.int8_gemm_exact), or a scalar loop (~0.8 GOP/s measured on a Zen 3). Here both
// operands are sign-extended to int16 (vpmovsxbw) and multiplied with vpmaddwd, which sums adjacent
// pairs of int16 products into int32 lanes: |a * b + a' * b'| <= 2 * 128 * 128 = 32768 < 2^31, so
// every product and pair sum is exact, and the int32 accumulation is exact while
// |sum| < 2^31 (K < 2^31 / 128^2 = 131072), the contract of torch._int_mm.
//
// Blocking: a is widened once to int16 rows of ceil(K / 2) pairs (zero-padded); b is packed per
// panel of 16 output channels into int16 (k, k + 1) pairs, (ceil(K / 2), 16, 2), in a per-thread
// buffer (L1/L2 resident), and reused for every row tile of 4 rows x 16 channels (8 int32
// accumulators; per pair of k: 2 panel loads, 4 broadcasts, 8 vpmaddwd, 8 vpaddd). Panels are
// shared among the threads (at::parallel_for). A portable path (plain C++ int32 sums) runs where the
// CPU has no AVX2 or FASTLM_CPU_ISA=portable caps it (cpu::isa_level() == 0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_Q_X86 1
#include <immintrin.h>
#define FASTLM_Q_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace fastlm {
namespace {

constexpr int64_t kNR = 16;  // output channels per panel: two ymm of 8 int32
constexpr int kMR = 4;       // rows per register tile: 8 accumulators + 2 panel vectors + broadcast + product

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
// (ldc apart), channels 0 .. nv.
template <int MR>
FASTLM_Q_AVX2 void tile_avx2(const int16_t* a16, int64_t lda32, const int16_t* panel, int64_t K2, int32_t* c,
                             int64_t ldc, int64_t nv) {
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a16);
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < K2; ++p) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 32));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 32 + 16));
    for (int r = 0; r < MR; ++r) {
      const __m256i xb = _mm256_set1_epi32(a32[r * lda32 + p]);  // (a[k], a[k + 1]) in every lane
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xb, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, w1));
    }
  }
  for (int r = 0; r < MR; ++r) {
    int32_t* cr = c + r * ldc;
    if (nv == kNR) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cr), acc[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cr + 8), acc[r][1]);
    } else {
      alignas(32) int32_t t[kNR];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc[r][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8), acc[r][1]);
      std::memcpy(cr, t, nv * sizeof(int32_t));
    }
  }
}

FASTLM_Q_AVX2 void panel_rows_avx2(const int16_t* a16, int64_t M, int64_t K2, const int16_t* panel, int32_t* c,
                                   int64_t N, int64_t nv) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) tile_avx2<kMR>(a16 + m * K2 * 2, K2, panel, K2, c + m * N, N, nv);
  switch (M - m) {
    case 3: tile_avx2<3>(a16 + m * K2 * 2, K2, panel, K2, c + m * N, N, nv); break;
    case 2: tile_avx2<2>(a16 + m * K2 * 2, K2, panel, K2, c + m * N, N, nv); break;
    case 1: tile_avx2<1>(a16 + m * K2 * 2, K2, panel, K2, c + m * N, N, nv); break;
    default: break;
  }
}
#endif

void panel_rows_portable(const int16_t* a16, int64_t M, int64_t K2, const int16_t* panel, int32_t* c, int64_t N,
                         int64_t nv) {
  for (int64_t m = 0; m < M; ++m) {
    int32_t acc[kNR] = {0};
    const int16_t* ar = a16 + m * K2 * 2;
    for (int64_t p = 0; p < K2; ++p)
      for (int64_t j = 0; j < kNR; ++j)
        acc[j] += int32_t{ar[2 * p]} * panel[(p * kNR + j) * 2] + int32_t{ar[2 * p + 1]} * panel[(p * kNR + j) * 2 + 1];
    std::memcpy(c + m * N, acc, nv * sizeof(int32_t));
  }
}

}  // namespace

// The kernel on raw pointers: a (M, K) rows lda apart, b (K, N) rows ldb apart (unit column
// stride both), c (M, N) contiguous.
void int8_gemm_avx2_raw(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t M, int64_t K,
                        int64_t N) {
  const int64_t K2 = (K + 1) / 2;
  std::vector<int16_t> a16(static_cast<size_t>(M * K2 * 2));
  widen_rows(a, lda, M, K, K2, a16.data());
  const int64_t NB = (N + kNR - 1) / kNR;
  bool avx2 = false;
#ifdef FASTLM_Q_X86
  avx2 = cpu::isa_level() >= 1;
#endif
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int16_t> panel(static_cast<size_t>(K2 * kNR * 2));
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * kNR, nv = std::min(kNR, N - n0);
#ifdef FASTLM_Q_X86
      if (avx2) {
        pack_panel_avx2(b, ldb, K, K2, n0, nv, panel.data());
        panel_rows_avx2(a16.data(), M, K2, panel.data(), c + n0, N, nv);
        continue;
      }
#endif
      pack_panel_portable(b, ldb, K, K2, n0, nv, panel.data());
      panel_rows_portable(a16.data(), M, K2, panel.data(), c + n0, N, nv);
    }
  });
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

TORCH_LIBRARY_FRAGMENT(fastlm, m) { m.def("int8_gemm_avx2(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("int8_gemm_avx2", &int8_gemm_avx2); }

}  // namespace fastlm
