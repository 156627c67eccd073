"""Replacing proven nodes by one op call, in two phases: plan (fake values, input checks, what will be erased;
may raise) and edit (graph changes only). Invariants (passes/README.md): the new node carries correct
`example_value` metadata made in the graph's own fake mode; the replaced value's readers are re-pointed;
replaced nodes that still have users (Dynamo CSEs symbolic sizes across layers) stay; everything else is
erased, last user first.
"""

from __future__ import annotations

import torch.fx as fx

from ..ops.signature import OpCall
from .fx_utils import cast_like, example_value, fake_call, node_meta
from .match import Edit


def erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase each of `nodes` (graph order) that has no users left, last first."""
    for n in reversed(nodes):
        if not n.users:
            graph.erase_node(n)


def replace_with_call(
    gm: fx.GraphModule,
    call: OpCall,
    output: fx.Node,
    nodes: list[fx.Node],
    *,
    after: fx.Node | None = None,
    readers: list[fx.Node] | None = None,
    erase_all: bool = False,
) -> Edit:
    """Plan `output` -> `call` (cast back to output's dtype if the op returns another): the call goes before
    `output`, or right after `after`; `readers` (default: all) of output read the result instead; then
    `nodes` are erased once unused (`erase_all`: every one must go, checked now)."""
    value = fake_call(call, output)
    with example_value(output).fake_mode:
        out_value = value.to(example_value(output).dtype)
    readers = list(output.users) if readers is None else readers
    if erase_all:
        going = set(nodes)
        allowed = {n: going | set(readers) if n is output else going for n in nodes}
        kept = [n.name for n in nodes if not set(n.users) <= allowed[n]]
        if kept:
            raise RuntimeError(f"nodes to replace are read outside the replaced nodes: {kept[:5]}")

    def edit() -> fx.Node:
        graph = gm.graph
        with graph.inserting_after(after) if after is not None else graph.inserting_before(output):
            new = graph.call_function(call.op, (), call.kwargs())
            new.meta = node_meta(output, value)
            # e.g. a bf16 model with fp32 router weights whose combine came out in fp32
            result = cast_like(graph, new, out_value, output)
        for r in readers:
            r.replace_input_with(output, result)
        erase_unused(graph, nodes)
        return new

    return edit
