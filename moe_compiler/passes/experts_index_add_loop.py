"""Recognizer for the static expert loop ending in `index_add_` (transformers v4, remote code, hand-written):

    final = torch.zeros(T, H)                                             # the accumulator
    mask = one_hot(topk_ids, num_classes=E).permute(2, 1, 0)             # [E, k, T]   (or (2, 0, 1): [E, T, k])
    for e in range(E):                                                    # Dynamo unrolls it: E copies
        slot, token = torch.where(mask[e])                                # data-dependent size u_e
        y = experts[e](x[None, token].reshape(-1, H)) * topk_weights[token, slot, None]
        final.index_add_(0, token, y.to(final.dtype))
    ... readers of final ...

It traces as one graph only with `torch._dynamo.config.capture_dynamic_output_shape_ops = True`
(`torch.where` has a data-dependent size). Dynamo then guards each u_e with runtime asserts
(`_assert_scalar` on `sym_size(token)`), which would keep every `nonzero` alive after the rewrite (a host
sync, a CUDA-graph split): they belong to the region and are erased with it (DESIGN.md §3).

Facts proven for every iteration (any failure rejects the whole loop, naming the iteration):
  1. `index_add_(0, token, src)` on the accumulator; token is the token half of `torch.where(mask[e])`;
  2. mask = one_hot(topk_ids [T, k], E).permute(p) with the expert axis first: p says which half of
     `where` is the token and which the slot;
  3. src = y * topk_weights[token, slot] (up to casts and a unit dim): the router weight of this pair;
  4. y = down(act(gate(x_e)) * up(x_e)), x_e = hidden[token], each projection a bias-free F.linear whose
     weight is a per-expert 2-D parameter (nn.ModuleList experts: w1/w3/w2, gate_proj/up_proj/down_proj,
     or one fused gate_up Linear split in halves) or the slice [e] of a stacked 3-D parameter;
  5. the iterations cover experts 0..E-1 once each, with one activation and one weight kind;
  6. the accumulator is zeros [T, H], read only after the last index_add_; nothing else the loop
     computes is read outside it.
Per-expert parameters go to `moe_compiler.experts_unstacked` (read in place once re-laid out, see
stacked_weights.py); stacked ones to `moe_compiler.experts`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..ops.signature import ExpertsTensors, OpCall, UnstackedTensors
from ..spec import Activation, ExpertsSpec, GateUpLayout
from .experts_common import RegionMatch
from .fx_utils import (
    CASTS,
    arg,
    backward_slice,
    dims,
    example_value,
    follow,
    in_graph_order,
    is_param,
    op_name,
)
from .gated_activation import (
    recognize_gated_activation,
    recognize_split_gated_activation,
)
from .match import Edit, ExpertsForm, Reject
from .regions import Region, module_stack
from .rewrite import replace_with_call

FORM = ExpertsForm.INDEX_ADD_LOOP

# Symbolic bookkeeping Dynamo emits on the unbacked size of each `where` result.
_SIZE_BOOKKEEPING = {
    "sym_size", "_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
    "ge", "le", "gt", "lt", "eq", "ne", "and_",
}


@dataclasses.dataclass
class LoopCandidate:
    acc: fx.Node  # the zeros accumulator
    adds: list[fx.Node]  # its index_add_ calls, in graph order

    @property
    def name(self) -> str:
        """The loop's module path (the Region convention), or the accumulator's name at the top level."""
        stack = module_stack(self.acc)
        if not stack:
            return f"<expert loop into `{self.acc.name}`>"
        return stack[-1][0].removeprefix("L['self'].").removeprefix("L['self']") or "<root>"

    @property
    def cls(self) -> str:
        stack = module_stack(self.acc)
        return stack[-1][1] if stack else "(compiled module itself)"


@dataclasses.dataclass
class LoopMatch(RegionMatch):
    form: ExpertsForm
    spec: ExpertsSpec
    region: Region  # everything the rewrite removes, graph order (incl. the size asserts), and its inputs
    output: fx.Node  # the accumulator
    shape: dict
    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    w_gate_up: fx.Node | list[fx.Node]  # a stacked [E, 2I, H] parameter, or per-expert parts (P per expert)
    w_down: fx.Node | list[fx.Node]  # a stacked [E, H, I] parameter, or one [H, I] part per expert
    adds: list[fx.Node] = dataclasses.field(default_factory=list)

    @property
    def per_expert(self) -> bool:
        return isinstance(self.w_down, list)

    def call(self) -> OpCall:
        if self.per_expert:
            tensors = UnstackedTensors(self.hidden, self.topk_ids, self.topk_weights, self.w_gate_up, self.w_down)
            return OpCall(torch.ops.moe_compiler.experts_unstacked.default, tensors, self.spec)
        tensors = ExpertsTensors(self.hidden, self.topk_ids, self.topk_weights, self.w_gate_up, self.w_down)
        return OpCall(torch.ops.moe_compiler.experts.default, tensors, self.spec)

    def weight_parts(self) -> list[list[fx.Node]]:
        return [self.w_gate_up, self.w_down] if self.per_expert else []

    def rewrite(self, gm: fx.GraphModule) -> Edit:
        """One op call after the loop replaces the accumulator for its readers; the loop (index_add_ calls,
        `where`s, their size asserts) is erased, every node of it (else a `nonzero` would survive)."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last_add = max(self.adds, key=order.__getitem__)
        readers = [u for u in self.output.users if not self.region.contains(u)]
        return replace_with_call(gm, self.call(), self.output, self.region.nodes, after=last_add, readers=readers,
                                 erase_all=True)


def _is_where_half(node) -> bool:
    return op_name(node) == "getitem" and op_name(node.args[0]) == "where"


def find_index_add_loops(gm: fx.GraphModule) -> list[LoopCandidate]:
    """Every zeros tensor that index_add_ calls scatter into by `torch.where` indices: one candidate expert
    loop each (other scatter-adds, e.g. a GNN's, are not candidates and are not reported)."""
    found = []
    for n in gm.graph.nodes:
        if op_name(n) not in ("zeros", "zeros_like", "new_zeros"):
            continue
        adds = [u for u in n.users if op_name(u) == "index_add_" and u.args[0] is n]
        by_where = [a for a in adds if len(a.args) > 2 and _is_where_half(a.args[2])]
        if by_where:
            found.append(LoopCandidate(n, adds))
    return found


@dataclasses.dataclass
class _Iteration:
    expert: int
    where: fx.Node
    hidden: fx.Node
    weights: fx.Node
    activation: object
    layout: object  # GateUpLayout for a fused gate_up projection, None for separate gate / up
    gate_up: list[fx.Node]  # the projection weights as they enter F.linear: [gate, up] or [gate_up]
    down: fx.Node


def _linear(node: fx.Node, what: str, it: str) -> tuple[fx.Node, fx.Node]:
    """(input rows, weight) of a bias-free F.linear (an nn.Linear without bias)."""
    node = follow(node)
    if op_name(node) != "linear":
        raise Reject(
            f"{it}: the {what} is `{node.name}` ({op_name(node)}), expected F.linear (an nn.Linear expert projection)"
        )
    if arg(node, 2, "bias") is not None:
        raise Reject(f"{it}: the {what} Linear has a bias (per-expert nn.Linear biases are NYI for the fused op)")
    return node.args[0], node.args[1]


def _where_halves(token: fx.Node, it: str) -> tuple[fx.Node, int]:
    """(the torch.where call, which output the token index is)."""
    if op_name(token) != "getitem" or op_name(token.args[0]) != "where" or token.args[1] not in (0, 1):
        raise Reject(f"{it}: the index_add_ index `{token.name}` is not an output of torch.where(mask[e])")
    where = token.args[0]
    if len(where.args) != 1 or where.kwargs:
        raise Reject(f"{it}: `{where.name}` is the 3-argument torch.where (a select), expected torch.where(mask)")
    return where, token.args[1]


def _is_half(node, where: fx.Node, index: int) -> bool:
    """node is where(...)[index] (Dynamo may read one half through several getitem nodes)."""
    return isinstance(node, fx.Node) and op_name(node) == "getitem" and node.args[0] is where and node.args[1] == index


def _mask_source(where: fx.Node, it: str) -> tuple[int, fx.Node, fx.Node, int]:
    """(expert e, the one_hot node, which `where` output is the token) of where(mask[e])."""
    sel = where.args[0]
    if op_name(sel) != "getitem" or not isinstance(sel.args[1], int):
        raise Reject(f"{it}: torch.where reads `{sel.name}` ({op_name(sel)}), expected the mask of one expert, mask[e]")
    perm_node = sel.args[0]
    if op_name(perm_node) != "permute":
        raise Reject(
            f"{it}: the expert mask `{perm_node.name}` is {op_name(perm_node)}, expected one_hot(ids, E).permute(...)"
        )
    as_tuple = len(perm_node.args) == 2 and isinstance(perm_node.args[1], (tuple, list))
    perm = perm_node.args[1] if as_tuple else perm_node.args[1:]
    perm = tuple(p % 3 if isinstance(p, int) else p for p in perm)
    if perm not in ((2, 1, 0), (2, 0, 1)):
        raise Reject(
            f"{it}: the expert mask is one_hot(...).permute{perm}, expected the expert axis first: (2, 1, 0) or (2, 0, "
            "1)"
        )
    one_hot = perm_node.args[0]
    if op_name(one_hot) != "one_hot":
        raise Reject(
            f"{it}: the permuted mask comes from `{one_hot.name}` ({op_name(one_hot)}), expected F.one_hot(topk_ids, E)"
        )
    # mask[e] keeps the one_hot axes perm[1], perm[2] of [T, k]: where's output i indexes axis perm[1 + i].
    token_index = (perm[1], perm[2]).index(0)
    return sel.args[1], one_hot, token_index


def _gathered(rows: fx.Node, where: fx.Node, t: int, it: str) -> fx.Node:
    """hidden from hidden[token] / hidden[None, token].reshape(-1, H), token = where(...)[t]."""
    g = follow(rows, through=CASTS | {"reshape", "view", "squeeze", "unsqueeze"})
    if op_name(g) == "getitem":
        index = g.args[1]
        rest = [i for i in index if i is not None] if isinstance(index, tuple) and len(index) <= 2 else [index]
        if len(rest) == 1 and _is_half(rest[0], where, t):
            return g.args[0]
    raise Reject(f"{it}: the expert input `{rows.name}` is not hidden[token] (the rows routed to this expert)")


def _router_weight(w: fx.Node, where: fx.Node, t: int, it: str) -> fx.Node:
    """topk_weights from topk_weights[token, slot(, None)] (optionally .unsqueeze(-1)); token and slot
    are where(...)[t] and where(...)[1 - t]."""
    g = follow(w, through=CASTS | {"unsqueeze"})
    if op_name(g) == "getitem" and isinstance(g.args[1], tuple):
        index = list(g.args[1])
        if index[-1:] == [None]:
            index = index[:-1]
        if len(index) == 2 and _is_half(index[0], where, t) and _is_half(index[1], where, 1 - t):
            return g.args[0]
    raise Reject(f"{it}: the factor `{w.name}` is not topk_weights[token, slot] of this expert's (token, slot) pairs")


def _weight_source(w: fx.Node, expert: int, it: str) -> tuple[str, fx.Node]:
    """('part', 2-D parameter) or ('stacked', 3-D parameter whose slice [expert] this is)."""
    if is_param(w, 2):
        return "part", w
    if op_name(w) in ("getitem", "select"):
        base = w.args[0]
        if op_name(w) == "getitem":
            index = w.args[1]
        else:
            index = w.args[2] if w.args[1] == 0 else None
        if is_param(base, 3):
            if index != expert:
                raise Reject(
                    f"{it}: the projection reads slice [{index}] of `{base.name}` inside the loop step of expert "
                    f"{expert}"
                )
            return "stacked", base
    raise Reject(
        f"{it}: the projection weight `{w.name}` is neither a 2-D parameter (nn.Linear) nor a slice [e] of a 3-D one"
    )


def _iteration(add: fx.Node, acc: fx.Node) -> tuple[_Iteration, fx.Node]:
    """One unrolled loop step, and the one_hot its mask comes from."""
    it = f"loop step `{add.name}`"
    if len(add.args) < 4 or add.args[0] is not acc or add.args[1] != 0 or add.kwargs:
        raise Reject(f"{it}: expected acc.index_add_(0, token, rows), got {add.format_node()}")
    token, src = add.args[2], add.args[3]
    where, t = _where_halves(token, it)
    expert, one_hot, mask_t = _mask_source(where, it)
    if t != mask_t:
        raise Reject(f"{it}: index_add_ scatters by where's output {t}, but the mask's token axis is output {mask_t}")

    prod = follow(src, through=CASTS)
    if op_name(prod) != "mul" or len(prod.args) != 2 or not all(isinstance(a, fx.Node) for a in prod.args):
        raise Reject(f"{it}: the rows added are `{op_name(prod)}`, expected expert_output * topk_weights[token, slot]")
    last = None
    for y, w in ((prod.args[0], prod.args[1]), (prod.args[1], prod.args[0])):
        try:
            weights = _router_weight(w, where, t, it)
        except Reject as r:
            last = r
            continue
        break
    else:
        raise last

    down_in, down_w = _linear(y, "expert output", it)
    activation, gate_node, up_node = recognize_split_gated_activation(down_in)
    if op_name(gate_node) == "linear" and op_name(up_node) == "linear":  # separate gate and up Linears
        g_rows, g_w = _linear(gate_node, "gate projection", it)
        u_rows, u_w = _linear(up_node, "up projection", it)
        if follow(g_rows) is not follow(u_rows):
            raise Reject(f"{it}: gate and up projections read different rows")
        layout, gate_up = None, [g_w, u_w]
    else:  # one fused gate_up Linear whose output is split in halves
        half_of = gate_node.args[0] if op_name(gate_node) == "getitem" else gate_node  # chunk(...)[0] or h[..., ::2]
        gu_lin = follow(half_of.args[0] if op_name(half_of) in ("chunk", "split") else half_of)
        if op_name(gu_lin) != "linear":
            raise Reject(
                f"{it}: gate `{gate_node.name}` / up `{up_node.name}` are neither two Linears nor halves of one"
            )
        gated = recognize_gated_activation(down_in, gu_lin)  # proves gate and up are its two halves
        if gated.activation is Activation.GPT_OSS_SWIGLU:
            raise Reject(
                f"{it}: GPT-OSS's clamped SwiGLU in a per-expert loop is NYI (its experts are stacked with biases)"
            ) from None
        g_rows, g_w = _linear(gu_lin, "gate_up projection", it)
        activation, layout, gate_up = gated.activation, gated.layout, [g_w]
    hidden = _gathered(g_rows, where, t, it)
    return _Iteration(expert, where, hidden, weights, activation, layout, gate_up, down_w), one_hot


def _size_bookkeeping(start: list[fx.Node]) -> set[fx.Node]:
    """The sym_size / comparison / _assert_scalar nodes hanging off `start` (Dynamo's unbacked-size asserts)."""
    found, todo = set(), list(start)
    while todo:
        n = todo.pop()
        for u in n.users:
            if (
                u not in found and op_name(u).removeprefix("aten::") in _SIZE_BOOKKEEPING
                and not isinstance(example_value(u), torch.Tensor)
            ):
                found.add(u)
                todo.append(u)
    return found


def _tensor_like(n: fx.Node) -> bool:
    ev = example_value(n)
    return (
        isinstance(ev, torch.Tensor)
        or (isinstance(ev, (tuple, list)) and ev and all(isinstance(v, torch.Tensor) for v in ev))
    )


def _loop_nodes(candidate: LoopCandidate, stop: set[fx.Node], wheres: list[fx.Node]) -> set[fx.Node]:
    """The accumulator, everything the index_add_ calls compute from `stop` on, and the size asserts (symbolic
    sizes computed outside the loop stay where they are)."""
    inside = {candidate.acc} | backward_slice(candidate.adds, stop=stop | {candidate.acc}, keep=_tensor_like)
    halves = {u for w in wheres for u in w.users if op_name(u) == "getitem"}  # incl. the ones read by asserts only
    return inside | halves | _size_bookkeeping(list(halves))


def recognize(candidate: LoopCandidate) -> LoopMatch:
    acc, adds = candidate.acc, candidate.adds
    steps = []
    one_hots = set()
    for add in adds:
        step, one_hot = _iteration(add, acc)
        steps.append(step)
        one_hots.add(one_hot)
    if len(one_hots) != 1:
        raise Reject(f"the loop steps read {len(one_hots)} different expert masks, expected one one_hot(topk_ids, E)")
    one_hot = one_hots.pop()
    E = arg(one_hot, 1, "num_classes")
    if not isinstance(E, int) or E <= 0:
        raise Reject(f"one_hot's num_classes is {E!r}, expected the number of experts as a constant")
    experts = sorted(s.expert for s in steps)
    if experts != list(range(E)):
        missing = sorted(set(range(E)) - set(experts))
        raise Reject(
            f"the loop covers experts {experts[:8]}{'...' if len(experts) > 8 else ''} of E={E} (missing "
            f"{missing[:8]}, or repeated): every expert must run exactly once"
        )
    steps.sort(key=lambda s: s.expert)

    topk_ids = follow(one_hot.args[0], through=CASTS)
    hiddens = {s.hidden for s in steps}
    weight_nodes = {s.weights for s in steps}
    if len(hiddens) != 1 or len(weight_nodes) != 1:
        raise Reject(
            "the loop steps gather rows from different hidden tensors or weights from different router outputs"
        )
    hidden, topk_weights = hiddens.pop(), weight_nodes.pop()
    kinds = {(s.activation, s.layout, len(s.gate_up)) for s in steps}
    if len(kinds) != 1:
        raise Reject(f"the experts differ in activation or gate/up structure: {sorted(map(str, kinds))}")
    activation, layout, per = kinds.pop()

    if len(dims(hidden) or ()) != 2:
        raise Reject(f"the expert rows come from `{hidden.name}` {dims(hidden)}, expected a 2-D [T, H] tensor")
    T, H = dims(hidden)
    if (
        dims(topk_ids) is None or len(dims(topk_ids)) != 2 or dims(topk_ids)[0] != T
        or dims(topk_weights) != dims(topk_ids)
    ):
        raise Reject(f"topk_ids {dims(topk_ids)} / topk_weights {dims(topk_weights)}, expected both [T={T}, k]")
    if dims(acc) != (T, H):
        raise Reject(f"the accumulator is {dims(acc)}, expected zeros [T={T}, H={H}]")
    order = {n: i for i, n in enumerate(acc.graph.nodes)}
    last_add = max(adds, key=order.__getitem__)
    for u in acc.users:
        if u not in adds and order[u] < order[last_add]:
            raise Reject(f"`{u.name}` reads the accumulator before the last index_add_ (a partial sum)")
    for a in adds:
        if a.users:
            raise Reject(f"the result of `{a.name}` is used; expected the accumulator to be read directly")

    sources = [[_weight_source(w, s.expert, f"expert {s.expert}") for w in (*s.gate_up, s.down)] for s in steps]
    kinds = {kind for src in sources for kind, _ in src}
    if len(kinds) != 1:
        raise Reject("some projections read per-expert parameters and others slices of stacked ones")
    kind = kinds.pop()
    if kind == "part":
        w_gate_up = [w for src in sources for _, w in src[:-1]]
        w_down = [src[-1][1] for src in sources]
        if len(set(w_gate_up + w_down)) != len(w_gate_up) + len(w_down):
            raise Reject("a weight parameter is shared between experts or projections (each expert needs its own)")
        if layout is not None and layout is not GateUpLayout.CONCAT:
            raise Reject("a fused per-expert gate_up Linear split interleaved is NYI (expected chunk(2, -1))")
        I = dims(w_down[0])[1]
    else:
        bases = [{w for _, w in (src[i] for src in sources)} for i in range(per + 1)]
        if any(len(b) != 1 for b in bases):
            raise Reject("the loop steps slice different stacked parameters for one projection")
        if per != 1:
            raise Reject("gate and up are slices of two stacked parameters: the op needs them as one [E, 2I, H] tensor "
                         "(store gate and up in one Parameter and chunk the projection, or use nn.Linear experts)")
        w_gate_up, w_down = bases[0].pop(), bases[1].pop()
        I = dims(w_down)[2]
        if dims(w_gate_up)[0] != E or dims(w_down)[0] != E:
            raise Reject(f"stacked weights {dims(w_gate_up)} / {dims(w_down)} do not have E={E} experts")
    spec = ExpertsSpec(activation, layout or GateUpLayout.CONCAT, False)

    wheres = [s.where for s in steps]
    stop = {hidden, topk_ids, topk_weights}
    inside = _loop_nodes(candidate, stop, wheres)
    for n in inside:
        if n is acc:
            continue
        outside = [u for u in n.users if u not in inside]
        if outside:
            raise Reject(
                f"`{n.name}` ({op_name(n)}), computed inside the expert loop, is also read by `{outside[0].name}` "
                "outside it"
            )
    nodes, inputs = in_graph_order(inside, acc.graph)
    region = Region(candidate.name, candidate.cls, nodes, inputs, [acc])
    shape = {"T": T, "H": H, "E": E, "I": I, "k": dims(topk_ids)[1]}
    return LoopMatch(FORM, spec, region, acc, shape, hidden, topk_ids, topk_weights, w_gate_up, w_down, list(adds))
