// One FP8 config of configs.h (a file per config: ninja builds them in parallel).
#include "grouped_gemm_fp8_entry.cuh"

MOE_CUTLASS_FP8_DEFINE(coop_128x128_cluster1x2, Fp8Coop128x128Cluster1x2)
