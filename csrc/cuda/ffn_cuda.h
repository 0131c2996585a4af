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

// Decode-sized linear layer (few rows): y[m, n] = act(sum_k x[m, k] w[n, k] + bias[n]) (+ r[m, n])
// for m < M <= kGemvMaxRows. x (M, K), w (N, K) row-major (nn.Linear), r and y (M, N);
// act 0 none, 1 GELU erf, 2 GELU tanh. Weights are streamed once with 16-byte loads; K is
// split across the warps of a block so that even N = d_model keeps every SM busy.
constexpr int kGemvMaxRows = 16;
cudaError_t gemv(const void* x, const void* w, const void* bias, const void* residual, void* y, int64_t M,
                 int64_t N, int64_t K, int act, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
