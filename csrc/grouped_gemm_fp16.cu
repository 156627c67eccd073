// fp16 instances of the grouped GEMM (one file per dtype: ninja builds them in parallel).
#include "grouped_gemm_entry.cuh"

namespace moe_cutlass {
void grouped_mm_fp16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, at::Tensor& out, bool b_nk,
                     int64_t config) {
  grouped_mm_typed<cutlass::half_t>(x, w, offs, out, b_nk, config);
}
}  // namespace moe_cutlass
