"""`torch.ops.moe_compiler.route` and its backward: router logits -> (top-k weights, top-k ids) for the routers
of transformers 5.x MoE models (every form of spec.RouterSpec), the fake beside it, the backward its own op.

    route(router_logits [T, E], correction_bias [E] = None, *, top_k, scoring="softmax",
          order="score_then_topk", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1,
          group_score="top2_sum", masked_score=None (-inf), jitter_eps=0.0, weights_dtype="float32")
        -> (weights [T, k] weights_dtype (computed in fp32), ids [T, k] i64)

Selection is not differentiable; the weights are, w.r.t. the logits (router training). Implementations:
lowering/torch_route.py (reference, CPU, backward) and lowering/triton_route.py (CUDA forward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lowering import dispatch
from ..spec import RouterSpec
from . import checks, inline
from .signature import SIGNATURES, RouteTensors, make_spec, schema


def _bind(tensors: tuple, spec_kwargs: dict) -> tuple[RouteTensors, RouterSpec]:
    t = RouteTensors(*tensors)
    spec = make_spec(RouterSpec, spec_kwargs)
    checks.check_route(t.router_logits, t.correction_bias, spec)
    return t, spec


def _forward(*tensors, **spec):
    t, spec = _bind(tensors, spec)
    return dispatch.route_forward(t.router_logits, t.correction_bias, spec)


@torch.library.custom_op(
    "moe_compiler::route", mutates_args=(), schema=schema(RouteTensors, RouterSpec, "(Tensor, Tensor)")
)
def route(*tensors, **spec) -> tuple[Tensor, Tensor]:
    """Top-k routing weights (spec.weights_dtype, fp32 by default) and expert ids (int64) of a transformers 5.x
    router; see RouterSpec."""
    return _forward(*tensors, **spec)


@route.register_fake
def _(*tensors, **spec):
    t, spec = _bind(tensors, spec)
    T = t.router_logits.shape[0]
    new = t.router_logits.new_empty
    return new(T, spec.top_k, dtype=spec.weights_dtype.torch), new(T, spec.top_k, dtype=torch.int64)


inline.register(
    route, lambda *tensors, **spec: inline.hinted(*tensors) and dispatch.route_inlinable(tensors[0]), _forward
)


@torch.library.custom_op(
    "moe_compiler::route_backward",
    mutates_args=(),
    schema=schema(None, RouterSpec, "Tensor", leading=("Tensor grad_weights", "Tensor router_logits", "Tensor ids")),
)
def route_backward(grad_weights: Tensor, router_logits: Tensor, ids: Tensor, **spec) -> Tensor:
    """d loss / d router_logits [T, E], the selection `ids` held fixed."""
    return _backward_run(grad_weights, router_logits, ids, **spec)


def _backward_run(grad_weights, router_logits, ids, **spec) -> Tensor:
    return dispatch.route_backward(grad_weights, router_logits, ids, make_spec(RouterSpec, spec))


@route_backward.register_fake
def _(grad_weights, router_logits, ids, **spec):
    return torch.empty_like(router_logits)


# A compiled training step records the backward's one launch as it does the forward's (the op's Python per step
# otherwise), kept in the backward graph.
inline.register(
    route_backward,
    lambda g, logits, ids, **spec: inline.hinted(g, logits, ids) and dispatch.route_backward_inlinable(
        logits, make_spec(RouterSpec, spec)),
    _backward_run, backward=True,
)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    router_logits, _ = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.spec = keyword_only_inputs


def _backward(ctx, grad_weights, _grad_ids):
    router_logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return None, None
    return torch.ops.moe_compiler.route_backward(grad_weights.contiguous(), router_logits, ids, **ctx.spec), None


route.register_autograd(_backward, setup_context=_setup_context)
SIGNATURES[torch.ops.moe_compiler.route.default] = (RouteTensors, RouterSpec)


def moe_route(router_logits: Tensor, spec: RouterSpec, correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The route op with a typed spec (Python convenience)."""
    return torch.ops.moe_compiler.route(router_logits, correction_bias, **spec.op_kwargs())
