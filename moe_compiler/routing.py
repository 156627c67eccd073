"""The `moe_compiler::route` operator: router logits -> (top-k weights, top-k ids), for the routers of
transformers 5.x MoE models, with its fake beside it and its backward as its own op.

    route(router_logits[T,E] float, correction_bias[E]?, top_k, scoring, order, norm_topk_prob,
          routed_scaling_factor, n_group, topk_group, group_score, masked_score, jitter_eps)
          -> (weights[T,k] f32, ids[T,k] i64)

Forms covered (RouterSpec), each the op sequence of the named transformers 5.x router:
    softmax -> top-k [-> renormalize]        Qwen2/Qwen3-MoE, Mixtral, OLMoE (Qwen3MoeTopKRouter ...)
    top-k on logits -> softmax over the k    GPT-OSS-style (router bias folded into the logits by the caller)
    top-k on logits -> sigmoid of each       Llama-4
    sigmoid (+ correction bias for choice) -> group-limited top-k -> gather unbiased scores [-> renormalize]
                                             DeepSeek-V3 / Kimi-K2 / GLM4-MoE (DeepseekV3TopkRouter)
    x routed_scaling_factor at the end.
    sparse mixer (eval): k rounds; round r takes the best expert not taken yet (m_r, i_r) and weighs it by a
                         softmax over the untaken experts within 2 * jitter_eps of m_r, relative to
                         max(|x|, m_r)                 PhiMoE (sparsemixer, modeling_phimoe.py, training=False)
Group-limited selection: experts split into n_group groups; a group's score is the sum of its top-2
(`group_score="top2_sum"`, DeepSeek-V3) or its max (`"max"`, DeepSeek-V2) choice scores; only the
best topk_group groups stay; the others' choice scores become `masked_score` (-inf in 5.23).

Selection is not differentiable; the weights are, w.r.t. the logits (router training). The torch
implementation here is the reference and runs on CPU: it uses torch.topk, so ties break exactly as in the
eager model. On CUDA (lowering.uses_triton) the forward is one Triton launch, lowering/triton_route.py:
exact ties (equal logits) go to the lower expert id there, a choice any correct top-k may make.

The sparse mixer's expert masks are decided in the logits' own dtype, as eager decides them: (m - x) and its
quotient by max(|x|, m) are rounded to that dtype and compared with 2 * jitter_eps rounded to it. The mask
only moves the weights (which experts share a round's softmax), but a quotient near the threshold rounds
across it differently in fp32; both implementations here round as eager does.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional

import torch
from torch import Tensor

from . import lowering  # lowering/triton_route.py (imported on first CUDA call) reads this module's RouterSpec


class Scoring(str, enum.Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class RouteOrder(str, enum.Enum):
    SCORE_THEN_TOPK = "score_then_topk"  # scores over all E experts, then top-k
    TOPK_THEN_SCORE = "topk_then_score"  # top-k of the logits, then softmax over those k
    SPARSEMIXER = "sparsemixer"  # PhiMoE: k rounds of argmax, each weighted by a softmax over its near-ties


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    top_k: int
    scoring: Scoring = Scoring.SOFTMAX
    order: RouteOrder = RouteOrder.SCORE_THEN_TOPK
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"  # "top2_sum" | "max"
    masked_score: float = -math.inf
    jitter_eps: float = 0.0  # sparse mixer: experts within 2 * jitter_eps (relative) of a round's best share it

    def __post_init__(self):
        object.__setattr__(self, "scoring", Scoring(self.scoring))
        object.__setattr__(self, "order", RouteOrder(self.order))
        if self.top_k < 1:
            raise ValueError(f"RouterSpec.top_k: expected >= 1, got {self.top_k}")
        if self.order is RouteOrder.TOPK_THEN_SCORE and (self.n_group != 1 or self.norm_topk_prob or self.routed_scaling_factor != 1.0):
            raise ValueError("RouterSpec.order: topk_then_score is defined without groups, renormalization or scaling")
        if self.order is RouteOrder.SPARSEMIXER:
            if self.scoring is not Scoring.SOFTMAX or self.n_group != 1 or self.norm_topk_prob or self.routed_scaling_factor != 1.0:
                raise ValueError("RouterSpec.order: sparsemixer is defined with softmax scoring, without groups, renormalization or scaling")
            if not self.jitter_eps >= 0.0:
                raise ValueError(f"RouterSpec.jitter_eps: expected >= 0, got {self.jitter_eps}")
        elif self.jitter_eps != 0.0:
            raise ValueError(f"RouterSpec.jitter_eps: only the sparsemixer order has one, got {self.jitter_eps} with {self.order.value}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"RouterSpec.topk_group: expected 1 <= topk_group <= n_group={self.n_group}, got {self.topk_group}")
        if self.group_score not in ("top2_sum", "max"):
            raise ValueError(f"RouterSpec.group_score: expected 'top2_sum' or 'max', got {self.group_score!r}")

    def describe(self) -> str:
        if self.order is RouteOrder.SPARSEMIXER:
            return f"sparse mixer, {self.top_k} rounds of argmax, softmax over the experts within {2 * self.jitter_eps:g} (relative) of each round's best"
        if self.order is RouteOrder.TOPK_THEN_SCORE:
            if self.scoring is Scoring.SIGMOID:
                return f"top-{self.top_k} of the logits, then sigmoid of each"
            return f"top-{self.top_k} of the logits, then softmax over them"
        parts = [f"{self.scoring.value}, top-{self.top_k}"]
        if self.n_group > 1:
            parts.append(f"best {self.topk_group} of {self.n_group} groups ({self.group_score}, others {self.masked_score})")
        if self.norm_topk_prob:
            parts.append("renormalized")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"x {self.routed_scaling_factor}")
        return ", ".join(parts)

    def op_args(self) -> tuple:
        return (self.top_k, self.scoring.value, self.order.value, self.norm_topk_prob, float(self.routed_scaling_factor),
                self.n_group, self.topk_group, self.group_score, float(self.masked_score),
                float(self.jitter_eps))


def _fail(what, expected, got, fix):
    raise ValueError(f"moe_compiler.route: {what}: expected {expected}, got {got}. {fix}")


def _check(router_logits: Tensor, correction_bias: Optional[Tensor], spec: RouterSpec):
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        _fail("router_logits", "a 2-D [T, E] float tensor", f"{tuple(router_logits.shape)} {router_logits.dtype}", "Pass the router's logits.")
    E = router_logits.shape[1]
    if spec.top_k > E:
        _fail("top_k", f"<= E={E}", spec.top_k, "Each token picks distinct experts.")
    if E % spec.n_group != 0:
        _fail("n_group", f"a divisor of E={E}", spec.n_group, "Check the model config.")
    if spec.n_group > 1 and spec.top_k > spec.topk_group * (E // spec.n_group):
        _fail("topk_group", f"enough groups for top_k={spec.top_k}", spec.topk_group, "Check the model config.")
    if correction_bias is not None and (correction_bias.dim() != 1 or correction_bias.shape[0] != E):
        _fail("correction_bias", f"a [E={E}] tensor", tuple(correction_bias.shape), "Pass e_score_correction_bias or None.")


def _select(logits32: Tensor, correction_bias: Optional[Tensor], spec: RouterSpec) -> tuple[Tensor, Tensor]:
    """(scores [T, E] fp32 used for the weights, ids [T, k]) following the router's own op order."""
    T, E = logits32.shape
    if spec.order is RouteOrder.TOPK_THEN_SCORE:
        return logits32, torch.topk(logits32, spec.top_k, dim=-1)[1]
    scores = logits32.softmax(dim=-1) if spec.scoring is Scoring.SOFTMAX else logits32.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if spec.n_group > 1:
        grouped = choice.view(T, spec.n_group, E // spec.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if spec.group_score == "top2_sum" else grouped.amax(-1)
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
    if spec.order is RouteOrder.SPARSEMIXER:
        rounds = _sparsemixer_rounds(router_logits, spec)
        weights = torch.cat([gates.softmax(dim=-1).gather(1, i) for gates, i in rounds], dim=-1)
        return weights, torch.cat([i for _, i in rounds], dim=-1)
    scores, ids = _select(router_logits.float(), correction_bias, spec)
    picked = scores.gather(1, ids)
    if spec.order is RouteOrder.TOPK_THEN_SCORE:
        weights = picked.softmax(dim=-1) if spec.scoring is Scoring.SOFTMAX else picked.sigmoid()
    elif spec.norm_topk_prob:
        eps = 1e-20 if spec.scoring is Scoring.SIGMOID else 0.0  # DeepSeek adds 1e-20; softmax routers don't
        weights = picked / (picked.sum(-1, keepdim=True) + eps)
    else:
        weights = picked
    return weights * spec.routed_scaling_factor, ids


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
            dz_sel = g * w * (1 - w)
        return torch.zeros_like(z).scatter_(1, ids, dz_sel).to(router_logits.dtype)
    scores = z.softmax(dim=-1) if spec.scoring is Scoring.SOFTMAX else z.sigmoid()
    picked = scores.gather(1, ids)
    if spec.norm_topk_prob:
        denom = picked.sum(-1, keepdim=True) + (1e-20 if spec.scoring is Scoring.SIGMOID else 0.0)
        d_picked = g / denom - (g * picked).sum(-1, keepdim=True) / denom**2
    else:
        d_picked = g
    if spec.scoring is Scoring.SIGMOID:
        dz_sel = d_picked * picked * (1 - picked)
        return torch.zeros_like(z).scatter_(1, ids, dz_sel).to(router_logits.dtype)
    d_scores = torch.zeros_like(z).scatter_(1, ids, d_picked)
    return (scores * (d_scores - (d_scores * scores).sum(-1, keepdim=True))).to(router_logits.dtype)


def _spec(*args) -> RouterSpec:
    return RouterSpec(*args)


@torch.library.custom_op("moe_compiler::route", mutates_args=())
def route(
    router_logits: Tensor, correction_bias: Optional[Tensor], top_k: int, scoring: str, order: str, norm_topk_prob: bool,
    routed_scaling_factor: float, n_group: int, topk_group: int, group_score: str, masked_score: float,
    jitter_eps: float,
) -> tuple[Tensor, Tensor]:
    """Top-k routing weights (fp32) and expert ids (int64) of a transformers 5.x router; see RouterSpec."""
    spec = _spec(top_k, scoring, order, norm_topk_prob, routed_scaling_factor, n_group, topk_group, group_score, masked_score, jitter_eps)
    _check(router_logits, correction_bias, spec)
    if lowering.uses_triton(router_logits):
        from .lowering import triton_route

        return triton_route.route_forward(router_logits, correction_bias, spec)
    return route_forward(router_logits, correction_bias, spec)


@route.register_fake
def _(router_logits, correction_bias, top_k, scoring, order, norm_topk_prob, routed_scaling_factor, n_group, topk_group, group_score, masked_score,
      jitter_eps):
    spec = _spec(top_k, scoring, order, norm_topk_prob, routed_scaling_factor, n_group, topk_group, group_score, masked_score, jitter_eps)
    _check(router_logits, correction_bias, spec)
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=torch.float32), router_logits.new_empty(T, top_k, dtype=torch.int64))


@torch.library.custom_op("moe_compiler::route_backward", mutates_args=())
def route_backward_op(
    grad_weights: Tensor, router_logits: Tensor, ids: Tensor, top_k: int, scoring: str, order: str, norm_topk_prob: bool,
    routed_scaling_factor: float, n_group: int, topk_group: int, group_score: str, masked_score: float,
    jitter_eps: float,
) -> Tensor:
    spec = _spec(top_k, scoring, order, norm_topk_prob, routed_scaling_factor, n_group, topk_group, group_score, masked_score, jitter_eps)
    return route_backward(grad_weights, router_logits, ids, spec)


@route_backward_op.register_fake
def _(grad_weights, router_logits, ids, *spec_args):
    return torch.empty_like(router_logits)


def _setup_context(ctx, inputs, output):
    router_logits, _, *spec_args = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.spec_args = spec_args


def _backward(ctx, grad_weights, _grad_ids):
    router_logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return (None,) * 12
    d_logits = torch.ops.moe_compiler.route_backward(grad_weights.contiguous(), router_logits, ids, *ctx.spec_args)
    return (d_logits,) + (None,) * 11


route.register_autograd(_backward, setup_context=_setup_context)


def moe_route(router_logits: Tensor, spec: RouterSpec, correction_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Python convenience wrapper: the op with a typed spec."""
    return torch.ops.moe_compiler.route(router_logits, correction_bias, *spec.op_args())
