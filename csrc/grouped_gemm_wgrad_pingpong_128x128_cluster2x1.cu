// One weight-gradient config of configs.h, bf16 (a file per config: ninja builds them in parallel).
#include "grouped_gemm_entry.cuh"

MOE_CUTLASS_WGRAD_DEFINE(pingpong_128x128_cluster2x1, Pingpong128x128Cluster2x1)
