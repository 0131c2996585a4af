// FFN ops, torch side: input checks (each naming the argument), the CPU kernels,
// and the CPU / CUDA registrations. The CUDA kernels are plain CUDA in cuda/ffn.cu.
#include "ffn.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#ifdef FASTLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/ffn_cuda.h"
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

inline float gelu_erf(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f)); }
inline float gelu_tanh(float v) {
  const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
  return 0.5f * v * (1.0f + std::tanh(inner));
}

template <typename T>
void bias_gelu_cpu_impl(const T* x, const T* bias, T* y, int64_t rows, int64_t n, bool tanh_approx) {
  // One task per block of rows; the grain keeps each task above ~32k elements.
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* yr = y + r * n;
      if (tanh_approx) {
        for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>(gelu_tanh(float(xr[j]) + float(bias[j])));
      } else {
        for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>(gelu_erf(float(xr[j]) + float(bias[j])));
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
