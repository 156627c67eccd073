// One config of configs.h, bf16 and fp16, both weight layouts (a file per config: ninja builds them in parallel).
#include "grouped_gemm_entry.cuh"

MOE_CUTLASS_DEFINE(pingpong_64x128, Pingpong64x128)
