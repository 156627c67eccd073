// One weight-gradient config of configs.h, bf16 (a file per config: ninja builds them in parallel).
#include "grouped_gemm_entry.cuh"

MOE_CUTLASS_WGRAD_DEFINE(coop_128x256_cluster2x1, Coop128x256Cluster2x1)
