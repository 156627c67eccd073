"""Triton quantized experts forward, decode path (T * k small next to E): GEMVs over FP8 / INT4 weights, no sort.

Data contract (as triton_decode.py's; bn, bk = spec.scale_block_n, spec.scale_block_k; p = t*k + j)
    hidden        [T, H]                 bf16/fp16/fp32, unit column stride
    topk_ids      [T, k]                 in [0, E]; E: the expert-parallel sentinel (a slot that adds nothing: its
                                         gate_up program loops zero times, the down kernel reads no weights for it);
                                         others are clamped, flagged in ids_ok and fail the launch
    w_gate_up     [E, 2I, H] e4m3        or [E, 2I, H/8] int32 (8 nibbles along K); scales [E, 2I/bn, H/bk]
    w_down        [E, H, I] e4m3         or [E, H, I/8] int32;                       scales [E, H/bn, I/bk]
    act           [S, I]                 hidden's dtype: act(gate) * up of every pair
    out           [T, H]                 out[t] = sum_j w[t,j] * act[p] @ W_down[e]^T, slots in order

    y             [S, H] fp32            config.slot_split: pair p's weighted down row (zero for a sentinel)
    INT4 planes (config.int4_planes) read their inputs as planes instead:
    xp            [T, 9, H/8] fp32       xp[t, j, w] = hidden[t, 8w + j] (j < 8), xp[t, 8, w] = -24 x their sum
    act           [S, 9, I/8] fp32       act in the same form (values rounded to hidden's dtype first)

    tickets       [T * H / down_rows]    int32, config.slot_split: zeroed by the gate_up launch; the last of a
                                         token's k pair programs of a column block to arrive sums their y rows

    route -> ([x planes: grid (T, H / 1024)]) -> [gate_up GEMV + act: grid (S, I / BLOCK_N)]
          -> [down GEMV * weight: grid (S, H / BLOCK_N); the last slot of a tile sums its k rows of y in order]
    (not slot_split: [down GEMV * weight + combine: grid (T, H / BLOCK_N)], each program looping over k slots)

At decode the op is a stream of weight bytes (each touched expert read once), so the weights are read in their
stored width (1 byte per FP8 value, half a byte per INT4 value) and dequantized in registers: an FP8 tile's K
step lies in one scale block (BLOCK_K divides bk: one scale per row) or spans whole ones (BLOCK_K a multiple of
bk: one scale per row and block, picked per column) — and where the tile's rows lie in one scale block (16-row
tiles, 128-row blocks: row_scale) the scales multiply the step's inputs instead of every weight value; an INT4
tile's words are split into nibbles and scaled per group of bk columns. fp32 FMAs into a [BLOCK_N, BLOCK_K]
accumulator, one reduction after the loop (no tensor cores needed), as in triton_decode.py.

The bytes are the floor. INT4 spends its instructions first: per value one shift, one LOP3 and one FMA in nibble
planes (int4_unit_plane), a word's partial sums added within its scale group before the one scale multiply
(GROUP_W words: Kimi-K2's groups of 32 values, one scale per 32): 4.2-4.9 instructions per value on sm90, from
7.3 in v4, which ran at ~3x its byte floor on the H200 at Kimi-K2's shape (NOTES "quantized GEMVs v6").
FP8's gate_up GEMV runs at its floor at DeepSeek-V3's shape with plain FMAs; tensor-core forms (the tile converted
for tl.dot, or e4m3 x e4m3) and in-thread chunk sums measured 1.4-2.9x slower and were removed (NOTES v4). At T = 1
the down GEMV needs the slot split: per token it has H / BLOCK_N programs, too few to keep HBM busy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import QuantizedExpertsSpec, WeightFormat
from . import launch
from .triton_act import ACT_CODE, gated_act
from .triton_decode import check_ids, pair_buffers, sum_parts_in_order, zero_tickets
from .triton_quantized import _scale_view, int4_unit_plane, int4_values


@triton.jit
def _fp8_scales(s_row, k0, K, stride_sk, SCALE_BK, E8M0: tl.constexpr, BLOCK_KW: tl.constexpr,
                K_GROUPS: tl.constexpr):
    """fp32 scales [R, BLOCK_K] of an FP8 step's columns k0 .. k0 + BLOCK_K for R scale rows (s_row: R pointers to
    each row's scale row). A step spans K_GROUPS scale blocks (BLOCK_K = K_GROUPS x SCALE_BK, or one block holding
    the step when K_GROUPS = 1): each column takes its block's scale by a select, a step of K_GROUPS x 128 bytes per
    row keeping more bytes in flight than one block's."""
    s = tl.load(s_row + (k0 // SCALE_BK) * stride_sk).to(tl.float32)  # the step's first scale block
    if E8M0:
        s = tl.exp2(s - 127.0)
    s_cols = tl.broadcast_to(s[:, None], [s_row.shape[0], BLOCK_KW])
    if K_GROUPS > 1:
        col = tl.arange(0, BLOCK_KW)  # FP8: one value per stored byte
        last = (K - 1) // SCALE_BK  # a K tail's later blocks: clamped in bounds (their values load as 0)
        for g in tl.static_range(1, K_GROUPS):
            sg = tl.load(s_row + tl.minimum(k0 // SCALE_BK + g, last) * stride_sk).to(tl.float32)
            if E8M0:
                sg = tl.exp2(sg - 127.0)
            s_cols = tl.where(col[None, :] >= g * (BLOCK_KW // K_GROUPS), sg[:, None], s_cols)
    return s_cols


@triton.jit
def _tile_scale_row(s_ptr, e, row0, stride_se, stride_sn, SCALE_BN):
    """[1] pointer to the scale row of a tile whose rows all lie in the scale block of its first row `row0`."""
    return s_ptr + e * stride_se + tl.full([1], row0 // SCALE_BN, tl.int64) * stride_sn


@triton.jit
def _dequantized_rows(w_ptrs, s_ptr, e, rows, k0, K, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                      EVEN_K: tl.constexpr, INT4: tl.constexpr, E8M0: tl.constexpr, BLOCK_KW: tl.constexpr,
                      K_GROUPS: tl.constexpr, ROW_SCALE: tl.constexpr):
    """fp32 weights of `rows` at columns k0 .. k0 + BLOCK_K (stored words at w_ptrs): FP8 [BLOCK_N, BLOCK_K];
    INT4 [BLOCK_N, BLOCK_KW, 8], value k0 + 8 kw + j at [:, kw, j] (nibbles never reshaped into a row; one
    scale per word: a word's 8 values share a group). FP8 under ROW_SCALE: unscaled — the tile's rows share one
    scale row, so the caller scales the step's inputs instead (BLOCK_K multiplies, not BLOCK_N x BLOCK_K)."""
    kw = tl.arange(0, BLOCK_KW)
    s_row = s_ptr + e * stride_se + (rows // SCALE_BN).to(tl.int64) * stride_sn
    if INT4:
        if EVEN_K:
            words = tl.load(w_ptrs)
        else:
            words = tl.load(w_ptrs, mask=(kw[None, :] < (K - k0) // 8), other=0)
        kk = k0 + kw * 8
        s = tl.load(s_row[:, None] + (kk[None, :] // SCALE_BK) * stride_sk, mask=kk[None, :] < K, other=0.0)
        s = s.to(tl.float32)
        if E8M0:
            s = tl.exp2(s - 127.0)
        w = int4_values(words[:, :, None], (tl.arange(0, 8) * 4)[None, None, :]) * s[:, :, None]
    else:
        if EVEN_K:
            q = tl.load(w_ptrs)
        else:
            q = tl.load(w_ptrs, mask=(kw[None, :] < K - k0), other=0.0)
        w = q.to(tl.float32)
        if not ROW_SCALE:
            w = w * _fp8_scales(s_row, k0, K, stride_sk, SCALE_BK, E8M0, BLOCK_KW, K_GROUPS)
    return w


@triton.jit
def _step_input(x_ptr, k0, K, EVEN_K: tl.constexpr, INT4: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_KW: tl.constexpr):
    """[1, BLOCK_K] (FP8) or [1, BLOCK_KW, 8] (INT4, _dequantized_rows' order) fp32 input values at x_ptr + k0."""
    if INT4:
        cols = tl.arange(0, BLOCK_KW)[:, None] * 8 + tl.arange(0, 8)[None, :]
    else:
        cols = tl.arange(0, BLOCK_K)
    if EVEN_K:
        x = tl.load(x_ptr + k0 + cols)
    else:
        x = tl.load(x_ptr + k0 + cols, mask=cols < K - k0, other=0.0)
    return tl.expand_dims(x.to(tl.float32), 0)


@triton.jit
def _row_dots(acc, TILE3D: tl.constexpr):
    """[BLOCK_N] sums of an accumulator: [BLOCK_N, BLOCK_KW, 8] (INT4's 3-D tile) or 2-D."""
    if TILE3D:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        out = tl.sum(acc, axis=1)
    return out


@triton.jit
def _int4_plane_step(w_ptrs, s_ptr, e, rows, xp_row, k0, K, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                     base_bits, EVEN_K: tl.constexpr, E8M0: tl.constexpr, BLOCK_KW: tl.constexpr,
                     GROUP_W: tl.constexpr):
    """[BLOCK_N, BLOCK_KW / GROUP_W] fp32: each scale group's share of the rows' dot products with x at k0 (GROUP_W
    words per group), as 8 nibble planes (plane j: values k0 + 8 kw + j): 2-D tiles only. x comes as its planes
    (xp_row: [9, K / 8] fp32, _x_planes_kernel): plane j of a word is one contiguous fp32 load shared by the word's
    rows, and row 8 holds -24 x each word's sum of x, the accumulator's start. Per value then one shift, one LOP3
    and one FMA (int4_unit_plane with base_bits 16.0's: 16 + u): a word's -24 sum_j x_j + sum_j (16 + u_j) x_j is
    its sum_j (u_j - 8) x_j. The words' sums are added within their scale group in registers (a thread's words are
    contiguous along K), then one scale multiply per group: per 32 values at Kimi-K2 (NOTES "quantized GEMVs v6")."""
    kw = tl.arange(0, BLOCK_KW)
    KW = K // 8
    w0 = k0 // 8
    if EVEN_K:
        words = tl.load(w_ptrs)
        x_off = tl.load(xp_row + 8 * KW + w0 + kw)
    else:
        words = tl.load(w_ptrs, mask=(kw[None, :] < KW - w0), other=0)
        x_off = tl.load(xp_row + 8 * KW + w0 + kw, mask=kw < KW - w0, other=0.0)
    part = tl.broadcast_to(x_off[None, :], words.shape)
    for j in tl.static_range(8):
        if EVEN_K:
            xj = tl.load(xp_row + j * KW + w0 + kw)
        else:
            xj = tl.load(xp_row + j * KW + w0 + kw, mask=kw < KW - w0, other=0.0)
        part += int4_unit_plane(words, j, base_bits) * xj[None, :]
    G: tl.constexpr = BLOCK_KW // GROUP_W
    if GROUP_W > 1:
        part = tl.sum(tl.reshape(part, [part.shape[0], G, GROUP_W]), axis=2)
    kk = (k0 + tl.arange(0, G) * (GROUP_W * 8)).to(tl.uint32)  # each group's first value (>= 0: a shift)
    s_ptrs = (s_ptr + e * stride_se + (rows // SCALE_BN).to(tl.int64)[:, None] * stride_sn
              + (kk[None, :] // SCALE_BK) * stride_sk)
    if EVEN_K:
        s = tl.load(s_ptrs).to(tl.float32)
    else:
        s = tl.load(s_ptrs, mask=kk[None, :] < K, other=0.0).to(tl.float32)
    if E8M0:
        s = tl.exp2(s - 127.0)
    return part * s


@triton.jit
def _x_planes_kernel(x_ptr, xp_ptr, KW, stride_xm, stride_pm, BLOCK_W: tl.constexpr):
    """xp[t] = x[t] as the INT4 plane GEMVs read it: [9, KW] fp32, row j < 8 the values 8w + j, row 8 -24 x their
    sums (_int4_plane_step's start)."""
    t = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    j = tl.arange(0, 8)
    ok = w < KW
    x = tl.load(x_ptr + t * stride_xm + w[:, None] * 8 + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(xp_ptr + t * stride_pm + j[None, :] * KW + w[:, None], x, mask=ok[:, None])
    tl.store(xp_ptr + t * stride_pm + 8 * KW + w, -24.0 * tl.sum(x, axis=1), mask=ok)


@triton.jit
def _weight_ptrs(w_ptr, e, rows, stride_we, stride_wn, stride_wk, BLOCK_KW: tl.constexpr):
    """The rows' stored words of the first K step: [BLOCK_N, BLOCK_KW]."""
    return (w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wn
            + tl.arange(0, BLOCK_KW)[None, :] * stride_wk)


@triton.jit  # SCALE_BN / SCALE_BK constexprs as in triton_quantized.py's kernels
def _gate_up_q_gemv_kernel(
    x_ptr, ids_ptr, w_ptr, s_ptr, act_ptr, ok_ptr, tickets_ptr, S, E, H, I, TOP_K, alpha, limit, base_bits,
    N_TICKETS, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    stride_xm, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_am,
    ACT: tl.constexpr, EVEN_K: tl.constexpr, INT4: tl.constexpr, E8M0: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr, K_GROUPS: tl.constexpr, PLANES: tl.constexpr, TILE3D: tl.constexpr,
    GROUP_W: tl.constexpr, ROUND: tl.constexpr, ZERO_TICKETS: tl.constexpr, ROW_SCALE: tl.constexpr,
):
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    if (p == 0) & (pid_n == 0):
        check_ids(ids_ptr, ok_ptr, S, E, BLOCK_S)
        if ZERO_TICKETS:  # the down GEMV's tickets (slot_split), as triton_decode.py's gate_up does for its split
            zero_tickets(tickets_ptr, N_TICKETS, BLOCK_S)
    e = tl.load(ids_ptr + p)
    h_live = tl.where(e < E, H, 0)  # a sentinel pair loops zero times (triton_decode.py)
    e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int64)
    tok = (p // TOP_K).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % I
    wg_ptrs = _weight_ptrs(w_ptr, e, n, stride_we, stride_wn, stride_wk, BLOCK_KW)
    wu_ptrs = wg_ptrs + I * stride_wn
    x_row = x_ptr + tok * stride_xm
    sg_row = _tile_scale_row(s_ptr, e, pid_n * BLOCK_N, stride_se, stride_sn, SCALE_BN)  # (ROW_SCALE only)
    su_row = _tile_scale_row(s_ptr, e, pid_n * BLOCK_N + I, stride_se, stride_sn, SCALE_BN)
    if TILE3D:
        acc_g = tl.zeros([BLOCK_N, BLOCK_KW, 8], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_KW, 8], dtype=tl.float32)
    else:  # FP8 [BLOCK_N, BLOCK_K], INT4 planes [BLOCK_N, scale groups per step]
        acc_g = tl.zeros([BLOCK_N, BLOCK_KW // GROUP_W], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_KW // GROUP_W], dtype=tl.float32)
    for k0 in tl.range(0, h_live, BLOCK_K, num_stages=NUM_STAGES):  # every load pipelined (triton_decode.py)
        if PLANES:
            acc_g += _int4_plane_step(wg_ptrs, s_ptr, e, n, x_row, k0, H, stride_se, stride_sn, stride_sk, SCALE_BN,
                                      SCALE_BK, base_bits, EVEN_K, E8M0, BLOCK_KW, GROUP_W)
            acc_u += _int4_plane_step(wu_ptrs, s_ptr, e, n + I, x_row, k0, H, stride_se, stride_sn, stride_sk,
                                      SCALE_BN, SCALE_BK, base_bits, EVEN_K, E8M0, BLOCK_KW, GROUP_W)
        else:
            x = _step_input(x_row, k0, H, EVEN_K, INT4, BLOCK_K, BLOCK_KW)
            wg = _dequantized_rows(wg_ptrs, s_ptr, e, n, k0, H, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                                   EVEN_K, INT4, E8M0, BLOCK_KW, K_GROUPS, ROW_SCALE)
            wu = _dequantized_rows(wu_ptrs, s_ptr, e, n + I, k0, H, stride_se, stride_sn, stride_sk, SCALE_BN,
                                   SCALE_BK, EVEN_K, INT4, E8M0, BLOCK_KW, K_GROUPS, ROW_SCALE)
            if ROW_SCALE:
                acc_g += wg * (x * _fp8_scales(sg_row, k0, H, stride_sk, SCALE_BK, E8M0, BLOCK_KW, K_GROUPS))
                acc_u += wu * (x * _fp8_scales(su_row, k0, H, stride_sk, SCALE_BK, E8M0, BLOCK_KW, K_GROUPS))
            else:
                acc_g += wg * x
                acc_u += wu * x
        wg_ptrs += BLOCK_KW * stride_wk
        wu_ptrs += BLOCK_KW * stride_wk
    out = gated_act(_row_dots(acc_g, TILE3D), _row_dots(acc_u, TILE3D), alpha, limit, ACT)
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_row = act_ptr + p.to(tl.int64) * stride_am
    if PLANES:  # act as the down GEMV's planes (_x_planes_kernel's layout), rounded to x's dtype as stored act is
        if ROUND == 1:
            out = out.to(tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            out = out.to(tl.float16).to(tl.float32)
        out = tl.where(n_out < I, out, 0.0)
        tl.store(a_row + (n_out % 8) * (I // 8) + n_out // 8, out, mask=n_out < I)
        w_out = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # BLOCK_N % 8 == 0: whole words per program
        tl.store(a_row + 8 * (I // 8) + w_out, -24.0 * tl.sum(tl.reshape(out, [BLOCK_N // 8, 8]), axis=1),
                 mask=w_out < I // 8)
    else:
        tl.store(a_row + n_out, out.to(act_ptr.dtype.element_ty), mask=n_out < I)


@triton.jit
def _down_q_slot(
    a_ptr, ids_ptr, topk_w_ptr, w_ptr, s_ptr, p, n, n0, E, I, base_bits, SCALE_BN: tl.constexpr,
    SCALE_BK: tl.constexpr, stride_am, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
    EVEN_K: tl.constexpr, INT4: tl.constexpr, E8M0: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr, NUM_STAGES: tl.constexpr,
    K_GROUPS: tl.constexpr, PLANES: tl.constexpr, TILE3D: tl.constexpr, GROUP_W: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):
    """Pair p's weighted down row on columns n (the tile from n0), fp32 [BLOCK_N]; zero for a sentinel pair."""
    e = tl.load(ids_ptr + p)
    live = e < E
    i_live = tl.where(live, I, 0)  # a sentinel pair reads no weights
    e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int64)
    a_row = a_ptr + p * stride_am
    w_ptrs = _weight_ptrs(w_ptr, e, n, stride_we, stride_wn, stride_wk, BLOCK_KW)
    s_tile = _tile_scale_row(s_ptr, e, n0, stride_se, stride_sn, SCALE_BN)  # (ROW_SCALE only)
    if TILE3D:
        acc = tl.zeros([BLOCK_N, BLOCK_KW, 8], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_KW // GROUP_W], dtype=tl.float32)
    for k0 in tl.range(0, i_live, BLOCK_K, num_stages=NUM_STAGES):
        if PLANES:
            acc += _int4_plane_step(w_ptrs, s_ptr, e, n, a_row, k0, I, stride_se, stride_sn, stride_sk, SCALE_BN,
                                    SCALE_BK, base_bits, EVEN_K, E8M0, BLOCK_KW, GROUP_W)
        else:
            a = _step_input(a_row, k0, I, EVEN_K, INT4, BLOCK_K, BLOCK_KW)
            w = _dequantized_rows(w_ptrs, s_ptr, e, n, k0, I, stride_se, stride_sn, stride_sk, SCALE_BN,
                                  SCALE_BK, EVEN_K, INT4, E8M0, BLOCK_KW, K_GROUPS, ROW_SCALE)
            if ROW_SCALE:
                a = a * _fp8_scales(s_tile, k0, I, stride_sk, SCALE_BK, E8M0, BLOCK_KW, K_GROUPS)
            acc += w * a
        w_ptrs += BLOCK_KW * stride_wk
    return tl.where(live, _row_dots(acc, TILE3D) * tl.load(topk_w_ptr + p).to(tl.float32), 0.0)


@triton.jit
def _down_q_gemv_kernel(
    a_ptr, ids_ptr, topk_w_ptr, w_ptr, s_ptr, out_ptr, y_ptr, tickets_ptr, E, H, I, base_bits,
    SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    stride_am, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_om,
    SLOTS: tl.constexpr, TOP_K: tl.constexpr, EVEN_K: tl.constexpr, INT4: tl.constexpr, E8M0: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr, NUM_STAGES: tl.constexpr,
    K_GROUPS: tl.constexpr, PLANES: tl.constexpr, TILE3D: tl.constexpr, GROUP_W: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):
    # SLOTS = 1 (slot_split): program (p, n-block) holds pair p's fp32 row; the token's k pair programs of a
    # column block meet through y [S, H] fp32 and a ticket, and the last to arrive sums the k rows in slot order
    # into out [T, H] (sum_parts_in_order: deterministic, no combine launch). SLOTS = k: program (t, n-block) sums
    # token t's slots in order into out itself: at T = 1 k times fewer programs, each k times longer (DeepSeek-V3
    # FP8: 448 programs, 53 us for a 28 us byte floor).
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(SLOTS):  # slots in order: a deterministic combine
        out += _down_q_slot(a_ptr, ids_ptr, topk_w_ptr, w_ptr, s_ptr, row * SLOTS + j, n, pid_n * BLOCK_N, E, I,
                            base_bits, SCALE_BN, SCALE_BK, stride_am, stride_we, stride_wn, stride_wk, stride_se,
                            stride_sn, stride_sk, EVEN_K, INT4, E8M0, BLOCK_N, BLOCK_K, BLOCK_KW, NUM_STAGES, K_GROUPS,
                            PLANES, TILE3D, GROUP_W, ROW_SCALE)
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SLOTS == 1:
        t = row // TOP_K
        sum_parts_in_order(y_ptr + t * TOP_K * H, H, row % TOP_K, out, tickets_ptr + t * tl.num_programs(1) + pid_n,
                           out_ptr + t * stride_om, n_out, H, TOP_K)
    else:
        tl.store(out_ptr + row * stride_om + n_out, out.to(out_ptr.dtype.element_ty), mask=n_out < H)


# act's rounding to hidden's dtype where the gate_up epilogue stores it as fp32 planes
ROUND_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
PLANES_BLOCK_W = 128
# int4_unit_plane's base for the plane GEMVs: 16.0's bits (values 16 + u), a run-time argument so ptxas keeps it in
# a register and emits one LOP3 per value (a literal: two, on the device's Triton 3.6; NOTES "quantized GEMVs v6")
SIXTEEN_BITS = 0x41800000


def row_scale(spec: QuantizedExpertsSpec, rows: int, offset: int) -> bool:
    """Whether an FP8 GEMV tile of `rows` weight rows (starting at a multiple of rows, or that plus `offset`: the
    up half of gate_up) lies in one scale block of rows: then its scales go on the step's inputs — one multiply per
    input value instead of one per weight value."""
    bn = spec.scale_block_n
    return spec.weight_format is WeightFormat.FP8_E4M3 and bn % rows == 0 and offset % rows == 0


def group_words(bk: int, block_k: int) -> int:
    """Words per scale group inside a plane GEMV's K step (its partial sums added before the scale multiply):
    a group per step where block_k divides the scale block, block_k / bk groups where bk divides block_k, else one
    scale per word."""
    if bk % block_k == 0:
        return block_k // 8
    if block_k % bk == 0 and bk % 8 == 0:
        return bk // 8
    return 1


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                    spec: QuantizedExpertsSpec, config) -> torch.Tensor:
    """out [T, H]; config: a QuantizedConfig with decode=True (block_n, block_k, warps, stages)."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    int4 = spec.weight_format is WeightFormat.INT4_PACKED
    I = w_down.shape[2] * (8 if int4 else 1)
    block_k = config.block_k  # checked by triton_quantized.experts_forward, the caller
    hidden, ids, weights, ids_ok, act = pair_buffers(hidden, topk_ids, topk_weights, I)
    planes = int4 and config.int4_planes
    x = hidden
    if planes:  # both GEMVs read their input as planes: x made here, act by the gate_up epilogue
        if config.block_n % 8:
            raise ValueError(f"moe_compiler: the INT4 plane GEMVs take block_n a multiple of 8 (whole words of act "
                             f"per program), got {config.block_n}; use 8, 16, 32 ... or int4_planes=False")
        x = hidden.new_empty(T, 9 * (H // 8), dtype=torch.float32)
        launch.kernel(_x_planes_kernel)[(T, triton.cdiv(H // 8, PLANES_BLOCK_W))](
            hidden, x, H // 8, hidden.stride(0), x.stride(0), BLOCK_W=PLANES_BLOCK_W, num_warps=4)
        act = hidden.new_empty(T * k, 9 * (I // 8), dtype=torch.float32)
    s1, e8m0 = _scale_view(w_gate_up_scale)
    s2, _ = _scale_view(w_down_scale)
    common = dict(INT4=int4, E8M0=e8m0, BLOCK_N=config.block_n, BLOCK_K=block_k,
                  BLOCK_KW=block_k // 8 if int4 else block_k, NUM_STAGES=config.num_stages,
                  K_GROUPS=1 if int4 else max(1, block_k // spec.scale_block_k),
                  PLANES=planes, TILE3D=int4 and not planes,
                  GROUP_W=group_words(spec.scale_block_k, block_k) if planes else 1,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    out = hidden.new_empty(T, H)
    tiles = triton.cdiv(H, config.down_rows)
    # slot_split: the pairs' fp32 rows and a ticket per (token, column block), zeroed by the gate_up launch
    y = hidden.new_empty(T * k, H, dtype=torch.float32) if config.slot_split else out
    tickets = torch.empty(T * tiles, dtype=torch.int32, device=hidden.device) if config.slot_split else ids_ok
    launch.kernel(_gate_up_q_gemv_kernel)[(T * k, triton.cdiv(I, config.block_n))](
        x, ids, w_gate_up, s1, act, ids_ok, tickets, T * k, w_gate_up.shape[0], H, I, k, float(spec.swiglu_alpha),
        float(spec.swiglu_limit), SIXTEEN_BITS, tickets.numel(), spec.scale_block_n, spec.scale_block_k,
        x.stride(0), *w_gate_up.stride(), *s1.stride(), act.stride(0),
        ACT=ACT_CODE[spec.activation], EVEN_K=H % block_k == 0, BLOCK_S=128, ROUND=ROUND_CODE[hidden.dtype],
        ZERO_TICKETS=config.slot_split, ROW_SCALE=row_scale(spec, config.block_n, I), **common, **launch.asserts(),
    )
    launch.kernel(_down_q_gemv_kernel)[(T * k if config.slot_split else T, tiles)](
        act, ids, weights, w_down, s2, out, y, tickets, w_down.shape[0], H, I, SIXTEEN_BITS, spec.scale_block_n,
        spec.scale_block_k, act.stride(0), *w_down.stride(), *s2.stride(), out.stride(0),
        SLOTS=1 if config.slot_split else k, TOP_K=k, EVEN_K=I % block_k == 0,
        ROW_SCALE=row_scale(spec, config.down_rows, 0), **(common | {"BLOCK_N": config.down_rows}),
    )
    return out
