"""moe_compiler.testing's fp64 experts reference: what its options change."""

from __future__ import annotations

import torch

from moe_compiler.spec import Activation, ExpertsSpec
from moe_compiler.testing import experts_reference


def test_z_dtype_decides_the_clamps_on_the_rounded_pre_activation():
    """One pair, H = I = 1, up = 1.001 against the clamp bound 1: in fp64 the clamp cuts the up weight's gradient,
    in bf16 (the z a backward reads) up rounds to 1.0, inside the bound, and the gradient passes straight through
    the rounding. The output is the same either way."""
    spec = ExpertsSpec(Activation.SILU_CLAMPED, swiglu_limit=1.0)
    x = torch.ones(1, 1, dtype=torch.float64)
    ids, weights = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.float64)
    w_down = torch.ones(1, 1, 1, dtype=torch.float64)

    def grad_and_out(z_dtype):
        w_gate_up = torch.tensor([[[0.5], [1.001]]], dtype=torch.float64, requires_grad=True)  # [E, 2I, H]: gate, up
        out = experts_reference(x, ids, weights, w_gate_up, w_down, spec=spec, z_dtype=z_dtype)
        (grad,) = torch.autograd.grad(out.sum(), w_gate_up)
        return grad[0, :, 0], out

    (g64, out64), (g16, out16) = grad_and_out(None), grad_and_out(torch.bfloat16)
    silu = torch.nn.functional.silu(torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(out64, out16) and torch.allclose(out64, silu.reshape(1, 1))
    assert g64[1] == 0 and torch.isclose(g16[1], silu)  # d out / d up: clamped in fp64, inside the bound in bf16
    assert torch.isclose(g64[0], g16[0])  # the gate's gradient: the same clamp (max 1) spares 0.5 either way
