"""Triton experts backward, sorted path: the op's gradients from grad_out and the forward's pre-activation
rows Z — saved by a training forward (ops/experts.py: experts_train), else recomputed from the op's inputs.
Nothing else of the forward is kept: no permuted X, no act, no Y (SonicMoE's dataflow, DESIGN §8).

Data contract (T tokens, k top-k, E experts, H hidden, I intermediate, S = T*k pairs; sorted positions as in
triton_align.py: sorted_rows [S_pad], pos [S], seg_end [E], expert e's rows starting at seg_end[e-1] rounded up
to BLOCK_M; s = the pair's router weight)
    dO          [T, H]          grad_out, hidden's dtype
    z           [S, 2I]         pre-activation rows (bias added) in pair order (row t*k + j), w_gate_up's row
                                order (concat or interleaved): saved by the forward, or recomputed
    act         [S_pad, I]      act(z) in sorted order, written by the dz kernel (or by the recompute)
    dz          [S_pad, 2I]     d loss / d z, same order as z
    ds_part     [S_pad, NI]     fp32, per I block: <dO[t] @ W_down[e], act> (+ <dO[t], b_down[e]> in block 0)
    dx_rows     [S_pad, H]      dz @ W_gate_up[e]: each pair's share of d hidden
    d hidden    [T, H]          sum of the token's k dx_rows in slot order
    d weights   [T, k]          sum of the pair's ds_part row, in block order
    dW_down     [E, H, I]       sum over e's rows of (s dO[t]) ⊗ act      } grouped GEMMs whose reduction runs over
    dW_gate_up  [E, 2I, H]      sum over e's rows of dz ⊗ x[t]            } each expert's rows (varlen K)
    d b_down [E, H], d b_gate_up [E, 2I]: the same left operands summed over e's rows

    backward_down:     (the half that reads z)
    align -> [gate_up GEMM storing z and act]            the forward's kernel (only without a saved z)
          -> [gathered dO @ W_down[e] ; act' epilogue]     -> dz, ds_part (and act, from a saved z)
          -> [wgrad (s dO[t])^T act] -> dW_down, d b_down
    backward_gate_up_rows:  (from dz; z may be freed before it: ops/experts.py calls the parts as three ops)
    align -> [wgrad dz^T x[t]]       -> dW_gate_up, d b_gate_up
          -> [dz @ W_gate_up[e]]     -> dx_rows         the forward's down kernel (dz's last read)
    backward_combine:       (from dx_rows; dz may be freed before it)
    align -> [combine over k]        -> d hidden        the forward's combine kernel

Nothing here is a function of the routing's values on the host: grids and buffers are sized from T, k, E and
the configs (CUDA-graph safe). Each output element is written by one program that reduces in a fixed order,
so the gradients are identical run to run. The router weight scaling the input (spec.scale_input, Llama-4)
is not covered: dispatch keeps the torch backward there.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..spec import ExpertsSpec, GateUpLayout
from . import backward_table, cutlass, device, launch, triton_backward_library, triton_config
from .torch_segment_mm import GroupedMM
from .triton_act import ACT_CODE, gated_act_backward
from .triton_align import AlignedRows, align_rows, gathered, max_blocks, zero_padding_rows
from .triton_config import KernelConfig, SortedConfig
from .triton_experts import (
    _block_rows,
    _tile_coords,
    dot_precision,
    launch_combine,
    launch_down,
    launch_gate_up,
    logical_strides,
)


class WGrad(enum.Enum):
    """How the two weight gradients reduce over each expert's rows."""

    # _wgrad_kernel: one Triton GEMM per gradient gathering token rows by pointer inside its K loop (no copies).
    TRITON = "triton"
    # Token rows copied into padded sorted order (padding rows zeroed), then torch's grouped GEMM, 2-D x 2-D with
    # offs along the reduction (CUTLASS on sm90, bf16): [S_pad, H] x 2 more memory, the library's tiles
    # (triton_backward_library.py). Where its operands do not suit it (not bf16 on sm90+, rows not 16-byte
    # aligned), TRITON.
    GROUPED_MM = "grouped_mm"


class DGrad(enum.Enum):
    """How dz (through W_down, act' after it) and d hidden's rows (through W_gate_up) are computed."""

    # _dz_kernel: gathered dO @ W_down[e] with act' in its epilogue; the forward's down kernel over dz.
    TRITON = "triton"
    # dO gathered into padded sorted order once (the weight gradients read it too), both GEMMs by torch's grouped
    # GEMM (2-D x 3-D), act' as a row pass between them (triton_backward_library.dz_rows). Implies the library
    # weight gradients. Where the operands do not suit it, TRITON.
    GROUPED_MM = "grouped_mm"


class GroupedTile(enum.Enum):
    """Which of torch's two sm90 bf16 grouped GEMM kernels the library's 2-D x 3-D GEMMs (dA = G @ W_down[e], dx_rows
    = dz @ W_gate_up[e]) run. torch picks it from the operands' sizes, not from offs (aten/src/ATen/native/cuda/
    GroupMM.cu as read in torch's main branch; benchmarks/probes/probe_grouped_tile.py times both kernels on the
    torch it runs): rows of mat_a // E <= 128 (or N <= 128) gives a 64 x 128 x 128 ping-pong kernel,
    else a 128 x 256 x 64 cooperative one. So the kernel follows the buffer's row count, which BackwardConfig's
    padding changes: DeepSeek-V3 at T = 4096 has 32768 rows over 256 experts, 128 each unpadded (ping-pong) and
    144 with the 16-row padding's bound (cooperative). The 2-D x 2-D weight gradients (N and M: H, I) always get
    the cooperative kernel."""

    TORCH = "torch"  # the buffers' own row count decides
    # every [S_pad, .] buffer of at least (GROUPED_SMALL_ROWS + 1) * E rows (trailing slots no routing uses): the
    # cooperative kernel whatever T is. The memory of the extra rows where S_pad is below that.
    LARGE = "large"


GROUPED_SMALL_ROWS = 128  # torch's bound on mat_a's rows per expert for its small-tile kernel (GroupedTile)


def large_tile_pays(num_pairs: int, E: int) -> bool:
    """Whether the default takes GroupedTile.LARGE for unpadded rows: torch would pick its ping-pong kernel
    (fewer than 129 rows per expert on average) and there are more than 112. Measured (H100, benchmarks/NOTES.md
    session 53, probe_grouped_tile): at exactly 128 rows per expert the cooperative kernel runs dA and dx 1.12-1.42x
    faster at every shape probed (DeepSeek-V3 T = 4096: 1.35 / 1.34x, the op's forward + backward 1.07x); at 64-96
    rows torch's pick is right or within 5%. The extra rows (129 E - T k) stay under the 17 E the 16-row padding's
    bound had."""
    return (GROUPED_SMALL_ROWS - 16) * E < num_pairs < (GROUPED_SMALL_ROWS + 1) * E  # torch: S // E <= 128


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    # block_m, the recompute's tile (gate_up) and the d hidden GEMM's tile (down: K = 2I, N = H).
    rows: SortedConfig
    # gathered dO @ W_down[e]: block_n over I, block_k over H.
    dz: KernelConfig
    # weight gradients: block_m output rows (of H or 2I) x block_n columns (of I or H), block_k sorted rows
    # per reduction step.
    wgrad_m: int
    wgrad: KernelConfig
    wgrad_path: WGrad = WGrad.TRITON
    dgrad_path: DGrad = DGrad.TRITON
    # Each expert's rows unpadded (aligned to 1, not to rows.block_m): only where every GEMM of the backward is the
    # library's (torch's grouped GEMMs take segments of any length) and z is saved (the recompute is a Triton GEMM
    # over rows.block_m tiles). No padding rows in any [S_pad, .] buffer or GEMM (DeepSeek-V3, E = 256, T = 4096:
    # up to 3840 padding rows at block 16, 55 MiB per [S_pad, H] buffer; the train step's peak, NOTES session 49).
    unpadded: bool = False
    grouped_tile: GroupedTile = GroupedTile.TORCH
    # DGrad.GROUPED_MM's two 2-D x 3-D GEMMs (dA = G @ W_down[e], dx_rows = dz @ W_gate_up[e]) on csrc/'s CUTLASS
    # grouped GEMM with tile, cluster and schedule cutlass.CONFIGS[cutlass], instead of torch's pick (-1). Above the
    # GroupedTile band torch has one kernel (128 x 256 cooperative) for every shape; at 256 rows per expert
    # (Qwen3-235B-A22B, T = 4096, H100) the 64 x 256 ping-pong tile ran dA and dx 1.14x faster, at Mixtral-8x7B
    # T = 32768 the 1 x 2-cluster 128 x 256 tile 1.06-1.11x, and ours lost up to 1% elsewhere (probe_grouped_tile,
    # benchmarks/NOTES.md session 53): the default takes one only where this GPU's table measured it faster
    # (backward_table, _call_default_config).
    cutlass: int = -1
    # WGrad.GROUPED_MM's weight gradients (2-D x 2-D, each expert's rows the reduction: dW_down = G^T act_s, dW_gate_up
    # = dz^T X) on csrc/'s grouped_mm_wgrad with tile cutlass.WGRAD_CONFIGS[wgrad_cutlass], instead of torch's pick
    # (-1). A weight gradient's output is the size of the weights and its K loop one expert's rows (DeepSeek-V3, T =
    # 4096: 7.5 GB of dW_down written over 128-row reductions), so the choice of a tile whose epilogue overlaps the
    # next tile's main loop may matter; taken only where this GPU's table measured it faster (backward_table).
    # Independent of grouped_tile: the library reads each segment's rows only, whatever the buffer's size.
    wgrad_cutlass: int = -1

    def __post_init__(self):
        if self.rows.combine is not triton_config.Combine.GATHER or self.rows.tma:
            raise ValueError("BackwardConfig.rows: the backward uses the gather combine and pointer loads")
        triton_config._pow2("wgrad_m", self.wgrad_m, 16, 256)
        if self.unpadded and (self.wgrad_path, self.dgrad_path) != (WGrad.GROUPED_MM, DGrad.GROUPED_MM):
            raise ValueError("BackwardConfig.unpadded: only with every GEMM by the library (wgrad_path and "
                             "dgrad_path GROUPED_MM); the Triton GEMMs tile rows by rows.block_m")
        if self.grouped_tile is not GroupedTile.TORCH and (self.wgrad_path, self.dgrad_path) != (
                WGrad.GROUPED_MM, DGrad.GROUPED_MM):
            raise ValueError(f"BackwardConfig.grouped_tile {self.grouped_tile.value}: only with every GEMM by the "
                             "library (wgrad_path and dgrad_path GROUPED_MM); it sizes the library's operands")
        if not -1 <= self.cutlass < len(cutlass.CONFIGS):
            raise ValueError(f"BackwardConfig.cutlass {self.cutlass}: expected -1 (torch's grouped GEMM) or an index "
                             f"into cutlass.CONFIGS (0-{len(cutlass.CONFIGS) - 1})")
        if self.cutlass >= 0 and (self.dgrad_path, self.grouped_tile) != (DGrad.GROUPED_MM, GroupedTile.TORCH):
            raise ValueError(f"BackwardConfig.cutlass {cutlass.CONFIGS[self.cutlass]}: only with dgrad_path GROUPED_MM "
                             "(the library's dA and dx GEMMs) and grouped_tile TORCH (LARGE sizes buffers for torch's "
                             "pick; CUTLASS's tile does not follow them)")
        if not -1 <= self.wgrad_cutlass < len(cutlass.WGRAD_CONFIGS):
            raise ValueError(f"BackwardConfig.wgrad_cutlass {self.wgrad_cutlass}: expected -1 (torch's grouped GEMM) "
                             f"or an index into cutlass.WGRAD_CONFIGS (0-{len(cutlass.WGRAD_CONFIGS) - 1})")
        if self.wgrad_cutlass >= 0 and self.wgrad_path is not WGrad.GROUPED_MM:
            raise ValueError(f"BackwardConfig.wgrad_cutlass {cutlass.WGRAD_CONFIGS[self.wgrad_cutlass]}: only with "
                             "wgrad_path GROUPED_MM (the library's weight-gradient GEMMs)")

    @property
    def row_align(self) -> int:
        """What each expert's rows are padded to in sorted order (align_rows' block_m)."""
        return 1 if self.unpadded else self.rows.block_m

    @property
    def library_mm(self):
        """The segment matmuls of the library backward (torch_segment_mm's interface): dA and dx_rows (mm, mm_nn)
        on `cutlass`'s choice, the weight gradients (wgrad) on `wgrad_cutlass`'s."""
        return cutlass.backward_mm(self.cutlass, self.wgrad_cutlass)

    def min_slots(self, E: int) -> int:
        """The fewest sorted slots (S_pad) the backward's buffers have: align_rows' min_slots (GroupedTile)."""
        return (GROUPED_SMALL_ROWS + 1) * E if self.grouped_tile is GroupedTile.LARGE else 0


# The row block of the library backward where z is recomputed (by the forward's Triton gate_up GEMM, over tiles of
# this many rows): torch's grouped GEMMs take segments of any length, so padding to the smallest tile is enough —
# fewer padded rows than the forward's tile gives (Mixtral-8x7B, T = 4096: 8192 rows padded to a bound of 9216 at
# block 128, 8320 at 16; NOTES.md session 34). With z saved, the rows are not padded at all (unpadded).
LIBRARY_BLOCK_M = 16


def library_rows(hidden: torch.Tensor, I: int, weights: tuple[torch.Tensor, ...]) -> bool:
    """Whether the default backward runs every GEMM by the library (DGrad.GROUPED_MM): sizes, dtype, device and the
    weights' 16-byte aligned bases (a fake's by its storage offset, as Inductor, which copies a misaligned input it
    assumed aligned, decides it), so that the op's fake and its real calls choose alike."""
    return GroupedMM.takes(hidden, (hidden.shape[1], I, 2 * I), weights)


def default_config(dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int, library: bool = False,
                   saved: bool = True) -> BackwardConfig:
    """Untuned per shape: every GEMM of the backward by torch's grouped GEMM where it takes the operands
    (DGrad.GROUPED_MM; H200, op forward + backward with the saved Z, T = 32768: Qwen3-30B-A3B 19.7 -> 16.7 ms,
    Mixtral-8x7B 139.1 -> 117.6 ms, GPT-OSS-20B 43.6 -> 38.4 ms against dz and d hidden by Triton; benchmarks/NOTES.md
    "train step v4"), else the Triton kernels: weight gradients with 128 x 128 tiles reducing 64 rows a step,
    8 warps (the best of probe_backward's sweep, NOTES "backward tiles"); dz and d hidden with the forward's
    sorted-path defaults. `library` (library_rows): rows unpadded where z is `saved`, else padded to
    LIBRARY_BLOCK_M (the recompute's tiles); unpadded, GroupedTile.LARGE where large_tile_pays."""
    rows = triton_config.default_sorted_config(dtype, E, k, T)
    if library:
        rows = dataclasses.replace(rows, block_m=LIBRARY_BLOCK_M)
    unpadded = library and saved
    tile = GroupedTile.LARGE if unpadded and large_tile_pays(T * k, E) else GroupedTile.TORCH
    return BackwardConfig(rows=rows, dz=rows.gate_up, wgrad_m=128,
                          wgrad=KernelConfig(block_n=128, block_k=64, num_warps=8, num_stages=3),
                          wgrad_path=WGrad.GROUPED_MM, dgrad_path=DGrad.GROUPED_MM, unpadded=unpadded,
                          grouped_tile=tile)


@triton.jit(do_not_specialize=["GROUP_M"])
def _dz_kernel(
    g_ptr, w_ptr, b_ptr, z_ptr, dz_ptr, act_ptr, ds_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr,
    num_padded_ptr,
    H, I, TOP_K, alpha, limit, GROUP_M,
    stride_gm, stride_we, stride_wk, stride_wn, stride_be, stride_zm, stride_dzm, stride_am, stride_dsm,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    STORE_ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dz = act'(z) applied to s * (dO[t] @ W_down[e]) (the down GEMM's input gradient), and the router
    weight's partial gradients <dO[t] @ W_down[e], act(z)> per I block: a gather-GEMM like the forward's
    gate_up, reducing over H, with W_down read as [H, I] per expert. z is read at each pair's row; with
    STORE_ACT the act(z) it computes is stored at the sorted slot (the weight gradient's operand)."""
    num_pid_n = tl.cdiv(I, BLOCK_N)
    num_tiles = tl.load(num_padded_ptr) // BLOCK_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_tiles // num_pid_n, num_pid_n, GROUP_M)
        expert, slots, rows, valid = _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, BLOCK_M)
        tok = (rows // TOP_K).to(tl.int64)
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % I
        kk = tl.arange(0, BLOCK_K)
        g_ptrs = g_ptr + tok[:, None] * stride_gm + kk[None, :]
        w_ptrs = w_ptr + expert * stride_we + kk[:, None] * stride_wk + n[None, :].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        bias_dot = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                g = tl.load(g_ptrs)
                w = tl.load(w_ptrs)
            else:
                g = tl.load(g_ptrs, mask=(kk[None, :] < H - k0), other=0.0)
                w = tl.load(w_ptrs, mask=(kk[:, None] < H - k0), other=0.0)
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:  # <dO[t], b_down[e]>: the bias's share of the router weight's gradient
                b = tl.load(b_ptr + expert * stride_be + k0 + kk, mask=(kk < H - k0), other=0.0).to(tl.float32)
                bias_dot += tl.sum(g.to(tl.float32) * b[None, :], axis=1)
            g_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = valid[:, None] & (n_out < I)[None, :]
        if INTERLEAVED:
            gate_cols, up_cols = 2 * n_out, 2 * n_out + 1
        else:
            gate_cols, up_cols = n_out, I + n_out
        z_rows = z_ptr + rows[:, None].to(tl.int64) * stride_zm
        gate = tl.load(z_rows + gate_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(z_rows + up_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        d_gate, d_up, a = gated_act_backward(acc * s[:, None], gate, up, alpha, limit, ACT)
        dz_rows = dz_ptr + slots[:, None] * stride_dzm
        tl.store(dz_rows + gate_cols[None, :], d_gate.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_rows + up_cols[None, :], d_up.to(dz_ptr.dtype.element_ty), mask=mask)
        if STORE_ACT:
            tl.store(act_ptr + slots[:, None] * stride_am + n_out[None, :], a.to(act_ptr.dtype.element_ty), mask=mask)
        part = tl.sum(tl.where(mask, acc * a, 0.0), axis=1)
        if HAS_BIAS:
            part += tl.where(pid_n == 0, bias_dot, 0.0)
        tl.store(ds_ptr + slots * stride_dsm + pid_n, part, mask=valid)


@triton.jit
def _wgrad_kernel(
    l_ptr, r_ptr, out_ptr, db_ptr, topk_w_ptr, sorted_rows_ptr, seg_end_ptr,
    N1, N2, TOP_K,
    stride_lm, stride_rm, stride_oe, stride_o1, stride_o2, stride_dbe,
    L_GATHER: tl.constexpr, L_SCALE: tl.constexpr, R_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN_M: tl.constexpr,
    BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[e] = sum over expert e's sorted rows r of L[r] ⊗ R[r] ([N1, N2] per expert, fp32 accumulation);
    a row's L / R is a token's row (gathered: token = pair // k) or the sorted slot's row; L optionally scaled
    by the pair's router weight. With HAS_BIAS, db[e] = sum of L[r]. An expert without rows gets zeros."""
    pid = tl.program_id(0)
    blocks_1, blocks_2 = tl.cdiv(N1, BLOCK_1), tl.cdiv(N2, BLOCK_2)
    e = pid // (blocks_1 * blocks_2)
    p1 = (pid // blocks_2) % blocks_1
    p2 = pid % blocks_2
    end = tl.load(seg_end_ptr + e)
    prev = tl.load(seg_end_ptr + tl.maximum(e - 1, 0))
    start = tl.where(e > 0, tl.cdiv(prev, ALIGN_M) * ALIGN_M, 0)  # segments begin on ALIGN_M boundaries
    n1 = p1 * BLOCK_1 + tl.arange(0, BLOCK_1)
    n2 = p2 * BLOCK_2 + tl.arange(0, BLOCK_2)
    acc = tl.zeros([BLOCK_1, BLOCK_2], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_1], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = r < end
        pair = tl.load(sorted_rows_ptr + r, mask=ok, other=0)
        tok = (pair // TOP_K).to(tl.int64)
        l_rows = tok if L_GATHER else r.to(tl.int64)
        r_rows = tok if R_GATHER else r.to(tl.int64)
        left = tl.load(l_ptr + l_rows[:, None] * stride_lm + n1[None, :], mask=ok[:, None] & (n1 < N1)[None, :],
                       other=0.0)
        if L_SCALE:
            s = tl.load(topk_w_ptr + pair, mask=ok, other=0.0).to(tl.float32)
            left = (left.to(tl.float32) * s[:, None]).to(l_ptr.dtype.element_ty)
        right = tl.load(r_ptr + r_rows[:, None] * stride_rm + n2[None, :], mask=ok[:, None] & (n2 < N2)[None, :],
                        other=0.0)
        acc = tl.dot(tl.trans(left), right, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            bacc += tl.sum(left.to(tl.float32), axis=0)
    e64 = e.to(tl.int64)
    out = out_ptr + e64 * stride_oe + n1[:, None].to(tl.int64) * stride_o1 + n2[None, :].to(tl.int64) * stride_o2
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(n1 < N1)[:, None] & (n2 < N2)[None, :])
    if HAS_BIAS:
        if p2 == 0:  # one program per (expert, row block) writes the bias gradient
            tl.store(db_ptr + e64 * stride_dbe + n1, bacc.to(db_ptr.dtype.element_ty), mask=n1 < N1)


def launch_wgrad(left, right, out, d_bias, weights, rows: AlignedRows, k: int, config: BackwardConfig, *,
                 left_gather: bool, left_scale: bool, right_gather: bool, out_strides: tuple[int, int, int]):
    N1, N2 = left.shape[1], right.shape[1]
    E = rows.seg_end.numel()
    wg = config.wgrad
    grid = (E * triton.cdiv(N1, config.wgrad_m) * triton.cdiv(N2, wg.block_n),)
    launch.kernel(_wgrad_kernel)[grid](
        left, right, out, d_bias if d_bias is not None else out, weights, rows.sorted_rows, rows.seg_end,
        N1, N2, k,
        left.stride(0), right.stride(0), *out_strides, d_bias.stride(0) if d_bias is not None else 0,
        L_GATHER=left_gather, L_SCALE=left_scale, R_GATHER=right_gather, HAS_BIAS=d_bias is not None,
        DOT_PRECISION=dot_precision(left.dtype), ALIGN_M=config.rows.block_m,
        BLOCK_1=config.wgrad_m, BLOCK_2=wg.block_n, BLOCK_R=wg.block_k, num_warps=wg.num_warps,
        num_stages=wg.num_stages,
    )


def launch_dz(grad_out, rows: AlignedRows, w_down, b_down, z, dz, ds_part, weights, spec: ExpertsSpec,
              config: BackwardConfig, k: int, act=None):
    """dz [S_pad, 2I] and ds_part from grad_out and z [S, 2I]; with `act` [S_pad, I], act(z) stored there too."""
    H, I = grad_out.shape[1], dz.shape[1] // 2
    c = config.dz
    grid = (rows.max_blocks * triton.cdiv(I, c.block_n),)
    stride_e, stride_h, stride_i = logical_strides(w_down, spec.transposed)
    launch.kernel(_dz_kernel)[grid](
        grad_out, w_down, b_down if b_down is not None else w_down, z, dz, act if act is not None else dz, ds_part,
        weights,
        rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        H, I, k, float(spec.swiglu_alpha), float(spec.swiglu_limit), config.rows.group_m,
        grad_out.stride(0), stride_e, stride_h, stride_i, b_down.stride(0) if b_down is not None else 0,
        z.stride(0), dz.stride(0), act.stride(0) if act is not None else 0, ds_part.stride(0),
        ACT=ACT_CODE[spec.activation], INTERLEAVED=spec.gate_up is GateUpLayout.INTERLEAVED,
        HAS_BIAS=b_down is not None, EVEN_K=H % c.block_k == 0, STORE_ACT=act is not None,
        DOT_PRECISION=dot_precision(grad_out.dtype),
        BLOCK_M=config.rows.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps,
        num_stages=c.num_stages,
    )


class DownGrads(NamedTuple):
    """The backward's first half (backward_down): everything that reads z, and dz for the second half."""

    dz: torch.Tensor  # [S_pad, 2I] in padded sorted order (align_rows at config.row_align)
    d_weights: torch.Tensor  # [T, k], topk_weights' dtype
    d_w_down: torch.Tensor | None
    d_b_down: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class _Call:
    """What both halves of one backward derive alike from the op's inputs: sizes, config, the aligned rows and
    the GEMM paths (from dtypes, sizes and alignment only, so the two halves always agree)."""

    T: int
    k: int
    H: int
    I: int
    config: BackwardConfig
    rows: AlignedRows
    hidden: torch.Tensor  # unit column stride
    weights: torch.Tensor  # [T*k], unit stride
    library_dgrad: bool  # dz and d hidden's rows by torch's grouped GEMM (triton_backward_library)
    library_wgrad: bool  # the weight gradients by torch's grouped GEMM

    @classmethod
    def of(cls, hidden, topk_ids, topk_weights, w_gate_up, w_down, spec: ExpertsSpec,
           config: BackwardConfig | None, saved: bool = True) -> _Call:
        """`saved`: whether z comes from the forward (else the backward recomputes it)."""
        if spec.scale_input:
            raise ValueError("moe_compiler: the Triton backward does not cover scale_input; use the torch backward")
        T, H = hidden.shape
        k = topk_ids.shape[1]
        E = w_gate_up.shape[0]
        I = spec.intermediate(w_down)
        library = library_rows(hidden, I, (w_gate_up, w_down))
        if config is None:
            config = _call_default_config(hidden, k, E, I, library, saved, (w_gate_up, w_down), spec.transposed)
        elif config.unpadded and not (library and saved):
            raise ValueError(
                "moe_compiler: BackwardConfig.unpadded needs every GEMM by torch's grouped GEMM (bf16 on sm90+, rows "
                f"and weights 16-byte aligned: {'yes' if library else 'no'}) and a saved z "
                f"({'yes' if saved else 'no'}); pass a config with unpadded=False")
        weights = topk_weights.reshape(-1)
        return cls(T, k, H, I, config, align_rows(topk_ids, E, config.row_align, min_slots=config.min_slots(E)),
                   hidden if hidden.stride(1) == 1 else hidden.contiguous(),
                   weights if weights.stride(0) == 1 else weights.contiguous(),
                   library and config.dgrad_path is DGrad.GROUPED_MM,
                   library and (config.dgrad_path is DGrad.GROUPED_MM or config.wgrad_path is WGrad.GROUPED_MM))


def _call_default_config(hidden, k: int, E: int, I: int, library: bool, saved: bool, weights: tuple,
                         transposed: bool) -> BackwardConfig:
    """The default config of a call on hidden [T, H] (library: library_rows), from sizes, dtype, device, the
    weights' alignment and this GPU's measured table alone: what _Call.of runs and dz_shape (the fake) sizes dz by.
    A symbolic T (dynamic shapes) takes its band's config, guarded, as the forward's does
    (triton_config.config_tokens). Where the table (backward_table) names a CUTLASS config for dA and dx, or for the
    weight gradients, at a fixed T and the extension runs here, BackwardConfig.cutlass / wgrad_cutlass take it."""
    T, H = hidden.shape
    config = default_config(hidden.dtype, E, k, H, I, triton_config.config_tokens(T)[0], library, saved)
    if not isinstance(T, int):
        # large_tile_pays holds at the band's grid point, not at every length the graph serves: most of those have
        # more rows per expert (torch's cooperative kernel anyway) or far fewer (extra rows, a kernel not measured);
        # the table's choice likewise
        return dataclasses.replace(config, grouped_tile=GroupedTile.TORCH)
    if config.unpadded and config.cutlass < 0 and config.wgrad_cutlass < 0 and hidden.is_cuda:
        dgrad, wgrad = backward_table.configs(device.gpu_name(device.index(hidden)), hidden.dtype, E, k, H, I, T,
                                              transposed)
        if (dgrad >= 0 or wgrad >= 0) and cutlass.runs(hidden, *weights):
            if dgrad >= 0:
                config = dataclasses.replace(config, cutlass=dgrad, grouped_tile=GroupedTile.TORCH)
            config = dataclasses.replace(config, wgrad_cutlass=wgrad)
    return config


def dz_shape(hidden, topk_ids, w_gate_up, w_down, spec: ExpertsSpec) -> tuple[int, int]:
    """backward_down's dz at the default config, z saved: [S_pad, 2I], S_pad the aligned rows' static bound (an
    expression of T where T is symbolic). The fake's view."""
    k = topk_ids.shape[1]
    E = w_gate_up.shape[0]
    I = spec.intermediate(w_down)
    library = library_rows(hidden, I, (w_gate_up, w_down))
    config = _call_default_config(hidden, k, E, I, library, True, (w_gate_up, w_down), spec.transposed)
    align = config.row_align
    return max_blocks(hidden.shape[0] * k, E, align, config.min_slots(E)) * align, 2 * I


def experts_backward(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                     spec: ExpertsSpec, config: BackwardConfig | None = None, weight_grads: bool = True, z=None):
    """(d_hidden, d_topk_weights, d_w_gate_up, d_w_down, d_b_gate_up, d_b_down), absent biases -> None, the
    weights' and biases' None without weight_grads (their two kernels not launched); the contract of
    torch_experts.experts_backward. `z` [T*k, 2I]: the pre-activation rows a training forward saved
    (triton_experts.experts_forward's z), else None: recomputed. T > 0, k > 0, not spec.scale_input; sizes
    checked by the op. backward_down then backward_gate_up (backward_gate_up_rows, backward_combine): the op's
    backward calls the three as ops of their own, so that a compiled backward frees z, then dz, between them."""
    # one align for both halves
    c = _Call.of(hidden, topk_ids, topk_weights, w_gate_up, w_down, spec, config, z is not None)
    down = backward_down(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec,
                         config, weight_grads, z, call=c)
    d_hidden, d_w_gate_up, d_b_gate_up = backward_gate_up(down.dz, hidden, topk_ids, topk_weights, w_gate_up,
                                                          w_down, b_gate_up, spec, config, weight_grads, call=c)
    return d_hidden, down.d_weights, d_w_gate_up, down.d_w_down, d_b_gate_up, down.d_b_down


def backward_down(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                  spec: ExpertsSpec, config: BackwardConfig | None = None, weight_grads: bool = True,
                  z=None, *, call: _Call | None = None) -> DownGrads:
    """The half that reads z (saved, or recomputed here from the inputs): dz, the router weights' gradient and
    W_down's (without weight_grads: None). z is not read after it returns. `call`: the inputs' _Call, where the
    caller has it."""
    c = call or _Call.of(hidden, topk_ids, topk_weights, w_gate_up, w_down, spec, config, z is not None)
    T, k, I, config, rows = c.T, c.k, c.I, c.config, c.rows
    grad_out = grad_out.to(hidden.dtype)
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    S_pad = rows.sorted_rows.numel()
    saved = z is not None
    if saved and (z.shape != (T * k, 2 * I) or z.dtype != hidden.dtype or z.stride(1) != 1):
        raise ValueError(f"moe_compiler: saved z: expected [{T * k}, {2 * I}] {hidden.dtype} with unit column "
                         f"stride, got {list(z.shape)} {z.dtype} strides {z.stride()}")
    act = None
    if not saved:
        z, act = launch.empty(hidden, T * k, 2 * I), launch.empty(hidden, S_pad, I)
        launch_gate_up(c.hidden, rows, w_gate_up, b_gate_up, spec, config.rows, k, act, c.weights, z=z)
    if c.library_dgrad:
        return _library_down(grad_out, z, c, w_down, b_down, spec, weight_grads, topk_weights.dtype)
    if act is None:
        act = launch.empty(hidden, S_pad, I)

    dz = launch.empty(hidden, S_pad, 2 * I)
    ds_part = launch.empty(hidden, S_pad, triton.cdiv(I, config.dz.block_n), dtype=torch.float32)
    launch_dz(grad_out, rows, w_down, b_down, z, dz, ds_part, c.weights, spec, config, k,
              act=act if saved else None)
    if weight_grads and c.library_wgrad:
        # the library's dW_gate_up sums over whole padded segments: dz's padding rows (unwritten by the Triton dz
        # kernel) are zeroed here, in the op that makes dz, not in backward_gate_up_rows, whose op must not mutate
        # its inputs
        zero_padding_rows(dz, rows, config.row_align)
    pos = rows.pos.long()
    # a sentinel pair (pos -1) has no row: its weight gets no gradient
    d_weights = torch.where(pos >= 0, ds_part[pos.clamp(min=0)].sum(-1), 0.0).view(T, k).to(topk_weights.dtype)
    if not weight_grads:
        return DownGrads(dz, d_weights, None, None)
    if c.library_wgrad:
        lib = triton_backward_library
        bm = config.row_align
        # Each [S_pad, H] buffer (this gathered operand; dx_rows and the gathered x of backward_gate_up) is dropped
        # as soon as it is read, so that the backward's peak holds one of them, not three.
        scaled_do = gathered(grad_out, rows, c.weights, k, bm, scale=True)  # [S_pad, H]: s * dO[t]
        ones = scaled_do.new_ones(scaled_do.shape[0], 8) if b_down is not None else None
        d_w_down, d_b_down = lib.down_grads(scaled_do, zero_padding_rows(act, rows, bm), lib.segments(rows, bm),
                                            spec.transposed, ones, config.library_mm)
        return DownGrads(dz, d_weights, *_like((d_w_down, w_down), (d_b_down, b_down)))
    d_w_down = launch.empty_like(w_down)
    d_b_down = launch.empty_like(b_down) if b_down is not None else None
    launch_wgrad(grad_out, act, d_w_down, d_b_down, c.weights, rows, k, config, left_gather=True, left_scale=True,
                 right_gather=False, out_strides=logical_strides(d_w_down, spec.transposed))
    return DownGrads(dz, d_weights, d_w_down, d_b_down)


def backward_gate_up(dz, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, spec: ExpertsSpec,
                     config: BackwardConfig | None = None, weight_grads: bool = True, *, call: _Call | None = None):
    """(d_hidden, d_w_gate_up, d_b_gate_up) from backward_down's dz (the same inputs and config: without `call`,
    the rows are aligned again, identically); the weight and bias gradients None without weight_grads.
    backward_gate_up_rows then backward_combine (the op's backward calls them as ops of their own)."""
    c = call or _Call.of(hidden, topk_ids, topk_weights, w_gate_up, w_down, spec, config)
    dx_rows, d_w_gate_up, d_b_gate_up = backward_gate_up_rows(dz, hidden, topk_ids, topk_weights, w_gate_up, w_down,
                                                              b_gate_up, spec, config, weight_grads, call=c)
    return backward_combine(dx_rows, hidden, topk_ids, topk_weights, w_gate_up, w_down, spec, config, call=c), \
        d_w_gate_up, d_b_gate_up


def backward_gate_up_rows(dz, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, spec: ExpertsSpec,
                          config: BackwardConfig | None = None, weight_grads: bool = True, *,
                          call: _Call | None = None):
    """(dx_rows [S_pad, H], d_w_gate_up, d_b_gate_up) from backward_down's dz: the weight gradients first (their
    gathered x rows dropped before dx_rows exists), then dz's last read, dx_rows = dz @ W_gate_up[e] per slot —
    d hidden's rows, not yet summed over each token's k slots (backward_combine). d hidden is not made here so
    that a compiled backward, which frees dz when this returns, never holds dz and d hidden together: at the
    weight gradient's allocation, the train step's peak (Mixtral-8x7B's, NOTES.md session 34), the step holds dz,
    one [S_pad, H] buffer and dW_gate_up, not d hidden too."""
    c = call or _Call.of(hidden, topk_ids, topk_weights, w_gate_up, w_down, spec, config)
    H, config, rows = c.H, c.config, c.rows
    if dz.shape != (rows.sorted_rows.numel(), 2 * c.I) or dz.dtype != hidden.dtype or dz.stride(1) != 1:
        raise ValueError(f"moe_compiler: dz: expected [{rows.sorted_rows.numel()}, {2 * c.I}] {hidden.dtype} with "
                         f"unit column stride (backward_down's), got {list(dz.shape)} {dz.dtype} strides {dz.stride()}")
    bm = config.row_align
    lib = triton_backward_library
    d_w_gate_up = d_b_gate_up = None
    if weight_grads and c.library_wgrad:
        # dz's padding rows are 0: from the library's row pass, or zeroed by backward_down after the Triton dz kernel
        d_w, d_b = lib.gate_up_grads(dz, c.hidden, rows, c.weights, k=c.k, seg=lib.segments(rows, bm), block_m=bm,
                                     transposed=spec.transposed, bias=b_gate_up is not None, mm=config.library_mm)
        d_w_gate_up, d_b_gate_up = _like((d_w, w_gate_up), (d_b, b_gate_up))
    elif weight_grads:
        d_w_gate_up = launch.empty_like(w_gate_up)
        d_b_gate_up = launch.empty_like(b_gate_up) if b_gate_up is not None else None
        launch_wgrad(dz, c.hidden, d_w_gate_up, d_b_gate_up, c.weights, rows, c.k, config, left_gather=False,
                     left_scale=False, right_gather=True, out_strides=logical_strides(d_w_gate_up, spec.transposed))
    if c.library_dgrad:
        dx_rows = lib.hidden_rows(dz, w_gate_up, lib.segments(rows, bm), spec, config.library_mm)
    else:
        # the forward's down GEMM over dz with W_gate_up read as [H, 2I] per expert (the transpose of its layout),
        # no router weight (scale_input=True skips it)
        dx_spec = dataclasses.replace(spec, transposed=not spec.transposed, scale_input=True)
        dx_rows = launch.empty(hidden, dz.shape[0], H)
        launch_down(dz, rows, w_gate_up, None, c.weights, dx_spec, config.rows, c.k, dx_rows)
    return dx_rows, d_w_gate_up, d_b_gate_up


def backward_combine(dx_rows, hidden, topk_ids, topk_weights, w_gate_up, w_down, spec: ExpertsSpec,
                     config: BackwardConfig | None = None, *, call: _Call | None = None):
    """d hidden [T, H] from backward_gate_up_rows's dx_rows: each token's k rows summed in slot order (the
    forward's deterministic combine)."""
    c = call or _Call.of(hidden, topk_ids, topk_weights, w_gate_up, w_down, spec, config)
    if dx_rows.shape != (c.rows.sorted_rows.numel(), c.H) or dx_rows.dtype != hidden.dtype:
        raise ValueError(f"moe_compiler: dx_rows: expected [{c.rows.sorted_rows.numel()}, {c.H}] {hidden.dtype} "
                         f"(backward_gate_up_rows's), got {list(dx_rows.shape)} {dx_rows.dtype}")
    d_hidden = launch.empty(hidden, c.T, c.H)
    launch_combine(dx_rows, c.rows, c.k, d_hidden)
    return d_hidden


def _library_down(grad_out, z, c: _Call, w_down, b_down, spec: ExpertsSpec, weight_grads: bool,
                  weights_dtype) -> DownGrads:
    """DGrad.GROUPED_MM's first half: dA and dz by torch's grouped GEMM and the row pass, then dW_down while G
    and act_s are live (dropped on return: backward_gate_up starts without them); or, where this half would be
    the backward's peak, dW_down first and dA in row chunks (triton_backward_library.first_half_chunks)."""
    lib = triton_backward_library
    bm = c.config.row_align
    chunks = lib.first_half_chunks(c.rows.sorted_rows.numel(), c.T * c.k, c.H, c.I, w_down.shape[0], weight_grads)
    if chunks > 1:
        dz, d_weights, d_w_down, d_b_down = lib.dz_rows_chunked(grad_out, z, c.rows, w_down, b_down, c.weights, spec,
                                                                c.k, bm, chunks, weight_grads, c.config.library_mm)
        return DownGrads(dz, d_weights.to(weights_dtype), *_like((d_w_down, w_down), (d_b_down, b_down)))
    G, dz, act_s, d_weights, seg, bias_weights = lib.dz_rows(grad_out, z, c.rows, w_down, b_down, c.weights, spec,
                                                             c.k, bm, c.config.library_mm)
    d_weights = d_weights.to(weights_dtype)
    if not weight_grads:
        return DownGrads(dz, d_weights, None, None)
    d_w_down, d_b_down = lib.down_grads(G, act_s, seg, spec.transposed, bias_weights, c.config.library_mm)
    return DownGrads(dz, d_weights, *_like((d_w_down, w_down), (d_b_down, b_down)))


def _like(*pairs) -> tuple:
    """Each (gradient or None, its tensor) pair's gradient in its tensor's dtype (the library's come in the
    operands')."""
    return tuple(None if g is None else g.to(t.dtype) for g, t in pairs)


