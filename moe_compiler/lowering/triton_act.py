"""Triton: the gated activation of the expert MLP, shared by the decode and the sorted (prefill) kernels.

    gate [R, N], up [R, N] (fp32 accumulators) -> a = act(gate) * up [R, N] (fp32)
    and backward (triton_backward.py): d a, gate, up -> (d gate, d up, a)

and as one elementwise kernel (`gated_rows`) for the shared MLP's cuBLAS outputs: gate, up -> a in their
dtype, fp32 math, one pass (torch's silu + mul would be two).

Codes (constexpr ACT) match spec.Activation; GPT-OSS's clamped SwiGLU reads its runtime scalars alpha
and limit, the clamped SiLU (DeepSeek-V4) limit. The math mirrors activations.gated_forward, the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import Activation, ExpertsSpec
from . import launch

ACT_CODE = {
    Activation.SILU: 0, Activation.GELU: 1, Activation.GELU_TANH: 2, Activation.RELU: 3, Activation.GPT_OSS_SWIGLU: 4,
    Activation.SILU_CLAMPED: 5,
}


@triton.jit
def _swiglu_clamps(gate, up, limit):
    """GPT-OSS's and DeepSeek-V4's clamps: gate <= limit (one-sided), |up| <= limit."""
    return tl.minimum(gate, limit), tl.minimum(tl.maximum(up, -limit), limit)


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
        gate, up = _swiglu_clamps(gate, up, limit)
        if ACT == 4:  # GPT-OSS: (up + 1) * gate * sigmoid(alpha * gate)
            return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
        return gate * tl.sigmoid(gate) * up  # DeepSeek-V4: plain SwiGLU of the clamped halves


@triton.jit
def gated_act_backward(da, gate, up, alpha, limit, ACT: tl.constexpr):
    """(d gate, d up, act(gate) * up) from d(act(gate) * up) and the pre-activation halves (fp32); the
    derivatives of torch_activations.gated_backward_halves."""
    if ACT == 0:  # SiLU
        sig = tl.sigmoid(gate)
        f = gate * sig
        df = sig * (1.0 + gate * (1.0 - sig))
        d_gate, d_up, a = da * up * df, da * f, f * up
    elif ACT == 1:  # GELU (erf)
        cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))
        f = gate * cdf
        df = cdf + gate * 0.3989422804014327 * tl.exp(-0.5 * gate * gate)
        d_gate, d_up, a = da * up * df, da * f, f * up
    elif ACT == 2:  # GELU (tanh)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        f = 0.5 * gate * (1.0 + th)
        df = 0.5 * (1.0 + th) + 0.5 * gate * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * gate * gate)
        d_gate, d_up, a = da * up * df, da * f, f * up
    elif ACT == 3:  # ReLU (aten's threshold_backward: gradient where the output is > 0)
        f = tl.maximum(gate, 0.0)
        d_gate, d_up, a = tl.where(gate > 0.0, da * up, 0.0), da * f, f * up
    else:  # the clamped forms: clamps pass the gradient where the bound is not exceeded (inclusive, as aten)
        # GPT-OSS: (up_c + 1) * glu(gate_c) with glu(x) = x * sigmoid(alpha x); DeepSeek-V4: up_c * glu at alpha 1
        gate_c, up_c = _swiglu_clamps(gate, up, limit)
        scale = alpha if ACT == 4 else 1.0
        up_f = up_c + 1.0 if ACT == 4 else up_c
        sig = tl.sigmoid(gate_c * scale)
        glu = gate_c * sig
        d_glu = sig + scale * gate_c * sig * (1.0 - sig)
        d_gate = tl.where(gate <= limit, da * up_f * d_glu, 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), da * glu, 0.0)
        a = up_f * glu
    return d_gate, d_up, a


@triton.jit
def _gated_rows_kernel(g_ptr, u_ptr, out_ptr, N, alpha, limit, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    gate = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, gated_act(gate, up, alpha, limit, ACT).to(out_ptr.dtype.element_ty), mask=ok)


def gated_rows(gate: torch.Tensor, up: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """act(gate) * up for two contiguous tensors of one shape and dtype (computed in fp32)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = launch.empty_like(gate)
    N, BLOCK = gate.numel(), 2048
    if N:
        launch.kernel(_gated_rows_kernel)[(triton.cdiv(N, BLOCK),)](
            gate, up, out, N, float(spec.swiglu_alpha), float(spec.swiglu_limit), ACT=ACT_CODE[spec.activation],
            BLOCK=BLOCK, num_warps=8,
        )
    return out
