// Row argmax of a float32 matrix on the calling thread: greedy decoding's next token on CPU.
//
// torch's argmax over (B, vocab) logits runs an OpenMP region; after it libgomp's worker spins (with
// OMP_WAIT_POLICY unset, for up to a few milliseconds) on the core where the next decode step's
// pool helper (cpu_pool.h) has to run, so the step's first GEMMs share that core with a spinning
// thread. Measured on the 2-core Zen 4 (B = 32 GPT-2 small generate, 31 steps): the process spent
// ~0.5 s more CPU with the spin on (OMP_WAIT_POLICY unset vs PASSIVE). Here the argmax is one pass
// on the calling thread (about a millisecond for 32 x 50257, what torch's own single-thread pass
// costs), so the decode loop has no OpenMP region at all.
//
// Semantics are torch.argmax's: the first index of the row's maximum; a NaN counts as larger than
// any number (the first NaN wins); a row of -inf gives 0.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_ARGMAX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLM_ARGMAX_CLONES
#endif

namespace fastlm {
namespace {

constexpr int kLanes = 16;

// The row's maximum over the non-NaN values and whether it holds a NaN: fixed-width lanes of
// `v > m ? v : m` (vmaxps / maxps; a NaN never replaces m there), and a NaN flag per lane.
FASTLM_ARGMAX_CLONES void row_max(const float* x, int64_t n, float* mx_out, bool* nan_out) {
  float m[kLanes];
  int nan[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    m[l] = -std::numeric_limits<float>::infinity();
    nan[l] = 0;
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = x[j + l];
      m[l] = v > m[l] ? v : m[l];
      nan[l] |= v != v;
    }
  }
  for (; j < n; ++j) {
    const float v = x[j];
    m[0] = v > m[0] ? v : m[0];
    nan[0] |= v != v;
  }
  float r = m[0];
  int any = nan[0];
  for (int l = 1; l < kLanes; ++l) {
    r = m[l] > r ? m[l] : r;
    any |= nan[l];
  }
  *mx_out = r;
  *nan_out = any != 0;
}

int64_t row_argmax(const float* x, int64_t n) {
  float mx;
  bool has_nan;
  row_max(x, n, &mx, &has_nan);
  for (int64_t j = 0; j < n; ++j)
    if (has_nan ? std::isnan(x[j]) : x[j] == mx) return j;
  return 0;  // unreachable for n >= 1
}

// x (rows, n) float32 CPU, n >= 1 -> (rows,) int64: torch.argmax(x, -1)
at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "argmax_rows: x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) >= 1, "argmax_rows: x must be a CPU ",
                    "tensor (rows, n) with n >= 1, got shape ", x_in.sizes(), " on ", x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();  // rows read in place at any row stride
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.const_data_ptr<float>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) op[r] = row_argmax(xp + r * ld, n);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) { m.def("argmax_rows(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("argmax_rows", &argmax_rows); }

}  // namespace fastlm
