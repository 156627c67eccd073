"""Replace a proven experts region by one `moe_compiler.experts` call, and a proven router by one
`moe_compiler.route` call feeding it.

Invariants (passes/README.md): the new node carries correct `example_value` metadata made in the
graph's own fake mode; the region output's users are re-pointed; region nodes that still have users
outside the region (Dynamo CSEs symbolic sizes across layers) stay; everything else in the region is
erased, last user first.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .experts_common import ExpertsMatch
from .regions import Region, example_value


def _meta(like: fx.Node, value) -> dict:
    meta = {k: like.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in like.meta}
    meta["example_value"] = value
    return meta


def rewrite_experts(gm: fx.GraphModule, region: Region, match: ExpertsMatch) -> fx.Node:
    graph = gm.graph
    op, args = match.op, match.op_args()
    out_dtype = example_value(match.output).dtype
    # Fake values first (this runs the op's input checks): a failure leaves the graph untouched.
    with example_value(match.output).fake_mode:
        value = op(*[example_value(a) if isinstance(a, fx.Node) else a for a in args])
        cast_value = value.to(out_dtype)
    with graph.inserting_before(match.output):
        new = graph.call_function(op, args)
        new.meta = _meta(match.output, value)
        result = new
        if out_dtype != value.dtype:
            # e.g. a bf16 model with fp32 router weights whose combine came out in fp32
            result = graph.call_method("to", (new, out_dtype))
            result.meta = _meta(match.output, cast_value)
    match.output.replace_all_uses_with(result)
    for n in reversed(region.nodes):
        if not n.users:
            graph.erase_node(n)
    return new


def rewrite_router(gm: fx.GraphModule, match, experts_call: fx.Node) -> fx.Node:
    """Feed `experts_call` from one `moe_compiler.route` call on the router logits; erase the router's
    now-unused nodes (last user first: in-place mask fills go before the masks they fill)."""
    graph = gm.graph
    op = torch.ops.moe_compiler.route.default
    args = (match.logits, match.correction_bias, *match.spec.op_args())
    want_w, want_i = example_value(match.weights), example_value(match.ids)
    with example_value(match.logits).fake_mode:
        value = op(*[example_value(a) if isinstance(a, fx.Node) else a for a in args])
        w_value, i_value = value[0].to(want_w.dtype), value[1].to(want_i.dtype)
    with graph.inserting_before(experts_call):
        call = graph.call_function(op, args)
        call.meta = _meta(match.weights, value)
        weights = graph.call_function(operator.getitem, (call, 0))
        weights.meta = _meta(match.weights, value[0])
        ids = graph.call_function(operator.getitem, (call, 1))
        ids.meta = _meta(match.ids, value[1])
        # The experts call keeps the dtypes the router handed it (e.g. bf16 weights in a bf16 model).
        if want_w.dtype != torch.float32:
            weights = graph.call_method("to", (weights, want_w.dtype))
            weights.meta = _meta(match.weights, w_value)
        if want_i.dtype != torch.int64:
            ids = graph.call_method("to", (ids, want_i.dtype))
            ids.meta = _meta(match.ids, i_value)
    experts_call.replace_input_with(match.ids, ids)
    experts_call.replace_input_with(match.weights, weights)
    for n in reversed(match.nodes):
        if not n.users:
            graph.erase_node(n)
    return call
