// oneDNN-backed fp32 linears for the CPU prefill / encoder path (implemented in linear_cpu.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace fastlm {

// Rows from which a CPU linear goes to oneDNN; below it (decode, M <= 16) the weight-streaming
// BLAS path is as fast and keeps the decode weight layout.
constexpr int64_t kOneDnnMinRows = 32;

// True when x2d (M, K) @ w^T can run on oneDNN: a torch build with oneDNN enabled, fp32, both
// contiguous (w in nn.Linear's (N, K) layout), M >= kOneDnnMinRows.
bool onednn_linear_ok(const at::Tensor& x2d, const at::Tensor& w);

// x2d @ w^T + b with oneDNN's fused post-op: attr "none" or "gelu" (algorithm "none" = erf,
// "tanh"). Call only where onednn_linear_ok.
at::Tensor onednn_linear(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b, c10::string_view attr,
                         c10::string_view algorithm);

// x2d @ w^T + b + other, the add fused into the GEMM's output pass. Call only where onednn_linear_ok.
at::Tensor onednn_linear_add(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                             const at::Tensor& other);

// fastlm::linear_ext on CPU: act(x (..., K) @ w^T + b) (+ residual) -> (..., N); w (N, K) as nn.Linear
// (contiguous or its transpose), b (N,) or None; activation "none" | "gelu" | "gelu_tanh"; residual
// (..., N) (only without an activation). `packed`: w reordered once by oneDNN
// (mkldnn::_reorder_linear_weight); the oneDNN branch then skips its per-call weight reorder.
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                      const c10::optional<at::Tensor>& packed, c10::string_view activation,
                      const c10::optional<at::Tensor>& residual);

}  // namespace fastlm
