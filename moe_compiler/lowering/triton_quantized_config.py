"""Configs of the quantized experts kernels (triton_quantized.py, triton_quantized_decode.py) and their untuned
defaults, from the H200 sweeps of benchmarks/probes/probe_quantized_tiles.py (benchmarks/NOTES.md: "quantized
tiles", "quantized GEMVs v4")."""

from __future__ import annotations

import dataclasses
import enum

import torch
import triton

from ..spec import QuantizedExpertsSpec, WeightFormat
from . import cutlass, device
from .triton_config import config_tokens, decode_suits

ACT_GROUP = 128  # columns per activation scale under w8a8 (transformers' and DeepSeek's 1 x 128)


class ActQuant(str, enum.Enum):
    """How the FP8 sorted path multiplies (module docstring); the GEMVs and INT4 always take exact activations."""

    NONE = "w8a16"
    TILE = "w8a8_tile"
    ROWS = "w8a8_rows"


def fp8_cores(t: torch.Tensor) -> bool:
    """Whether `t`'s GPU has e4m3 tensor cores (sm89+; the device's cached capability: asked on every call)."""
    return t.device.type == "cuda" and device.capability(device.index(t)) >= (8, 9)


# The kernels' ACT_Q constexpr: one code per ActQuant (INT4 always 0: its dot takes exact activations).
ACT_Q_CODE = {ActQuant.NONE: 0, ActQuant.TILE: 1, ActQuant.ROWS: 2}


@dataclasses.dataclass(frozen=True)
class QuantizedConfig:
    """Tiles of the quantized experts kernels (one set for both GEMMs, or both GEMVs with decode)."""

    block_m: int
    block_n: int
    block_k: int  # FP8: divides the spec's scale_block_k; INT4: a multiple of 8 (values per word)
    act: ActQuant  # FP8 sorted path only
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    # The gate_up GEMM's activation: in its epilogue (fused: each program holds a gate and an up tile, two
    # accumulators) or after it (one accumulator over all 2I columns, z [S_pad, 2I] stored, a row kernel applying
    # the activation and, under w8a8_rows, quantizing act): half the registers per program for one more pass.
    fused_act: bool = True
    # INT4 sorted path: one dot per nibble plane (A read with a column stride of 8; needs block_k >= 128 on a GPU)
    # or one dot on the tile reshaped in registers. INT4 GEMVs: 2-D nibble planes summed per word before its
    # scale, or the 3-D [rows, words, 8] tile
    int4_planes: bool = True
    # The GEMV path of triton_quantized_decode.py (block_n, block_k, warps and stages; no sort, no tensor cores)
    # instead of the sorted grouped GEMMs.
    decode: bool = False
    # FP8 w8a8_rows sorted path: both GEMMs' operands by TMA (hidden quantized into sorted order first, so the
    # gate_up's A rows are contiguous too); with warp_specialize the K loop's TMA loads go to producer warps while
    # the consumers run the wgmma and the per-step scale promotion (Triton specializes loops whose operand loads
    # are TMA; the persistent tile loop did not specialize here). programs_per_sm > 0: a persistent grid.
    tma: bool = False
    # Under tma, the gate_up GEMM's A: hidden quantized into sorted order (one e4m3 row per pair: k rows per token
    # written) and loaded by TMA, or quantized per token and its rows gathered by pointer (no copy).
    sorted_copy: bool = True
    warp_specialize: bool = False
    programs_per_sm: int = 0
    # The down GEMV: one program per (pair, column block), its fp32 row summed over the token's slots by the last of
    # them to arrive (a ticket; was a second kernel), or one per (token, column block) looping over its k slots
    # (T = 1: k times fewer programs, no fp32 rows).
    slot_split: bool = True
    # The down GEMV's weight rows per program (0: block_n). A gate_up program streams a gate and an up tile (2
    # block_n rows) per x load; a down program of 2 block_n rows streams as many bytes per x load. INT4 planes at
    # Kimi-K2, 8 -> 16 rows: 7.2 -> 5.4 instructions per value at the same 63 registers (sm90 SASS, NOTES v6).
    down_block_n: int = 0
    # FP8 sorted path: both GEMMs by csrc/'s block-scaled CUTLASS grouped GEMM (cutlass_fp8.py) with this index
    # into cutlass.FP8_CONFIGS, the other fields unused; -1: the Triton kernels above.
    cutlass: int = -1

    def __post_init__(self):
        if not isinstance(self.act, ActQuant):
            if self.act not in {a.value for a in ActQuant}:
                raise ValueError(f"QuantizedConfig.act: expected an ActQuant or one of "
                                 f"{[a.value for a in ActQuant]}, got {self.act!r}")
            object.__setattr__(self, "act", ActQuant(self.act))

        if not self.sorted_copy and not self.tma:
            raise ValueError("QuantizedConfig.sorted_copy=False: needs tma=True (the pointer path always gathers "
                             "hidden's rows by token)")
        if self.warp_specialize and not self.tma:
            raise ValueError("QuantizedConfig.warp_specialize: needs tma=True (Triton specializes loops of TMA loads)")
        if self.warp_specialize and self.fused_act:
            # H200, Triton 3.6: NaN rows at T = 37 and 300 (poisoned buffers; T = 1 right), not found without a GPU;
            # every warp-specialized form lost to the pointer path anyway (NOTES "FP8 sorted path v3", measured).
            raise ValueError("QuantizedConfig.warp_specialize: not with fused_act=True (wrong rows on an H200); "
                             "use fused_act=False or warp_specialize=False")
        configs = cutlass.FP8_CONFIGS
        if not isinstance(self.cutlass, int) or not -1 <= self.cutlass < len(configs):
            raise ValueError(f"QuantizedConfig.cutlass: expected -1 (Triton) or a CUTLASS FP8 config in "
                             f"[0, {len(configs) - 1}] ({', '.join(configs)}), got {self.cutlass!r}")
        n = self.down_block_n
        if not isinstance(n, int) or n < 0 or n & (n - 1):
            raise ValueError(f"QuantizedConfig.down_block_n: expected 0 (block_n) or a power of two, "
                             f"got {self.down_block_n!r}")
        if not isinstance(self.programs_per_sm, int) or not 0 <= self.programs_per_sm <= 8:
            raise ValueError(f"QuantizedConfig.programs_per_sm: expected an int in [0, 8], "
                             f"got {self.programs_per_sm!r}")

    @property
    def act_fp8(self) -> bool:
        return self.act is not ActQuant.NONE

    @property
    def down_rows(self) -> int:
        """The down GEMV's weight rows per program."""
        return self.down_block_n or self.block_n


def step_k(scale_block_k: int) -> int:
    """The widest power-of-two K step up to 128 inside one FP8 scale block (it divides scale_block_k)."""
    block_k = 128
    while scale_block_k % block_k:
        block_k //= 2
    return block_k


def default_config(hidden: torch.Tensor, E: int, k: int, spec: QuantizedExpertsSpec, *, I: int,
                   weights: tuple[torch.Tensor, ...] | None = None) -> QuantizedConfig:
    """Untuned tiles: the bf16 op's choice of path (triton_config.decode_suits), tiles from the H200 sweeps of
    probe_quantized_tiles (NOTES.md, quantized tiles). With the call's `weights` (w_gate_up, its scales, w_down,
    its scales) the FP8 sorted path may take the CUTLASS GEMMs (cutlass_fp8_config). A symbolic token count takes
    the config of its band's grid point, guarded into the band (triton_config.config_tokens; the quantized decode
    kernels take any count, so no band bounds the GEMVs)."""
    T = config_tokens(hidden.shape[0])[0]
    if is_int4(spec):
        return _default_int4(T, E, k, I, decode_suits(T, k, E) or int4_gemvs_suit(T, k, E))
    block_k = step_k(spec.scale_block_k)
    if decode_suits(T, k, E):  # a GEMV step over two whole scale blocks where they are at most 128 wide
        return _default_fp8_gemv(2 * block_k if block_k == spec.scale_block_k else block_k)
    library = cutlass_fp8_config(hidden, T, E, k, spec, weights) if weights is not None else -1
    if library >= 0:  # (the Triton fields are unused on this path)
        return QuantizedConfig(block_m=1, block_n=128, block_k=128, act=ActQuant.ROWS, cutlass=library)
    return _default_fp8(hidden, T, E, k, block_k)


def _default_fp8_gemv(block_k: int) -> QuantizedConfig:
    """The FP8 GEMVs from the H200 sweeps (NOTES.md, "quantized GEMVs v4"): 16 rows of 256 values per program
    (two 128-wide scale blocks), 2 warps, FMA arithmetic, the down GEMV per pair. T = 1: Qwen3-30B-A3B 20.7 us
    (16 x 128: 33-54); DeepSeek-V3 97 (16 x 128: 92; 4 warps 118-156)."""
    return QuantizedConfig(block_m=16, block_n=16, block_k=block_k, act=ActQuant.NONE, num_warps=2, num_stages=3,
                           decode=True)


def _default_fp8(hidden: torch.Tensor, T: int, E: int, k: int, block_k: int) -> QuantizedConfig:
    """FP8 sorted-path tiles from the H200 sweeps at DeepSeek-V3's shape (NOTES.md, quantized tiles): w8a8
    wherever the GPU has FP8 tensor cores, the activations rounded once per row and 128 columns (w8a8_rows:
    transformers' and DeepSeek's own dynamic scheme) — faster than w8a16 and than rounding per tile at every T
    measured (1024: 4.26 vs 5.29 vs 9.10 ms; the w8a16 tile's conversion costs more than the FP8 weights save).
    Up to 8 rows per expert 16-row blocks with the activation fused into gate_up; from 16 rows, 32 then 64-row
    blocks with gate_up unfused (one accumulator, z stored, the activation a second pass: 4096 tokens 7.07 vs
    11.3 ms fused); above 32 rows both GEMMs' operands by TMA where the GPU has it (sm90: hidden quantized into
    sorted order first; T = 4096 DeepSeek-V3 5.70 vs 6.32 ms, Kimi-K2 6.98 vs 7.88, Qwen3-30B-A3B 0.76 vs 0.77;
    at 21-32 rows a tie or a loss: Kimi-K2 T = 1024 4.52 vs 4.44, NOTES "FP8 row passes and TMA measured").
    w8a16 (fp32 activations, GPUs without FP8 cores) the sweep's best w8a16 tiles."""
    rows = T * k / E
    if fp8_cores(hidden) and hidden.dtype != torch.float32 and block_k >= 32:
        if ACT_GROUP % block_k:  # scale blocks wider than the 128-column activation groups: round per tile
            return QuantizedConfig(block_m=16 if rows <= 32 else 64, block_n=128, block_k=block_k, act=ActQuant.TILE,
                                   num_warps=4 if rows <= 32 else 8, num_stages=3)
        if rows <= 8:
            return QuantizedConfig(block_m=16, block_n=128, block_k=block_k, act=ActQuant.ROWS, num_warps=4,
                                   num_stages=4 if rows <= 4 else 3)
        if rows <= 32:
            return QuantizedConfig(block_m=32, block_n=256, block_k=block_k, act=ActQuant.ROWS, num_warps=4,
                                   num_stages=3, fused_act=False)
        return QuantizedConfig(block_m=64, block_n=128, block_k=block_k, act=ActQuant.ROWS, num_warps=4,
                               num_stages=3, fused_act=False, tma=device.has_tma(device.index(hidden)))
    block_m = 16 if rows <= 8 else 32 if rows <= 32 else 64
    return QuantizedConfig(block_m=block_m, block_n=64 if block_m != 32 else 128, block_k=block_k, act=ActQuant.NONE,
                           num_warps=4, num_stages=3)


def cutlass_fp8_config(hidden: torch.Tensor, T: int, E: int, k: int, spec: QuantizedExpertsSpec,
                       weights: tuple[torch.Tensor, ...]) -> int:
    """The CUTLASS FP8 config (cutlass.FP8_CONFIGS index) the sorted path takes for these operands, or -1 (the
    Triton kernels): forced by MOE_COMPILER_CUTLASS=1 where the operands allow it, else by cutlass_fp8_choice."""
    choice, forced = cutlass_fp8_choice(T, E, k, hidden.shape[1]), cutlass.mode() == "1"
    if choice < 0 and not forced:  # (before the operand checks: host time on every call of a mid-size batch)
        return -1
    if not cutlass.fp8_runs(hidden, *weights, spec.scale_block_n, spec.scale_block_k, forced=forced):
        return -1
    # (forced where the rule says Triton: the tiles that were best from 48 rows per expert)
    return choice if choice >= 0 else cutlass.FP8_CONFIGS.index("coop_128x128_cluster1x2")


def cutlass_fp8_choice(T: int, E: int, k: int, H: int) -> int:
    """Where the CUTLASS FP8 GEMMs beat the Triton w8a8_rows path on the H200, and with which config (-1: they do
    not), from one run of `python -m benchmarks.bench_quantized --tokens 1024 4096 16384` (whole forward under a
    CUDA graph, us, Triton / best CUTLASS; benchmarks/NOTES.md "CUTLASS FP8"): DeepSeek-V3 3445 / 2988 (ping-pong
    64x128, 32 rows per expert), 5308 / 5029, 17397 / 15113; Kimi-K2 4396 / 4359 (21 rows: a tie), 6985 / 5177,
    18946 / 16105; Qwen3-235B-A22B 864 / 816 (64 rows), 2003 / 1811, 7333 / 6151; Qwen3-30B-A3B (H = 2048: short
    K loops, where CUTLASS's per-tile prologue and epilogue weigh more) 290 / 302 at 64 rows (Triton wins), 645 /
    628, 2159 / 1992. The 128 x 128 cooperative tiles in 1 x 2 clusters were best or within 4% at every point from
    48 rows per expert but Kimi-K2 T = 4096 (an outlier under the graph: 6922 vs 5177 unclustered, eager 5480 vs
    5345); 64-row ping-pong tiles below 48."""
    rows = T * k / E
    if rows < (24 if H >= 4096 else 128):
        return -1
    return cutlass.FP8_CONFIGS.index("pingpong_64x128" if rows < 48 else "coop_128x128_cluster1x2")


def int4_gemvs_suit(T: int, k: int, E: int) -> bool:
    """INT4 keeps the GEMVs past decode_suits while the pairs are at most twice the experts: the INT4 sorted path
    dequantizes every weight value per row block on CUDA cores before its tensor cores, so at a row or two per
    expert it loses to the GEMVs (each pair reads its expert's weights). H200 (NOTES "quantized GEMVs v6",
    measured): GEMVs vs sorted at DeepSeek-V3's shape T = 16 1029 vs 2433 us, T = 64 (T k = 2 E) 3970 vs 5212;
    Kimi-K2 T = 64 3998 vs 6556; Qwen3-30B-A3B T = 16 144 vs 244, and at T = 64 (T k = 4 E) the sorted path wins."""
    return T * k <= 2 * E


def _default_int4(T: int, E: int, k: int, I: int, decode: bool) -> QuantizedConfig:
    """INT4 tiles from the H200 sweeps (NOTES.md, quantized tiles / GEMVs v6): the GEMVs 16 rows of 512 values per
    program in nibble planes, 2 warps, the down GEMV per pair over 16 rows (Kimi-K2 T = 1 90 us, v4's 8 x 256 138.5;
    T = 16 1033 vs 8 x 256's 1247); 256 values where the down GEMV's K (I) is no multiple of 512 (Qwen3-30B-A3B,
    I = 768: T = 16 144 vs 163 us); the sorted path's block_m the rows per expert rounded up to a power of two in
    16..64, 128 columns, nibble planes at 16 rows (T = 8: 1543 vs 1813 us reshaped) and the reshaped tile above
    (T = 1024: 12.9 vs 17.6 ms)."""
    if decode:
        return QuantizedConfig(block_m=16, block_n=16, block_k=512 if I % 512 == 0 else 256, act=ActQuant.NONE,
                               num_warps=2, num_stages=3, decode=True, int4_planes=True, down_block_n=16)
    block_m = min(64, max(16, triton.next_power_of_2(int(-(-T * k // E)))))
    return QuantizedConfig(block_m=block_m, block_n=128, block_k=128, act=ActQuant.NONE, num_warps=4,
                           num_stages=3, int4_planes=block_m <= 16)


def is_int4(spec: QuantizedExpertsSpec) -> bool:
    return spec.weight_format is WeightFormat.INT4_PACKED
