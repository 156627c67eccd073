// The typed entry of the FP8 grouped GEMM (grouped_gemm_fp8.cuh): checks done by ops.cpp, the call by
// grouped_gemm_entry.cuh's launch(), one template instance per config.
#pragma once

#include "grouped_gemm_entry.cuh"  // launch()
#include "grouped_gemm_fp8.cuh"

namespace moe_cutlass {

template <typename Config>
void grouped_mm_fp8_config(const at::Tensor& x, const at::Tensor& xs, const at::Tensor& w, const at::Tensor& ws,
                           const at::Tensor& offs, at::Tensor& out) {
  using R = Fp8Runner<Config>;
  const int E = static_cast<int>(w.size(0)), N = static_cast<int>(w.size(1)), K = static_cast<int>(w.size(2));
  const std::string sizes = "N=" + std::to_string(N) + ", K=" + std::to_string(K);
  launch<R>(x, E, sizes, "CUTLASS FP8 grouped GEMM", [&](char* scratch, int sms, int device, cudaStream_t stream) {
    return R::arguments(static_cast<const uint8_t*>(x.data_ptr()), xs.data_ptr<float>(),
                        static_cast<const uint8_t*>(w.data_ptr()), w.stride(0), ws.data_ptr<float>(), ws.stride(0),
                        offs.data_ptr<int32_t>(), reinterpret_cast<typename R::G::ElementD*>(out.data_ptr()), E, N, K,
                        scratch, sms, device, stream);
  });
}

}  // namespace moe_cutlass

#define MOE_CUTLASS_FP8_DEFINE(name, Config)                                                                   \
  namespace moe_cutlass {                                                                                      \
  void grouped_mm_fp8_##name(const at::Tensor& x, const at::Tensor& xs, const at::Tensor& w,                 \
                             const at::Tensor& ws, const at::Tensor& offs, at::Tensor& out) {                  \
    grouped_mm_fp8_config<Config>(x, xs, w, ws, offs, out);                                                    \
  }                                                                                                            \
  }
