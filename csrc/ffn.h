// Torch-side entry points of the FFN ops (implemented in ffn.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace fastlm {

// y = gelu(x + bias), bias broadcast over the last dim of x.
// approximate: "none" (erf, BERT) or "tanh" (GPT-2's gelu_new).
at::Tensor bias_gelu(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate);

// linear(gelu(linear(x, w1) + b1), w2) + b2 (+ residual); weights (out, in) as nn.Linear.
// activation: "gelu" (erf) or "gelu_tanh".
at::Tensor ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, c10::string_view activation, const c10::optional<at::Tensor>& residual);

// True when this build holds the CUDA kernels (compiled with FASTLM_WITH_CUDA).
bool cuda_enabled();

}  // namespace fastlm
