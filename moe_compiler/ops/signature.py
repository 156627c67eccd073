"""Each op's signature, written once: tables of its tensor arguments and its spec, from which the schemas, the
fakes' argument binding and the passes' typed view of an op-call node are all made.

    experts(<ExpertsTensors>, *, <ExpertsSpec fields>) -> out [T, H]
    experts_backward(grad_out, weight_grads, saved_z, <ExpertsTensors>, *, <ExpertsSpec fields>) -> a gradient each
    experts_backward_down(grad_out, weight_grads, saved_z, <ExpertsTensors>, *, <...>) -> (dz, 3 gradients)
    experts_backward_gate_up(grad_out, weight_grads, dz, <ExpertsTensors>, *, <...>) -> (dx_rows, 2 gradients)
    experts_backward_combine(grad_out, weight_grads, dx_rows, <ExpertsTensors>, *, <...>) -> a gradient each
    experts_unstacked(<UnstackedTensors>, *, <ExpertsSpec fields>) -> out [T, H]
    experts_quantized(<QuantizedTensors>, *, <QuantizedExpertsSpec fields>) -> out [T, H]
    linear_quantized(<QuantizedLinearTensors>, *, <QuantizedLinearSpec fields>) -> y [..., N]
    experts_unstacked_backward(grad_out, weight_grads, <UnstackedTensors>, *, <ExpertsSpec fields>) -> 4 gradients
    route(<RouteTensors>, *, <RouterSpec fields>) -> (weights [T, k] fp32, ids [T, k] int64)
    route_backward(grad_weights, router_logits, ids, *, <RouterSpec fields>) -> d router_logits

Tensor arguments are positional (autograd differentiates positional tensors only); spec arguments are
keyword-only with the dataclass field's default, so a call in a graph reads
`experts(hidden=..., topk_ids=..., ..., activation='silu', gate_up='concat', transposed=False)`.
A float field whose default is infinite becomes `float? name=None` (schemas have no infinity literal).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from typing import NamedTuple, Optional

import torch
import torch.fx as fx
from torch import Tensor

from ..spec import ExpertsSpec, QuantizedExpertsSpec, RouterSpec


class ExpertsTensors(NamedTuple):
    """The experts op's tensors (see spec.py for the math and lowering/torch_experts.py for the contract)."""

    hidden: Tensor  # [T, H]
    topk_ids: Tensor  # [T, k] int32 / int64
    topk_weights: Tensor  # [T, k] float
    w_gate_up: Tensor  # [E, 2I, H] (transposed: [E, H, 2I])
    w_down: Tensor  # [E, H, I] (transposed: [E, I, H])
    b_gate_up: Optional[Tensor] = None  # [E, 2I]
    b_down: Optional[Tensor] = None  # [E, H]
    # The block's shared experts (spec.SharedMLP), present when shared_down_proj is: nn.Linear weights.
    shared_gate_proj: Optional[Tensor] = None  # [Is, H], or [2Is, H] (gate rows, then up) without shared_up_proj
    shared_up_proj: Optional[Tensor] = None  # [Is, H]
    shared_down_proj: Optional[Tensor] = None  # [H, Is]
    shared_expert_gate: Optional[Tensor] = None  # [1, H]: out = routed + sigmoid(x gate^T) * shared MLP(x)


class QuantizedTensors(NamedTuple):
    """experts_quantized's tensors: stacked quantized weights with their block scales (spec.WeightFormat)."""

    hidden: Tensor  # [T, H]
    topk_ids: Tensor  # [T, k]
    topk_weights: Tensor  # [T, k]
    w_gate_up: Tensor  # [E, 2I, H] quantized (float8_e4m3fn)
    w_gate_up_scale: Tensor  # [E, ceil(2I / bn), ceil(H / bk)] fp32 / float8_e8m0fnu
    w_down: Tensor  # [E, H, I] quantized
    w_down_scale: Tensor  # [E, ceil(H / bn), ceil(I / bk)]
    # The block's shared experts (spec.SharedMLP), unquantized, as in ExpertsTensors.
    shared_gate_proj: Optional[Tensor] = None
    shared_up_proj: Optional[Tensor] = None
    shared_down_proj: Optional[Tensor] = None
    shared_expert_gate: Optional[Tensor] = None


class QuantizedLinearTensors(NamedTuple):
    """linear_quantized's tensors: an nn.Linear's quantized weight with its block scales."""

    x: Tensor  # [..., K]
    weight: Tensor  # [N, K] float8_e4m3fn
    weight_scale: Tensor  # [ceil(N / bn), ceil(K / bk)] (a per-tensor scale: [1, 1] with bn = N, bk = K)
    bias: Optional[Tensor] = None  # [N]


class UnstackedTensors(NamedTuple):
    """experts_unstacked's tensors: the experts' weights as per-expert parts (nn.ModuleList of nn.Linear)."""

    hidden: Tensor
    topk_ids: Tensor
    topk_weights: Tensor
    w_gate_up: list[Tensor]  # P parts per expert in expert order: P = 2 (gate_e, up_e [I, H]) or 1 (gate_up_e [2I, H])
    w_down: list[Tensor]  # one [H, I] part per expert


class RouteTensors(NamedTuple):
    router_logits: Tensor  # [T, E] float
    correction_bias: Optional[Tensor] = None  # [E]: steers the choice only (DeepSeek-V3's e_score_correction_bias)


_TENSOR_TYPES = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", list[Tensor]: "Tensor[]"}
_SCALAR_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}


def _tensor_args(table) -> list[str]:
    hints = typing.get_type_hints(table)
    out = []
    for name in table._fields:
        arg = f"{_TENSOR_TYPES[hints[name]]} {name}"
        out.append(arg + "=None" if name in table._field_defaults else arg)
    return out


def _spec_args(spec_cls) -> list[str]:
    hints = typing.get_type_hints(spec_cls)
    out = []
    for f in dataclasses.fields(spec_cls):
        kind = hints[f.name]
        kind = str if issubclass(kind, enum.Enum) else kind
        schema_type = _SCALAR_TYPES[kind]
        if f.default is dataclasses.MISSING:
            out.append(f"{schema_type} {f.name}")
        elif isinstance(f.default, float) and math.isinf(f.default):
            out.append(f"{schema_type}? {f.name}=None")
        else:
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            out.append(f'{schema_type} {f.name}="{default}"' if kind is str else f"{schema_type} {f.name}={default}")
    return out


def schema(table, spec_cls, returns: str, leading: tuple[str, ...] = ()) -> str:
    """`(leading..., <table's tensors>, *, <spec fields>) -> returns` for torch.library.custom_op (table None:
    the leading arguments only)."""
    tensors = _tensor_args(table) if table is not None else []
    return f"({', '.join([*leading, *tensors, '*', *_spec_args(spec_cls)])}) -> {returns}"


def make_spec(spec_cls, kwargs: dict):
    """The spec from an op's keyword arguments (defaults fill what a call left out)."""
    values = {}
    for f in dataclasses.fields(spec_cls):
        if f.name in kwargs:
            value = kwargs[f.name]
            values[f.name] = f.default if value is None and isinstance(f.default, float) else value
    return spec_cls(**values)


# --- the passes' typed view of an op-call node ---------------------------------------------------------

@dataclasses.dataclass
class OpCall:
    """An op call in an FX graph, read by field name (never by position): `tensors` holds graph nodes (or
    None), `spec` the typed spec. `kwargs()` is what a pass writes into the graph."""

    op: torch._ops.OpOverload
    tensors: NamedTuple
    spec: ExpertsSpec | QuantizedExpertsSpec | RouterSpec

    def kwargs(self) -> dict:
        """The call's arguments by name: the tensors present, then the spec."""
        present = {k: v for k, v in self.tensors._asdict().items() if v is not None}
        return {**present, **self.spec.op_kwargs()}

    def with_tensors(self, **changes) -> OpCall:
        return dataclasses.replace(self, tensors=self.tensors._replace(**changes))

    @classmethod
    def of(cls, node: fx.Node) -> OpCall:
        """The typed view of a call of one of our forward ops (positional or keyword arguments alike)."""
        table, spec_cls = SIGNATURES[node.target]
        names = table._fields
        if len(node.args) > len(names):
            raise ValueError(f"{node.target}: {len(node.args)} positional arguments, expected at most {len(names)}")
        bound = dict(zip(names, node.args))
        bound.update({k: v for k, v in node.kwargs.items() if k in names})
        spec = make_spec(spec_cls, {k: v for k, v in node.kwargs.items() if k not in names})
        return cls(node.target, table(**bound), spec)


# Filled by the op modules as they register: forward op overload -> (tensor table, spec class).
SIGNATURES: dict = {}
