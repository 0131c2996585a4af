// GPT-2 decode step on the CPU for one sequence, in one call: every layer, ln_f and the LM head.
//
// A decode step at GPT-2 small on 2 cores is ~49 weight-streaming GEMVs and ~100 small ops; run
// one by one from Python, the host work between them (module calls, checks, dispatch, a tensor
// per op) cost about 1 ms per token, 15-20% of an int8 step (issue 10 asks for <= 10%). Here the
// layers run back to back on raw buffers with the same kernels the per-op path uses
// (cpu_kernels.h: the packed GEMV of gemv.cpp, attend_heads of attention_decode.cpp, the
// LayerNorm rows of ffn.cpp), so the results equal the per-op path's to the last bit.
//
// Per layer, h (1, C) the residual stream (transformers' GPT2Block, pre-LN):
//   x = ln_1(h); qkv = x @ Wqkv^T + b                    (3C: q, k, v, heads of D)
//   k_cache[kv_len - 1], v_cache[kv_len - 1] = k, v      (index write into the static cache)
//   a = softmax(scale * q . k_cache[:kv_len]) @ v_cache  (per head)
//   h = h + a @ Wo^T + b;  x = ln_2(h);  h = h + gelu(x @ Wfc^T + b) @ Wproj^T + b
// then logits = ln_f(h) @ Whead^T (+ b).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

namespace fastlm {
namespace {

constexpr int64_t kPanel = 16;     // output channels per packed panel (gemv.cpp kNR)
constexpr int64_t kPerLayer = 16;  // entries of `params` per layer, see the schema below
constexpr int64_t kPerHead = 5;    // ln_f weight, ln_f bias, head panels, head scale, head bias

// A packed projection: panels (ceil(N / 16), K, 16) fp32 or int8, its scale (int8) and bias.
struct Proj {
  const void* w = nullptr;
  int int8 = 0;  // 0 fp32 panels, 1 int8 panels, 2 int8 pair panels (cpu::packed_gemm wkind)
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t n = 0, k = 0;
};

const float* opt_f32(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "gpt2_decode_cpu: ", what, " must be float32, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous() && t->numel() == n, "gpt2_decode_cpu: ", what,
                    " must be a contiguous CPU tensor of ", n, " elements, got shape ", t->sizes());
  return t->const_data_ptr<float>();
}

const float* req_f32(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), "gpt2_decode_cpu: ", what, " is missing");
  return opt_f32(t, n, what);
}

Proj proj(const c10::List<c10::optional<at::Tensor>>& p, int64_t i, int64_t n, int64_t k, const char* what) {
  const c10::optional<at::Tensor> w = p.get(i);
  TORCH_CHECK_VALUE(w.has_value() && w->defined(), "gpt2_decode_cpu: ", what, " weight is missing");
  TORCH_CHECK_TYPE(w->scalar_type() == at::kFloat || w->scalar_type() == at::kChar, "gpt2_decode_cpu: ", what,
                   " weight must be float32 or int8 panels, got ", w->scalar_type());
  const bool pairs8 = w->scalar_type() == at::kChar && w->dim() == 3 && w->size(2) == 2 * kPanel;
  TORCH_CHECK_VALUE(w->device().is_cpu() && w->is_contiguous() && w->dim() == 3 &&
                        w->size(0) == (n + kPanel - 1) / kPanel &&
                        (pairs8 ? w->size(1) == (k + 1) / 2 : (w->size(1) == k && w->size(2) == kPanel)),
                    "gpt2_decode_cpu: ", what, " weight must be contiguous CPU panels (", (n + kPanel - 1) / kPanel,
                    ", ", k, ", 16) (int8 also pair panels (", (n + kPanel - 1) / kPanel, ", ", (k + 1) / 2,
                    ", 32)), got ", w->sizes());
  Proj r;
  r.w = w->const_data_ptr();
  r.int8 = pairs8 ? 2 : (w->scalar_type() == at::kChar ? 1 : 0);
  r.scale = opt_f32(p.get(i + 1), n, what);
  TORCH_CHECK_VALUE(!r.int8 || r.scale != nullptr, "gpt2_decode_cpu: ", what, " int8 weight needs its scale");
  r.bias = opt_f32(p.get(i + 2), n, what);
  r.n = n;
  r.k = k;
  return r;
}

// Per-op profile of gpt2_decode_cpu (torch.ops.fastlm.gpt2_decode_profile): wall nanoseconds per op
// kind summed over layers and steps, off unless switched on (two clock reads per op when on).
enum ProfOp : int { kPLn1, kPQkv, kPKv, kPAttn, kPO, kPLn2, kPFc, kPProj, kPLnF, kPHead, kPOps };
struct Profile {
  std::atomic<bool> on{false};
  int64_t ns[kPOps] = {};
  int64_t steps = 0;
};
Profile& profile() {
  static Profile p;
  return p;
}

// "on" / "off" switch it, "reset" zeroes it, "" only reads: returns [steps, ns of ln_1, c_attn,
// kv write, attention, attn.c_proj, ln_2, c_fc, mlp.c_proj, ln_f, lm_head] (ns summed over steps).
std::vector<int64_t> gpt2_decode_profile(c10::string_view cmd) {
  Profile& p = profile();
  TORCH_CHECK_VALUE(cmd.empty() || cmd == "on" || cmd == "off" || cmd == "reset",
                    "gpt2_decode_profile: cmd must be \"\", \"on\", \"off\" or \"reset\", got \"", cmd, "\"");
  if (cmd == "on") p.on.store(true);
  if (cmd == "off") p.on.store(false);
  if (cmd == "reset") {
    for (int64_t& v : p.ns) v = 0;
    p.steps = 0;
  }
  std::vector<int64_t> out{p.steps};
  out.insert(out.end(), p.ns, p.ns + kPOps);
  return out;
}

struct Ticker {  // adds the time since the last tick to an op's total (when profiling)
  bool on = profile().on.load(std::memory_order_relaxed);
  std::chrono::steady_clock::time_point last = on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  void operator()(int op) {
    if (!on) return;
    const auto t = std::chrono::steady_clock::now();
    profile().ns[op] += std::chrono::duration_cast<std::chrono::nanoseconds>(t - last).count();
    last = t;
  }
};

void run(const Proj& p, const float* x, float* y, const float* residual, int act) {
  cpu::packed_gemm(x, 1, p.k, p.w, p.int8, p.n, p.scale, p.bias, residual, y, act);
}

// h (1, 1, C) float32 -> logits (1, vocab). params: per layer [ln_1 w, ln_1 b, c_attn (panels,
// scale, bias), attn.c_proj (3), ln_2 w, ln_2 b, c_fc (3), mlp.c_proj (3)], then [ln_f w, ln_f b,
// lm_head (panels, scale, bias)]. k_cache / v_cache (n_layer, B, H, capacity, D): batch row 0 is
// written at kv_len - 1 and read over [0, kv_len). scales: the attention scale of each layer.
at::Tensor gpt2_decode_cpu(const at::Tensor& h_in, const c10::List<c10::optional<at::Tensor>>& params,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t kv_len,
                           at::ArrayRef<double> scales, int64_t vocab, double eps, c10::string_view activation) {
  TORCH_CHECK_TYPE(h_in.scalar_type() == at::kFloat, "gpt2_decode_cpu: h must be float32, got ", h_in.scalar_type());
  TORCH_CHECK_VALUE(h_in.device().is_cpu() && h_in.dim() >= 1 && h_in.numel() == h_in.size(-1) && h_in.numel() >= 1,
                    "gpt2_decode_cpu: h must be one CPU row (1, 1, C) with C >= 1, got shape ", h_in.sizes());
  TORCH_CHECK_VALUE(activation == "gelu" || activation == "gelu_tanh",
                    "gpt2_decode_cpu: activation must be \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  const int act = activation == "gelu" ? 1 : 2;
  const int64_t C = h_in.size(-1);
  const int64_t L = static_cast<int64_t>(scales.size());
  TORCH_CHECK_VALUE(L >= 1, "gpt2_decode_cpu: scales must hold one attention scale per layer (n_layer >= 1)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == L * kPerLayer + kPerHead, "gpt2_decode_cpu: params must hold ",
                    kPerLayer, " entries per layer and ", kPerHead, " for the head (", L * kPerLayer + kPerHead,
                    " for ", L, " layers), got ", params.size());
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK_TYPE(c->scalar_type() == at::kFloat, "gpt2_decode_cpu: the KV cache must be float32");
    TORCH_CHECK_VALUE(c->device().is_cpu() && c->is_contiguous() && c->dim() == 5 && c->size(0) == L &&
                          c->size(1) >= 1 && c->size(2) * c->size(4) == C,
                      "gpt2_decode_cpu: the KV cache must be contiguous (n_layer = ", L, ", B, H, capacity, D) with "
                      "H * D = ", C, ", got ", c->sizes());
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "gpt2_decode_cpu: k_cache and v_cache differ in shape");
  const int64_t H = k_cache.size(2), cap = k_cache.size(3), D = k_cache.size(4);  // H * D = C >= 1
  TORCH_CHECK_VALUE(kv_len >= 1 && kv_len <= cap, "gpt2_decode_cpu: kv_len must be in [1, ", cap, "], got ", kv_len);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "gpt2_decode_cpu: eps must be finite and >= 0, got ", eps);
  for (const double s : scales)
    TORCH_CHECK_VALUE(std::isfinite(s), "gpt2_decode_cpu: scales must be finite, got ", s);
  // the FFN width d_ff is layer 0's mlp.c_proj K; proj() below checks every layer's c_fc / mlp.c_proj against it
  const c10::optional<at::Tensor> w2 = params.get(13);
  TORCH_CHECK_VALUE(w2.has_value() && w2->defined() && w2->dim() == 3 && w2->size(1) > 0,
                    "gpt2_decode_cpu: mlp.c_proj weight must be 3-D panels (ceil(C / 16), d_ff, 16) with d_ff > 0, got ",
                    w2.has_value() && w2->defined() ? w2->sizes() : at::IntArrayRef{});
  int64_t d_ff = w2->size(1);
  if (w2->scalar_type() == at::kChar && w2->size(2) == 2 * kPanel) {  // int8 pair panels: K from c_fc's scale (d_ff,)
    const c10::optional<at::Tensor> s1 = params.get(11);
    TORCH_CHECK_VALUE(s1.has_value() && s1->defined(), "gpt2_decode_cpu: c_fc int8 weight needs its scale");
    d_ff = s1->numel();
  }

  // every check first: no half-written cache on bad input
  struct Layer {
    const float *ln1w, *ln1b, *ln2w, *ln2b;
    Proj qkv, o, fc, proj;
  };
  std::vector<Layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t b = l * kPerLayer;
    Layer& y = layers[l];
    y.ln1w = req_f32(params.get(b + 0), C, "ln_1 weight");
    y.ln1b = req_f32(params.get(b + 1), C, "ln_1 bias");
    y.qkv = proj(params, b + 2, 3 * C, C, "c_attn");
    y.o = proj(params, b + 5, C, C, "attn.c_proj");
    y.ln2w = req_f32(params.get(b + 8), C, "ln_2 weight");
    y.ln2b = req_f32(params.get(b + 9), C, "ln_2 bias");
    y.fc = proj(params, b + 10, d_ff, C, "c_fc");
    y.proj = proj(params, b + 13, C, d_ff, "mlp.c_proj");
  }
  const int64_t hb = L * kPerLayer;
  const float* lnfw = req_f32(params.get(hb + 0), C, "ln_f weight");
  const float* lnfb = req_f32(params.get(hb + 1), C, "ln_f bias");
  const Proj head = proj(params, hb + 2, vocab, C, "lm_head");

  at::Tensor h = h_in.reshape({1, C}).clone();  // the residual stream, updated in place
  at::Tensor logits = at::empty({1, vocab}, h.options());
  std::vector<float> x(C), qkv(3 * C), att(C), f(d_ff);
  float* hp = h.mutable_data_ptr<float>();
  float* kc = k_cache.mutable_data_ptr<float>();
  float* vc = v_cache.mutable_data_ptr<float>();
  const int64_t layer_stride = k_cache.stride(0), head_stride = cap * D;  // batch row 0 of each layer
  Ticker tick;
  for (int64_t l = 0; l < L; ++l) {
    const Layer& y = layers[l];
    cpu::layer_norm(hp, nullptr, y.ln1w, y.ln1b, x.data(), nullptr, 1, C, static_cast<float>(eps));
    tick(kPLn1);
    run(y.qkv, x.data(), qkv.data(), nullptr, 0);
    tick(kPQkv);
    float* kl = kc + l * layer_stride;
    float* vl = vc + l * layer_stride;
    for (int64_t hd = 0; hd < H; ++hd) {  // row kv_len - 1 of head hd <- k, v of this token
      std::copy_n(qkv.data() + C + hd * D, D, kl + hd * head_stride + (kv_len - 1) * D);
      std::copy_n(qkv.data() + 2 * C + hd * D, D, vl + hd * head_stride + (kv_len - 1) * D);
    }
    tick(kPKv);
    cpu::attend_heads(qkv.data(), D, kl, vl, head_stride, D, H, kv_len, D, static_cast<float>(scales[l]), att.data(),
                      D);
    tick(kPAttn);
    run(y.o, att.data(), hp, hp, 0);  // h += attn
    tick(kPO);
    cpu::layer_norm(hp, nullptr, y.ln2w, y.ln2b, x.data(), nullptr, 1, C, static_cast<float>(eps));
    tick(kPLn2);
    run(y.fc, x.data(), f.data(), nullptr, act);
    tick(kPFc);
    run(y.proj, f.data(), hp, hp, 0);  // h += mlp
    tick(kPProj);
  }
  cpu::layer_norm(hp, nullptr, lnfw, lnfb, x.data(), nullptr, 1, C, static_cast<float>(eps));
  tick(kPLnF);
  run(head, x.data(), logits.mutable_data_ptr<float>(), nullptr, 0);
  tick(kPHead);
  if (tick.on) ++profile().steps;
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("gpt2_decode_cpu(Tensor h, Tensor?[] params, Tensor(a!) k_cache, Tensor(b!) v_cache, int kv_len, "
        "float[] scales, int vocab, float eps, str activation) -> Tensor");
  m.def("gpt2_decode_profile(str cmd='') -> int[]", &gpt2_decode_profile);
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("gpt2_decode_cpu", &gpt2_decode_cpu); }

}  // namespace fastlm
