"""`torch.ops.moe_compiler.experts_unstacked` and its backward: the experts op on per-expert weight parts.

    experts_unstacked(hidden, topk_ids, topk_weights, w_gate_up: list[Tensor], w_down: list[Tensor],
                      *, activation="silu", gate_up="concat", ...) -> out [T, H]

The same function as `experts` for weights kept as per-expert parameters (nn.ModuleList of nn.Linear,
[out, in] each): w_gate_up lists P parts per expert in expert order (P = 2: gate_e, up_e; P = 1: one fused
gate_up_e), w_down one [H, I] part per expert. The op reads them in place as one stacked tensor when they
tile one storage (stacked_weights.py: the backend re-lays them out once so they do), else concatenates them
for the call. No biases, [out, in] layout only (what nn.Linear experts have).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import stacked_weights
from ..lowering import dispatch
from ..spec import ExpertsSpec
from . import checks
from .experts import forward
from .signature import SIGNATURES, ExpertsTensors, UnstackedTensors, make_spec, schema


def _stacked(tensors: tuple, spec_kwargs: dict) -> tuple[ExpertsTensors, ExpertsSpec]:
    """The call as the experts op's arguments: the parts read as stacked [E, 2I, H] / [E, H, I] weights."""
    t = UnstackedTensors(*tensors)
    spec = make_spec(ExpertsSpec, spec_kwargs)
    E, _ = checks.unstacked_geometry(t.w_gate_up, t.w_down, spec)
    w_gate_up, w_down = stacked_weights.stacked(t.w_gate_up, E), stacked_weights.stacked(t.w_down, E)
    checks.check_experts(t.hidden, t.topk_ids, t.topk_weights, w_gate_up, w_down, None, None, spec)
    return ExpertsTensors(t.hidden, t.topk_ids, t.topk_weights, w_gate_up, w_down), spec


@torch.library.custom_op(
    "moe_compiler::experts_unstacked", mutates_args=(), schema=schema(UnstackedTensors, ExpertsSpec, "Tensor")
)
def experts_unstacked(*tensors, **spec) -> Tensor:
    """out [T, H]; see the module docstring."""
    return forward(*_stacked(tensors, spec), None)


def _stacked_like(t: UnstackedTensors) -> tuple[Tensor, Tensor]:
    """Fake [E, P * rows, H] / [E, H, I] tensors shaped like the stacked weights (no storage is read)."""
    E = len(t.w_down)
    rows, H = t.w_gate_up[0].shape
    P = len(t.w_gate_up) // E
    return t.w_gate_up[0].new_empty((E, P * rows, H)), t.w_down[0].new_empty((E, *t.w_down[0].shape))


@experts_unstacked.register_fake
def _(*tensors, **spec):
    t = UnstackedTensors(*tensors)
    spec = make_spec(ExpertsSpec, spec)
    checks.unstacked_geometry(t.w_gate_up, t.w_down, spec)
    like_gu, like_down = _stacked_like(t)
    checks.check_experts(t.hidden, t.topk_ids, t.topk_weights, like_gu, like_down, None, None, spec)
    return t.hidden.new_empty(t.hidden.shape)


@torch.library.custom_op(
    "moe_compiler::experts_unstacked_backward",
    mutates_args=(),
    schema=schema(UnstackedTensors, ExpertsSpec, "(Tensor, Tensor, Tensor, Tensor)",
                  leading=("Tensor grad_out", "bool weight_grads")),
)
def experts_unstacked_backward(grad_out: Tensor, weight_grads: bool, *tensors,
                               **spec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (hidden, topk_weights, stacked gate_up [E, 2I, H], stacked down [E, H, I]); the
    autograd formula hands each part its slice. Without weight_grads the last two are empty [0] tensors."""
    t, spec = _stacked(tensors, spec)
    grads = dispatch.experts_backward(grad_out, *t[:5], None, None, spec, weight_grads=weight_grads)
    return tuple(t.hidden.new_empty(0) if g is None else g for g in grads[:4])


@experts_unstacked_backward.register_fake
def _(grad_out, weight_grads, *tensors, **spec):
    t = UnstackedTensors(*tensors)
    weights = _stacked_like(t) if weight_grads else (t.hidden.new_empty(0), t.hidden.new_empty(0))
    return (torch.empty_like(t.hidden), torch.empty_like(t.topk_weights), *weights)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    hidden, topk_ids, topk_weights, w_gate_up, w_down = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, *w_gate_up, *w_down)
    ctx.num_parts = (len(w_gate_up), len(w_down))
    ctx.spec = keyword_only_inputs


def _backward(ctx, grad_out):
    hidden, topk_ids, topk_weights, *parts = ctx.saved_tensors
    n_gu, _ = ctx.num_parts
    w_gate_up, w_down = parts[:n_gu], parts[n_gu:]
    needs = ctx.needs_input_grad
    weight_grads = any(needs[3:5])
    d_hidden, d_weights, d_gu, d_down = torch.ops.moe_compiler.experts_unstacked_backward(
        grad_out.contiguous(), weight_grads, hidden, topk_ids, topk_weights, w_gate_up, w_down, **ctx.spec
    )
    if not weight_grads:  # frozen experts: nothing computed for them
        return d_hidden, None, d_weights, None, None
    rows, H = w_gate_up[0].shape
    return (
        d_hidden,
        None,  # topk_ids: integer
        d_weights,
        list(d_gu.reshape(n_gu, rows, H).unbind(0)),  # part i of expert e is rows [i*rows, (i+1)*rows) of d_gu[e]
        list(d_down.unbind(0)),
    )


experts_unstacked.register_autograd(_backward, setup_context=_setup_context)
SIGNATURES[torch.ops.moe_compiler.experts_unstacked.default] = (UnstackedTensors, ExpertsSpec)
