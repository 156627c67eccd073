"""Shared experts: the dense MLP every token passes through beside the routed experts, added to their
output. Proven from the fused experts call outward, so the report describes the whole MoE block.

Source forms (transformers 5.17-5.25):

    DeepSeek-V2/V3, Kimi, GLM4-MoE, dots1, Ernie-4.5, Hunyuan, Llama-4 ("plain"):
        out = experts(x, ...) [.view(B, S, H)] + shared_experts(x)           # Llama-4: shared(x).add_(experts)
    Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE ("sigmoid_gated"):
        out = experts(x, ...) + sigmoid(shared_expert_gate(x)) * shared_expert(x)
    Granite-MoE-Shared ("plain", added in the decoder layer, gate and up in one Linear):
        out = experts(x, ...).view(B, S, H) + shared_mlp(x)
    AFMoE (5.25, "plain"): out = shared_experts(x).view(B, S, H) + experts(x, ...).view(B, S, H)

    shared MLP(x) = down(act(gate(x)) * up(x)), gate/up two Linears or halves of one (chunk(2, -1))

Every fact is established from data flow: the MLP reads the same X as the experts (up to views), its
activation is the op Dynamo recorded, its weights are parameters of the right shapes, and the add joins
the routed output (through views only) with the branch in the block's dtype. Then `rewrite` gives the
experts call the shared MLP's weights (its `shared_*` arguments, spec.SharedMLP) and drops the branch: on
the decode path the shared MLP becomes one more (token, expert) pair per token inside the experts kernels,
elsewhere the op runs it as cuBLAS GEMMs as Inductor would. Why (benchmarks/bench_shared.py, NOTES.md
"shared experts"): left to Inductor, a small shared MLP at decode is a handful of launches and ramps. What
cannot be fused (an activation other than the routed experts', per-expert weight parts, a combine in another
dtype) stays with Inductor and the dump says why.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..ops.signature import OpCall
from ..spec import Activation, GateUpLayout
from .fx_utils import (
    VALUE_PRESERVING,
    dims,
    dtype_of,
    example_value,
    fake_call,
    follow,
    node_meta,
    op_call_code,
    op_name,
)
from .gated_activation import GatedActivation, activation_of, clamped_silu, recognize_gated_activation
from .match import Edit, Match, Reject, SharedForm
from .regions import module_stack

SAME_ROWS = {"view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze"}
VIEWS = SAME_ROWS | {"to"}  # between the experts output and the add, a cast is allowed too
ADDS = {"add", "add_", "iadd"}


@dataclasses.dataclass(frozen=True)
class SharedExpertsMatch(Match):
    form: SharedForm
    module: str  # where the MLP lives, e.g. "model.layers.0.mlp.shared_experts"
    gated: GatedActivation  # act(gate) * up, with the clamps' constants where the activation has them
    fused_gate_up: bool  # gate and up are halves of one Linear (Granite) rather than two
    intermediate: int
    gate_up: tuple[fx.Node, ...]  # the weights: (gate, up) or (gate_up,)
    down: fx.Node
    expert_gate: fx.Node | None  # [1, H] weight of sigmoid(gate(x)), sigmoid_gated form only
    add: fx.Node  # routed + shared
    routed: fx.Node  # the add's operand coming from the experts call (through views)
    branch: fx.Node  # the add's other operand: the shared branch's output
    experts_call: fx.Node  # the fused experts call the branch joins

    @property
    def activation(self) -> Activation:
        return self.gated.activation

    @property
    def spec(self) -> str:
        return self.describe()

    def describe(self) -> str:
        gate = "sigmoid(gate(x)) x " if self.form is SharedForm.SIGMOID_GATED else ""
        gu = "one gate_up Linear" if self.fused_gate_up else "gate/up Linears"
        act = self.activation.value + (f"(limit={self.gated.swiglu_limit})" if self.activation.clamped else "")
        return f"{gate}MLP(x) at {self.module}: {act}, {gu}, I={self.intermediate}"

    def call(self) -> OpCall:
        """The experts call with the shared MLP's weights added."""
        gate_proj, up_proj = (self.gate_up[0], None) if self.fused_gate_up else self.gate_up
        return OpCall.of(self.experts_call).with_tensors(
            shared_gate_proj=gate_proj, shared_up_proj=up_proj, shared_down_proj=self.down,
            shared_expert_gate=self.expert_gate,
        )

    def rewrite(self, gm: fx.GraphModule) -> Edit:
        return _rewrite(gm, self)

    def after_code(self, gm: fx.GraphModule) -> str:
        return op_call_code(gm, self.call())


def _module_of(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0].removeprefix("L['self'].") if stack else ""


def _base(node):
    """The tensor a value is a view / cast of (x and x.view(-1, H) are the same rows)."""
    return follow(node, through=SAME_ROWS)


def _linear(node, x_base, what) -> tuple[fx.Node, tuple]:
    """Prove `node` is linear(x, W) without bias, W a parameter, x the block's input (if given); (W, its shape)."""
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
    return w, dims(w)


def _mlp(node: fx.Node, x_base) -> tuple[GatedActivation, bool, int, tuple[fx.Node, ...], fx.Node]:
    """down(act(gate(x)) * up(x)): (the gated activation, gate and up fused, I, gate/up weights, down weight).
    Two Linears may have DeepSeek-V4's clamps between them and the SiLU (gate.clamp(max=L), up.clamp(-L, L)): the
    clamped SiLU."""
    down, (H, I) = _linear(node, None, "down projection")
    a = follow(follow(node).args[0])
    if op_name(a) != "mul" or not all(isinstance(t, fx.Node) for t in a.args):
        raise Reject(f"shared down projection reads `{op_name(a)}`, expected act(gate) * up")
    for act_side, up_side in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
        act = activation_of(follow(act_side))
        if act is None:
            continue
        activation, gate = act
        gated = GatedActivation(activation, GateUpLayout.CONCAT)  # two Linears: gate, then up
        if (clamped := clamped_silu(activation, gate, up_side, frozenset())) is not None:
            gate, up_side, limit = clamped
            gated = GatedActivation(Activation.SILU_CLAMPED, GateUpLayout.CONCAT, swiglu_limit=limit)
        gate_node = follow(gate)
        if op_name(gate_node) == "linear":  # two Linears
            w_gate, g_shape = _linear(gate_node, x_base, "gate projection")
            w_up, u_shape = _linear(up_side, x_base, "up projection")
            if g_shape != (I, H) or u_shape != (I, H):
                raise Reject(f"shared gate/up weights are {g_shape} / {u_shape}, expected ({I}, {H}) for down {H}x{I}")
            return gated, False, I, (w_gate, w_up), down
        if gated.activation.clamped:
            raise Reject(f"shared gate is `{op_name(gate_node)}` under the clamps, expected a Linear")
        # one Linear producing [gate | up]: its halves, proven by the experts' gated-activation recognizer
        src = follow(gate_node, through=VIEWS | {"getitem", "chunk", "split"})
        if op_name(src) != "linear":
            raise Reject(f"shared gate is `{op_name(gate_node)}`, expected a Linear or half of one")
        w_gate_up, gu_shape = _linear(src, x_base, "gate_up projection")
        ga = recognize_gated_activation(a, src)
        if ga.layout is not GateUpLayout.CONCAT or gu_shape != (2 * I, H):
            raise Reject(f"shared gate_up weight {gu_shape} ({ga.layout.value}), expected ({2 * I}, {H}) concat")
        return ga, True, I, (w_gate_up,), down
    raise Reject("shared MLP product has no silu/gelu/relu factor")


def _combine(experts_call: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(the add joining the routed output with another branch, its routed operand, the other operand), or None."""
    out = experts_call
    while len(out.users) == 1:
        user = next(iter(out.users))
        name = op_name(user)
        if name in ADDS or user.target in (operator.add, operator.iadd):
            others = [a for a in user.args[:2] if isinstance(a, fx.Node) and a is not out]
            return (user, out, others[0]) if len(others) == 1 else None
        if name not in VIEWS:
            return None
        out = user
    return None


def recognize_shared_experts(experts_call: fx.Node) -> SharedExpertsMatch | None:
    """The shared-experts branch added to `experts_call`'s output; None if the block has none (the
    add's other operand is not from a module named shared*); Reject if it has one we cannot prove."""
    combined = _combine(experts_call)
    if combined is None:
        return None
    add, routed, found = combined
    # AFMoE: shared(x).view(B, S, H) + routed.view(B, S, H). A reshape keeps the rows' order (it never moves an
    # element in row-major order) and the add's shapes are checked equal before fusing, so the view is the branch.
    other = follow(found, through=VALUE_PRESERVING | SAME_ROWS)
    if "shared" not in _module_of(other) and not any("shared" in _module_of(a) for a in other.all_input_nodes):
        return None  # e.g. the residual add of a block without shared experts
    x_base = _base(OpCall.of(experts_call).tensors.hidden)
    form, mlp_out, expert_gate = SharedForm.PLAIN, other, None
    if op_name(other) == "mul":  # sigmoid(gate(x)) * MLP(x)
        for sig, mlp in ((other.args[0], other.args[1]), (other.args[1], other.args[0])):
            sig = follow(sig) if isinstance(sig, fx.Node) else sig
            if isinstance(sig, fx.Node) and op_name(sig) == "sigmoid":
                expert_gate, g_shape = _linear(sig.args[0], x_base, "expert gate")
                if g_shape is None or g_shape[0] != 1:
                    raise Reject(f"shared expert gate weight is {g_shape}, expected (1, H)")
                form, mlp_out = SharedForm.SIGMOID_GATED, mlp
                break
        else:
            raise Reject("shared branch is a product without a sigmoid(gate(x)) factor")
    gated, fused, I, gate_up, down = _mlp(mlp_out, x_base)
    module = _module_of(follow(mlp_out)).rsplit(".", 1)[0]
    return SharedExpertsMatch(form, module, gated, fused, I, gate_up, down, expert_gate, add, routed, found,
                              experts_call)


def why_not_fused(match: SharedExpertsMatch) -> str | None:
    """The reason the proven branch cannot join the experts call's op (None: it can)."""
    experts_call = match.experts_call
    if experts_call.target not in (torch.ops.moe_compiler.experts.default,
                                   torch.ops.moe_compiler.experts_quantized.default):
        return f"the routed experts run as `{experts_call.target}` (per-expert weight parts): not fused with them yet"
    spec = OpCall.of(experts_call).spec
    if match.activation is not spec.activation:
        return (f"the shared MLP's activation ({match.activation.value}) is not the routed experts' "
                f"({spec.activation.value})")
    if match.activation.clamped:  # the op computes both with the routed spec's constants
        alpha, limit = match.gated.swiglu_alpha, match.gated.swiglu_limit
        if limit != spec.swiglu_limit:
            return f"the shared MLP's clamp limit ({limit}) is not the routed experts' ({spec.swiglu_limit})"
        if spec.activation is Activation.GPT_OSS_SWIGLU and alpha != spec.swiglu_alpha:
            return f"the shared MLP's swiglu alpha ({alpha}) is not the routed experts' ({spec.swiglu_alpha})"
    dtype = dtype_of(experts_call)
    node = match.routed
    while node is not experts_call:  # views, and casts that round-trip exactly (bf16 -> fp32 -> bf16)
        if dtype_of(node) not in (dtype, torch.float32):
            return f"`{node.name}` casts the routed output to {dtype_of(node)} before the add"
        node = node.args[0]
    for n in (match.routed, match.branch, match.add):
        if dtype_of(n) != dtype:
            return f"the routed + shared add runs in {dtype_of(n)} (`{n.name}`), the block in {dtype}"
    shapes = {n.name: tuple(example_value(n).shape) for n in (match.routed, match.add)}
    if len(set(shapes.values())) != 1:
        return f"the add broadcasts ({shapes})"
    if _readers_besides_add(match) is None:
        return f"the shared branch's output `{match.branch.name}` is also read elsewhere"
    return None


def _readers_besides_add(match: SharedExpertsMatch) -> list[fx.Node] | None:
    """Who else reads the branch output: none, or (Llama-4's `out = shared(x); out.add_(routed); return out`)
    readers after an in-place add into it, who see the sum. None if someone else reads the branch alone."""
    others = [u for u in match.branch.users if u is not match.add]
    in_place = op_name(match.add) in ("add_", "iadd") or match.add.target is operator.iadd
    if not others or not (in_place and match.add.args[0] is match.branch):
        return None if others else []
    return others if all(u > match.add for u in others) else None  # fx nodes compare by graph position


def _rewrite(gm: fx.GraphModule, match: SharedExpertsMatch) -> Edit:
    """experts call + shared branch -> one experts call with the shared MLP; the branch's nodes are erased once
    unused (x and the weights keep their other readers)."""
    experts_call = match.experts_call
    call = match.call()
    value = fake_call(call, experts_call)
    readers = _readers_besides_add(match)
    if readers is None:
        raise Reject(f"the shared branch's output `{match.branch.name}` is also read elsewhere")

    def edit() -> fx.Node:
        graph = gm.graph
        with graph.inserting_before(experts_call):
            new = graph.call_function(call.op, (), call.kwargs())
        new.meta = node_meta(experts_call, value)
        experts_call.replace_all_uses_with(new)
        graph.erase_node(experts_call)
        result = new if match.routed is experts_call else match.routed
        for reader in readers:
            reader.replace_input_with(match.branch, result)
        match.add.replace_all_uses_with(result)
        graph.erase_node(match.add)
        # The branch, from its output up: each node left without readers goes.
        todo, erased = [match.branch], set()
        while todo:
            n = todo.pop()
            if n not in erased and not n.users and n.op in ("call_function", "call_method") and not n.is_impure():
                todo.extend(n.all_input_nodes)
                graph.erase_node(n)
                erased.add(n)
        return new

    return edit
