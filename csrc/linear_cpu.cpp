// fp32 linear on CPU through oneDNN (torch's mkldnn::_linear_pointwise, the op inductor's CPU
// freezing emits): bias, GELU and a residual add run in the GEMM's output pass, and on this
// project's AVX-512 CPU (AMD Zen 5) oneDNN's fp32 GEMM runs at ~2.3x the CPU time efficiency of
// the MKL sgemm behind at::addmm (measured 2026-11-29: BERT-base's 1024x768x3072 GEMM 24-30 ms
// of CPU time against 55-63 ms). Where oneDNN is missing, disabled or the shape is a decode GEMV,
// ATen's addmm runs, as before.
#include "linear_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

namespace fastlm {
namespace {

using PointwiseFn = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                               c10::string_view, c10::List<c10::optional<at::Scalar>>,
                               c10::optional<c10::string_view>);
using BinaryFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            c10::string_view);

// The oneDNN ops, looked up once; empty when this torch has no oneDNN.
const c10::optional<c10::OperatorHandle>& pointwise_op() {
  static const c10::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}
const c10::optional<c10::OperatorHandle>& binary_op() {
  static const c10::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
  return op;
}

}  // namespace

bool onednn_linear_ok(const at::Tensor& x2d, const at::Tensor& w) {
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && pointwise_op().has_value() &&
         binary_op().has_value() && x2d.dim() == 2 && x2d.size(0) >= kOneDnnMinRows &&
         x2d.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x2d.is_contiguous() &&
         w.is_contiguous() && x2d.device().is_cpu();
}

// bf16 x and w (the encoders in bfloat16): oneDNN's bf16 matmul (AVX512_BF16 / AMX where the CPU
// has them) with the same fused post-ops; fp32 accumulation inside oneDNN.
// oneDNN without a bf16 inner product for this CPU (e.g. ONEDNN_MAX_CPU_ISA=AVX2, or a CPU below
// AVX-512) fails to create the primitive: the first failure turns the bf16 branch off for the process.
std::atomic<bool> g_bf16_onednn_failed{false};

bool onednn_linear_bf16_ok(const at::Tensor& x2d, const at::Tensor& w) {
  return !g_bf16_onednn_failed.load(std::memory_order_relaxed) && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && pointwise_op().has_value() &&
         binary_op().has_value() && x2d.dim() == 2 && x2d.size(0) >= kOneDnnMinRows &&
         x2d.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x2d.is_contiguous() &&
         w.is_contiguous() && x2d.device().is_cpu();
}

at::Tensor onednn_linear(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b, c10::string_view attr,
                         c10::string_view algorithm) {
  static const auto op = pointwise_op()->typed<PointwiseFn>();
  return op.call(x2d, w, c10::optional<at::Tensor>(b.contiguous()), attr, c10::List<c10::optional<at::Scalar>>(),
                 c10::optional<c10::string_view>(algorithm));
}

at::Tensor onednn_linear_add(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                             const at::Tensor& other) {
  static const auto op = binary_op()->typed<BinaryFn>();
  return op.call(x2d, other.contiguous(), w, c10::optional<at::Tensor>(b.contiguous()), "add");
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                      const c10::optional<at::Tensor>& packed, c10::string_view activation,
                      const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu" || activation == "gelu_tanh",
                    "linear: activation must be \"none\", \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  TORCH_CHECK_TYPE(x.is_floating_point(), "linear: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "linear (CPU): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0, "linear: x is empty (shape ", x.sizes(), ")");
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "linear: w has dtype ", w.scalar_type(), " but x has ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(w.device() == x.device(), "linear: w is on ", w.device(), " but x is on ", x.device());
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == K, "linear: w must have shape (N, ", K,
                    ") with K = x.shape[-1], got ", w.sizes());
  const int64_t N = w.size(0);
  if (b.has_value()) {
    TORCH_CHECK_TYPE(b->scalar_type() == x.scalar_type(), "linear: b has dtype ", b->scalar_type(), " but x has ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(b->device() == x.device(), "linear: b is on ", b->device(), " but x is on ", x.device());
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == N, "linear: b must have shape (", N, ",), got ", b->sizes());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "linear: residual has dtype ",
                     residual->scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(residual->sizes() == c10::IntArrayRef(out_shape), "linear: residual must have shape ",
                      c10::IntArrayRef(out_shape), ", got ", residual->sizes());
    TORCH_CHECK_VALUE(activation == "none", "linear: a residual add after an activation is not supported");
  }
  if (packed.has_value()) {
    TORCH_CHECK_VALUE(packed->is_mkldnn() && packed->scalar_type() == x.scalar_type() && packed->dim() == 2 &&
                          packed->size(0) == N && packed->size(1) == K,
                      "linear: packed must be w reordered by oneDNN (torch.ops.mkldnn._reorder_linear_weight), an "
                      "mkldnn tensor of x's dtype and shape (", N, ", ", K, "); got ", packed->sizes(), " ",
                      packed->scalar_type(), packed->is_mkldnn() ? " (mkldnn)" : " (not mkldnn)");
  }
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const c10::string_view algo = activation == "gelu_tanh" ? "tanh" : "none";
  const bool bf16 = onednn_linear_bf16_ok(x2d, w);
  if (onednn_linear_ok(x2d, w) || bf16) {  // oneDNN, on the weight packed once at load when there is one
    const at::Tensor& wk = packed.has_value() ? *packed : w;
    const at::Tensor bias = b.has_value() ? *b : at::zeros({N}, x.options());
    try {
      if (residual.has_value()) return onednn_linear_add(x2d, wk, bias, residual->reshape({-1, N})).view(out_shape);
      return onednn_linear(x2d, wk, bias, activation == "none" ? "none" : "gelu", activation == "none" ? "" : algo)
          .view(out_shape);
    } catch (const std::exception&) {  // c10::Error or oneDNN's dnnl::error
      if (!bf16) throw;
      g_bf16_onednn_failed.store(true);  // no bf16 primitive here: ATen from now on
      TORCH_CHECK_VALUE(!packed.has_value(), "linear: oneDNN has no bf16 inner product on this CPU; pass the plain "
                        "weight (packed=None)");
    }
  }
  at::Tensor y = b.has_value() ? at::addmm(*b, x2d, w.t()) : at::mm(x2d, w.t());
  if (activation != "none") at::gelu_(y, algo);
  if (residual.has_value()) y.add_(residual->reshape({-1, N}));
  return y.view(out_shape);
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("linear_ext", &linear_cpu); }
// A packed (mkldnn layout) weight makes the dispatcher pick this key.
TORCH_LIBRARY_IMPL(fastlm, MkldnnCPU, m) { m.impl("linear_ext", &linear_cpu); }

}  // namespace fastlm
