// fastlm._C: op schemas (TORCH_LIBRARY, so torch.ops.fastlm.* and torch.compile see them)
// and the pybind11 module (fastlm._C.*), in one shared object.
#include <torch/extension.h>

#include "ffn.h"

// setup.py passes the CUDA archs as an identifier (sm80_sm90_ptx90); CPU builds have none.
#define FASTLM_STR_(x) #x
#define FASTLM_STR(x) FASTLM_STR_(x)
#ifdef FASTLM_CUDA_ARCHS
#define FASTLM_CUDA_ARCHS_STR FASTLM_STR(FASTLM_CUDA_ARCHS)
#else
#define FASTLM_CUDA_ARCHS_STR ""
#endif

TORCH_LIBRARY(fastlm, m) {
  m.def("bias_gelu(Tensor x, Tensor bias, str approximate='none') -> Tensor");
  m.def("ffn_ext(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str activation, Tensor? residual) -> Tensor");
  m.def("layer_norm_ext(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def("linear_ext(Tensor x, Tensor w, Tensor? b, Tensor? packed=None, str activation='none', Tensor? residual=None) -> Tensor");
  m.def("add_layer_norm_ext(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++/CUDA ops";
  m.def(
      "bias_gelu",
      [](const at::Tensor& x, const at::Tensor& bias, const std::string& approximate) {
        return fastlm::bias_gelu(x, bias, approximate);
      },
      "y = gelu(x + bias)", py::arg("x"), py::arg("bias"), py::arg("approximate") = "none");
  m.def(
      "ffn",
      [](const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
         const std::string& activation, const c10::optional<at::Tensor>& residual) {
        return fastlm::ffn(x, w1, b1, w2, b2, activation, residual);
      },
      "linear(gelu(linear(x, w1) + b1), w2) + b2 (+ residual)", py::arg("x"), py::arg("w1"), py::arg("b1"),
      py::arg("w2"), py::arg("b2"), py::arg("activation") = "gelu", py::arg("residual") = py::none());
  m.def("cuda_enabled", &fastlm::cuda_enabled, "whether this build holds the CUDA kernels");
  m.attr("cuda_archs") = FASTLM_CUDA_ARCHS_STR;
}
