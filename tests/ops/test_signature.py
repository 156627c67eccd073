"""ops/signature.py: each op's signature written once. The schemas come from the tensor tables and the spec
dataclasses; an op call in a graph reads the same by name whether its arguments were passed by position or keyword."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

import moe_compiler  # noqa: F401 - registers the ops
from moe_compiler.ops.signature import (
    SIGNATURES,
    ExpertsTensors,
    OpCall,
    QuantizedTensors,
    RouteTensors,
    make_spec,
    schema,
)
from moe_compiler.spec import ExpertsSpec, QuantizedExpertsSpec, RouterSpec

EXPERTS = torch.ops.moe_compiler.experts.default
ROUTE = torch.ops.moe_compiler.route.default


def test_schemas_are_built_from_the_tables():
    args = EXPERTS._schema.arguments
    assert [a.name for a in args if not a.kwarg_only] == list(ExpertsTensors._fields)
    assert [a.name for a in args if a.kwarg_only] == [f.name for f in dataclasses.fields(ExpertsSpec)]
    built = torch._C.parse_schema("moe_compiler::experts" + schema(ExpertsTensors, ExpertsSpec, "Tensor"))
    assert str(EXPERTS._schema) == str(built)
    backward = torch.ops.moe_compiler.experts_backward.default._schema
    positional = [a.name for a in backward.arguments if not a.kwarg_only]
    assert positional == ["grad_out", "weight_grads", "saved_z", *ExpertsTensors._fields]
    assert len(backward.returns) == len(ExpertsTensors._fields)  # one gradient per tensor argument
    route = ROUTE._schema.arguments
    assert [a.name for a in route if not a.kwarg_only] == list(RouteTensors._fields)
    # A float with an infinite default has no schema literal: it is optional, None meaning the default.
    assert "float? masked_score=None" in str(ROUTE._schema)
    train = torch.ops.moe_compiler.experts_train.default._schema
    assert [a.name for a in train.arguments] == [a.name for a in args] and len(train.returns) == 2
    assert set(SIGNATURES) == {EXPERTS, ROUTE, torch.ops.moe_compiler.experts_train.default,
                               torch.ops.moe_compiler.experts_unstacked.default,
                               torch.ops.moe_compiler.experts_quantized.default,
                               torch.ops.moe_compiler.linear_quantized.default}
    quantized = torch.ops.moe_compiler.experts_quantized.default._schema.arguments
    assert [a.name for a in quantized if not a.kwarg_only] == list(QuantizedTensors._fields)
    assert [a.name for a in quantized if a.kwarg_only] == [f.name for f in dataclasses.fields(QuantizedExpertsSpec)]


def test_make_spec_fills_defaults_and_maps_none_back_to_infinity():
    assert make_spec(ExpertsSpec, {}) == ExpertsSpec()
    spec = make_spec(RouterSpec, {"top_k": 2, "masked_score": None, "scoring": "sigmoid"})
    assert spec == RouterSpec(top_k=2, scoring="sigmoid") and math.isinf(spec.masked_score)


def _graph_call(args, kwargs):
    graph = fx.Graph()
    nodes = {name: graph.placeholder(name) for name in ("x", "ids", "w", "w1", "w2", "b1")}
    call = graph.call_function(EXPERTS, tuple(nodes[a] for a in args), {k: nodes.get(v, v) for k, v in kwargs.items()})
    return nodes, call


def test_op_call_reads_positional_and_keyword_arguments_alike():
    spec = {"activation": "gelu", "gate_up": "interleaved", "transposed": True}
    nodes, positional = _graph_call(("x", "ids", "w", "w1", "w2", "b1"), spec)
    _, keyword = _graph_call((), {"hidden": "x", "topk_ids": "ids", "topk_weights": "w", "w_gate_up": "w1",
                                  "w_down": "w2", "b_gate_up": "b1", **spec})
    a, b = OpCall.of(positional), OpCall.of(keyword)
    names = lambda call: [getattr(t, "name", t) for t in call.tensors]  # noqa: E731 - two graphs, same names
    assert names(a) == names(b) == ["x", "ids", "w", "w1", "w2", "b1", None, None, None, None, None]
    assert a.spec == b.spec == ExpertsSpec("gelu", "interleaved", True)
    assert a.tensors.hidden is nodes["x"] and a.tensors.b_gate_up is nodes["b1"] and a.tensors.b_down is None


def test_op_call_kwargs_leave_absent_tensors_and_default_constants_out():
    nodes, node = _graph_call(("x", "ids", "w", "w1", "w2"), {})
    call = OpCall.of(node)
    assert call.kwargs() == {"hidden": nodes["x"], "topk_ids": nodes["ids"], "topk_weights": nodes["w"],
                             "w_gate_up": nodes["w1"], "w_down": nodes["w2"],
                             "activation": "silu", "gate_up": "concat", "transposed": False}
    shared = call.with_tensors(shared_gate_proj=nodes["b1"], shared_down_proj=nodes["b1"])
    assert "shared_gate_proj" in shared.kwargs() and "shared_up_proj" not in shared.kwargs()
