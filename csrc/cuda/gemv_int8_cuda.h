// Plain-CUDA launcher of the int8 weight-only decode GEMV (no torch headers; see ffn_cuda.h).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "ffn_cuda.h"  // DType

namespace fastlm {
namespace cuda {

// y[m, n] = act(scale[n] * sum_k x[m, k] q[n, k] + bias[n]) (+ r[m, n]) for m < M <= kGemvInt8MaxRows.
// x (M, K), r and y (M, N) in `dtype` (fp32 / fp16 / bf16), row-major and contiguous; q (N, K) int8
// row-major; scale (N,) float32; bias (N,) in `dtype` or null; r null for no residual.
// act 0 none, 1 GELU erf, 2 GELU tanh. One warp per output channel streams its int8 row with
// 16-byte loads, dequantises in registers and applies the scale after the dot.
constexpr int kGemvInt8MaxRows = 16;
cudaError_t gemv_int8(const void* x, const int8_t* q, const float* scale, const void* bias, const void* residual,
                      void* y, int64_t M, int64_t N, int64_t K, int act, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
