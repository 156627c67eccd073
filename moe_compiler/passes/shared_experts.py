"""Shared experts: the dense MLP every token passes through beside the routed experts, added to their
output. Proven from the fused experts call outward, so the report describes the whole MoE block.

Source forms (transformers 5.17-5.23):

    DeepSeek-V2/V3, Kimi, GLM4-MoE, dots1, Ernie-4.5, Hunyuan, Llama-4 ("plain"):
        out = experts(x, ...) [.view(B, S, H)] + shared_experts(x)           # Llama-4: shared(x).add_(experts)
    Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE ("sigmoid_gated"):
        out = experts(x, ...) + sigmoid(shared_expert_gate(x)) * shared_expert(x)
    Granite-MoE-Shared ("plain", added in the decoder layer, gate and up in one Linear):
        out = experts(x, ...).view(B, S, H) + shared_mlp(x)

    shared MLP(x) = down(act(gate(x)) * up(x)), gate/up two Linears or halves of one (chunk(2, -1))

Every fact is established from data flow: the MLP reads the same X as the experts (up to views), its
activation is the op Dynamo recorded, its weights are parameters of the right shapes. Nothing is
rewritten here: Inductor computes the shared MLP (cuBLAS GEMMs + fused pointwise), and the match is
reported (dump, log, counters) so the whole block is accounted for; a shared branch that is not proven
says why. Measured on the H100 (benchmarks/bench_shared.py, NOTES.md "shared experts"): computing it in
the experts pass would save at most 0.2-5% of the block for DeepSeek-V3/Kimi and Llama-4 at every T,
but up to 15-17% at T=1 for the Qwen-style gated ones (Qwen3-Next: 24 us of launches for a 2 us MLP;
2-6% from T=16 on): that fusion is the open part of the issue.
"""

from __future__ import annotations

import dataclasses
import operator

import torch.fx as fx

from ..spec import Activation, GateUpLayout
from .gated_activation import _activation, recognize_gated_activation
from .regions import dims, follow, op_name
from .reject import Reject

SAME_ROWS = {"view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze"}
VIEWS = SAME_ROWS | {"to"}  # between the experts output and the add, a cast is allowed too
ADDS = {"add", "add_", "iadd"}


@dataclasses.dataclass(frozen=True)
class SharedExpertsMatch:
    form: str  # "plain" | "sigmoid_gated"
    module: str  # where the MLP lives, e.g. "model.layers.0.mlp.shared_experts"
    activation: Activation
    fused_gate_up: bool  # gate and up are halves of one Linear (Granite) rather than two
    intermediate: int

    def describe(self) -> str:
        gate = "sigmoid(gate(x)) x " if self.form == "sigmoid_gated" else ""
        gu = "one gate_up Linear" if self.fused_gate_up else "gate/up Linears"
        return f"{gate}MLP(x) at {self.module}: {self.activation.value}, {gu}, I={self.intermediate}"


def _module_of(node: fx.Node) -> str:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0].removeprefix("L['self'].") if stack else ""


def _base(node):
    """The tensor a value is a view / cast of (x and x.view(-1, H) are the same rows)."""
    return follow(node, through=SAME_ROWS)


def _linear(node, x_base, what) -> tuple:
    """Prove `node` is linear(x, W) without bias, W a parameter, x the block's input (if given); W's shape."""
    node = follow(node)
    if op_name(node) != "linear":
        raise Reject(f"shared {what} is `{op_name(node)}`, expected a Linear")
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None:
        raise Reject(f"shared {what} Linear has a bias (not a form we know)")
    if x_base is not None and _base(x) is not x_base:
        raise Reject(f"shared {what} reads `{x.name}`, not the experts' input")
    if not isinstance(w, fx.Node) or w.op not in ("placeholder", "get_attr"):
        raise Reject(f"shared {what} weight is computed in the graph, expected a parameter")
    return dims(w)


def _mlp(node: fx.Node, x_base) -> tuple[Activation, bool, int]:
    """down(act(gate(x)) * up(x)): (activation, gate and up fused, I)."""
    H, I = _linear(node, None, "down projection")
    a = follow(follow(node).args[0])
    if op_name(a) != "mul" or not all(isinstance(t, fx.Node) for t in a.args):
        raise Reject(f"shared down projection reads `{op_name(a)}`, expected act(gate) * up")
    for act_side, up_side in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
        act = _activation(follow(act_side))
        if act is None:
            continue
        activation, gate = act
        gate_node = follow(gate)
        if op_name(gate_node) == "linear":  # two Linears
            g_shape = _linear(gate_node, x_base, "gate projection")
            u_shape = _linear(up_side, x_base, "up projection")
            if g_shape != (I, H) or u_shape != (I, H):
                raise Reject(f"shared gate/up weights are {g_shape} / {u_shape}, expected ({I}, {H}) for down {H}x{I}")
            return activation, False, I
        # one Linear producing [gate | up]: its halves, proven by the experts' gated-activation recognizer
        src = follow(gate_node, through=VIEWS | {"getitem", "chunk", "split"})
        if op_name(src) != "linear":
            raise Reject(f"shared gate is `{op_name(gate_node)}`, expected a Linear or half of one")
        gu_shape = _linear(src, x_base, "gate_up projection")
        ga = recognize_gated_activation(a, src)
        if ga.layout is not GateUpLayout.CONCAT or gu_shape != (2 * I, H):
            raise Reject(f"shared gate_up weight {gu_shape} ({ga.layout.value}), expected ({2 * I}, {H}) concat")
        return ga.activation, True, I
    raise Reject("shared MLP product has no silu/gelu/relu factor")


def _combine(experts_call: fx.Node) -> fx.Node | None:
    """The other operand of the add joining the routed output with another branch, or None."""
    out = experts_call
    while len(out.users) == 1:
        user = next(iter(out.users))
        name = op_name(user)
        if name in ADDS or user.target in (operator.add, operator.iadd):
            others = [a for a in user.args[:2] if isinstance(a, fx.Node) and a is not out]
            return others[0] if len(others) == 1 else None
        if name not in VIEWS:
            return None
        out = user
    return None


def recognize_shared_experts(experts_call: fx.Node) -> SharedExpertsMatch | None:
    """The shared-experts branch added to `experts_call`'s output; None if the block has none (the
    add's other operand is not from a module named shared*); Reject if it has one we cannot prove."""
    found = _combine(experts_call)
    if found is None:
        return None
    other = follow(found)
    if "shared" not in _module_of(other) and not any("shared" in _module_of(a) for a in other.all_input_nodes):
        return None  # e.g. the residual add of a block without shared experts
    x_base = _base(experts_call.args[0])
    form, mlp_out = "plain", other
    if op_name(other) == "mul":  # sigmoid(gate(x)) * MLP(x)
        for sig, mlp in ((other.args[0], other.args[1]), (other.args[1], other.args[0])):
            sig = follow(sig) if isinstance(sig, fx.Node) else sig
            if isinstance(sig, fx.Node) and op_name(sig) == "sigmoid":
                g_shape = _linear(sig.args[0], x_base, "expert gate")
                if g_shape is None or g_shape[0] != 1:
                    raise Reject(f"shared expert gate weight is {g_shape}, expected (1, H)")
                form, mlp_out = "sigmoid_gated", mlp
                break
        else:
            raise Reject("shared branch is a product without a sigmoid(gate(x)) factor")
    activation, fused, I = _mlp(mlp_out, x_base)
    return SharedExpertsMatch(form, _module_of(follow(mlp_out)).rsplit(".", 1)[0], activation, fused, I)
