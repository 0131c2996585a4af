// Raw-pointer CPU kernels shared between the op files (fp32 activations, row-major buffers), so
// a fused op (decode_cpu.cpp) calls them directly, without the dispatcher or a tensor per step.
#pragma once
#include <cstdint>
#include <functional>

namespace at {
class Tensor;
}

namespace fastlm {
namespace cpu {

// Whether the CPU kernels may use AVX-512F (gemv.cpp: the CPU has it and FASTLM_CPU_ISA, or a
// cpu_isa() call, does not cap it at "avx2" / "portable"). Every op file asks this one question,
// so forcing the AVX2 path on an AVX-512 machine forces it everywhere in fastlm._C.
bool avx512_allowed();

// Whether the int8 kernels may use AVX-512 VNNI (avx512_allowed() and the CPU has AVX-512 BW + VNNI).
bool avx512vnni_allowed();

// The ISA of the packed-linear kernels as a level: 0 portable, 1 AVX2 + FMA, 2 AVX-512F (gemv.cpp).
int isa_level();

// y (M, N) = act(x (M, K) @ W^T * scale + bias) + residual, W packed as (ceil(N / 16), K, 16)
// fp32 (wkind 0) or int8 (wkind 1) panels, or int8 pair panels (ceil(N / 16), ceil(K / 2), 32)
// (wkind 2; gemv.cpp). scale (N,) is required for int8, else null; bias (N,),
// residual (M, N) may be null (residual may alias y). act: 0 none, 1 GELU (erf), 2 GELU (tanh).
void packed_gemm(const float* x, int64_t M, int64_t K, const void* w, int wkind, int64_t N, const float* scale,
                 const float* bias, const float* residual, float* y, int act);

// One query row q (D,) against S key / value rows at strides ks / vs (elements):
// out (D,) = softmax(scale * q . k[j] over j < S) @ v[:S]; s is a scratch of S floats.
void attend_row(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t S, int64_t D,
                float scale, float* out, float* s);

// One query per head against S cached rows (attention_decode.cpp): for h < H,
// out[h] = softmax(scale * q[h] . k[h, j] over j < S) @ v[h, :S]; q / out rows of D floats at
// q_hs / out_hs apart, key and value rows at k_hs (per head) and k_rs (per row) apart.
void attend_heads(const float* q, int64_t q_hs, const float* k, const float* v, int64_t k_hs, int64_t k_rs,
                  int64_t H, int64_t S, int64_t D, float scale, float* out, int64_t out_hs);

// Rows of LayerNorm (ffn.cpp): y = LN(x (+ r)) * w + b; with r, s = x + r is written too.
void layer_norm(const float* x, const float* r, const float* w, const float* b, float* y, float* s, int64_t rows,
                int64_t n, float eps);

// One row of the above without writing x + r: y = LN(x + r) * w + b (r may be null), v a scratch row
// of n floats; the same arithmetic as every row of layer_norm_ext / add_layer_norm_ext.
void add_layer_norm_row(const float* x, const float* r, const float* w, const float* b, float* y, float* v, int64_t n,
                        float eps);

// int8_gemm_vnni.cpp: c = a (M, K) int8 @ w^T, w (N, K) int8 packed as uint8 quad panels
// (ceil(N / 16), ceil(K / 4), 64) holding w + 128 (fastlm.linear.pack_int8_quads), exact int32,
// handed to `rows(m0, mb, c, ldc)` block by block: rows m0..m0+mb-1 of the product, ldc apart. The
// calls may run in parallel (different rows each); a row block is valid only during its call.
using RowsFn = std::function<void(int64_t m0, int64_t mb, const int32_t* c, int64_t ldc)>;
void int8_gemm_vnni_rows(const int8_t* a, int64_t lda, int64_t M, int64_t K, const uint8_t* quads, int64_t N,
                         const RowsFn& rows);
// int8_gemm_amx.cpp: whether the AMX-INT8 tiles run the above (the CPU has AMX-INT8, Linux granted
// the tile state, fastlm._C not capped below AVX-512, torch.ops.fastlm.int8_gemm_tiles not "vnni"), and
// its block: rows [0, mb) of a (lda apart, readable to 4 * ceil(K / 4) bytes) x quad panels [q0, q1)
// -> c (mb rows, ldc apart; column 0 is channel 16 * q0), exact int32.
bool amx_int8_usable();
// sum_k a[k] over one row of K int8 (int8_gemm_vnni.cpp: vpdpbusd against ones where AVX-512 VNNI runs).
int32_t int8_row_sum(const int8_t* a, int64_t K);
void int8_block_amx(const int8_t* a, int64_t lda, int64_t mb, int64_t K, const uint8_t* quads, int64_t N, int64_t q0,
                    int64_t q1, int32_t* c, int64_t ldc);
// TORCH_CHECKs of a (M, K) int8 (unit column stride, K within the exact bound) and quads for n channels.
void check_vnni_operands(const char* op, const at::Tensor& a, const at::Tensor& quads, int64_t n);

}  // namespace cpu
}  // namespace fastlm
