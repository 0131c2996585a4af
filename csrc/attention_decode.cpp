// Small-attention on the CPU (decode steps and short prompts), fp32:
//
// out[b, h, i] = softmax(scale * q[b, h, i] . k[b, h, j] over j < n_i) @ v[b, h, :n_i]
// n_i = S_k (not causal) or i + 1 + S_k - S_q (causal, end-aligned as fastlm.reference.causal_keep).
//
// torch's CPU SDPA runs every call through at::parallel_for (OpenMP, grain 1): at decode sizes
// (12 heads x tens of keys, ~0.1 MFLOP) the work is smaller than a thread wake-up, and on a busy
// 2-core machine each call cost 2-9 ms waiting for the OpenMP partner (torch.profiler, GPT-2 small,
// 2 threads). This kernel runs on the calling thread, and shares heads through the work-sharing
// pool (cpu_pool.h) only when a call holds enough keys and values to pay for a helper.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attend_row.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"

namespace fastlm {
namespace {

// One head, fp32 KV (attend_row.h): the AVX2 body where the CPU kernels may use it (cpu::isa_level).
void attend_one(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t S, int64_t D,
                float scale, float* out, float* s) {
#ifdef FASTLM_ATTEND_X86
  if (cpu::isa_level() >= 1) return attend::avx2<float>(q, k, ks, v, vs, S, D, scale, out, s);
#endif
  attend::portable<float>(q, k, ks, v, vs, S, D, scale, out, s);
}

void check_qkv_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "attention_decode: ", name, " must be defined");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "attention_decode (CPU): ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "attention_decode (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 4, "attention_decode: ", name, " must be (B, H, S, D), got shape ", t.sizes());
}

// q (B, H, S_q, D); k, v (B, H, S, D), any strides, S >= S_q when causal. Returns (B, H, S_q, D) contiguous.
at::Tensor attention_decode_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                                bool causal) {
  check_qkv_arg(q_in, "q");
  check_qkv_arg(k_in, "k");
  check_qkv_arg(v_in, "v");
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3), S = k_in.size(2);
  TORCH_CHECK_VALUE(Q >= 1, "attention_decode: q must hold at least one query, got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(!causal || S >= Q, "attention_decode: causal attention needs at least as many keys (", S,
                    ") as queries (", Q, ")");
  TORCH_CHECK_VALUE(k_in.sizes() == v_in.sizes(), "attention_decode: k and v must have the same shape, got ",
                    k_in.sizes(), " and ", v_in.sizes());
  TORCH_CHECK_VALUE(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D,
                    "attention_decode: k must be (B, H, S, D) = (", B, ", ", H, ", S, ", D, "), got ", k_in.sizes());
  TORCH_CHECK_VALUE(S >= 1, "attention_decode: k and v must hold at least one key (S >= 1)");
  TORCH_CHECK_VALUE(D >= 1, "attention_decode: the head dim D must be >= 1, got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "attention_decode: scale must be finite, got ", scale);
  // rows of D contiguous floats; (B, H, S) strides taken as they are (cache views need no copy)
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  at::Tensor out = at::empty({B, H, Q, D}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t heads = B * H;
  auto head = [&](int64_t i, float* s) {
    const int64_t b = i / H, h = i % H;
    for (int64_t t = 0; t < Q; ++t)
      attend_one(qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2), kp + b * k.stride(0) + h * k.stride(1),
                 k.stride(2), vp + b * v.stride(0) + h * v.stride(1), v.stride(2), causal ? t + 1 + S - Q : S, D, sc,
                 op + (i * Q + t) * D, s);
  };
  // ~1 MB of keys and values (or 256K multiply-adds) per chunk: decode-sized calls stay on the
  // calling thread; long caches and prompts share heads with the pool
  const int64_t per_head = (2 * S + Q) * D * 4 + Q * S * D * 8;  // bytes + 4 x multiply-adds
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / per_head);
  const int64_t chunks = (heads + grain - 1) / grain;
  SharePool::get().run(chunks, [&](int64_t c) {
    std::vector<float> s(S);
    for (int64_t i = c * grain; i < std::min(heads, (c + 1) * grain); ++i) head(i, s.data());
  });
  return out;
}

}  // namespace

namespace cpu {
void attend_row(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t S, int64_t D,
                float scale, float* out, float* s) {
  attend_one(q, k, ks, v, vs, S, D, scale, out, s);
}

void attend_heads(const float* q, int64_t q_hs, const float* k, const float* v, int64_t k_hs, int64_t k_rs,
                  int64_t H, int64_t S, int64_t D, float scale, float* out, int64_t out_hs) {
  const int64_t per_head = std::max<int64_t>(1, 2 * S * D * 4 + S * D * 8);  // as attention_decode_cpu's chunks
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / per_head);
  SharePool::get().run((H + grain - 1) / grain, [&](int64_t c) {
    std::vector<float> s(S);
    for (int64_t h = c * grain; h < std::min(H, (c + 1) * grain); ++h)
      attend_one(q + h * q_hs, k + h * k_hs, k_rs, v + h * k_hs, k_rs, S, D, scale, out + h * out_hs, s.data());
  });
}
}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(fastlm, m) { m.def("attention_decode(Tensor q, Tensor k, Tensor v, float scale, bool causal=False) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("attention_decode", &attention_decode_cpu); }

}  // namespace fastlm
