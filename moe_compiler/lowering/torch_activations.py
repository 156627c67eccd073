"""Gated activations of the expert MLP, forward and backward, on rows of the gate_up projection.

    h [S, 2I] --split by spec.gate_up--> gate [S, I], up [S, I] --> a = act(gate) * up [S, I]

Backward formulas are written out (not autograd) because they run inside the op's own backward op,
below the autograd dispatch key. They reuse aten's activation backward kernels where one exists so
the derivative matches eager autograd bit for bit in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import Activation, ExpertsSpec, GateUpLayout


def split_gate_up(h: torch.Tensor, spec: ExpertsSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.gate_up is GateUpLayout.CONCAT:
        gate, up = h.chunk(2, dim=-1)
    else:
        gate, up = h[..., 0::2], h[..., 1::2]
    return gate, up


def join_gate_up(d_gate: torch.Tensor, d_up: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    if spec.gate_up is GateUpLayout.CONCAT:
        return torch.cat([d_gate, d_up], dim=-1)
    return torch.stack([d_gate, d_up], dim=-1).flatten(-2)


def _act(gate: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    act = spec.activation
    if act is Activation.SILU:
        return F.silu(gate)
    if act is Activation.GELU:
        return F.gelu(gate)
    if act is Activation.GELU_TANH:
        return F.gelu(gate, approximate="tanh")
    if act is Activation.RELU:
        return F.relu(gate)
    raise NotImplementedError(f"NYI: activation {act}")


def _act_backward(grad: torch.Tensor, gate: torch.Tensor, act_out: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    act = spec.activation
    if act is Activation.SILU:
        return torch.ops.aten.silu_backward(grad, gate)
    if act is Activation.GELU:
        return torch.ops.aten.gelu_backward(grad, gate, approximate="none")
    if act is Activation.GELU_TANH:
        return torch.ops.aten.gelu_backward(grad, gate, approximate="tanh")
    if act is Activation.RELU:
        return torch.ops.aten.threshold_backward(grad, act_out, 0)
    raise NotImplementedError(f"NYI: activation {act}")


def gated_forward(h: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """a = act(gate) * up, computed in h's dtype (callers pass fp32 for accuracy)."""
    return gated_forward_halves(*split_gate_up(h, spec), spec)


def gated_forward_halves(gate: torch.Tensor, up: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """act(gate) * up from the two halves, in their dtype."""
    if spec.activation is Activation.GPT_OSS_SWIGLU:
        # Mirrors GptOssExperts._apply_gate (transformers 5.x): one-sided clamp on gate, two-sided on up.
        gate, up = _swiglu_clamps(gate, up, spec.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    if spec.activation is Activation.SILU_CLAMPED:
        # Mirrors DeepseekV4Experts._apply_gate: the same clamps, then silu(gate) * up.
        gate, up = _swiglu_clamps(gate, up, spec.swiglu_limit)
        return F.silu(gate) * up
    return _act(gate, spec) * up


def _swiglu_clamps(gate: torch.Tensor, up: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.clamp(max=limit), up.clamp(min=-limit, max=limit)


def gated_backward(da: torch.Tensor, h: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """d(loss)/dh [S, 2I] from d(loss)/da [S, I] and the saved pre-activation h."""
    return join_gate_up(*gated_backward_halves(da, *split_gate_up(h, spec), spec), spec)


def gated_backward_halves(da: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, spec: ExpertsSpec):
    """(d gate, d up) from d(loss)/da and the pre-activation halves."""
    if spec.activation is Activation.GPT_OSS_SWIGLU:
        limit, alpha = spec.swiglu_limit, spec.swiglu_alpha
        gate_c, up_c = _swiglu_clamps(gate, up, limit)
        sig = torch.sigmoid(gate_c * alpha)
        glu = gate_c * sig
        d_glu = sig + alpha * gate_c * sig * (1 - sig)
        # clamp's gradient passes where the bound is not exceeded (bounds inclusive, as in aten).
        d_gate = da * (up_c + 1) * d_glu * (gate <= limit)
        d_up = da * glu * ((up >= -limit) & (up <= limit))
        return d_gate, d_up
    if spec.activation is Activation.SILU_CLAMPED:
        limit = spec.swiglu_limit
        gate_c, up_c = _swiglu_clamps(gate, up, limit)
        d_gate = torch.ops.aten.silu_backward(da * up_c, gate_c) * (gate <= limit)
        return d_gate, da * F.silu(gate_c) * ((up >= -limit) & (up <= limit))
    act_out = _act(gate, spec)
    return _act_backward(da * up, gate, act_out, spec), da * act_out
