// CUDA int8 weight-only decode GEMV (the GPU twin of csrc/gemv.cpp's int8 path).
// Plain CUDA (see gemv_int8_cuda.h): the torch side (checks, stream, guard) is csrc/gemv.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "gemv_int8_cuda.h"

namespace fastlm {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // 256 threads: one output channel per warp
constexpr int kVec = 16;   // int8 weights per lane per step (one 16-byte load)


// 16 activations of row x (16-byte aligned) as floats: 16 / (16 / sizeof(T)) vector loads.
template <typename T>
__device__ __forceinline__ void load_x16(const T* __restrict__ x, float (&xf)[kVec]) {
  constexpr int PER = 16 / sizeof(T);  // elements per 16-byte load
#pragma unroll
  for (int v = 0; v < kVec / PER; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x) + v);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < PER; ++i) xf[v * PER + i] = to_float(e[i]);
  }
}

// Warp w of block b computes channel n = b * kWarps + w for all M rows. VEC_OK: K % 16 == 0 and
// 16-byte aligned x / q (the launcher checks), else a scalar loop.
template <typename T, int MR, bool VEC_OK>
__global__ void __launch_bounds__(kWarps * 32)
gemv_int8_kernel(const T* __restrict__ x, const int8_t* __restrict__ q, const float* __restrict__ scale,
                 const T* __restrict__ bias, const T* __restrict__ residual, T* __restrict__ y, int M, int64_t N,
                 int64_t K, int act) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (n >= N) return;  // whole warps leave together: no barrier below
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;
  const int8_t* qr = q + n * K;
  if constexpr (VEC_OK) {
    for (int64_t k = static_cast<int64_t>(lane) * kVec; k < K; k += 32 * kVec) {
      const int4 raw = __ldg(reinterpret_cast<const int4*>(qr + k));
      const int words[4] = {raw.x, raw.y, raw.z, raw.w};
      float wf[kVec];  // bytes out of the words by shifts: no local-memory copy of raw
#pragma unroll
      for (int i = 0; i < kVec; ++i) wf[i] = static_cast<float>(static_cast<int8_t>(words[i / 4] >> (8 * (i % 4))));
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m < M) {
          float xf[kVec];
          load_x16<T>(x + m * K + k, xf);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[m] = fmaf(wf[i], xf[i], acc[m]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wv = static_cast<float>(qr[k]);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m < M) acc[m] = fmaf(wv, to_float(x[m * K + k]), acc[m]);
      }
    }
  }
  const float s = scale[n];
  const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == m && m < M) {  // lane m finishes row m
      v = activate(v * s + b, act);
      if (residual != nullptr) v += to_float(residual[m * N + n]);
      y[m * N + n] = from_float<T>(v);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int MR>
cudaError_t launch_rows(const T* x, const int8_t* q, const float* s, const T* b, const T* r, T* y, int M, int64_t N,
                        int64_t K, int act, cudaStream_t stream) {
  const int64_t blocks = (N + kWarps - 1) / kWarps;
  if (blocks > 2147483647LL) return cudaErrorInvalidValue;
  const bool vec_ok = K % kVec == 0 && aligned16(x) && aligned16(q);
  const unsigned grid = static_cast<unsigned>(blocks);
  if (vec_ok)
    gemv_int8_kernel<T, MR, true><<<grid, kWarps * 32, 0, stream>>>(x, q, s, b, r, y, M, N, K, act);
  else
    gemv_int8_kernel<T, MR, false><<<grid, kWarps * 32, 0, stream>>>(x, q, s, b, r, y, M, N, K, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const void* x, const int8_t* q, const float* s, const void* b, const void* r, void* y, int64_t M,
                   int64_t N, int64_t K, int act, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(b);
  const T* rp = static_cast<const T*>(r);
  T* yp = static_cast<T*>(y);
  const int m = static_cast<int>(M);
  if (M <= 1) return launch_rows<T, 1>(xp, q, s, bp, rp, yp, m, N, K, act, stream);
  if (M <= 2) return launch_rows<T, 2>(xp, q, s, bp, rp, yp, m, N, K, act, stream);
  if (M <= 4) return launch_rows<T, 4>(xp, q, s, bp, rp, yp, m, N, K, act, stream);
  if (M <= 8) return launch_rows<T, 8>(xp, q, s, bp, rp, yp, m, N, K, act, stream);
  return launch_rows<T, 16>(xp, q, s, bp, rp, yp, m, N, K, act, stream);
}

}  // namespace

cudaError_t gemv_int8(const void* x, const int8_t* q, const float* scale, const void* bias, const void* residual,
                      void* y, int64_t M, int64_t N, int64_t K, int act, DType dtype, cudaStream_t stream) {
  if (M <= 0 || M > kGemvInt8MaxRows || N <= 0 || K <= 0 || act < 0 || act > 2) return cudaErrorInvalidValue;
  if (x == nullptr || q == nullptr || scale == nullptr || y == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::F32: return launch<float>(x, q, scale, bias, residual, y, M, N, K, act, stream);
    case DType::F16: return launch<__half>(x, q, scale, bias, residual, y, M, N, K, act, stream);
    case DType::BF16: return launch<__nv_bfloat16>(x, q, scale, bias, residual, y, M, N, K, act, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlm
