"""Triton experts forward, decode path (T * k small next to E): no sort, two launches, weights streamed once.

Data contract (T tokens, k top-k, E experts, H hidden, I intermediate, S = T*k pairs, p = t*k + j)
    hidden        [T, H]           bf16/fp16/fp32, unit column stride
    topk_ids      [T, k]           int32/int64 in [0, E]; E: the expert-parallel sentinel, a slot that adds nothing
                                   (its gate_up program loops zero times, its row is never read; the down
                                   kernel reads no weights for it). Others out of range are clamped, flagged in
                                   ids_ok, and fail the launch
    topk_weights  [T, k]           any float dtype, applied in fp32
    w_gate_up     [E, 2I, H]       (or transposed [E, H, 2I]) read in place through its strides
    w_down        [E, H, I]        (or transposed [E, I, H])
    act           [S, I]           hidden's dtype: act(gate) * up of every pair
    out           [T, H]           out[t] = sum_j w[t,j] * (act[p] @ W_down[e]^T + b_down[e]), j in order
                                   (spec.scale_input, Llama-4: w[t,j] scales pair p's gate_up row instead)

    route -> [gate_up GEMV + act: grid (S, I / BLOCK_N)] -> [down GEMV * weight + combine: grid (T, H / BLOCK_N,
                                                             SPLIT), each program all k slots of its token at once]
    (MOE_COMPILER_ROUTE_IN_GEMV=1, traced decode calls fed by a route op: each gate_up program routes its token from
     router_logits [T, E] itself and writes topk_ids / topk_weights for the down kernel; no route launch)
    part          [SPLIT, T, H]    fp32 partial sums of the down GEMV's I-chunks (SPLIT = config.down.split_k > 1)
    tickets       [T * H / BLOCK_N] int32, zeroed by the gate_up launch; the last split of a tile sums the partials

Transposed weights (GPT-OSS, Llama-4: contiguous along the output columns) take wide column tiles: interleaved
gate/up as one tile of adjacent columns split after the loop (PAIRED), the down tile accumulated elementwise and
reduced once (ACC_3D), its reduction split over programs where H / BLOCK_N leaves the GPU short (SPLIT).

With the block's shared experts (spec.SharedMLP; gate [Is, H], up [Is, H], down [H, Is], gate weight [1, H]):
    shared_act    [T, Is]          act(x Wg^T) * (x Wu^T): extra rows of the gate_up grid after the S pairs
    shared_gate   [T] fp32         sigmoid(x . w_gate), by each token's first shared tile (sigmoid-gated form)
    out[t]       += shared_gate[t] * shared_act[t] @ Wd^T, in the same down program as the routed slots
so the shared MLP is one more pair per token: no extra launch, its weights stream with the routed ones.

When T*k is small next to E the pairs rarely share an expert, so reading one expert's rows per pair is
reading each touched expert once: the whole op is a stream of weight bytes, and these kernels are GEMVs
with fp32 FMAs (no tensor cores needed) that keep enough bytes in flight to run at HBM speed. Within one
token the k experts are distinct, so T = 1 never re-reads a weight. The down kernel sums a token's k
slots in registers in a fixed order, so the combine is fused and deterministic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..spec import ExpertsSpec, GateUpLayout, RouterSpec
from . import launch
from .triton_act import ACT_CODE, gated_act
from .triton_config import DecodeConfig
from .triton_experts import logical_strides
from .triton_route import Routed, route_args, route_rows


@triton.jit
def check_ids(ids_ptr, ok_ptr, S, E, BLOCK_S: tl.constexpr):
    """One program checks every id (S is small on the decode paths): ok_ptr[0] = all in [0, E] (E: the sentinel),
    and a bad one fails the launch."""
    bad = tl.zeros([BLOCK_S], dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        some = tl.load(ids_ptr + s, mask=s < S, other=0)
        bad += ((some < 0) | (some > E)).to(tl.int32)
    n_bad = tl.sum(bad, 0)
    tl.store(ok_ptr, (n_bad == 0).to(tl.int32))
    tl.device_assert(n_bad == 0, "moe_compiler.experts: topk_ids out of [0, E]")  # live: see LIVE_ASSERTS


@triton.jit
def _gate_up_rows(x_ptrs, wg_ptrs, wu_ptrs, H, stride_wk, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """(gate, up) [BLOCK_N] fp32: one x row against BLOCK_N gate rows and BLOCK_N up rows over H."""
    kk = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # A per-loop num_stages pipelines every load of the loop (async copies into shared memory), not only
    # loads feeding a tl.dot as the kernel-wide num_stages does: NUM_STAGES steps of weights in flight per
    # program without holding them in registers.
    for k0 in tl.range(0, H, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs).to(tl.float32)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            k_ok = kk < H - k0
            x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            wg = tl.load(wg_ptrs, mask=k_ok[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_ok[None, :], other=0.0)
        # Elementwise FMAs into a [BLOCK_N, BLOCK_K] accumulator; one reduction after the loop.
        acc_g += wg.to(tl.float32) * x[None, :]
        acc_u += wu.to(tl.float32) * x[None, :]
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    return tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1)


@triton.jit
def _gemv_rows(x_ptrs, w_ptrs, k_lo, k_end, stride_wk, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """[BLOCK_N] fp32: one x row against BLOCK_N weight rows over columns [k_lo, k_end), the pointers at k_lo
    (_gate_up_rows for one matrix)."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs).to(tl.float32)
            w = tl.load(w_ptrs)
        else:
            k_ok = kk < k_end - k0
            x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return tl.sum(acc, axis=1)


@triton.jit
def _shared_gate_up(
    x_ptr, sg_ptr, su_ptr, seg_ptr, sact_ptr, sgate_ptr, q, T, H, Is, alpha, limit,
    stride_xm, stride_sn, stride_sk, stride_sam, SHARED_TILES,
    ACT: tl.constexpr, HAS_GATE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Shared tile q: token q // SHARED_TILES, columns (q % SHARED_TILES) * BLOCK_N of the shared MLP."""
    t = q // SHARED_TILES
    tile = q % SHARED_TILES
    if t < T:  # the grid rounds the shared tiles up to whole rows of the routed grid
        row = t.to(tl.int64)
        kk = tl.arange(0, BLOCK_K)
        n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)) % Is
        x_ptrs = x_ptr + row * stride_xm + kk
        rows = n[:, None].to(tl.int64) * stride_sn + kk[None, :] * stride_sk
        gate, up = _gate_up_rows(
            x_ptrs, sg_ptr + rows, su_ptr + rows, H, stride_sk, EVEN_K, BLOCK_N, BLOCK_K, NUM_STAGES
        )
        out = gated_act(gate, up, alpha, limit, ACT)
        n_out = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(sact_ptr + row * stride_sam + n_out, out.to(sact_ptr.dtype.element_ty), mask=n_out < Is)
        if HAS_GATE:
            if tile == 0:  # s[t] = sigmoid(x[t] . w_gate), once per token
                acc = tl.zeros([BLOCK_K], dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    k_ok = kk < H - k0
                    x = tl.load(x_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)
                    acc += x * tl.load(seg_ptr + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
                tl.store(sgate_ptr + row, tl.sigmoid(tl.sum(acc, 0)))


@triton.jit
def _route_pair(
    logits_ptr, rbias_ptr, ids_ptr, topk_w_ptr, p, pid_n, E, TOP_K, stride_lt, r_scale, r_masked, r_eps,
    R_MASKED_INF: tl.constexpr, R_TOP_K: tl.constexpr, R_SCORING: tl.constexpr, R_ROUND: tl.constexpr,
    R_CHOICE_ROUND: tl.constexpr, R_TOPK_FIRST: tl.constexpr, R_NORM: tl.constexpr, R_HAS_BIAS: tl.constexpr,
    R_N_GROUP: tl.constexpr, R_TOPK_GROUP: tl.constexpr, R_GROUP_MAX: tl.constexpr, R_BLOCK_E: tl.constexpr,
    R_BLOCK_K: tl.constexpr, R_BLOCK_G: tl.constexpr,
):
    """(expert id, router weight as stored, in fp32) of pair p, routed from its token's logits by the route
    kernel's own math (triton_route.route_rows); the programs of the first column tile store both for the down
    kernel. Every program of the token computes the same route (k argmax rounds over E values, serial
    reductions before the weight stream can start: +1.6 us per Qwen3-30B-A3B layer at T = 1 on the H200, NOTES
    "the route inside the decode gate_up GEMV") in place of a route kernel's launch and buffers."""
    tok = p // TOP_K
    rows = tok + tl.arange(0, 1)
    cols = tl.arange(0, R_BLOCK_E)
    w, chosen = route_rows(
        logits_ptr, rbias_ptr, rows, rows >= 0, cols, cols < E, E, stride_lt, r_scale, r_masked, r_eps,
        R_MASKED_INF, R_TOP_K, R_SCORING, R_ROUND, R_CHOICE_ROUND, R_TOPK_FIRST, R_NORM, R_HAS_BIAS, R_N_GROUP,
        R_TOPK_GROUP, R_GROUP_MAX, 1, R_BLOCK_E, R_BLOCK_K, R_BLOCK_G,
    )
    mine = tl.arange(0, R_BLOCK_K)[None, :] == p % TOP_K
    e = tl.sum(tl.where(mine, chosen, 0))
    # rounded as the route op stores it, so the down kernel's weight and this program's (scale_input) agree
    row_w = tl.sum(tl.where(mine, w, 0.0)).to(topk_w_ptr.dtype.element_ty)
    if pid_n == 0:
        tl.store(ids_ptr + p, e)
        tl.store(topk_w_ptr + p, row_w)
    return e, row_w.to(tl.float32)


@triton.jit
def _routed_gate_up(
    x_ptr, ids_ptr, topk_w_ptr, w_ptr, b_ptr, act_ptr, p, pid_n, E, H, I, TOP_K, alpha, limit,
    stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_am,
    logits_ptr, rbias_ptr, stride_lt, r_scale, r_masked, r_eps,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    SCALE_INPUT: tl.constexpr, PAIRED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, ROUTE: tl.constexpr,
    R_MASKED_INF: tl.constexpr, R_TOP_K: tl.constexpr, R_SCORING: tl.constexpr, R_ROUND: tl.constexpr,
    R_CHOICE_ROUND: tl.constexpr, R_TOPK_FIRST: tl.constexpr, R_NORM: tl.constexpr, R_HAS_BIAS: tl.constexpr,
    R_N_GROUP: tl.constexpr, R_TOPK_GROUP: tl.constexpr, R_GROUP_MAX: tl.constexpr, R_BLOCK_E: tl.constexpr,
    R_BLOCK_K: tl.constexpr, R_BLOCK_G: tl.constexpr,
):
    if ROUTE:  # the route in this kernel: ids / weights are its outputs (for the down kernel), not inputs
        e, row_w = _route_pair(
            logits_ptr, rbias_ptr, ids_ptr, topk_w_ptr, p, pid_n, E, TOP_K, stride_lt, r_scale, r_masked, r_eps,
            R_MASKED_INF, R_TOP_K, R_SCORING, R_ROUND, R_CHOICE_ROUND, R_TOPK_FIRST, R_NORM, R_HAS_BIAS, R_N_GROUP,
            R_TOPK_GROUP, R_GROUP_MAX, R_BLOCK_E, R_BLOCK_K, R_BLOCK_G,
        )
    else:
        e = tl.load(ids_ptr + p)
        if SCALE_INPUT:
            row_w = tl.load(topk_w_ptr + p).to(tl.float32)
    # A sentinel pair (id E: another rank's expert) runs its loop zero times: no weight bytes for a row the down
    # kernel never reads (under EP over R ranks, (R-1)/R of the pairs).
    h_live = tl.where(e < E, H, 0)
    e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int64)
    tok = (p // TOP_K).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % I
    if INTERLEAVED:
        gate_rows, up_rows = 2 * n, 2 * n + 1
    else:
        gate_rows, up_rows = n, I + n
    kk = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e * stride_we
    x_ptrs = x_ptr + tok * stride_xm + kk
    if PAIRED:
        # Interleaved gate/up columns along the contiguous dimension (GPT-OSS's [E, H, 2I]): one tile of 2 BLOCK_N
        # adjacent columns, so every weight row is one unit-stride run (two stride-2 tiles load element by
        # element), split into gate and up after the loop.
        cols = (pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)) % (2 * I)
        w_ptrs = w_base + cols[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
        both = _gemv_rows(x_ptrs, w_ptrs, 0, h_live, stride_wk, EVEN_K, 2 * BLOCK_N, BLOCK_K, NUM_STAGES)
        gate, up = tl.split(tl.reshape(both, [BLOCK_N, 2]))
    else:
        wg_ptrs = w_base + gate_rows[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
        wu_ptrs = w_base + up_rows[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
        gate, up = _gate_up_rows(x_ptrs, wg_ptrs, wu_ptrs, h_live, stride_wk, EVEN_K, BLOCK_N, BLOCK_K, NUM_STAGES)
    if SCALE_INPUT:  # Llama-4: (w x) W = w (x W)
        gate *= row_w
        up *= row_w
    if HAS_BIAS:
        gate += tl.load(b_ptr + e * stride_be + gate_rows).to(tl.float32)
        up += tl.load(b_ptr + e * stride_be + up_rows).to(tl.float32)
    out = gated_act(gate, up, alpha, limit, ACT)
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + p.to(tl.int64) * stride_am + n_out, out.to(act_ptr.dtype.element_ty), mask=n_out < I)


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, ids_ptr, topk_w_ptr, w_ptr, b_ptr, act_ptr, ok_ptr, tickets_ptr,
    sg_ptr, su_ptr, seg_ptr, sact_ptr, sgate_ptr, logits_ptr, rbias_ptr,
    S, E, H, I, Is, TOP_K, alpha, limit, N_TICKETS,
    stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_am, stride_sn, stride_sk, stride_sam, SHARED_TILES,
    stride_lt, r_scale, r_masked, r_eps,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    SCALE_INPUT: tl.constexpr, PAIRED: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_GATE: tl.constexpr,
    ZERO_TICKETS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr, ROUTE: tl.constexpr,
    R_MASKED_INF: tl.constexpr, R_TOP_K: tl.constexpr, R_SCORING: tl.constexpr, R_ROUND: tl.constexpr,
    R_CHOICE_ROUND: tl.constexpr, R_TOPK_FIRST: tl.constexpr, R_NORM: tl.constexpr, R_HAS_BIAS: tl.constexpr,
    R_N_GROUP: tl.constexpr, R_TOPK_GROUP: tl.constexpr, R_GROUP_MAX: tl.constexpr, R_BLOCK_E: tl.constexpr,
    R_BLOCK_K: tl.constexpr, R_BLOCK_G: tl.constexpr,
):
    # grid (S [+ shared rows], I / BLOCK_N): row p < S is pair p; the rows after S hold the shared MLP's
    # T * SHARED_TILES tiles, laid out row-major over the same second axis. With ROUTE each pair's program
    # routes its token from the logits (_route_pair) and ids / weights are written, not read: nothing to check.
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    if (p == 0) & (pid_n == 0):
        if not ROUTE:
            check_ids(ids_ptr, ok_ptr, S, E, BLOCK_S)
        # The split down kernel's tickets start at zero (this launch precedes it in the stream): no memset launch.
        # Unsplit, tickets_ptr is a dummy bound to ok_ptr: no store may name it (a constexpr, not N_TICKETS = 0),
        # or torch's mutation analysis sees two written arguments on one buffer and Inductor copies one per call.
        if ZERO_TICKETS:
            zero_tickets(tickets_ptr, N_TICKETS, BLOCK_S)
    if HAS_SHARED:
        if p >= S:  # rows after the S pairs: the shared MLP's tiles, row-major over the same second axis
            _shared_gate_up(
                x_ptr, sg_ptr, su_ptr, seg_ptr, sact_ptr, sgate_ptr, (p - S) * tl.num_programs(1) + pid_n, S // TOP_K,
                H, Is, alpha, limit, stride_xm, stride_sn, stride_sk, stride_sam, SHARED_TILES, ACT, HAS_GATE, EVEN_K,
                BLOCK_N, BLOCK_K, NUM_STAGES,
            )
        else:
            _routed_gate_up(
                x_ptr, ids_ptr, topk_w_ptr, w_ptr, b_ptr, act_ptr, p, pid_n, E, H, I, TOP_K, alpha, limit,
                stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_am,
                logits_ptr, rbias_ptr, stride_lt, r_scale, r_masked, r_eps,
                ACT, INTERLEAVED, HAS_BIAS, EVEN_K, SCALE_INPUT, PAIRED, BLOCK_N, BLOCK_K, NUM_STAGES, ROUTE,
                R_MASKED_INF, R_TOP_K, R_SCORING, R_ROUND, R_CHOICE_ROUND, R_TOPK_FIRST, R_NORM, R_HAS_BIAS, R_N_GROUP,
                R_TOPK_GROUP, R_GROUP_MAX, R_BLOCK_E, R_BLOCK_K, R_BLOCK_G,
            )
    else:  # without shared experts the kernel is the routed one alone
        _routed_gate_up(
            x_ptr, ids_ptr, topk_w_ptr, w_ptr, b_ptr, act_ptr, p, pid_n, E, H, I, TOP_K, alpha, limit,
            stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_am,
            logits_ptr, rbias_ptr, stride_lt, r_scale, r_masked, r_eps,
            ACT, INTERLEAVED, HAS_BIAS, EVEN_K, SCALE_INPUT, PAIRED, BLOCK_N, BLOCK_K, NUM_STAGES, ROUTE,
            R_MASKED_INF, R_TOP_K, R_SCORING, R_ROUND, R_CHOICE_ROUND, R_TOPK_FIRST, R_NORM, R_HAS_BIAS, R_N_GROUP,
            R_TOPK_GROUP, R_GROUP_MAX, R_BLOCK_E, R_BLOCK_K, R_BLOCK_G,
        )


@triton.jit
def _down_gemv_combine_kernel(
    a_ptr, ids_ptr, topk_w_ptr, w_ptr, b_ptr, out_ptr, sact_ptr, sdown_ptr, sgate_ptr, part_ptr, tickets_ptr,
    T, E, H, I, Is, TOP_K, K_CHUNK, KS_CHUNK,
    stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_om, stride_sam, stride_sdn, stride_sdk,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SCALE_INPUT: tl.constexpr, K_POW2: tl.constexpr,
    HAS_SHARED: tl.constexpr, HAS_GATE: tl.constexpr, ACC_3D: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # All k slots of the token at once: a [K_POW2, BLOCK_N, BLOCK_K] weight tile per step keeps k times more
    # bytes in flight than a loop over slots (one program per SM at T = 1 must saturate HBM on its own).
    # grid (T, H / BLOCK_N, SPLIT): split s sums I-columns [s K_CHUNK, (s + 1) K_CHUNK) (and Is-columns by
    # KS_CHUNK); with SPLIT > 1 each writes its fp32 partial and the last of a tile's splits to arrive (a ticket)
    # sums them in split order: deterministic, and a grid that fills the GPU when H / BLOCK_N alone does not.
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    j = tl.arange(0, K_POW2)
    j_ok = j < TOP_K
    p = t * TOP_K + j
    e = tl.load(ids_ptr + p, mask=j_ok, other=0)
    j_ok = j_ok & (e < E)  # a sentinel slot (id E) reads and adds nothing
    e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
    k_lo = split * K_CHUNK
    k_end = tl.minimum(k_lo + K_CHUNK, I)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + p[:, None] * stride_am + k_lo + kk[None, :]
    w_ptrs = (w_ptr + e[:, None, None] * stride_we + n[None, :, None].to(tl.int64) * stride_wn
              + (k_lo + kk)[None, None, :] * stride_wk)
    acc = tl.zeros([K_POW2, BLOCK_N], dtype=tl.float32)
    # Weights contiguous along n (transposed, [E, I, H]): the step's K lies across threads and warps, so summing
    # it every step would cost a cross-warp reduction each time; accumulate elementwise, reduce once instead.
    acc3 = tl.zeros([K_POW2, BLOCK_N, BLOCK_K] if ACC_3D else [1, 1, 1], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_end, BLOCK_K, num_stages=NUM_STAGES):  # every load pipelined (see _gate_up_rows)
        if EVEN_K:
            a_mask = j_ok[:, None]
        else:
            a_mask = j_ok[:, None] & (kk[None, :] < k_end - k0)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=a_mask[:, None, :], other=0.0)
        if ACC_3D:
            acc3 += w.to(tl.float32) * a[:, None, :]
        else:
            acc += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if ACC_3D:
        acc = tl.sum(acc3, axis=2)
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(b_ptr + e[:, None] * stride_be + n[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32)
    if SCALE_INPUT:  # the weight already scaled the gate_up rows
        weight = tl.where(j_ok, 1.0, 0.0)
    else:
        weight = tl.load(topk_w_ptr + p, mask=j_ok, other=0.0).to(tl.float32)
    out = tl.sum(acc * weight[:, None], axis=0)  # a fixed reduction tree over the slots: deterministic
    if HAS_SHARED:  # + s[t] * (shared act[t] @ W_down_shared^T), the same columns of the same token
        # One [BLOCK_N, BLOCK_K] tile per step: a [K_POW2, ...] tile over chunks of Is measured slower (the
        # second 3-D tile doubles the registers and spills; NOTES.md "shared experts v2").
        ks_lo = split * KS_CHUNK
        ks_end = tl.minimum(ks_lo + KS_CHUNK, Is)
        sa_ptrs = sact_ptr + t * stride_sam + ks_lo + kk
        sw_ptrs = sdown_ptr + n[:, None].to(tl.int64) * stride_sdn + (ks_lo + kk)[None, :] * stride_sdk
        y = _gemv_rows(sa_ptrs, sw_ptrs, ks_lo, ks_end, stride_sdk, False, BLOCK_N, BLOCK_K, NUM_STAGES)
        if HAS_GATE:
            y *= tl.load(sgate_ptr + t)
        out += y
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SPLIT == 1:
        tl.store(out_ptr + t * stride_om + n_out, out.to(out_ptr.dtype.element_ty), mask=n_out < H)
    else:  # part [SPLIT, T, H] fp32; the ticket of tile (t, pid_n) counts its splits
        sum_parts_in_order(part_ptr + t * H, T * H, split, out, tickets_ptr + t * tl.num_programs(1) + pid_n,
                           out_ptr + t * stride_om, n_out, H, SPLIT)


@triton.jit
def zero_tickets(tickets_ptr, N, BLOCK: tl.constexpr):
    """tickets[:N] = 0, by one program of the launch before the one that counts on them (sum_parts_in_order)."""
    for c0 in range(0, N, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        tl.store(tickets_ptr + c, tl.zeros([BLOCK], dtype=tl.int32), mask=c < N)


@triton.jit
def sum_parts_in_order(part_ptr, stride_part, part, value, ticket_ptr, out_ptr, n_out, H, PARTS: tl.constexpr):
    """One output tile computed by PARTS programs, each holding an fp32 partial `value` (columns n_out): store it
    as part `part` (at part_ptr + part * stride_part); the last program of the tile to arrive — its ticket, zeroed
    before the launch by the launch before it in the stream — sums the parts in part order into out_ptr's row, so
    the result does not depend on who arrives when (deterministic, no atomics on the output, no second launch),
    and sets the ticket back to zero (a relaunch without the zeroing launch, as the tuner's, still counts from 0)."""
    tl.store(part_ptr + part * stride_part + n_out, value, mask=n_out < H)
    tl.debug_barrier()  # every thread's partial stored before the ticket releases them
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == PARTS - 1:
        tl.store(ticket_ptr, 0)
        total = tl.zeros_like(value)
        for s in tl.static_range(PARTS):  # part order, whoever arrived last
            total += tl.load(part_ptr + s * stride_part + n_out, mask=n_out < H, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + n_out, total.to(out_ptr.dtype.element_ty), mask=n_out < H)


# The id check loads every id in one program: the decode path is only taken for S up to this many pairs.
MAX_PAIRS = 4096


def paired(spec: ExpertsSpec) -> bool:
    """Gate and up interleaved along the weight's contiguous dimension (transposed): one tile of adjacent columns."""
    return spec.transposed and spec.gate_up is GateUpLayout.INTERLEAVED


def _split_columns(K: int, splits: int, step: int) -> int:
    """Columns per split of a reduction over K in `splits` parts, each a whole number of `step`-column steps."""
    return triton.cdiv(triton.cdiv(K, splits), step) * step


def down_split(config: DecodeConfig, I: int) -> tuple[int, int]:
    """(splits, columns per split) of the down GEMV's reduction over I: config.down.split_k at most, each split a
    whole number of block_k steps."""
    chunk = _split_columns(I, config.down.split_k, config.down.block_k)
    return triton.cdiv(I, chunk), chunk


def tickets_for(config: DecodeConfig, T: int, H: int, I: int, device) -> torch.Tensor | None:
    """The split down kernel's tickets, one per output tile (zeroed by the gate_up launch); None unsplit."""
    if down_split(config, I)[0] == 1:
        return None
    return torch.empty(T * triton.cdiv(H, config.down.block_n), dtype=torch.int32, device=device)


def _route_launch_args(routed: Routed | None, E: int, dummy) -> tuple[tuple, dict]:
    """The gate_up kernel's route arguments: (logits, bias, stride, scale, masked score, eps) and its R_*
    constexprs; without a route, placeholders its ROUTE=False instance never reads."""
    if routed is None:
        scalars, constexprs = _no_route_args()
        return (dummy, dummy, 0, *scalars), constexprs
    bias = routed.correction_bias
    scalars, constexprs = route_args(routed.spec, E, None if bias is None else bias.dtype)
    return ((routed.logits, bias if bias is not None else routed.logits, routed.logits.stride(0), *scalars),
            {"ROUTE": True, **{f"R_{k}": v for k, v in constexprs.items()}})


@functools.cache
def _no_route_args() -> tuple[tuple, dict]:
    """Fixed placeholders (E = 1: no specialization of the kernel on them), built once: every eager decode call
    without a route passes them."""
    scalars, constexprs = route_args(RouterSpec(top_k=1), 1, None)
    return scalars, {"ROUTE": False, **{f"R_{k}": v for k, v in constexprs.items()}}


def _fits(routed: Routed, T: int, k: int, E: int) -> bool:
    """Whether `routed` routes these experts' calls: logits [T, E], top_k k."""
    return routed.spec.top_k == k and tuple(routed.logits.shape) == (T, E)


def launch_gate_up(hidden, ids, w_gate_up, b_gate_up, spec: ExpertsSpec, config: DecodeConfig, k: int, act, ids_ok,
                   weights=None, mlp=None, shared_act=None, shared_gate=None, tickets=None,
                   routed: Routed | None = None):
    """act[p] = act(gate) * up of pair p (its input scaled by weights[p] under spec.scale_input);
    ids_ok[0] = whether every id is in [0, E]; tickets (if given) zeroed. With a shared MLP `mlp` (spec.SharedMLP)
    also shared_act[t] = act(x[t] Wg^T) * (x[t] Wu^T) and, if it has an expert gate, shared_gate[t] = s[t].
    With `routed` (a traced route call's triton_route.Routed) the kernel routes each token itself and writes
    ids [S] and weights [S] (the route op's dtype) instead of reading them; ids_ok is then left unwritten."""
    S, I = act.shape
    T, H = hidden.shape
    if routed is not None and (not _fits(routed, T, k, w_gate_up.shape[0]) or routed.logits.stride(1) != 1):
        raise ValueError(f"moe_compiler: a route in the gate_up GEMV needs logits [{T}, {w_gate_up.shape[0]}] with "
                         f"unit column stride and top_k {k}; got {tuple(routed.logits.shape)}, stride "
                         f"{routed.logits.stride()}, top_k {routed.spec.top_k}")
    gu = config.gate_up
    tiles = triton.cdiv(I, gu.block_n)
    rows = S
    if mlp is not None:
        shared_tiles = triton.cdiv(mlp.intermediate, gu.block_n)
        rows += triton.cdiv(T * shared_tiles, tiles)
        if mlp.gate.stride() != mlp.up.stride():
            raise ValueError(
                f"moe_compiler: shared gate and up weights: expected the same strides (one pointer pattern for both), "
                f"got {mlp.gate.stride()} / {mlp.up.stride()}. Make the shared MLP's gate and up Linear weights "
                "contiguous."
            )
    dummy = act
    (logits, rbias, *route_scalars), route_constexprs = _route_launch_args(routed, w_gate_up.shape[0], dummy)
    launch.kernel(_gate_up_gemv_kernel)[(rows, tiles)](
        hidden, ids, weights if spec.scale_input or routed is not None else act, w_gate_up,
        b_gate_up if b_gate_up is not None else w_gate_up,
        act, ids_ok, tickets if tickets is not None else ids_ok,
        mlp.gate if mlp is not None else dummy, mlp.up if mlp is not None else dummy,
        mlp.expert_gate if mlp is not None and mlp.expert_gate is not None else dummy,
        shared_act if mlp is not None else dummy, shared_gate if shared_gate is not None else ids_ok, logits, rbias,
        S, w_gate_up.shape[0], H, I, mlp.intermediate if mlp is not None else 1, k,
        float(spec.swiglu_alpha), float(spec.swiglu_limit), tickets.numel() if tickets is not None else 0,
        hidden.stride(0), *logical_strides(w_gate_up, spec.transposed),
        b_gate_up.stride(0) if b_gate_up is not None else 0, act.stride(0),
        *(mlp.gate.stride() if mlp is not None else (0, 0)), shared_act.stride(0) if mlp is not None else 0,
        shared_tiles if mlp is not None else 1, *route_scalars, **route_constexprs,
        ACT=ACT_CODE[spec.activation], INTERLEAVED=spec.gate_up is GateUpLayout.INTERLEAVED,
        HAS_BIAS=b_gate_up is not None, EVEN_K=H % gu.block_k == 0, SCALE_INPUT=spec.scale_input,
        PAIRED=paired(spec), HAS_SHARED=mlp is not None, HAS_GATE=mlp is not None and mlp.expert_gate is not None,
        ZERO_TICKETS=tickets is not None, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, BLOCK_S=128, NUM_STAGES=gu.num_stages,
        num_warps=gu.num_warps, num_stages=gu.num_stages, **launch.asserts(),
    )


def launch_down(act, ids, weights, w_down, b_down, spec: ExpertsSpec, config: DecodeConfig, k: int, out,
                mlp=None, shared_act=None, shared_gate=None, tickets=None):
    """out[t] = sum_j weights[t, j] * (act[t*k + j] @ W_down[e]^T + b_down[e])
    [+ s[t] * shared_act[t] @ Wd_shared^T]. A split config (config.down.split_k > 1) takes zeroed `tickets`
    (tickets_for; the gate_up launch zeroes them)."""
    T, H = out.shape
    I = act.shape[1]
    Is = mlp.intermediate if mlp is not None else 1
    dn = config.down
    split, chunk = down_split(config, I)
    tiles = triton.cdiv(H, dn.block_n)
    if split > 1 and (tickets is None or tickets.numel() != T * tiles):
        raise ValueError(f"moe_compiler: the split down GEMV needs tickets_for(...) ({T} x {tiles} tiles), got "
                         f"{None if tickets is None else tickets.numel()}")
    part = torch.empty(split, T, H, dtype=torch.float32, device=out.device) if split > 1 else out
    launch.kernel(_down_gemv_combine_kernel)[(T, tiles, split)](
        act, ids, weights, w_down, b_down if b_down is not None else w_down, out,
        shared_act if mlp is not None else act, mlp.down if mlp is not None else act,
        shared_gate if shared_gate is not None else weights, part, tickets if tickets is not None else ids,
        T, w_down.shape[0], H, I, Is, k, chunk, _split_columns(Is, split, dn.block_k),
        act.stride(0), *logical_strides(w_down, spec.transposed),
        b_down.stride(0) if b_down is not None else 0, out.stride(0),
        shared_act.stride(0) if mlp is not None else 0, *(mlp.down.stride() if mlp is not None else (0, 0)),
        HAS_BIAS=b_down is not None, EVEN_K=I % dn.block_k == 0, SCALE_INPUT=spec.scale_input,
        K_POW2=triton.next_power_of_2(k),
        HAS_SHARED=mlp is not None, HAS_GATE=shared_gate is not None, ACC_3D=spec.transposed, SPLIT=split,
        BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, NUM_STAGES=dn.num_stages,
        num_warps=dn.num_warps, num_stages=dn.num_stages,
    )


def pair_buffers(hidden, topk_ids, topk_weights, I: int):
    """What both decode paths' kernels take per call: (hidden with unit column stride, flat ids, flat weights,
    ids_ok [1] int32, act [T * k, I] in hidden's dtype); at most MAX_PAIRS pairs."""
    T, k = topk_ids.shape
    if T * k > MAX_PAIRS:
        raise ValueError(
            f"moe_compiler: the decode path takes at most {MAX_PAIRS} (token, slot) pairs, got {T * k}; "
            "use the sorted path"
        )
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    ids_ok = torch.empty(1, dtype=torch.int32, device=hidden.device)
    return hidden, ids, weights, ids_ok, hidden.new_empty(T * k, I)


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec,
                    config: DecodeConfig, mlp=None, routed: Routed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H], ids_ok [1] int32). Sizes and layouts were checked by ops/checks.py; T > 0.
    With `mlp` (a spec.SharedMLP) out also holds the block's shared experts.

    The route in the GEMV (MOE_COMPILER_ROUTE_IN_GEMV=1, launch.route_in_gemv()): while tracing, a call whose topk_ids /
    topk_weights are a traced route call's own outputs (launch.route_of), or an explicit `routed`, routes inside
    the gate_up kernel from the logits: one launch (and its output buffers) fewer per layer, the host time of a
    default-mode decode step. ids_ok is then a ones flag: the ids are made in range, not given."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    I = spec.intermediate(w_down)
    if routed is None and launch.tracing() and launch.route_in_gemv():  # (no environment read on an eager call)
        routed = launch.route_of(topk_weights, topk_ids)
        if routed is not None and not _fits(routed, T, k, w_gate_up.shape[0]):
            routed = None  # a router over other experts than these weights (no remap between): route apart
    if routed is None:
        hidden, ids, weights, ids_ok, act = pair_buffers(hidden, topk_ids, topk_weights, I)
    else:
        hidden, ids, weights, act, routed = _routed_buffers(hidden, routed, k, topk_weights.dtype, I)
        ids_ok = None  # nothing to check; `act` stands in for the flag's pointer (never written then)
    shared_act = hidden.new_empty(T, mlp.intermediate) if mlp is not None else None
    gated = mlp is not None and mlp.expert_gate is not None
    shared_gate = torch.empty(T, dtype=torch.float32, device=hidden.device) if gated else None
    tickets = tickets_for(config, T, H, I, hidden.device)
    launch_gate_up(hidden, ids, w_gate_up, b_gate_up, spec, config, k, act, act if ids_ok is None else ids_ok,
                   weights, mlp, shared_act, shared_gate, tickets, routed)
    out = hidden.new_empty(T, H)
    launch_down(act, ids, weights, w_down, b_down, spec, config, k, out, mlp, shared_act, shared_gate, tickets)
    if ids_ok is None:
        ids_ok = torch.ones(1, dtype=torch.int32, device=hidden.device)
    return out, ids_ok


def _routed_buffers(hidden, routed: Routed, k: int, weights_dtype, I: int):
    """pair_buffers' counterpart where the gate_up kernel routes: (hidden, ids [T*k] and weights [T*k] for it to
    write, act, the Routed with unit-column-stride logits)."""
    T = hidden.shape[0]
    if T * k > MAX_PAIRS:
        raise ValueError(f"moe_compiler: the decode path takes at most {MAX_PAIRS} (token, slot) pairs, got {T * k}")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if routed.logits.stride(1) != 1:
        routed = Routed(routed.logits.contiguous(), routed.correction_bias, routed.spec)
    ids = torch.empty(T * k, dtype=torch.int64, device=hidden.device)
    weights = torch.empty(T * k, dtype=weights_dtype, device=hidden.device)
    return hidden, ids, weights, hidden.new_empty(T * k, I), routed
