// FFN ops, torch side: input checks (each naming the argument), the CPU kernels,
// and the CPU / CUDA registrations. The CUDA kernels are plain CUDA in cuda/ffn.cu.
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "ffn.h"
#include "fast_math.h"
#include "linear_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#ifdef FASTLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/ffn_cuda.h"
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTLM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLM_CPU_CLONES
#endif

namespace fastlm {
namespace {

bool parse_approximate(c10::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh",
                    "bias_gelu: approximate must be \"none\" or \"tanh\", got \"", approximate, "\"");
  return approximate == "tanh";
}

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dt);
}

void check_bias_gelu(const at::Tensor& x, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(x.defined(), "bias_gelu: x is undefined");
  TORCH_CHECK_VALUE(bias.defined(), "bias_gelu: bias is undefined");
  check_float_dtype(x, "bias_gelu", "x");
  TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), "bias_gelu: bias dtype ", bias.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(bias.device() == x.device(), "bias_gelu: bias is on ", bias.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "bias_gelu: x must have at least 1 dim, got a scalar");
  TORCH_CHECK_VALUE(x.numel() > 0, "bias_gelu: x is empty (shape ", x.sizes(), ")");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(-1), "bias_gelu: bias must have shape (",
                    x.size(-1), ",) to match the last dim of x, got ", bias.sizes());
}

// GELU on the branch-free rational erf / tanh of fast_math.h, so gcc vectorises the loops below at
// -O3 (std::erf / std::tanh are scalar libm calls and ran ~20x slower than torch here).
using fm::gelu_erf;
using fm::gelu_tanh;

// gelu(x + bias) over `n` floats; a plain loop gcc vectorises, cloned for AVX-512,
// AVX2+FMA and baseline x86-64 and picked at load time (the extension is built once
// for all x86-64 machines, so it cannot assume -mavx2).
template <bool kTanh>
FASTLM_CPU_CLONES void bias_gelu_row(const float* x, const float* bias, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = kTanh ? gelu_tanh(x[j] + bias[j]) : gelu_erf(x[j] + bias[j]);
}

template <typename T>
void bias_gelu_cpu_impl(const T* x, const T* bias, T* y, int64_t rows, int64_t n, bool tanh_approx) {
  constexpr int64_t kChunk = 512;  // half/bf16 go through float buffers of this size
  std::vector<float> bias_f(n);
  for (int64_t j = 0; j < n; ++j) bias_f[j] = static_cast<float>(bias[j]);
  const int64_t grain = std::max<int64_t>(1, 32768 / n);  // tasks of >= ~32k elements
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    float xin[kChunk], yout[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < n; c += kChunk) {
        const int64_t len = std::min(kChunk, n - c);
        const T* xs = x + r * n + c;
        T* ys = y + r * n + c;
        if constexpr (std::is_same_v<T, float>) {
          if (tanh_approx) bias_gelu_row<true>(xs, bias_f.data() + c, ys, len);
          else bias_gelu_row<false>(xs, bias_f.data() + c, ys, len);
        } else {
          for (int64_t j = 0; j < len; ++j) xin[j] = static_cast<float>(xs[j]);
          if (tanh_approx) bias_gelu_row<true>(xin, bias_f.data() + c, yout, len);
          else bias_gelu_row<false>(xin, bias_f.data() + c, yout, len);
          for (int64_t j = 0; j < len; ++j) ys[j] = static_cast<T>(yout[j]);
        }
      }
    }
  });
}

at::Tensor bias_gelu_cpu(const at::Tensor& x_in, const at::Tensor& bias_in, c10::string_view approximate) {
  const bool tanh_approx = parse_approximate(approximate);
  check_bias_gelu(x_in, bias_in);
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "bias_gelu (CPU): x must be a CPU tensor, got ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_cpu", [&] {
    bias_gelu_cpu_impl<scalar_t>(x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                                 y.mutable_data_ptr<scalar_t>(), rows, n, tanh_approx);
  });
  return y;
}

// ---- FFN -----------------------------------------------------------------------------------

int parse_activation(c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "gelu" || activation == "gelu_tanh",
                    "ffn: activation must be \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  return activation == "gelu" ? 1 : 2;
}

void check_ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, const c10::optional<at::Tensor>& residual) {
  check_float_dtype(x, "ffn", "x");
  const std::pair<const char*, const at::Tensor*> others[] = {{"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->defined(), "ffn: ", name, " is undefined");
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "ffn: ", name, " has dtype ", t->scalar_type(),
                     " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "ffn: ", name, " is on ", t->device(), " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0, "ffn: x is empty (shape ", x.sizes(), ")");
  const int64_t d_model = x.size(-1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == d_model, "ffn: w1 must have shape (d_ff, ", d_model,
                    ") with d_model = x.shape[-1], got ", w1.sizes());
  const int64_t d_ff = w1.size(0);
  TORCH_CHECK_VALUE(b1.dim() == 1 && b1.size(0) == d_ff, "ffn: b1 must have shape (", d_ff, ",), got ", b1.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == d_model && w2.size(1) == d_ff, "ffn: w2 must have shape (",
                    d_model, ", ", d_ff, "), got ", w2.sizes());
  TORCH_CHECK_VALUE(b2.dim() == 1 && b2.size(0) == d_model, "ffn: b2 must have shape (", d_model, ",), got ",
                    b2.sizes());
  // row-major as nn.Linear stores it, or its transpose (the CPU layout, see fastlm.models.common)
  TORCH_CHECK_VALUE(w1.is_contiguous() || w1.t().is_contiguous(), "ffn: w1 must be contiguous (or its transpose), got strides ",
                    w1.strides());
  TORCH_CHECK_VALUE(w2.is_contiguous() || w2.t().is_contiguous(), "ffn: w2 must be contiguous (or its transpose), got strides ",
                    w2.strides());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK_TYPE(r.scalar_type() == x.scalar_type(), "ffn: residual has dtype ", r.scalar_type(),
                     " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(r.device() == x.device(), "ffn: residual is on ", r.device(), " but x is on ", x.device());
    TORCH_CHECK_VALUE(r.sizes() == x.sizes(), "ffn: residual must have the shape of x ", x.sizes(), ", got ",
                      r.sizes());
  }
}

at::Tensor ffn_cpu(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                   const at::Tensor& b2, c10::string_view activation, const c10::optional<at::Tensor>& residual) {
  const int act = parse_activation(activation);
  check_ffn(x_in, w1, b1, w2, b2, residual);
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "ffn (CPU): x must be a CPU tensor, got ", x_in.device());
  const int64_t d_model = x_in.size(-1);
  const at::Tensor x = x_in.reshape({-1, d_model});
  if (onednn_linear_ok(x, w1) && w2.is_contiguous()) {
    // prefill / encoder rows: oneDNN GEMMs with bias+GELU, then bias (+ residual), fused into their
    // output passes (see linear_cpu.cpp); erf / tanh as exact as torch's (model parity at 1e-4).
    const at::Tensor xc = x.contiguous();
    at::Tensor h = onednn_linear(xc, w1, b1, "gelu", act == 2 ? "tanh" : "none");  // (M, d_ff)
    at::Tensor y = residual.has_value() ? onednn_linear_add(h, w2, b2, residual->reshape({-1, d_model}))
                                        : onednn_linear(h, w2, b2, "none", "");
    return y.view(x_in.sizes());
  }
  // GEMM with the bias in its beta term, then ATen's vectorised in-place GELU: one pass over the
  // d_ff activation, and erf/tanh as exact as torch's (the model parity tests need 1e-4 in fp32).
  at::Tensor h = at::addmm(b1, x, w1.t());  // (M, d_ff)
  at::gelu_(h, act == 2 ? "tanh" : "none");
  at::Tensor y = residual.has_value() ? at::addmm(residual->reshape({-1, d_model}), h, w2.t()).add_(b2)
                                      : at::addmm(b2, h, w2.t());
  return y.view(x_in.sizes());
}

// ---- LayerNorm (optionally after a residual add) -----------------------------------------

void check_layer_norm(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                      const at::Tensor* r) {
  check_float_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0, op, ": x is empty (shape ", x.sizes(), ")");
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == n, op, ": weight must have shape (", n, ",), got ", w.sizes());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n, op, ": bias must have shape (", n, ",), got ", b.sizes());
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be positive, got ", eps);
  const std::pair<const char*, const at::Tensor*> others[] = {{"weight", &w}, {"bias", &b}, {"residual", r}};
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  }
  if (r != nullptr)
    TORCH_CHECK_VALUE(r->sizes() == x.sizes(), op, ": residual must have the shape of x ", x.sizes(), ", got ", r->sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, " (CPU): x must be a CPU tensor, got ", x.device());
}

// Reductions with 16 independent lanes: gcc vectorises them without reassociating a single
// accumulator (no -ffast-math), and the result does not depend on the vector width.
FASTLM_CPU_CLONES float lane_sum(const float* v, int64_t n) {
  float acc[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += v[j + l];
  float total = 0.f;
  for (int l = 0; l < 16; ++l) total += acc[l];
  for (; j < n; ++j) total += v[j];
  return total;
}

FASTLM_CPU_CLONES float lane_sq_dev(const float* v, int64_t n, float mean) {
  float acc[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += (v[j + l] - mean) * (v[j + l] - mean);
  float total = 0.f;
  for (int l = 0; l < 16; ++l) total += acc[l];
  for (; j < n; ++j) total += (v[j] - mean) * (v[j] - mean);
  return total;
}

// One row: v = x (+ r) in fp32 (s = v written out), then (v - mean) * rstd * w + b. Cloned per
// ISA like the GELU loops; `v` is a per-thread scratch row.
template <typename T>
FASTLM_CPU_CLONES void layer_norm_row(const T* x, const T* r, const float* w, const float* b, T* y, T* s, float* v,
                                      int64_t n, float eps) {
  for (int64_t j = 0; j < n; ++j) v[j] = static_cast<float>(x[j]);
  if (r != nullptr) {  // x + residual, in fp32, also written out (the next residual stream) unless s is null
    for (int64_t j = 0; j < n; ++j) v[j] += static_cast<float>(r[j]);
    if (s != nullptr)
      for (int64_t j = 0; j < n; ++j) s[j] = static_cast<T>(v[j]);
  }
  const float mean = lane_sum(v, n) / static_cast<float>(n);
  const float rstd = 1.0f / std::sqrt(lane_sq_dev(v, n, mean) / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>((v[j] - mean) * rstd * w[j] + b[j]);
}

template <typename T>
void layer_norm_cpu_impl(const T* x, const T* r, const T* w, const T* b, T* y, T* s, int64_t rows, int64_t n,
                         float eps) {
  std::vector<float> wf(n), bf(n);
  for (int64_t j = 0; j < n; ++j) {
    wf[j] = static_cast<float>(w[j]);
    bf[j] = static_cast<float>(b[j]);
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  auto body = [&](int64_t r0, int64_t r1) {
    std::vector<float> v(n);
    for (int64_t i = r0; i < r1; ++i) {
      layer_norm_row<T>(x + i * n, r != nullptr ? r + i * n : nullptr, wf.data(), bf.data(), y + i * n,
                        s != nullptr ? s + i * n : nullptr, v.data(), n, eps);
    }
  };
  if (pool_rows_scope()) {  // between pool-run GEMMs (a GPT-2 prefill): no OpenMP region, see cpu_pool.h
    SharePool::get().run((rows + grain - 1) / grain,
                         [&](int64_t c) { body(c * grain, std::min(rows, (c + 1) * grain)); });
  } else {
    at::parallel_for(0, rows, grain, body);
  }
}

std::tuple<at::Tensor, at::Tensor> layer_norm_cpu_common(const at::Tensor& x_in, const at::Tensor* r_in,
                                                         const at::Tensor& w, const at::Tensor& b, double eps) {
  const int64_t n = x_in.size(-1);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor r = r_in != nullptr ? r_in->contiguous() : at::Tensor();
  const at::Tensor wc = w.contiguous(), bc = b.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor s = r_in != nullptr ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_cpu", [&] {
    layer_norm_cpu_impl<scalar_t>(x.const_data_ptr<scalar_t>(),
                                  r_in != nullptr ? r.const_data_ptr<scalar_t>() : nullptr,
                                  wc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                  y.mutable_data_ptr<scalar_t>(),
                                  r_in != nullptr ? s.mutable_data_ptr<scalar_t>() : nullptr, x.numel() / n, n,
                                  static_cast<float>(eps));
  });
  return {y, s};
}

at::Tensor layer_norm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  check_layer_norm("layer_norm", x, w, b, eps, nullptr);
  return std::get<0>(layer_norm_cpu_common(x, nullptr, w, b, eps));
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& w, const at::Tensor& b, double eps) {
  check_layer_norm("add_layer_norm", x, w, b, eps, &residual);
  return layer_norm_cpu_common(x, &residual, w, b, eps);
}

#ifdef FASTLM_WITH_CUDA
cuda::DType to_cuda_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dt);
  }
}

at::Tensor bias_gelu_cuda(const at::Tensor& x_in, const at::Tensor& bias_in, c10::string_view approximate) {
  const bool tanh_approx = parse_approximate(approximate);
  check_bias_gelu(x_in, bias_in);
  TORCH_CHECK_VALUE(x_in.is_cuda(), "bias_gelu (CUDA): x must be a CUDA tensor, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const cudaError_t err = cuda::bias_gelu(x.const_data_ptr(), bias.const_data_ptr(), y.mutable_data_ptr(),
                                          x.numel() / n, n, to_cuda_dtype(x.scalar_type()), tanh_approx,
                                          c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "bias_gelu: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

// Decode rows (M <= 16): two GEMV launches, bias+GELU fused into the first, bias+residual into
// the second; weights streamed once. More rows: cuBLAS GEMMs via ATen + our bias_gelu epilogue
// (fastlm.ops sends prefill to the Triton GEMM with fused epilogues instead).
at::Tensor ffn_cuda(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, c10::string_view activation, const c10::optional<at::Tensor>& residual) {
  const int act = parse_activation(activation);
  check_ffn(x_in, w1, b1, w2, b2, residual);
  TORCH_CHECK_VALUE(x_in.is_cuda(), "ffn (CUDA): x must be a CUDA tensor, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t d_model = x_in.size(-1), d_ff = w1.size(0);
  const at::Tensor x = x_in.reshape({-1, d_model}).contiguous();
  const int64_t M = x.size(0);
  if (M > cuda::kGemvMaxRows || !w1.is_contiguous() || !w2.is_contiguous()) {  // GEMMs (any layout)
    at::Tensor h = at::mm(x, w1.t());
    h = bias_gelu_cuda(h, b1, act == 2 ? "tanh" : "none");
    at::Tensor y = residual.has_value() ? at::addmm(residual->reshape({-1, d_model}), h, w2.t()).add_(b2)
                                        : at::addmm(b2, h, w2.t());
    return y.view(x_in.sizes());
  }
  const at::Tensor b1c = b1.contiguous(), b2c = b2.contiguous();
  const at::Tensor r = residual.has_value() ? residual->reshape({-1, d_model}).contiguous() : at::Tensor();
  at::Tensor h = at::empty({M, d_ff}, x.options());
  at::Tensor y = at::empty({M, d_model}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cuda::DType dt = to_cuda_dtype(x.scalar_type());
  cudaError_t err = cuda::gemv(x.const_data_ptr(), w1.const_data_ptr(), b1c.const_data_ptr(), nullptr,
                               h.mutable_data_ptr(), M, d_ff, d_model, act, dt, stream);
  TORCH_CHECK(err == cudaSuccess, "ffn: GEMV 1 launch failed: ", cudaGetErrorString(err));
  err = cuda::gemv(h.const_data_ptr(), w2.const_data_ptr(), b2c.const_data_ptr(),
                   residual.has_value() ? r.const_data_ptr() : nullptr, y.mutable_data_ptr(), M, d_model, d_ff, 0,
                   dt, stream);
  TORCH_CHECK(err == cudaSuccess, "ffn: GEMV 2 launch failed: ", cudaGetErrorString(err));
  return y.view(x_in.sizes());
}
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTLM_LN_X86 1
// add_layer_norm_row (int8_linear_epilogue_ln_quant_'s LayerNorm, one row at a time) with AVX-512 /
// AVX2 intrinsics, bit for bit layer_norm_row<float> as its x86-64-v4 / v3 clones compute it: v =
// x + r and lane_sum's 16 lanes (lane l adds v[l], v[16 + l], ... in order, then the lanes 0..15
// and the tail in order) in one pass instead of three, lane_sq_dev itself (the cloned function),
// then y = fma((v - mean) * rstd, w, b), the FMA the clones contract the last line into.
__attribute__((target("avx512f,avx2,fma"))) void add_layer_norm_row_512(const float* x, const float* r, const float* w,
                                                                        const float* b, float* y, float* v, int64_t n,
                                                                        float eps) {
  __m512 acc = _mm512_setzero_ps();
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = 0; j < n16; j += 16) {
    __m512 t = _mm512_loadu_ps(x + j);
    if (r != nullptr) t = _mm512_add_ps(t, _mm512_loadu_ps(r + j));
    _mm512_storeu_ps(v + j, t);
    acc = _mm512_add_ps(acc, t);
  }
  for (int64_t j = n16; j < n; ++j) v[j] = r != nullptr ? x[j] + r[j] : x[j];
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  float total = 0.f;
  for (int l = 0; l < 16; ++l) total += lanes[l];
  for (int64_t j = n16; j < n; ++j) total += v[j];
  const float mean = total / static_cast<float>(n);
  const float rstd = 1.0f / std::sqrt(lane_sq_dev(v, n, mean) / static_cast<float>(n) + eps);
  const __m512 mv = _mm512_set1_ps(mean), rv = _mm512_set1_ps(rstd);
  int64_t j = 0;
  for (; j < n16; j += 16)
    _mm512_storeu_ps(y + j, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(v + j), mv), rv),
                                            _mm512_loadu_ps(w + j), _mm512_loadu_ps(b + j)));
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(y + j, m, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + j), mv), rv),
                                                    _mm512_maskz_loadu_ps(m, w + j), _mm512_maskz_loadu_ps(m, b + j)));
  }
}

__attribute__((target("avx2,fma"))) void add_layer_norm_row_256(const float* x, const float* r, const float* w,
                                                               const float* b, float* y, float* v, int64_t n,
                                                               float eps) {
  __m256 lo = _mm256_setzero_ps(), hi = lo;  // lanes 0..7 and 8..15
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = 0; j < n16; j += 16) {
    __m256 a = _mm256_loadu_ps(x + j), c = _mm256_loadu_ps(x + j + 8);
    if (r != nullptr) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(r + j));
      c = _mm256_add_ps(c, _mm256_loadu_ps(r + j + 8));
    }
    _mm256_storeu_ps(v + j, a);
    _mm256_storeu_ps(v + j + 8, c);
    lo = _mm256_add_ps(lo, a);
    hi = _mm256_add_ps(hi, c);
  }
  for (int64_t j = n16; j < n; ++j) v[j] = r != nullptr ? x[j] + r[j] : x[j];
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  float total = 0.f;
  for (int l = 0; l < 16; ++l) total += lanes[l];
  for (int64_t j = n16; j < n; ++j) total += v[j];
  const float mean = total / static_cast<float>(n);
  const float rstd = 1.0f / std::sqrt(lane_sq_dev(v, n, mean) / static_cast<float>(n) + eps);
  const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + j), mv), rv),
                                            _mm256_loadu_ps(w + j), _mm256_loadu_ps(b + j)));
  for (; j < n; ++j) y[j] = std::fma((v[j] - mean) * rstd, w[j], b[j]);
}
#endif

}  // namespace

namespace cpu {
void layer_norm(const float* x, const float* r, const float* w, const float* b, float* y, float* s, int64_t rows,
                int64_t n, float eps) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < rows; ++i)
    layer_norm_row<float>(x + i * n, r != nullptr ? r + i * n : nullptr, w, b, y + i * n,
                          s != nullptr ? s + i * n : nullptr, v.data(), n, eps);
}

void add_layer_norm_row(const float* x, const float* r, const float* w, const float* b, float* y, float* v, int64_t n,
                        float eps) {
#ifdef FASTLM_LN_X86
  const int isa = isa_level();
  if (isa >= 2) return add_layer_norm_row_512(x, r, w, b, y, v, n, eps);
  if (isa == 1) return add_layer_norm_row_256(x, r, w, b, y, v, n, eps);
#endif
  layer_norm_row<float>(x, r, w, b, y, nullptr, v, n, eps);
}
}  // namespace cpu

at::Tensor ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, c10::string_view activation, const c10::optional<at::Tensor>& residual) {
#ifdef FASTLM_WITH_CUDA
  if (x.is_cuda()) return ffn_cuda(x, w1, b1, w2, b2, activation, residual);
#endif
  return ffn_cpu(x, w1, b1, w2, b2, activation, residual);
}

at::Tensor bias_gelu(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
#ifdef FASTLM_WITH_CUDA
  if (x.is_cuda()) return bias_gelu_cuda(x, bias, approximate);
#endif
  return bias_gelu_cpu(x, bias, approximate);
}

bool cuda_enabled() {
#ifdef FASTLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("ffn_ext", &ffn_cpu);
  m.impl("layer_norm_ext", &layer_norm_cpu);
  m.impl("add_layer_norm_ext", &add_layer_norm_cpu);
}

#ifdef FASTLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("ffn_ext", &ffn_cuda);
}
#endif

}  // namespace fastlm
