// Exact int8 x int8 -> int32 GEMM on AVX-512 VNNI (vpdpbusd), the GEMM of quantize="int8_dynamic" on
// CPUs that have it (fastlm.cpu_features.int8_gemm_path() == "fastlm_vnni"), made block by block so
// that each block of rows meets its epilogue (quant_cpu.cpp: scales, bias, GELU, residual, LayerNorm,
// the next layer's per-token quantization) while it is still in L2, instead of a whole (M, N) int32
// matrix written to memory and read back (torch._int_mm + a separate epilogue pass).
//
//   int8_gemm_vnni(a int8 (M, K), quads uint8 (ceil(N / 16), ceil(K / 4), 64), n = N) -> int32 (M, N)
//     c[m, j] = sum_k a[m, k] * w[j, k] for w packed by fastlm.linear.pack_int8_quads: element
//     [p, kk, 4i + t] = w[16p + i, 4kk + t] + 128 as uint8 (128, i.e. a zero weight, past N and K).
//   cpu::int8_gemm_vnni_rows(...): the same product handed to a callback block by block (below); the
//     fused int8_linear_vnni* ops of quant_cpu.cpp run their row epilogues in it.
//
// Exactness: vpdpbusd multiplies unsigned bytes by signed bytes, four per int32 lane, and adds the four
// products to the lane without saturation. The weight, stored as u = w + 128 in [1, 255], is the
// unsigned operand and the activation a in [-128, 127] the signed one (broadcast per row):
// sum_k u[k] a[k] = sum_k w[k] a[k] + 128 * sum_k a[k], so c = that - 128 * rowsum(a), with the row
// sums made once per block (vpdpbusd against ones). Every partial sum is an integer below
// 255 * 128 * K in magnitude: exact in int32 while K < 2^31 / 32640 = 65793 (checked), torch._int_mm's
// own bound being |c| < 2^31.
//
// Blocking (Zen 4, one core: vpdpbusd zmm issues once per cycle = 64 multiply-adds, ~230 G/s at
// 3.6 GHz, measured with a register-only loop): register tiles of 8 rows x 32 channels (two quad
// panels: 16 zmm accumulators, per 4 k: 2 panel loads, 8 broadcasts from the rows of a, 16
// vpdpbusd). The accumulators are named variables, not an array: gcc 12 kept a `__m512i acc[8][2]`
// in memory (a load and a store per vpdpbusd: 70 G/s). Rows go in blocks of kBlockRows or fewer
// (the block's int32 output, N wide, sized to ~384 KB of the 1 MB L2), panel pairs outermost inside
// a block so each pair (2 x K bytes x 16) is read from L2 once per 8 rows. A standalone prototype of
// this loop nest ran 192-209 G multiply-adds/s at M 512 (K 768 / 3072, N 768-3072) against
// torch._int_mm's 188-206 in the same minute; the gain of the fused ops is in the epilogue (see
// quant_cpu.cpp).
//
// Threads: blocks of rows go to at::parallel_for; when there are fewer blocks than threads (small M),
// the channels are split too and the whole int32 product is made first, then handed over row range
// by row range (the callback then runs in parallel over rows). A portable loop (int32 sums) runs
// where AVX-512 VNNI is missing or FASTLM_CPU_ISA caps fastlm._C below AVX-512.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_V_X86 1
#include <immintrin.h>
#define FASTLM_V_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")))
#endif

namespace fastlm {
namespace {

constexpr int64_t kNR = 16;    // channels per quad panel (one zmm of int32)
constexpr int kMR = 8;         // rows per register tile
constexpr int64_t kBlockRows = 64;
constexpr int64_t kAmxBlockRows = 128;
constexpr int64_t kBlockBytes = int64_t{384} << 10;  // a block's int32 output
constexpr int64_t kMaxK = 65792;                     // 255 * 128 * K < 2^31

// Rows per block: the block's int32 output ~kBlockBytes in whole 8-row register tiles; on AMX
// kAmxBlockRows whatever N (four pairs of 16-row tiles: each panel pair is read once per 128 rows;
// BERT-base int8_dynamic B8 S128, 2 threads, against torch._int_mm in the same process: 0.82x the
// time with 64-row blocks, 0.79x with 128, 0.88x / 0.86x with 192 / 256).
int64_t block_rows(int64_t N, bool amx) {
  if (amx) return kAmxBlockRows;
  const int64_t r = kBlockBytes / (4 * std::max<int64_t>(N, 1));
  return std::max<int64_t>(kMR, std::min<int64_t>(kBlockRows, r / kMR * kMR));
}

#ifdef FASTLM_V_X86
// sum_k a[k] over one row of K bytes (read only to K, the tail in scalar code); also the AMX tiles'
// (cpu::int8_row_sum, int8_gemm_amx.cpp).
FASTLM_V_VNNI int32_t row_sum_vnni(const int8_t* a, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(a + k));
  int32_t t = _mm512_reduce_add_epi32(s);
  for (; k < K; ++k) t += a[k];
  return t;
}

#define FASTLM_V_ACC(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = _mm512_setzero_si512();
#define FASTLM_V_ROW(i)                                                                  \
  if constexpr (MR > i) {                                                                \
    const __m512i x = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ak + (i) * lda)); \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, w0, x);                                       \
    if constexpr (NP == 2) c##i##1 = _mm512_dpbusd_epi32(c##i##1, w1, x);                \
  }
#define FASTLM_V_STORE(i)                                                                              \
  if constexpr (MR > i) {                                                                              \
    const __m512i z = _mm512_set1_epi32(128 * rs[i]);                                                  \
    _mm512_mask_storeu_epi32(c + (i) * ldc, m0, _mm512_sub_epi32(c##i##0, z));                         \
    if constexpr (NP == 2) _mm512_mask_storeu_epi32(c + (i) * ldc + kNR, m1, _mm512_sub_epi32(c##i##1, z)); \
  }

// MR rows of a (lda apart, K4 groups of 4 bytes each readable) x NP quad panels (p0, p1 = p0 + K4 * 64)
// -> c (MR rows, ldc apart), nv valid channels of the NP * 16 (masked stores).
template <int MR, int NP>
FASTLM_V_VNNI void tile_vnni(const int8_t* a, int64_t lda, int64_t K4, const uint8_t* p0, const int32_t* rs,
                             int32_t* c, int64_t ldc, int64_t nv) {
  FASTLM_V_ACC(0) FASTLM_V_ACC(1) FASTLM_V_ACC(2) FASTLM_V_ACC(3)
  FASTLM_V_ACC(4) FASTLM_V_ACC(5) FASTLM_V_ACC(6) FASTLM_V_ACC(7)
  const uint8_t* p1 = p0 + K4 * 64;
  for (int64_t kk = 0; kk < K4; ++kk) {
    const __m512i w0 = _mm512_loadu_si512(p0 + kk * 64);
    const __m512i w1 = NP == 2 ? _mm512_loadu_si512(p1 + kk * 64) : w0;
    const int8_t* ak = a + kk * 4;
    FASTLM_V_ROW(0) FASTLM_V_ROW(1) FASTLM_V_ROW(2) FASTLM_V_ROW(3)
    FASTLM_V_ROW(4) FASTLM_V_ROW(5) FASTLM_V_ROW(6) FASTLM_V_ROW(7)
  }
  const __mmask16 m0 = nv >= kNR ? __mmask16(0xFFFF) : __mmask16((1u << nv) - 1);
  const int64_t n1 = nv - kNR;
  const __mmask16 m1 = n1 >= kNR ? __mmask16(0xFFFF) : n1 <= 0 ? __mmask16(0) : __mmask16((1u << n1) - 1);
  (void)m1;
  FASTLM_V_STORE(0) FASTLM_V_STORE(1) FASTLM_V_STORE(2) FASTLM_V_STORE(3)
  FASTLM_V_STORE(4) FASTLM_V_STORE(5) FASTLM_V_STORE(6) FASTLM_V_STORE(7)
}
#undef FASTLM_V_ACC
#undef FASTLM_V_ROW
#undef FASTLM_V_STORE

using TileFn = void (*)(const int8_t*, int64_t, int64_t, const uint8_t*, const int32_t*, int32_t*, int64_t, int64_t);

template <int NP>
TileFn pick_tile(int mr) {
  static const TileFn fns[] = {tile_vnni<1, NP>, tile_vnni<2, NP>, tile_vnni<3, NP>, tile_vnni<4, NP>,
                               tile_vnni<5, NP>, tile_vnni<6, NP>, tile_vnni<7, NP>, tile_vnni<8, NP>};
  return fns[mr - 1];
}

// Rows [0, mb) of a x panels [q0, q1) -> c (mb rows, ldc apart; column 0 is channel 16 * q0).
FASTLM_V_VNNI void block_vnni(const int8_t* a, int64_t lda, int64_t mb, int64_t K, const uint8_t* quads, int64_t N,
                              int64_t q0, int64_t q1, int32_t* c, int64_t ldc) {
  const int64_t K4 = (K + 3) / 4;
  int32_t rs[kBlockRows];
  for (int64_t r = 0; r < mb; ++r) rs[r] = row_sum_vnni(a + r * lda, K);
  for (int64_t q = q0; q < q1; q += 2) {
    const int64_t nv = std::min<int64_t>(N - q * kNR, q + 2 <= q1 ? 2 * kNR : kNR);
    const uint8_t* pq = quads + q * K4 * 64;
    int32_t* cq = c + (q - q0) * kNR;
    for (int64_t r = 0; r < mb; r += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, mb - r));
      const TileFn fn = q + 2 <= q1 ? pick_tile<2>(mr) : pick_tile<1>(mr);
      fn(a + r * lda, lda, K4, pq, rs + r, cq + r * ldc, ldc, nv);
    }
  }
}
#endif

// The portable loop: c[m, j] = sum_k a[m, k] * (quads[...] - 128).
void block_portable(const int8_t* a, int64_t lda, int64_t mb, int64_t K, const uint8_t* quads, int64_t N, int64_t q0,
                    int64_t q1, int32_t* c, int64_t ldc) {
  const int64_t K4 = (K + 3) / 4;
  for (int64_t r = 0; r < mb; ++r)
    for (int64_t j = q0 * kNR; j < std::min(N, q1 * kNR); ++j) {
      const uint8_t* p = quads + (j / kNR) * K4 * 64 + (j % kNR) * 4;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(a[r * lda + k]) * (int32_t{p[(k / 4) * 64 + k % 4]} - 128);
      c[r * ldc + (j - q0 * kNR)] = s;
    }
}

// Whether the VNNI tiles run here (else the portable loop): AVX-512 VNNI and fastlm._C not capped below it.
bool vnni_gemm_native() {
#ifdef FASTLM_V_X86
  return cpu::avx512vnni_allowed();
#else
  return false;
#endif
}

}  // namespace

namespace cpu {

int32_t int8_row_sum(const int8_t* a, int64_t K) {
#ifdef FASTLM_V_X86
  if (avx512vnni_allowed()) return row_sum_vnni(a, K);
#endif
  int32_t t = 0;
  for (int64_t k = 0; k < K; ++k) t += a[k];
  return t;
}

void int8_gemm_vnni_rows(const int8_t* a, int64_t lda, int64_t M, int64_t K, const uint8_t* quads, int64_t N,
                         const RowsFn& rows) {
  const int64_t nq = (N + kNR - 1) / kNR;
  const bool amx = cpu::amx_int8_usable();  // AMX-INT8 tiles (int8_gemm_amx.cpp), else VNNI / portable
  const int64_t mb = block_rows(N, amx);
  const int64_t nblocks = (M + mb - 1) / mb;
  // K % 4 != 0: the rows are read in whole groups of 4, so they go through a zero-padded copy
  at::Tensor padded;
  if (K % 4 != 0 || lda < K) {
    const int64_t K4 = (K + 3) / 4;
    padded = at::zeros({M, K4 * 4}, at::TensorOptions().dtype(at::kChar));
    int8_t* pp = padded.mutable_data_ptr<int8_t>();
    for (int64_t m = 0; m < M; ++m) std::memcpy(pp + m * K4 * 4, a + m * lda, K);
    a = pp;
    lda = K4 * 4;
  }
  auto block = [&](int64_t m0, int64_t rows_n, int64_t q0, int64_t q1, int32_t* c, int64_t ldc) {
    if (amx) return cpu::int8_block_amx(a + m0 * lda, lda, rows_n, K, quads, N, q0, q1, c, ldc);
#ifdef FASTLM_V_X86
    if (vnni_gemm_native()) return block_vnni(a + m0 * lda, lda, rows_n, K, quads, N, q0, q1, c, ldc);
#endif
    block_portable(a + m0 * lda, lda, rows_n, K, quads, N, q0, q1, c, ldc);
  };
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nblocks >= threads) {
    // each block: GEMM into a per-thread L2-sized buffer, then its rows' epilogue
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      // kept per thread: a fresh ~384 KB buffer per call would be page-faulted in again each time
      thread_local std::vector<int32_t> c;
      if (c.size() < static_cast<size_t>(mb * N)) c.resize(static_cast<size_t>(mb * N));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * mb, n_rows = std::min(mb, M - m0);
        block(m0, n_rows, 0, nq, c.data(), N);
        rows(m0, n_rows, c.data(), N);
      }
    });
    return;
  }
  // few rows: split the channels too (chunks of panel pairs), the whole product first
  const int64_t per = std::max<int64_t>(1, threads / nblocks);
  const int64_t chunk = std::max<int64_t>(2, ((nq + per - 1) / per + 1) / 2 * 2);  // panels, even
  const int64_t nchunks = (nq + chunk - 1) / chunk;
  const std::unique_ptr<int32_t[]> c(new int32_t[M * N]);  // every element written below: not zeroed first
  at::parallel_for(0, nblocks * nchunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nchunks, q0 = (i % nchunks) * chunk, q1 = std::min(nq, q0 + chunk);
      const int64_t m0 = b * mb;
      block(m0, std::min(mb, M - m0), q0, q1, c.get() + m0 * N + q0 * kNR, N);
    }
  });
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
    rows(r0, r1 - r0, c.get() + r0 * N, N);
  });
}

void check_vnni_operands(const char* op, const at::Tensor& a, const at::Tensor& quads, int64_t n) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kChar, op, ": a must be int8, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 2 && a.numel() > 0, op, ": a must be a non-empty 2-D (M, K) tensor, got shape ",
                    a.sizes());
  TORCH_CHECK_VALUE(a.device().is_cpu() && quads.device().is_cpu(), op, ": a and quads must be CPU tensors, got ",
                    a.device(), " and ", quads.device());
  TORCH_CHECK_VALUE(a.stride(1) == 1, op, ": a must have unit column stride, got strides ", a.strides());
  const int64_t K = a.size(1);
  TORCH_CHECK_VALUE(K <= kMaxK, op, ": K (a.size(1)) must be at most ", kMaxK,
                    " (int32 sums of 255 * 128 * K stay exact), got ", K);
  TORCH_CHECK_TYPE(quads.scalar_type() == at::kByte, op, ": quads must be uint8 (fastlm.linear.pack_int8_quads), got ",
                   quads.scalar_type());
  TORCH_CHECK_VALUE(n >= 1, op, ": n must be positive, got ", n);
  const int64_t nq = (n + kNR - 1) / kNR, K4 = (K + 3) / 4;
  TORCH_CHECK_VALUE(quads.dim() == 3 && quads.size(0) == nq && quads.size(1) == K4 && quads.size(2) == 4 * kNR, op,
                    ": quads must have shape (", nq, ", ", K4, ", ", 4 * kNR, ") for n = ", n, " and K = ", K,
                    " (fastlm.linear.pack_int8_quads), got ", quads.sizes());
  TORCH_CHECK_VALUE(quads.is_contiguous(), op, ": quads must be contiguous");
}

}  // namespace cpu

namespace {

at::Tensor int8_gemm_vnni_cpu(const at::Tensor& a, const at::Tensor& quads, int64_t n) {
  cpu::check_vnni_operands("int8_gemm_vnni", a, quads, n);
  const int64_t M = a.size(0), K = a.size(1);
  at::Tensor c = at::empty({M, n}, a.options().dtype(at::kInt));
  int32_t* cp = c.mutable_data_ptr<int32_t>();
  cpu::int8_gemm_vnni_rows(a.const_data_ptr<int8_t>(), a.stride(0), M, K, quads.const_data_ptr<uint8_t>(), n,
                           [&](int64_t m0, int64_t mb, const int32_t* rows, int64_t ldc) {
                             for (int64_t r = 0; r < mb; ++r)
                               std::memcpy(cp + (m0 + r) * n, rows + r * ldc, n * sizeof(int32_t));
                           });
  return c;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) { m.def("int8_gemm_vnni(Tensor a, Tensor quads, int n) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("int8_gemm_vnni", &int8_gemm_vnni_cpu); }

}  // namespace fastlm
