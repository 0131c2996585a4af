// Dynamic per-token int8 linears on CPU (quantize="int8_dynamic", fastlm.linear.Int8DynamicLinear):
// the two passes around torch's int8 GEMM (torch._int_mm, oneDNN VNNI), each one fused pass over the
// data instead of the 5-8 torch ops it replaces (abs, amax, div, round, clamp, cast; cast, two muls,
// bias add, GELU, residual add).
//
//   quantize_rows_int8(x (M, K) f32) -> (q int8 (M, K), scale f32 (M,))
//     scale[m] = absmax(x[m]) / 127 (1 where the row is all zero), q = round_half_even(x / scale)
//     clamped to [-127, 127]: torch.round(x / scale).clamp(-127, 127), bit for bit.
//   int8_linear_epilogue(acc int32 (M, N), x_scale (M,), w_scale (N,), bias (N,)?, activation, residual (M, N)?)
//     y = act(acc * x_scale[m] * w_scale[n] + bias[n]) + residual, f32 (M, N); GELU on fast_math.h's
//     erf / tanh (max abs error of erf 4.2e-7).
//   int8_linear_epilogue_quant(acc, x_scale, w_scale, bias?, activation) -> (q int8 (M, N), scale f32 (M,))
//     the epilogue (no residual) followed by quantize_rows_int8 of its output, row by row in a
//     per-thread scratch row: the FFN's d_ff activation goes from the first int8 GEMM to the second
//     as int8 without an fp32 round trip through memory (4x fewer bytes written and read).
//   int8_linear_epilogue_(acc!, x_scale, w_scale, bias?, activation, residual?) -> ()
//     int8_linear_epilogue in place: acc's storage receives y (float32 and int32 have the same
//     size; read it as acc.view(torch.float32)), so the GEMM's output buffer is the only one.
//   int8_linear_epilogue_ln_quant_(acc!, x_scale, w_scale, bias?, residual (M, N), ln_weight (N,), ln_bias (N,),
//                                  eps) -> (q int8 (M, N), scale f32 (M,))
//     BERT's residual LayerNorm after a projection, and the next int8 linear's quantization, in one pass
//     per row: h = LayerNorm((acc * x_scale * w_scale + bias) + residual) written over acc (as above),
//     then (q, scale) = quantize_rows_int8(h). Bit for bit int8_linear_epilogue, add_layer_norm_ext
//     (ffn.cpp's LayerNorm rows, called here) and quantize_rows_int8 in sequence.
// In place, each row is read into a per-thread scratch row before its slot is written.
// The loops are plain C++ that gcc vectorises, cloned per ISA (AVX-512, AVX2, baseline) and picked at
// load time, as in ffn.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "fast_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTLM_QUANT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLM_QUANT_CLONES
#endif

namespace fastlm {
namespace {

FASTLM_QUANT_CLONES float row_absmax(const float* x, int64_t n) {
  float acc[16] = {0.f};  // 16 lanes: max is exact in any order
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] = std::max(acc[l], std::fabs(x[j + l]));
  float m = 0.f;
  for (int l = 0; l < 16; ++l) m = std::max(m, acc[l]);
  for (; j < n; ++j) m = std::max(m, std::fabs(x[j]));
  return m;
}

FASTLM_QUANT_CLONES void row_quantize(const float* x, int8_t* q, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) {
    // x / scale as torch divides (not a reciprocal multiply), rounded half to even like torch.round
    const float v = std::nearbyint(x[j] / scale);
    q[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
}

template <int kAct, bool kBias, bool kRes>
FASTLM_QUANT_CLONES void row_epilogue(const int32_t* acc, float xs, const float* ws, const float* b, const float* r,
                                      float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(acc[j]) * xs * ws[j];
    if constexpr (kBias) v += b[j];
    if constexpr (kAct == 1) v = fm::gelu_erf(v);
    if constexpr (kAct == 2) v = fm::gelu_tanh(v);
    if constexpr (kRes) v += r[j];
    y[j] = v;
  }
}

using RowFn = void (*)(const int32_t*, float, const float*, const float*, const float*, float*, int64_t);

template <int kAct>
RowFn pick_row(bool bias, bool res) {
  if (bias) return res ? &row_epilogue<kAct, true, true> : &row_epilogue<kAct, true, false>;
  return res ? &row_epilogue<kAct, false, true> : &row_epilogue<kAct, false, false>;
}

int parse_act(c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu" || activation == "gelu_tanh",
                    "int8_linear_epilogue: activation must be \"none\", \"gelu\" or \"gelu_tanh\", got \"",
                    activation, "\"");
  return activation == "none" ? 0 : activation == "gelu" ? 1 : 2;
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8_cpu(const at::Tensor& x_in) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "quantize_rows_int8: x must be float32, got ",
                   x_in.scalar_type());
  check_cpu(x_in, "quantize_rows_int8", "x");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.numel() > 0, "quantize_rows_int8: x must be a non-empty 2-D (M, K) "
                    "tensor, got shape ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options());
  const float* xp = x.const_data_ptr<float>();
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      float s = row_absmax(xp + m * K, K) / 127.0f;
      if (!(s > 0.0f)) s = 1.0f;  // an all-zero row, as the torch path
      sp[m] = s;
      row_quantize(xp + m * K, qp + m * K, K, s);
    }
  });
  return {q, scale};
}

namespace {

// Checks shared by the two epilogues; returns the activation code and contiguous operands.
struct EpilogueArgs {
  int act;
  int64_t M, N;
  at::Tensor acc, xs, ws, b, r;
};

EpilogueArgs check_epilogue(const char* op, const at::Tensor& acc_in, const at::Tensor& xs_in,
                            const at::Tensor& ws_in, const c10::optional<at::Tensor>& bias,
                            c10::string_view activation, const c10::optional<at::Tensor>& residual) {
  EpilogueArgs a;
  a.act = parse_act(activation);
  TORCH_CHECK_TYPE(acc_in.scalar_type() == at::kInt, op, ": acc must be int32, got ", acc_in.scalar_type());
  TORCH_CHECK_VALUE(acc_in.dim() == 2 && acc_in.numel() > 0, op, ": acc must be a non-empty 2-D (M, N) tensor, "
                    "got shape ", acc_in.sizes());
  a.M = acc_in.size(0);
  a.N = acc_in.size(1);
  TORCH_CHECK_TYPE(xs_in.scalar_type() == at::kFloat, op, ": x_scale must be float32, got ", xs_in.scalar_type());
  TORCH_CHECK_VALUE(xs_in.dim() == 1 && xs_in.size(0) == a.M, op, ": x_scale must have shape (", a.M, ",), got ",
                    xs_in.sizes());
  TORCH_CHECK_TYPE(ws_in.scalar_type() == at::kFloat, op, ": w_scale must be float32, got ", ws_in.scalar_type());
  TORCH_CHECK_VALUE(ws_in.dim() == 1 && ws_in.size(0) == a.N, op, ": w_scale must have shape (", a.N, ",), got ",
                    ws_in.sizes());
  check_cpu(acc_in, op, "acc");
  check_cpu(xs_in, op, "x_scale");
  check_cpu(ws_in, op, "w_scale");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == a.N, op, ": bias must have shape (", a.N, ",), got ",
                      bias->sizes());
    check_cpu(*bias, op, "bias");
    a.b = bias->contiguous();
  }
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == at::kFloat, op, ": residual must be float32, got ",
                     residual->scalar_type());
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(0) == a.M && residual->size(1) == a.N, op,
                      ": residual must have shape (", a.M, ", ", a.N, "), got ", residual->sizes());
    check_cpu(*residual, op, "residual");
    a.r = residual->contiguous();
  }
  a.acc = acc_in.contiguous();
  a.xs = xs_in.contiguous();
  a.ws = ws_in.contiguous();
  return a;
}

RowFn pick(const EpilogueArgs& a) {
  return a.act == 0 ? pick_row<0>(a.b.defined(), a.r.defined())
       : a.act == 1 ? pick_row<1>(a.b.defined(), a.r.defined())
                    : pick_row<2>(a.b.defined(), a.r.defined());
}

}  // namespace

at::Tensor int8_linear_epilogue_cpu(const at::Tensor& acc_in, const at::Tensor& xs_in, const at::Tensor& ws_in,
                                    const c10::optional<at::Tensor>& bias, c10::string_view activation,
                                    const c10::optional<at::Tensor>& residual) {
  const EpilogueArgs a = check_epilogue("int8_linear_epilogue", acc_in, xs_in, ws_in, bias, activation, residual);
  const int64_t N = a.N;
  at::Tensor y = at::empty({a.M, N}, a.acc.options().dtype(at::kFloat));
  const RowFn fn = pick(a);
  const int32_t* ap = a.acc.const_data_ptr<int32_t>();
  const float* xsp = a.xs.const_data_ptr<float>();
  const float* wsp = a.ws.const_data_ptr<float>();
  const float* bp = a.b.defined() ? a.b.const_data_ptr<float>() : nullptr;
  const float* rp = a.r.defined() ? a.r.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, a.M, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m)
      fn(ap + m * N, xsp[m], wsp, bp, rp != nullptr ? rp + m * N : nullptr, yp + m * N, N);
  });
  return y;
}

// In place: acc's storage receives the float32 result (same element size), read as
// acc.view(torch.float32). Each row goes through a scratch row, so no element is read after its
// slot is overwritten.
void int8_linear_epilogue_inplace_cpu(at::Tensor& acc, const at::Tensor& xs_in, const at::Tensor& ws_in,
                                      const c10::optional<at::Tensor>& bias, c10::string_view activation,
                                      const c10::optional<at::Tensor>& residual) {
  const char* op = "int8_linear_epilogue_";
  const EpilogueArgs a = check_epilogue(op, acc, xs_in, ws_in, bias, activation, residual);
  TORCH_CHECK_VALUE(acc.is_contiguous(), op, ": acc must be contiguous (it is overwritten in place)");
  const int64_t N = a.N;
  const RowFn fn = pick(a);
  const float* xsp = a.xs.const_data_ptr<float>();
  const float* wsp = a.ws.const_data_ptr<float>();
  const float* bp = a.b.defined() ? a.b.const_data_ptr<float>() : nullptr;
  const float* rp = a.r.defined() ? a.r.const_data_ptr<float>() : nullptr;
  void* base = acc.mutable_data_ptr();
  at::parallel_for(0, a.M, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(N);
    for (int64_t m = r0; m < r1; ++m) {
      const int32_t* am = static_cast<const int32_t*>(base) + m * N;
      fn(am, xsp[m], wsp, bp, rp != nullptr ? rp + m * N : nullptr, row.data(), N);
      std::copy(row.begin(), row.end(), static_cast<float*>(base) + m * N);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> int8_linear_epilogue_quant_cpu(const at::Tensor& acc_in, const at::Tensor& xs_in,
                                                                  const at::Tensor& ws_in,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  c10::string_view activation) {
  const EpilogueArgs a =
      check_epilogue("int8_linear_epilogue_quant", acc_in, xs_in, ws_in, bias, activation, c10::nullopt);
  const int64_t N = a.N;
  at::Tensor q = at::empty({a.M, N}, a.acc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({a.M}, a.acc.options().dtype(at::kFloat));
  const RowFn fn = pick(a);
  const int32_t* ap = a.acc.const_data_ptr<int32_t>();
  const float* xsp = a.xs.const_data_ptr<float>();
  const float* wsp = a.ws.const_data_ptr<float>();
  const float* bp = a.b.defined() ? a.b.const_data_ptr<float>() : nullptr;
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  at::parallel_for(0, a.M, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(N);  // one output row, L1/L2 resident between the passes
    for (int64_t m = r0; m < r1; ++m) {
      fn(ap + m * N, xsp[m], wsp, bp, nullptr, row.data(), N);
      float s = row_absmax(row.data(), N) / 127.0f;
      if (!(s > 0.0f)) s = 1.0f;
      sp[m] = s;
      row_quantize(row.data(), qp + m * N, N, s);
    }
  });
  return {q, scale};
}

namespace {

// y = LN((acc * x_scale * w_scale + bias) + residual) * ln_weight + ln_bias row by row, then y
// quantized per token into q / scale. y may be acc's own storage (each acc row is read into a
// scratch row before its y row is written).
void epilogue_ln_quant(const EpilogueArgs& a, const at::Tensor& lw, const at::Tensor& lb, float eps,
                       const int32_t* ap, float* yp, int8_t* qp, float* sp) {
  const int64_t N = a.N;
  const RowFn fn = pick_row<0>(a.b.defined(), false);  // the residual joins in the LayerNorm row
  const float* xsp = a.xs.const_data_ptr<float>();
  const float* wsp = a.ws.const_data_ptr<float>();
  const float* bp = a.b.defined() ? a.b.const_data_ptr<float>() : nullptr;
  const float* rp = a.r.const_data_ptr<float>();
  const float* lwp = lw.const_data_ptr<float>();
  const float* lbp = lb.const_data_ptr<float>();
  at::parallel_for(0, a.M, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(2 * N);  // the epilogue's row and LayerNorm's scratch row, L1 resident
    for (int64_t m = r0; m < r1; ++m) {
      float* ym = yp + m * N;
      fn(ap + m * N, xsp[m], wsp, bp, nullptr, row.data(), N);  // acc * x_scale * w_scale + bias
      cpu::add_layer_norm_row(row.data(), rp + m * N, lwp, lbp, ym, row.data() + N, N, eps);  // LN(. + residual)
      float s = row_absmax(ym, N) / 127.0f;
      if (!(s > 0.0f)) s = 1.0f;
      sp[m] = s;
      row_quantize(ym, qp + m * N, N, s);
    }
  });
}

EpilogueArgs check_ln_quant(const char* op, const at::Tensor& acc, const at::Tensor& xs, const at::Tensor& ws,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                            const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  EpilogueArgs a = check_epilogue(op, acc, xs, ws, bias, "none", residual);
  const std::pair<const char*, const at::Tensor*> ln[] = {{"ln_weight", &ln_weight}, {"ln_bias", &ln_bias}};
  for (const auto& [name, t] : ln) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == a.N, op, ": ", name, " must have shape (", a.N, ",), got ",
                      t->sizes());
    check_cpu(*t, op, name);
  }
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be positive, got ", eps);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> int8_linear_epilogue_ln_quant_inplace_cpu(
    at::Tensor& acc, const at::Tensor& xs, const at::Tensor& ws, const c10::optional<at::Tensor>& bias,
    const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  const char* op = "int8_linear_epilogue_ln_quant_";
  const EpilogueArgs a = check_ln_quant(op, acc, xs, ws, bias, residual, ln_weight, ln_bias, eps);
  TORCH_CHECK_VALUE(acc.is_contiguous(), op, ": acc must be contiguous (it is overwritten in place)");
  at::Tensor q = at::empty({a.M, a.N}, acc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({a.M}, acc.options().dtype(at::kFloat));
  void* base = acc.mutable_data_ptr();
  epilogue_ln_quant(a, ln_weight.contiguous(), ln_bias.contiguous(), static_cast<float>(eps),
                    static_cast<const int32_t*>(base), static_cast<float*>(base), q.mutable_data_ptr<int8_t>(),
                    scale.mutable_data_ptr<float>());
  return {q, scale};
}

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("quantize_rows_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_linear_epilogue(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias=None, str activation='none', "
        "Tensor? residual=None) -> Tensor");
  m.def("int8_linear_epilogue_quant(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias=None, "
        "str activation='none') -> (Tensor, Tensor)");
  m.def("int8_linear_epilogue_(Tensor(a!) acc, Tensor x_scale, Tensor w_scale, Tensor? bias=None, "
        "str activation='none', Tensor? residual=None) -> ()");
  m.def("int8_linear_epilogue_ln_quant_(Tensor(a!) acc, Tensor x_scale, Tensor w_scale, Tensor? bias, "
        "Tensor residual, Tensor ln_weight, Tensor ln_bias, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("quantize_rows_int8", &quantize_rows_int8_cpu);
  m.impl("int8_linear_epilogue", &int8_linear_epilogue_cpu);
  m.impl("int8_linear_epilogue_quant", &int8_linear_epilogue_quant_cpu);
  m.impl("int8_linear_epilogue_", &int8_linear_epilogue_inplace_cpu);
  m.impl("int8_linear_epilogue_ln_quant_", &int8_linear_epilogue_ln_quant_inplace_cpu);
}

}  // namespace fastlm
