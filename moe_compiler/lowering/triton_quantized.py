"""Triton experts forward over block-scaled quantized weights (the experts_quantized op): FP8 e4m3 or packed INT4,
read in place with their scales. Few pairs (config.decode): the GEMVs of triton_quantized_decode.py. Otherwise the
sorted path's gather-GEMM with the gated activation in its epilogue, the down GEMM with the router weight in its
epilogue, and the same deterministic combine (triton_experts.py).

Data contract (shape letters as in triton_experts.py; bn, bk = spec.scale_block_n, spec.scale_block_k)
    hidden        [T, H]                        bf16/fp16/fp32, rows gathered in-kernel (never permuted)
    topk_ids      [T, k]                        -> triton_align.py: sorted_rows, pos, block_expert, seg_end
    w_gate_up     [E, 2I, H] float8_e4m3fn      gate rows then up rows, read through its strides
                  (INT4: [E, 2I, H/8] int32, 8 values per word along K, value k at bits 4 (k % 8), stored + 8)
    w_gate_up_s   [E, ceil(2I/bn), ceil(H/bk)]  fp32 / bf16 / float8_e8m0fnu (read as uint8 exponents)
    w_down        [E, H, I] float8_e4m3fn       (INT4: [E, H, I/8] int32); w_down_s [E, ceil(H/bn), ceil(I/bk)]
    act           [S_pad, I]                    hidden's dtype, padded sorted order
    y             [S_pad, H]                    hidden's dtype, down output * router weight
    out           [T, H]                        out[t] = sum_j y[pos[t*k + j]] (fp32 sum, slot order)

    route -> permute (align) -> [gate_up GEMM + act] -> [down GEMM * weight] -> [combine]

Each FP8 K step reads a [BLOCK_K, BLOCK_N] weight tile inside one scale block along K (BLOCK_K divides bk), so
the step's weight scale is one value per output column, s[n // bn]. Three ways to multiply (config.act):
    w8a16      acc += dot(a, fp8 tile -> a's dtype) * s[n]          activations exact, tensor cores at bf16 rate
    w8a8_tile  a is quantized per row over the step's BLOCK_K columns (amax -> 448, transformers' dynamic
               1 x 128 scheme when BLOCK_K = 128): acc += dot(fp8(a / sa), fp8 tile) * sa[m] * s[n]
    w8a8_rows  the same numbers, quantized once instead of in every K step of every tile: hidden by a row pass
               (xq [T, H] e4m3, xs [T, ceil(H/128)] fp32), act by the gate_up epilogue (each 128-column tile
               is one group: act [S_pad, I] e4m3, act_s [S_pad, ceil(I/128)]); the GEMMs load e4m3 A tiles
               config.tma: W tiles by TMA descriptors; with config.sorted_copy (the default) hidden's e4m3 rows
               also copied into sorted order (xq [S_pad, H], xs [S_pad, ..], quantize_sorted_rows), so both
               GEMMs read contiguous A row blocks by TMA too; the K loop optionally warp-specialized (producer
               warps load, consumers multiply and promote). The default from 33 rows per expert on sm90.
Scales multiply the fp32 partial product of the step, never the weights: nothing is dequantized to memory.
An INT4 K step unpacks its [BLOCK_K / 8, BLOCK_N] words to nibbles and scales each by its group's scale in
registers (groups narrower than the step), then one dot at a's precision (w4a16).
Row offsets are int64 (t * H passes 2^31 at large T); columns wrap modulo N (the stores mask), K tails mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import QuantizedExpertsSpec
from . import launch
from .triton_act import ACT_CODE, gated_act
from .triton_align import AlignedRows, align_rows, gathered
from .triton_experts import _block_rows, _grid, _tile_coords, _weight_desc, dot_precision, launch_combine, tma_ok
from .triton_quantized_config import ACT_GROUP, ACT_Q_CODE, ActQuant, QuantizedConfig, default_config, is_int4


@triton.jit
def _column_scales(s_ptr, expert, n, k0, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                   E8M0: tl.constexpr):
    """[BLOCK_N] fp32 weight scales of output columns n at K offset k0."""
    s = tl.load(s_ptr + expert * stride_se + (n // SCALE_BN).to(tl.int64) * stride_sn + (k0 // SCALE_BK) * stride_sk)
    s = s.to(tl.float32)
    if E8M0:  # a biased power-of-two exponent
        s = tl.exp2(s - 127.0)
    return s


@triton.jit
def _w8a8_scales(sa, s_ptr, expert, n, n0, k0, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                 E8M0: tl.constexpr, TILE_SCALE: tl.constexpr):
    """The scale of a w8a8 step's partial products: row scale sa [M] x column block scale, [M, N]; [M, 1] where
    the tile's columns n0.. lie in one scale block (TILE_SCALE), which saves a multiply per accumulator element
    (the step's promotion: 231 -> 159 instructions per K step at 64 x 128, sm90 SASS of Triton 3.6)."""
    if TILE_SCALE:
        out = (sa * _column_scales(s_ptr, expert, n0, k0, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                                   E8M0))[:, None]
    else:
        out = sa[:, None] * _column_scales(s_ptr, expert, n, k0, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                                           E8M0)[None, :]
    return out


@triton.jit
def _e4m3_scale(amax):
    """The scale of an activation group under w8a8 (every path's same numbers): amax onto e4m3's largest normal,
    448, as transformers' and DeepSeek's dynamic 1 x 128 scheme. Divided with IEEE rounding: Triton's `/` is
    approximate on the GPU, one ulp off torch's amax / 448 (H200: test_quantize_rows_scales_every_group_of_a_long_row),
    and the torch path (torch_quantized.py) must give the same scales."""
    return tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)


@triton.jit
def int4_values(words, shifts):
    """fp32 (nibble - 8) of int32 words at bit offsets `shifts` (broadcast), exactly: the nibble is ORed into the
    mantissa of 2^23 and 2^23 + 8 subtracted, one OR and one add where an int -> float conversion (a
    quarter-rate instruction that bounds the dequantizing kernels) would be."""
    bits = ((words >> shifts) & 15) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def int4_unit_plane(words, J: tl.constexpr, base_bits):
    """fp32 b (1 + u / 16) of nibble J of int32 words (u = the stored nibble, value + 8) for a power of two b given
    by its bits (1.0: 0x3F800000 gives 1 + u / 16; 16.0: 0x41800000 gives 16 + u), exactly: the nibble moved to
    mantissa bits 19..22 and ORed into b's bits — one shift and one LOP3 (and + or) per value, no conversion and
    no add; (1 + u / 16) * 16 s - 24 s = (u - 8) s puts the offset and a scale s into one FMA, or a sum of
    (16 + u) x gives sum (u - 8) x less 24 sum x. Dequantizing kernels are bound by instructions per value, not
    bytes (benchmarks/NOTES.md "quantized GEMVs v3", "v6"). Where b's bits are a literal, Triton 3.6's ptxas
    splits the and + or into two LOP3s (one immediate each); passed at run time they are one (NOTES v6)."""
    if 19 - 4 * J >= 0:
        t = words << (19 - 4 * J)
    else:  # (arithmetic or logical: the mask keeps bits 19..22 only)
        t = words >> (4 * J - 19)
    return ((t & 0x00780000) | base_bits).to(tl.float32, bitcast=True)


@triton.jit
def _int4_words(w_ptrs, k0, K, EVEN_K: tl.constexpr, BLOCK_KW: tl.constexpr):
    """[BLOCK_KW, BLOCK_N] int32 words of the K step at k0 (K counts values: K / 8 words)."""
    if EVEN_K:
        words = tl.load(w_ptrs)
    else:
        words = tl.load(w_ptrs, mask=(tl.arange(0, BLOCK_KW)[:, None] < (K - k0) // 8), other=0)
    return words


@triton.jit
def _int4_word_scales(s_ptr, expert, n, k0, K, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK,
                      E8M0: tl.constexpr, BLOCK_KW: tl.constexpr):
    """[BLOCK_KW, BLOCK_N] fp32 group scales of each word of the K step (a word's 8 values share a group: the
    spec's scale_block_k is a multiple of 8)."""
    kk = k0 + tl.arange(0, BLOCK_KW) * 8
    s = tl.load(s_ptr + expert * stride_se + (n[None, :] // SCALE_BN).to(tl.int64) * stride_sn
                + (kk[:, None] // SCALE_BK) * stride_sk, mask=kk[:, None] < K, other=0.0).to(tl.float32)
    if E8M0:
        s = tl.exp2(s - 127.0)
    return s


@triton.jit
def _int4_planes_step(a_rows, w_ptrs, s_ptr, acc, expert, n, k0, K, stride_se, stride_sn, stride_sk, SCALE_BN,
                      SCALE_BK, EVEN_K: tl.constexpr, E8M0: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_KW: tl.constexpr):
    """acc + the K step at k0 as 8 dots, one per nibble plane: plane j holds values k0 + 8 kw + j, so its A
    columns are read with a stride of 8 (a_rows: [M, 1] pointers to each row's column k0) and no register
    tile is reshaped. K per dot = BLOCK_KW (>= 16 for the tensor cores: block_k >= 128)."""
    kw = tl.arange(0, BLOCK_KW)
    words = _int4_words(w_ptrs, k0, K, EVEN_K, BLOCK_KW)
    s = _int4_word_scales(s_ptr, expert, n, k0, K, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK, E8M0,
                          BLOCK_KW)
    s16, s24 = 16.0 * s, 24.0 * s  # per word: each value's (u - 8) s is then one FMA (int4_unit_plane)
    for j in tl.static_range(8):
        if EVEN_K:
            a = tl.load(a_rows + kw[None, :] * 8 + j)
        else:
            a = tl.load(a_rows + kw[None, :] * 8 + j, mask=(kw[None, :] * 8 + j < K - k0), other=0.0)
        # (a literal: as a run-time register it cost this kernel 31 registers, 223 -> 254; not measured)
        w = (int4_unit_plane(words, j, 0x3F800000) * s16 - s24).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _weight_step(a, sa_rows, w_ptrs, s_ptr, acc, expert, n, n0, k0, K, stride_se, stride_sn, stride_sk, SCALE_BN,
                 SCALE_BK, EVEN_K: tl.constexpr, INT4: tl.constexpr, ACT_Q: tl.constexpr, E8M0: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr,
                 TILE_SCALE: tl.constexpr):
    """acc + a [M, BLOCK_K] @ the dequantized weight tile at K offset k0 ([BLOCK_KW, BLOCK_N] stored words
    at w_ptrs: e4m3 bytes, or int32 words of 8 nibbles along K). ACT_Q (ACT_Q_CODE): 0 a as it is, 1 a rounded
    to e4m3 here per row and K step, 2 a is e4m3 already, its row scales at sa_rows ([M] pointers to each row's
    first group)."""
    kw = tl.arange(0, BLOCK_KW)
    # if / else with one return: Triton still builds the statements after a return inside a constexpr branch
    # (the FP8 dot on an INT4 tile's shapes fails to compile; the interpreter never sees it).
    if INT4:
        # 8 values per word, value k at bits 4 (k % 8) of word k // 8, stored + 8. Group scales vary inside the
        # K step (SCALE_BK < BLOCK_K) but never inside a word: one scale per word, the tile dequantized in
        # registers, then one dot at a's precision.
        words = _int4_words(w_ptrs, k0, K, EVEN_K, BLOCK_KW)
        s = _int4_word_scales(s_ptr, expert, n, k0, K, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK, E8M0,
                              BLOCK_KW)
        w = (int4_values(words[:, None, :], (tl.arange(0, 8) * 4)[None, :, None]) * s[:, None, :]).to(a.dtype)
        out = tl.dot(a, tl.reshape(w, (BLOCK_K, n.shape[0])), acc, input_precision=DOT_PRECISION)
    else:
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(kw[:, None] < K - k0), other=0.0)
        # The K step lies in one scale block: one scale per output column (n0..: the tile's first), applied to the
        # step's partial product.
        if ACT_Q == 2:  # w8a8_rows
            sa = tl.load(sa_rows + k0 // 128)  # ACT_GROUP
            out = acc + tl.dot(a, w) * _w8a8_scales(sa, s_ptr, expert, n, n0, k0, stride_se, stride_sn, stride_sk,
                                                     SCALE_BN, SCALE_BK, E8M0, TILE_SCALE)
        elif ACT_Q == 1:  # w8a8_tile
            a32 = a.to(tl.float32)
            sa = _e4m3_scale(tl.max(tl.abs(a32), axis=1))
            aq = (a32 / sa[:, None]).to(tl.float8e4nv)
            out = acc + tl.dot(aq, w) * _w8a8_scales(sa, s_ptr, expert, n, n0, k0, stride_se, stride_sn, stride_sk,
                                                      SCALE_BN, SCALE_BK, E8M0, TILE_SCALE)
        else:
            sw = _column_scales(s_ptr, expert, n, k0, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK, E8M0)
            out = acc + tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION) * sw[None, :]
    return out


@triton.jit
def _rows_tma_step(a, w_desc, sa_ptrs, s_ptr, acc, expert, n0, n, k0, stride_se, stride_sn, stride_sk,
                   SCALE_BN, SCALE_BK, E8M0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   TILE_SCALE: tl.constexpr):
    """acc + the K step at k0 of w8a8_rows with the weights by TMA: a [M, BLOCK_K] e4m3 (its K tail zero) times
    weight rows n0.. of `expert`, scaled by the rows' group scales (sa_ptrs: [M] pointers to each row's first) and
    the columns' block scales. The weight box is zero-filled past the tensor's ends (K tail)."""
    w = w_desc.load([expert.to(tl.int32), n0, k0]).reshape(BLOCK_N, BLOCK_K).T
    sa = tl.load(sa_ptrs + k0 // 128)  # ACT_GROUP
    return acc + tl.dot(a, w) * _w8a8_scales(sa, s_ptr, expert, n, n0, k0, stride_se, stride_sn, stride_sk, SCALE_BN,
                                             SCALE_BK, E8M0, TILE_SCALE)


@triton.jit
def _a_tile(a_ptrs, kk, k0, K, EVEN_K: tl.constexpr):
    """The A tile of the K step at k0 by pointer ([M, BLOCK_K]: each row's columns k0 + kk), its K tail 0."""
    if EVEN_K:
        a = tl.load(a_ptrs)
    else:
        a = tl.load(a_ptrs, mask=(kk[None, :] < K - k0), other=0.0)
    return a


@triton.jit
def _row_groups(K, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """(g [GROUPS], cols [GROUPS, GROUP], ok) of a row pass's program: groups program_id(1) * GROUPS.. of a row of
    K columns, one activation group per tile row."""
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    return g, cols, cols < K


@triton.jit
def _store_e4m3_groups(x, g, cols, ok, K, q_row, s_row, GROUP: tl.constexpr):
    """x [GROUPS, GROUP] fp32 rounded to e4m3 per group (scale amax / 448: _e4m3_scale; masked-off columns
    ignored) into the row at q_row, the groups' scales into s_row."""
    s = _e4m3_scale(tl.max(tl.where(ok, tl.abs(x), 0.0), axis=1))
    tl.store(q_row + cols, (x / s[:, None]).to(q_row.dtype.element_ty), mask=ok)
    tl.store(s_row + g, s, mask=g * GROUP < K)


@triton.jit
def _act_rows_kernel(z_ptr, act_ptr, act_s_ptr, num_padded_ptr, I, alpha, limit, stride_zm, stride_am, stride_as,
                     ACT: tl.constexpr, ACT_ROWS: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """act = act(gate) * up of one sorted row's GROUPS x GROUP columns from z (gate columns, then up columns);
    under ACT_ROWS rounded to e4m3 with each group's scale (w8a8_rows' act). Rows past the padded count are
    skipped (the grid covers the static bound); padding rows below it compute garbage no one reads."""
    if tl.program_id(0) < tl.load(num_padded_ptr):
        r = tl.program_id(0).to(tl.int64)
        g, cols, ok = _row_groups(I, GROUP, GROUPS)
        gate = tl.load(z_ptr + r * stride_zm + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(z_ptr + r * stride_zm + I + cols, mask=ok, other=0.0).to(tl.float32)
        out = gated_act(gate, up, alpha, limit, ACT)
        if ACT_ROWS:
            _store_e4m3_groups(out, g, cols, ok, I, act_ptr + r * stride_am, act_s_ptr + r * stride_as, GROUP)
        else:
            tl.store(act_ptr + r * stride_am + cols, out.to(act_ptr.dtype.element_ty), mask=ok)


def row_pass(n: int, num_warps: int = 4) -> tuple[int, dict]:
    """(programs per row, launch constexprs) of a row pass over rows of n columns: a row's activation groups up to
    16 per program (2048 columns, a power of two). One program per 128-column group had each move ~0.6 KB:
    DeepSeek-V3 FP8 T = 4096, the act pass 505 us and the hidden's 140, 5-7x their byte floors; 16 groups: 116
    and 32 us at 8 warps, 107 and 28 at 4 (3.8 TB/s: the act pass at 90% of a copy; NOTES "FP8 row passes and
    TMA measured")."""
    n_groups = triton.cdiv(n, ACT_GROUP)
    groups = min(16, triton.next_power_of_2(n_groups))
    return triton.cdiv(n_groups, groups), dict(GROUP=ACT_GROUP, GROUPS=groups, num_warps=num_warps)


# SCALE_BN / SCALE_BK are constexprs: a model has one scale format (one compile), and a runtime divisor costs an
# integer division per scale index (benchmarks/NOTES.md "quantized GEMVs v3").
@triton.jit(do_not_specialize=["GROUP_M"])
def _gate_up_q_kernel(
    x_ptr, x_desc, xs_ptr, w_ptr, w_desc, s_ptr, act_ptr, act_s_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr,
    num_padded_ptr, H, I, TOP_K, alpha, limit, GROUP_M, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    stride_xm, stride_xs, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_am, stride_as,
    ACT: tl.constexpr, EVEN_K: tl.constexpr, INT4: tl.constexpr, INT4_PLANES: tl.constexpr, ACT_Q: tl.constexpr,
    E8M0: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr, FUSED_ACT: tl.constexpr,
    TMA: tl.constexpr, SORTED_COPY: tl.constexpr, WARP_SPEC: tl.constexpr, TILE_SCALE: tl.constexpr,
):
    # TMA (w8a8_rows): w by w_desc; with SORTED_COPY x is hidden quantized into sorted order ([S_pad, H] e4m3, xs
    # its scales per slot), read by x_desc at the block's slots. Otherwise x rows are gathered by token.
    # FUSED_ACT: each program a gate and an up tile of I's columns, the activation in the epilogue. Otherwise one
    # tile of the 2I columns (gate rows, then up rows) stored as z into act_ptr; _act_rows_kernel follows.
    if FUSED_ACT:
        n_cols = I
    else:
        n_cols = 2 * I
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    num_tiles = tl.load(num_padded_ptr) // BLOCK_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_tiles // num_pid_n, num_pid_n, GROUP_M)
        expert, slots, rows, valid = _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, BLOCK_M)
        tok = (rows // TOP_K).to(tl.int64)
        kk = tl.arange(0, BLOCK_K)
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % n_cols
        a_ptrs = x_ptr + tok[:, None] * stride_xm + kk[None, :]
        wg_ptrs = (w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn
                   + tl.arange(0, BLOCK_KW)[:, None] * stride_wk)
        wu_ptrs = wg_ptrs + I * stride_wn
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # (warp-specialized: the K loop, whose loads are all TMA but the scales')
        for k0 in tl.range(0, H, BLOCK_K, warp_specialize=WARP_SPEC):
            if TMA:
                if SORTED_COPY:  # x in sorted order: the block's rows are contiguous, loaded by TMA
                    a = x_desc.load([pid_m * BLOCK_M, k0])
                    sa_rows = xs_ptr + slots * stride_xs
                else:  # x per token, gathered
                    a = _a_tile(a_ptrs, kk, k0, H, EVEN_K)
                    sa_rows = xs_ptr + tok * stride_xs
                gate = _rows_tma_step(a, w_desc, sa_rows, s_ptr, gate, expert, pid_n * BLOCK_N, n, k0, stride_se,
                                      stride_sn, stride_sk, SCALE_BN, SCALE_BK, E8M0, BLOCK_N, BLOCK_K, TILE_SCALE)
                if FUSED_ACT:
                    up = _rows_tma_step(a, w_desc, sa_rows, s_ptr, up, expert, I + pid_n * BLOCK_N, n + I, k0,
                                        stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK, E8M0, BLOCK_N, BLOCK_K,
                                        TILE_SCALE)
            elif INT4_PLANES:
                a_rows = x_ptr + tok[:, None] * stride_xm + k0
                gate = _int4_planes_step(a_rows, wg_ptrs, s_ptr, gate, expert, n, k0, H, stride_se, stride_sn,
                                         stride_sk, SCALE_BN, SCALE_BK, EVEN_K, E8M0, DOT_PRECISION, BLOCK_KW)
                if FUSED_ACT:
                    up = _int4_planes_step(a_rows, wu_ptrs, s_ptr, up, expert, n + I, k0, H, stride_se, stride_sn,
                                           stride_sk, SCALE_BN, SCALE_BK, EVEN_K, E8M0, DOT_PRECISION, BLOCK_KW)
            else:
                a = _a_tile(a_ptrs, kk, k0, H, EVEN_K)
                sa_rows = xs_ptr + tok * stride_xs
                gate = _weight_step(a, sa_rows, wg_ptrs, s_ptr, gate, expert, n, pid_n * BLOCK_N, k0, H, stride_se,
                                    stride_sn, stride_sk, SCALE_BN, SCALE_BK, EVEN_K, INT4, ACT_Q, E8M0,
                                    DOT_PRECISION, BLOCK_K, BLOCK_KW, TILE_SCALE)
                if FUSED_ACT:
                    up = _weight_step(a, sa_rows, wu_ptrs, s_ptr, up, expert, n + I, I + pid_n * BLOCK_N, k0, H,
                                      stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK, EVEN_K, INT4, ACT_Q, E8M0,
                                      DOT_PRECISION, BLOCK_K, BLOCK_KW, TILE_SCALE)
            a_ptrs += BLOCK_K
            wg_ptrs += BLOCK_KW * stride_wk
            wu_ptrs += BLOCK_KW * stride_wk
        n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if FUSED_ACT:
            out = gated_act(gate, up, alpha, limit, ACT)
            # w8a8_rows; BLOCK_N = ACT_GROUP: the tile's columns (those < I) are one group of the down GEMM's A
            if ACT_Q == 2:
                s_out = _e4m3_scale(tl.max(tl.where((n_out < I)[None, :], tl.abs(out), 0.0), axis=1))
                tl.store(act_s_ptr + slots * stride_as + pid_n, s_out, mask=valid)
                out = out / s_out[:, None]
        else:
            out = gate  # z
        ptrs = act_ptr + slots[:, None] * stride_am + n_out[None, :]
        tl.store(ptrs, out.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (n_out < n_cols)[None, :])


@triton.jit(do_not_specialize=["GROUP_M"])
def _down_q_kernel(
    a_ptr, a_desc, as_ptr, w_ptr, w_desc, s_ptr, y_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr,
    num_padded_ptr, H, I, GROUP_M, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    stride_am, stride_as, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_ym,
    EVEN_K: tl.constexpr, INT4: tl.constexpr, INT4_PLANES: tl.constexpr, ACT_Q: tl.constexpr,
    E8M0: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KW: tl.constexpr, TMA: tl.constexpr, WARP_SPEC: tl.constexpr, TILE_SCALE: tl.constexpr,
):
    # TMA (w8a8_rows): act is e4m3 in sorted order already, so both operands come by TMA.
    num_pid_n = tl.cdiv(H, BLOCK_N)
    num_tiles = tl.load(num_padded_ptr) // BLOCK_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_tiles // num_pid_n, num_pid_n, GROUP_M)
        expert, slots, rows, valid = _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, BLOCK_M)
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
        kk = tl.arange(0, BLOCK_K)
        # Padding rows of act were never written: whatever they hold only reaches rows that are not stored
        # (under w8a8_tile a padding row's own scale is computed from it alone, or read as garbage under
        # w8a8_rows: either way no other row is touched).
        a_ptrs = a_ptr + slots[:, None] * stride_am + kk[None, :]
        w_ptrs = (w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn
                  + tl.arange(0, BLOCK_KW)[:, None] * stride_wk)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, I, BLOCK_K, warp_specialize=WARP_SPEC):
            if TMA:
                acc = _rows_tma_step(a_desc.load([pid_m * BLOCK_M, k0]), w_desc, as_ptr + slots * stride_as, s_ptr,
                                     acc, expert, pid_n * BLOCK_N, n, k0, stride_se, stride_sn, stride_sk, SCALE_BN,
                                     SCALE_BK, E8M0, BLOCK_N, BLOCK_K, TILE_SCALE)
            elif INT4_PLANES:
                acc = _int4_planes_step(a_ptr + slots[:, None] * stride_am + k0, w_ptrs, s_ptr, acc, expert, n, k0,
                                        I, stride_se, stride_sn, stride_sk, SCALE_BN, SCALE_BK, EVEN_K, E8M0,
                                        DOT_PRECISION, BLOCK_KW)
            else:
                acc = _weight_step(_a_tile(a_ptrs, kk, k0, I, EVEN_K), as_ptr + slots * stride_as, w_ptrs, s_ptr, acc,
                                   expert, n, pid_n * BLOCK_N, k0, I, stride_se, stride_sn, stride_sk, SCALE_BN,
                                   SCALE_BK, EVEN_K, INT4, ACT_Q, E8M0, DOT_PRECISION, BLOCK_K, BLOCK_KW, TILE_SCALE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_KW * stride_wk
        acc *= tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
        n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = valid[:, None] & (n_out < H)[None, :]
        tl.store(y_ptr + slots[:, None] * stride_ym + n_out[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _scale_view(s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the scales as the kernels read them, whether they are e8m0 exponents)."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None and s.dtype == e8m0:
        return s.view(torch.uint8), True
    return s, False


def _tile_constexprs(spec: QuantizedExpertsSpec, config: QuantizedConfig) -> dict:
    """What both sorted-path kernels take of the format and the tiles (BLOCK_KW: stored words per K step)."""
    int4 = is_int4(spec)
    return dict(INT4=int4, INT4_PLANES=int4 and config.int4_planes, ACT_Q=0 if int4 else ACT_Q_CODE[config.act],
                BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                BLOCK_KW=config.block_k // 8 if int4 else config.block_k, num_warps=config.num_warps,
                num_stages=config.num_stages)


def tile_scale(spec: QuantizedExpertsSpec, config: QuantizedConfig, offset: int) -> bool:
    """Whether every output tile of a sorted-path GEMM lies in one weight scale block along N: tiles start at
    multiples of block_n (plus `offset`: the fused gate_up's up tile starts at I), so block_n must divide the scale
    block and the offset be a multiple of it. (Columns past N wrap and are never stored: their scale is moot.)"""
    return (not is_int4(spec) and spec.scale_block_n % config.block_n == 0
            and offset % spec.scale_block_n == 0)


def _descriptors(config: QuantizedConfig, a: torch.Tensor, w: torch.Tensor, tma: bool, a_by_tma: bool = True):
    """(a's TMA descriptor of [block_m, block_k] boxes or None, w's of [1, block_n, block_k]), or (None, None)."""
    if not tma:
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    box = [config.block_m, config.block_k]
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), box) if a_by_tma else None
    return a_desc, _weight_desc(w, config.block_n, config.block_k, True)


def wants_tma(config: QuantizedConfig, spec: QuantizedExpertsSpec) -> bool:
    """config.tma where it applies: the FP8 sorted path under w8a8_rows (a fact of the shapes: also asked at
    trace time, where tensors have no addresses)."""
    return config.tma and config.act is ActQuant.ROWS and not config.decode and not is_int4(spec)


def use_tma(config: QuantizedConfig, spec: QuantizedExpertsSpec, w_gate_up: torch.Tensor,
            w_down: torch.Tensor) -> bool:
    """wants_tma, and weights TMA can load (their K strides 16-byte multiples: then so are those of the e4m3 x
    and act, [S_pad, H] and [S_pad, I])."""
    return wants_tma(config, spec) and tma_ok(w_gate_up, w_down)


def launch_gate_up(x, x_s, rows: AlignedRows, w, s, spec: QuantizedExpertsSpec, config: QuantizedConfig, k: int,
                   act, act_s, dtype: torch.dtype, tma: bool = False):
    """x: hidden, or its e4m3 rows under w8a8_rows (x_s their scales; else any tensor, never read) — with `tma`
    and config.sorted_copy in sorted order ([S_pad, H], quantize_sorted_rows) and loaded by TMA; act_s likewise.
    dtype: hidden's (the dot precision)."""
    H, I = x.shape[1], act.shape[1]
    s, e8m0 = _scale_view(s)
    out = act
    if not config.fused_act:  # z first (the unfused GEMM over 2I columns), then _act_rows_kernel
        out = torch.empty(act.shape[0], 2 * I, dtype=dtype, device=act.device)
    x_desc, w_desc = _descriptors(config, x, w, tma, config.sorted_copy)
    grid = _grid(rows.max_blocks * triton.cdiv(out.shape[1] if not config.fused_act else I, config.block_n),
                 config.programs_per_sm, x)
    launch.kernel(_gate_up_q_kernel)[grid](
        x, x_desc, x_s, w, w_desc, s, out, act_s, rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        H, I, k, float(spec.swiglu_alpha), float(spec.swiglu_limit), config.group_m, spec.scale_block_n,
        spec.scale_block_k,
        x.stride(0), x_s.stride(0), *w.stride(), *s.stride(), out.stride(0), act_s.stride(0),
        ACT=ACT_CODE[spec.activation], EVEN_K=H % config.block_k == 0, E8M0=e8m0,
        DOT_PRECISION=dot_precision(dtype), BLOCK_M=config.block_m, FUSED_ACT=config.fused_act,
        TMA=tma, SORTED_COPY=tma and config.sorted_copy, WARP_SPEC=tma and config.warp_specialize,
        TILE_SCALE=tile_scale(spec, config, I if config.fused_act else 0), **_tile_constexprs(spec, config),
    )
    if not config.fused_act:
        launch_act_rows(out, act, act_s, rows.num_padded, spec, config.act is ActQuant.ROWS and not is_int4(spec))


def launch_act_rows(z, act, act_s, num_padded, spec: QuantizedExpertsSpec, quantize: bool):
    """act [S, I] = act(gate) * up of z [S, 2I]'s rows below num_padded; with `quantize` rounded to e4m3 per row
    and 128 columns (act_s their scales; else any tensor, never read)."""
    I = act.shape[1]
    programs, constexprs = row_pass(I)
    launch.kernel(_act_rows_kernel)[(act.shape[0], programs)](
        z, act, act_s, num_padded, I, float(spec.swiglu_alpha), float(spec.swiglu_limit), z.stride(0),
        act.stride(0), act_s.stride(0), ACT=ACT_CODE[spec.activation], ACT_ROWS=quantize, **constexprs,
    )


def launch_down(act, act_s, rows: AlignedRows, w, s, weights, spec: QuantizedExpertsSpec, config: QuantizedConfig,
                y, tma: bool = False):
    I, H = act.shape[1], y.shape[1]
    s, e8m0 = _scale_view(s)
    a_desc, w_desc = _descriptors(config, act, w, tma)
    grid = _grid(rows.max_blocks * triton.cdiv(H, config.block_n), config.programs_per_sm, act)
    launch.kernel(_down_q_kernel)[grid](
        act, a_desc, act_s, w, w_desc, s, y, weights, rows.sorted_rows, rows.block_expert, rows.seg_end,
        rows.num_padded,
        H, I, config.group_m, spec.scale_block_n, spec.scale_block_k,
        act.stride(0), act_s.stride(0), *w.stride(), *s.stride(), y.stride(0),
        EVEN_K=I % config.block_k == 0, E8M0=e8m0, DOT_PRECISION=dot_precision(y.dtype), BLOCK_M=config.block_m,
        TMA=tma, WARP_SPEC=tma and config.warp_specialize, TILE_SCALE=tile_scale(spec, config, 0),
        **_tile_constexprs(spec, config),
    )


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr,
                          GROUPS: tl.constexpr):
    """This program's groups of row t rounded to e4m3 (w8a8_rows' hidden)."""
    t = tl.program_id(0).to(tl.int64)
    g, cols, ok = _row_groups(K, GROUP, GROUPS)
    x = tl.load(x_ptr + t * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
    _store_e4m3_groups(x, g, cols, ok, K, q_ptr + t * stride_qm, s_ptr + t * stride_sm, GROUP)


def quantize_sorted_rows(x: torch.Tensor, rows: AlignedRows, k: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows' values and scales, one row per sorted slot ([S_pad, K] e4m3, [S_pad, groups] fp32; padding
    slots 0): the gate_up GEMM's A then lies in its blocks' order, contiguous, for TMA (each token's row k times: k
    bytes written per hidden value). Rounded once per token, then copied by triton_align.gathered: rounding each
    slot's row from hidden read hidden k times (DeepSeek-V3 T = 4096: 308 us; now 28 + ~143; NOTES "FP8 row
    passes and TMA measured")."""
    q_tok, s_tok = quantize_rows(x)
    q = gathered(q_tok.view(torch.uint8), rows, None, k, block_m).view(torch.float8_e4m3fn)
    return q, gathered(s_tok, rows, None, k, block_m)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [T, K], fp32 scales [T, ceil(K / ACT_GROUP)]) of x [T, K] (unit column stride)."""
    T, K = x.shape
    q = torch.empty(T, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(T, triton.cdiv(K, ACT_GROUP), dtype=torch.float32, device=x.device)
    programs, constexprs = row_pass(K)
    launch.kernel(_quantize_rows_kernel)[(T, programs)](x, q, s, K, x.stride(0), q.stride(0), s.stride(0),
                                                        **constexprs)
    return q, s


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                    spec: QuantizedExpertsSpec, config: QuantizedConfig | None = None) -> torch.Tensor:
    """out [T, H]. Sizes and dtypes were checked by ops/checks.py; T > 0."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, I = w_gate_up.shape[0], w_down.shape[2] * (8 if is_int4(spec) else 1)
    if config is None:
        config = default_config(hidden, E, k, spec, I=I, weights=(w_gate_up, w_gate_up_scale, w_down, w_down_scale))
    if config.cutlass >= 0:
        from . import cutlass_fp8

        return cutlass_fp8.experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down,
                                           w_down_scale, spec, config.cutlass)
    if is_int4(spec) and config.block_k % 8:
        raise ValueError(f"moe_compiler: block_k={config.block_k} must be a multiple of 8 (INT4 words)")
    if (is_int4(spec) and config.int4_planes and not config.decode and hidden.device.type == "cuda"
            and config.block_k < 128):
        raise ValueError(f"moe_compiler: INT4 planes take block_k >= 128 on a GPU (16 words: the tensor cores' "
                         f"K), got {config.block_k}")
    if config.act_fp8 and not config.decode and hidden.device.type == "cuda" and config.block_k < 32:
        raise ValueError(f"moe_compiler: w8a8 takes block_k >= 32 on a GPU (the FP8 tensor cores' K), got "
                         f"{config.block_k}; use act='w8a16' for scale blocks narrower than 32")
    act_rows = config.act is ActQuant.ROWS and not is_int4(spec) and not config.decode
    if act_rows and ((config.fused_act and config.block_n != ACT_GROUP) or ACT_GROUP % config.block_k):
        raise ValueError(f"moe_compiler: w8a8_rows takes block_n = {ACT_GROUP} (one activation group per gate_up "
                         f"tile) and a block_k dividing it, got block_n={config.block_n}, block_k={config.block_k}")
    spans = config.decode and config.block_k % spec.scale_block_k == 0  # a GEMV step over whole scale blocks
    if not is_int4(spec) and spec.scale_block_k % config.block_k and not spans:
        raise ValueError(f"moe_compiler: block_k={config.block_k} must divide scale_block_k={spec.scale_block_k} "
                         "(an FP8 K step reads one scale per column; the decode GEMVs also take a multiple of it)")
    if config.decode:
        from . import triton_quantized_decode

        return triton_quantized_decode.experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale,
                                                       w_down, w_down_scale, spec, config)
    rows = align_rows(topk_ids, E, config.block_m)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1)
    if weights.stride(0) != 1:
        weights = weights.contiguous()
    S = rows.sorted_rows.numel()
    tma = act_rows and use_tma(config, spec, w_gate_up, w_down)
    if act_rows:
        x, x_s = (quantize_sorted_rows(hidden, rows, k, config.block_m) if tma and config.sorted_copy
                  else quantize_rows(hidden))
        act = torch.empty(S, I, dtype=torch.float8_e4m3fn, device=hidden.device)
        act_s = torch.empty(S, triton.cdiv(I, ACT_GROUP), dtype=torch.float32, device=hidden.device)
    else:
        x, x_s, act, act_s = hidden, weights, hidden.new_empty(S, I), weights  # x_s, act_s never read
    launch_gate_up(x, x_s, rows, w_gate_up, w_gate_up_scale, spec, config, k, act, act_s, hidden.dtype, tma)
    y = hidden.new_empty(S, H)
    launch_down(act, act_s, rows, w_down, w_down_scale, weights, spec, config, y, tma)
    out = hidden.new_empty(T, H)
    launch_combine(y, rows, k, out)
    return out
