// FFN ops, torch side: input checks (each naming the argument), the CPU kernels,
// and the CPU / CUDA registrations. The CUDA kernels are plain CUDA in cuda/ffn.cu.
#include "ffn.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

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

// Branch-free rational approximations (Eigen's fast erf / tanh for float), so gcc
// vectorises the loops below at -O3; std::erf / std::tanh are scalar libm calls and
// ran ~20x slower than torch here. Max abs error vs float64: erf 4.2e-7, tanh 4.0e-7;
// GELU built on them stays within 2x of torch's own float32 error (tests/test_extension.py).
inline float fast_erf(float x) {
  x = std::min(4.0f, std::max(-4.0f, x));
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

inline float fast_tanh(float x) {
  x = std::min(7.90531110763549805f, std::max(-7.90531110763549805f, x));
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

inline float gelu_erf(float v) { return 0.5f * v * (1.0f + fast_erf(v * 0.7071067811865476f)); }
inline float gelu_tanh(float v) {
  const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
  return 0.5f * v * (1.0f + fast_tanh(inner));
}

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
#endif

}  // namespace

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

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("bias_gelu", &bias_gelu_cpu); }

#ifdef FASTLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastlm, CUDA, m) { m.impl("bias_gelu", &bias_gelu_cuda); }
#endif

}  // namespace fastlm
