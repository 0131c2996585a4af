// bf16 packed linear layers on the CPU (gemv_bf16.cpp): raw-pointer entry points for the fused
// decode step (decode_bf16.cpp).
#pragma once
#include <cstdint>

namespace fastlm {
namespace cpu {

// Kernel paths of the bf16 GEMV, best first; bf16_path() is the one in use.
enum Bf16Path : int { kBf16Portable = 0, kBf16Avx2 = 1, kBf16Avx512 = 2, kBf16Avx512Bf16 = 3 };

int bf16_path();

// y (M, N) fp32 = act(x (M, K) fp32 @ W^T + bias) + residual with W in bf16 pair panels
// (ceil(N / 16), ceil(K / 2), 32): element [p, kk, 2j + t] = W[16p + j, 2kk + t], zeros past N
// and K. Accumulation in fp32. bias (N,) and residual (M, N) may be null; residual may alias y.
// act: 0 none, 1 GELU (erf), 2 GELU (tanh).
void packed_gemm_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
                      const float* residual, float* y, int act);

// bf16 <-> fp32 (round to nearest even; NaN stays NaN).
inline float bf16_to_f32(uint16_t h) {
  union {
    uint32_t u;
    float f;
  } v{static_cast<uint32_t>(h) << 16};
  return v.f;
}

inline uint16_t f32_to_bf16(float f) {
  union {
    float f;
    uint32_t u;
  } v{f};
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((v.u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

}  // namespace cpu
}  // namespace fastlm
