"""The real problem shapes the tuner and the benchmarks share (DESIGN.md §6), importable without Triton."""

from moe_compiler.lowering.triton_config import T_GRID

SHAPES = {  # name: (E, k, H, I)
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "deepseek_v3": (256, 8, 7168, 2048),
}
TOKENS = list(T_GRID)  # the tuner's grid of T: steps of 2-4x (lookup's nearest T)
