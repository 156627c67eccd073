"""The `moe_compiler` operators: `torch.ops.moe_compiler.experts` and its backward.

One signature each, the fake (meta) implementation beside the real one, autograd through a backward
that is itself an op (so AOTAutograd and Inductor keep both opaque and the profiler shows
`moe_compiler::experts` / `moe_compiler::experts_backward`).

    experts(hidden[T,H], topk_ids[T,k], topk_weights[T,k], w_gate_up, w_down, b_gate_up?, b_down?,
            activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input) -> out[T,H]
    experts_unstacked(...)  the same on per-expert weight parts (nn.ModuleList experts)
    experts_shared(...)     experts + the block's shared experts (shared_mlp.py)

The math and weight layouts are in spec.py; the data contract and implementation in
lowering/composite.py. Weights are the model's own parameters, read in place on every call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import lowering, shared_mlp, stacked_weights
from .lowering import composite
from .shared_mlp import SharedMLP
from .spec import ExpertsSpec

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)


def _fail(what: str, expected: str, got, fix: str):
    raise ValueError(f"moe_compiler.experts: {what}: expected {expected}, got {got}. {fix}")


def check_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec):
    """Shape, dtype and device checks: symbolic-size friendly, so the fake runs them at compile time."""
    if hidden.dim() != 2:
        _fail("hidden rank", "a 2-D [T, H] tensor", f"shape {tuple(hidden.shape)}", "Flatten batch and sequence first.")
    if hidden.dtype not in _FLOATS:
        _fail("hidden dtype", "float32, bfloat16 or float16", hidden.dtype, "Cast the activations.")
    if topk_ids.dim() != 2 or topk_ids.dtype not in _INTS:
        _fail("topk_ids", "a 2-D [T, k] int32/int64 tensor", f"{tuple(topk_ids.shape)} {topk_ids.dtype}", "Pass the router's top-k indices.")
    if topk_weights.dim() != 2 or topk_weights.dtype not in _FLOATS:
        _fail("topk_weights", "a 2-D [T, k] float tensor", f"{tuple(topk_weights.shape)} {topk_weights.dtype}", "Pass the router's top-k weights.")
    T, H = hidden.shape
    if topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        _fail("routing shapes", f"topk_ids and topk_weights of shape [T={T}, k]", f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}", "Route the same tokens that are passed as hidden.")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dim() != 3:
            _fail(f"{name} rank", "a 3-D [E, out, in] tensor", f"shape {tuple(w.shape)}", "Stack the experts' weights along dim 0.")
        if w.dtype != hidden.dtype:
            _fail(f"{name} dtype", f"hidden's dtype {hidden.dtype}", w.dtype, "Cast the activations or the model to one dtype.")
    E = w_gate_up.shape[0]
    if spec.transposed:
        two_i, I = w_gate_up.shape[2], w_down.shape[1]
        want_gu, want_down = "[E, H, 2I]", "[E, I, H]"
        ok = w_gate_up.shape[1] == H and w_down.shape[2] == H
    else:
        two_i, I = w_gate_up.shape[1], w_down.shape[2]
        want_gu, want_down = "[E, 2I, H]", "[E, H, I]"
        ok = w_gate_up.shape[2] == H and w_down.shape[1] == H
    if not ok or w_down.shape[0] != E or two_i != 2 * I:
        _fail("weight shapes", f"w_gate_up {want_gu} and w_down {want_down} with H={H}", f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}", "Check the weight layout (spec.transposed) and the hidden size.")
    if topk_ids.shape[1] > E:
        _fail("top-k", f"k <= E={E}", topk_ids.shape[1], "Each token picks distinct experts.")
    for name, b, size in (("b_gate_up", b_gate_up, 2 * I), ("b_down", b_down, H)):
        if b is not None and (b.dim() != 2 or b.shape[0] != E or b.shape[1] != size):
            _fail(f"{name} shape", f"[E={E}, {size}]", tuple(b.shape), "Pass one bias row per expert, or None.")
    devices = {t.device for t in (hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down) if t is not None}
    if len(devices) > 1:
        _fail("devices", "all tensors on one device", sorted(map(str, devices)), "Move the model and inputs to one device.")


def _check_ids_in_range(topk_ids: Tensor, num_experts: int):
    if topk_ids.numel() == 0:
        return
    if topk_ids.device.type == "cpu":
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            _fail("topk_ids values", f"expert ids in [0, {num_experts})", f"min {lo}, max {hi}", "Check the router's top-k.")
    else:
        # No host sync on the GPU (the op must stay capture-safe): a device-side assert instead of garbage.
        torch._assert_async(((topk_ids >= 0) & (topk_ids < num_experts)).all(), "moe_compiler.experts: topk_ids out of [0, E)")


@torch.library.custom_op("moe_compiler::experts", mutates_args=())
def experts(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    gate_up: str,
    transposed: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    scale_input: bool = False,
) -> Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t]); see spec.py for the expert MLP
    (and scale_input, where the weight scales the expert's input instead)."""
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    return _forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)


def _forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec, mlp=None) -> Tensor:
    """The experts forward, plus the block's shared MLP when `mlp` (a checked shared_mlp.SharedMLP) is given."""
    check_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    if not lowering.uses_triton(hidden):
        _check_ids_in_range(topk_ids, w_gate_up.shape[0])  # the Triton kernels check ids themselves
    if mlp is not None:
        return lowering.experts_shared_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, mlp, spec)
    return lowering.experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)


@experts.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input=False):
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    check_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("moe_compiler::experts_backward", mutates_args=())
def experts_backward(
    grad_out: Tensor,
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    gate_up: str,
    transposed: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    scale_input: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `experts` w.r.t. (hidden, topk_weights, w_gate_up, w_down, b_gate_up, b_down).

    An absent bias gets an empty [0] gradient (op outputs cannot be None)."""
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    impl = lowering.select(hidden, w_gate_up, w_down)
    grads = composite.experts_backward(impl, grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@experts_backward.register_fake
def _(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, *spec_args):
    bias_grad = lambda b: hidden.new_empty(0) if b is None else torch.empty_like(b)  # noqa: E731
    return (
        torch.empty_like(hidden),
        torch.empty_like(topk_weights),
        torch.empty_like(w_gate_up),
        torch.empty_like(w_down),
        bias_grad(b_gate_up),
        bias_grad(b_down),
    )


def _setup_context(ctx, inputs, output):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, *spec_args = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down)
    ctx.spec_args = spec_args


def _backward(ctx, grad_out):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down = ctx.saved_tensors
    d_hidden, d_weights, d_gu, d_down, d_bgu, d_bdown = torch.ops.moe_compiler.experts_backward(
        grad_out.contiguous(), hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, *ctx.spec_args
    )
    return (
        d_hidden,
        None,  # topk_ids: integer
        d_weights,
        d_gu,
        d_down,
        d_bgu if b_gate_up is not None else None,
        d_bdown if b_down is not None else None,
        *(None,) * len(ctx.spec_args),  # spec arguments
    )


experts.register_autograd(_backward, setup_context=_setup_context)


def moe_experts(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up=None, b_down=None, spec: ExpertsSpec = ExpertsSpec()):
    """Python convenience wrapper: the op with a typed spec."""
    return torch.ops.moe_compiler.experts(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, *spec.op_args())


# --- experts held one module per expert ------------------------------------------------------------
#
#     experts_unstacked(hidden, topk_ids, topk_weights, w_gate_up: [Tensor], w_down: [Tensor], <spec args>)
#
# The same function as `experts` for weights kept as per-expert parameters (nn.ModuleList of nn.Linear,
# [out, in] each): w_gate_up lists P parts per expert in expert order (P = 2: gate_e, up_e; P = 1: one
# fused gate_up_e), w_down one [H, I] part per expert. The op reads them in place as one stacked tensor
# when they tile one storage (stacked_weights.py: the backend re-lays them out once so they do), else
# concatenates them for the call. No biases, [out, in] layout only (what nn.Linear experts have).

def _unstacked_geometry(w_gate_up: list[Tensor], w_down: list[Tensor], spec: ExpertsSpec) -> tuple[int, int]:
    """(E, P) after checking the parts; raises with expected vs got."""
    E = len(w_down)
    if E == 0 or len(w_gate_up) not in (E, 2 * E):
        _fail("weight parts", "E down parts and E or 2E gate_up parts (gate_e, up_e per expert)", f"{len(w_gate_up)} gate_up and {E} down parts", "Pass every expert's Linear weights, in expert order.")
    if spec.transposed or spec.scale_input:
        _fail("spec", "transposed=False and scale_input=False for per-expert nn.Linear weights", f"transposed={spec.transposed}, scale_input={spec.scale_input}", "Use torch.ops.moe_compiler.experts for stacked weights.")
    P = len(w_gate_up) // E
    for name, parts in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        first = parts[0].shape
        if len(first) != 2 or any(p.shape != first for p in parts):
            _fail(f"{name} parts", "2-D [out, in] tensors of one shape", [tuple(p.shape) for p in parts], "Every expert must have the same sizes.")
    rows, H = w_gate_up[0].shape
    if P == 1 and rows % 2:
        _fail("gate_up part rows", "an even number (gate rows then up rows)", rows, "Pass gate and up as separate parts.")
    if tuple(w_down[0].shape) != (H, rows * P // 2):
        _fail("w_down part shape", f"[H={H}, I={rows * P // 2}]", tuple(w_down[0].shape), "Check which Linear is the down projection.")
    return E, P


def _stacked_weights(w_gate_up, w_down, spec):
    E, _ = _unstacked_geometry(w_gate_up, w_down, spec)
    return stacked_weights.stacked(w_gate_up, E), stacked_weights.stacked(w_down, E)


@torch.library.custom_op("moe_compiler::experts_unstacked", mutates_args=())
def experts_unstacked(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: list[Tensor],
    w_down: list[Tensor],
    activation: str,
    gate_up: str,
    transposed: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    scale_input: bool,  # no default: a defaulted trailing argument trips torch's tensor-list autograd (2.13)
) -> Tensor:
    """`experts` on per-expert weight parts (see the comment above)."""
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    gu, down = _stacked_weights(w_gate_up, w_down, spec)
    return _forward(hidden, topk_ids, topk_weights, gu, down, None, None, spec)


@experts_unstacked.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input):
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    E, P = _unstacked_geometry(w_gate_up, w_down, spec)
    rows, H = w_gate_up[0].shape
    like_gu = w_gate_up[0].new_empty((E, P * rows, H))
    like_down = w_down[0].new_empty((E, *w_down[0].shape))
    check_inputs(hidden, topk_ids, topk_weights, like_gu, like_down, None, None, spec)
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("moe_compiler::experts_unstacked_backward", mutates_args=())
def experts_unstacked_backward(
    grad_out: Tensor,
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: list[Tensor],
    w_down: list[Tensor],
    activation: str,
    gate_up: str,
    transposed: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    scale_input: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (hidden, topk_weights, stacked gate_up [E, 2I, H], stacked down [E, H, I]); the
    autograd formula hands each part its slice."""
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    gu, down = _stacked_weights(w_gate_up, w_down, spec)
    check_inputs(hidden, topk_ids, topk_weights, gu, down, None, None, spec)
    impl = lowering.select(hidden, gu, down)
    d_hidden, d_weights, d_gu, d_down, _, _ = composite.experts_backward(impl, grad_out, hidden, topk_ids, topk_weights, gu, down, None, None, spec)
    return d_hidden, d_weights, d_gu, d_down


@experts_unstacked_backward.register_fake
def _(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, *spec_args):
    E = len(w_down)
    rows, H = w_gate_up[0].shape
    P = len(w_gate_up) // E
    return (
        torch.empty_like(hidden),
        torch.empty_like(topk_weights),
        w_gate_up[0].new_empty((E, P * rows, H)),
        w_down[0].new_empty((E, *w_down[0].shape)),
    )


def _setup_unstacked(ctx, inputs, output):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, *spec_args = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, *w_gate_up, *w_down)
    ctx.num_parts = (len(w_gate_up), len(w_down))
    ctx.spec_args = spec_args


def _backward_unstacked(ctx, grad_out):
    hidden, topk_ids, topk_weights, *parts = ctx.saved_tensors
    n_gu, n_down = ctx.num_parts
    w_gate_up, w_down = parts[:n_gu], parts[n_gu:]
    d_hidden, d_weights, d_gu, d_down = torch.ops.moe_compiler.experts_unstacked_backward(
        grad_out.contiguous(), hidden, topk_ids, topk_weights, w_gate_up, w_down, *ctx.spec_args
    )
    rows, H = w_gate_up[0].shape
    return (
        d_hidden,
        None,  # topk_ids: integer
        d_weights,
        list(d_gu.reshape(n_gu, rows, H).unbind(0)),  # part i of expert e is rows [i*rows, (i+1)*rows) of d_gu[e]
        list(d_down.unbind(0)),
        *(None,) * len(ctx.spec_args),
    )


experts_unstacked.register_autograd(_backward_unstacked, setup_context=_setup_unstacked)


# --- routed experts plus the block's shared experts ---------------------------------------------------
#
#     experts_shared(<experts' tensors>, shared_gate_up: [Tensor], shared_down, shared_gate?, <spec args>)
#
# out = experts(...) + s * MLP_shared(hidden), see shared_mlp.py: shared_gate_up is [gate [Is, H], up [Is, H]]
# or [gate_up [2Is, H]], shared_down [H, Is], shared_gate [1, H] (s = sigmoid(hidden @ shared_gate^T)) or
# None (s = 1). The block's own nn.Linear parameters, read in place. On the decode path the shared MLP runs
# in the experts kernels as one more (token, expert) pair per token; otherwise as cuBLAS GEMMs in the op.

def check_shared_inputs(hidden, shared_gate_up: list[Tensor], shared_down: Tensor, shared_gate: Optional[Tensor]) -> None:
    """The shared weights' shapes, dtypes and devices against hidden [T, H]; raises with expected vs got."""
    H = hidden.shape[1]
    if len(shared_gate_up) not in (1, 2):
        _fail("shared_gate_up", "[gate, up] or [gate_up]", f"{len(shared_gate_up)} tensors", "Pass the shared MLP's gate and up Linear weights.")
    if shared_down.dim() != 2 or shared_down.shape[0] != H:
        _fail("shared_down shape", f"[H={H}, Is]", tuple(shared_down.shape), "Pass the shared MLP's down Linear weight ([out, in]).")
    Is = shared_down.shape[1]
    want = [(Is, H)] * 2 if len(shared_gate_up) == 2 else [(2 * Is, H)]
    got = [tuple(w.shape) for w in shared_gate_up]
    if got != want:
        _fail("shared gate/up shapes", str(want), got, "Gate and up are [Is, H] Linear weights (or one [2Is, H]), down is [H, Is].")
    if shared_gate is not None and tuple(shared_gate.shape) != (1, H):
        _fail("shared_gate shape", f"(1, {H})", tuple(shared_gate.shape), "Pass the shared expert gate Linear's weight, or None.")
    for w in (*shared_gate_up, shared_down, *(() if shared_gate is None else (shared_gate,))):
        if w.dtype != hidden.dtype:
            _fail("shared weight dtype", f"hidden's dtype {hidden.dtype}", w.dtype, "Cast the activations or the model to one dtype.")
        if w.device != hidden.device:
            _fail("devices", "all tensors on one device", sorted({str(w.device), str(hidden.device)}), "Move the model and inputs to one device.")


@torch.library.custom_op("moe_compiler::experts_shared", mutates_args=())
def experts_shared(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Optional[Tensor],
    b_down: Optional[Tensor],
    shared_gate_up: list[Tensor],
    shared_down: Tensor,
    shared_gate: Optional[Tensor],
    activation: str,
    gate_up: str,
    transposed: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    scale_input: bool,  # no default (see experts_unstacked)
) -> Tensor:
    """experts(...) + [sigmoid(hidden @ shared_gate^T)] * shared MLP(hidden) (see the comment above)."""
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    check_shared_inputs(hidden, shared_gate_up, shared_down, shared_gate)
    mlp = SharedMLP.from_parts(shared_gate_up, shared_down, shared_gate)
    return _forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, mlp)


@experts_shared.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, shared_gate_up, shared_down, shared_gate, *spec_args):
    spec = ExpertsSpec.from_op_args(*spec_args)
    check_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    check_shared_inputs(hidden, shared_gate_up, shared_down, shared_gate)
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("moe_compiler::experts_shared_backward", mutates_args=())
def experts_shared_backward(
    grad_out: Tensor,
    hidden: Tensor,
    shared_gate_up: list[Tensor],
    shared_down: Tensor,
    shared_gate: Optional[Tensor],
    activation: str,
    gate_up: str,
    transposed: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    scale_input: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the shared term w.r.t. (hidden, shared gate_up as one [2Is, H] (gate rows, then up),
    shared_down, shared_gate ([0] without one)); the routed term's come from experts_backward."""
    spec = ExpertsSpec.from_op_args(activation, gate_up, transposed, swiglu_alpha, swiglu_limit, scale_input)
    mlp = SharedMLP.from_parts(shared_gate_up, shared_down, shared_gate)
    d_x, d_gate, d_up, d_down, d_expert_gate = shared_mlp.backward(grad_out, hidden, mlp, spec)
    return (
        d_x.to(hidden.dtype),
        torch.cat([d_gate, d_up]).to(shared_down.dtype),
        d_down.to(shared_down.dtype),
        hidden.new_empty(0) if d_expert_gate is None else d_expert_gate,
    )


@experts_shared_backward.register_fake
def _(grad_out, hidden, shared_gate_up, shared_down, shared_gate, *spec_args):
    Is = shared_down.shape[1]
    return (
        torch.empty_like(hidden),
        shared_down.new_empty((2 * Is, hidden.shape[1])),
        torch.empty_like(shared_down),
        hidden.new_empty(0) if shared_gate is None else torch.empty_like(shared_gate),
    )


def _setup_shared(ctx, inputs, output):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, shared_gate_up, shared_down, shared_gate, *spec_args = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, shared_down, shared_gate, *shared_gate_up)
    ctx.spec_args = spec_args


def _backward_shared(ctx, grad_out):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, shared_down, shared_gate, *shared_gate_up = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    d_hidden, d_weights, d_gu, d_down, d_bgu, d_bdown = torch.ops.moe_compiler.experts_backward(
        grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, *ctx.spec_args
    )
    d_x, d_sgu, d_sdown, d_sgate = torch.ops.moe_compiler.experts_shared_backward(
        grad_out, hidden, shared_gate_up, shared_down, shared_gate, *ctx.spec_args
    )
    return (
        d_hidden + d_x,
        None,  # topk_ids: integer
        d_weights,
        d_gu,
        d_down,
        d_bgu if b_gate_up is not None else None,
        d_bdown if b_down is not None else None,
        list(d_sgu.chunk(len(shared_gate_up))),  # [gate, up] halves, or the whole fused weight
        d_sdown,
        d_sgate if shared_gate is not None else None,
        *(None,) * len(ctx.spec_args),
    )


experts_shared.register_autograd(_backward_shared, setup_context=_setup_shared)
