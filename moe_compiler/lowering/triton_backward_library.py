"""The Triton backward's GEMMs by torch's grouped GEMM (torch._grouped_mm: CUTLASS on sm90, bf16) over rows in
padded sorted order, with Triton passes around them (triton_backward.py picks them: BackwardConfig's WGrad and
DGrad). The trade is the forward's triton_grouped.py's: gathered copies of token rows (memory traffic, [S_pad, H]
each) for the library's tiles, which the Triton GEMMs' in-kernel pointer gathers do not match at large shapes
(benchmarks/NOTES.md "train step v1").

Data contract (as triton_backward.py; S_pad sorted slots, offs [E] = each expert's segment end rounded up to
block_m: the library GEMMs take every segment with its padding, so a padding row must be 0 in at least one
operand and finite in both. Where z is saved, block_m is 1 (BackwardConfig.unpadded): no padding rows, S_pad = S.
With GroupedTile.LARGE, S_pad has trailing slots past every segment, which no GEMM and no row pass reads: they
only size the operands, from which torch picks its kernel)
    G           [S_pad, H]   dO[t] of each slot's token, unscaled (the gather; padding rows 0)
    X           [S_pad, H]   hidden[t], the same way
    dA          [S_pad, I]   G @ W_down[e] (per expert: 2-D x 3-D grouped GEMM, M = slots)
    dz          [S_pad, 2I]  act'(z) applied to s * dA (the row pass; padding rows 0)
    act_s       [S_pad, I]   s * act(z): dW_down's right operand with the router weight on it (padding rows 0)
    dx_rows     [S_pad, H]   dz @ W_gate_up[e] (2-D x 3-D), combined over k into d hidden
    dW_down = G^T act_s, dW_gate_up = dz^T X per expert (2-D x 2-D, offs along the reduction)

    align -> gather G -> [G @ W_down] -> [act' row pass] -> dz, act_s, d weights     (dz_rows)
          -> [G^T act_s] -> dW_down; G dropped                                   (down_grads)
       or -> gather G -> [act row pass] -> act_s -> [G^T act_s] -> dW_down; act_s dropped;
             per row chunk c: [G_c @ W_down] -> [act' row pass] -> dz_c, d weights  (dz_rows_chunked)
          -> gather X -> [dz^T X] -> dW_gate_up; X dropped                       (gate_up_grads)
          -> [dz @ W_gate_up] -> dx_rows  (dz's last read)                       (hidden_rows)
          -> combine -> d hidden                                                 (triton_backward.backward_combine)
    one [S_pad, H] buffer (G, X, dx_rows) live at a time
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import ExpertsSpec, GateUpLayout
from . import launch
from .torch_segment_mm import GroupedMM, Segments, project_dw, project_dx
from .triton_act import ACT_CODE, gated_act_backward
from .triton_align import AlignedRows, gathered, row_block


@triton.jit
def _act_backward_rows_kernel(
    da_ptr, z_ptr, g_ptr, b_ptr, dz_ptr, act_ptr, ds_ptr, sw_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr,
    seg_end_ptr, num_padded_ptr,
    row0, H, I, alpha, limit,
    stride_dam, stride_zm, stride_gm, stride_be, stride_dzm, stride_am,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN_M: tl.constexpr,
    WRITE_DZ: tl.constexpr, WRITE_ACT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One sorted slot r = row0 + program: with WRITE_DZ, dz[r] = act'(z[pair]) applied to s * dA'[r - row0] and
    ds[pair] = <dA'[r - row0], act(z[pair])> (+ <dO[t], b_down[e]>); with WRITE_ACT, act[r] = s * act(z[pair])
    (dW_down's operand with the router weight on it) and the slot's s in sw[r, 0] for d b_down. A padding slot
    gets zero rows (the library GEMMs reduce over them)."""
    r = row0 + tl.program_id(0)
    if r < tl.load(num_padded_ptr):
        expert = tl.load(block_expert_ptr + r // ALIGN_M)
        end = tl.load(seg_end_ptr + expert)
        real = r < end
        pair = tl.where(real, tl.load(sorted_rows_ptr + r), 0).to(tl.int64)  # a padding slot's: unwritten
        s = tl.where(real, tl.load(topk_w_ptr + pair).to(tl.float32), 0.0)
        r64 = r.to(tl.int64)
        da_row = (r - row0).to(tl.int64) * stride_dam
        acc = tl.zeros([BLOCK_I], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            n = i0 + tl.arange(0, BLOCK_I)
            live = n < tl.where(real, I, 0)
            ok = n < I
            if INTERLEAVED:
                gate_cols, up_cols = 2 * n, 2 * n + 1
            else:
                gate_cols, up_cols = n, I + n
            gate = tl.load(z_ptr + pair * stride_zm + gate_cols, mask=live, other=0.0).to(tl.float32)
            up = tl.load(z_ptr + pair * stride_zm + up_cols, mask=live, other=0.0).to(tl.float32)
            if WRITE_DZ:
                da = tl.load(da_ptr + da_row + n, mask=live, other=0.0).to(tl.float32)
            else:
                da = tl.zeros([BLOCK_I], dtype=tl.float32)
            d_gate, d_up, a = gated_act_backward(da * s, gate, up, alpha, limit, ACT)
            if WRITE_DZ:
                dz_row = dz_ptr + r64 * stride_dzm
                tl.store(dz_row + gate_cols, tl.where(live, d_gate, 0.0).to(dz_ptr.dtype.element_ty), mask=ok)
                tl.store(dz_row + up_cols, tl.where(live, d_up, 0.0).to(dz_ptr.dtype.element_ty), mask=ok)
                acc += tl.where(live, da * a, 0.0)
            if WRITE_ACT:
                tl.store(act_ptr + r64 * stride_am + n, tl.where(live, a * s, 0.0).to(act_ptr.dtype.element_ty),
                         mask=ok)
        ds = tl.sum(acc, axis=0)
        if HAS_BIAS and WRITE_ACT:
            col = tl.arange(0, 8)
            tl.store(sw_ptr + r64 * 8 + col, tl.where(col == 0, s, 0.0).to(sw_ptr.dtype.element_ty))
        if HAS_BIAS and WRITE_DZ:  # <dO[t], b_down[e]>: the bias's share of the router weight's gradient
            bacc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                hm = h < tl.where(real, H, 0)
                g = tl.load(g_ptr + r64 * stride_gm + h, mask=hm, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + expert.to(tl.int64) * stride_be + h, mask=hm, other=0.0).to(tl.float32)
                bacc += g * b
            ds += tl.sum(bacc, axis=0)
        if WRITE_DZ:
            one = tl.arange(0, 1)  # (as a vector: the interpreter takes no scalar masks)
            tl.store(ds_ptr + pair + one, tl.zeros([1], dtype=tl.float32) + ds, mask=one < tl.where(real, 1, 0))


def segments(rows: AlignedRows, block_m: int) -> Segments:
    """The library GEMMs' view of the padded sorted order: each expert's segment ends at its seg_end rounded up
    to block_m (its padding included: `offs`, all torch._grouped_mm reads)."""
    offs = ((rows.seg_end + (block_m - 1)) // block_m * block_m).to(torch.int32)
    return Segments(sorted_ids=None, perm=None, offs=offs, num_experts=rows.seg_end.numel())


def down_grads(do_rows, act_rows, seg: Segments, transposed: bool, bias_weights, mm=GroupedMM):
    """(d_w_down, d_b_down or None): 2-D x 2-D grouped GEMMs reducing over each expert's rows (`mm`'s wgrad:
    torch's, or CUTLASS's with BackwardConfig.wgrad_cutlass), in w_down's own layout; one of do_rows and act_rows
    carries the router weight. bias_weights [S_pad, 8]: column 0 weighs each row's do_rows in d b_down (ones when
    do_rows is already scaled), or None without biases (8: the 16-byte minimum width; torch's GEMM)."""
    d_w_down = project_dw(mm, act_rows, do_rows, seg, transposed)
    d_b_down = None
    if bias_weights is not None:  # per-expert sums as one more grouped GEMM, against a weights column
        d_b_down = GroupedMM.wgrad(bias_weights, do_rows, seg)[:, 0].contiguous()
    return d_w_down, d_b_down


def gate_up_grads(dz, hidden, rows: AlignedRows, weights, k: int, seg: Segments, block_m: int, transposed: bool,
                  bias: bool, mm=GroupedMM):
    """(d_w_gate_up, d_b_gate_up or None): dz^T X per expert in w_gate_up's own layout (X: hidden's token rows
    gathered into padded sorted order here, dropped on return), and dz's per-expert column sums where there is a
    bias. dz's padding rows must be 0. A call of its own, after down_grads: the two gathered [S_pad, H] operands
    (the backward's largest buffers) are never live together. `mm`: as down_grads'."""
    x_rows = gathered(hidden, rows, weights, k, block_m)
    d_w_gate_up = project_dw(mm, x_rows, dz, seg, transposed)
    d_b_gate_up = GroupedMM.wgrad(dz.new_ones(dz.shape[0], 8), dz, seg)[:, 0].contiguous() if bias else None
    return d_w_gate_up, d_b_gate_up


# The first half in row chunks (first_half_chunks): at most this many, each at least MIN_CHUNK_ROWS sorted rows.
CHUNKS = 4
MIN_CHUNK_ROWS = 4096


def first_half_chunks(S_pad: int, S: int, H: int, I: int, E: int, weight_grads: bool) -> int:
    """How many row chunks dA takes in the backward's first half (dz_rows_chunked), 1 where it is taken whole
    (dz_rows). Sizes only. The first half holds z, G, dA and dz; the second (z freed: ops/experts.py) dz, G's
    size again and W_gate_up's gradient. Chunking lowers the peak where the first half is it: z + dA beyond
    W_gate_up's gradient (large T against E x H: Mixtral-8x7B from ~11k tokens, Qwen3-30B-A3B from ~22k), and
    always without weight gradients (frozen experts). A plain int: under dynamic shapes (S_pad an expression of
    T) each comparison guards the compiled graph, which then serves the lengths with the same count."""
    first_is_peak = not weight_grads or S * 2 * I + S_pad * I > E * 2 * I * H
    return int(max(1, min(CHUNKS, S_pad // MIN_CHUNK_ROWS))) if first_is_peak else 1


def _row_pass(dA, z, G, b_down, dz, act_s, ds, bias_weights, weights, rows: AlignedRows, spec: ExpertsSpec,
              block_m: int, row0: int, n_rows: int, *, write_dz: bool, write_act: bool):
    H, I = G.shape[1], z.shape[1] // 2
    launch.kernel(_act_backward_rows_kernel)[(n_rows,)](
        dA, z, G, b_down if b_down is not None else G, dz, act_s, ds,
        bias_weights if bias_weights is not None else G, weights,
        rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        row0, H, I, float(spec.swiglu_alpha), float(spec.swiglu_limit),
        dA.stride(0), z.stride(0), G.stride(0), b_down.stride(0) if b_down is not None else 0, dz.stride(0),
        act_s.stride(0),
        ACT=ACT_CODE[spec.activation], INTERLEAVED=spec.gate_up is GateUpLayout.INTERLEAVED,
        HAS_BIAS=b_down is not None, ALIGN_M=block_m, WRITE_DZ=write_dz, WRITE_ACT=write_act,
        BLOCK_I=row_block(I), BLOCK_H=row_block(H), num_warps=4,
    )


def dz_rows(grad_out, z, rows: AlignedRows, w_down, b_down, weights, spec: ExpertsSpec, k: int, block_m: int,
            mm=GroupedMM):
    """(G, dz, act_s, d weights [T, k] fp32, seg, bias_weights or None): dA = G @ W_down[e] by a grouped GEMM (`mm`:
    BackwardConfig.library_mm, torch's or CUTLASS's), then act' by one row pass. z [T*k, 2I]: the pre-activation
    rows (saved or recomputed)."""
    T, H = grad_out.shape
    I = z.shape[1] // 2
    seg = segments(rows, block_m)
    G = gathered(grad_out, rows, weights, k, block_m)
    dA = project_dx(mm, G, w_down, seg, spec.transposed)  # [S_pad, I]
    S_pad = G.shape[0]
    # act_s is written over dA: the row pass reads each element of dA once, in the same program and step that
    # writes act_s's (one program per row), and dA is not read after it — one [S_pad, I] buffer fewer at the
    # backward's peak (z, G, dA, dz live together: Mixtral-8x7B at T = 32768, 1.9 of ~11 GB).
    dz, act_s = launch.empty(G, S_pad, 2 * I), dA
    ds = torch.zeros(T * k, dtype=torch.float32, device=G.device)  # a sentinel pair's stays 0
    bias_weights = launch.empty(G, S_pad, 8) if b_down is not None else None
    _row_pass(dA, z, G, b_down, dz, act_s, ds, bias_weights, weights, rows, spec, block_m, 0, S_pad,
              write_dz=True, write_act=True)
    return G, dz, act_s, ds.view(T, k), seg, bias_weights


def dz_rows_chunked(grad_out, z, rows: AlignedRows, w_down, b_down, weights, spec: ExpertsSpec, k: int,
                    block_m: int, chunks: int, weight_grads: bool, mm=GroupedMM):
    """(dz, d weights [T, k] fp32, d_w_down, d_b_down) — the weights' None without weight_grads — with dA taken
    in `chunks` row chunks, so that the half's peak is z, G, dz and a chunk of dA instead of all of dA. act_s
    (dW_down's operand) first comes from z alone (a row pass writing only it), for dW_down, and is dropped
    before dz exists: one more read of z than dz_rows, the price of the smaller peak."""
    T, H = grad_out.shape
    I = z.shape[1] // 2
    seg = segments(rows, block_m)
    G = gathered(grad_out, rows, weights, k, block_m)
    S_pad = G.shape[0]
    ds = torch.zeros(T * k, dtype=torch.float32, device=G.device)  # a sentinel pair's stays 0
    d_w_down = d_b_down = None
    if weight_grads:
        act_s = launch.empty(G, S_pad, I)
        bias_weights = launch.empty(G, S_pad, 8) if b_down is not None else None
        _row_pass(act_s, z, G, b_down, act_s, act_s, ds, bias_weights, weights, rows, spec, block_m, 0, S_pad,
                  write_dz=False, write_act=True)
        d_w_down, d_b_down = down_grads(G, act_s, seg, spec.transposed, bias_weights, mm)
        del act_s, bias_weights
    dz = launch.empty(G, S_pad, 2 * I)
    # each chunk has rows: chunks <= S_pad / MIN_CHUNK_ROWS, so (chunks - 1) * step < S_pad (counted, not tested,
    # so that a symbolic S_pad gives expressions and no guard)
    step = triton.cdiv(triton.cdiv(S_pad, chunks), block_m) * block_m
    for c in range(chunks):
        c0 = c * step
        n = torch.sym_min(step, S_pad - c0)
        # the chunk's segments: each expert's rows clipped to [c0, c0 + n), counted from c0 (empty outside it)
        part = Segments(sorted_ids=None, perm=None, offs=(seg.offs - c0).clamp_(0, n), num_experts=seg.num_experts)
        dA = project_dx(mm, G[c0:c0 + n], w_down, part, spec.transposed)  # [n, I]
        _row_pass(dA, z, G, b_down, dz, dz, ds, None, weights, rows, spec, block_m, c0, n, write_dz=True,
                  write_act=False)
        del dA
    return dz, ds.view(T, k), d_w_down, d_b_down


def hidden_rows(dz, w_gate_up, seg: Segments, spec: ExpertsSpec, mm=GroupedMM):
    """dx_rows [S_pad, H]: each slot's dz @ W_gate_up[e] by a grouped GEMM (`mm`, as dz_rows'; d hidden's rows,
    combined over each token's k slots by triton_backward.backward_combine)."""
    return project_dx(mm, dz, w_gate_up, seg, spec.transposed)
