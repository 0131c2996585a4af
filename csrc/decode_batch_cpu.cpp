// GPT-2 decode step on the CPU for a batch of B sequences of different lengths, in one call.
//
// The B > 1 counterpart of gpt2_decode_cpu (decode_cpu.cpp): one token per sequence, sequence b at
// its own position pos[b] of the static cache (ragged lengths: row b's key and value are written at
// pos[b], and row b attends to its own pos[b] + 1 rows). Run op by op from Python, a step costs
// ~1 ms of host work at GPT-2 small whatever B is; here it is one call on raw buffers.
//
// Each projection is a small GEMM (M = B rows) through the packed panels of gemv.cpp
// (cpu::packed_gemm): every weight panel is read once for all B rows (up to 16 rows per register
// pass; int8 pair panels up to 64 rows in the int16-activation kernels, no dequantisation), so the
// weight stream, which bounds a B = 1 step, is shared by the whole batch. LayerNorm rows and
// attention rows use the same arithmetic as the B = 1 op (cpu::add_layer_norm_row of ffn.cpp,
// cpu::attend_row of attention_decode.cpp), so row b's logits equal a B = 1 step's up to the
// GEMM's row blocking (the same per-row FMA order: equal in practice, checked to 1e-5).
//
// Per layer, h (B, C) the residual stream (transformers' GPT2Block, pre-LN), for every row b:
//   x = ln_1(h); qkv = x @ Wqkv^T + b                     (B, 3C)
//   k_cache[l, b, :, pos[b]], v_cache[l, b, :, pos[b]] = k[b], v[b]
//   a[b] = softmax(scale * q[b] . k_cache[l, b, :, :pos[b] + 1]) @ v_cache[l, b, :, :pos[b] + 1]
//   h += a @ Wo^T + b;  x = ln_2(h);  h += gelu(x @ Wfc^T + b) @ Wproj^T + b
// then logits = ln_f(h) @ Whead^T (+ b), (B, vocab).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_pool.h"

namespace fastlm {
namespace {

constexpr int64_t kPanel = 16;     // output channels per packed panel (gemv.cpp kNR)
constexpr int64_t kPerLayer = 16;  // entries of `params` per layer: the layout of gpt2_decode_cpu
constexpr int64_t kPerHead = 5;    // ln_f weight, ln_f bias, head panels, head scale, head bias
constexpr const char* kOp = "gpt2_decode_batch_cpu: ";

struct Proj {  // a packed projection: panels (ceil(N / 16), K, 16) fp32 or int8, int8 scale, bias
  const void* w = nullptr;
  int int8 = 0;  // 0 fp32 panels, 1 int8 panels, 2 int8 pair panels (cpu::packed_gemm wkind)
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t n = 0, k = 0;
};

const float* opt_f32(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kOp, what, " must be float32, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous() && t->numel() == n, kOp, what,
                    " must be a contiguous CPU tensor of ", n, " elements, got shape ", t->sizes());
  return t->const_data_ptr<float>();
}

const float* req_f32(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), kOp, what, " is missing");
  return opt_f32(t, n, what);
}

Proj proj(const c10::List<c10::optional<at::Tensor>>& p, int64_t i, int64_t n, int64_t k, const char* what) {
  const c10::optional<at::Tensor> w = p.get(i);
  TORCH_CHECK_VALUE(w.has_value() && w->defined(), kOp, what, " weight is missing");
  TORCH_CHECK_TYPE(w->scalar_type() == at::kFloat || w->scalar_type() == at::kChar, kOp, what,
                   " weight must be float32 or int8 panels, got ", w->scalar_type());
  const bool pairs8 = w->scalar_type() == at::kChar && w->dim() == 3 && w->size(2) == 2 * kPanel;
  TORCH_CHECK_VALUE(w->device().is_cpu() && w->is_contiguous() && w->dim() == 3 &&
                        w->size(0) == (n + kPanel - 1) / kPanel &&
                        (pairs8 ? w->size(1) == (k + 1) / 2 : (w->size(1) == k && w->size(2) == kPanel)),
                    kOp, what, " weight must be contiguous CPU panels (", (n + kPanel - 1) / kPanel,
                    ", ", k, ", 16) (int8 also pair panels (", (n + kPanel - 1) / kPanel, ", ", (k + 1) / 2,
                    ", 32)), got ", w->sizes());
  Proj r;
  r.w = w->const_data_ptr();
  r.int8 = pairs8 ? 2 : (w->scalar_type() == at::kChar ? 1 : 0);
  r.scale = opt_f32(p.get(i + 1), n, what);
  TORCH_CHECK_VALUE(!r.int8 || r.scale != nullptr, kOp, what, " int8 weight needs its scale");
  r.bias = opt_f32(p.get(i + 2), n, what);
  r.n = n;
  r.k = k;
  return r;
}

// y (M, n) = act(x (M, k) @ W^T * scale + bias) + residual: each panel read once for all M rows
void gemm(const Proj& p, const float* x, int64_t M, float* y, const float* residual, int act) {
  cpu::packed_gemm(x, M, p.k, p.w, p.int8, p.n, p.scale, p.bias, residual, y, act);
}

// M rows of LayerNorm on the calling thread (tens of microseconds at most: no pool, no OpenMP region)
void ln_rows(const float* x, const float* w, const float* b, float* y, float* scratch, int64_t M, int64_t C,
             float eps) {
  for (int64_t m = 0; m < M; ++m) cpu::add_layer_norm_row(x + m * C, nullptr, w, b, y + m * C, scratch, C, eps);
}

// h (B, 1, C) or (B, C) float32 -> logits (B, vocab). params: gpt2_decode_cpu's list (per layer
// [ln_1 w, ln_1 b, c_attn (panels, scale, bias), attn.c_proj (3), ln_2 w, ln_2 b, c_fc (3),
// mlp.c_proj (3)], then [ln_f w, ln_f b, lm_head (panels, scale, bias)]). k_cache / v_cache
// (n_layer, >= B, H, capacity, D): sequence b is cache batch row b. pos (B,) int32 / int64 with
// 0 <= pos[b] < kv_len <= capacity (kv_len: the bound the caller knows, as in the op-by-op path).
at::Tensor gpt2_decode_batch_cpu(const at::Tensor& h_in, const c10::List<c10::optional<at::Tensor>>& params,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_in,
                                 int64_t kv_len, at::ArrayRef<double> scales, int64_t vocab, double eps,
                                 c10::string_view activation) {
  TORCH_CHECK_TYPE(h_in.scalar_type() == at::kFloat, kOp, "h must be float32, got ", h_in.scalar_type());
  TORCH_CHECK_VALUE(h_in.device().is_cpu() && (h_in.dim() == 2 || (h_in.dim() == 3 && h_in.size(1) == 1)) &&
                        h_in.size(0) >= 1 && h_in.size(-1) >= 1,
                    kOp, "h must be a CPU tensor (B, 1, C) or (B, C) with B, C >= 1, got shape ", h_in.sizes());
  TORCH_CHECK_VALUE(activation == "gelu" || activation == "gelu_tanh", kOp,
                    "activation must be \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  const int act = activation == "gelu" ? 1 : 2;
  const int64_t B = h_in.size(0), C = h_in.size(-1);
  const int64_t L = static_cast<int64_t>(scales.size());
  TORCH_CHECK_VALUE(L >= 1, kOp, "scales must hold one attention scale per layer (n_layer >= 1)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == L * kPerLayer + kPerHead, kOp, "params must hold ",
                    kPerLayer, " entries per layer and ", kPerHead, " for the head (", L * kPerLayer + kPerHead,
                    " for ", L, " layers), got ", params.size());
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK_TYPE(c->scalar_type() == at::kFloat, kOp, "the KV cache must be float32");
    TORCH_CHECK_VALUE(c->device().is_cpu() && c->is_contiguous() && c->dim() == 5 && c->size(0) == L &&
                          c->size(1) >= B && c->size(2) * c->size(4) == C,
                      kOp, "the KV cache must be contiguous (n_layer = ", L, ", batch >= B = ", B,
                      ", H, capacity, D) with H * D = ", C, ", got ", c->sizes());
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), kOp, "k_cache and v_cache differ in shape");
  const int64_t H = k_cache.size(2), cap = k_cache.size(3), D = k_cache.size(4);
  TORCH_CHECK_VALUE(kv_len >= 1 && kv_len <= cap, kOp, "kv_len must be in [1, ", cap, "], got ", kv_len);
  TORCH_CHECK_TYPE(pos_in.scalar_type() == at::kInt || pos_in.scalar_type() == at::kLong, kOp,
                   "pos must be int32 or int64, got ", pos_in.scalar_type());
  TORCH_CHECK_VALUE(pos_in.device().is_cpu() && pos_in.dim() == 1 && pos_in.size(0) == B, kOp,
                    "pos must be a CPU tensor (B,) = (", B, ",), got shape ", pos_in.sizes(), " on ",
                    pos_in.device());
  const at::Tensor pos_t = pos_in.to(at::kLong).contiguous();
  const int64_t* pos = pos_t.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(pos[b] >= 0 && pos[b] < kv_len, kOp, "pos[", b, "] = ", pos[b], " is outside [0, kv_len = ",
                      kv_len, ")");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, kOp, "eps must be finite and >= 0, got ", eps);
  for (const double s : scales) TORCH_CHECK_VALUE(std::isfinite(s), kOp, "scales must be finite, got ", s);
  const c10::optional<at::Tensor> w2 = params.get(13);  // d_ff: layer 0's mlp.c_proj K, checked per layer below
  TORCH_CHECK_VALUE(w2.has_value() && w2->defined() && w2->dim() == 3 && w2->size(1) > 0, kOp,
                    "mlp.c_proj weight must be 3-D panels (ceil(C / 16), d_ff, 16) with d_ff > 0, got ",
                    w2.has_value() && w2->defined() ? w2->sizes() : at::IntArrayRef{});
  int64_t d_ff = w2->size(1);
  if (w2->scalar_type() == at::kChar && w2->size(2) == 2 * kPanel) {  // int8 pair panels: K from c_fc's scale (d_ff,)
    const c10::optional<at::Tensor> s1 = params.get(11);
    TORCH_CHECK_VALUE(s1.has_value() && s1->defined(), kOp, "c_fc int8 weight needs its scale");
    d_ff = s1->numel();
  }

  // every check first: no half-written cache on bad input
  struct Layer {
    const float *ln1w, *ln1b, *ln2w, *ln2b;
    Proj qkv, o, fc, proj;
  };
  std::vector<Layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = l * kPerLayer;
    Layer& y = layers[l];
    y.ln1w = req_f32(params.get(i + 0), C, "ln_1 weight");
    y.ln1b = req_f32(params.get(i + 1), C, "ln_1 bias");
    y.qkv = proj(params, i + 2, 3 * C, C, "c_attn");
    y.o = proj(params, i + 5, C, C, "attn.c_proj");
    y.ln2w = req_f32(params.get(i + 8), C, "ln_2 weight");
    y.ln2b = req_f32(params.get(i + 9), C, "ln_2 bias");
    y.fc = proj(params, i + 10, d_ff, C, "c_fc");
    y.proj = proj(params, i + 13, C, d_ff, "mlp.c_proj");
  }
  const int64_t hb = L * kPerLayer;
  const float* lnfw = req_f32(params.get(hb + 0), C, "ln_f weight");
  const float* lnfb = req_f32(params.get(hb + 1), C, "ln_f bias");
  const Proj head = proj(params, hb + 2, vocab, C, "lm_head");

  at::Tensor h = h_in.reshape({B, C}).contiguous().clone();  // the residual stream, updated in place
  at::Tensor logits = at::empty({B, vocab}, h.options());
  std::vector<float> x(B * C), qkv(B * 3 * C), att(B * C), f(B * d_ff), scratch(C);
  float* hp = h.mutable_data_ptr<float>();
  float* kc = k_cache.mutable_data_ptr<float>();
  float* vc = v_cache.mutable_data_ptr<float>();
  const int64_t layer_stride = k_cache.stride(0), row_stride = k_cache.stride(1), head_stride = cap * D;
  const float fe = static_cast<float>(eps);

  // attention work items (b, head): chunks of ~1 MB of keys and values (attend_heads' grain), so
  // short caches stay on the calling thread and long ones share rows with the pool
  int64_t rows_read = 0;
  for (int64_t b = 0; b < B; ++b) rows_read += pos[b] + 1;
  const int64_t items = B * H;
  const int64_t per_item = std::max<int64_t>(1, (2 * D * 4 + D * 8) * rows_read / B);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / per_item);
  const int64_t max_s = *std::max_element(pos, pos + B) + 1;

  for (int64_t l = 0; l < L; ++l) {
    const Layer& y = layers[l];
    ln_rows(hp, y.ln1w, y.ln1b, x.data(), scratch.data(), B, C, fe);
    gemm(y.qkv, x.data(), B, qkv.data(), nullptr, 0);
    float* kl = kc + l * layer_stride;
    float* vl = vc + l * layer_stride;
    for (int64_t b = 0; b < B; ++b) {  // row pos[b] of sequence b, every head <- its k, v
      const float* q3 = qkv.data() + b * 3 * C;
      for (int64_t hd = 0; hd < H; ++hd) {
        const int64_t at_row = b * row_stride + hd * head_stride + pos[b] * D;
        std::copy_n(q3 + C + hd * D, D, kl + at_row);
        std::copy_n(q3 + 2 * C + hd * D, D, vl + at_row);
      }
    }
    const float sc = static_cast<float>(scales[l]);
    SharePool::get().run((items + grain - 1) / grain, [&](int64_t c) {
      std::vector<float> s(max_s);
      for (int64_t i = c * grain; i < std::min(items, (c + 1) * grain); ++i) {
        const int64_t b = i / H, hd = i % H;
        const int64_t base = b * row_stride + hd * head_stride;
        cpu::attend_row(qkv.data() + b * 3 * C + hd * D, kl + base, D, vl + base, D, pos[b] + 1, D, sc,
                        att.data() + b * C + hd * D, s.data());
      }
    });
    gemm(y.o, att.data(), B, hp, hp, 0);  // h += attn
    ln_rows(hp, y.ln2w, y.ln2b, x.data(), scratch.data(), B, C, fe);
    gemm(y.fc, x.data(), B, f.data(), nullptr, act);
    gemm(y.proj, f.data(), B, hp, hp, 0);  // h += mlp
  }
  ln_rows(hp, lnfw, lnfb, x.data(), scratch.data(), B, C, fe);
  gemm(head, x.data(), B, logits.mutable_data_ptr<float>(), nullptr, 0);
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("gpt2_decode_batch_cpu(Tensor h, Tensor?[] params, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, "
        "int kv_len, float[] scales, int vocab, float eps, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("gpt2_decode_batch_cpu", &gpt2_decode_batch_cpu); }

}  // namespace fastlm
