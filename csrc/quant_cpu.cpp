// Dynamic per-token int8 linears on CPU (quantize="int8_dynamic", fastlm.linear.Int8DynamicLinear):
// the two passes around torch's int8 GEMM (torch._int_mm, oneDNN VNNI), each one fused pass over the
// data instead of the 5-8 torch ops it replaces (abs, amax, div, round, clamp, cast; cast, two muls,
// bias add, GELU, residual add).
//
//   quantize_rows_int8(x (M, K) f32, outliers (n_o,) int64?) -> (q int8 (M, K), scale f32 (M,))
//     scale[m] = absmax(x[m]) / 127 (1 where the row is all zero), q = round_half_even(x / scale)
//     clamped to [-127, 127]: torch.round(x / scale).clamp(-127, 127), bit for bit. `outliers`: input
//     channels left out of the int8 rows (LLM.int8()-style decomposition, fastlm.linear.Int8DynamicLinear):
//     they count as 0 in absmax and get q = 0; the caller computes them in float32 (x_out / w_out below).
//   int8_linear_epilogue(acc int32 (M, N), x_scale (M,), w_scale (N,), bias (N,)?, activation, residual (M, N)?,
//                        x_out (M, n_o)?, w_out (n_o, N)?)
//     y = act(acc * x_scale[m] * w_scale[n] + (x_out @ w_out)[m, n] + bias[n]) + residual, f32 (M, N);
//     GELU on fast_math.h's erf / tanh (max abs error of erf 4.2e-7). x_out @ w_out is the float32
//     product of the outlier channels (none when both are None; one without the other is an error).
//   int8_linear_epilogue_quant(acc, x_scale, w_scale, bias?, activation, x_out?, w_out?, outliers?)
//       -> (q int8 (M, N), scale f32 (M,), y_out f32 (M, n_o))
//     the epilogue (no residual) followed by quantize_rows_int8(y, outliers), row by row in a
//     per-thread scratch row: the FFN's d_ff activation goes from the first int8 GEMM to the second
//     as int8 without an fp32 round trip through memory (4x fewer bytes written and read); y_out =
//     y[:, outliers] in float32 for the next linear ((M, 0) without outliers).
//   int8_linear_epilogue_(acc!, x_scale, w_scale, bias?, activation, residual?, x_out?, w_out?) -> ()
//     int8_linear_epilogue in place: acc's storage receives y (float32 and int32 have the same
//     size; read it as acc.view(torch.float32)), so the GEMM's output buffer is the only one.
//   int8_linear_epilogue_ln_quant_(acc!, x_scale, w_scale, bias?, residual (M, N), ln_weight (N,), ln_bias (N,),
//                                  eps, x_out?, w_out?, outliers?) -> (q int8 (M, N), scale f32 (M,), h_out (M, n_o))
//     BERT's residual LayerNorm after a projection, and the next int8 linear's quantization, in one pass
//     per row: h = LayerNorm((acc * x_scale * w_scale + x_out @ w_out + bias) + residual) written over acc
//     (as above), then (q, scale) = quantize_rows_int8(h, outliers), h_out = h[:, outliers]. Bit for bit
//     int8_linear_epilogue, add_layer_norm_ext (ffn.cpp's LayerNorm rows, called here) and
//     quantize_rows_int8 in sequence.
//   int8_linear_vnni(xq (M, K) int8, quads, n, x_scale, w_scale, bias?, activation, residual?, x_out?, w_out?)
//   int8_linear_vnni_quant(xq, quads, n, x_scale, w_scale, bias?, activation, x_out?, w_out?, outliers?)
//   int8_linear_vnni_ln_quant(xq, quads, n, x_scale, w_scale, bias?, residual, ln_weight, ln_bias, eps, x_out?,
//                             w_out?, outliers?) -> (h (M, n) f32, q, scale, h_out)
//     the three epilogues above on the AVX-512 VNNI GEMM of xq and the weight's quad panels
//     (int8_gemm_vnni.cpp, fastlm.linear.pack_int8_quads), fused: each block of rows is multiplied
//     into an L2-resident int32 buffer and run through the same row functions at once. Bit for bit
//     the unfused op on the exact product (acc = xq @ w^T).
// In place, each row is read into a per-thread scratch row before its slot is written.
// The epilogue loops are plain C++ that gcc vectorises, cloned per ISA (AVX-512, AVX2, baseline) and
// picked at load time, as in ffn.cpp; absmax / quantize rows are AVX-512F / AVX2 intrinsics picked by
// cpu::isa_level() (FASTLM_CPU_ISA caps them), bit for bit the cloned C++ rows kept for the portable
// level (gcc left the absmax scalar).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "fast_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTLM_QUANT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLM_QUANT_CLONES
#endif

namespace fastlm {
namespace {

// ---- portable rows (any CPU; FASTLM_CPU_ISA=portable) ------------------------------------------
// gcc left row_absmax's 16-lane max scalar (16 vmovss + vandps + vmaxss per 16 elements in every
// clone: ~1 cycle per element, measured 0.3-0.4 ns/el for quantize_rows_int8 of (64, 768) on
// Zen 4), hence the AVX-512 / AVX2 rows below; these stay the path below isa_level 1.
FASTLM_QUANT_CLONES float row_absmax_portable(const float* x, int64_t n) {
  float acc[16] = {0.f};  // 16 lanes: max is exact in any order
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] = std::max(acc[l], std::fabs(x[j + l]));
  float m = 0.f;
  for (int l = 0; l < 16; ++l) m = std::max(m, acc[l]);
  for (; j < n; ++j) m = std::max(m, std::fabs(x[j]));
  return m;
}

FASTLM_QUANT_CLONES void row_quantize_portable(const float* x, int8_t* q, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) {
    // x / scale as torch divides (not a reciprocal multiply), rounded half to even like torch.round
    const float v = std::nearbyint(x[j] / scale);
    q[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
}

// absmax / quantize of x * keep (keep[j] is 1, or 0 on an outlier channel: exact, so the other
// channels round as in the unmasked row).
FASTLM_QUANT_CLONES float row_absmax_masked_portable(const float* x, const float* keep, int64_t n) {
  float acc[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] = std::max(acc[l], std::fabs(x[j + l] * keep[j + l]));
  float m = 0.f;
  for (int l = 0; l < 16; ++l) m = std::max(m, acc[l]);
  for (; j < n; ++j) m = std::max(m, std::fabs(x[j] * keep[j]));
  return m;
}

FASTLM_QUANT_CLONES void row_quantize_masked_portable(const float* x, const float* keep, int8_t* q, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = std::nearbyint((x[j] * keep[j]) / scale);
    q[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTLM_QUANT_X86 1
// ---- AVX-512F / AVX2 rows --------------------------------------------------------------------
// The same arithmetic as the portable rows, bit for bit: absmax is exact in any order and ignores
// NaN like std::max(acc, |x|) (vmaxps(|x|, acc) returns acc when |x| is NaN); q is a true division
// (vdivps, not a reciprocal multiply), rounded in the current mode like std::nearbyint
// (vrndscaleps / vroundps imm 4), then max(v, -127) (NaN -> -127, as std::max(-127.f, v)) and
// min(v, 127), as in the cloned loop. Tails are masked (AVX-512) or scalar (AVX2) with the same ops.
#define FASTLM_Q512 __attribute__((target("avx512f,avx2,fma")))
#define FASTLM_Q256 __attribute__((target("avx2,fma")))

FASTLM_Q512 inline __m512 abs512(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

// keep == nullptr: the unmasked row. Four accumulators: vmaxps has a 2-cycle latency on Zen 4.
FASTLM_Q512 float row_absmax_512(const float* x, const float* keep, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  if (keep == nullptr) {
    for (; j + 64 <= n; j += 64) {
      a0 = _mm512_max_ps(abs512(_mm512_loadu_ps(x + j)), a0);
      a1 = _mm512_max_ps(abs512(_mm512_loadu_ps(x + j + 16)), a1);
      a2 = _mm512_max_ps(abs512(_mm512_loadu_ps(x + j + 32)), a2);
      a3 = _mm512_max_ps(abs512(_mm512_loadu_ps(x + j + 48)), a3);
    }
    for (; j + 16 <= n; j += 16) a0 = _mm512_max_ps(abs512(_mm512_loadu_ps(x + j)), a0);
    if (j < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
      a1 = _mm512_max_ps(abs512(_mm512_maskz_loadu_ps(m, x + j)), a1);
    }
  } else {
    for (; j + 16 <= n; j += 16)
      a0 = _mm512_max_ps(abs512(_mm512_mul_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(keep + j))), a0);
    if (j < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
      a1 = _mm512_max_ps(abs512(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), _mm512_maskz_loadu_ps(m, keep + j))),
                         a1);
    }
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
}

FASTLM_Q512 inline __m128i quant16_512(__m512 v, __m512 s) {
  v = _mm512_roundscale_ps(_mm512_div_ps(v, s), _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));
}

FASTLM_Q512 void row_quantize_512(const float* x, const float* keep, int8_t* q, int64_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t j = 0;
  if (keep == nullptr) {
    for (; j + 16 <= n; j += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), quant16_512(_mm512_loadu_ps(x + j), s));
  } else {
    for (; j + 16 <= n; j += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                       quant16_512(_mm512_mul_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(keep + j)), s));
  }
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    if (keep != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, keep + j));
    v = _mm512_roundscale_ps(_mm512_div_ps(v, s), _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    _mm512_mask_cvtepi32_storeu_epi8(q + j, m, _mm512_cvttps_epi32(v));
  }
}

FASTLM_Q256 inline __m256 abs256(__m256 v) {
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)));
}

FASTLM_Q256 float row_absmax_256(const float* x, const float* keep, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  if (keep == nullptr) {
    for (; j + 32 <= n; j += 32) {
      a0 = _mm256_max_ps(abs256(_mm256_loadu_ps(x + j)), a0);
      a1 = _mm256_max_ps(abs256(_mm256_loadu_ps(x + j + 8)), a1);
      a2 = _mm256_max_ps(abs256(_mm256_loadu_ps(x + j + 16)), a2);
      a3 = _mm256_max_ps(abs256(_mm256_loadu_ps(x + j + 24)), a3);
    }
    for (; j + 8 <= n; j += 8) a0 = _mm256_max_ps(abs256(_mm256_loadu_ps(x + j)), a0);
  } else {
    for (; j + 8 <= n; j += 8)
      a0 = _mm256_max_ps(abs256(_mm256_mul_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(keep + j))), a0);
  }
  a0 = _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float m = _mm_cvtss_f32(h);
  for (; j < n; ++j) m = std::max(m, std::fabs(keep != nullptr ? x[j] * keep[j] : x[j]));
  return m;
}

FASTLM_Q256 inline __m256i quant8_256(__m256 v, __m256 s) {
  v = _mm256_round_ps(_mm256_div_ps(v, s), _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvttps_epi32(v);
}

FASTLM_Q256 void row_quantize_256(const float* x, const float* keep, int8_t* q, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m256 v[4];
    for (int u = 0; u < 4; ++u) {
      v[u] = _mm256_loadu_ps(x + j + 8 * u);
      if (keep != nullptr) v[u] = _mm256_mul_ps(v[u], _mm256_loadu_ps(keep + j + 8 * u));
    }
    // int32 -> int16 -> int8 packs (exact: |q| <= 127) interleave the 128-bit halves; vpermd restores the order
    const __m256i p16a = _mm256_packs_epi32(quant8_256(v[0], s), quant8_256(v[1], s));
    const __m256i p16b = _mm256_packs_epi32(quant8_256(v[2], s), quant8_256(v[3], s));
    const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j),
                        _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  for (; j < n; ++j) {
    const float v = std::nearbyint((keep != nullptr ? x[j] * keep[j] : x[j]) / scale);
    q[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
}
#endif

float row_absmax(const float* x, const float* keep, int64_t n) {
#ifdef FASTLM_QUANT_X86
  const int isa = cpu::isa_level();
  if (isa >= 2) return row_absmax_512(x, keep, n);
  if (isa == 1) return row_absmax_256(x, keep, n);
#endif
  return keep != nullptr ? row_absmax_masked_portable(x, keep, n) : row_absmax_portable(x, n);
}

void row_quantize(const float* x, const float* keep, int8_t* q, int64_t n, float scale) {
#ifdef FASTLM_QUANT_X86
  const int isa = cpu::isa_level();
  if (isa >= 2) return row_quantize_512(x, keep, q, n, scale);
  if (isa == 1) return row_quantize_256(x, keep, q, n, scale);
#endif
  if (keep != nullptr) {
    row_quantize_masked_portable(x, keep, q, n, scale);
  } else {
    row_quantize_portable(x, q, n, scale);
  }
}

// z[j] = sum_t xo[t] * wo[t, j] (t in order), the float32 product of a row's outlier channels.
FASTLM_QUANT_CLONES void row_outlier_product(const float* xo, const float* wo, int64_t n_o, float* z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) z[j] = 0.f;
  for (int64_t t = 0; t < n_o; ++t) {
    const float a = xo[t];
    const float* w = wo + t * n;
    for (int64_t j = 0; j < n; ++j) z[j] += a * w[j];
  }
}

// One row of quantize_rows_int8(x, outliers): scale, q, and the outlier channels' values.
void quantize_row(const float* x, const float* keep, const int64_t* idx, int64_t n_o, int8_t* q, float* sp,
                  float* xo, int64_t n) {
  float s = row_absmax(x, keep, n) / 127.0f;
  if (!(s > 0.0f)) s = 1.0f;  // an all-zero row, as the torch path
  *sp = s;
  row_quantize(x, keep, q, n, s);
  for (int64_t t = 0; t < n_o; ++t) xo[t] = x[idx[t]];
}

// kZ: z (the outlier product) is added. A compile-time flag, not a `z != nullptr` test in the
// loop: with the test gcc left the z-less GELU loop scalar (measured 1024 x 3072, one thread:
// 11.6 ms against 2.4 ms for the loop with z).
template <int kAct, bool kBias, bool kRes, bool kZ>
FASTLM_QUANT_CLONES void row_epilogue_z(const int32_t* __restrict acc, float xs, const float* __restrict ws,
                                        const float* __restrict b, const float* __restrict r,
                                        const float* __restrict z, float* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(acc[j]) * xs * ws[j];
    if constexpr (kZ) v += z[j];
    if constexpr (kBias) v += b[j];
    if constexpr (kAct == 1) v = fm::gelu_erf(v);
    if constexpr (kAct == 2) v = fm::gelu_tanh(v);
    if constexpr (kRes) v += r[j];
    y[j] = v;
  }
}

using RowFn = void (*)(const int32_t*, float, const float*, const float*, const float*, const float*, float*,
                       int64_t);

template <int kAct, bool kBias, bool kRes>
void row_epilogue(const int32_t* acc, float xs, const float* ws, const float* b, const float* r, const float* z,
                  float* y, int64_t n) {
  if (z != nullptr) {
    row_epilogue_z<kAct, kBias, kRes, true>(acc, xs, ws, b, r, z, y, n);
  } else {
    row_epilogue_z<kAct, kBias, kRes, false>(acc, xs, ws, b, r, z, y, n);
  }
}

template <int kAct>
RowFn pick_row(bool bias, bool res) {
  if (bias) return res ? &row_epilogue<kAct, true, true> : &row_epilogue<kAct, true, false>;
  return res ? &row_epilogue<kAct, false, true> : &row_epilogue<kAct, false, false>;
}

int parse_act(c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu" || activation == "gelu_tanh",
                    "int8_linear_epilogue: activation must be \"none\", \"gelu\" or \"gelu_tanh\", got \"",
                    activation, "\"");
  return activation == "none" ? 0 : activation == "gelu" ? 1 : 2;
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// Outlier channels of a (rows, n) tensor being quantized: the indices (int64, contiguous) and the
// keep mask (n,) float32 (1, 0 on an outlier). Undefined tensors when `outliers` is None.
struct Outliers {
  at::Tensor idx, keep;
  int64_t n_o = 0;
  const float* keep_ptr() const { return keep.defined() ? keep.const_data_ptr<float>() : nullptr; }
  const int64_t* idx_ptr() const { return idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr; }
};

Outliers check_outliers(const char* op, const c10::optional<at::Tensor>& outliers, int64_t n) {
  Outliers o;
  if (!outliers.has_value()) return o;
  TORCH_CHECK_TYPE(outliers->scalar_type() == at::kLong, op, ": outliers must be int64, got ",
                   outliers->scalar_type());
  TORCH_CHECK_VALUE(outliers->dim() == 1, op, ": outliers must be 1-D (n_o,), got shape ", outliers->sizes());
  check_cpu(*outliers, op, "outliers");
  o.idx = outliers->contiguous();
  o.n_o = o.idx.size(0);
  const int64_t* ip = o.idx.const_data_ptr<int64_t>();
  o.keep = at::ones({n}, o.idx.options().dtype(at::kFloat));
  float* kp = o.keep.mutable_data_ptr<float>();
  for (int64_t t = 0; t < o.n_o; ++t) {
    TORCH_CHECK_VALUE(ip[t] >= 0 && ip[t] < n, op, ": outliers must be channel indices in [0, ", n, "), got ", ip[t]);
    kp[ip[t]] = 0.f;
  }
  return o;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8_cpu(const at::Tensor& x_in,
                                                          const c10::optional<at::Tensor>& outliers) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "quantize_rows_int8: x must be float32, got ",
                   x_in.scalar_type());
  check_cpu(x_in, "quantize_rows_int8", "x");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.numel() > 0, "quantize_rows_int8: x must be a non-empty 2-D (M, K) "
                    "tensor, got shape ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const Outliers o = check_outliers("quantize_rows_int8", outliers, K);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* kp = o.keep_ptr();
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) quantize_row(xp + m * K, kp, nullptr, 0, qp + m * K, sp + m, nullptr, K);
  });
  return {q, scale};
}

namespace {

// Checks shared by the epilogues; returns the activation code and contiguous operands.
struct EpilogueArgs {
  int act;
  int64_t M, N, n_o = 0;
  at::Tensor acc, xs, ws, b, r, xo, wo;  // xo (M, n_o) / wo (n_o, N): the outlier channels' float32 product
  // z row = xo[m] @ wo into `scratch` (N floats), or nullptr without outlier channels
  const float* outlier_row(int64_t m, float* scratch) const {
    if (!xo.defined()) return nullptr;
    row_outlier_product(xo.const_data_ptr<float>() + m * n_o, wo.const_data_ptr<float>(), n_o, scratch, N);
    return scratch;
  }
};

// The checks of everything but the int32 product, for an (M, N) output.
EpilogueArgs check_epilogue_mn(const char* op, int64_t M, int64_t N, const at::Tensor& xs_in,
                               const at::Tensor& ws_in, const c10::optional<at::Tensor>& bias,
                               c10::string_view activation, const c10::optional<at::Tensor>& residual,
                               const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& w_out) {
  EpilogueArgs a;
  a.act = parse_act(activation);
  a.M = M;
  a.N = N;
  TORCH_CHECK_TYPE(xs_in.scalar_type() == at::kFloat, op, ": x_scale must be float32, got ", xs_in.scalar_type());
  TORCH_CHECK_VALUE(xs_in.dim() == 1 && xs_in.size(0) == a.M, op, ": x_scale must have shape (", a.M, ",), got ",
                    xs_in.sizes());
  TORCH_CHECK_TYPE(ws_in.scalar_type() == at::kFloat, op, ": w_scale must be float32, got ", ws_in.scalar_type());
  TORCH_CHECK_VALUE(ws_in.dim() == 1 && ws_in.size(0) == a.N, op, ": w_scale must have shape (", a.N, ",), got ",
                    ws_in.sizes());
  check_cpu(xs_in, op, "x_scale");
  check_cpu(ws_in, op, "w_scale");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == a.N, op, ": bias must have shape (", a.N, ",), got ",
                      bias->sizes());
    check_cpu(*bias, op, "bias");
    a.b = bias->contiguous();
  }
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == at::kFloat, op, ": residual must be float32, got ",
                     residual->scalar_type());
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(0) == a.M && residual->size(1) == a.N, op,
                      ": residual must have shape (", a.M, ", ", a.N, "), got ", residual->sizes());
    check_cpu(*residual, op, "residual");
    a.r = residual->contiguous();
  }
  TORCH_CHECK_VALUE(x_out.has_value() == w_out.has_value(), op, ": x_out and w_out go together (both or neither)");
  if (x_out.has_value()) {
    TORCH_CHECK_TYPE(x_out->scalar_type() == at::kFloat && w_out->scalar_type() == at::kFloat, op,
                     ": x_out and w_out must be float32, got ", x_out->scalar_type(), " and ", w_out->scalar_type());
    TORCH_CHECK_VALUE(x_out->dim() == 2 && x_out->size(0) == a.M, op, ": x_out must have shape (", a.M,
                      ", n_o), got ", x_out->sizes());
    a.n_o = x_out->size(1);
    TORCH_CHECK_VALUE(w_out->dim() == 2 && w_out->size(0) == a.n_o && w_out->size(1) == a.N, op,
                      ": w_out must have shape (", a.n_o, ", ", a.N, "), got ", w_out->sizes());
    check_cpu(*x_out, op, "x_out");
    check_cpu(*w_out, op, "w_out");
    a.xo = x_out->contiguous();
    a.wo = w_out->contiguous();
  }
  a.xs = xs_in.contiguous();
  a.ws = ws_in.contiguous();
  return a;
}

EpilogueArgs check_epilogue(const char* op, const at::Tensor& acc_in, const at::Tensor& xs_in,
                            const at::Tensor& ws_in, const c10::optional<at::Tensor>& bias,
                            c10::string_view activation, const c10::optional<at::Tensor>& residual,
                            const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& w_out) {
  TORCH_CHECK_TYPE(acc_in.scalar_type() == at::kInt, op, ": acc must be int32, got ", acc_in.scalar_type());
  TORCH_CHECK_VALUE(acc_in.dim() == 2 && acc_in.numel() > 0, op, ": acc must be a non-empty 2-D (M, N) tensor, "
                    "got shape ", acc_in.sizes());
  check_cpu(acc_in, op, "acc");
  EpilogueArgs a =
      check_epilogue_mn(op, acc_in.size(0), acc_in.size(1), xs_in, ws_in, bias, activation, residual, x_out, w_out);
  a.acc = acc_in.contiguous();
  return a;
}

RowFn pick(const EpilogueArgs& a) {
  return a.act == 0 ? pick_row<0>(a.b.defined(), a.r.defined())
       : a.act == 1 ? pick_row<1>(a.b.defined(), a.r.defined())
                    : pick_row<2>(a.b.defined(), a.r.defined());
}

// Where an epilogue's int32 rows come from: an (M, N) product in memory (torch._int_mm's or
// int8_gemm_avx2's output: `acc`), or the AVX-512 VNNI GEMM of xq (M, K) int8 and the weight's quad
// panels, made block by block (int8_gemm_vnni.cpp) so each block's rows reach the epilogue from L2.
struct AccRows {
  const int32_t* acc = nullptr;
  const int8_t* xq = nullptr;
  int64_t lda = 0, K = 0;
  const uint8_t* quads = nullptr;
};

AccRows rows_of(const at::Tensor& acc) {
  AccRows s;
  s.acc = acc.const_data_ptr<int32_t>();
  return s;
}

AccRows rows_of(const at::Tensor& xq, const at::Tensor& quads) {
  AccRows s;
  s.xq = xq.const_data_ptr<int8_t>();
  s.lda = xq.stride(0);
  s.K = xq.size(1);
  s.quads = quads.const_data_ptr<uint8_t>();
  return s;
}

// f(m, acc row m (N int32), scratch of `scratch_n` floats) for every row m < M, rows in parallel.
template <class F>
void for_each_row(const AccRows& s, int64_t M, int64_t N, int64_t scratch_n, const F& f) {
  if (s.acc != nullptr) {
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
      std::vector<float> sc(scratch_n);
      for (int64_t m = r0; m < r1; ++m) f(m, s.acc + m * N, sc.data());
    });
    return;
  }
  cpu::int8_gemm_vnni_rows(s.xq, s.lda, M, s.K, s.quads, N, [&](int64_t m0, int64_t mb, const int32_t* c, int64_t ldc) {
    std::vector<float> sc(scratch_n);
    for (int64_t i = 0; i < mb; ++i) f(m0 + i, c + i * ldc, sc.data());
  });
}

// y (M, N) = the epilogue of every row; y may be the acc tensor's own storage (each row is made in
// scratch before its slot is written).
void epilogue_rows(const EpilogueArgs& a, const AccRows& src, float* yp) {
  const int64_t N = a.N;
  const RowFn fn = pick(a);
  const float* xsp = a.xs.const_data_ptr<float>();
  const float* wsp = a.ws.const_data_ptr<float>();
  const float* bp = a.b.defined() ? a.b.const_data_ptr<float>() : nullptr;
  const float* rp = a.r.defined() ? a.r.const_data_ptr<float>() : nullptr;
  // y over acc's own storage: each row made in scratch first (the row functions take __restrict
  // pointers); into a separate y (the out-of-place and fused ops) straight to its row
  const bool in_place = static_cast<const void*>(src.acc) == static_cast<const void*>(yp);
  for_each_row(src, a.M, N, 2 * N, [&](int64_t m, const int32_t* am, float* row) {
    // the result row (scratch in place), then the outlier product's
    float* out = in_place ? row : yp + m * N;
    fn(am, xsp[m], wsp, bp, rp != nullptr ? rp + m * N : nullptr, a.outlier_row(m, row + N), out, N);
    if (in_place) std::copy(row, row + N, yp + m * N);
  });
}

// The epilogue (no residual), then each row quantized per token into q / scale (and its outlier
// channels into yop), through a scratch row.
void epilogue_quant_rows(const EpilogueArgs& a, const Outliers& o, const AccRows& src, int8_t* qp, float* sp,
                         float* yop) {
  const int64_t N = a.N;
  const RowFn fn = pick(a);
  const float* xsp = a.xs.const_data_ptr<float>();
  const float* wsp = a.ws.const_data_ptr<float>();
  const float* bp = a.b.defined() ? a.b.const_data_ptr<float>() : nullptr;
  const float* kp = o.keep_ptr();
  const int64_t* ip = o.idx_ptr();
  // one output row, L1/L2 resident between the passes, and the outlier product's
  for_each_row(src, a.M, N, 2 * N, [&](int64_t m, const int32_t* am, float* row) {
    fn(am, xsp[m], wsp, bp, nullptr, a.outlier_row(m, row + N), row, N);
    quantize_row(row, kp, ip, o.n_o, qp + m * N, sp + m, yop + m * o.n_o, N);
  });
}

}  // namespace

at::Tensor int8_linear_epilogue_cpu(const at::Tensor& acc_in, const at::Tensor& xs_in, const at::Tensor& ws_in,
                                    const c10::optional<at::Tensor>& bias, c10::string_view activation,
                                    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& x_out,
                                    const c10::optional<at::Tensor>& w_out) {
  const EpilogueArgs a =
      check_epilogue("int8_linear_epilogue", acc_in, xs_in, ws_in, bias, activation, residual, x_out, w_out);
  at::Tensor y = at::empty({a.M, a.N}, a.acc.options().dtype(at::kFloat));
  epilogue_rows(a, rows_of(a.acc), y.mutable_data_ptr<float>());
  return y;
}

// In place: acc's storage receives the float32 result (same element size), read as
// acc.view(torch.float32). Each row goes through a scratch row, so no element is read after its
// slot is overwritten.
void int8_linear_epilogue_inplace_cpu(at::Tensor& acc, const at::Tensor& xs_in, const at::Tensor& ws_in,
                                      const c10::optional<at::Tensor>& bias, c10::string_view activation,
                                      const c10::optional<at::Tensor>& residual,
                                      const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& w_out) {
  const char* op = "int8_linear_epilogue_";
  const EpilogueArgs a = check_epilogue(op, acc, xs_in, ws_in, bias, activation, residual, x_out, w_out);
  TORCH_CHECK_VALUE(acc.is_contiguous(), op, ": acc must be contiguous (it is overwritten in place)");
  void* base = acc.mutable_data_ptr();
  epilogue_rows(a, rows_of(acc), static_cast<float*>(base));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_epilogue_quant_cpu(
    const at::Tensor& acc_in, const at::Tensor& xs_in, const at::Tensor& ws_in, const c10::optional<at::Tensor>& bias,
    c10::string_view activation, const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& w_out,
    const c10::optional<at::Tensor>& outliers) {
  const char* op = "int8_linear_epilogue_quant";
  const EpilogueArgs a = check_epilogue(op, acc_in, xs_in, ws_in, bias, activation, c10::nullopt, x_out, w_out);
  const Outliers o = check_outliers(op, outliers, a.N);
  at::Tensor q = at::empty({a.M, a.N}, a.acc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({a.M}, a.acc.options().dtype(at::kFloat));
  at::Tensor y_out = at::empty({a.M, o.n_o}, a.acc.options().dtype(at::kFloat));
  epilogue_quant_rows(a, o, rows_of(a.acc), q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
                      y_out.mutable_data_ptr<float>());
  return {q, scale, y_out};
}

namespace {

// y = LN((acc * x_scale * w_scale + bias) + residual) * ln_weight + ln_bias row by row, then y
// quantized per token into q / scale. y may be acc's own storage (each acc row is read into a
// scratch row before its y row is written).
void epilogue_ln_quant(const EpilogueArgs& a, const Outliers& o, const at::Tensor& lw, const at::Tensor& lb, float eps,
                       const AccRows& src, float* yp, int8_t* qp, float* sp, float* yop) {
  const int64_t N = a.N;
  const RowFn fn = pick_row<0>(a.b.defined(), false);  // the residual joins in the LayerNorm row
  const float* xsp = a.xs.const_data_ptr<float>();
  const float* wsp = a.ws.const_data_ptr<float>();
  const float* bp = a.b.defined() ? a.b.const_data_ptr<float>() : nullptr;
  const float* rp = a.r.const_data_ptr<float>();
  const float* lwp = lw.const_data_ptr<float>();
  const float* lbp = lb.const_data_ptr<float>();
  const float* kp = o.keep_ptr();
  const int64_t* ip = o.idx_ptr();
  // the epilogue's row and LayerNorm's (or the outlier product's) scratch row
  for_each_row(src, a.M, N, 2 * N, [&](int64_t m, const int32_t* am, float* row) {
    float* ym = yp + m * N;
    // acc * x_scale * w_scale (+ outlier product) + bias
    fn(am, xsp[m], wsp, bp, nullptr, a.outlier_row(m, row + N), row, N);
    cpu::add_layer_norm_row(row, rp + m * N, lwp, lbp, ym, row + N, N, eps);  // LN(. + residual)
    quantize_row(ym, kp, ip, o.n_o, qp + m * N, sp + m, yop + m * o.n_o, N);
  });
}

EpilogueArgs check_ln(const char* op, EpilogueArgs a, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                      double eps) {
  const std::pair<const char*, const at::Tensor*> ln[] = {{"ln_weight", &ln_weight}, {"ln_bias", &ln_bias}};
  for (const auto& [name, t] : ln) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == a.N, op, ": ", name, " must have shape (", a.N, ",), got ",
                      t->sizes());
    check_cpu(*t, op, name);
  }
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be positive, got ", eps);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_epilogue_ln_quant_inplace_cpu(
    at::Tensor& acc, const at::Tensor& xs, const at::Tensor& ws, const c10::optional<at::Tensor>& bias,
    const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
    const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& w_out,
    const c10::optional<at::Tensor>& outliers) {
  const char* op = "int8_linear_epilogue_ln_quant_";
  const EpilogueArgs a =
      check_ln(op, check_epilogue(op, acc, xs, ws, bias, "none", residual, x_out, w_out), ln_weight, ln_bias, eps);
  TORCH_CHECK_VALUE(acc.is_contiguous(), op, ": acc must be contiguous (it is overwritten in place)");
  const Outliers o = check_outliers(op, outliers, a.N);
  at::Tensor q = at::empty({a.M, a.N}, acc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({a.M}, acc.options().dtype(at::kFloat));
  at::Tensor h_out = at::empty({a.M, o.n_o}, acc.options().dtype(at::kFloat));
  void* base = acc.mutable_data_ptr();
  epilogue_ln_quant(a, o, ln_weight.contiguous(), ln_bias.contiguous(), static_cast<float>(eps), rows_of(acc),
                    static_cast<float*>(base), q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
                    h_out.mutable_data_ptr<float>());
  return {q, scale, h_out};
}

// The fused ops: the same epilogues on the AVX-512 VNNI GEMM of xq (M, K) int8 and the weight's quad
// panels (fastlm.linear.pack_int8_quads; int8_gemm_vnni.cpp), block by block.
at::Tensor int8_linear_vnni_cpu(const at::Tensor& xq, const at::Tensor& quads, int64_t n, const at::Tensor& xs,
                                const at::Tensor& ws, const c10::optional<at::Tensor>& bias,
                                c10::string_view activation, const c10::optional<at::Tensor>& residual,
                                const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& w_out) {
  const char* op = "int8_linear_vnni";
  cpu::check_vnni_operands(op, xq, quads, n);
  const EpilogueArgs a = check_epilogue_mn(op, xq.size(0), n, xs, ws, bias, activation, residual, x_out, w_out);
  at::Tensor y = at::empty({a.M, a.N}, xs.options());
  epilogue_rows(a, rows_of(xq, quads), y.mutable_data_ptr<float>());
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_vnni_quant_cpu(
    const at::Tensor& xq, const at::Tensor& quads, int64_t n, const at::Tensor& xs, const at::Tensor& ws,
    const c10::optional<at::Tensor>& bias, c10::string_view activation, const c10::optional<at::Tensor>& x_out,
    const c10::optional<at::Tensor>& w_out, const c10::optional<at::Tensor>& outliers) {
  const char* op = "int8_linear_vnni_quant";
  cpu::check_vnni_operands(op, xq, quads, n);
  const EpilogueArgs a = check_epilogue_mn(op, xq.size(0), n, xs, ws, bias, activation, c10::nullopt, x_out, w_out);
  const Outliers o = check_outliers(op, outliers, a.N);
  at::Tensor q = at::empty({a.M, a.N}, xq.options());
  at::Tensor scale = at::empty({a.M}, xs.options());
  at::Tensor y_out = at::empty({a.M, o.n_o}, xs.options());
  epilogue_quant_rows(a, o, rows_of(xq, quads), q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
                      y_out.mutable_data_ptr<float>());
  return {q, scale, y_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_linear_vnni_ln_quant_cpu(
    const at::Tensor& xq, const at::Tensor& quads, int64_t n, const at::Tensor& xs, const at::Tensor& ws,
    const c10::optional<at::Tensor>& bias, const at::Tensor& residual, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double eps, const c10::optional<at::Tensor>& x_out,
    const c10::optional<at::Tensor>& w_out, const c10::optional<at::Tensor>& outliers) {
  const char* op = "int8_linear_vnni_ln_quant";
  cpu::check_vnni_operands(op, xq, quads, n);
  const EpilogueArgs a = check_ln(
      op, check_epilogue_mn(op, xq.size(0), n, xs, ws, bias, "none", residual, x_out, w_out), ln_weight, ln_bias, eps);
  const Outliers o = check_outliers(op, outliers, a.N);
  at::Tensor h = at::empty({a.M, a.N}, xs.options());
  at::Tensor q = at::empty({a.M, a.N}, xq.options());
  at::Tensor scale = at::empty({a.M}, xs.options());
  at::Tensor h_out = at::empty({a.M, o.n_o}, xs.options());
  epilogue_ln_quant(a, o, ln_weight.contiguous(), ln_bias.contiguous(), static_cast<float>(eps), rows_of(xq, quads),
                    h.mutable_data_ptr<float>(), q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
                    h_out.mutable_data_ptr<float>());
  return {h, q, scale, h_out};
}

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("quantize_rows_int8(Tensor x, Tensor? outliers=None) -> (Tensor, Tensor)");
  m.def("int8_linear_epilogue(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias=None, str activation='none', "
        "Tensor? residual=None, Tensor? x_out=None, Tensor? w_out=None) -> Tensor");
  m.def("int8_linear_epilogue_quant(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias=None, "
        "str activation='none', Tensor? x_out=None, Tensor? w_out=None, Tensor? outliers=None) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("int8_linear_epilogue_(Tensor(a!) acc, Tensor x_scale, Tensor w_scale, Tensor? bias=None, "
        "str activation='none', Tensor? residual=None, Tensor? x_out=None, Tensor? w_out=None) -> ()");
  m.def("int8_linear_epilogue_ln_quant_(Tensor(a!) acc, Tensor x_scale, Tensor w_scale, Tensor? bias, "
        "Tensor residual, Tensor ln_weight, Tensor ln_bias, float eps, Tensor? x_out=None, Tensor? w_out=None, "
        "Tensor? outliers=None) -> (Tensor, Tensor, Tensor)");
  m.def("int8_linear_vnni(Tensor xq, Tensor quads, int n, Tensor x_scale, Tensor w_scale, Tensor? bias=None, "
        "str activation='none', Tensor? residual=None, Tensor? x_out=None, Tensor? w_out=None) -> Tensor");
  m.def("int8_linear_vnni_quant(Tensor xq, Tensor quads, int n, Tensor x_scale, Tensor w_scale, Tensor? bias=None, "
        "str activation='none', Tensor? x_out=None, Tensor? w_out=None, Tensor? outliers=None) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("int8_linear_vnni_ln_quant(Tensor xq, Tensor quads, int n, Tensor x_scale, Tensor w_scale, Tensor? bias, "
        "Tensor residual, Tensor ln_weight, Tensor ln_bias, float eps, Tensor? x_out=None, Tensor? w_out=None, "
        "Tensor? outliers=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("quantize_rows_int8", &quantize_rows_int8_cpu);
  m.impl("int8_linear_epilogue", &int8_linear_epilogue_cpu);
  m.impl("int8_linear_epilogue_quant", &int8_linear_epilogue_quant_cpu);
  m.impl("int8_linear_epilogue_", &int8_linear_epilogue_inplace_cpu);
  m.impl("int8_linear_epilogue_ln_quant_", &int8_linear_epilogue_ln_quant_inplace_cpu);
  m.impl("int8_linear_vnni", &int8_linear_vnni_cpu);
  m.impl("int8_linear_vnni_quant", &int8_linear_vnni_quant_cpu);
  m.impl("int8_linear_vnni_ln_quant", &int8_linear_vnni_ln_quant_cpu);
}

}  // namespace fastlm
