// GPT-2 decode step on the CPU for one sequence in bf16, in one call: the bf16 twin of
// decode_cpu.cpp's gpt2_decode_cpu (same per-layer math, same params schema).
//
// Weights: bf16 pair panels (gemv_bf16.cpp) streamed by the bf16 GEMV; KV cache: bf16
// (n_layer, B, H, capacity, D), the new row rounded to nearest even. Everything else in fp32:
// the residual stream h, LayerNorm (cpu::layer_norm of ffn.cpp), q, the attention scores, softmax
// and the weighted sum of values, every GEMV accumulation, and the logits (float32). LayerNorm
// weights and biases may be bf16 or fp32 (converted once per call, ~40K values at GPT-2 small).
//
// Per layer, h (1, C) fp32 (transformers' GPT2Block, pre-LN):
//   x = ln_1(h); qkv = x @ Wqkv^T + b;  k_cache[kv_len - 1], v_cache[kv_len - 1] = bf16(k, v)
//   a = softmax(scale * q . k_cache[:kv_len]) @ v_cache   (per head)
//   h = h + a @ Wo^T + b;  x = ln_2(h);  h = h + gelu(x @ Wfc^T + b) @ Wproj^T + b
// then logits = ln_f(h) @ Whead^T (+ b).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "attend_row.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "gemv_bf16.h"

namespace fastlm {
namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kPerLayer = 16;
constexpr int64_t kPerHead = 5;

// A small fp32 vector (LayerNorm weight / bias, projection bias) read from a bf16 or fp32 tensor:
// an fp32 tensor is used in place; a bf16 one is converted into the call's arena (one buffer of
// the calling thread, reused from step to step: no allocation per vector or per step).
struct Vec {
  int64_t off = -1;  // offset of the converted values in the arena, or -1
  const float* p = nullptr;
};

struct Arena {
  std::vector<float>& buf;
  int64_t used = 0;
};

void load_vec(const c10::optional<at::Tensor>& t, int64_t n, const char* what, bool required, Vec& out,
              int64_t& arena_need) {
  if (!t.has_value() || !t->defined()) {
    TORCH_CHECK_VALUE(!required, "gpt2_decode_cpu_bf16: ", what, " is missing");
    return;
  }
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, "gpt2_decode_cpu_bf16: ", what,
                   " must be float32 or bfloat16, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous() && t->numel() == n, "gpt2_decode_cpu_bf16: ", what,
                    " must be a contiguous CPU tensor of ", n, " elements, got shape ", t->sizes());
  if (t->scalar_type() == at::kFloat) {
    out.p = t->const_data_ptr<float>();
    return;
  }
  out.p = reinterpret_cast<const float*>(t->const_data_ptr<at::BFloat16>());  // the bf16 source until converted
  out.off = arena_need;
  arena_need += (n + 15) & ~int64_t{15};  // 64-byte aligned slots
}

// bf16 -> fp32 of every bf16 Vec into the arena (a shift; the compiler vectorises it)
void convert_vec(Vec& v, int64_t n, float* arena) {
  if (v.off < 0) return;
  const auto* s = reinterpret_cast<const uint16_t*>(v.p);
  auto* d = reinterpret_cast<uint32_t*>(arena + v.off);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  v.p = arena + v.off;
}

// Opt-in time per phase of the step, read and reset by torch.ops.fastlm.decode_bf16_profile(): for
// the per-op table of benchmarks. FASTLM_DECODE_PROFILE=1 (read at start-up): wall time; =cpu: the
// calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID; with one thread, robust to a loaded machine's
// descheduling). ~100 clock reads a step when on, one branch a phase when off.
enum Phase : int { kSetup, kLn, kQkv, kKvWrite, kAttn, kAttnOut, kFfnUp, kFfnDown, kLmHead, kPhases };
const char* const kPhaseNames[] = {"setup", "layernorm", "qkv", "kv_write", "attention", "attn_out", "ffn_up",
                                   "ffn_down", "lm_head"};
int profile_mode() {  // 0 off, 1 wall, 2 thread CPU time
  static const int mode = [] {
    const char* e = std::getenv("FASTLM_DECODE_PROFILE");
    if (e == nullptr) return 0;
    return std::string(e) == "1" ? 1 : (std::string(e) == "cpu" ? 2 : 0);
  }();
  return mode;
}
bool profile_on() { return profile_mode() != 0; }

int64_t profile_now_ns() {
  if (profile_mode() == 2) {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
std::atomic<int64_t> g_prof_ns[kPhases + 1];  // + steps

struct Timer {
  bool on = profile_on();
  int64_t t = on ? profile_now_ns() : 0;
  void lap(Phase p) {
    if (!on) return;
    const int64_t n = profile_now_ns();
    g_prof_ns[p].fetch_add(n - t, std::memory_order_relaxed);
    t = n;
  }
};

// {phase name: total ms, ..., "steps": n} since the last read; empty when profiling is off.
c10::Dict<std::string, double> decode_bf16_profile() {
  c10::Dict<std::string, double> d;
  if (!profile_on()) return d;
  for (int i = 0; i < kPhases; ++i) d.insert(kPhaseNames[i], g_prof_ns[i].exchange(0) * 1e-6);
  d.insert("steps", static_cast<double>(g_prof_ns[kPhases].exchange(0)));
  return d;
}

struct Proj {
  const uint16_t* w = nullptr;
  Vec bias;
  int64_t n = 0, k = 0;
};

void load_proj(const c10::List<c10::optional<at::Tensor>>& p, int64_t i, int64_t n, int64_t k, const char* what,
               Proj& r, int64_t& arena_need) {
  const c10::optional<at::Tensor> w = p.get(i);
  TORCH_CHECK_VALUE(w.has_value() && w->defined(), "gpt2_decode_cpu_bf16: ", what, " weight is missing");
  TORCH_CHECK_TYPE(w->scalar_type() == at::kBFloat16, "gpt2_decode_cpu_bf16: ", what,
                   " weight must be bfloat16 pair panels, got ", w->scalar_type());
  const int64_t nb = (n + kPanel - 1) / kPanel, k2 = (k + 1) / 2;
  TORCH_CHECK_VALUE(w->device().is_cpu() && w->is_contiguous() && w->dim() == 3 && w->size(0) == nb &&
                        w->size(1) == k2 && w->size(2) == 2 * kPanel,
                    "gpt2_decode_cpu_bf16: ", what, " weight must be contiguous CPU pair panels (", nb, ", ", k2,
                    ", 32), got ", w->sizes());
  const c10::optional<at::Tensor> sc = p.get(i + 1);
  TORCH_CHECK_VALUE(!sc.has_value() || !sc->defined(), "gpt2_decode_cpu_bf16: ", what,
                    " has a scale: bf16 weights take none");
  r.w = reinterpret_cast<const uint16_t*>(w->const_data_ptr<at::BFloat16>());
  load_vec(p.get(i + 2), n, what, false, r.bias, arena_need);
  r.n = n;
  r.k = k;
}

void run(const Proj& p, const float* x, float* y, const float* residual, int act) {
  cpu::packed_gemm_bf16(x, 1, p.k, p.w, p.n, p.bias.p, residual, y, act);
}

// One query row against S bf16 key / value rows (rows D apart), fp32 math (attend_row.h, shared
// with the fp32 cache's attention). At GPT-2 small's 64 rows the phase is bound by reading the
// layer's cache rows back from DRAM (the weight stream evicts them every step), ~30 us a layer on
// one thread: the heads are split across the threads (below).
void attend_bf16_base(const float* q, const uint16_t* k, const uint16_t* v, int64_t S, int64_t D, float scale,
                      float* out, float* s) {
  attend::portable<uint16_t>(q, k, D, v, D, S, D, scale, out, s);
}

#ifdef FASTLM_ATTEND_X86
void attend_bf16_avx2(const float* q, const uint16_t* k, const uint16_t* v, int64_t S, int64_t D, float scale,
                      float* out, float* s) {
  attend::avx2<uint16_t>(q, k, D, v, D, S, D, scale, out, s);
}
#endif

// h (1, 1, C) float32 or bfloat16 -> logits (1, vocab) float32. params as gpt2_decode_cpu's (per
// layer [ln_1 w, ln_1 b, c_attn (panels, scale, bias), attn.c_proj (3), ln_2 w, ln_2 b, c_fc (3),
// mlp.c_proj (3)], then [ln_f w, ln_f b, lm_head (3)]) with bf16 pair panels and no scales.
// k_cache / v_cache bf16 (n_layer, B, H, capacity, D): batch row 0 written at kv_len - 1, read
// over [0, kv_len).
at::Tensor gpt2_decode_cpu_bf16(const at::Tensor& h_in, const c10::List<c10::optional<at::Tensor>>& params,
                                const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t kv_len,
                                at::ArrayRef<double> scales, int64_t vocab, double eps, c10::string_view activation) {
  TORCH_CHECK_TYPE(h_in.scalar_type() == at::kFloat || h_in.scalar_type() == at::kBFloat16,
                   "gpt2_decode_cpu_bf16: h must be float32 or bfloat16, got ", h_in.scalar_type());
  TORCH_CHECK_VALUE(h_in.device().is_cpu() && h_in.dim() >= 1 && h_in.numel() == h_in.size(-1) && h_in.numel() >= 1,
                    "gpt2_decode_cpu_bf16: h must be one CPU row (1, 1, C) with C >= 1, got shape ", h_in.sizes());
  TORCH_CHECK_VALUE(activation == "gelu" || activation == "gelu_tanh",
                    "gpt2_decode_cpu_bf16: activation must be \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  TORCH_CHECK_VALUE(vocab >= 1, "gpt2_decode_cpu_bf16: vocab must be >= 1, got ", vocab);
  const int act = activation == "gelu" ? 1 : 2;
  const int64_t C = h_in.size(-1);
  const int64_t L = static_cast<int64_t>(scales.size());
  TORCH_CHECK_VALUE(L >= 1, "gpt2_decode_cpu_bf16: scales must hold one attention scale per layer (n_layer >= 1)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == L * kPerLayer + kPerHead, "gpt2_decode_cpu_bf16: params must "
                    "hold ", kPerLayer, " entries per layer and ", kPerHead, " for the head (", L * kPerLayer + kPerHead,
                    " for ", L, " layers), got ", params.size());
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK_TYPE(c->scalar_type() == at::kBFloat16, "gpt2_decode_cpu_bf16: the KV cache must be bfloat16, got ",
                     c->scalar_type());
    TORCH_CHECK_VALUE(c->device().is_cpu() && c->is_contiguous() && c->dim() == 5 && c->size(0) == L &&
                          c->size(1) >= 1 && c->size(2) * c->size(4) == C,
                      "gpt2_decode_cpu_bf16: the KV cache must be contiguous (n_layer = ", L, ", B, H, capacity, D) "
                      "with H * D = ", C, ", got ", c->sizes());
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "gpt2_decode_cpu_bf16: k_cache and v_cache differ in shape");
  const int64_t H = k_cache.size(2), cap = k_cache.size(3), D = k_cache.size(4);
  TORCH_CHECK_VALUE(kv_len >= 1 && kv_len <= cap, "gpt2_decode_cpu_bf16: kv_len must be in [1, ", cap, "], got ",
                    kv_len);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "gpt2_decode_cpu_bf16: eps must be finite and >= 0, got ", eps);
  for (const double s : scales)
    TORCH_CHECK_VALUE(std::isfinite(s), "gpt2_decode_cpu_bf16: scales must be finite, got ", s);
  const c10::optional<at::Tensor> w2 = params.get(13);
  TORCH_CHECK_VALUE(w2.has_value() && w2->defined() && w2->dim() == 3 && w2->size(1) > 0,
                    "gpt2_decode_cpu_bf16: mlp.c_proj weight must be 3-D pair panels (ceil(C / 16), ceil(d_ff / 2), "
                    "32), got ", w2.has_value() && w2->defined() ? w2->sizes() : at::IntArrayRef{});
  // d_ff from layer 0's mlp.c_fc (its panels hold ceil(d_ff / 16) * 16 channels; the exact d_ff is
  // the c_proj K, which pair panels round up to even): take it from c_fc's bias / scale-free shape
  const int64_t d_ff_pairs = w2->size(1);
  const c10::optional<at::Tensor> w1 = params.get(10);
  TORCH_CHECK_VALUE(w1.has_value() && w1->defined() && w1->dim() == 3, "gpt2_decode_cpu_bf16: c_fc weight is missing");
  const c10::optional<at::Tensor> b1 = params.get(12);
  // d_ff: c_fc's bias length when present, else 2 * pairs (an odd d_ff needs the bias to say so)
  const int64_t d_ff = b1.has_value() && b1->defined() ? b1->numel() : 2 * d_ff_pairs;
  TORCH_CHECK_VALUE((d_ff + 1) / 2 == d_ff_pairs, "gpt2_decode_cpu_bf16: c_fc bias has ", d_ff,
                    " elements but mlp.c_proj's panels hold ", d_ff_pairs, " pairs of inputs");

  // every check first: no half-written cache on bad input
  Timer tm;
  struct Layer {
    Vec ln1w, ln1b, ln2w, ln2b;
    Proj qkv, o, fc, proj;
  };
  thread_local std::vector<Layer> layers;  // reused from step to step (the calling thread's)
  layers.assign(L, Layer{});
  int64_t need = 0;  // arena floats for the bf16 vectors
  for (int64_t l = 0; l < L; ++l) {
    const int64_t b = l * kPerLayer;
    Layer& y = layers[l];
    load_vec(params.get(b + 0), C, "ln_1 weight", true, y.ln1w, need);
    load_vec(params.get(b + 1), C, "ln_1 bias", true, y.ln1b, need);
    load_proj(params, b + 2, 3 * C, C, "c_attn", y.qkv, need);
    load_proj(params, b + 5, C, C, "attn.c_proj", y.o, need);
    load_vec(params.get(b + 8), C, "ln_2 weight", true, y.ln2w, need);
    load_vec(params.get(b + 9), C, "ln_2 bias", true, y.ln2b, need);
    load_proj(params, b + 10, d_ff, C, "c_fc", y.fc, need);
    load_proj(params, b + 13, C, d_ff, "mlp.c_proj", y.proj, need);
  }
  const int64_t hb = L * kPerLayer;
  Vec lnfw, lnfb;
  load_vec(params.get(hb + 0), C, "ln_f weight", true, lnfw, need);
  load_vec(params.get(hb + 1), C, "ln_f bias", true, lnfb, need);
  Proj head;
  load_proj(params, hb + 2, vocab, C, "lm_head", head, need);

  // per-thread buffers, reused: the bf16 vectors in fp32, then the step's activations
  thread_local std::vector<float> buf;
  auto up = [](int64_t n) { return (n + 15) & ~int64_t{15}; };
  const int64_t total = need + up(C) + up(3 * C) + up(C) + up(d_ff) + 16;
  if (static_cast<int64_t>(buf.size()) < total) buf.resize(total);
  // 64-byte aligned base
  float* base = buf.data() + ((64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64) / sizeof(float);
  for (Layer& y : layers) {
    convert_vec(y.ln1w, C, base);
    convert_vec(y.ln1b, C, base);
    convert_vec(y.ln2w, C, base);
    convert_vec(y.ln2b, C, base);
    convert_vec(y.qkv.bias, 3 * C, base);
    convert_vec(y.o.bias, C, base);
    convert_vec(y.fc.bias, d_ff, base);
    convert_vec(y.proj.bias, C, base);
  }
  convert_vec(lnfw, C, base);
  convert_vec(lnfb, C, base);
  convert_vec(head.bias, vocab, base);
  float* const x = base + need;
  float* const qkv = x + up(C);
  float* const att = qkv + up(3 * C);
  float* const f = att + up(C);

  at::Tensor h = h_in.reshape({1, C}).to(at::kFloat).clone();  // the fp32 residual stream, updated in place
  at::Tensor logits = at::empty({1, vocab}, h.options());
  float* hp = h.mutable_data_ptr<float>();
  auto* kc = reinterpret_cast<uint16_t*>(k_cache.mutable_data_ptr<at::BFloat16>());
  auto* vc = reinterpret_cast<uint16_t*>(v_cache.mutable_data_ptr<at::BFloat16>());
  const int64_t layer_stride = k_cache.stride(0), head_stride = cap * D;
#ifdef FASTLM_ATTEND_X86
  const auto attend = cpu::isa_level() >= 1 ? &attend_bf16_avx2 : &attend_bf16_base;
#else
  const auto attend = &attend_bf16_base;
#endif
  thread_local std::vector<float> scores;
  if (static_cast<int64_t>(scores.size()) < H * kv_len) scores.resize(H * kv_len);
  tm.lap(kSetup);
  const float fe = static_cast<float>(eps);
  for (int64_t l = 0; l < L; ++l) {
    const Layer& y = layers[l];
    cpu::layer_norm(hp, nullptr, y.ln1w.p, y.ln1b.p, x, nullptr, 1, C, fe);
    tm.lap(kLn);
    run(y.qkv, x, qkv, nullptr, 0);
    tm.lap(kQkv);
    uint16_t* kl = kc + l * layer_stride;
    uint16_t* vl = vc + l * layer_stride;
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t t = 0; t < D; ++t) {
        kl[hd * head_stride + (kv_len - 1) * D + t] = cpu::f32_to_bf16(qkv[C + hd * D + t]);
        vl[hd * head_stride + (kv_len - 1) * D + t] = cpu::f32_to_bf16(qkv[2 * C + hd * D + t]);
      }
    tm.lap(kKvWrite);
    const float sc = static_cast<float>(scales[l]);
    // heads in chunks of ~1 MB of cache for long contexts, and split across the threads once the
    // heads read 64 KB in all (~10 us: more than the pool's hand-off; kv_len >= ~21 at GPT-2 small)
    const int64_t per_head = std::max<int64_t>(1, 2 * kv_len * D * 2 + kv_len * D * 8);
    int64_t grain = std::max<int64_t>(1, (1 << 20) / per_head);
    const int64_t threads = std::max(1, at::get_num_threads());
    if (H * kv_len * D * 4 >= (int64_t{64} << 10)) grain = std::min(grain, (H + threads - 1) / threads);
    float* const sp = scores.data();
    SharePool::get().run((H + grain - 1) / grain, [&](int64_t c) {
      for (int64_t hd = c * grain; hd < std::min(H, (c + 1) * grain); ++hd)
        attend(qkv + hd * D, kl + hd * head_stride, vl + hd * head_stride, kv_len, D, sc, att + hd * D,
               sp + hd * kv_len);
    });
    tm.lap(kAttn);
    run(y.o, att, hp, hp, 0);  // h += attn
    tm.lap(kAttnOut);
    cpu::layer_norm(hp, nullptr, y.ln2w.p, y.ln2b.p, x, nullptr, 1, C, fe);
    tm.lap(kLn);
    run(y.fc, x, f, nullptr, act);
    tm.lap(kFfnUp);
    run(y.proj, f, hp, hp, 0);  // h += mlp
    tm.lap(kFfnDown);
  }
  cpu::layer_norm(hp, nullptr, lnfw.p, lnfb.p, x, nullptr, 1, C, fe);
  tm.lap(kLn);
  run(head, x, logits.mutable_data_ptr<float>(), nullptr, 0);
  tm.lap(kLmHead);
  if (tm.on) g_prof_ns[kPhases].fetch_add(1, std::memory_order_relaxed);
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("gpt2_decode_cpu_bf16(Tensor h, Tensor?[] params, Tensor(a!) k_cache, Tensor(b!) v_cache, int kv_len, "
        "float[] scales, int vocab, float eps, str activation) -> Tensor");
  m.def("decode_bf16_profile() -> Dict(str, float)", &decode_bf16_profile);
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("gpt2_decode_cpu_bf16", &gpt2_decode_cpu_bf16); }

}  // namespace fastlm
