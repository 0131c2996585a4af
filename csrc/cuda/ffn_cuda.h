// Plain-CUDA launchers of the FFN ops. No torch headers: the .cu side takes raw
// pointers, sizes and a stream, so nvcc compile-checks it on machines without a
// CUDA build of torch. Every launcher returns the CUDA status it saw.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastlm {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// y[r, j] = gelu(x[r, j] + bias[j]) for r < rows, j < n. `x`, `y` row-major and
// contiguous; `tanh_approx` picks the tanh formula (GPT-2) over erf (BERT).
cudaError_t bias_gelu(const void* x, const void* bias, void* y, int64_t rows, int64_t n,
                      DType dtype, bool tanh_approx, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
