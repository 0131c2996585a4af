// Strided copy on the calling thread, for the small copies between pool-run GEMMs on the CPU:
//
//   copy_rows_(dst, src) -> dst:  dst[...] = src[...]
//
// dst and src: CPU tensors of one shape and dtype, any strides with unit stride along the last
// dimension (rows of contiguous elements: a KV cache slice, the transposed view of an attention
// output), up to 6 dimensions. aten's copy_ of a GPT-2 prefill's keys, values or attention output
// (32 x 16 tokens: 393K floats) is an OpenMP region, which leaves an OpenMP worker spinning on the
// core the pool's helper needs for the next GEMM (csrc/cpu_pool.h); 1.5 MB copied here row by row
// takes ~0.1 ms on one core. Overlapping dst and src are not supported (as copy_ of such views).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace fastlm {
namespace {

at::Tensor& copy_rows_(at::Tensor& dst, const at::Tensor& src) {
  const char* op = "copy_rows_";
  TORCH_CHECK_VALUE(dst.defined() && src.defined(), op, ": dst and src must be defined");
  TORCH_CHECK_VALUE(dst.device().is_cpu() && src.device().is_cpu(), op, ": dst and src must be CPU tensors, got ",
                    dst.device(), " and ", src.device());
  TORCH_CHECK_TYPE(dst.scalar_type() == src.scalar_type(), op, ": dst and src must have one dtype, got ",
                   dst.scalar_type(), " and ", src.scalar_type());
  TORCH_CHECK_VALUE(dst.sizes() == src.sizes(), op, ": dst and src must have one shape, got ", dst.sizes(), " and ",
                    src.sizes());
  const int64_t nd = dst.dim();
  TORCH_CHECK_VALUE(nd >= 1 && nd <= 6, op, ": tensors of 1 to 6 dimensions, got ", nd);
  if (dst.numel() == 0) return dst;
  const int64_t D = dst.size(nd - 1);
  TORCH_CHECK_VALUE((dst.stride(nd - 1) == 1 || D == 1) && (src.stride(nd - 1) == 1 || D == 1), op,
                    ": dst and src must have unit stride along the last dimension, got strides ", dst.strides(),
                    " and ", src.strides());
  const int64_t es = dst.element_size(), row_bytes = D * es;
  char* dp = static_cast<char*>(dst.mutable_data_ptr());
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  const int64_t rows = dst.numel() / D;
  std::vector<int64_t> idx(nd - 1, 0);  // the row's index over the leading dimensions
  for (int64_t r = 0; r < rows; ++r) {
    int64_t od = 0, os = 0;
    for (int64_t d = 0; d < nd - 1; ++d) {
      od += idx[d] * dst.stride(d);
      os += idx[d] * src.stride(d);
    }
    std::memcpy(dp + od * es, sp + os * es, row_bytes);
    for (int64_t d = nd - 2; d >= 0; --d) {  // next row, last leading dimension fastest
      if (++idx[d] < dst.size(d)) break;
      idx[d] = 0;
    }
  }
  return dst;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) { m.def("copy_rows_(Tensor(a!) dst, Tensor src) -> Tensor(a!)"); }

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("copy_rows_", &copy_rows_); }

}  // namespace fastlm
