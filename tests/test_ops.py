"""torch.ops.moe_compiler.experts against the fp64 reference: forward, backward, opcheck, bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_compiler  # noqa: F401  (registers the ops)
from moe_compiler import Activation, ExpertsSpec, GateUpLayout, moe_experts
from reference import experts_reference, rel_err

# (dtype, forward tolerance): fp32 math; bf16/fp16 operands with fp32 accumulation.
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]

SPECS = [
    ExpertsSpec(),  # SwiGLU, concat, [E, 2I, H] (Qwen / Mixtral / DeepSeek)
    ExpertsSpec(Activation.GELU, GateUpLayout.INTERLEAVED),
    ExpertsSpec(Activation.GELU_TANH),
    ExpertsSpec(Activation.RELU),
    ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True, swiglu_limit=1.0),  # GPT-OSS layout; low limit so clamps bite
    ExpertsSpec(transposed=True, scale_input=True),  # Llama-4: [E, H, 2I] weights, router weight scales the input
]

# (T, H, I, E, k), each with the edge it exercises.
SHAPES = [
    (0, 16, 8, 4, 2),  # T = 0: no tokens
    (1, 16, 8, 4, 2),  # T = 1: decode
    (7, 24, 12, 5, 1),  # k = 1, prime E, H not a power of two
    (6, 16, 8, 4, 4),  # k = E: every token visits every expert
    (33, 32, 16, 16, 3),  # more experts than tokens per expert: many empty segments
]


def make_inputs(T, H, I, E, k, dtype, spec=ExpertsSpec(), bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    hidden = rnd(T, H)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]  # distinct experts per token
    weights = torch.rand(T, k, generator=g).to(dtype)
    if spec.transposed:
        w1, w2 = rnd(E, H, 2 * I, scale=H**-0.5), rnd(E, I, H, scale=I**-0.5)
    else:
        w1, w2 = rnd(E, 2 * I, H, scale=H**-0.5), rnd(E, H, I, scale=I**-0.5)
    b1, b2 = (rnd(E, 2 * I, scale=0.1), rnd(E, H, scale=0.1)) if bias else (None, None)
    return hidden, ids, weights, w1, w2, b1, b2


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}".format(*s))
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation.value}-{s.gate_up.value}-{'t' if s.transposed else 'n'}{'-scale_input' if s.scale_input else ''}")
def test_forward_matches_fp64_reference(shape, dtype, tol, spec):
    inputs = make_inputs(*shape, dtype, spec, bias=spec.transposed)
    out = moe_experts(*inputs, spec=spec)
    ref = experts_reference(*inputs, spec=spec)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    if shape[0] == 0:
        return
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation.value}-{s.gate_up.value}-{'t' if s.transposed else 'n'}{'-scale_input' if s.scale_input else ''}")
@pytest.mark.parametrize("bias", [False, True])
def test_backward_matches_fp64_autograd(spec, bias):
    inputs = make_inputs(9, 16, 8, 5, 2, torch.float32, spec, bias=bias, seed=1)
    hidden, ids, weights, w1, w2, b1, b2 = inputs
    leaves = [t for t in (hidden, weights, w1, w2, b1, b2) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    grad_out = torch.randn(hidden.shape)
    out = moe_experts(hidden, ids, weights, w1, w2, b1, b2, spec=spec)
    grads = torch.autograd.grad(out, leaves, grad_out)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(leaves64)
    h64, wt64, w164, w264 = next(it), next(it), next(it), next(it)
    b164, b264 = (next(it), next(it)) if bias else (None, None)
    ref = experts_reference(h64, ids, wt64, w164, w264, b164, b264, spec=spec)
    grads64 = torch.autograd.grad(ref, leaves64, grad_out.double())
    for name, got, want in zip(["hidden", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down"], grads, grads64):
        assert rel_err(got, want) <= 1e-5, name


def test_backward_bf16_close_to_fp64():
    hidden, ids, weights, w1, w2, _, _ = make_inputs(17, 32, 16, 6, 2, torch.bfloat16, seed=2)
    leaves = [hidden, weights, w1, w2]
    for t in leaves:
        t.requires_grad_(True)
    grad_out = torch.randn(hidden.shape).bfloat16()
    grads = torch.autograd.grad(moe_experts(hidden, ids, weights, w1, w2), leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = experts_reference(leaves64[0], ids, leaves64[1], leaves64[2], leaves64[3])
    for got, want in zip(grads, torch.autograd.grad(ref, leaves64, grad_out.double())):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= 1e-2


def test_no_grad_for_unused_inputs_is_fine():
    hidden, ids, weights, w1, w2, _, _ = make_inputs(5, 16, 8, 4, 2, torch.float32)
    hidden.requires_grad_(True)  # only activations train (e.g. frozen experts)
    (g,) = torch.autograd.grad(moe_experts(hidden, ids, weights, w1, w2).sum(), [hidden])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(dtype, bias):
    spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True) if bias else ExpertsSpec()
    hidden, ids, weights, w1, w2, b1, b2 = make_inputs(6, 16, 8, 4, 2, dtype, spec, bias=bias)
    for t in (hidden, weights, w1, w2, b1, b2):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(torch.ops.moe_compiler.experts.default, (hidden, ids, weights, w1, w2, b1, b2), spec.op_kwargs())


def test_opcheck_scale_input():
    spec = ExpertsSpec(transposed=True, scale_input=True)  # Llama-4
    hidden, ids, weights, w1, w2, _, _ = make_inputs(6, 16, 8, 4, 2, torch.float32, spec)
    for t in (hidden, weights, w1, w2):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.moe_compiler.experts.default, (hidden, ids, weights, w1, w2, None, None), spec.op_kwargs())


def test_weights_are_read_in_place():
    """Changing a parameter in place changes the next result: nothing was cached."""
    hidden, ids, weights, w1, w2, _, _ = make_inputs(8, 16, 8, 4, 2, torch.float32)
    before = moe_experts(hidden, ids, weights, w1, w2)
    with torch.no_grad():
        w2.mul_(2.0)
    after = moe_experts(hidden, ids, weights, w1, w2)
    assert rel_err(after, 2 * before) <= 1e-6


def test_int32_ids_and_fp32_router_weights_with_bf16_hidden():
    """Mixtral / DeepSeek keep fp32 routing weights beside bf16 activations."""
    hidden, ids, weights, w1, w2, _, _ = make_inputs(10, 16, 8, 4, 2, torch.bfloat16)
    out = moe_experts(hidden, ids.int(), weights.float(), w1, w2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, experts_reference(hidden, ids, weights.float(), w1, w2)) <= 1e-2


# --- bad inputs: clear errors naming expected, got and the fix ----------------------------------

def _good():
    return list(make_inputs(4, 16, 8, 4, 2, torch.float32))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0].unsqueeze(0)), "hidden rank: expected a 2-D"),
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), "hidden dtype"),
        (lambda a: a.__setitem__(1, a[1].float()), "topk_ids: expected a 2-D \\[T, k\\] int32/int64"),
        (lambda a: a.__setitem__(1, a[1][:3]), "routing shapes"),
        (lambda a: a.__setitem__(2, a[2][:, :1]), "routing shapes"),
        (lambda a: a.__setitem__(3, a[3].double()), "w_gate_up dtype"),
        (lambda a: a.__setitem__(3, a[3][0]), "w_gate_up rank"),
        (lambda a: a.__setitem__(4, a[4][:, :, :4]), "weight shapes"),
        (lambda a: a.__setitem__(4, a[4][:3]), "weight shapes"),
        (lambda a: a.__setitem__(1, torch.full_like(a[1], 4)), "topk_ids values: expected expert ids in \\[0, 4\\), got min 4, max 4"),
        (lambda a: a.__setitem__(1, torch.full_like(a[1], -1)), "topk_ids values"),
        (lambda a: a.__setitem__(5, torch.zeros(4, 7)), "b_gate_up shape"),
        (lambda a: a.__setitem__(1, torch.zeros(4, 5, dtype=torch.long)), "top-k: expected k <= E=4"),
        (lambda a: a.__setitem__(4, a[4].to("meta")), "devices: expected all tensors on one device, got \\['cpu', 'meta'\\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    args = _good()
    mutate(args)
    if args[2].shape != args[1].shape and "top-k" in match:
        args[2] = torch.rand(args[1].shape)
    with pytest.raises(ValueError, match=match):
        moe_experts(*args)


def test_bad_spec_raises_clear_error():
    with pytest.raises(ValueError, match="ExpertsSpec.activation: expected one of"):
        ExpertsSpec("swish")
    with pytest.raises(ValueError, match="ExpertsSpec.gate_up"):
        ExpertsSpec(Activation.SILU, "stacked")


def test_bad_inputs_fail_at_compile_time_too():
    """The fake runs the same checks, so a compiled caller fails while tracing, with the same message."""
    args = _good()
    args[3] = args[3][:, :6]  # 2I != 2 * I
    fn = torch.compile(lambda *a: moe_experts(*a), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="weight shapes"):
        fn(*args)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 40),
    H=st.sampled_from([8, 16, 24, 40]),
    I=st.sampled_from([4, 8, 12, 20]),
    E=st.integers(1, 12),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_forward_property_random_shapes(T, H, I, E, k_frac, dtype, seed):
    """Any shape and dtype, aligned or not (unaligned rows take the Python loop on CPU)."""
    k = 1 + int(k_frac * (E - 1))
    inputs = make_inputs(T, H, I, E, k, dtype, seed=seed)
    out = moe_experts(*inputs)
    assert out.shape == (T, H) and out.dtype == dtype
    if T:
        assert rel_err(out, experts_reference(*inputs)) <= dict(DTYPES)[dtype]
