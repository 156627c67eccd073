"""`moe_compiler.experts` calls that take part in autograd -> `experts_train(...)[0]`.

A training forward's experts call is followed by its backward, which needs the gate_up GEMM's pre-activation
rows Z. `experts_train` computes the same output and also returns Z (ops/experts.py), which its autograd formula
saves, so the backward does not run the gate_up GEMM again. Inference calls (the region's value needs no
gradient: under no_grad, or every input frozen) keep `experts`: Z would be written for nothing. Runs last on
each fused block (the router and shared-experts passes read `experts` calls), on calls of ours only, so nothing
here needs a proof.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops.signature import OpCall
from .fx_utils import fake_call, node_meta

EXPERTS_TRAIN = torch.ops.moe_compiler.experts_train.default


def experts_call_for_training(gm: fx.GraphModule, call: fx.Node) -> fx.Node:
    """Plan and apply `call` (an experts call) -> `experts_train(...)[0]`; returns the new output node. The
    caller decides that the call's value needs gradients (from the region's own value as Dynamo recorded it:
    a parameter's example value requires grad even under no_grad)."""
    op = OpCall.of(call)
    train = dataclasses.replace(op, op=EXPERTS_TRAIN)
    value = fake_call(train, call)  # before editing: runs the op's checks
    with gm.graph.inserting_after(call):
        new = gm.graph.call_function(EXPERTS_TRAIN, (), train.kwargs())
    new.meta = node_meta(call, value)
    with gm.graph.inserting_after(new):
        out = gm.graph.call_function(operator.getitem, (new, 0))
    out.meta = node_meta(call, value[0])
    call.replace_all_uses_with(out)
    gm.graph.erase_node(call)
    counters["moe_compiler"]["experts_saving_z"] += 1
    return out
