"""Regions: the nodes of one module instance in a Dynamo graph, found by module boundary.

Dynamo records, for every node it emits, the stack of modules whose forward produced it
(`node.meta["nn_module_stack"]`: {key: (path, class)}, outermost first). transformers 5.x computes each
MoE block's experts inside a `*Experts` module (Qwen3MoeExperts, MixtralExperts, DeepseekV3NaiveMoe's
`experts`, ...), so grouping nodes by the innermost such module yields one candidate region per MoE
layer, whatever op sequence the transformers version emits. Recognizers then prove what a region
computes; nothing here assumes it.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.fx as fx

# transformers names every routed-experts container `<Model>Experts` (or `...NaiveMoe` holding one).
EXPERTS_CLASS = re.compile(r"Experts$")


@dataclasses.dataclass
class Region:
    path: str  # module path as Dynamo wrote it, e.g. "L['self'].model.layers.1.mlp.experts"
    cls: str  # class name, e.g. "Qwen3MoeExperts"
    nodes: list[fx.Node]  # in graph order; no placeholders / get_attr
    inputs: list[fx.Node]  # nodes outside the region read by it, in first-use order
    outputs: list[fx.Node]  # region nodes read outside it

    @property
    def name(self) -> str:
        return self.path.removeprefix("L['self'].").removeprefix("L['self']")

    def contains(self, node: fx.Node) -> bool:
        return node in self._node_set

    def __post_init__(self):
        self._node_set = set(self.nodes)


def _class_name(cls) -> str:
    return cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))


def _experts_scope(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    scope = None
    for path, cls in stack.values():
        if EXPERTS_CLASS.search(_class_name(cls).split(".")[-1]):
            scope = (path, _class_name(cls).split(".")[-1])
    return scope


def find_experts_regions(gm: fx.GraphModule) -> list[Region]:
    """One Region per `*Experts` module instance that emitted compute nodes, in graph order."""
    groups: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        scope = _experts_scope(node)
        if scope is not None:
            groups.setdefault(scope[0], (scope[1], []))[1].append(node)
    regions = []
    for path, (cls, nodes) in groups.items():
        members = set(nodes)
        inputs: dict[fx.Node, None] = {}
        outputs: dict[fx.Node, None] = {}
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in members:
                    inputs.setdefault(a)
            if any(u not in members for u in n.users):
                outputs.setdefault(n)
        regions.append(Region(path, cls, nodes, list(inputs), list(outputs)))
    return regions


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def is_tensor_node(node: fx.Node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def region_module(gm: fx.GraphModule, region: Region, outputs: list[fx.Node] | None = None) -> fx.GraphModule:
    """The region as a standalone GraphModule: one placeholder per region input, returning `outputs`
    (default: the region's tensor outputs). Used for the numerical check and the before-dump."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in region.inputs:
        ph = graph.placeholder(inp.name)
        ph.meta = dict(inp.meta)
        env[inp] = ph
    for n in region.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    outs = outputs if outputs is not None else [o for o in region.outputs if is_tensor_node(o)]
    graph.output(tuple(env[o] for o in outs) if len(outs) != 1 else env[outs[0]])
    return fx.GraphModule(gm, graph, class_name=f"Region_{region.cls}")


# --- data-flow helpers shared by the recognizers -------------------------------------------------

def op_name(node: fx.Node) -> str:
    """A stable name for what a node calls: 'transpose', 'mul', 'silu', '_grouped_mm',
    'transformers::grouped_mm_fallback', ... (method and function spellings coincide)."""
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
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_tensor_index(index) -> bool:
    """getitem with a tensor index (a gather), as opposed to slices / ints."""
    return isinstance(index, fx.Node) and is_tensor_node(index)


def dims(node) -> tuple | None:
    """The shape of a tensor node's example value (None for non-tensors)."""
    ev = example_value(node)
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else None


# Ops that change a value's dtype or memory layout only (not its shape).
CASTS = {"to", "float", "type_as", "contiguous", "clone", "bfloat16", "half"}


def strip_casts(node, ops=CASTS):
    """Walk up through casts (a router's `.float()`, `.to(dtype)`, `.type_as(x)`)."""
    while isinstance(node, fx.Node) and op_name(node) in ops:
        node = node.args[0]
    return node


# Ops that keep a row's values (only dtype, memory layout or a unit dimension changes).
VALUE_PRESERVING = {"to", "contiguous", "float", "bfloat16", "half", "type_as", "clone", "unsqueeze", "squeeze"}


def follow(node, *, through=VALUE_PRESERVING, gathers=False, within: Region | None = None, transparent=frozenset()) -> fx.Node:
    """Walk up from `node` through value-preserving ops (and tensor-indexed gathers if asked), staying
    inside `within` if given (so the walk ends at the region's own input). `transparent` nodes are
    ones a recognizer proved to be identities (e.g. expert-parallel sentinel fills)."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        if within is not None and not within.contains(node):
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


def in_graph_order(inside: set[fx.Node], graph: fx.Graph) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the nodes of `inside` in graph order, the nodes outside it they read, in graph order)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(inside, key=order.__getitem__)
    inputs = sorted({a for n in nodes for a in n.all_input_nodes if a not in inside}, key=order.__getitem__)
    return nodes, inputs


def derives_from(node: fx.Node, source: fx.Node, region: Region) -> bool:
    """True if `source` is an ancestor of `node` along region-internal data flow."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if n in seen or not region.contains(n):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False
