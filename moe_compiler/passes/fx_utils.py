"""FX helpers shared by every recognizer and rewrite: naming what a node calls, walking data flow, building
standalone subgraphs, and writing new op calls with correct metadata.

Data flow is walked in one way only (`backward_slice`): the recognizers differ in where a walk stops and
which inputs it follows, not in how it walks.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from ..ops.signature import OpCall

GRAPH_INPUTS = ("placeholder", "get_attr")


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def dtype_of(node):
    """The dtype of a node's tensor value (None: not a node, or not a tensor)."""
    value = example_value(node) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def is_tensor_node(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(example_value(node), torch.Tensor)


def dims(node) -> tuple | None:
    """The shape of a tensor node's example value (None for non-tensors)."""
    ev = example_value(node) if isinstance(node, fx.Node) else None
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else None


def is_param(node, rank: int | None = None) -> bool:
    """A graph input (a parameter or buffer the compiled graph receives), of `rank` dims if given."""
    return isinstance(node, fx.Node) and node.op in GRAPH_INPUTS and (rank is None or len(dims(node) or ()) == rank)


# `DTensor.to_local()` as traced: a method call (torch 2.13), or a call of the function Dynamo writes for it,
# `prim_to_local` (torch 2.11, which folds to_local's constant arguments into that function)
TO_LOCAL = ("to_local", "prim_to_local")


def is_param_read(node, rank: int) -> bool:
    """A `rank`-dim parameter read in place: a graph input, or `param.to_local()` of one (the local shard of a
    DTensor parameter under transformers' expert / tensor parallelism: a view of this rank's tensor, no copy)."""
    if is_param(node, rank):
        return True
    return op_name(node) in TO_LOCAL and is_param(node.args[0], rank) and len(dims(node) or ()) == rank


def param_input(node):
    """The graph input a parameter read (is_param_read) reads."""
    return node.args[0] if op_name(node) in TO_LOCAL else node


def op_name(node) -> str:
    """A stable name for what a node calls: 'transpose', 'mul', 'silu', '_grouped_mm',
    'transformers::grouped_mm_fallback', ... (method and function spellings coincide)."""
    if not isinstance(node, fx.Node):
        return type(node).__name__
    t = node.target
    if node.op == "call_method":
        return t
    if node.op != "call_function":
        return node.op
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name
    if t is operator.getitem:
        return "getitem"
    if t is operator.setitem:
        return "setitem"
    return getattr(t, "__name__", str(t))


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` of a call, whether it was passed by position or as `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_tensor_index(index) -> bool:
    """getitem with a tensor index (a gather), as opposed to slices / ints."""
    return is_tensor_node(index)


def is_in_place(node: fx.Node) -> bool:
    """A method call that mutates its first argument (`x.add_(...)`, `mask.scatter_(...)`)."""
    return node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")


# Ops that change a value's dtype or memory layout only (not its shape).
CASTS = {"to", "float", "type_as", "contiguous", "clone", "bfloat16", "half"}
# Ops that keep a row's values (only dtype, memory layout or a unit dimension changes).
VALUE_PRESERVING = CASTS | {"unsqueeze", "squeeze"}


def strip_casts(node, ops=CASTS):
    """Walk up through casts (a router's `.float()`, `.to(dtype)`, `.type_as(x)`)."""
    while isinstance(node, fx.Node) and op_name(node) in ops:
        node = node.args[0]
    return node


def ep_remap(node, E) -> tuple[fx.Node, fx.Node] | None:
    """(off-rank mask, `ids % E` node) of `where(off, E, ids % E)`: transformers' all-reduce expert parallelism
    remapping global expert ids to this rank's E local ones, E itself the off-rank sentinel (every value in
    [0, E] by construction); None for any other form."""
    node = strip_casts(node)
    if op_name(node) != "where" or len(node.args) != 3 or node.args[1] != E:
        return None
    mod = node.args[2]
    if op_name(mod) not in ("mod", "remainder") or mod.args[1] != E:
        return None
    return node.args[0], mod


def follow(node, *, through=VALUE_PRESERVING, gathers=False, within=None, transparent=frozenset()):
    """Walk up from `node` through value-preserving ops (and tensor-indexed gathers if asked), staying inside
    `within` (a node predicate) if given, so the walk ends at the region's own input. `transparent` nodes are
    ones a recognizer proved to be identities (e.g. expert-parallel sentinel fills)."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        if within is not None and not within(node):
            break
        name = op_name(node)
        if name in through or node in transparent:
            node = node.args[0]
        elif gathers and name == "getitem" and is_tensor_index(node.args[1]):
            node = node.args[0]
        elif gathers and name == "repeat_interleave":
            node = node.args[0]
        else:
            break
    return node


def backward_slice(
    starts: Iterable[fx.Node],
    *,
    stop: Iterable[fx.Node] = (),
    within: Callable[[fx.Node], bool] | None = None,
    inputs: Callable[[fx.Node], Iterable[fx.Node]] = lambda n: n.all_input_nodes,
    keep: Callable[[fx.Node], bool] = lambda n: True,
) -> set[fx.Node]:
    """The compute nodes `starts` depend on, `starts` included: walks `inputs(n)`, never entering `stop`
    nodes, graph inputs, nodes outside `within` or nodes `keep` refuses."""
    stop = set(stop)
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        n = todo.pop()
        if n in seen or n in stop or n.op in GRAPH_INPUTS or (within is not None and not within(n)) or not keep(n):
            continue
        seen.add(n)
        todo.extend(inputs(n))
    return seen


def derives_from(node: fx.Node, source: fx.Node, within: Callable[[fx.Node], bool]) -> bool:
    """`source` is `node` or an ancestor of it along data flow inside `within` (source itself may be outside)."""
    if node is source:
        return True
    return any(source in n.all_input_nodes for n in backward_slice([node], within=within))


def in_graph_order(inside: set[fx.Node], graph: fx.Graph) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the nodes of `inside` in graph order, the nodes outside it they read, in graph order)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(inside, key=order.__getitem__)
    inputs = sorted({a for n in nodes for a in n.all_input_nodes if a not in inside}, key=order.__getitem__)
    return nodes, inputs


def subgraph_module(gm: fx.GraphModule, nodes, inputs, outputs, name: str) -> fx.GraphModule:
    """`nodes` as a standalone GraphModule: one placeholder per input, returning `outputs` (one or a tuple).
    Used for the numerical checks and the before-dump."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in inputs:
        ph = graph.placeholder(inp.name)
        ph.meta = dict(inp.meta)
        env[inp] = ph
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
    return fx.GraphModule(gm, graph, class_name=name)


def node_meta(like: fx.Node, value) -> dict:
    """Metadata of a new node replacing `like`: its module stack and source, and its own example value."""
    meta = {k: like.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in like.meta}
    meta["example_value"] = value
    return meta


def cast_like(graph: fx.Graph, node: fx.Node, value, like: fx.Node) -> fx.Node:
    """`node` as `value`'s dtype: node itself when it has it, else a new `node.to(dtype)` carrying `value` (its
    planned fake value) and `like`'s module stack. Inserts at the graph's current insertion point."""
    if example_value(node).dtype == value.dtype:
        return node
    cast = graph.call_method("to", (node, value.dtype))
    cast.meta = node_meta(like, value)
    return cast


def fake_call(call: OpCall, like: fx.Node):
    """The call's output on the graph's example values, in the graph's own fake mode (`like`'s: detect_fake_mode
    can return another one, "Mixing fake modes NYI"). Runs the op's input checks: call it before editing."""
    with example_value(like).fake_mode:
        return call.op(**fx.node.map_arg(call.kwargs(), example_value))


def call_code(gm: fx.GraphModule, build: Callable[[fx.Graph, Callable[[fx.Node], fx.Node]], fx.Node], name: str) -> str:
    """Code of a replacement, for the dump: `build(graph, placeholder)` writes it into a fresh graph, with
    `placeholder(node)` standing for each graph value it reads."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def placeholder(n: fx.Node) -> fx.Node:
        if n not in env:
            env[n] = graph.placeholder(n.name)
        return env[n]

    graph.output(build(graph, placeholder))
    return fx.GraphModule(gm, graph, class_name=name).code


def op_call_code(gm: fx.GraphModule, call: OpCall) -> str:
    """Code of one op call (keyword arguments with their names), for the dump."""
    return call_code(gm, lambda g, ph: g.call_function(call.op, (), fx.node.map_arg(call.kwargs(), ph)), "Fused")
