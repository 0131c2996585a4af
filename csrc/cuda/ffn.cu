// CUDA kernels of the FFN ops: bias + GELU epilogue.
// Plain CUDA (see ffn_cuda.h): the torch side (checks, stream, guard) is csrc/ffn.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ffn_cuda.h"

namespace fastlm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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

// Vector path: each thread moves 16 bytes of x and y (VEC elements) per step.
// Requires n % VEC == 0 and 16-byte aligned x, bias, y (checked by the launcher).
template <typename T, bool kTanh>
__global__ void __launch_bounds__(kThreads)
bias_gelu_vec_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                     int64_t total_vecs, int64_t n_vecs) {
  constexpr int VEC = 16 / sizeof(T);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const uint4* bv = reinterpret_cast<const uint4*>(bias);
  uint4* yv = reinterpret_cast<uint4*>(y);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total_vecs;
       i += stride) {
    uint4 xa = xv[i];
    uint4 ba = __ldg(&bv[i % n_vecs]);
    uint4 out;
    const T* xe = reinterpret_cast<const T*>(&xa);
    const T* be = reinterpret_cast<const T*>(&ba);
    T* oe = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int e = 0; e < VEC; ++e) oe[e] = from_float<T>(gelu<kTanh>(to_float(xe[e]) + to_float(be[e])));
    yv[i] = out;
  }
}

// Scalar path for rows whose length is not a multiple of the vector width.
template <typename T, bool kTanh>
__global__ void __launch_bounds__(kThreads)
bias_gelu_scalar_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                        int64_t total, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    y[i] = from_float<T>(gelu<kTanh>(to_float(x[i]) + to_float(bias[i % n])));
  }
}

int grid_for(int64_t work) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 132;
  }
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 8;  // enough resident warps to hide latency
  return static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t launch(const void* x, const void* bias, void* y, int64_t rows, int64_t n, bool tanh_approx,
                   cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  const int64_t total = rows * n;
  if (n % VEC == 0 && aligned16(x) && aligned16(bias) && aligned16(y)) {
    const int64_t vecs = total / VEC;
    const int grid = grid_for(vecs);
    if (tanh_approx)
      bias_gelu_vec_kernel<T, true><<<grid, kThreads, 0, stream>>>(xp, bp, yp, vecs, n / VEC);
    else
      bias_gelu_vec_kernel<T, false><<<grid, kThreads, 0, stream>>>(xp, bp, yp, vecs, n / VEC);
  } else {
    const int grid = grid_for(total);
    if (tanh_approx)
      bias_gelu_scalar_kernel<T, true><<<grid, kThreads, 0, stream>>>(xp, bp, yp, total, n);
    else
      bias_gelu_scalar_kernel<T, false><<<grid, kThreads, 0, stream>>>(xp, bp, yp, total, n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bias_gelu(const void* x, const void* bias, void* y, int64_t rows, int64_t n, DType dtype,
                      bool tanh_approx, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::F32: return launch<float>(x, bias, y, rows, n, tanh_approx, stream);
    case DType::F16: return launch<__half>(x, bias, y, rows, n, tanh_approx, stream);
    case DType::BF16: return launch<__nv_bfloat16>(x, bias, y, rows, n, tanh_approx, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlm
