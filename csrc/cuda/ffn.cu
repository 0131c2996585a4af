// CUDA kernels of the FFN ops: bias + GELU epilogue.
// Plain CUDA (see ffn_cuda.h): the torch side (checks, stream, guard) is csrc/ffn.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "ffn_cuda.h"

namespace fastlm {
namespace cuda {
namespace {

constexpr int kThreads = 256;


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

// ---- decode GEMV --------------------------------------------------------------------------
constexpr int kGemvWarps = 8;        // 256 threads
constexpr int kGemvWarpsPerRow = 4;  // K split four ways inside a block
constexpr int kGemvRowsPerBlock = kGemvWarps / kGemvWarpsPerRow;

template <typename T>
__device__ __forceinline__ void fma_vec(const uint4& wv, const uint4& xv, float& acc) {
  constexpr int VEC = 16 / sizeof(T);
  const T* we = reinterpret_cast<const T*>(&wv);
  const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc = fmaf(to_float(we[e]), to_float(xe[e]), acc);
}


// Block = kGemvRowsPerBlock output rows x kGemvWarpsPerRow warps. Each warp walks its K slice
// with 16-byte loads of w (read once) and of every x row (tiny, cached); partial sums meet in
// shared memory. VEC_OK selects the 16-byte path (K % VEC == 0, aligned pointers).
template <typename T, int MR, bool VEC_OK>
__global__ void __launch_bounds__(kGemvWarps * 32)
gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
            const T* __restrict__ residual, T* __restrict__ y, int M, int64_t N, int64_t K, int act) {
  constexpr int VEC = VEC_OK ? 16 / sizeof(T) : 1;
  __shared__ float partial[kGemvWarps][MR];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_block = warp / kGemvWarpsPerRow, slice = warp % kGemvWarpsPerRow;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvRowsPerBlock + row_in_block;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;
  if (n < N) {
    const T* wr = w + n * K;
    const int64_t step = static_cast<int64_t>(kGemvWarpsPerRow) * 32 * VEC;
    for (int64_t k = (static_cast<int64_t>(slice) * 32 + lane) * VEC; k < K; k += step) {
      if constexpr (VEC_OK) {
        const uint4 wv = __ldg(reinterpret_cast<const uint4*>(wr + k));
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m < M) fma_vec<T>(wv, __ldg(reinterpret_cast<const uint4*>(x + m * K + k)), acc[m]);
        }
      } else {
        const float wv = to_float(wr[k]);
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m < M) acc[m] = fmaf(wv, to_float(x[m * K + k]), acc[m]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) partial[warp][m] = v;
  }
  __syncthreads();
  // one thread per (row, m) finishes: sum the slices, bias, activation, residual
  if (slice == 0 && lane < MR && lane < M && n < N) {
    float v = 0.f;
#pragma unroll
    for (int s = 0; s < kGemvWarpsPerRow; ++s) v += partial[row_in_block * kGemvWarpsPerRow + s][lane];
    v = activate(v + to_float(bias[n]), act);
    if (residual != nullptr) v += to_float(residual[lane * N + n]);
    y[lane * N + n] = from_float<T>(v);
  }
}

template <typename T, int MR>
cudaError_t launch_gemv_rows(const T* x, const T* w, const T* b, const T* r, T* y, int M, int64_t N, int64_t K,
                             int act, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t blocks = (N + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock;
  if (blocks > 2147483647LL) return cudaErrorInvalidValue;
  const bool vec_ok = K % VEC == 0 && aligned16(x) && aligned16(w);
  if (vec_ok)
    gemv_kernel<T, MR, true><<<static_cast<unsigned>(blocks), kGemvWarps * 32, 0, stream>>>(x, w, b, r, y, M, N, K, act);
  else
    gemv_kernel<T, MR, false><<<static_cast<unsigned>(blocks), kGemvWarps * 32, 0, stream>>>(x, w, b, r, y, M, N, K, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gemv(const void* x, const void* w, const void* b, const void* r, void* y, int64_t M, int64_t N,
                        int64_t K, int act, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const T* wp = static_cast<const T*>(w);
  const T* bp = static_cast<const T*>(b);
  const T* rp = static_cast<const T*>(r);
  T* yp = static_cast<T*>(y);
  const int m = static_cast<int>(M);
  if (M <= 1) return launch_gemv_rows<T, 1>(xp, wp, bp, rp, yp, m, N, K, act, stream);
  if (M <= 2) return launch_gemv_rows<T, 2>(xp, wp, bp, rp, yp, m, N, K, act, stream);
  if (M <= 4) return launch_gemv_rows<T, 4>(xp, wp, bp, rp, yp, m, N, K, act, stream);
  if (M <= 8) return launch_gemv_rows<T, 8>(xp, wp, bp, rp, yp, m, N, K, act, stream);
  return launch_gemv_rows<T, 16>(xp, wp, bp, rp, yp, m, N, K, act, stream);
}

}  // namespace

cudaError_t gemv(const void* x, const void* w, const void* bias, const void* residual, void* y, int64_t M, int64_t N,
                 int64_t K, int act, DType dtype, cudaStream_t stream) {
  if (M <= 0 || M > kGemvMaxRows || N <= 0 || K <= 0 || act < 0 || act > 2) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::F32: return launch_gemv<float>(x, w, bias, residual, y, M, N, K, act, stream);
    case DType::F16: return launch_gemv<__half>(x, w, bias, residual, y, M, N, K, act, stream);
    case DType::BF16: return launch_gemv<__nv_bfloat16>(x, w, bias, residual, y, M, N, K, act, stream);
  }
  return cudaErrorInvalidValue;
}

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
