// The CUTLASS configs, in the order of lowering/cutlass.py's CONFIGS (the index a tuned table entry names):
// X(name, struct in grouped_gemm.cuh). Kept free of CUTLASS headers: ops.cpp (g++) reads it too.
// Each config's instances live in their own csrc/grouped_gemm_<name>.cu, so ninja builds them in parallel.
#pragma once

#define MOE_CUTLASS_CONFIGS(X)                            \
  X(coop_128x128, Coop128x128)                            \
  X(coop_128x256_cluster2x1, Coop128x256Cluster2x1)       \
  X(pingpong_64x128, Pingpong64x128)                      \
  X(coop_128x128_cluster2x1, Coop128x128Cluster2x1)       \
  X(coop_128x256_cluster1x2, Coop128x256Cluster1x2)       \
  X(coop_256x128_cluster2x1, Coop256x128Cluster2x1)       \
  X(pingpong_128x128_cluster2x1, Pingpong128x128Cluster2x1) \
  X(pingpong_64x256, Pingpong64x256)                      \
  X(pingpong_64x256_cluster1x2, Pingpong64x256Cluster1x2)

// The weight-gradient configs (grouped_gemm.cuh's WgradRunner, bf16), in the order of lowering/cutlass.py's
// WGRAD_CONFIGS; each in its own csrc/grouped_gemm_wgrad_<name>.cu. A subset of the forward's tiles: three
// ping-pong ones, whose one warp group's epilogue runs under the other's main loop (a weight gradient's K loop is
// one expert's rows, a few steps at ~128 rows per expert, and its output is the size of the weights), and two
// cooperative ones (128 x 256, the tile of torch's kernel for these calls, and 128 x 128).
#define MOE_CUTLASS_WGRAD_CONFIGS(X)                      \
  X(pingpong_64x128, Pingpong64x128)                      \
  X(pingpong_64x256, Pingpong64x256)                      \
  X(pingpong_128x128_cluster2x1, Pingpong128x128Cluster2x1) \
  X(coop_128x128, Coop128x128)                            \
  X(coop_128x256_cluster2x1, Coop128x256Cluster2x1)

// The block-scaled FP8 configs (grouped_gemm_fp8.cuh), in the order of lowering/cutlass.py's FP8_CONFIGS; each in
// its own csrc/grouped_gemm_fp8_<name>.cu.
#define MOE_CUTLASS_FP8_CONFIGS(X)                        \
  X(coop_128x128, Fp8Coop128x128)                         \
  X(coop_128x128_cluster1x2, Fp8Coop128x128Cluster1x2)    \
  X(coop_128x128_cluster2x1, Fp8Coop128x128Cluster2x1)    \
  X(pingpong_64x128, Fp8Pingpong64x128)

// out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ (b_nk ? w[e]^T : w[e]) for one config, bf16 or fp16.
// And out = silu(gate) * (x @ w[e]^T), gate [S, N] read by the epilogue (grouped_gemm.cuh's Epi::kSiluMul).
#define MOE_CUTLASS_DECLARE(name, Config)                                                                      \
  void grouped_mm_##name(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, at::Tensor& out, \
                         bool b_nk);                                                                           \
  void grouped_mm_silu_mul_##name(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate,          \
                                  const at::Tensor& offs, at::Tensor& out);

// out[e] = a[offs[e-1]:offs[e]]^T @ b[offs[e-1]:offs[e]] for one weight-gradient config, bf16.
#define MOE_CUTLASS_WGRAD_DECLARE(name, Config) \
  void grouped_mm_wgrad_##name(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, at::Tensor& out);

// out[offs[e-1]:offs[e]] = the block-scaled product of x's rows and w[e]^T (grouped_gemm_fp8.cuh), bf16.
#define MOE_CUTLASS_FP8_DECLARE(name, Config)                                                                  \
  void grouped_mm_fp8_##name(const at::Tensor& x, const at::Tensor& xs, const at::Tensor& w,                 \
                             const at::Tensor& ws, const at::Tensor& offs, at::Tensor& out);
