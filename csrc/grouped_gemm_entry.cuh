// The typed entry of the grouped GEMM (grouped_gemm.cuh): checks done by ops.cpp, scratch from torch's
// allocator on the current stream, one template instance per (dtype, layout of B, config).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <string>

#include "check.h"
#include "configs.h"
#include "grouped_gemm.cuh"

namespace moe_cutlass {

// One call of a Runner (R::G its GEMM): scratch for the per-expert arguments and CUTLASS's workspace from torch's
// allocator on the current stream (a capture reuses the same memory at every replay), the arguments written on the
// device by make_args(scratch, sm_count, device, stream), the GEMM, a clear error (naming `sizes`) if CUTLASS
// refuses it.
template <typename R, typename MakeArgs>
void launch(const at::Tensor& like, int E, const std::string& sizes, const char* what, MakeArgs make_args) {
  using Gemm = typename R::G::Gemm;
  const int device = like.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  int sms = 0;  // an attribute query: no sync, allowed while capturing
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  auto bytes = like.options().dtype(at::kByte);
  at::Tensor scratch = at::empty({static_cast<int64_t>(R::arg_bytes(E))}, bytes);
  auto args = make_args(static_cast<char*>(scratch.data_ptr()), sms, device, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor workspace = at::empty({std::max<int64_t>(1, static_cast<int64_t>(Gemm::get_workspace_size(args)))}, bytes);
  cutlass::Status status = run_gemm<Gemm>(args, workspace.data_ptr(), stream);
  MOE_CHECK(status == cutlass::Status::kSuccess, std::string("moe_compiler's ") + what + " failed: " +
                                                    cutlassGetStatusString(status) + " (E=" + std::to_string(E) +
                                                    ", " + sizes + ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// `gate`: the epilogue's source under Epi::kSiluMul (undefined for kPlain).
template <typename Element, typename LayoutB, typename Config, Epi kEpi = Epi::kPlain>
void run_one(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, at::Tensor& out, int N, int K,
             const at::Tensor& gate = at::Tensor()) {
  using R = Runner<Element, LayoutB, Config, kEpi>;
  const int E = static_cast<int>(w.size(0));
  const Element* c = gate.defined() ? reinterpret_cast<const Element*>(gate.data_ptr()) : nullptr;
  const std::string sizes = "N=" + std::to_string(N) + ", K=" + std::to_string(K);
  launch<R>(x, E, sizes, "CUTLASS grouped GEMM", [&](char* scratch, int sms, int device, cudaStream_t stream) {
    return R::arguments(reinterpret_cast<const Element*>(x.data_ptr()), reinterpret_cast<const Element*>(w.data_ptr()),
                        w.stride(0), offs.data_ptr<int32_t>(), c, reinterpret_cast<Element*>(out.data_ptr()), E, N,
                        K, scratch, sms, device, stream);
  });
}

template <typename Element, typename Config>
void run_config(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, at::Tensor& out, bool b_nk, int N,
                int K) {
  if (b_nk) {
    run_one<Element, cutlass::layout::ColumnMajor, Config>(x, w, offs, out, N, K);  // w[e]: N x K, K contiguous
  } else {
    run_one<Element, cutlass::layout::RowMajor, Config>(x, w, offs, out, N, K);  // w[e]: K x N, N contiguous
  }
}

// Both dtypes of one config; a csrc/grouped_gemm_<name>.cu defines grouped_mm_<name> with it.
template <typename Config>
void grouped_mm_config(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, at::Tensor& out, bool b_nk) {
  const int K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(out.size(1));
  if (x.scalar_type() == at::kBFloat16) {
    run_config<cutlass::bfloat16_t, Config>(x, w, offs, out, b_nk, N, K);
  } else {
    run_config<cutlass::half_t, Config>(x, w, offs, out, b_nk, N, K);  // ops.cpp admits bf16 and fp16 only
  }
}

// out = silu(gate) * (x @ w[e]^T) per segment, w [E, N, K] (its K contiguous), bf16 only (ops.cpp checks): one
// instance per config, not four — each adds to the config's build (this one: 90 -> 95 s for pingpong_64x256's file
// on one core, benchmarks/NOTES.md session 33), and fp16 MoE checkpoints are rare.
template <typename Config>
void grouped_mm_silu_mul_config(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate,
                                const at::Tensor& offs, at::Tensor& out) {
  const int K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(out.size(1));
  run_one<cutlass::bfloat16_t, cutlass::layout::ColumnMajor, Config, Epi::kSiluMul>(x, w, offs, out, N, K, gate);
}

// out[e] = a_e^T @ b_e (grouped_gemm.cuh's WgradRunner), bf16 only (ops.cpp checks): the training backward's weight
// gradients, which run in bf16 (torch._grouped_mm's path, which this one replaces where measured faster, takes bf16
// only too).
template <typename Config>
void grouped_mm_wgrad_config(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, at::Tensor& out) {
  using R = WgradRunner<cutlass::bfloat16_t, Config>;
  using Element = cutlass::bfloat16_t;
  const int E = static_cast<int>(offs.size(0));
  const int M = static_cast<int>(a.size(1));
  const int N = static_cast<int>(b.size(1));
  const std::string sizes = "M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=each expert's rows";
  launch<R>(a, E, sizes, "CUTLASS grouped weight-gradient GEMM", [&](char* scratch, int sms, int device,
                                                                     cudaStream_t stream) {
    return R::arguments(reinterpret_cast<const Element*>(a.data_ptr()), reinterpret_cast<const Element*>(b.data_ptr()),
                        offs.data_ptr<int32_t>(), reinterpret_cast<Element*>(out.data_ptr()), E, M, N, scratch, sms,
                        device, stream);
  });
}

}  // namespace moe_cutlass

// One weight-gradient config (configs.h's MOE_CUTLASS_WGRAD_CONFIGS), in its own csrc/grouped_gemm_wgrad_<name>.cu.
#define MOE_CUTLASS_WGRAD_DEFINE(name, Config)                                                                   \
  namespace moe_cutlass {                                                                                        \
  void grouped_mm_wgrad_##name(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, at::Tensor& out) { \
    grouped_mm_wgrad_config<Config>(a, b, offs, out);                                                            \
  }                                                                                                              \
  }

#define MOE_CUTLASS_DEFINE(name, Config)                                                                       \
  namespace moe_cutlass {                                                                                      \
  void grouped_mm_##name(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, at::Tensor& out, \
                         bool b_nk) {                                                                          \
    grouped_mm_config<Config>(x, w, offs, out, b_nk);                                                          \
  }                                                                                                            \
  void grouped_mm_silu_mul_##name(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate,          \
                                  const at::Tensor& offs, at::Tensor& out) {                                  \
    grouped_mm_silu_mul_config<Config>(x, w, gate, offs, out);                                                 \
  }                                                                                                            \
  }
