"""Replace a proven experts region by one `moe_compiler.experts` call.

Invariants (passes/README.md): the new node carries correct `example_value` metadata made in the
graph's own fake mode; the region output's users are re-pointed; region nodes that still have users
outside the region (Dynamo CSEs symbolic sizes across layers) stay; everything else in the region is
erased, last user first.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .experts_common import ExpertsMatch
from .regions import Region, example_value


def _meta(like: fx.Node, value) -> dict:
    meta = {k: like.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in like.meta}
    meta["example_value"] = value
    return meta


def replacement_args(match: ExpertsMatch) -> tuple:
    return (match.hidden, match.topk_ids, match.topk_weights, match.w_gate_up, match.w_down, match.b_gate_up, match.b_down, *match.spec.op_args())


def rewrite_experts(gm: fx.GraphModule, region: Region, match: ExpertsMatch) -> fx.Node:
    graph = gm.graph
    op = torch.ops.moe_compiler.experts.default
    args = replacement_args(match)
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
