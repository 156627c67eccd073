"""The route op in torch: the reference, the CPU path, and the backward on every device.

    router_logits [T, E] float -> weights [T, k] fp32 (or spec.weights_dtype), ids [T, k] int64  (every RouterSpec form)

It uses torch.topk, so ties break exactly as in the eager model. On CUDA the forward is one Triton launch
instead (triton_route.py): exact ties (equal logits) go to the lower expert id there, a choice any correct
top-k may make. Selection is not differentiable; the weights are, w.r.t. the logits (router training).

The sparse mixer's expert masks are decided in the logits' own dtype, as eager decides them: (m - x) and its
quotient by max(|x|, m) are rounded to that dtype and compared with 2 * jitter_eps rounded to it. The mask
only moves the weights (which experts share a round's softmax), but a quotient near the threshold rounds
across it differently in fp32; both implementations here round as eager does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..spec import GroupScore, RouteOrder, RouterSpec, Scoring, WeightsDtype


def _rounder(spec: RouterSpec, to: Optional[WeightsDtype] = None):
    """x -> x rounded to `to` (default: the router's own dtype) and back to fp32 (identity for fp32)."""
    to = spec.score_dtype if to is None else to
    if to is WeightsDtype.FLOAT32:
        return lambda x: x
    dtype = to.torch
    return lambda x: x.to(dtype).float()


def _scores(logits32: Tensor, scoring: Scoring, rnd=lambda x: x) -> Tensor:
    """The router's scores [T, E] fp32, each op's result rounded by `rnd` (_rounder: as in eager)."""
    if scoring is Scoring.SOFTMAX:
        return rnd(logits32.softmax(dim=-1))
    if scoring is Scoring.SIGMOID:
        return rnd(logits32.sigmoid())
    return rnd(rnd(torch.nn.functional.softplus(logits32)).sqrt())


def _select(logits32: Tensor, correction_bias: Optional[Tensor], spec: RouterSpec) -> tuple[Tensor, Tensor]:
    """(scores [T, E] fp32 used for the weights, ids [T, k]) following the router's own op order."""
    T, E = logits32.shape
    if spec.order is RouteOrder.TOPK_THEN_SCORE:  # the bias (Kolibri-1) steers the choice only
        choice = logits32 if correction_bias is None else logits32 + correction_bias.float()
        return logits32, torch.topk(choice, spec.top_k, dim=-1)[1]
    scores = _scores(logits32, spec.scoring, _rounder(spec))
    # The choice in its own dtype (type promotion: an fp32 correction bias makes it fp32, whatever the router's).
    rnd = _rounder(spec, spec.choice_dtype(None if correction_bias is None else correction_bias.dtype))
    choice = scores if correction_bias is None else rnd(scores + correction_bias.float())
    if spec.n_group > 1:
        grouped = choice.view(T, spec.n_group, E // spec.n_group)
        if spec.group_score is GroupScore.TOP2_SUM:
            group_scores = rnd(grouped.topk(2, dim=-1)[0].sum(-1))
        else:
            group_scores = grouped.amax(-1)
        group_idx = torch.topk(group_scores, spec.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
        keep = keep.unsqueeze(-1).expand(T, spec.n_group, E // spec.n_group).reshape(T, E)
        choice = choice.masked_fill(~keep, spec.masked_score)
    return scores, torch.topk(choice, spec.top_k, dim=-1, sorted=False)[1]


def _sparsemixer_rounds(logits: Tensor, spec: RouterSpec, ids: Optional[Tensor] = None) -> list[tuple[Tensor, Tensor]]:
    """Per round of the sparse mixer: (gate logits [T, E] fp32, -inf outside the round's softmax; id [T, 1]).
    The masks are computed with eager's ops in the logits' own dtype (see the module docstring); `ids` replays
    the rounds of a known selection (backward)."""
    threshold = 2 * spec.jitter_eps
    untaken = logits
    rounds = []
    for r in range(spec.top_k):
        best, i = untaken.max(dim=-1, keepdim=True)
        if ids is not None:
            i = ids[:, r : r + 1]
            best = untaken.gather(1, i)
        factor = logits.abs().clamp(min=best)
        drop = ((best - logits) / factor) > threshold
        rounds.append((untaken.masked_fill(drop, -math.inf).float(), i))
        untaken = untaken.scatter(-1, i, -math.inf)
    return rounds


def route_forward(router_logits, correction_bias, spec: RouterSpec) -> tuple[Tensor, Tensor]:
    """(weights [T, k] in spec.weights_dtype, computed in fp32, ids [T, k] int64)."""
    weights, ids = _route_fp32(router_logits, correction_bias, spec)
    return weights.to(spec.weights_dtype.torch), ids


def _route_fp32(router_logits, correction_bias, spec: RouterSpec) -> tuple[Tensor, Tensor]:
    if spec.order is RouteOrder.SPARSEMIXER:
        rounds = _sparsemixer_rounds(router_logits, spec)
        weights = torch.cat([gates.softmax(dim=-1).gather(1, i) for gates, i in rounds], dim=-1)
        return weights, torch.cat([i for _, i in rounds], dim=-1)
    scores, ids = _select(router_logits.float(), correction_bias, spec)
    picked = scores.gather(1, ids)
    rnd = _rounder(spec)
    if spec.order is RouteOrder.TOPK_THEN_SCORE:
        picked = picked.softmax(dim=-1) if spec.scoring is Scoring.SOFTMAX else picked.sigmoid()
    if spec.norm_topk_prob:
        weights = rnd(picked / rnd(rnd(picked.sum(-1, keepdim=True)) + spec.renorm_eps))
    else:
        weights = picked
    if spec.routed_scaling_factor == 1.0:
        return weights, ids
    return rnd(weights * spec.routed_scaling_factor), ids


def _d_renormalized(g: Tensor, picked: Tensor, spec: RouterSpec) -> Tensor:
    """d loss / d picked through the renormalization picked / (sum + eps), if the spec has one."""
    if not spec.norm_topk_prob:
        return g
    denom = picked.sum(-1, keepdim=True) + spec.renorm_eps
    return g / denom - (g * picked).sum(-1, keepdim=True) / denom**2


def route_backward(grad_weights, router_logits, ids, spec: RouterSpec) -> Tensor:
    """d loss / d router_logits [T, E] (selection held fixed)."""
    z = router_logits.float()
    g = grad_weights.float() * spec.routed_scaling_factor
    if spec.order is RouteOrder.SPARSEMIXER:
        # w_r = p_r[i_r] with p_r the round's softmax: d w_r / d z = w_r (onehot(i_r) - p_r); masked experts get 0.
        dz = torch.zeros_like(z)
        for r, (gates, i) in enumerate(_sparsemixer_rounds(router_logits, spec, ids)):
            p = gates.softmax(dim=-1)
            gw = g[:, r : r + 1] * p.gather(1, i)
            dz -= gw * p
            dz.scatter_add_(1, i, gw)
        return dz.to(router_logits.dtype)
    if spec.order is RouteOrder.TOPK_THEN_SCORE:
        if spec.scoring is Scoring.SOFTMAX:
            w = z.gather(1, ids).softmax(dim=-1)
            dz_sel = w * (g - (g * w).sum(-1, keepdim=True))
        else:
            w = z.gather(1, ids).sigmoid()
            dz_sel = _d_renormalized(g, w, spec) * w * (1 - w)
        return torch.zeros_like(z).scatter_(1, ids, dz_sel).to(router_logits.dtype)
    scores = _scores(z, spec.scoring)  # the derivatives of the fp32 math (a low-precision router's roundings have none)
    picked = scores.gather(1, ids)
    d_picked = _d_renormalized(g, picked, spec)
    if spec.scoring is Scoring.SIGMOID:
        dz_sel = d_picked * picked * (1 - picked)
        return torch.zeros_like(z).scatter_(1, ids, dz_sel).to(router_logits.dtype)
    if spec.scoring is Scoring.SQRTSOFTPLUS:
        # d sqrt(softplus(z)) / dz = sigmoid(z) / (2 sqrt(softplus(z))); 0 where the score underflowed to 0
        zs = z.gather(1, ids)
        dz_sel = torch.where(picked > 0, d_picked * zs.sigmoid() / (2 * picked), 0.0)
        return torch.zeros_like(z).scatter_(1, ids, dz_sel).to(router_logits.dtype)
    d_scores = torch.zeros_like(z).scatter_(1, ids, d_picked)
    return (scores * (d_scores - (d_scores * scores).sum(-1, keepdim=True))).to(router_logits.dtype)
