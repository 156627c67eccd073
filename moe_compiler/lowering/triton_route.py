"""Triton: the whole router in one launch - scores, correction bias, group-limited selection, top-k,
renormalization, scaling - for every spec.RouterSpec.

Data contract (T tokens, E experts, k top-k, G groups of E / G experts)
    router_logits    [T, E]   any float dtype (read once, computed in fp32)
    correction_bias  [E]      optional; steers the choice only (DeepSeek-V3's e_score_correction_bias)
    weights          [T, k]   fp32 out: router weight of each chosen expert
    ids              [T, k]   int64 out: the chosen experts, best first

    logits -> [route: this kernel] -> experts (triton_experts.py / triton_decode.py)

Each program holds BLOCK_T rows x BLOCK_E (>= E, a power of two) columns in registers. Selection is k
rounds of argmax (ties go to the lower expert id, as any correct top-k may) with the winner masked out
after each round; group scores are per-group reductions over column masks, so E / G need not be a power of
two (DeepSeek-V2: 160 experts in 8 groups). No sort, no host sync: capture-safe.

PhiMoE's sparse mixer has its own kernel (_sparsemixer_kernel, same tile): k rounds of argmax over the untaken
experts, each weighted by a softmax over the round's near-ties; the near-tie test rounds (m - x) and the
quotient by max(|x|, m) to the logits' dtype, as eager computes it (torch_route.py), with IEEE division
(div_rn).

The route op runs this on CUDA (dispatch.route_forward). Checked against torch_route.route_forward under
TRITON_INTERPRET and on the GPU at real router shapes under graph capture (tests/lowering/test_triton_route.py);
timed against Inductor's compiled routers by benchmarks/bench_route.py (figures in benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes

from ..spec import GroupScore, RouteOrder, RouterSpec
from . import launch


@triton.jit
def _tile(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """(rows, cols, row_ok, col_ok) of this program's [BLOCK_T, BLOCK_E] tile. Apart from the load: torch's
    mutation analysis of a recorded kernel (ops/inline.py) takes an index returned by a call as derived from every
    argument of that call, so output addresses built from a call that also took logits_ptr marked the logits
    written, and Inductor copied them before every launch."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    return rows, cols, rows < T, cols < E


@triton.jit
def _load_tile(logits_ptr, rows, cols, row_ok, col_ok, stride_lt):
    """The logits of the tile (_tile's coordinates), in their own dtype (0 outside T x E)."""
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return x


@triton.jit
def _store_topk(weights_ptr, ids_ptr, rows, row_ok, picked, chosen, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    slot = tl.arange(0, BLOCK_K)
    out = rows[:, None].to(tl.int64) * TOP_K + slot[None, :]
    ok = row_ok[:, None] & (slot[None, :] < TOP_K)
    tl.store(weights_ptr + out, picked, mask=ok)
    tl.store(ids_ptr + out, chosen, mask=ok)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, stride_lt, scale, masked_score, eps,
    MASKED_INF: tl.constexpr, TOP_K: tl.constexpr, SCORING: tl.constexpr, ROUND: tl.constexpr,
    CHOICE_ROUND: tl.constexpr, TOPK_FIRST: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _tile(T, E, BLOCK_T, BLOCK_E)
    w, chosen = route_rows(
        logits_ptr, bias_ptr, rows, row_ok, cols, col_ok, E, stride_lt, scale, masked_score, eps, MASKED_INF, TOP_K,
        SCORING, ROUND, CHOICE_ROUND, TOPK_FIRST, NORM, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_MAX, BLOCK_T, BLOCK_E,
        BLOCK_K, BLOCK_G,
    )
    _store_topk(weights_ptr, ids_ptr, rows, row_ok, w, chosen, TOP_K, BLOCK_K)


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """x rounded to the router's own dtype (RouterSpec.score_dtype: 0 fp32, 1 bf16, 2 fp16), back in fp32."""
    if ROUND == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _softplus(x):
    """torch's softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)) = max(x, 0) + log1p(exp(-|x|)), the
    log1p to full precision by Goldberg's log(v) * u / (v - 1), v = 1 + u (no log1p in every Triton backend)."""
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    log1p_u = tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_u)


@triton.jit
def _scores(x, SCORING: tl.constexpr, ROUND: tl.constexpr):
    """Scores of the logits x [rows, E] fp32 (-inf outside E) by spec.Scoring's code: 0 softmax over E, 1 sigmoid,
    2 sqrt(softplus); each op's result rounded as the router rounds it."""
    if SCORING == 1:
        scores = _round(tl.sigmoid(x), ROUND)
    elif SCORING == 2:
        scores = _round(tl.sqrt(_round(_softplus(x), ROUND)), ROUND)
    else:
        z = x - tl.max(x, axis=1)[:, None]
        ez = tl.exp(z)
        scores = _round(ez / tl.sum(ez, axis=1)[:, None], ROUND)
    return scores


@triton.jit
def route_rows(
    logits_ptr, bias_ptr, rows, row_ok, cols, col_ok, E, stride_lt, scale, masked_score, eps,
    MASKED_INF: tl.constexpr, TOP_K: tl.constexpr, SCORING: tl.constexpr, ROUND: tl.constexpr,
    CHOICE_ROUND: tl.constexpr, TOPK_FIRST: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """(weights [BLOCK_T, BLOCK_K] fp32, ids [BLOCK_T, BLOCK_K] int64) of the rows' routes, slots >= TOP_K zero:
    the route kernel's math, also run inside the decode gate_up kernel (triton_decode.py, route in the GEMV).
    ROUND: RouterSpec.score_dtype's rounding after each op (torch_route.py rounds at the same places); CHOICE_ROUND:
    the choice's (RouterSpec.choice_dtype: the scores', or their promotion with a correction bias's)."""
    x = _load_tile(logits_ptr, rows, cols, row_ok, col_ok, stride_lt)
    neg_inf = float("-inf")
    x = tl.where(col_ok[None, :], x.to(tl.float32), neg_inf)
    if HAS_BIAS:  # steers the choice only (DeepSeek-V3's correction bias; Kolibri-1's, on the logits)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if TOPK_FIRST:
        scores = x
        choice = x
        if HAS_BIAS:
            choice = tl.where(col_ok[None, :], x + bias, neg_inf)
    else:
        scores = tl.where(col_ok[None, :], _scores(x, SCORING, ROUND), 0.0)
        choice = scores
        if HAS_BIAS:
            choice = _round(choice + bias, CHOICE_ROUND)
        choice = tl.where(col_ok[None, :], choice, neg_inf)
        if N_GROUP > 1:
            group_size = E // N_GROUP
            group_of = cols // group_size
            gidx = tl.arange(0, BLOCK_G)
            group_scores = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)
            for g in tl.static_range(N_GROUP):
                in_g = (group_of == g)[None, :] & col_ok[None, :]
                vals = tl.where(in_g, choice, neg_inf)
                best = tl.max(vals, axis=1)
                if GROUP_MAX:
                    score_g = best
                else:  # sum of the group's top-2
                    first = tl.argmax(vals, axis=1)
                    second = tl.max(tl.where(cols[None, :] == first[:, None], neg_inf, vals), axis=1)
                    score_g = best + second
                    score_g = _round(score_g, CHOICE_ROUND)
                group_scores = tl.where(gidx[None, :] == g, score_g[:, None], group_scores)
            keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                g_best = tl.argmax(group_scores, axis=1)
                keep = keep | (group_of[None, :] == g_best[:, None])
                group_scores = tl.where(gidx[None, :] == g_best[:, None], neg_inf, group_scores)
            choice = tl.where(keep & col_ok[None, :], choice, neg_inf if MASKED_INF else masked_score)
            choice = tl.where(col_ok[None, :], choice, neg_inf)

    slot = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1)
        hit = cols[None, :] == best[:, None]
        value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        picked = tl.where(slot[None, :] == j, value[:, None], picked)
        chosen = tl.where(slot[None, :] == j, best.to(tl.int64)[:, None], chosen)
        choice = tl.where(hit, neg_inf, choice)
    live = slot[None, :] < TOP_K
    if TOPK_FIRST:
        if SCORING == 1:
            w = tl.sigmoid(picked)
        else:
            p = tl.where(live, picked, neg_inf)
            ep = tl.exp(p - tl.max(p, axis=1)[:, None])
            w = ep / tl.sum(ep, axis=1)[:, None]
    else:
        w = picked
    if NORM:
        total = _round(tl.sum(tl.where(live, w, 0.0), axis=1), ROUND)
        w = _round(w / _round(total + eps, ROUND)[:, None], ROUND)
    return _round(w * scale, ROUND), chosen


@triton.jit
def _sparsemixer_kernel(
    logits_ptr, weights_ptr, ids_ptr, T, E, stride_lt, threshold,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _tile(T, E, BLOCK_T, BLOCK_E)
    x = _load_tile(logits_ptr, rows, cols, row_ok, col_ok, stride_lt)
    dtype = x.dtype
    x = x.to(tl.float32)
    neg_inf = float("-inf")
    untaken = tl.where(col_ok[None, :], x, neg_inf)
    slot = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(untaken, axis=1)[:, None]
        best_id = tl.argmax(untaken, axis=1)
        # Eager's `((m - x) / x.abs().clamp(min=m)) > 2 * eps` in the logits' dtype: each op rounds its result.
        diff = (best - x).to(dtype).to(tl.float32)
        factor = tl.maximum(tl.abs(x), best)  # exact in any dtype
        drop = tl.math.div_rn(diff, factor).to(dtype).to(tl.float32) > threshold
        gates = tl.where(drop, neg_inf, untaken)
        # The round's best is never dropped (its quotient is 0), so best is the max of the gates.
        w = 1.0 / tl.sum(tl.exp(gates - best), axis=1)
        picked = tl.where(slot[None, :] == j, w[:, None], picked)
        chosen = tl.where(slot[None, :] == j, best_id.to(tl.int64)[:, None], chosen)
        untaken = tl.where(cols[None, :] == best_id[:, None], neg_inf, untaken)
    _store_topk(weights_ptr, ids_ptr, rows, row_ok, picked, chosen, TOP_K, BLOCK_K)


@triton.jit
def _route_backward_kernel(
    logits_ptr, ids_ptr, grad_ptr, dz_ptr, T, E, stride_lt, stride_dt, scale, eps,
    TOP_K: tl.constexpr, SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d loss / d logits [T, E] with the selection held fixed: the derivatives of torch_route.route_backward
    (every order but the sparse mixer's; of the fp32 math), one program per BLOCK_T rows, no scatter outside
    registers."""
    rows, cols, row_ok, col_ok = _tile(T, E, BLOCK_T, BLOCK_E)
    x = _load_tile(logits_ptr, rows, cols, row_ok, col_ok, stride_lt)
    z = tl.where(col_ok[None, :], x.to(tl.float32), float("-inf"))
    slot = tl.arange(0, BLOCK_K)
    slot_ok = row_ok[:, None] & (slot[None, :] < TOP_K)
    pairs = rows[:, None].to(tl.int64) * TOP_K + slot[None, :]
    ids = tl.load(ids_ptr + pairs, mask=slot_ok, other=-1)
    g = tl.load(grad_ptr + pairs, mask=slot_ok, other=0.0).to(tl.float32) * scale
    if TOPK_FIRST:  # the score is taken over the k picked logits below
        scores = z
    else:
        scores = _scores(z, SCORING, 0)
    # picked[t, j] = scores[t, ids[t, j]] (the raw logit when the top-k comes first); z_picked the logit
    picked = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    z_picked = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        id_j = tl.sum(tl.where(slot[None, :] == j, ids, 0), axis=1)
        at_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], scores, 0.0), axis=1)
        picked = tl.where(slot[None, :] == j, at_j[:, None], picked)
        if SCORING == 2:
            z_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], z, 0.0), axis=1)
            z_picked = tl.where(slot[None, :] == j, z_j[:, None], z_picked)
    if TOPK_FIRST:
        if SCORING == 1:
            w = tl.sigmoid(picked)
            d_sel = g
            if NORM:  # through w / (sum + eps) first
                denom = tl.sum(tl.where(slot_ok, w, 0.0), axis=1)[:, None] + eps
                d_sel = g / denom - tl.sum(tl.where(slot_ok, g * w, 0.0), axis=1)[:, None] / (denom * denom)
            d_sel = d_sel * w * (1.0 - w)
        else:
            top = tl.max(tl.where(slot_ok, picked, float("-inf")), axis=1)[:, None]
            e = tl.where(slot_ok, tl.exp(picked - top), 0.0)
            w = e / tl.sum(e, axis=1)[:, None]
            d_sel = w * (g - tl.sum(g * w, axis=1)[:, None])
    else:
        if NORM:
            denom = tl.sum(tl.where(slot_ok, picked, 0.0), axis=1)[:, None] + eps
            d_sel = g / denom - tl.sum(g * picked, axis=1)[:, None] / (denom * denom)
        else:
            d_sel = g
        if SCORING == 1:
            d_sel = d_sel * picked * (1.0 - picked)
        elif SCORING == 2:  # sigmoid(z) / (2 sqrt(softplus(z))); 0 where the score underflowed to 0
            d_sel = tl.where(picked > 0.0, d_sel * tl.sigmoid(z_picked) / (2.0 * picked), 0.0)
    d_sel = tl.where(slot_ok, d_sel, 0.0)
    # Spread each slot's value to its expert's column.
    dz = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        id_j = tl.sum(tl.where(slot[None, :] == j, ids, 0), axis=1)
        d_j = tl.sum(tl.where(slot[None, :] == j, d_sel, 0.0), axis=1)
        dz += tl.where(cols[None, :] == id_j[:, None], d_j[:, None], 0.0)
    if SCORING == 0 and not TOPK_FIRST:  # through the softmax over all experts
        dz = scores * (dz - tl.sum(dz * scores, axis=1)[:, None])
    out = dz_ptr + rows[:, None].to(tl.int64) * stride_dt + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.cache
def _rounded(value: float, dtype: torch.dtype) -> float:
    # Outside any tracing mode: a traced call (launch.py) must not turn this constant into a graph tensor.
    with _disable_current_modes():
        return float(torch.tensor(value, dtype=dtype))


def default_block_t(block_e: int) -> int:
    # The k argmax rounds are serial reductions over the whole tile, so a program's latency grows with its
    # rows: few rows per program (many programs) keep decode fast; measured in benchmarks/bench_route.py.
    return max(1, min(64, 1024 // block_e))


def route_forward(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, spec: RouterSpec,
    block_t: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] spec.weights_dtype, ids [T, k] int64); same contract as torch_route.route_forward.
    block_t / num_warps override the tile (benchmarks/bench_route.py sweeps them). The weights are computed in
    fp32 and rounded once by the store (to nearest even)."""
    T, E = router_logits.shape
    k = spec.top_k
    weights = torch.empty(T, k, dtype=spec.weights_dtype.torch, device=router_logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=router_logits.device)
    if T == 0:
        return weights, ids
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    block_e = triton.next_power_of_2(E)
    if block_t is None:
        block_t = default_block_t(block_e)
    if spec.order is RouteOrder.SPARSEMIXER:
        # 2 * eps rounded to the logits' dtype: eager compares the rounded quotient with the scalar cast to it.
        threshold = _rounded(2 * spec.jitter_eps, logits.dtype)
        launch.kernel(_sparsemixer_kernel)[(triton.cdiv(T, block_t),)](
            logits, weights, ids, T, E, logits.stride(0), threshold,
            TOP_K=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(k), num_warps=num_warps or 4,
        )
        return weights, ids
    scalars, constexprs = route_args(spec, E, None if correction_bias is None else correction_bias.dtype)
    launch.kernel(_route_kernel)[(triton.cdiv(T, block_t),)](
        logits, correction_bias if correction_bias is not None else logits, weights, ids, T, E, logits.stride(0),
        *scalars, **constexprs, BLOCK_T=block_t, num_warps=num_warps or 4,
    )
    if launch.tracing():
        launch.remember_route(weights, ids, Routed(logits, correction_bias, spec))
    return weights, ids


@dataclasses.dataclass(frozen=True)
class Routed:
    """How a traced route call made its (weights, ids): what a decode experts call given exactly those needs to
    compute them again inside its gate_up kernel (triton_decode.py, route in the GEMV)."""

    logits: torch.Tensor  # [T, E], unit column stride
    correction_bias: torch.Tensor | None
    spec: RouterSpec


def route_args(spec: RouterSpec, E: int, bias_dtype: torch.dtype | None) -> tuple[tuple, dict]:
    """(scale, masked_score, eps) and the constexprs of route_rows but BLOCK_T, for `spec` (not the sparse mixer)
    with a correction bias of `bias_dtype` (None: none)."""
    # -inf (transformers 5.23's masked score) by a constexpr, never as a float argument: Inductor's cpp_wrapper
    # writes a recorded kernel's scalars into Python source, where `-inf` is no literal.
    masked_inf = not math.isfinite(spec.masked_score)
    scalars = (float(spec.routed_scaling_factor), 0.0 if masked_inf else spec.masked_score, float(spec.renorm_eps))
    constexprs = dict(
        MASKED_INF=masked_inf, TOP_K=spec.top_k, SCORING=spec.scoring.code, ROUND=spec.score_dtype.code,
        CHOICE_ROUND=spec.choice_dtype(bias_dtype).code, TOPK_FIRST=spec.order is RouteOrder.TOPK_THEN_SCORE,
        NORM=spec.norm_topk_prob, HAS_BIAS=bias_dtype is not None,
        N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, GROUP_MAX=spec.group_score is GroupScore.MAX,
        BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(spec.top_k),
        BLOCK_G=triton.next_power_of_2(spec.n_group),
    )
    return scalars, constexprs


def route_backward(grad_weights: torch.Tensor, router_logits: torch.Tensor, ids: torch.Tensor,
                   spec: RouterSpec) -> torch.Tensor:
    """d loss / d router_logits [T, E] in the logits' dtype; the contract of torch_route.route_backward, for every
    order but the sparse mixer's (dispatch keeps the torch backward there)."""
    if spec.order is RouteOrder.SPARSEMIXER:
        raise ValueError("moe_compiler: the Triton route backward does not cover the sparse mixer; use torch_route")
    T, E = router_logits.shape
    dz = launch.empty(router_logits, T, E)
    if T == 0:
        return dz
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    block_e = triton.next_power_of_2(E)
    block_t = default_block_t(block_e)
    launch.kernel(_route_backward_kernel)[(triton.cdiv(T, block_t),)](
        logits, ids.contiguous(), grad_weights.contiguous(), dz, T, E, logits.stride(0), dz.stride(0),
        float(spec.routed_scaling_factor), float(spec.renorm_eps),
        TOP_K=spec.top_k, SCORING=spec.scoring.code, TOPK_FIRST=spec.order is RouteOrder.TOPK_THEN_SCORE,
        NORM=spec.norm_topk_prob, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(spec.top_k),
        num_warps=4,
    )
    return dz
