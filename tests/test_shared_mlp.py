"""The experts op with the block's shared experts (its shared_* arguments; lowering/torch_shared.py),
against fp64 references, its gradients against fp64 autograd, opcheck, and clear errors."""

from __future__ import annotations

import pytest
import torch

import moe_compiler  # noqa: F401  (registers the ops)
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout
from reference import experts_reference, rel_err, shared_reference
from test_ops import make_inputs

OP = torch.ops.moe_compiler.experts.default
# (fused gate_up Linear, sigmoid expert gate): Granite, Qwen2-MoE / Qwen3-Next, DeepSeek-style
FORMS = [(False, True), (True, False), (False, False)]


def shared_inputs(H, Is, dtype, fused, gated, seed=1):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(dtype)  # noqa: E731
    gate_up = [rnd(2 * Is, H)] if fused else [rnd(Is, H), rnd(Is, H)]
    return gate_up, rnd(H, Is), rnd(1, H) if gated else None


def op_args(shared):
    """(shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate) from ([gate, up] or [gate_up], down, gate)."""
    gate_up, down, gate = shared
    gate_proj, up_proj = (gate_up[0], None) if len(gate_up) == 1 else gate_up
    return gate_proj, up_proj, down, gate


def call(routed, shared, spec):
    return OP(*routed, *op_args(shared), **spec.op_kwargs())


@pytest.mark.parametrize("fused,gated", FORMS, ids=["gate_up-gated", "fused-plain", "gate_up-plain"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", [ExpertsSpec(), ExpertsSpec(Activation.GELU, GateUpLayout.INTERLEAVED)], ids=["silu", "gelu-interleaved"])
def test_forward_matches_fp64_reference(fused, gated, dtype, tol, spec):
    routed = make_inputs(6, 32, 16, 8, 2, dtype, spec)
    shared = shared_inputs(32, 24, dtype, fused, gated)
    out = call(routed, shared, spec)
    ref = experts_reference(*routed, spec=spec) + shared_reference(routed[0], *shared, spec=spec)
    assert out.dtype == dtype and out.shape == (6, 32)
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("fused,gated", FORMS, ids=["gate_up-gated", "fused-plain", "gate_up-plain"])
def test_backward_matches_fp64_autograd(fused, gated):
    spec = ExpertsSpec()
    routed = [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in make_inputs(5, 16, 8, 4, 2, torch.float32)]
    gate_up, down, gate = shared_inputs(16, 12, torch.float32, fused, gated)
    leaves = [*gate_up, down, *([gate] if gated else [])]
    for t in leaves:
        t.requires_grad_()
    out = call(routed, (gate_up, down, gate), spec)
    grad = torch.randn_like(out)
    inputs = [routed[0], routed[2], routed[3], routed[4], *leaves]
    got = torch.autograd.grad(out, inputs, grad)

    as64 = [t.detach().double().requires_grad_() for t in inputs]
    x, w, w1, w2, *shared64 = as64
    gu64, rest = shared64[: len(gate_up)], shared64[len(gate_up):]
    ref = experts_reference(x, routed[1], w, w1, w2) + shared_reference(x, gu64, rest[0], rest[1] if gated else None)
    want = torch.autograd.grad(ref, as64, grad.double())
    for name, a, b in zip(["hidden", "topk_weights", "w_gate_up", "w_down", "shared"] + [""] * 3, got, want):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("fused,gated", FORMS, ids=["gate_up-gated", "fused-plain", "gate_up-plain"])
def test_opcheck(fused, gated):
    routed = [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in make_inputs(4, 16, 8, 4, 2, torch.float32)]
    gate_up, down, gate = shared_inputs(16, 12, torch.float32, fused, gated)
    for t in (*gate_up, down, *([gate] if gated else [])):
        t.requires_grad_()
    torch.library.opcheck(OP, (*routed, *op_args((gate_up, down, gate))), ExpertsSpec().op_kwargs())


def test_empty_batch_is_zeros():
    routed = make_inputs(0, 16, 8, 4, 2, torch.float32)
    out = call(routed, shared_inputs(16, 12, torch.float32, False, True), ExpertsSpec())
    assert out.shape == (0, 16)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s.__setitem__(1, None), "shared experts: expected shared_gate_proj and shared_down_proj together"),
        (lambda s: s.__setitem__(1, s[1][:, :8]), "shared gate/up shapes: expected \\[\\(8, 16\\), \\(8, 16\\)\\], got \\[\\(12, 16\\), \\(12, 16\\)\\]"),
        (lambda s: s.__setitem__(1, s[1][:8]), "shared_down_proj shape: expected \\[H=16, Is\\]"),
        (lambda s: s.__setitem__(2, torch.randn(2, 16)), "shared_expert_gate shape: expected \\(1, 16\\), got \\(2, 16\\)"),
        (lambda s: s.__setitem__(1, s[1].double()), "shared weight dtype"),
    ],
)
def test_bad_shared_inputs_raise_clear_errors(mutate, match):
    routed = make_inputs(4, 16, 8, 4, 2, torch.float32)
    shared = list(shared_inputs(16, 12, torch.float32, False, True))
    mutate(shared)
    with pytest.raises(ValueError, match=match):
        call(routed, shared, ExpertsSpec())


def test_decode_kernels_take_only_small_shared_mlps():
    """dispatch.SHARED_IN_KERNEL_MAX_BYTES: in the kernels where it measured faster (Qwen3-Next's 6 MB shared
    MLP), cuBLAS in the op where it did not (DeepSeek-V3's 88 MB)."""
    from moe_compiler.lowering import dispatch
    from moe_compiler.spec import SharedMLP

    def mlp(H, Is):
        w = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")  # noqa: E731
        return SharedMLP(w(Is, H), w(Is, H), w(H, Is), None)

    assert dispatch._shared_in_kernel(mlp(2048, 512))
    assert not dispatch._shared_in_kernel(mlp(7168, 2048))
