"""Triton experts backward, sorted path: the op's gradients from grad_out, recomputing the forward's
pre-activation rows instead of saving anything but the op's inputs (SonicMoE's dataflow, DESIGN §8).

Data contract (T tokens, k top-k, E experts, H hidden, I intermediate, S = T*k pairs; sorted positions as in
triton_align.py: sorted_rows [S_pad], pos [S], seg_end [E], expert e's rows starting at seg_end[e-1] rounded up
to BLOCK_M; s = the pair's router weight)
    dO          [T, H]          grad_out, hidden's dtype
    z           [S_pad, 2I]     pre-activation rows (bias added), w_gate_up's row order (concat or interleaved)
    act         [S_pad, I]      act(z): the down GEMM's input rows
    dz          [S_pad, 2I]     d loss / d z, same order as z
    ds_part     [S_pad, NI]     fp32, per I block: <dO[t] @ W_down[e], act> (+ <dO[t], b_down[e]> in block 0)
    dx_rows     [S_pad, H]      dz @ W_gate_up[e]: each pair's share of d hidden
    d hidden    [T, H]          sum of the token's k dx_rows in slot order
    d weights   [T, k]          sum of the pair's ds_part row, in block order
    dW_down     [E, H, I]       sum over e's rows of (s dO[t]) ⊗ act      } grouped GEMMs whose reduction runs over
    dW_gate_up  [E, 2I, H]      sum over e's rows of dz ⊗ x[t]            } each expert's rows (varlen K)
    d b_down [E, H], d b_gate_up [E, 2I]: the same left operands summed over e's rows

    align -> [gate_up GEMM storing z and act]            the forward's kernel (recompute)
          -> [gathered dO @ W_down[e] ; act' epilogue]     -> dz, ds_part
          -> [dz @ W_gate_up[e]] -> [combine over k]      the forward's down and combine kernels -> d hidden
          -> [wgrad (s dO[t])^T act] -> dW_down, d b_down
          -> [wgrad dz^T x[t]]       -> dW_gate_up, d b_gate_up

Nothing here is a function of the routing's values on the host: grids and buffers are sized from T, k, E and
the configs (CUDA-graph safe). Each output element is written by one program that reduces in a fixed order,
so the gradients are identical run to run. The router weight scaling the input (spec.scale_input, Llama-4)
is not covered: dispatch keeps the torch backward there.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import triton
import triton.language as tl

from ..spec import ExpertsSpec, GateUpLayout
from . import device, launch, triton_config
from .triton_act import ACT_CODE
from .triton_align import AlignedRows, align_rows
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
    # Token rows copied into padded sorted order (padding rows zeroed: _sorted_rows_kernel), then torch's
    # grouped GEMM, 2-D x 2-D with offs along the reduction (CUTLASS on sm90, bf16): [S_pad, H] x 2 more memory,
    # the library's tiles. Where its operands do not suit it (not bf16 on sm90+, rows not 16-byte aligned), TRITON.
    GROUPED_MM = "grouped_mm"


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

    def __post_init__(self):
        if self.rows.combine is not triton_config.Combine.GATHER or self.rows.tma:
            raise ValueError("BackwardConfig.rows: the backward uses the gather combine and pointer loads")
        triton_config._pow2("wgrad_m", self.wgrad_m, 16, 256)


def default_config(dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int) -> BackwardConfig:
    """Untuned per shape: the forward's sorted-path defaults for its two kernels and the dz GEMM; 128 x 128
    weight-gradient tiles reducing 64 rows a step, 8 warps — the best of probe_backward's sweep at Qwen3-30B-A3B
    and Mixtral-8x7B, T = 32768 (whole backward 22.7 -> 18.7 ms and 211 -> 170 ms against 64 x 64 x 32, 4 warps;
    benchmarks/NOTES.md "backward tiles")."""
    rows = triton_config.default_sorted_config(dtype, E, k, T)
    return BackwardConfig(rows=rows, dz=rows.gate_up, wgrad_m=128,
                          wgrad=KernelConfig(block_n=128, block_k=64, num_warps=8, num_stages=3))


@triton.jit
def _gated_act_backward(da, gate, up, alpha, limit, ACT: tl.constexpr):
    """(d gate, d up, act(gate) * up) from d(act(gate) * up) and the pre-activation halves (fp32); the
    derivatives of torch_activations.gated_backward_halves."""
    if ACT == 0:  # SiLU
        sig = tl.sigmoid(gate)
        f = gate * sig
        df = sig * (1.0 + gate * (1.0 - sig))
        d_gate, d_up, a = da * up * df, da * f, f * up
    elif ACT == 1:  # GELU (erf)
        cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))
        f = gate * cdf
        df = cdf + gate * 0.3989422804014327 * tl.exp(-0.5 * gate * gate)
        d_gate, d_up, a = da * up * df, da * f, f * up
    elif ACT == 2:  # GELU (tanh)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        f = 0.5 * gate * (1.0 + th)
        df = 0.5 * (1.0 + th) + 0.5 * gate * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * gate * gate)
        d_gate, d_up, a = da * up * df, da * f, f * up
    elif ACT == 3:  # ReLU (aten's threshold_backward: gradient where the output is > 0)
        f = tl.maximum(gate, 0.0)
        d_gate, d_up, a = tl.where(gate > 0.0, da * up, 0.0), da * f, f * up
    else:  # GPT-OSS: clamps pass the gradient where the bound is not exceeded (bounds inclusive, as aten)
        gate_c = tl.minimum(gate, limit)
        up_c = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(gate_c * alpha)
        glu = gate_c * sig
        d_glu = sig + alpha * gate_c * sig * (1.0 - sig)
        d_gate = tl.where(gate <= limit, da * (up_c + 1.0) * d_glu, 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), da * glu, 0.0)
        a = (up_c + 1.0) * glu
    return d_gate, d_up, a


@triton.jit(do_not_specialize=["GROUP_M"])
def _dz_kernel(
    g_ptr, w_ptr, b_ptr, z_ptr, dz_ptr, ds_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr,
    num_padded_ptr,
    H, I, TOP_K, alpha, limit, GROUP_M,
    stride_gm, stride_we, stride_wk, stride_wn, stride_be, stride_zm, stride_dsm,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dz = act'(z) applied to s * (dO[t] @ W_down[e]) (the down GEMM's input gradient), and the router
    weight's partial gradients <dO[t] @ W_down[e], act(z)> per I block: a gather-GEMM like the forward's
    gate_up, reducing over H, with W_down read as [H, I] per expert."""
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
        z_rows = z_ptr + slots[:, None] * stride_zm
        gate = tl.load(z_rows + gate_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(z_rows + up_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        d_gate, d_up, a = _gated_act_backward(acc * s[:, None], gate, up, alpha, limit, ACT)
        dz_rows = dz_ptr + slots[:, None] * stride_zm
        tl.store(dz_rows + gate_cols[None, :], d_gate.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_rows + up_cols[None, :], d_up.to(dz_ptr.dtype.element_ty), mask=mask)
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


@triton.jit
def _sorted_rows_kernel(src_ptr, dst_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, num_padded_ptr,
                        N, TOP_K, stride_src, stride_dst,
                        GATHER: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst [S_pad, N] in padded sorted order for a library GEMM reducing over its rows: with GATHER, each real
    slot's row is src's row of its token (times the pair's router weight with SCALE) and each padding slot's is 0;
    without, only dst's padding slots are set to 0 (rows a kernel left unwritten: whatever memory held)."""
    r = tl.program_id(0)
    if r < tl.load(num_padded_ptr):
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = n < N
        end = tl.load(seg_end_ptr + tl.load(block_expert_ptr + r // BLOCK_M))  # of the slot's expert's real rows
        real = tl.full([BLOCK_N], r, tl.int32) < end  # (as a vector: the interpreter takes no scalar masks)
        dst = dst_ptr + r.to(tl.int64) * stride_dst + n
        if GATHER:
            pair = tl.where(r < end, tl.load(sorted_rows_ptr + r), 0).to(tl.int64)  # a padding slot's: unwritten
            row = tl.load(src_ptr + (pair // TOP_K) * stride_src + n, mask=ok & real, other=0.0)
            if SCALE:
                s = tl.load(topk_w_ptr + pair).to(tl.float32)
                row = (row.to(tl.float32) * s).to(dst_ptr.dtype.element_ty)
            tl.store(dst, row, mask=ok)
        else:
            tl.store(dst, tl.zeros([BLOCK_N], dtype=dst_ptr.dtype.element_ty), mask=ok & ~real)


def _sorted_rows(src, rows: AlignedRows, weights, k: int, block_m: int, *, scale: bool = False):
    """A gathered copy of src's token rows in padded sorted order, padding rows 0 (x the router weight: scale)."""
    return _launch_sorted_rows(src, src.new_empty(rows.sorted_rows.numel(), src.shape[1]), rows, weights, k,
                               block_m, gather=True, scale=scale)


def _zero_padding_rows(t, rows: AlignedRows, block_m: int):
    """t [S_pad, N] (a kernel's output in padded sorted order) with its unwritten padding rows set to 0, in place."""
    return _launch_sorted_rows(t, t, rows, t, 1, block_m, gather=False, scale=False)


def _launch_sorted_rows(src, dst, rows: AlignedRows, weights, k: int, block_m: int, gather: bool, scale: bool):
    N = dst.shape[1]
    block_n = min(1024, triton.next_power_of_2(max(N, 16)))
    launch.kernel(_sorted_rows_kernel)[(rows.sorted_rows.numel(), triton.cdiv(N, block_n))](
        src, dst, weights, rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        N, k, src.stride(0), dst.stride(0),
        GATHER=gather, SCALE=scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return dst


def library_wgrad_runs(*tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands as the weight gradients' 2-D x 2-D GEMMs: on CUDA bf16 on
    sm90+ (elsewhere torch loops with host syncs), on the CPU any dtype (the tests); rows 16-byte aligned."""
    t0 = tensors[0]
    if t0.device.type == "cuda" and not (t0.dtype == torch.bfloat16 and device.sm90_or_newer(device.index(t0))):
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def _library_wgrads(grad_out, hidden, act, dz, weights, rows: AlignedRows, k: int, config: BackwardConfig,
                    transposed: bool, biases: bool):
    """(d_w_down, d_w_gate_up, d_b_down, d_b_gate_up) by torch._grouped_mm over rows in padded sorted order.
    Each expert's segment is taken with its padding (offs = seg_end rounded up to block_m), so every padding row
    must be 0 in at least one operand and finite in both: the gathered copies write 0 there, act's and dz's
    unwritten padding rows are zeroed in place."""
    bm = config.rows.block_m
    offs = ((rows.seg_end + (bm - 1)) // bm * bm).to(torch.int32)
    scaled_do = _sorted_rows(grad_out, rows, weights, k, bm, scale=True)  # [S_pad, H]: s * dO[t]
    x_rows = _sorted_rows(hidden, rows, weights, k, bm)  # [S_pad, H]
    act, dz = _zero_padding_rows(act, rows, bm), _zero_padding_rows(dz, rows, bm)

    def outer(a, b):  # [E, A, B] = sum over each expert's rows of a_r (x) b_r
        return torch._grouped_mm(a.t(), b, offs=offs)

    d_w_down = outer(act, scaled_do) if transposed else outer(scaled_do, act)
    d_w_gate_up = outer(x_rows, dz) if transposed else outer(dz, x_rows)
    d_b_down = d_b_gate_up = None
    if biases:  # the per-expert sums of the same left operands, as one more grouped GEMM against a ones row
        ones = scaled_do.new_ones(scaled_do.shape[0], 8)  # 8: the 16-byte minimum width
        d_b_down, d_b_gate_up = outer(ones, scaled_do)[:, 0].contiguous(), outer(ones, dz)[:, 0].contiguous()
    return d_w_down, d_w_gate_up, d_b_down, d_b_gate_up


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
              config: BackwardConfig, k: int):
    H, I = grad_out.shape[1], dz.shape[1] // 2
    c = config.dz
    grid = (rows.max_blocks * triton.cdiv(I, c.block_n),)
    stride_e, stride_h, stride_i = logical_strides(w_down, spec.transposed)
    launch.kernel(_dz_kernel)[grid](
        grad_out, w_down, b_down if b_down is not None else w_down, z, dz, ds_part, weights,
        rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        H, I, k, float(spec.swiglu_alpha), float(spec.swiglu_limit), config.rows.group_m,
        grad_out.stride(0), stride_e, stride_h, stride_i, b_down.stride(0) if b_down is not None else 0,
        z.stride(0), ds_part.stride(0),
        ACT=ACT_CODE[spec.activation], INTERLEAVED=spec.gate_up is GateUpLayout.INTERLEAVED,
        HAS_BIAS=b_down is not None, EVEN_K=H % c.block_k == 0, DOT_PRECISION=dot_precision(grad_out.dtype),
        BLOCK_M=config.rows.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps,
        num_stages=c.num_stages,
    )


def experts_backward(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                     spec: ExpertsSpec, config: BackwardConfig | None = None, weight_grads: bool = True):
    """(d_hidden, d_topk_weights, d_w_gate_up, d_w_down, d_b_gate_up, d_b_down), absent biases -> None, the
    weights' and biases' None without weight_grads (their two kernels not launched); the contract of
    torch_experts.experts_backward. T > 0, k > 0, not spec.scale_input; sizes checked by the op."""
    if spec.scale_input:
        raise ValueError("moe_compiler: the Triton backward does not cover scale_input; use the torch backward")
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E = w_gate_up.shape[0]
    I = spec.intermediate(w_down)
    if config is None:
        config = default_config(hidden.dtype, E, k, H, I, T)
    rows = align_rows(topk_ids, E, config.rows.block_m)
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    grad_out = grad_out.to(hidden.dtype)
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    weights = topk_weights.reshape(-1)
    weights = weights if weights.stride(0) == 1 else weights.contiguous()
    S_pad = rows.sorted_rows.numel()

    act, z = hidden.new_empty(S_pad, I), hidden.new_empty(S_pad, 2 * I)
    launch_gate_up(hidden, rows, w_gate_up, b_gate_up, spec, config.rows, k, act, weights, z=z)

    dz = torch.empty_like(z)
    ds_part = hidden.new_empty(S_pad, triton.cdiv(I, config.dz.block_n), dtype=torch.float32)
    launch_dz(grad_out, rows, w_down, b_down, z, dz, ds_part, weights, spec, config, k)
    pos = rows.pos.long()
    # a sentinel pair (pos -1) has no row: its weight gets no gradient
    d_weights = torch.where(pos >= 0, ds_part[pos.clamp(min=0)].sum(-1), 0.0).view(T, k)

    # d hidden: the forward's down GEMM over dz with W_gate_up read as [H, 2I] per expert (the transpose of
    # its layout), no router weight (scale_input=True skips it), then the forward's deterministic combine.
    dx_spec = dataclasses.replace(spec, transposed=not spec.transposed, scale_input=True)
    dx_rows = hidden.new_empty(S_pad, H)
    launch_down(dz, rows, w_gate_up, None, weights, dx_spec, config.rows, k, dx_rows)
    d_hidden = hidden.new_empty(T, H)
    launch_combine(dx_rows, rows, k, d_hidden)

    if not weight_grads:
        return d_hidden, d_weights.to(topk_weights.dtype), None, None, None, None
    if config.wgrad_path is WGrad.GROUPED_MM and library_wgrad_runs(hidden, act, dz):
        d_w_down, d_w_gate_up, d_b_down, d_b_gate_up = _library_wgrads(
            grad_out, hidden, act, dz, weights, rows, k, config, spec.transposed, b_down is not None)
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return (d_hidden, d_weights.to(topk_weights.dtype), d_w_gate_up.to(w_gate_up.dtype), d_w_down.to(w_down.dtype),
                cast(d_b_gate_up, b_gate_up), cast(d_b_down, b_down))
    d_w_down = torch.empty_like(w_down)
    d_b_down = torch.empty_like(b_down) if b_down is not None else None
    launch_wgrad(grad_out, act, d_w_down, d_b_down, weights, rows, k, config, left_gather=True, left_scale=True,
                 right_gather=False, out_strides=logical_strides(d_w_down, spec.transposed))
    d_w_gate_up = torch.empty_like(w_gate_up)
    d_b_gate_up = torch.empty_like(b_gate_up) if b_gate_up is not None else None
    launch_wgrad(dz, hidden, d_w_gate_up, d_b_gate_up, weights, rows, k, config, left_gather=False,
                 left_scale=False, right_gather=True, out_strides=logical_strides(d_w_gate_up, spec.transposed))
    return d_hidden, d_weights.to(topk_weights.dtype), d_w_gate_up, d_w_down, d_b_gate_up, d_b_down
