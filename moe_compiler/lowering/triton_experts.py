"""Triton experts forward: gather-GEMM with the gated activation in its epilogue, down GEMM with the router
weight in its epilogue, and a deterministic gather-and-sum combine.

Data contract (shape letters: T tokens, k top-k, E experts, H hidden, I intermediate, S = T*k)
    hidden        [T, H]           bf16/fp16/fp32, rows gathered in-kernel (never permuted in memory)
    topk_ids      [T, k]           -> triton_align.py: sorted_rows [S_pad], pos [S], block_expert [MAX_BLOCKS]
    topk_weights  [T, k]           any float dtype, applied in fp32
    w_gate_up     [E, 2I, H]       read in place (concat or interleaved gate/up rows)
    w_down        [E, H, I]        read in place
    act           [S_pad, I]       hidden's dtype, rows in padded sorted order (padding rows never written)
    y             [S_pad, H]       hidden's dtype, router-weighted down outputs, same order
    out           [T, H]           out[t] = sum_j y[pos[t*k + j]], accumulated in fp32

    route -> permute (align) -> [gate_up GEMM + act] -> [down GEMM * weight] -> [combine]

Every block of BLOCK_M sorted rows belongs to one expert (block_expert), so a program loads one
expert's weight tiles. Blocks past num_padded exit at once: the grid is sized by the static bound and
stays fixed under CUDA graph capture. Row offsets are int64 (tok * H can pass 2^31).

Status: forward only, transposed=False, no biases, activations silu / gelu / gelu_tanh / relu. Validated
under TRITON_INTERPRET on the CPU; not yet selected by lowering/ (needs the GPU tests and tuning of
the kernels issue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import Activation, ExpertsSpec, GateUpLayout
from .triton_align import align_rows

_ACT_CODE = {Activation.SILU: 0, Activation.GELU: 1, Activation.GELU_TANH: 2, Activation.RELU: 3}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(x) = 2 sigmoid(2x) - 1
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, S, BLOCK_M: tl.constexpr):
    """The expert of sorted block pid_m, its padded slots, the pair index in each slot, and which are real."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_rows_ptr + slots)
    return expert, slots, rows, rows < S


@triton.jit
def _gate_up_act_kernel(
    x_ptr, w_ptr, act_ptr, sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
    S, H, I, TOP_K,
    stride_xm, stride_we, stride_wn, stride_wk, stride_am,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the used blocks: the grid is sized by the static bound
    expert, slots, rows, valid = _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, S, BLOCK_M)
    tok = (rows // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    if INTERLEAVED:
        gate_rows, up_rows = 2 * n, 2 * n + 1
    else:
        gate_rows, up_rows = n, I + n
    w_base = w_ptr + expert * stride_we
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < H
        a = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_base + gate_rows[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk, mask=w_mask, other=0.0)
        wu = tl.load(w_base + up_rows[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc_g = tl.dot(a, wg, acc_g)
        acc_u = tl.dot(a, wu, acc_u)
    out = _act(acc_g, ACT) * acc_u
    ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_am + n[None, :]
    tl.store(ptrs, out.to(act_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_weight_kernel(
    a_ptr, w_ptr, y_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
    S, H, I,
    stride_am, stride_we, stride_wn, stride_wk, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, slots, rows, valid = _block_rows(pid_m, sorted_rows_ptr, block_expert_ptr, S, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < I
        a = tl.load(a_ptr + slots[:, None].to(tl.int64) * stride_am + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
    weight = tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    ptrs = y_ptr + slots[:, None].to(tl.int64) * stride_ym + n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, out_ptr, H, stride_ym, stride_om, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # fixed order over slots: deterministic
        p = tl.load(pos_ptr + t * TOP_K + j).to(tl.int64)
        acc += tl.load(y_ptr + p * stride_ym + h, mask=h_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_om + h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def supports(spec: ExpertsSpec, has_bias: bool) -> bool:
    return not spec.transposed and not has_bias and spec.activation in _ACT_CODE


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, spec: ExpertsSpec,
                    block_m: int = 64, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    if not supports(spec, has_bias=False):
        raise NotImplementedError(f"NYI: Triton experts for {spec.describe()}")
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    out = hidden.new_empty(T, H)
    if T == 0:
        return out
    S = T * k
    rows = align_rows(topk_ids, E, block_m)
    s_pad = rows.sorted_rows.numel()
    hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = hidden.new_empty(s_pad, I)
    _gate_up_act_kernel[(rows.max_blocks, triton.cdiv(I, block_n))](
        hidden, w_gate_up, act, rows.sorted_rows, rows.block_expert, rows.num_padded,
        S, H, I, k,
        hidden.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), act.stride(0),
        ACT=_ACT_CODE[spec.activation], INTERLEAVED=spec.gate_up is GateUpLayout.INTERLEAVED,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    y = hidden.new_empty(s_pad, H)
    _down_weight_kernel[(rows.max_blocks, triton.cdiv(H, block_n))](
        act, w_down, y, weights, rows.sorted_rows, rows.block_expert, rows.num_padded,
        S, H, I,
        act.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](y, rows.pos, out, H, y.stride(0), out.stride(0), TOP_K=k, BLOCK_H=block_h)
    return out
