"""Triton experts forward, decode path (T * k small next to E): no sort, two launches, weights streamed once.

Data contract (T tokens, k top-k, E experts, H hidden, I intermediate, S = T*k pairs, p = t*k + j)
    hidden        [T, H]           bf16/fp16/fp32, unit column stride
    topk_ids      [T, k]           int32/int64 (out-of-range ids are clamped and reported via ids_ok)
    topk_weights  [T, k]           any float dtype, applied in fp32
    w_gate_up     [E, 2I, H]       (or transposed [E, H, 2I]) read in place through its strides
    w_down        [E, H, I]        (or transposed [E, I, H])
    act           [S, I]           hidden's dtype: act(gate) * up of every pair
    out           [T, H]           out[t] = sum_j w[t,j] * (act[p] @ W_down[e]^T + b_down[e]), j in order
                                   (spec.scale_input, Llama-4: w[t,j] scales pair p's gate_up row instead)

    route -> [gate_up GEMV + act: grid (S, I / BLOCK_N)] -> [down GEMV * weight + combine: grid (T, H / BLOCK_N),
                                                             each program all k slots of its token at once]

When T*k is small next to E the pairs rarely share an expert, so reading one expert's rows per pair is
reading each touched expert once: the whole op is a stream of weight bytes, and these kernels are GEMVs
with fp32 FMAs (no tensor cores needed) that keep enough bytes in flight to run at HBM speed. Within one
token the k experts are distinct, so T = 1 never re-reads a weight. The down kernel sums a token's k
slots in registers in a fixed order, so the combine is fused and deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import ExpertsSpec, GateUpLayout
from .triton_act import ACT_CODE, gated_act
from .triton_config import DecodeConfig
from .triton_experts import logical_strides


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, ids_ptr, topk_w_ptr, w_ptr, b_ptr, act_ptr, ok_ptr,
    S, E, H, I, TOP_K, alpha, limit,
    stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_am,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    SCALE_INPUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    if (p == 0) & (pid_n == 0):
        # One program checks every id (S is small on this path); the op asserts on the flag.
        bad = tl.zeros([BLOCK_S], dtype=tl.int32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            some = tl.load(ids_ptr + s, mask=s < S, other=0)
            bad += ((some < 0) | (some >= E)).to(tl.int32)
        tl.store(ok_ptr, (tl.sum(bad, 0) == 0).to(tl.int32))
    e = tl.load(ids_ptr + p)
    e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int64)
    tok = (p // TOP_K).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % I
    if INTERLEAVED:
        gate_rows, up_rows = 2 * n, 2 * n + 1
    else:
        gate_rows, up_rows = n, I + n
    kk = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e * stride_we
    wg_ptrs = w_base + gate_rows[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
    wu_ptrs = w_base + up_rows[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
    x_ptrs = x_ptr + tok * stride_xm + kk
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
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
    gate = tl.sum(acc_g, axis=1)
    up = tl.sum(acc_u, axis=1)
    if SCALE_INPUT:  # Llama-4: (w x) W = w (x W)
        row_w = tl.load(topk_w_ptr + p).to(tl.float32)
        gate *= row_w
        up *= row_w
    if HAS_BIAS:
        gate += tl.load(b_ptr + e * stride_be + gate_rows).to(tl.float32)
        up += tl.load(b_ptr + e * stride_be + up_rows).to(tl.float32)
    out = gated_act(gate, up, alpha, limit, ACT)
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + p.to(tl.int64) * stride_am + n_out, out.to(act_ptr.dtype.element_ty), mask=n_out < I)


@triton.jit
def _down_gemv_combine_kernel(
    a_ptr, ids_ptr, topk_w_ptr, w_ptr, b_ptr, out_ptr,
    E, H, I, TOP_K,
    stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_om,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SCALE_INPUT: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # All k slots of the token at once: a [K_POW2, BLOCK_N, BLOCK_K] weight tile per step keeps k times more
    # bytes in flight than a loop over slots (one program per SM at T = 1 must saturate HBM on its own).
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    j = tl.arange(0, K_POW2)
    j_ok = j < TOP_K
    p = t * TOP_K + j
    e = tl.load(ids_ptr + p, mask=j_ok, other=0)
    e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + p[:, None] * stride_am + kk[None, :]
    w_ptrs = w_ptr + e[:, None, None] * stride_we + n[None, :, None].to(tl.int64) * stride_wn + kk[None, None, :] * stride_wk
    acc = tl.zeros([K_POW2, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a_mask = j_ok[:, None]
        else:
            a_mask = j_ok[:, None] & (kk[None, :] < I - k0)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=a_mask[:, None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + e[:, None] * stride_be + n[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32)
    if SCALE_INPUT:  # the weight already scaled the gate_up rows
        weight = tl.where(j_ok, 1.0, 0.0)
    else:
        weight = tl.load(topk_w_ptr + p, mask=j_ok, other=0.0).to(tl.float32)
    out = tl.sum(acc * weight[:, None], axis=0)  # a fixed reduction tree over the slots: deterministic
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + t * stride_om + n_out, out.to(out_ptr.dtype.element_ty), mask=n_out < H)


# The id check loads every id in one program: the decode path is only taken for S up to this many pairs.
MAX_PAIRS = 4096


def launch_gate_up(hidden, ids, w_gate_up, b_gate_up, spec: ExpertsSpec, config: DecodeConfig, k: int, act, ids_ok,
                   weights=None):
    """act[p] = act(gate) * up of pair p (its input scaled by weights[p] under spec.scale_input);
    ids_ok[0] = whether every id is in [0, E)."""
    S, I = act.shape
    H = hidden.shape[1]
    gu = config.gate_up
    _gate_up_gemv_kernel[(S, triton.cdiv(I, gu.block_n))](
        hidden, ids, weights if spec.scale_input else act, w_gate_up, b_gate_up if b_gate_up is not None else w_gate_up, act, ids_ok,
        S, w_gate_up.shape[0], H, I, k, float(spec.swiglu_alpha), float(spec.swiglu_limit),
        hidden.stride(0), *logical_strides(w_gate_up, spec.transposed),
        b_gate_up.stride(0) if b_gate_up is not None else 0, act.stride(0),
        ACT=ACT_CODE[spec.activation], INTERLEAVED=spec.gate_up is GateUpLayout.INTERLEAVED,
        HAS_BIAS=b_gate_up is not None, EVEN_K=H % gu.block_k == 0, SCALE_INPUT=spec.scale_input,
        BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, BLOCK_S=128,
        num_warps=gu.num_warps, num_stages=gu.num_stages,
    )


def launch_down(act, ids, weights, w_down, b_down, spec: ExpertsSpec, config: DecodeConfig, k: int, out):
    """out[t] = sum_j weights[t, j] * (act[t*k + j] @ W_down[e]^T + b_down[e])."""
    T, H = out.shape
    I = act.shape[1]
    dn = config.down
    _down_gemv_combine_kernel[(T, triton.cdiv(H, dn.block_n))](
        act, ids, weights, w_down, b_down if b_down is not None else w_down, out,
        w_down.shape[0], H, I, k,
        act.stride(0), *logical_strides(w_down, spec.transposed),
        b_down.stride(0) if b_down is not None else 0, out.stride(0),
        HAS_BIAS=b_down is not None, EVEN_K=I % dn.block_k == 0, SCALE_INPUT=spec.scale_input, K_POW2=triton.next_power_of_2(k),
        BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, num_warps=dn.num_warps, num_stages=dn.num_stages,
    )


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec,
                    config: DecodeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H], ids_ok [1] int32). Sizes and layouts were checked by ops.check_inputs; T > 0."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    I = w_down.shape[1] if spec.transposed else w_down.shape[2]
    if T * k > MAX_PAIRS:
        raise ValueError(f"moe_compiler: the decode path takes at most {MAX_PAIRS} (token, slot) pairs, got {T * k}; use the sorted path")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    ids_ok = torch.empty(1, dtype=torch.int32, device=hidden.device)
    act = hidden.new_empty(T * k, I)
    launch_gate_up(hidden, ids, w_gate_up, b_gate_up, spec, config, k, act, ids_ok, weights)
    out = hidden.new_empty(T, H)
    launch_down(act, ids, weights, w_down, b_down, spec, config, k, out)
    return out, ids_ok
