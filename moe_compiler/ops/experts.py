"""`torch.ops.moe_compiler.experts` and its backward: one signature each (ops/signature.py), the fake beside
the real implementation, autograd through a backward that is itself an op (eager calls and the profiler show
`moe_compiler::experts` / `moe_compiler::experts_backward`; inside torch.compile, where the shapes allow, each
call is recorded as its launches instead: ops/inline.py).

    experts(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up=None, b_down=None,
            shared_gate_proj=None, shared_up_proj=None, shared_down_proj=None, shared_expert_gate=None,
            *, activation="silu", gate_up="concat", transposed=False, swiglu_alpha=1.702, swiglu_limit=7.0,
            scale_input=False) -> out [T, H]

    out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])          (spec.ExpertsSpec)
           [+ s[t] * shared MLP(hidden[t])]                                          (spec.SharedMLP)

    experts_train(<the same arguments>) -> (out [T, H], z)

The same function for a graph that will run the backward (passes/training.py emits it there): it also returns
the pre-activation rows z [T*k, 2I] (bias added, pair order t*k + j) that the Triton backward reads instead of
recomputing them — or an empty [0, 2I] where that backward does not run (dispatch.saved_z_shape). z is saved
for the backward and is not differentiable.

Its backward is three ops, split where z and then dz are last read, so that a compiled backward (AOTAutograd
clears the saved tensors before it runs; Inductor frees a buffer after its last reader) frees z before the second
part allocates the weight gradients, and dz before the last allocates d hidden:

    experts_backward_down(grad_out, weight_grads, saved_z, <the same arguments>)
        -> (dz [S_pad, 2I] in padded sorted order, d_topk_weights, d_w_down, d_b_down)
    experts_backward_gate_up(grad_out, weight_grads, dz, <the same arguments>)
        -> (dx_rows [S_pad, H]: d hidden's rows, not yet combined over k; d_w_gate_up, d_b_gate_up)
    experts_backward_combine(grad_out, weight_grads, dx_rows, <the same arguments>) -> a gradient per tensor
        argument (hidden's and the shared MLP's; the others empty [0] tensors)

(Mixtral-8x7B at T = 4096 with bf16 experts: z is 0.44 GiB beside 2.6 GiB of weight gradients; d hidden, 32 MiB,
off the step's peak: NOTES.md session 34.) Without a saved z, or with a symbolic T (the first half's row bound is
chosen from T), one op: experts_backward.

Weights are the model's own parameters, read in place on every call. The implementations are in lowering/
(dispatch.py picks one per call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lowering import device, dispatch
from ..spec import ExpertsSpec, SharedMLP
from . import checks, inline
from .signature import SIGNATURES, ExpertsTensors, make_spec, schema

_GRADS = "(" + ", ".join(["Tensor"] * len(ExpertsTensors._fields)) + ")"


def bind(tensors: tuple, spec_kwargs: dict) -> tuple[ExpertsTensors, ExpertsSpec, SharedMLP | None]:
    """The op's arguments, typed and checked: (tensors, spec, the shared MLP or None)."""
    t = ExpertsTensors(*tensors)
    spec = make_spec(ExpertsSpec, spec_kwargs)
    checks.check_experts(t.hidden, t.topk_ids, t.topk_weights, t.w_gate_up, t.w_down, t.b_gate_up, t.b_down, spec)
    return t, spec, bind_shared(t)


def bind_shared(t) -> SharedMLP | None:
    """The shared MLP of a table with the shared_* fields (ExpertsTensors, QuantizedTensors), checked; or None."""
    if t.shared_gate_proj is None and t.shared_down_proj is None:
        checks.check_shared_absent(t.shared_up_proj, t.shared_expert_gate)
        return None
    checks.check_shared(t.hidden, t.shared_gate_proj, t.shared_up_proj, t.shared_down_proj, t.shared_expert_gate)
    return SharedMLP.from_parts(t.shared_gate_proj, t.shared_up_proj, t.shared_down_proj, t.shared_expert_gate)


def forward(t: ExpertsTensors, spec: ExpertsSpec, shared: SharedMLP | None) -> Tensor:
    if not device.uses_triton(t.hidden):
        checks.check_ids_in_range(t.topk_ids, t.w_gate_up.shape[0])  # the Triton kernels check ids themselves
    return dispatch.experts_forward(
        t.hidden, t.topk_ids, t.topk_weights, t.w_gate_up, t.w_down, t.b_gate_up, t.b_down, spec, shared
    )


@torch.library.custom_op("moe_compiler::experts", mutates_args=(), schema=schema(ExpertsTensors, ExpertsSpec, "Tensor"))
def experts(*tensors, **spec) -> Tensor:
    """out [T, H] in hidden's dtype; see the module docstring."""
    return forward(*bind(tensors, spec))


@experts.register_fake
def _(*tensors, **spec):
    t, _, _ = bind(tensors, spec)
    return t.hidden.new_empty(t.hidden.shape)


def _sized(t: ExpertsTensors, *more) -> bool:
    """Static weights and biases, and rows counted at most by a symbol with a hint (inline.hinted): sizes from which
    a config is looked up (the token count's band's) and the backward's buffers sized (dz_shape)."""
    return inline.static(t.w_gate_up, t.w_down, t.b_gate_up, t.b_down) and inline.hinted(*t, *more)


def _inlinable(*tensors, **spec) -> bool:
    # Sizes only: a tensor op here (a view) would run on functional tensors outside their mode.
    t = ExpertsTensors(*tensors)
    if not _sized(t):
        return False
    return dispatch.experts_inlinable(t.hidden, t.topk_ids, t.w_gate_up, t.w_down, make_spec(ExpertsSpec, spec))


inline.register(experts, _inlinable, lambda *tensors, **spec: forward(*bind(tensors, spec)))


@torch.library.custom_op(
    "moe_compiler::experts_train", mutates_args=(), schema=schema(ExpertsTensors, ExpertsSpec, "(Tensor, Tensor)")
)
def experts_train(*tensors, **spec) -> tuple[Tensor, Tensor]:
    """(out [T, H], z [T*k, 2I] or [0, 2I]); see the module docstring."""
    return _train_forward(*tensors, **spec)


def _train_forward(*tensors, **spec) -> tuple[Tensor, Tensor]:
    t, spec, shared = bind(tensors, spec)
    shape = dispatch.saved_z_shape(t.hidden, t.topk_ids, t.w_down, spec)
    if not shape[0]:  # nothing to save (the torch backward, or no pairs)
        return forward(t, spec, shared), t.hidden.new_empty(shape)
    return dispatch.experts_forward_saving_z(
        t.hidden, t.topk_ids, t.topk_weights, t.w_gate_up, t.w_down, t.b_gate_up, t.b_down, spec, shared
    )


@experts_train.register_fake
def _(*tensors, **spec):
    t, spec, _ = bind(tensors, spec)
    z_shape = dispatch.saved_z_shape(t.hidden, t.topk_ids, t.w_down, spec)
    return t.hidden.new_empty(t.hidden.shape), t.hidden.new_empty(z_shape)


# A traced training forward records its launches where experts' would (the same kernels, z stored by the gate_up
# epilogue): a compiled training step pays no op layer, checks or Python launches per call for it.
inline.register(experts_train, _inlinable, _train_forward)


# Positions of the weights and biases among ExpertsTensors (routed and shared): their gradients come together.
_WEIGHTS = frozenset(
    i for i, name in enumerate(ExpertsTensors._fields) if name not in ("hidden", "topk_ids", "topk_weights")
)


@torch.library.custom_op(
    "moe_compiler::experts_backward",
    mutates_args=(),
    schema=schema(ExpertsTensors, ExpertsSpec, _GRADS,
                  leading=("Tensor grad_out", "bool weight_grads", "Tensor? saved_z")),
)
def experts_backward(grad_out: Tensor, weight_grads: bool, saved_z: Tensor | None, *tensors,
                     **spec) -> tuple[Tensor, ...]:
    """One gradient per ExpertsTensors field, in order; an empty [0] tensor where there is none (the integer
    ids, an absent tensor, and every weight and bias without weight_grads: frozen experts are not paid for).
    The routed and the shared term's gradients w.r.t. hidden are summed. saved_z: experts_train's z, or None."""
    t, spec, shared = bind(tensors, spec)
    routed = dispatch.experts_backward(
        grad_out, t.hidden, t.topk_ids, t.topk_weights, t.w_gate_up, t.w_down, t.b_gate_up, t.b_down, spec,
        weight_grads=weight_grads, z=saved_z,
    )
    d_hidden, d_weights, d_gu, d_down, d_bgu, d_bdown = routed
    return _with_shared(grad_out, t, spec, shared, weight_grads, (d_hidden, None, d_weights, d_gu, d_down, d_bgu,
                                                                  d_bdown))


def _with_shared(grad_out, t: ExpertsTensors, spec: ExpertsSpec, shared: SharedMLP | None, weight_grads: bool,
                 routed: tuple) -> tuple[Tensor, ...]:
    """A gradient per ExpertsTensors field (empty [0] where there is none) from the routed experts' (the first
    seven fields) and the shared MLP's; the two terms' gradients w.r.t. hidden are summed."""
    d_hidden = routed[0]
    d_shared = (None,) * 4
    if shared is not None:
        d_x, d_gate, d_up, d_sdown, d_egate = dispatch.shared_backward(grad_out, t.hidden, shared, spec,
                                                                       weight_grads=weight_grads)
        d_hidden = d_hidden + d_x.to(t.hidden.dtype)
        dtype = t.shared_down_proj.dtype
        if t.shared_up_proj is None and weight_grads:  # one fused [2Is, H] weight: gate rows, then up
            d_gate, d_up = torch.cat([d_gate, d_up]), None
        d_shared = tuple(None if g is None else g.to(dtype) for g in (d_gate, d_up, d_sdown, d_egate))
    grads = (d_hidden, *routed[1:], *d_shared)
    return tuple(t.hidden.new_empty(0) if g is None else g for g in grads)  # outputs cannot be None


@experts_backward.register_fake
def _(grad_out, weight_grads, saved_z, *tensors, **spec):
    return _backward_fake(weight_grads, *tensors, **spec)


def _backward_fake(weight_grads, *tensors, **spec):
    t, _, _ = bind(tensors, spec)
    return tuple(
        t.hidden.new_empty(0) if x is None or not x.is_floating_point() or (i in _WEIGHTS and not weight_grads)
        else torch.empty_like(x)
        for i, x in enumerate(t)
    )


_DOWN_GRADS = ("topk_weights", "w_down", "b_down")  # experts_backward_down's gradients, after dz


@torch.library.custom_op(
    "moe_compiler::experts_backward_down",
    mutates_args=(),
    schema=schema(ExpertsTensors, ExpertsSpec, "(Tensor, Tensor, Tensor, Tensor)",
                  leading=("Tensor grad_out", "bool weight_grads", "Tensor saved_z")),
)
def experts_backward_down(grad_out: Tensor, weight_grads: bool, saved_z: Tensor, *tensors,
                          **spec) -> tuple[Tensor, ...]:
    """(dz, d_topk_weights, d_w_down, d_b_down): the routed experts' backward up to dz, the half that reads the
    saved z; the weights' gradients empty [0] without weight_grads or a bias."""
    return _backward_down(grad_out, weight_grads, saved_z, *tensors, **spec)


def _backward_down(grad_out, weight_grads, saved_z, *tensors, **spec) -> tuple[Tensor, ...]:
    t, spec, _ = bind(tensors, spec)
    down = dispatch.experts_backward_down(grad_out, t.hidden, t.topk_ids, t.topk_weights, t.w_gate_up, t.w_down,
                                          t.b_gate_up, t.b_down, spec, weight_grads, saved_z)
    return tuple(t.hidden.new_empty(0) if g is None else g for g in down)


@experts_backward_down.register_fake
def _(grad_out, weight_grads, saved_z, *tensors, **spec):
    t, spec, _ = bind(tensors, spec)
    dz = t.hidden.new_empty(dispatch.dz_shape(t.hidden, t.topk_ids, t.w_gate_up, t.w_down, spec))
    return dz, *(t.hidden.new_empty(0) if x is None or (i and not weight_grads) else torch.empty_like(x)
                 for i, x in enumerate(getattr(t, name) for name in _DOWN_GRADS))


_GATE_UP_GRADS = ("w_gate_up", "b_gate_up")  # experts_backward_gate_up's gradients, after dx_rows


@torch.library.custom_op(
    "moe_compiler::experts_backward_gate_up",
    mutates_args=(),
    schema=schema(ExpertsTensors, ExpertsSpec, "(Tensor, Tensor, Tensor)",
                  leading=("Tensor grad_out", "bool weight_grads", "Tensor dz")),
)
def experts_backward_gate_up(grad_out: Tensor, weight_grads: bool, dz: Tensor, *tensors, **spec) -> tuple[Tensor, ...]:
    """(dx_rows, d_w_gate_up, d_b_gate_up) from experts_backward_down's dz, its last reader; the gradients empty [0]
    without weight_grads or a bias."""
    return _backward_gate_up(grad_out, weight_grads, dz, *tensors, **spec)


def _backward_gate_up(grad_out, weight_grads, dz, *tensors, **spec) -> tuple[Tensor, ...]:
    t, spec, _ = bind(tensors, spec)
    parts = dispatch.experts_backward_gate_up(dz, t.hidden, t.topk_ids, t.topk_weights, t.w_gate_up, t.w_down,
                                              t.b_gate_up, spec, weight_grads)
    return tuple(t.hidden.new_empty(0) if g is None else g for g in parts)


@experts_backward_gate_up.register_fake
def _(grad_out, weight_grads, dz, *tensors, **spec):
    t, _, _ = bind(tensors, spec)
    return dz.new_empty(dz.shape[0], t.hidden.shape[1]), *(
        t.hidden.new_empty(0) if x is None or not weight_grads else torch.empty_like(x)
        for x in (getattr(t, name) for name in _GATE_UP_GRADS))


@torch.library.custom_op(
    "moe_compiler::experts_backward_combine",
    mutates_args=(),
    schema=schema(ExpertsTensors, ExpertsSpec, _GRADS,
                  leading=("Tensor grad_out", "bool weight_grads", "Tensor dx_rows")),
)
def experts_backward_combine(grad_out: Tensor, weight_grads: bool, dx_rows: Tensor, *tensors,
                             **spec) -> tuple[Tensor, ...]:
    """experts_backward's gradients from experts_backward_gate_up's dx_rows, but for the routed weights' and
    biases' and the router weights' (empty [0] here): d hidden, and the shared MLP's."""
    return _backward_combine(grad_out, weight_grads, dx_rows, *tensors, **spec)


def _backward_combine(grad_out, weight_grads, dx_rows, *tensors, **spec) -> tuple[Tensor, ...]:
    t, spec, shared = bind(tensors, spec)
    d_hidden = dispatch.experts_backward_combine(dx_rows, t.hidden, t.topk_ids, t.topk_weights, t.w_gate_up,
                                                 t.w_down, spec)
    return _with_shared(grad_out, t, spec, shared, weight_grads, (d_hidden, None, None, None, None, None, None))


@experts_backward_combine.register_fake
def _(grad_out, weight_grads, dx_rows, *tensors, **spec):
    grads = list(_backward_fake(weight_grads, *tensors, **spec))
    for name in (*_DOWN_GRADS, *_GATE_UP_GRADS):
        grads[ExpertsTensors._fields.index(name)] = grads[0].new_empty(0)
    return tuple(grads)


def _backward_inlinable(grad_out, weight_grads, carried, *tensors, **spec) -> bool:
    """Whether a traced call of one of the split backward's ops runs Triton kernels (and torch ops) that can be
    recorded: static sizes, or a symbolic token count (the forward's rule, _inlinable: the config is the band's)."""
    t = ExpertsTensors(*tensors)
    return _sized(t, grad_out, carried) and dispatch.backward_inlinable(t.hidden, t.topk_ids,
                                                                        make_spec(ExpertsSpec, spec))


# The split backward records its launches too: each of its ops otherwise pays, per call, the op layer, the config
# lookup, its rows' alignment in Python and Triton's binder per launch (about 0.8 ms of host time per training
# step at OLMoE's T = 4096 on an H100, where the GPU then waits: NOTES.md session 43).
for _op, _run in ((experts_backward_down, _backward_down), (experts_backward_gate_up, _backward_gate_up),
                  (experts_backward_combine, _backward_combine)):
    inline.register(_op, _backward_inlinable, _run, backward=True)


def _backward_in_three(grad_out, weight_grads: bool, z, tensors, spec: dict) -> list:
    """experts_backward's gradients from the three ops of the split backward. Each intermediate is dropped once
    passed on (eagerly too: dz before d hidden exists)."""
    dz, *down = torch.ops.moe_compiler.experts_backward_down(grad_out, weight_grads, z, *tensors, **spec)
    dx_rows, *gate_up = torch.ops.moe_compiler.experts_backward_gate_up(grad_out, weight_grads, dz, *tensors, **spec)
    del dz
    grads = list(torch.ops.moe_compiler.experts_backward_combine(grad_out, weight_grads, dx_rows, *tensors, **spec))
    for name, g in zip((*_DOWN_GRADS, *_GATE_UP_GRADS), (*down, *gate_up)):
        grads[ExpertsTensors._fields.index(name)] = g
    return grads


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    """experts' output is out; experts_train's is (out, z), z saved beside the inputs (None for experts)."""
    z = output[1] if isinstance(output, tuple) else None
    if z is not None:
        ctx.mark_non_differentiable(z)
    ctx.save_for_backward(*inputs, z)
    ctx.spec = keyword_only_inputs


def _backward(ctx, grad_out, *_):
    *tensors, z = ctx.saved_tensors
    z = z if z is not None and z.numel() else None  # [0, 2I]: nothing was saved (dispatch.saved_z_shape)
    needs = ctx.needs_input_grad  # positional inputs up to the last one given
    weight_grads = any(i < len(needs) and needs[i] for i in _WEIGHTS)
    grad_out = grad_out.contiguous()
    t = ExpertsTensors(*tensors)
    if z is not None and _sized(t) and dispatch.backward_splits(t.hidden, t.w_gate_up, t.w_down,
                                                                 make_spec(ExpertsSpec, ctx.spec)):
        grads = _backward_in_three(grad_out, weight_grads, z, tensors, ctx.spec)
    else:
        grads = torch.ops.moe_compiler.experts_backward(grad_out, weight_grads, z, *tensors, **ctx.spec)
    # None for the integer ids, absent tensors and the frozen weights (autograd wants no gradient there).
    return tuple(
        None if x is None or not x.is_floating_point() or (i in _WEIGHTS and not weight_grads) else g
        for i, (x, g) in enumerate(zip(tensors, grads))
    )


experts.register_autograd(_backward, setup_context=_setup_context)
experts_train.register_autograd(_backward, setup_context=_setup_context)
SIGNATURES[torch.ops.moe_compiler.experts.default] = (ExpertsTensors, ExpertsSpec)
SIGNATURES[torch.ops.moe_compiler.experts_train.default] = (ExpertsTensors, ExpertsSpec)


def moe_experts(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up=None, b_down=None,
                spec: ExpertsSpec = ExpertsSpec()) -> Tensor:
    """The experts op with a typed spec (Python convenience)."""
    tensors = ExpertsTensors(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down)
    return torch.ops.moe_compiler.experts(*tensors, **spec.op_kwargs())
