"""Recognizer for the gated activation between the two expert GEMMs: a = act(gate) * up.

Mirrors `_default_apply_gate` of transformers/integrations/moe.py (transformers 5.17-5.23):

    gate, up = gate_up_out.chunk(2, dim=-1)      # concat layout
    return self.act_fn(gate) * up                # act_fn = ACT2FN[config.hidden_act]

and the interleaved split `gate_up_out[..., ::2], gate_up_out[..., 1::2]`. Activations are proven by
the op Dynamo recorded (nn.SiLU and GELU modules inline to F.silu / F.gelu), never by config name.

Also GPT-OSS's `GptOssExperts._apply_gate` (models/gpt_oss/modeling_gpt_oss.py, 5.17-5.23):

    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit); up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..spec import Activation, GateUpLayout
from .fx_utils import arg, follow, op_name
from .match import Reject

_SIMPLE_ACTS = {"silu": Activation.SILU, "relu": Activation.RELU}


@dataclasses.dataclass(frozen=True)
class GatedActivation:
    activation: Activation
    layout: GateUpLayout
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


def activation_of(node: fx.Node) -> tuple[Activation, fx.Node] | None:
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
    if (
        isinstance(index, int) and op_name(base) in ("chunk", "split")
        and follow(base.args[0], transparent=transparent) is h
    ):
        chunks, dim = base.args[1], arg(base, 2, "dim", 0)
        two_way = chunks == 2 if op_name(base) == "chunk" else False
        width = h.meta["example_value"].shape[-1]
        if op_name(base) == "split":  # split(size): two halves when size == width / 2
            two_way = isinstance(chunks, int) and chunks * 2 == width
        if two_way and dim in (-1, h.meta["example_value"].dim() - 1):
            return GateUpLayout.CONCAT, index
        return None
    if (
        follow(base, transparent=transparent) is h and isinstance(index, tuple) and len(index) == 2
        and index[0] is Ellipsis
    ):
        s = index[1]
        if isinstance(s, slice) and s.step == 2 and s.stop is None and s.start in (None, 0, 1):
            return GateUpLayout.INTERLEAVED, int(s.start or 0)
    return None


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _clamp_bounds(node: fx.Node) -> tuple[fx.Node, float | None, float | None] | None:
    """(input, min, max) of a clamp by constants (None: that side unbounded); None for anything else, a clamp by
    tensors included."""
    if op_name(node) not in ("clamp", "clip"):
        return None
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if any(b is not None and _number(b) is None for b in (lo, hi)):
        return None
    return node.args[0], (None if lo is None else _number(lo)), (None if hi is None else _number(hi))


def _swiglu_limit(gate_clamp, up_clamp) -> float | None:
    """L when the gate is clamped to (None, L) and up to (-L, L), L > 0 (GPT-OSS's and DeepSeek-V4's clamps)."""
    if gate_clamp is None or up_clamp is None or gate_clamp[1] is not None:
        return None
    limit = gate_clamp[2]
    return limit if limit is not None and limit > 0 and up_clamp[1:] == (-limit, limit) else None


def clamped_silu(activation: Activation, gate: fx.Node, up: fx.Node, transparent):
    """(gate, up, limit) under DeepSeek-V4's clamps — gate.clamp(max=L), up.clamp(-L, L) around a SiLU — or None
    where neither factor is clamped; Reject for any other clamp."""
    gate_clamp = _clamp_bounds(follow(gate, transparent=transparent))
    up_clamp = _clamp_bounds(follow(up, transparent=transparent))
    if gate_clamp is None and up_clamp is None:
        return None
    limit = _swiglu_limit(gate_clamp, up_clamp)
    if activation is not Activation.SILU or limit is None:
        raise Reject(
            f"clamped gate/up around {activation.value}: gate to {gate_clamp and gate_clamp[1:]}, up to "
            f"{up_clamp and up_clamp[1:]}; the op computes silu(gate.clamp(max=L)) * up.clamp(-L, L) only"
        )
    return gate_clamp[0], up_clamp[0], limit


def _gpt_oss_swiglu(a: fx.Node, h: fx.Node, transparent) -> GatedActivation | None:
    """(up_c + 1) * (gate_c * sigmoid(gate_c * alpha)), gate_c = clamp(gate, max=L), up_c = clamp(up, -L, L)."""
    for plus_one, glu in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
        plus_one, glu = follow(plus_one, transparent=transparent), follow(glu, transparent=transparent)
        if op_name(plus_one) != "add" or _number(plus_one.args[1]) != 1.0 or op_name(glu) != "mul":
            continue
        up_clamp = _clamp_bounds(follow(plus_one.args[0], transparent=transparent))
        for gate_c, sig in ((glu.args[0], glu.args[1]), (glu.args[1], glu.args[0])):
            sig = follow(sig, transparent=transparent)
            if not isinstance(gate_c, fx.Node) or op_name(sig) != "sigmoid":
                continue
            scaled = follow(sig.args[0], transparent=transparent)
            if op_name(scaled) != "mul" or scaled.args[0] is not gate_c or _number(scaled.args[1]) is None:
                continue
            gate_clamp = _clamp_bounds(follow(gate_c, transparent=transparent))
            if gate_clamp is None or up_clamp is None:
                raise Reject("GPT-OSS-style gate without the clamps of GptOssExperts._apply_gate")
            limit = _swiglu_limit(gate_clamp, up_clamp)
            if limit is None:
                raise Reject(
                    f"GPT-OSS clamps are gate<= {gate_clamp[1:]} and up in {up_clamp[1:]}, expected (None, L) and (-L, "
                    "L)"
                )
            gate_half, up_half = _split_half(gate_clamp[0], h, transparent), _split_half(up_clamp[0], h, transparent)
            if (
                gate_half is None or up_half is None or gate_half[0] != up_half[0]
                or (gate_half[1], up_half[1]) != (0, 1)
            ):
                raise Reject("GPT-OSS gate/up are not the first/second halves of the gate_up GEMM output")
            return GatedActivation(Activation.GPT_OSS_SWIGLU, gate_half[0], _number(scaled.args[1]), limit)
    return None


def recognize_gated_activation(a: fx.Node, h: fx.Node, transparent=frozenset()) -> GatedActivation:
    """Prove that `a` (the down GEMM's input) is act(gate) * up of the gate_up GEMM's output `h`."""
    a = follow(a, transparent=transparent)
    if op_name(a) != "mul" or len(a.args) != 2 or not all(isinstance(x, fx.Node) for x in a.args):
        raise Reject(f"down GEMM input is `{op_name(a)}`, expected act(gate) * up")
    if (gpt_oss := _gpt_oss_swiglu(a, h, transparent)) is not None:
        return gpt_oss
    for act_side, up_side in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
        act = activation_of(follow(act_side))
        if act is None:
            continue
        activation, gate = act
        limit = GatedActivation.swiglu_limit
        if (clamped := clamped_silu(activation, gate, up_side, transparent)) is not None:
            gate, up_side, limit = clamped
            activation = Activation.SILU_CLAMPED
        gate_half, up_half = _split_half(gate, h, transparent), _split_half(up_side, h, transparent)
        if gate_half is None or up_half is None:
            raise Reject(
                "gate/up are not the two halves of the gate_up GEMM output (chunk(2, -1) or [..., ::2]/[..., 1::2])"
            )
        if gate_half[0] != up_half[0] or (gate_half[1], up_half[1]) != (0, 1):
            raise Reject(
                f"gate is half {gate_half[1]} and up is half {up_half[1]} ({gate_half[0].value}); expected gate first"
            )
        return GatedActivation(activation, gate_half[0], swiglu_limit=limit)
    raise Reject(
        f"unrecognized gate activation: neither factor of the product is one of silu/gelu/gelu_tanh/relu "
        f"(got `{op_name(follow(a.args[0]))}` and `{op_name(follow(a.args[1]))}`)"
    )


def recognize_split_gated_activation(a: fx.Node) -> tuple[Activation, fx.Node, fx.Node]:
    """a = act(gate) * up with gate and up from two separate GEMMs (nn.Linear experts: w1 / w3,
    gate_proj / up_proj): returns (activation, gate node, up node); which GEMMs they are is the
    caller's to prove."""
    a = follow(a)
    if op_name(a) != "mul" or len(a.args) != 2 or not all(isinstance(x, fx.Node) for x in a.args):
        raise Reject(f"down projection input is `{op_name(a)}`, expected act(gate) * up")
    for act_side, up_side in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
        act = activation_of(follow(act_side))
        if act is not None:
            return act[0], follow(act[1]), follow(up_side)
    raise Reject(
        f"unrecognized gate activation: neither factor of the product is one of silu/gelu/gelu_tanh/relu "
        f"(got `{op_name(follow(a.args[0]))}` and `{op_name(follow(a.args[1]))}`)"
    )
