"""The real problem shapes and routings the tuner and the benchmarks share (DESIGN.md §6), importable without
Triton."""

import torch

from moe_compiler.lowering.triton_config import T_GRID

SHAPES = {  # name: (E, k, H, I); the tuner's default shapes
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "deepseek_v3": (256, 8, 7168, 2048),
}
# The other shapes users run (issue 16's list): tuned tables and the full benchmark cover them all.
MORE_SHAPES = {
    "qwen3_235b_a22b": (128, 8, 4096, 1536),
    "qwen3_next_80b": (512, 10, 2048, 512),
    "kimi_k2": (384, 8, 7168, 2048),
    "gpt_oss_20b": (32, 4, 2880, 2880),
    "gpt_oss_120b": (128, 4, 2880, 2880),
    "mixtral_8x22b": (8, 2, 6144, 16384),
    "olmoe": (64, 8, 2048, 1024),
    "deepseek_v2_lite": (64, 6, 2048, 1408),
    "glm_4_5_air": (128, 8, 4096, 1408),
    "llama_4_scout": (16, 1, 5120, 8192),
}
ALL_SHAPES = {**SHAPES, **MORE_SHAPES}
TOKENS = list(T_GRID)  # the tuner's grid of T: steps of 2-4x (lookup's nearest T)


def model_spec(H: int, I: int):
    """The experts' layout and activation of the model an (H, I) comes from (spec.ExpertsSpec), so that the tuner
    times the kernels the model runs: GPT-OSS stores gate_up [E, H, 2I] interleaved and down [E, I, H] with its
    clamped SwiGLU, Llama-4 [E, H, 2I] / [E, I, H] with the router weight on the input; every other listed model
    Qwen3's [E, 2I, H] / [E, H, I] SwiGLU (its dims are no other listed model's). Biases are left out (GPT-OSS's:
    two vector loads per output row, not timed)."""
    from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout

    if (H, I) == ALL_SHAPES["gpt_oss_20b"][2:]:
        return ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)
    if (H, I) == ALL_SHAPES["llama_4_scout"][2:]:
        return ExpertsSpec(transposed=True, scale_input=True)
    return ExpertsSpec()


KINDS = ("uniform", "skewed", "skewed_shuffled")
# The routings of the tuner's score: uniform, and skewed with the popular experts at random ids, as a trained
# router places them. ("skewed", the benchmark's, puts them next to each other in sorted order, so the sorted GEMMs
# run in two phases — the hot experts' tiles, then the cold ones' — which real routing does not do: NOTES.md
# session 33.)
ROUTINGS = ("uniform", "skewed_shuffled")
SKEW = 1.2  # the i-th most popular expert's share ~ 1 / i^SKEW under skewed routing


def routes(T: int, E: int, k: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """ids [T, k] on the generator's device, k distinct experts per token: uniform; skewed (Zipf-like expert
    popularity, expert 0 the most popular, then 1, ...); or skewed_shuffled (the same popularities at a random
    permutation of the ids)."""
    device = generator.device
    if kind == "uniform":
        return torch.rand(T, E, device=device, generator=generator).argsort(dim=1)[:, :k]
    if kind not in KINDS:
        raise ValueError(f"moe_compiler.tune: routing: expected one of {KINDS}, got {kind!r}")
    probs = (1.0 / torch.arange(1, E + 1, device=device, dtype=torch.float32) ** SKEW).expand(T, E)
    ids = torch.multinomial(probs, k, replacement=False, generator=generator)
    if kind == "skewed_shuffled":
        ids = torch.randperm(E, device=device, generator=generator)[ids]
    return ids
