// Prefill GEMM on fp32 panels for AVX2 + FMA CPUs (no AVX-512), on the layout the decode GEMV
// already keeps (fastlm.linear.PackedLinear: (ceil(N / 16), K, 16) fp32 panels, zero past N), so a
// model has one weight copy whatever runs it.
//
//   packed_gemm_avx2(x (..., K) f32, w (ceil(n / 16), K, 16) f32, n, bias (n,)?, residual (..., n)?, activation)
//     -> y (..., n) = act(x @ W^T + bias) + residual; activation "none" | "gelu" (erf) | "gelu_tanh".
//
// gemv.cpp's packed_gemm is built for decode (M <= 16) and, on AVX-512, runs prefill on 12 x 32
// tiles; on AVX2 it streams the whole of x once per 16-channel panel with full-K tiles, which the
// noisy AVX2 run measured at 0.46x oneDNN for GPT-2's 512 x 768 -> 3072 (issue 19). Here the loops
// are blocked as in BLIS / GotoBLAS (Goto & van de Geijn, "Anatomy of high-performance matrix
// multiplication", ACM TOMS 2008): a chunk of 8 panels (128 channels) per work item; inside it
// K in blocks of kKC = 256 (a panel slice is 16 KB, L1-resident across the row tiles), rows in
// blocks of kMC = 96 (x's block 96 KB, L2-resident across the panels); a register tile of 6 rows x
// 16 channels (12 ymm accumulators, 2 panel vectors, 1 broadcast). Partial sums of a K block go
// through y; the last K block applies bias, GELU (fast_math.h) and the residual. Work items go to
// the pool of the decode kernels (cpu_pool.h: bounded spinning, back-off under load).
// A portable path (plain C++ loops) runs where the CPU has no AVX2 or FASTLM_CPU_ISA caps it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "fast_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_G_X86 1
#include <immintrin.h>
#define FASTLM_G_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace fastlm {
namespace {

constexpr int64_t kNR = 16;           // channels per panel (gemv.cpp's layout)
constexpr int kMR = 6;                // rows per register tile (tile_avx2 names 6 rows of accumulators)
constexpr int64_t kKC = 256;          // K per block: a panel slice of 16 KB
constexpr int64_t kMC = 96;           // rows per block: x's block of 96 x 256 floats
constexpr int64_t kChunkPanels = 8;   // panels per work item

struct Epi {
  const float* bias;      // (N,) or null
  const float* residual;  // (M, N) or null
  float* y;               // (M, N)
  int64_t N;
  int act;                // 0 none, 1 GELU (erf), 2 GELU (tanh)
};

// acc (mr, 16) sums over one K block -> y rows r0.., channels n0 .. n0 + nv: plus the earlier blocks'
// partial sums (not first), then on the last block bias, activation and residual. Fixed-width loops
// that gcc vectorises inside the AVX2 tile it is inlined into.
inline void finish(float* acc, int mr, bool first, bool last, const Epi& e, int64_t r0, int64_t n0, int64_t nv) {
  float bi[kNR];
  for (int64_t j = 0; j < kNR; ++j) bi[j] = (last && e.bias != nullptr && j < nv) ? e.bias[n0 + j] : 0.0f;
  for (int r = 0; r < mr; ++r) {
    float* v = acc + r * kNR;
    float* yr = e.y + (r0 + r) * e.N + n0;
    if (!first) {
      if (nv == kNR)
        for (int64_t j = 0; j < kNR; ++j) v[j] += yr[j];
      else
        for (int64_t j = 0; j < nv; ++j) v[j] += yr[j];
    }
    if (last) {
      for (int64_t j = 0; j < kNR; ++j) v[j] += bi[j];
      if (e.act == 1) {
        for (int64_t j = 0; j < kNR; ++j) v[j] = fm::gelu_erf(v[j]);
      } else if (e.act == 2) {
        for (int64_t j = 0; j < kNR; ++j) v[j] = fm::gelu_tanh(v[j]);
      }
      if (e.residual != nullptr) {
        const float* rr = e.residual + (r0 + r) * e.N + n0;
        if (nv == kNR)
          for (int64_t j = 0; j < kNR; ++j) v[j] += rr[j];
        else
          for (int64_t j = 0; j < nv; ++j) v[j] += rr[j];
      }
    }
    if (nv == kNR)
      for (int64_t j = 0; j < kNR; ++j) yr[j] = v[j];
    else
      for (int64_t j = 0; j < nv; ++j) yr[j] = v[j];
  }
}

template <int MR>
void tile_portable(const float* x, int64_t ldx, const float* p, int64_t kc, bool first, bool last, const Epi& e,
                   int64_t r0, int64_t n0, int64_t nv) {
  float acc[MR * kNR] = {0.0f};
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < MR; ++r) {
      const float xv = x[r * ldx + k];
      for (int64_t j = 0; j < kNR; ++j) acc[r * kNR + j] += xv * p[k * kNR + j];
    }
  finish(acc, MR, first, last, e, r0, n0, nv);
}

#ifdef FASTLM_G_X86
// Accumulators as named variables, not an array: gcc kept an __m256 a[MR][2] array in memory and
// stored all 12 accumulators on every k (seen in the disassembly: 12 stores per 12 FMAs).
#define FASTLM_G_ROW(R, A0, A1)                                  \
  if constexpr (MR > R) {                                        \
    const __m256 xb = _mm256_broadcast_ss(x + R * ldx + k);      \
    A0 = _mm256_fmadd_ps(xb, w0, A0);                            \
    A1 = _mm256_fmadd_ps(xb, w1, A1);                            \
  }
#define FASTLM_G_STORE(R, A0, A1)                                \
  if constexpr (MR > R) {                                        \
    _mm256_store_ps(acc + R * kNR, A0);                          \
    _mm256_store_ps(acc + R * kNR + 8, A1);                      \
  }

template <int MR>
FASTLM_G_AVX2 void tile_avx2(const float* x, int64_t ldx, const float* p, int64_t kc, bool first, bool last,
                             const Epi& e, int64_t r0, int64_t n0, int64_t nv) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(p + k * kNR), w1 = _mm256_loadu_ps(p + k * kNR + 8);
    FASTLM_G_ROW(0, c00, c01)
    FASTLM_G_ROW(1, c10, c11)
    FASTLM_G_ROW(2, c20, c21)
    FASTLM_G_ROW(3, c30, c31)
    FASTLM_G_ROW(4, c40, c41)
    FASTLM_G_ROW(5, c50, c51)
  }
  alignas(32) float acc[MR * kNR];
  FASTLM_G_STORE(0, c00, c01)
  FASTLM_G_STORE(1, c10, c11)
  FASTLM_G_STORE(2, c20, c21)
  FASTLM_G_STORE(3, c30, c31)
  FASTLM_G_STORE(4, c40, c41)
  FASTLM_G_STORE(5, c50, c51)
  finish(acc, MR, first, last, e, r0, n0, nv);
}
#undef FASTLM_G_ROW
#undef FASTLM_G_STORE
#endif

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, bool, bool, const Epi&, int64_t, int64_t,
                        int64_t);

template <int MR>
TileFn pick_tile(bool avx2) {
#ifdef FASTLM_G_X86
  if (avx2) return &tile_avx2<MR>;
#endif
  (void)avx2;
  return &tile_portable<MR>;
}

}  // namespace

at::Tensor packed_gemm_avx2(const at::Tensor& x_in, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& residual, c10::string_view activation) {
  const char* op = "packed_gemm_avx2";
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu" || activation == "gelu_tanh", op,
                    ": activation must be \"none\", \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, op, ": x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), op, ": x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.numel() > 0, op, ": x is empty (shape ", x_in.sizes(), ")");
  TORCH_CHECK_VALUE(n > 0, op, ": n (output features) must be positive, got ", n);
  const int64_t K = x_in.size(-1), NB = (n + kNR - 1) / kNR;
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, op, ": w must be float32 panels, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.is_contiguous() && w.dim() == 3 && w.size(0) == NB && w.size(1) == K &&
                        w.size(2) == kNR,
                    op, ": w must be contiguous CPU panels of shape (", NB, ", ", K, ", 16) for n = ", n,
                    " (fastlm.linear.pack_panels), got ", w.sizes());
  std::vector<int64_t> out(x_in.sizes().begin(), x_in.sizes().end());
  out.back() = n;
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n, op,
                      ": bias must be a CPU tensor of shape (", n, ",), got ", bias->sizes());
  }
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == at::kFloat, op, ": residual must be float32, got ",
                     residual->scalar_type());
    TORCH_CHECK_VALUE(residual->device().is_cpu() && residual->sizes() == at::IntArrayRef(out), op,
                      ": residual must be a CPU tensor of shape ", at::IntArrayRef(out), ", got ", residual->sizes());
  }
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->reshape({M, n}).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, n}, x.options());
  const Epi e{b.defined() ? b.const_data_ptr<float>() : nullptr, r.defined() ? r.const_data_ptr<float>() : nullptr,
              y.mutable_data_ptr<float>(), n, activation == "none" ? 0 : (activation == "gelu" ? 1 : 2)};
  const bool avx2 = cpu::isa_level() >= 1;
  const TileFn tiles[kMR] = {pick_tile<1>(avx2), pick_tile<2>(avx2), pick_tile<3>(avx2),
                             pick_tile<4>(avx2), pick_tile<5>(avx2), pick_tile<6>(avx2)};
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const int64_t chunks = (NB + kChunkPanels - 1) / kChunkPanels;
  SharePool::get().run(chunks, [&](int64_t c) {
    const int64_t b0 = c * kChunkPanels, b1 = std::min(NB, b0 + kChunkPanels);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const bool first = k0 == 0, last = k0 + kc == K;
      for (int64_t m0 = 0; m0 < M; m0 += kMC) {
        const int64_t mc = std::min(kMC, M - m0);
        for (int64_t nb = b0; nb < b1; ++nb) {
          const float* p = wp + (nb * K + k0) * kNR;
          const int64_t n0 = nb * kNR, nv = std::min(kNR, n - n0);
          for (int64_t r0 = m0; r0 < m0 + mc; r0 += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m0 + mc - r0));
            tiles[mr - 1](xp + r0 * K + k0, K, p, kc, first, last, e, r0, n0, nv);
          }
        }
      }
    }
  });
  return y.view(out);
}

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("packed_gemm_avx2(Tensor x, Tensor w, int n, Tensor? bias=None, Tensor? residual=None, "
        "str activation='none') -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("packed_gemm_avx2", &packed_gemm_avx2); }

}  // namespace fastlm
