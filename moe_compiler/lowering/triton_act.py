"""Triton: the gated activation of the expert MLP, shared by the decode and the sorted (prefill) kernels.

    gate [R, N], up [R, N] (fp32 accumulators) -> a = act(gate) * up [R, N] (fp32)

Codes (constexpr ACT) match spec.Activation; GPT-OSS's clamped SwiGLU reads its runtime scalars alpha
and limit. The math mirrors activations.gated_forward, the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..spec import Activation

ACT_CODE = {Activation.SILU: 0, Activation.GELU: 1, Activation.GELU_TANH: 2, Activation.RELU: 3, Activation.GPT_OSS_SWIGLU: 4}


@triton.jit
def gated_act(gate, up, alpha, limit, ACT: tl.constexpr):
    if ACT == 0:
        return gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif ACT == 2:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0)) * up  # tanh(x) = 2 sigmoid(2x) - 1
    elif ACT == 3:
        return tl.maximum(gate, 0.0) * up
    else:
        # GPT-OSS: one-sided clamp of gate, two-sided of up, then (up + 1) * gate * sigmoid(alpha * gate).
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
