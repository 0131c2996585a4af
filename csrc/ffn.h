// Torch-side entry points of the FFN ops (implemented in ffn.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace fastlm {

// y = gelu(x + bias), bias broadcast over the last dim of x.
// approximate: "none" (erf, BERT) or "tanh" (GPT-2's gelu_new).
at::Tensor bias_gelu(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate);

// True when this build holds the CUDA kernels (compiled with FASTLM_WITH_CUDA).
bool cuda_enabled();

}  // namespace fastlm
