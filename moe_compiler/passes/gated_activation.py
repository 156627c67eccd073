"""Recognizer for the gated activation between the two expert GEMMs: a = act(gate) * up.

Mirrors `_default_apply_gate` of transformers/integrations/moe.py (transformers 5.17-5.23):

    gate, up = gate_up_out.chunk(2, dim=-1)      # concat layout
    return self.act_fn(gate) * up                # act_fn = ACT2FN[config.hidden_act]

and the interleaved split `gate_up_out[..., ::2], gate_up_out[..., 1::2]`. Activations are proven by
the op Dynamo recorded (nn.SiLU and GELU modules inline to F.silu / F.gelu), never by config name.
"""

from __future__ import annotations

import torch.fx as fx

from ..spec import Activation, GateUpLayout
from .regions import arg, follow, op_name
from .reject import Reject

_SIMPLE_ACTS = {"silu": Activation.SILU, "relu": Activation.RELU}


def _activation(node: fx.Node) -> tuple[Activation, fx.Node] | None:
    """(activation, its input) if `node` is a recognized elementwise activation call."""
    name = op_name(node)
    if name in _SIMPLE_ACTS and not node.kwargs.get("inplace", False):
        return _SIMPLE_ACTS[name], node.args[0]
    if name == "gelu":
        approximate = arg(node, 1, "approximate", "none")
        if approximate == "none":
            return Activation.GELU, node.args[0]
        if approximate == "tanh":
            return Activation.GELU_TANH, node.args[0]
    return None


def _split_half(node: fx.Node, h: fx.Node, transparent) -> tuple[GateUpLayout, int] | None:
    """If `node` is one half of `h` split along the last axis: (layout, 0 for first / 1 for second)."""
    node = follow(node, transparent=transparent)
    if op_name(node) != "getitem":
        return None
    base, index = node.args
    if isinstance(index, int) and op_name(base) in ("chunk", "split") and follow(base.args[0], transparent=transparent) is h:
        chunks, dim = base.args[1], arg(base, 2, "dim", 0)
        two_way = chunks == 2 if op_name(base) == "chunk" else False
        width = h.meta["example_value"].shape[-1]
        if op_name(base) == "split":  # split(size): two halves when size == width / 2
            two_way = isinstance(chunks, int) and chunks * 2 == width
        if two_way and dim in (-1, h.meta["example_value"].dim() - 1):
            return GateUpLayout.CONCAT, index
        return None
    if follow(base, transparent=transparent) is h and isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis:
        s = index[1]
        if isinstance(s, slice) and s.step == 2 and s.stop is None and s.start in (None, 0, 1):
            return GateUpLayout.INTERLEAVED, int(s.start or 0)
    return None


def recognize_gated_activation(a: fx.Node, h: fx.Node, transparent=frozenset()) -> tuple[Activation, GateUpLayout]:
    """Prove that `a` (the down GEMM's input) is act(gate) * up of the gate_up GEMM's output `h`."""
    a = follow(a, transparent=transparent)
    if op_name(a) != "mul" or len(a.args) != 2 or not all(isinstance(x, fx.Node) for x in a.args):
        raise Reject(f"down GEMM input is `{op_name(a)}`, expected act(gate) * up")
    for act_side, up_side in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
        act = _activation(follow(act_side))
        if act is None:
            continue
        activation, gate = act
        gate_half, up_half = _split_half(gate, h, transparent), _split_half(up_side, h, transparent)
        if gate_half is None or up_half is None:
            raise Reject("gate/up are not the two halves of the gate_up GEMM output (chunk(2, -1) or [..., ::2]/[..., 1::2])")
        if gate_half[0] != up_half[0] or (gate_half[1], up_half[1]) != (0, 1):
            raise Reject(f"gate is half {gate_half[1]} and up is half {up_half[1]} ({gate_half[0].value}); expected gate first")
        return activation, gate_half[0]
    raise Reject(
        f"unrecognized gate activation: neither factor of the product is one of silu/gelu/gelu_tanh/relu "
        f"(got `{op_name(follow(a.args[0]))}` and `{op_name(follow(a.args[1]))}`)"
    )
