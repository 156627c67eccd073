"""Regions: the candidate experts computations of a Dynamo graph, found two ways.

By module boundary: Dynamo records, for every node it emits, the stack of modules whose forward produced it
(`node.meta["nn_module_stack"]`: {key: (path, class)}, outermost first). transformers 5.x computes each MoE
block's experts inside a `*Experts` module (Qwen3MoeExperts, MixtralExperts, DeepseekV3NaiveMoe's `experts`,
...), so grouping nodes by the innermost such module yields one region per MoE layer, whatever op sequence
the transformers version emits.

By routing data flow: a module with another name (a hand-written block, remote code) is found from what its
nodes compute: expert computations (grouped GEMMs over expert offsets, gathers of a 3-D weight by a tensor
index, matmuls reading such weights, one_hot / index_add_ over experts) that derive from the ids of a
`topk`. The region is the innermost module holding all of them, without the router. A top-k whose expert
computations cannot be placed in a module of their own is reported with the reason.

Recognizers then prove what a region computes; nothing here assumes it.
"""

from __future__ import annotations

import dataclasses
import re

import torch.fx as fx

from .fx_utils import arg, backward_slice, is_param, is_tensor_index, op_name

# transformers names every routed-experts container `<Model>Experts` (or `...NaiveMoe` holding one).
EXPERTS_CLASS = re.compile(r"Experts$")
MODULE = "module"  # how a region was found: a `*Experts` module
DATA_FLOW = "data flow"  # or: top-k ids reaching expert computations, in a module of another name


@dataclasses.dataclass
class Region:
    path: str  # module path as Dynamo wrote it, e.g. "L['self'].model.layers.1.mlp.experts"
    cls: str  # class name, e.g. "Qwen3MoeExperts"
    nodes: list[fx.Node]  # in graph order; no placeholders / get_attr
    inputs: list[fx.Node]  # nodes outside the region read by it, in first-use order
    outputs: list[fx.Node]  # region nodes read outside it
    found_by: str = MODULE

    @property
    def name(self) -> str:
        return display_name(self.path)

    def contains(self, node: fx.Node) -> bool:
        return node in self._node_set

    def __post_init__(self):
        self._node_set = set(self.nodes)


@dataclasses.dataclass
class Unplaced:
    """A top-k whose ids reach expert computations that no region holds."""

    name: str
    reason: str
    nodes: list[fx.Node]


def _class_name(cls) -> str:
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return name.split(".")[-1]


def display_name(path: str) -> str:
    """A module path as Dynamo wrote it ("L['self'].model.layers.1.mlp.experts") as the model names it."""
    return path.removeprefix("L['self'].").removeprefix("L['self']") or "<root>"


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(path, class name) of the modules whose forward emitted `node`, outermost first."""
    return [(path, _class_name(cls)) for path, cls in (node.meta.get("nn_module_stack") or {}).values()]


def _region(graph: fx.Graph, path: str, cls: str, nodes: list[fx.Node], found_by: str = MODULE) -> Region:
    members = set(nodes)
    inputs: dict[fx.Node, None] = {}
    outputs: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members:
                inputs.setdefault(a)
        if any(u not in members for u in n.users):
            outputs.setdefault(n)
    return Region(path, cls, nodes, list(inputs), list(outputs), found_by)


def _compute_nodes(graph: fx.Graph):
    return (n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def find_experts_regions(gm: fx.GraphModule) -> list[Region]:
    """One Region per `*Experts` module instance that emitted compute nodes, in graph order; then one per run of
    nodes that transformers' experts forward emitted outside any module (below)."""
    groups: dict[str, tuple[str, list[fx.Node]]] = {}
    unclaimed: dict[str, list[fx.Node]] = {}  # by the transformers experts forward that emitted them
    for node in _compute_nodes(gm.graph):
        scope = None
        for path, cls in module_stack(node):
            if EXPERTS_CLASS.search(cls):
                scope = (path, cls)
        if scope is not None:
            groups.setdefault(scope[0], (scope[1], []))[1].append(node)
        elif (fn := _experts_forward_of(node)) is not None:
            unclaimed.setdefault(fn, []).append(node)
    regions = [_region(gm.graph, path, cls, _before_collective(nodes)) for path, (cls, nodes) in groups.items()]
    for fn, nodes in unclaimed.items():
        runs = _contiguous_runs(gm.graph, nodes)
        regions += [_region(gm.graph, f"<{fn} #{i}>", fn, run) for i, run in enumerate(runs)]
    return regions


# transformers' experts implementations (integrations/moe.py), by the function that computes them.
EXPERTS_FORWARDS = ("grouped_mm_experts_forward", "batched_mm_experts_forward")


def _experts_forward_of(node: fx.Node) -> str | None:
    """The transformers experts forward whose frame emitted `node`, for nodes that no module claims: after a
    graph break inside a module's forward (transformers' all-to-all expert parallelism reads its split sizes
    back between dispatch and experts), Dynamo's resumed frame carries no module stack, only the stack trace."""
    trace = node.meta.get("stack_trace") or ""
    return next((fn for fn in EXPERTS_FORWARDS if f", in {fn}\n" in trace), None)


def _contiguous_runs(graph: fx.Graph, nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """`nodes` split where another compute node comes between two of them (one call of the forward each)."""
    members, runs, run = set(nodes), [], []
    for n in _compute_nodes(graph):
        if n in members:
            run.append(n)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def _before_collective(nodes: list[fx.Node]) -> list[fx.Node]:
    """The nodes before the module's first collective: transformers' all-reduce expert parallelism (5.24)
    all-reduces the experts' output inside the experts module; the collective and what follows it stay in the
    graph, reading the op's output."""
    for i, n in enumerate(nodes):
        if op_name(n).startswith(("_c10d_functional::", "c10d_functional::")):
            return nodes[:i]
    return nodes


# --- regions from routing data flow -------------------------------------------------------------------------

_GROUPED_GEMMS = {"_grouped_mm", "grouped_mm", "transformers::grouped_mm_fallback"}
_MATMULS = {"bmm", "matmul", "einsum", "linear"}


def _weight_gather(node) -> bool:
    """W[index] with W a 3-D graph input (a stacked expert weight) and a tensor index."""
    return op_name(node) == "getitem" and is_param(node.args[0], 3) and is_tensor_index(node.args[1])


def is_expert_computation(node: fx.Node) -> bool:
    """A node that only an experts computation has: see the module docstring."""
    name = op_name(node)
    if name in _GROUPED_GEMMS:
        return arg(node, 2, "offs") is not None
    if name in ("one_hot", "index_add_") or _weight_gather(node):
        return True
    if name in _MATMULS:
        return any(is_param(a, 3) or _weight_gather(a) for a in node.all_input_nodes)
    return False


def _ids_of(topk: fx.Node) -> list[fx.Node]:
    return [u for u in topk.users if op_name(u) == "getitem" and u.args[1] == 1]


def find_routed_regions(gm: fx.GraphModule, claimed: set[fx.Node]) -> tuple[list[Region], list[Unplaced]]:
    """Regions found from top-k ids reaching expert computations outside `claimed` nodes (see the module
    docstring), and the top-k whose computations fit no region, with the reason."""
    loose = [n for n in _compute_nodes(gm.graph) if n not in claimed and is_expert_computation(n)]
    if not loose:
        return [], []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_topk: dict[fx.Node, list[fx.Node]] = {}
    for n in loose:
        ancestors = backward_slice([n])
        topks = sorted({a for a in ancestors if op_name(a) == "topk" and any(i in ancestors for i in _ids_of(a))},
                       key=order.__getitem__)
        if topks:  # the nearest top-k whose ids this computation reads
            by_topk.setdefault(topks[-1], []).append(n)
    regions, unplaced = [], []
    for topk, computations in by_topk.items():
        found = _routed_region(gm.graph, topk, computations, claimed)
        if isinstance(found, Region):
            regions.append(found)
            claimed |= set(found.nodes)
        else:
            where = ", ".join(f"`{c.name}` ({op_name(c)})" for c in computations[:4])
            reason = f"the top-k `{topk.name}` feeds expert computations {where}, but {found}"
            unplaced.append(Unplaced(f"<experts fed by `{topk.name}`>", reason, computations))
    return regions, unplaced


def _descendants(starts, within: set) -> set[fx.Node]:
    """Nodes of `within` that read `starts` along data flow (starts themselves excluded)."""
    seen: set[fx.Node] = set()
    todo = [u for s in starts for u in s.users]
    while todo:
        n = todo.pop()
        if n in within and n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def _routed_region(graph: fx.Graph, topk: fx.Node, computations: list[fx.Node], claimed: set) -> Region | str:
    """The region of the innermost module holding every computation, without the router; or why there is none:
    the module's nodes that read the top-k ids, and what those read in it that the top-k did not produce."""
    stacks = [module_stack(c) for c in computations]
    common = 0
    while all(len(s) > common for s in stacks) and len({s[common] for s in stacks}) == 1:
        common += 1
    if common == 0:
        return ("they are not inside one submodule of the compiled module (a region needs a module boundary: "
                "move the experts computation into an nn.Module of its own)")
    path, cls = stacks[0][common - 1]
    scope = {n for n in _compute_nodes(graph) if (path, cls) in module_stack(n) and n not in claimed}
    outputs = set(topk.users)
    from_ids = _descendants(_ids_of(topk), scope)
    from_topk = _descendants(outputs, scope)  # e.g. the weights' renormalization: the router's, not the experts'
    router = from_topk | outputs | {topk}
    inside = backward_slice(from_ids, within=lambda n: n in from_ids or (n in scope and n not in router))
    nodes = [n for n in graph.nodes if n in inside]
    if any(op_name(n) == "topk" for n in nodes):
        return f"the module `{path}` ({cls}) that holds them also holds another top-k"
    return _region(graph, path, cls, nodes, DATA_FLOW)
