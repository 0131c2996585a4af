// Device helpers shared by the CUDA kernels: dtype conversion through float and the activation
// epilogues (exact erf / tanh, no fast-math: they must match torch's GELU). Header-only, plain CUDA.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastlm {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <bool kTanh>
__device__ __forceinline__ float gelu(float v) {
  if (kTanh) {
    // 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))), as transformers' gelu_new.
    const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(inner));
  }
  return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
}

// act: 0 none, 1 GELU (erf), 2 GELU (tanh), as the launchers pass it.
__device__ __forceinline__ float activate(float v, int act) {
  if (act == 1) return gelu<false>(v);
  if (act == 2) return gelu<true>(v);
  return v;
}

}  // namespace cuda
}  // namespace fastlm
