"""Triton experts forward, sorted (prefill) path: gather-GEMM with the gated activation in its epilogue,
down GEMM with the router weight in its epilogue, and a deterministic gather-and-sum combine.

Data contract (shape letters: T tokens, k top-k, E experts, H hidden, I intermediate, S = T*k pairs)
    hidden        [T, H]           bf16/fp16/fp32, row stride free, rows gathered in-kernel (never permuted)
    topk_ids      [T, k]           -> triton_align.py: sorted_rows [S_pad], pos [S], block_expert, seg_end
    topk_weights  [T, k]           any float dtype, applied in fp32
    w_gate_up     [E, 2I, H]       read in place through its strides (transposed [E, H, 2I] too),
                                   gate/up rows concatenated ([g_0..g_I-1, u_0..u_I-1]) or interleaved
    w_down        [E, H, I]        read in place through its strides (transposed [E, I, H] too)
    b_gate_up     [E, 2I] / None   b_down [E, H] / None
    act           [S_pad, I]       hidden's dtype, rows in padded sorted order (padding rows never written)
    y             [S_pad, H]       hidden's dtype, (down output + b_down) * router weight, same order
                                   (spec.scale_input, Llama-4: the weight scales the gate_up rows instead)
    out           [T, H]           out[t] = sum_j y[pos[t*k + j]] in fp32, in slot order: deterministic

    route -> permute (align) -> [gate_up GEMM + act] -> [down GEMM * weight] -> [combine]

Every block of BLOCK_M sorted positions belongs to one expert (block_expert), so a tile loads one expert's
weights. The grid is sized by static bounds (CUDA-graph safe); each program walks tiles
tile = pid, pid + programs, ... up to the used count read on the device (num_padded), so a persistent
grid (programs = a few per SM) and one program per tile are the same kernel. With a config's
warp_specialize, Triton flattens that tile loop with the K loop and splits the warps into TMA producers and
MMA consumers (it pays for the down GEMM at prefill: benchmarks/NOTES.md v3). Tiles are rastered in
groups of GROUP_M row blocks sharing a column block, so neighbouring programs reuse one expert's weight
tiles and the same gathered rows from L2. Row offsets are int64 (t * H passes 2^31 for large T).
Loads are unmasked along N (column indices wrap modulo N; the store masks) and along K when the
config's block_k divides K. With config.tma (sm90+, weights [E, N, K] with unit K stride), weight tiles
(and the down GEMM's contiguous act rows) come by TMA from host-built descriptors; the gathered hidden
rows of the gate_up GEMM always come by pointer loads (Hopper's TMA has no row gather).

Folded tails (KernelConfig.tail_m > 0, per GEMM; benchmarks/NOTES.md sessions 37-38). A padded last block costs
about a whole tile whatever its rows (probe_padding --tails), so a tile whose expert continues for at most tail_m
rows past it takes those rows as a second [tail_m, BLOCK_K] operand against the weight tiles it already holds, and
the tail block's own tile returns at once: one weight stream for both. Only the calls the folded tiles cover take
it (folds_gate_up / folds_down); the others run the tile body above.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import ExpertsSpec, GateUpLayout
from . import device, launch
from .triton_act import ACT_CODE, gated_act
from .triton_align import AlignedRows, align_rows
from .triton_config import Combine, SortedConfig


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M):
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, BLOCK_M: tl.constexpr):
    """Expert of block pid_m, its sorted positions, the pair at each, and which positions hold a pair."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = slots < tl.load(seg_end_ptr + expert)
    rows = tl.load(sorted_rows_ptr + slots, mask=valid, other=0)
    return expert, slots.to(tl.int64), rows, valid


@triton.jit
def _fold_state(pid_m, block_expert_ptr, seg_end_ptr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    """(expert of block pid_m, its segment's end slot, fold: this tile takes the expert's next <= TAIL_M rows too,
    folded: this block is such a tail, done by the tile before it). KernelConfig.tail_m."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    end = tl.load(seg_end_ptr + expert)
    own = end - pid_m * BLOCK_M  # rows from this block's first slot to the expert's end (> BLOCK_M: later blocks)
    fold = (own > BLOCK_M) & (own <= BLOCK_M + TAIL_M)
    prev = tl.load(block_expert_ptr + pid_m - 1, mask=pid_m > 0, other=-1)
    return expert, end, fold, (own <= TAIL_M) & (prev == expert)


@triton.jit
def _gathered_rows(x_ptr, sorted_rows_ptr, first, end, stride_xm, TOP_K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pointers to the hidden rows of sorted slots first .. first + ROWS (first K block), the slots, which hold a
    pair, and those pairs."""
    slots = (first + tl.arange(0, ROWS)).to(tl.int64)
    valid = slots < end
    rows = tl.load(sorted_rows_ptr + slots, mask=valid, other=0)
    return x_ptr + (rows // TOP_K).to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :], slots, valid


@triton.jit
def _load_k(ptrs, row_ok, k_left, EVEN_K: tl.constexpr, ALONG_ROWS: tl.constexpr):
    """One [rows, BLOCK_K] (ALONG_ROWS) or [BLOCK_K, cols] tile by pointers; K past k_left and rows not ok read 0."""
    if ALONG_ROWS:
        if EVEN_K:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & (tl.arange(0, ptrs.shape[1]) < k_left)[None, :], other=0.0)
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(tl.arange(0, ptrs.shape[0]) < k_left)[:, None], other=0.0)


@triton.jit
def _gate_up_folded_k_loop(a_ptrs, valid, t_ptrs, t_valid, w_ptr, w_desc, expert, pid_n, H, I, stride_we, stride_wn,
                           stride_wk, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, W_TMA: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           TAIL_M: tl.constexpr, FOLD: tl.constexpr):
    """gate / up accumulators of a block's rows and, with FOLD, of the tail's rows, over one weight stream (the
    concatenated layout of the sorted gate_up kernel's main loop)."""
    kk = tl.arange(0, BLOCK_K)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % I
    wg_ptrs = w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk
    wu_ptrs = wg_ptrs + I * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_gate = tl.zeros([TAIL_M, BLOCK_N], dtype=tl.float32)
    t_up = tl.zeros([TAIL_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        a = _load_k(a_ptrs, valid, H - k0, EVEN_K, True)
        if W_TMA:
            wg = w_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
            wu = w_desc.load([expert.to(tl.int32), I + pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            wg = _load_k(wg_ptrs, valid, H - k0, EVEN_K, False)
            wu = _load_k(wu_ptrs, valid, H - k0, EVEN_K, False)
        gate = tl.dot(a, wg, gate, input_precision=DOT_PRECISION)
        up = tl.dot(a, wu, up, input_precision=DOT_PRECISION)
        if FOLD:
            t = _load_k(t_ptrs, t_valid, H - k0, EVEN_K, True)
            t_gate = tl.dot(t, wg, t_gate, input_precision=DOT_PRECISION)
            t_up = tl.dot(t, wu, t_up, input_precision=DOT_PRECISION)
            t_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    return gate, up, t_gate, t_up


@triton.jit
def _gate_up_folded_tile(x_ptr, w_ptr, w_desc, act_ptr, sorted_rows_ptr, pid_m, pid_n, expert, end, fold,
                         H, I, TOP_K, alpha, limit, stride_xm, stride_we, stride_wn, stride_wk, stride_am,
                         ACT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, W_TMA: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_M: tl.constexpr):
    """One gate_up tile of a folding call (KernelConfig.tail_m: concatenated gate / up, no bias, no stored Z, unscaled
    input): its block's rows and, where `fold`, the expert's next <= TAIL_M rows against the same weight tiles."""
    a_ptrs, slots, valid = _gathered_rows(x_ptr, sorted_rows_ptr, pid_m * BLOCK_M, end, stride_xm, TOP_K, BLOCK_M,
                                          BLOCK_K)
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if fold:  # (two loops, chosen per tile: a branch inside the K loop would stall its pipelining)
        t_ptrs, t_slots, t_valid = _gathered_rows(x_ptr, sorted_rows_ptr, (pid_m + 1) * BLOCK_M, end, stride_xm,
                                                  TOP_K, TAIL_M, BLOCK_K)
        gate, up, t_gate, t_up = _gate_up_folded_k_loop(
            a_ptrs, valid, t_ptrs, t_valid, w_ptr, w_desc, expert, pid_n, H, I, stride_we, stride_wn, stride_wk,
            EVEN_K, DOT_PRECISION, W_TMA, BLOCK_M, BLOCK_N, BLOCK_K, TAIL_M, True)
        tl.store(act_ptr + t_slots[:, None] * stride_am + n_out[None, :],
                 gated_act(t_gate, t_up, alpha, limit, ACT).to(act_ptr.dtype.element_ty),
                 mask=t_valid[:, None] & (n_out < I)[None, :])
    else:
        gate, up, _, _ = _gate_up_folded_k_loop(
            a_ptrs, valid, a_ptrs, valid, w_ptr, w_desc, expert, pid_n, H, I, stride_we, stride_wn, stride_wk,
            EVEN_K, DOT_PRECISION, W_TMA, BLOCK_M, BLOCK_N, BLOCK_K, TAIL_M, False)
    tl.store(act_ptr + slots[:, None] * stride_am + n_out[None, :],
             gated_act(gate, up, alpha, limit, ACT).to(act_ptr.dtype.element_ty),
             mask=valid[:, None] & (n_out < I)[None, :])


@triton.jit
def _down_folded_k_loop(a_ptrs, valid, a_desc, first, t_ptrs, t_valid, w_ptr, w_desc, expert, pid_n, H, I,
                        stride_we, stride_wn, stride_wk, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        W_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        TAIL_M: tl.constexpr, FOLD: tl.constexpr):
    """The down GEMM's accumulators of a block's act rows and, with FOLD, of the tail's (by pointers), over one
    weight stream."""
    kk = tl.arange(0, BLOCK_K)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
    w_ptrs = w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_acc = tl.zeros([TAIL_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if W_TMA:
            a = a_desc.load([first, k0])
            w = w_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            a = _load_k(a_ptrs, valid, I - k0, EVEN_K, True)
            w = _load_k(w_ptrs, valid, I - k0, EVEN_K, False)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if FOLD:
            t_acc = tl.dot(_load_k(t_ptrs, t_valid, I - k0, EVEN_K, True), w, t_acc, input_precision=DOT_PRECISION)
            t_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return acc, t_acc


@triton.jit
def _down_folded_tile(a_ptr, a_desc, w_ptr, w_desc, y_ptr, topk_w_ptr, sorted_rows_ptr, pid_m, pid_n, expert, end,
                      fold, H, I, stride_am, stride_we, stride_wn, stride_wk, stride_ym,
                      EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, W_TMA: tl.constexpr,
                      SCALE_INPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      TAIL_M: tl.constexpr):
    """One down tile of a folding call (KernelConfig.tail_m: no bias, gather combine): its block's rows and, where
    `fold`, the expert's next <= TAIL_M rows, each (x its router weight unless SCALE_INPUT) stored at its slot."""
    kk = tl.arange(0, BLOCK_K)
    first = pid_m * BLOCK_M
    slots = (first + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = slots < end
    a_ptrs = a_ptr + slots[:, None] * stride_am + kk[None, :]
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if fold:  # (two loops, chosen per tile, as in _gate_up_folded_tile)
        t_slots = (first + BLOCK_M + tl.arange(0, TAIL_M)).to(tl.int64)
        t_valid = t_slots < end
        t_ptrs = a_ptr + t_slots[:, None] * stride_am + kk[None, :]
        acc, t_acc = _down_folded_k_loop(a_ptrs, valid, a_desc, first, t_ptrs, t_valid, w_ptr, w_desc, expert, pid_n,
                                         H, I, stride_we, stride_wn, stride_wk, EVEN_K, DOT_PRECISION, W_TMA, BLOCK_M,
                                         BLOCK_N, BLOCK_K, TAIL_M, True)
        if not SCALE_INPUT:
            t_rows = tl.load(sorted_rows_ptr + t_slots, mask=t_valid, other=0)
            t_acc *= tl.load(topk_w_ptr + t_rows, mask=t_valid, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + t_slots[:, None] * stride_ym + n_out[None, :], t_acc.to(y_ptr.dtype.element_ty),
                 mask=t_valid[:, None] & (n_out < H)[None, :])
    else:
        acc, _ = _down_folded_k_loop(a_ptrs, valid, a_desc, first, a_ptrs, valid, w_ptr, w_desc, expert, pid_n, H, I,
                                     stride_we, stride_wn, stride_wk, EVEN_K, DOT_PRECISION, W_TMA, BLOCK_M, BLOCK_N,
                                     BLOCK_K, TAIL_M, False)
    if not SCALE_INPUT:
        rows = tl.load(sorted_rows_ptr + slots, mask=valid, other=0)
        acc *= tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + slots[:, None] * stride_ym + n_out[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (n_out < H)[None, :])


# How a sorted kernel loads its TMA tiles (W_TMA): not at all (pointer loads), through descriptors built on the
# host (triton.tools.tensor_descriptor: an eager call; a recorded launch cannot carry them), or through descriptors
# each program builds on the device from its pointer arguments (a recorded call, launch.recorded_tma()).
TMA_OFF, TMA_HOST, TMA_DEVICE = 0, 1, 2


@triton.jit(do_not_specialize=["GROUP_M"])  # a runtime knob: tuning it compiles nothing
def _gate_up_kernel(
    x_ptr, w_ptr, w_desc, b_ptr, act_ptr, z_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr,
    num_padded_ptr,
    H, I, E, TOP_K, alpha, limit, GROUP_M,
    stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_am, stride_zm,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, W_TMA: tl.constexpr, SCALE_INPUT: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARP_SPEC: tl.constexpr,
    TAIL_M: tl.constexpr,
):
    if W_TMA == 2:  # TMA_DEVICE: the same boxes as the host's descriptor (_weight_desc), built by each program
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, 2 * I, H], strides=[stride_we, stride_wn, 1],
                                           block_shape=[1, (2 if INTERLEAVED else 1) * BLOCK_N, BLOCK_K])
    num_pid_n = tl.cdiv(I, BLOCK_N)
    num_tiles = tl.load(num_padded_ptr) // BLOCK_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=WARP_SPEC, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile_coords(tile, num_tiles // num_pid_n, num_pid_n, GROUP_M)
        if TAIL_M > 0:  # KernelConfig.tail_m (launch_gate_up passes it only to calls _gate_up_folded_tile covers)
            expert, end, fold, folded = _fold_state(pid_m, block_expert_ptr, seg_end_ptr, BLOCK_M, TAIL_M)
            if not folded:
                _gate_up_folded_tile(x_ptr, w_ptr, w_desc, act_ptr, sorted_rows_ptr, pid_m, pid_n, expert, end, fold,
                                     H, I, TOP_K, alpha, limit, stride_xm, stride_we, stride_wn, stride_wk,
                                     stride_am, ACT, EVEN_K, DOT_PRECISION, W_TMA, BLOCK_M, BLOCK_N, BLOCK_K, TAIL_M)
        else:
            expert, slots, rows, valid = _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, BLOCK_M)
            tok = (rows // TOP_K).to(tl.int64)
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + tok[:, None] * stride_xm + kk[None, :]
            w_base = w_ptr + expert * stride_we
            if INTERLEAVED:
                # Rows 2n (gate) and 2n+1 (up) are neighbours: one [BLOCK_K, 2*BLOCK_N] tile, split after the dot.
                cols = (pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)) % (2 * I)
                w_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk
                acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    if EVEN_K:
                        a = tl.load(a_ptrs)
                    else:
                        a = tl.load(a_ptrs, mask=(kk[None, :] < H - k0), other=0.0)
                    if W_TMA:
                        # TMA: rows past 2I and columns past H arrive as zeros.
                        w = w_desc.load([expert.to(tl.int32), pid_n * 2 * BLOCK_N, k0]).reshape(2 * BLOCK_N, BLOCK_K).T
                    elif EVEN_K:
                        w = tl.load(w_ptrs)
                    else:
                        w = tl.load(w_ptrs, mask=(kk[:, None] < H - k0), other=0.0)
                    acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
                    a_ptrs += BLOCK_K
                    w_ptrs += BLOCK_K * stride_wk
                if SCALE_INPUT:  # (w x) W = w (x W): scale the rows after the dot, before the bias
                    acc *= tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
                if HAS_BIAS:
                    acc += tl.load(b_ptr + expert * stride_be + cols).to(tl.float32)[None, :]
                if STORE_Z:  # the backward's pre-activation rows, in w_gate_up's row order, at each pair's row
                    z_cols = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
                    z_rows = z_ptr + rows[:, None].to(tl.int64) * stride_zm
                    tl.store(z_rows + z_cols[None, :], acc.to(z_ptr.dtype.element_ty),
                             mask=valid[:, None] & (z_cols < 2 * I)[None, :])
                gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
            else:
                n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % I
                wg_ptrs = w_base + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk
                wu_ptrs = wg_ptrs + I * stride_wn
                gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    if EVEN_K:
                        a = tl.load(a_ptrs)
                    else:
                        a = tl.load(a_ptrs, mask=(kk[None, :] < H - k0), other=0.0)
                    if W_TMA:
                        # TMA: gate rows past I read up rows (their columns are not stored); up rows past 2I are zeros.
                        wg = w_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
                        wu = w_desc.load([expert.to(tl.int32), I + pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
                    elif EVEN_K:
                        wg = tl.load(wg_ptrs)
                        wu = tl.load(wu_ptrs)
                    else:
                        wg = tl.load(wg_ptrs, mask=(kk[:, None] < H - k0), other=0.0)
                        wu = tl.load(wu_ptrs, mask=(kk[:, None] < H - k0), other=0.0)
                    gate = tl.dot(a, wg, gate, input_precision=DOT_PRECISION)
                    up = tl.dot(a, wu, up, input_precision=DOT_PRECISION)
                    a_ptrs += BLOCK_K
                    wg_ptrs += BLOCK_K * stride_wk
                    wu_ptrs += BLOCK_K * stride_wk
                if SCALE_INPUT:
                    row_w = tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
                    gate *= row_w
                    up *= row_w
                if HAS_BIAS:
                    gate += tl.load(b_ptr + expert * stride_be + n).to(tl.float32)[None, :]
                    up += tl.load(b_ptr + expert * stride_be + I + n).to(tl.float32)[None, :]
                if STORE_Z:
                    z_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    z_mask = valid[:, None] & (z_n < I)[None, :]
                    z_ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_zm + z_n[None, :]
                    tl.store(z_ptrs, gate.to(z_ptr.dtype.element_ty), mask=z_mask)
                    tl.store(z_ptrs + I, up.to(z_ptr.dtype.element_ty), mask=z_mask)
            out = gated_act(gate, up, alpha, limit, ACT)
            n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ptrs = act_ptr + slots[:, None] * stride_am + n_out[None, :]
            tl.store(ptrs, out.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (n_out < I)[None, :])


@triton.jit(do_not_specialize=["GROUP_M", "S"])  # S: act's rows, a bound that moves with T (read by TMA_DEVICE only)
def _down_kernel(
    a_ptr, a_desc, w_ptr, w_desc, b_ptr, y_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr,
    num_padded_ptr,
    H, I, E, S, TOP_K, GROUP_M,
    stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    W_TMA: tl.constexpr, SCALE_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARP_SPEC: tl.constexpr,
    TAIL_M: tl.constexpr,
):
    if W_TMA == 2:  # TMA_DEVICE: as launch_down's host descriptors, act [S, I] and W_down [E, H, I]
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[S, I], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, H, I], strides=[stride_we, stride_wn, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    num_pid_n = tl.cdiv(H, BLOCK_N)
    num_tiles = tl.load(num_padded_ptr) // BLOCK_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=WARP_SPEC, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile_coords(tile, num_tiles // num_pid_n, num_pid_n, GROUP_M)
        if TAIL_M > 0:  # KernelConfig.tail_m (launch_down passes it only to calls _down_folded_tile covers)
            expert, end, fold, folded = _fold_state(pid_m, block_expert_ptr, seg_end_ptr, BLOCK_M, TAIL_M)
            if not folded:
                _down_folded_tile(a_ptr, a_desc, w_ptr, w_desc, y_ptr, topk_w_ptr, sorted_rows_ptr, pid_m, pid_n,
                                  expert, end, fold, H, I, stride_am, stride_we, stride_wn, stride_wk, stride_ym,
                                  EVEN_K, DOT_PRECISION, W_TMA, SCALE_INPUT, BLOCK_M, BLOCK_N, BLOCK_K, TAIL_M)
        else:
            expert, slots, rows, valid = _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, BLOCK_M)
            n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
            kk = tl.arange(0, BLOCK_K)
            # Padding rows of act were never written: whatever they hold only reaches rows that are not stored.
            a_ptrs = a_ptr + slots[:, None] * stride_am + kk[None, :]
            w_ptrs = w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                if W_TMA:
                    # act rows are contiguous in sorted order, so both operands come by TMA (K tail: zeros).
                    a = a_desc.load([pid_m * BLOCK_M, k0])
                    w = w_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
                elif EVEN_K:
                    a = tl.load(a_ptrs)
                    w = tl.load(w_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=(kk[None, :] < I - k0), other=0.0)
                    w = tl.load(w_ptrs, mask=(kk[:, None] < I - k0), other=0.0)
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wk
            if HAS_BIAS:
                acc += tl.load(b_ptr + expert * stride_be + n).to(tl.float32)[None, :]
            if not SCALE_INPUT:  # the weight went into the gate_up rows instead
                acc *= tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
            n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = valid[:, None] & (n_out < H)[None, :]
            if ATOMIC:
                # y is the fp32 [T, H] output itself: add into the token's row (order of adds varies by run).
                tok = (rows // TOP_K).to(tl.int64)
                tl.atomic_add(y_ptr + tok[:, None] * stride_ym + n_out[None, :], acc, mask=mask, sem="relaxed")
            else:
                tl.store(y_ptr + slots[:, None] * stride_ym + n_out[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, out_ptr, w_ptr, ids_ptr, b_ptr, H, stride_ym, stride_om, stride_be,
                    TOP_K: tl.constexpr, WEIGHTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # fixed slot order: deterministic
        if pos_ptr is None:  # y in pair order (the quantized decode GEMVs' rows, a sentinel's already 0)
            p = t * TOP_K + j
        else:
            p = tl.load(pos_ptr + t * TOP_K + j).to(tl.int64)  # -1: a sentinel pair, which adds nothing
        live = h < tl.where(p >= 0, H, 0)
        row = tl.load(y_ptr + p * stride_ym + h, mask=live, other=0.0).to(tl.float32)
        # The sorted path's rows arrive finished (down GEMM epilogue); a library GEMM's (triton_grouped.py) get
        # their bias and router weight here.
        if HAS_BIAS:
            e = tl.load(ids_ptr + t * TOP_K + j).to(tl.int64)
            row += tl.load(b_ptr + e * stride_be + h, mask=live, other=0.0).to(tl.float32)
        if WEIGHTED:
            row = tl.where(live, row * tl.load(w_ptr + t * TOP_K + j).to(tl.float32), 0.0)
        acc += row
    tl.store(out_ptr + t * stride_om + h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (tf32 would miss the fp32 tolerance of 1e-4; ~3e-4 rel err).
    return "ieee" if dtype == torch.float32 else "tf32"


def _grid(max_tiles: int, programs_per_sm: int, t: torch.Tensor) -> tuple[int]:
    # (torch.sym_*: a symbolic max_tiles, dynamic shapes, gives an expression of the grid, not a guard)
    if programs_per_sm and t.device.type == "cuda":
        return (torch.sym_max(1, torch.sym_min(max_tiles, programs_per_sm * device.num_sms(device.index(t)))),)
    return (torch.sym_max(1, max_tiles),)


def logical_strides(w: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(expert, out-feature, in-feature) strides of a weight, whichever way it is stored."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transposed else (w.stride(0), w.stride(1), w.stride(2))


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether TMA can load these (CUDA, sm90+, unit last stride, 16-byte aligned base and strides; a traced
    tensor's base as device.aligned16 judges it)."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or not device.has_tma(device.index(t0)):
        return False
    return all(
        t.stride(-1) == 1 and device.aligned16(t) and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in tensors
    )


def tma_mode(config: SortedConfig, spec: ExpertsSpec, *tensors: torch.Tensor) -> int:
    """The W_TMA of a launch with this config on these operands (the ones TMA loads)."""
    if not (config.tma and not spec.transposed and tma_ok(*tensors)):
        return TMA_OFF
    if launch.tracing():  # host descriptors cannot be recorded: pointer loads unless the device builds them
        return TMA_DEVICE if launch.recorded_tma() else TMA_OFF
    return TMA_HOST


def _weight_desc(w, rows: int, block_k: int, use: bool):
    """A TMA descriptor of w [E, N, K] loading [1, rows, block_k] boxes, or None."""
    if not use:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(w, list(w.shape), list(w.stride()), [1, rows, block_k])


def folds_gate_up(config: SortedConfig, spec: ExpertsSpec, b_gate_up, z) -> int:
    """The TAIL_M of a gate_up call: config.gate_up.tail_m where _gate_up_folded_tile covers the call, else 0."""
    plain = spec.gate_up is GateUpLayout.CONCAT and b_gate_up is None and not spec.scale_input and z is None
    return config.gate_up.tail_m if plain else 0


def folds_down(config: SortedConfig, b_down) -> int:
    """The TAIL_M of a down call: config.down.tail_m where _down_folded_tile covers the call, else 0."""
    return config.down.tail_m if b_down is None and config.combine is Combine.GATHER else 0


def launch_gate_up(hidden, rows: AlignedRows, w_gate_up, b_gate_up, spec: ExpertsSpec, config: SortedConfig, k: int,
                   act, weights=None, z=None):
    """act[slot] = act(gate) * up of the pair at each sorted slot (padding slots untouched); with
    spec.scale_input the pair's router weight (`weights` [S]) scales its row first. With `z` [S, 2I] (a training
    forward, or the backward's recompute) each pair's pre-activation row (bias added) is stored there too, at the
    pair's index t*k + j (not its sorted slot: the backward may align with another block_m), in w_gate_up's row
    order; a sentinel pair's row is not written."""
    H, I = hidden.shape[1], act.shape[1]
    gu = config.gate_up
    interleaved = spec.gate_up is GateUpLayout.INTERLEAVED
    tma = tma_mode(config, spec, w_gate_up)
    w_desc = _weight_desc(w_gate_up, (2 if interleaved else 1) * gu.block_n, gu.block_k, tma == TMA_HOST)
    grid = _grid(rows.max_blocks * triton.cdiv(I, gu.block_n), config.programs_per_sm, hidden)
    launch.kernel(_gate_up_kernel)[grid](
        hidden, w_gate_up, w_desc, b_gate_up if b_gate_up is not None else w_gate_up, act, z if z is not None else act,
        weights if spec.scale_input else act, rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        H, I, w_gate_up.shape[0], k, float(spec.swiglu_alpha), float(spec.swiglu_limit), config.group_m,
        hidden.stride(0), *logical_strides(w_gate_up, spec.transposed),
        b_gate_up.stride(0) if b_gate_up is not None else 0, act.stride(0), z.stride(0) if z is not None else 0,
        ACT=ACT_CODE[spec.activation], INTERLEAVED=interleaved,
        HAS_BIAS=b_gate_up is not None, EVEN_K=H % gu.block_k == 0, DOT_PRECISION=dot_precision(hidden.dtype),
        W_TMA=tma, SCALE_INPUT=spec.scale_input, STORE_Z=z is not None, BLOCK_M=config.block_m, BLOCK_N=gu.block_n,
        BLOCK_K=gu.block_k,
        WARP_SPEC=gu.warp_specialize, TAIL_M=folds_gate_up(config, spec, b_gate_up, z), num_warps=gu.num_warps,
        num_stages=gu.num_stages,
    )


def launch_down(act, rows: AlignedRows, w_down, b_down, weights, spec: ExpertsSpec, config: SortedConfig, k: int, y):
    """y[slot] = (act[slot] @ W_down[e]^T + b_down[e]) * weight (gather combine), or, with the atomic
    combine, y [T, H] fp32 += the same, at each pair's token row."""
    I, H = act.shape[1], y.shape[1]
    dn = config.down
    tma = tma_mode(config, spec, w_down, act)
    a_desc = None
    if tma == TMA_HOST:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(act, list(act.shape), list(act.stride()), [config.block_m, dn.block_k])
    grid = _grid(rows.max_blocks * triton.cdiv(H, dn.block_n), config.programs_per_sm, act)
    launch.kernel(_down_kernel)[grid](
        act, a_desc, w_down, _weight_desc(w_down, dn.block_n, dn.block_k, tma == TMA_HOST),
        b_down if b_down is not None else w_down, y, weights,
        rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        H, I, w_down.shape[0], act.shape[0], k, config.group_m,
        act.stride(0), *logical_strides(w_down, spec.transposed), b_down.stride(0) if b_down is not None else 0,
        y.stride(0),
        HAS_BIAS=b_down is not None, EVEN_K=I % dn.block_k == 0, ATOMIC=config.combine is Combine.ATOMIC,
        DOT_PRECISION=dot_precision(act.dtype), W_TMA=tma, SCALE_INPUT=spec.scale_input,
        BLOCK_M=config.block_m, BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, WARP_SPEC=dn.warp_specialize,
        TAIL_M=folds_down(config, b_down), num_warps=dn.num_warps, num_stages=dn.num_stages,
    )


def launch_combine(y, rows: AlignedRows | None, k: int, out, weights=None, ids=None, b_down=None):
    """out[t] = sum_j y[pos[t k + j]] in slot order (rows None: y[t k + j], rows already in pair order); with
    `weights` [S] each row times its pair's weight, with `b_down` [E, H] (and the flat `ids` [S]) plus its expert's
    bias first: rows of a GEMM without an epilogue."""
    T, H = out.shape
    block_h = min(1024, triton.next_power_of_2(H))
    pos = rows.pos if rows is not None else None
    launch.kernel(_combine_kernel)[(T, triton.cdiv(H, block_h))](
        y, pos, out, weights if weights is not None else y, ids if ids is not None else y,
        b_down if b_down is not None else y, H, y.stride(0), out.stride(0),
        b_down.stride(0) if b_down is not None else 0,
        TOP_K=k, WEIGHTED=weights is not None, HAS_BIAS=b_down is not None, BLOCK_H=block_h, num_warps=4,
    )


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec,
                    config: SortedConfig, z=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H], ids_ok [1] int32); with `z` [T*k, 2I] the pre-activation rows are saved there for the
    backward (launch_gate_up). Sizes and layouts were checked by ops/checks.py; T > 0."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    I = spec.intermediate(w_down)
    rows = align_rows(topk_ids, w_gate_up.shape[0], config.block_m)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1)
    if weights.stride(0) != 1:
        weights = weights.contiguous()
    act = launch.empty(hidden, rows.sorted_rows.numel(), I)
    launch_gate_up(hidden, rows, w_gate_up, b_gate_up, spec, config, k, act, weights, z=z)
    if config.combine is Combine.ATOMIC:
        y = hidden.new_zeros(T, H, dtype=torch.float32)
        launch_down(act, rows, w_down, b_down, weights, spec, config, k, y)
        return y.to(hidden.dtype), rows.ids_ok
    y = launch.empty(hidden, rows.sorted_rows.numel(), H)
    launch_down(act, rows, w_down, b_down, weights, spec, config, k, y)
    out = launch.empty(hidden, T, H)
    launch_combine(y, rows, k, out)
    return out, rows.ids_ok
