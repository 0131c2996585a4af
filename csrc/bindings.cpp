// fastlm._C: op schemas (TORCH_LIBRARY, so torch.ops.fastlm.* and torch.compile see them)
// and the pybind11 module (fastlm._C.*), in one shared object.
#include <torch/extension.h>

#include "ffn.h"

#ifndef FASTLM_CUDA_ARCHS
#define FASTLM_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastlm, m) {
  m.def("bias_gelu(Tensor x, Tensor bias, str approximate='none') -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++/CUDA ops";
  m.def(
      "bias_gelu",
      [](const at::Tensor& x, const at::Tensor& bias, const std::string& approximate) {
        return fastlm::bias_gelu(x, bias, approximate);
      },
      "y = gelu(x + bias)", py::arg("x"), py::arg("bias"), py::arg("approximate") = "none");
  m.def("cuda_enabled", &fastlm::cuda_enabled, "whether this build holds the CUDA kernels");
  m.attr("cuda_archs") = FASTLM_CUDA_ARCHS;
}
