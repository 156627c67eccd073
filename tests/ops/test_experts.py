"""torch.ops.moe_compiler.experts (ops/experts.py) against fp64 references: forward, backward, opcheck, bad inputs,
the block's shared experts (its shared_* arguments), and on the GPU real model shapes, huge T and CUDA graphs."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_compiler import Activation, ExpertsSpec, GateUpLayout, moe_experts
from moe_compiler.lowering.torch_activations import gated_forward
from moe_compiler.testing import (
    cuda_experts_inputs,
    experts_inputs,
    experts_reference,
    experts_reference_by_expert,
    poisoned_run,
    pre_activations,
    rel_err,
    shared_inputs,
    shared_reference,
    spec_id,
)
from moe_compiler.testing.cuda_graphs import captured, replay
from moe_compiler.tune.shapes import SHAPES

OP = torch.ops.moe_compiler.experts.default
TRAIN = torch.ops.moe_compiler.experts_train.default

# (name, E, k, H, I) of DESIGN.md §6, the benchmark's real shapes.
REAL_SHAPES = [(name, *shape) for name, shape in SHAPES.items()]

# (dtype, forward tolerance): fp32 math; bf16/fp16 operands with fp32 accumulation.
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]

SPECS = [
    ExpertsSpec(),  # SwiGLU, concat, [E, 2I, H] (Qwen / Mixtral / DeepSeek)
    ExpertsSpec(Activation.GELU, GateUpLayout.INTERLEAVED),
    ExpertsSpec(Activation.GELU_TANH),
    ExpertsSpec(Activation.RELU),
    # GPT-OSS layout; a low limit so the clamps bite
    ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True, swiglu_limit=1.0),
    ExpertsSpec(Activation.SILU_CLAMPED, swiglu_limit=1.0),  # DeepSeek-V4
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


def _trainable(tensors):
    return [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}".format(*s))
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_forward_matches_fp64_reference(shape, dtype, tol, spec):
    inputs = experts_inputs(*shape, dtype, spec, bias=spec.transposed)
    out = moe_experts(*inputs, spec=spec)
    ref = experts_reference(*inputs, spec=spec)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    if shape[0] == 0:
        return
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("bias", [False, True])
def test_backward_matches_fp64_autograd(spec, bias):
    inputs = experts_inputs(9, 16, 8, 5, 2, torch.float32, spec, bias=bias, seed=1)
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
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(17, 32, 16, 6, 2, torch.bfloat16, seed=2)
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
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(5, 16, 8, 4, 2, torch.float32)
    hidden.requires_grad_(True)  # only activations train (e.g. frozen experts)
    (g,) = torch.autograd.grad(moe_experts(hidden, ids, weights, w1, w2).sum(), [hidden])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_experts_train_is_experts_plus_the_saved_z(device, spec):
    """experts_train: the experts op's output and gradients (fp64 autograd), and z — on CUDA + Triton (not
    scale_input) each pair's pre-activation row at t*k + j (what the Triton backward reads instead of its
    recompute), elsewhere [0, 2I]; z takes no gradient."""
    T, H, I, E, k = 33, 32, 16, 16, 3
    inputs = experts_inputs(T, H, I, E, k, torch.float32, spec, bias=spec.transposed, seed=3)
    hidden, ids, weights, w1, w2, b1, b2 = [t.to(device) if t is not None else None for t in inputs]
    leaves = [t.requires_grad_() for t in (hidden, weights, w1, w2, b1, b2) if t is not None]
    out, z = TRAIN(hidden, ids, weights, w1, w2, b1, b2, **spec.op_kwargs())
    saves = device == "cuda" and not spec.scale_input
    assert z.shape == (T * k if saves else 0, 2 * I) and not z.requires_grad
    if saves:
        assert rel_err(z.cpu(), pre_activations(*[t.detach().cpu() for t in (hidden, ids, w1)],
                                                b1.detach().cpu() if b1 is not None else None, spec)) <= 1e-5
    grad_out = torch.randn(T, H, device=device)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    it = iter(leaves64)
    h64, wt64, w164, w264 = next(it), next(it), next(it), next(it)
    b164, b264 = (next(it), next(it)) if b1 is not None else (None, None)
    ref = experts_reference(h64, ids.cpu(), wt64, w164, w264, b164, b264, spec=spec)
    assert rel_err(out.detach().cpu(), ref) <= 1e-4
    for got, want in zip(grads, torch.autograd.grad(ref, leaves64, grad_out.cpu().double())):
        assert rel_err(got.cpu(), want) <= 1e-4


@pytest.fixture
def triton_training_on_the_cpu(monkeypatch):
    """experts_train saving z and the Triton backward reading it — the path of a training graph on CUDA — on the
    CPU under Triton's interpreter (the forward with fixed small tiles: its config lookup asks the GPU). Returns
    the dispatch functions of the backward, in the order called (the second half's with the number of saved z's
    freed by then)."""
    if torch.cuda.is_available():
        pytest.skip("the CUDA run is test_the_split_backward_frees_z_in_a_compiled_graph")
    pytest.importorskip("triton")
    # the ops opaque under torch.compile: a recorded launch of an interpreted kernel would run at trace time (the
    # recorded training path's trace: tests/ops/test_inline.py; its freeing on the GPU: the test named above)
    monkeypatch.setenv("MOE_COMPILER_INLINE", "0")
    from moe_compiler.lowering import dispatch, torch_shared, triton_experts
    from moe_compiler.lowering.triton_config import KernelConfig, SortedConfig

    small = KernelConfig(block_n=16, block_k=16, num_warps=4, num_stages=2)
    config = SortedConfig(block_m=16, gate_up=small, down=small)

    def saving_z(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, shared=None):
        z = hidden.new_empty(topk_ids.numel(), 2 * spec.intermediate(w_down))
        out, _ = triton_experts.experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                                                spec, config, z=z)
        if shared is not None:
            out = torch_shared.forward(out, hidden, shared, spec, torch_shared.torch_gated_rows)
        return out, z

    saving_z.freed = []  # one flag per saved z: set once its storage is freed

    def tracked(*args, **kwargs):
        out, z = saving_z(*args, **kwargs)
        weakref.finalize(z.untyped_storage(), saving_z.freed.append, True)
        return out, z

    dz_freed = []  # one flag per dz of experts_backward_down: set once its storage is freed
    real_down = dispatch.experts_backward_down

    def tracked_down(*args, **kwargs):
        down = real_down(*args, **kwargs)
        weakref.finalize(down.dz.untyped_storage(), dz_freed.append, True)
        return down

    monkeypatch.setattr(dispatch, "_triton_backward_runs", lambda hidden, spec: not spec.scale_input)
    monkeypatch.setattr(dispatch, "experts_forward_saving_z", tracked)
    monkeypatch.setattr(dispatch, "experts_backward_down", tracked_down)
    calls = []
    # each call recorded by name; the gate_up part's with how many saved z were freed before it, the combine's with
    # how many dz
    freed = {"experts_backward_gate_up": saving_z.freed, "experts_backward_combine": dz_freed}
    for name in ("experts_backward", "experts_backward_down", "experts_backward_gate_up", "experts_backward_combine"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _n=name, _f=real, **kw: calls.append(
            (_n, _freed(freed[_n])) if _n in freed else _n) or _f(*a, **kw))
    return calls


def _freed(flags: list) -> int:
    gc.collect()  # the interpreter's launches leave reference cycles through their arguments (not so on a GPU)
    return len(flags)


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "with_shared"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen_experts"])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[4]], ids=spec_id)
def test_a_saved_z_is_read_by_a_backward_in_three_ops(spec, frozen, shared, triton_training_on_the_cpu):
    """With z saved, the backward is experts_backward_down (reads z: dz, the router weights' and W_down's
    gradients), experts_backward_gate_up (from dz: W_gate_up's gradients and d hidden's rows), then
    experts_backward_combine (hidden's and the shared MLP's); together they give every gradient of the fp64
    reference, and dz is dropped before the last runs (eager too). Frozen experts: no weight gradient computed."""
    T, H, I, E, k = 21, 32, 16, 4, 2
    hidden, ids, weights, w1, w2, b1, b2 = experts_inputs(T, H, I, E, k, torch.float32, spec, bias=spec.transposed,
                                                          seed=11)
    (gate, up), down, egate = shared_inputs(H, 24, torch.float32, fused=False, gated=True) if shared else ((None,) * 2,
                                                                                                    None, None)
    parts = (gate, up, down, egate)
    experts = [t for t in (w1, w2, b1, b2, *parts) if t is not None]
    trained = [hidden, weights, *([] if frozen else experts)]
    for t in trained:
        t.requires_grad_(True)
    out, z = TRAIN(hidden, ids, weights, w1, w2, b1, b2, *parts, **spec.op_kwargs())
    assert z.shape == (T * k, 2 * I)
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, trained, grad_out)
    assert triton_training_on_the_cpu == ["experts_backward_down", ("experts_backward_gate_up", 0),  # eager: z held
                                          ("experts_backward_combine", 1)]
    leaves = {id(t): t.detach().double().requires_grad_(True) for t in (hidden, weights, *experts)}
    d = lambda t: None if t is None else leaves[id(t)]  # noqa: E731
    ref = experts_reference(d(hidden), ids, d(weights), d(w1), d(w2), d(b1), d(b2), spec=spec)
    if shared:
        ref = ref + shared_reference(d(hidden), [d(gate), d(up)], d(down), d(egate), spec=spec)
    want = torch.autograd.grad(ref, [leaves[id(t)] for t in trained], grad_out.double())
    for got, w in zip(grads, want):
        assert rel_err(got, w) <= 1e-4


def test_a_large_tile_backward_runs_through_the_three_ops(triton_training_on_the_cpu, monkeypatch):
    """120 unpadded rows per expert (T = 240, k = 2, E = 4): the default backward takes GroupedTile.LARGE (on the
    GPU torch would run its ping-pong grouped GEMM kernel), so dz crosses the ops with 129 E rows, the fake's size
    (dz_shape), its trailing ones never read; every gradient equals fp64's (fp32 on torch's CPU grouped GEMM)."""
    from moe_compiler.lowering import dispatch, triton_backward

    spec = SPECS[0]
    T, H, I, E, k = 240, 32, 16, 4, 2
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(T, H, I, E, k, torch.float32, spec, seed=5)
    config = triton_backward.default_config(torch.float32, E, k, H, I, T, True)
    assert config.grouped_tile is triton_backward.GroupedTile.LARGE and config.unpadded
    dz_rows = []
    down = dispatch.experts_backward_down
    monkeypatch.setattr(dispatch, "experts_backward_down",
                        lambda *a, **kw: (lambda d: dz_rows.append(d.dz.shape) or d)(down(*a, **kw)))
    trained = [hidden, weights, w1, w2]
    for t in trained:
        t.requires_grad_(True)
    out, _ = TRAIN(hidden, ids, weights, w1, w2, None, None, None, None, None, None, **spec.op_kwargs())
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, trained, grad_out)
    assert dz_rows == [(129 * E, 2 * I)] == [triton_backward.dz_shape(hidden, ids, w1, w2, spec)]
    leaves = [t.detach().double().requires_grad_(True) for t in trained]
    ref = experts_reference(leaves[0], ids, leaves[1], leaves[2], leaves[3], spec=spec)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, grad_out.double())):
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("dynamic,of_hidden", [(False, True), (False, False), (True, True)],
                         ids=["static", "static_weights_only", "dynamic"])
def test_a_compiled_backward_frees_z_and_dz_before_their_next_parts(dynamic, of_hidden, triton_training_on_the_cpu,
                                                                    no_compile_caches):
    """Traced (the ops' fakes) with T static: three ops, and z — saved by the forward, cleared from the autograd
    context by AOTAutograd, last read by the first — is freed before the second allocates anything, dz (last read
    by the second) before the third. Without hidden's gradient the third (d hidden) is not run at all. Under dynamic
    shapes the first part's row bound (chosen from T) is not static: one experts_backward op. Gradients equal
    eager's either way."""
    spec = SPECS[0]
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(9, 16, 8, 4, 2, torch.float32, spec, seed=4)
    wrt = ([hidden.requires_grad_(True)] if of_hidden else []) + [w1.requires_grad_(True), w2.requires_grad_(True)]
    params = wrt[-2:]
    f = lambda x: TRAIN(x, ids[: x.shape[0]], weights[: x.shape[0]], *params, **spec.op_kwargs())[0].sum()  # noqa: E731
    eager = torch.autograd.grad(f(hidden), wrt)
    triton_training_on_the_cpu.clear()
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, dynamic=dynamic)(hidden), wrt)
    want = ["experts_backward"] if dynamic else ["experts_backward_down", ("experts_backward_gate_up", 2)] + [
        ("experts_backward_combine", 2)] * of_hidden
    assert triton_training_on_the_cpu == want  # 2: eager's z (dz), then the compiled call's
    for a, b in zip(got, eager):
        assert rel_err(a, b) <= 1e-5


def test_split_backward_opcheck(triton_training_on_the_cpu):
    """Schema, fakes and autograd registration of the three ops. Not their outputs run to run: dz's and dx_rows's
    rows past the aligned pairs are never written nor read (their contract), so two runs differ there; the
    gradients they lead to are the tests above."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)
    inputs = experts_inputs(6, 16, 8, 4, 2, torch.float32, spec, bias=True)
    _, z = TRAIN(*inputs, **spec.op_kwargs())
    grad_out = torch.randn(6, 16)
    for weight_grads in (True, False):
        down = torch.ops.moe_compiler.experts_backward_down.default
        torch.library.opcheck(down, (grad_out, weight_grads, z, *inputs), spec.op_kwargs(), test_utils=checks)
        dz = down(grad_out, weight_grads, z, *inputs, **spec.op_kwargs())[0]
        gate_up = torch.ops.moe_compiler.experts_backward_gate_up.default
        torch.library.opcheck(gate_up, (grad_out, weight_grads, dz, *inputs), spec.op_kwargs(), test_utils=checks)
        dx_rows = gate_up(grad_out, weight_grads, dz, *inputs, **spec.op_kwargs())[0]
        torch.library.opcheck(torch.ops.moe_compiler.experts_backward_combine.default,
                              (grad_out, weight_grads, dx_rows, *inputs), spec.op_kwargs(), test_utils=checks)


@pytest.mark.gpu
def test_the_split_backward_frees_z_in_a_compiled_graph(monkeypatch, no_compile_caches):
    """A compiled training graph frees the saved z after experts_backward_down, its last reader: the backward's
    peak is lower than the one op's (which holds z to its end) by about z's size, at a shape where the weight
    gradients' half is the peak (E = 8, H = 1024, I = 2048, T = 512, k = 2, bf16: z 8 MiB beside 96 MiB of weight
    gradients)."""
    experts_ops = sys.modules["moe_compiler.ops.experts"]  # the package's `experts` attribute is the op, not the module

    T, H, I, E, k = 512, 1024, 2048, 8, 2
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(T, E, k, H, I, torch.bfloat16, seed=5)
    params = [w1.requires_grad_(True), w2.requires_grad_(True)]
    grad_out = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def peak(split: bool) -> int:
        if not split:
            monkeypatch.setattr(experts_ops, "_backward_in_three", lambda g, wg, z, t, spec: list(
                torch.ops.moe_compiler.experts_backward(g, wg, z, *t, **spec)))
        torch._dynamo.reset()
        step = torch.compile(lambda x: TRAIN(x, ids, weights, *params)[0])
        for _ in range(2):  # the second run: compiled, allocator warm
            for p in params:
                p.grad = None
            out = step(hidden)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out.backward(grad_out)
            torch.cuda.synchronize()
            del out
        return torch.cuda.max_memory_allocated() - before

    split, one_op = peak(True), peak(False)
    z = T * k * 2 * I * 2
    assert one_op - split >= 0.9 * z, (split / 2**20, one_op / 2**20, z / 2**20)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("train", [False, True], ids=["experts", "experts_train"])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[4]], ids=spec_id)
def test_backward_of_a_call_without_tokens(device, train, spec):
    """T = 0 (a rank or micro-batch with no tokens for this layer): every gradient has its input's shape and dtype,
    the weights' and biases' are zeros (not None, not garbage: an optimizer step adds them), no kernel fails."""
    inputs = experts_inputs(0, 16, 8, 4, 2, torch.float32, spec, bias=spec.transposed, seed=5)
    hidden, ids, weights, w1, w2, b1, b2 = [t.to(device) if t is not None else None for t in inputs]
    leaves = [t.requires_grad_() for t in (hidden, weights, w1, w2, b1, b2) if t is not None]
    if train:
        out, z = TRAIN(hidden, ids, weights, w1, w2, b1, b2, **spec.op_kwargs())
        assert z.shape[0] == 0
    else:
        out = moe_experts(hidden, ids, weights, w1, w2, b1, b2, spec=spec)
    assert out.shape == (0, 16)
    grads = torch.autograd.grad(out, leaves, torch.randn(0, 16, device=device))
    for leaf, g in zip(leaves, grads):
        assert g is not None and g.shape == leaf.shape and g.dtype == leaf.dtype and g.device == leaf.device
        assert not g.any()


def test_experts_train_opcheck():
    spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)
    inputs = experts_inputs(6, 16, 8, 4, 2, torch.float32, spec, bias=True)
    for t in inputs:
        if t.is_floating_point():
            t.requires_grad_(True)
    torch.library.opcheck(TRAIN, inputs, spec.op_kwargs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(dtype, bias):
    spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True) if bias else ExpertsSpec()
    hidden, ids, weights, w1, w2, b1, b2 = experts_inputs(6, 16, 8, 4, 2, dtype, spec, bias=bias)
    for t in (hidden, weights, w1, w2, b1, b2):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(OP, (hidden, ids, weights, w1, w2, b1, b2), spec.op_kwargs())


def test_opcheck_scale_input():
    spec = ExpertsSpec(transposed=True, scale_input=True)  # Llama-4
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(6, 16, 8, 4, 2, torch.float32, spec)
    for t in (hidden, weights, w1, w2):
        t.requires_grad_(True)
    torch.library.opcheck(OP, (hidden, ids, weights, w1, w2, None, None), spec.op_kwargs())


def test_weights_are_read_in_place():
    """Changing a parameter in place changes the next result: nothing was cached."""
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(8, 16, 8, 4, 2, torch.float32)
    before = moe_experts(hidden, ids, weights, w1, w2)
    with torch.no_grad():
        w2.mul_(2.0)
    after = moe_experts(hidden, ids, weights, w1, w2)
    assert rel_err(after, 2 * before) <= 1e-6


def test_int32_ids_and_fp32_router_weights_with_bf16_hidden():
    """Mixtral / DeepSeek keep fp32 routing weights beside bf16 activations."""
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(10, 16, 8, 4, 2, torch.bfloat16)
    out = moe_experts(hidden, ids.int(), weights.float(), w1, w2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, experts_reference(hidden, ids, weights.float(), w1, w2)) <= 1e-2


# --- bad inputs: clear errors naming expected, got and the fix ----------------------------------

def _good():
    return list(experts_inputs(4, 16, 8, 4, 2, torch.float32))


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
        (lambda a: a.__setitem__(1, torch.full_like(a[1], 5)),  # 4 = E: the expert-parallel sentinel, valid
         "topk_ids values: expected expert ids in \\[0, 4\\] \\(4: the sentinel.*got min 5, max 5"),
        (lambda a: a.__setitem__(1, torch.full_like(a[1], -1)), "topk_ids values"),
        (lambda a: a.__setitem__(5, torch.zeros(4, 7)), "b_gate_up shape"),
        (lambda a: a.__setitem__(4, a[4].to("meta")),
         "devices: expected all tensors on one device, got \\['cpu', 'meta'\\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        moe_experts(*args)


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
    inputs = experts_inputs(T, H, I, E, k, dtype, seed=seed)
    out = moe_experts(*inputs)
    assert out.shape == (T, H) and out.dtype == dtype
    if T:
        assert rel_err(out, experts_reference(*inputs)) <= dict(DTYPES)[dtype]


# --- the block's shared experts -------------------------------------------------------------------------

# (fused gate_up Linear, sigmoid expert gate): Granite, Qwen2-MoE / Qwen3-Next, DeepSeek-style
FORMS = [(False, True), (True, False), (False, False)]


def op_args(shared):
    """(shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate) of ([gate, up] or [gate_up], down,
    gate)."""
    gate_up, down, gate = shared
    gate_proj, up_proj = (gate_up[0], None) if len(gate_up) == 1 else gate_up
    return gate_proj, up_proj, down, gate


def call(routed, shared, spec):
    return OP(*routed, *op_args(shared), **spec.op_kwargs())


@pytest.mark.parametrize("fused,gated", FORMS, ids=["gate_up-gated", "fused-plain", "gate_up-plain"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "spec", [ExpertsSpec(), ExpertsSpec(Activation.GELU, GateUpLayout.INTERLEAVED),
             ExpertsSpec(Activation.SILU_CLAMPED, swiglu_limit=0.5)], ids=["silu", "gelu-interleaved", "silu-clamped"]
)
def test_shared_experts_forward_matches_fp64_reference(fused, gated, dtype, tol, spec):
    routed = experts_inputs(6, 32, 16, 8, 2, dtype, spec)
    shared = shared_inputs(32, 24, dtype, fused, gated)
    out = call(routed, shared, spec)
    ref = experts_reference(*routed, spec=spec) + shared_reference(routed[0], *shared, spec=spec)
    assert out.dtype == dtype and out.shape == (6, 32)
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("fused,gated", FORMS, ids=["gate_up-gated", "fused-plain", "gate_up-plain"])
def test_shared_experts_backward_matches_fp64_autograd(fused, gated):
    spec = ExpertsSpec()
    routed = _trainable(experts_inputs(5, 16, 8, 4, 2, torch.float32))
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
def test_frozen_weights_give_the_same_input_gradients_and_none_of_their_own(fused, gated):
    """Routed and shared weights frozen (LoRA-style fine-tuning): hidden's and the router weights' gradients are
    those of the full backward, and no weight gradient exists."""
    spec = ExpertsSpec()
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(5, 16, 8, 4, 2, torch.float32)
    shared = shared_inputs(16, 12, torch.float32, fused, gated)
    grad = torch.randn(5, 16)
    hidden.requires_grad_()
    weights.requires_grad_()
    routed = (hidden, ids, weights, w1, w2, None, None)
    frozen = torch.autograd.grad(call(routed, shared, spec), (hidden, weights), grad)
    w1.requires_grad_()
    full = torch.autograd.grad(call(routed, shared, spec), (hidden, weights, w1), grad)
    assert torch.equal(frozen[0], full[0]) and torch.equal(frozen[1], full[1])
    assert w2.grad is None and w1.grad is None


@pytest.mark.parametrize("fused,gated", FORMS, ids=["gate_up-gated", "fused-plain", "gate_up-plain"])
def test_shared_experts_opcheck(fused, gated):
    routed = _trainable(experts_inputs(4, 16, 8, 4, 2, torch.float32))
    gate_up, down, gate = shared_inputs(16, 12, torch.float32, fused, gated)
    for t in (*gate_up, down, *([gate] if gated else [])):
        t.requires_grad_()
    torch.library.opcheck(OP, (*routed, *op_args((gate_up, down, gate))), ExpertsSpec().op_kwargs())


def test_shared_experts_of_an_empty_batch_are_zeros():
    routed = experts_inputs(0, 16, 8, 4, 2, torch.float32)
    out = call(routed, shared_inputs(16, 12, torch.float32, False, True), ExpertsSpec())
    assert out.shape == (0, 16)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s.__setitem__(1, None), "shared experts: expected shared_gate_proj and shared_down_proj together"),
        (lambda s: s.__setitem__(1, s[1][:, :8]),
         "shared gate/up shapes: expected \\[\\(8, 16\\), \\(8, 16\\)\\], got \\[\\(12, 16\\), \\(12, 16\\)\\]"),
        (lambda s: s.__setitem__(1, s[1][:8]), "shared_down_proj shape: expected \\[H=16, Is\\]"),
        (lambda s: s.__setitem__(2, torch.randn(2, 16)),
         "shared_expert_gate shape: expected \\(1, 16\\), got \\(2, 16\\)"),
        (lambda s: s.__setitem__(1, s[1].double()), "shared weight dtype"),
    ],
)
def test_bad_shared_experts_raise_clear_errors(mutate, match):
    routed = experts_inputs(4, 16, 8, 4, 2, torch.float32)
    shared = list(shared_inputs(16, 12, torch.float32, False, True))
    mutate(shared)
    with pytest.raises(ValueError, match=match):
        call(routed, shared, ExpertsSpec())


# --- on the GPU: real model shapes, huge T, CUDA graphs ----------------------------------------------

@pytest.mark.gpu
@pytest.mark.big_gpu
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: s[0])
# empty, decode, odd, decode/sorted border, T > BLOCK, prefill-ish
@pytest.mark.parametrize("T", [0, 1, 7, 16, 129, 1000])
def test_real_shapes_bf16(shape, T):
    _, E, k, H, I = shape
    inputs = cuda_experts_inputs(T, E, k, H, I, seed=T)
    out = poisoned_run(lambda: moe_experts(*inputs))
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    if T:
        assert torch.isfinite(out).all()
        assert rel_err(out, experts_reference_by_expert(*inputs)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.big_gpu
def test_gpt_oss_20b_shape_bf16():
    """GPT-OSS-20B experts: E=32, k=4, H=I=2880 (no power of two), [E, H, 2I] weights, biases, clamps."""
    spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)
    E, k, H, I = 32, 4, 2880, 2880
    g = torch.Generator(device="cuda").manual_seed(7)
    for T in (1, 300):
        hidden = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        ids = torch.rand(T, E, device="cuda", generator=g).argsort(dim=1)[:, :k]
        weights = torch.rand(T, k, device="cuda", generator=g).bfloat16()
        w1 = (torch.randn(E, H, 2 * I, device="cuda", generator=g) * H**-0.5).bfloat16()
        w2 = (torch.randn(E, I, H, device="cuda", generator=g) * I**-0.5).bfloat16()
        b1 = (torch.randn(E, 2 * I, device="cuda", generator=g) * 0.1).bfloat16()
        b2 = (torch.randn(E, H, device="cuda", generator=g) * 0.1).bfloat16()
        out = poisoned_run(lambda: moe_experts(hidden, ids, weights, w1, w2, b1, b2, spec=spec))
        ref = _reference_with_bias(hidden, ids, weights, w1, w2, b1, b2, spec)
        assert rel_err(out, ref) <= 1e-2


def _reference_with_bias(hidden, ids, weights, w1, w2, b1, b2, spec):
    x, out = hidden.double(), torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = x[tok] @ w1[e].double() + b1[e].double()
        y = gated_forward(h, spec) @ w2[e].double() + b2[e].double()
        out.index_add_(0, tok, y * weights[tok, slot].double().unsqueeze(-1))
    return out


@pytest.mark.gpu
def test_forward_is_deterministic():
    inputs = cuda_experts_inputs(3000, 128, 8, 2048, 768, seed=11)
    assert torch.equal(moe_experts(*inputs), moe_experts(*inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_other_dtypes(dtype, tol):
    inputs = cuda_experts_inputs(77, 16, 4, 512, 256, dtype)
    assert rel_err(moe_experts(*inputs), experts_reference_by_expert(*inputs)) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_on_gpu_incl_experts_without_tokens(dtype):
    """T=3 with E=64: most experts get no rows; their weight gradients must be exactly zero."""
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(3, 64, 2, 256, 128, dtype)
    leaves = [t.requires_grad_(True) for t in (hidden, weights, w1, w2)]
    grad_out = torch.randn_like(hidden)
    grads = torch.autograd.grad(moe_experts(hidden, ids, weights, w1, w2), leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = experts_reference_by_expert(leaves64[0], ids, leaves64[1], leaves64[2], leaves64[3])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for got, want in zip(grads, torch.autograd.grad(ref, leaves64, grad_out.double())):
        assert rel_err(got, want) <= tol
    unused = torch.ones(64, dtype=torch.bool, device="cuda")
    unused[ids.flatten()] = False
    assert (grads[2][unused] == 0).all() and (grads[3][unused] == 0).all()


@pytest.mark.gpu
@pytest.mark.big_gpu
def test_index_math_past_2_31():
    """T*k*H > 2^31 (DeepSeek-V3 shape, T = 40000): results stay right at the far end."""
    _, E, k, H, I = REAL_SHAPES[2]
    T = 40000
    assert T * k * H > 2**31
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(T, E, k, H, I)
    out = moe_experts(hidden, ids, weights, w1, w2)
    rows = torch.cat([torch.arange(0, 32, device="cuda"), torch.arange(T - 32, T, device="cuda")])
    ref = experts_reference_by_expert(hidden[rows], ids[rows], weights[rows], w1, w2)
    assert rel_err(out[rows], ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_and_replay_with_changing_routing(dtype):
    T, E, k, H, I = 16, 32, 4, 512, 256
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(T, E, k, H, I, dtype)
    graph, out = captured(lambda: moe_experts(hidden, ids, weights, w1, w2))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for seed in range(1, 4):
        new_hidden, new_ids, new_weights, _, _ = cuda_experts_inputs(T, E, k, H, I, dtype, seed=seed)
        hidden.copy_(new_hidden), ids.copy_(new_ids), weights.copy_(new_weights)
        replay(graph, out)
        assert rel_err(out, experts_reference_by_expert(hidden, ids, weights, w1, w2)) <= tol
        assert torch.equal(out, moe_experts(hidden, ids, weights, w1, w2))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 48])  # decode path, sorted path
def test_reduce_overhead_compile_replays_with_changing_routing(T):
    """torch.compile(mode="reduce-overhead") captures the op in a CUDA graph; each replay with new routing
    (and new activations) must equal the eager op."""
    E, k, H, I = 64, 4, 512, 256
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(T, E, k, H, I)

    def layer(x, i, w):
        return moe_experts(x, i, w, w1, w2) * 1.0

    compiled = torch.compile(layer, mode="reduce-overhead")
    for seed in range(5):
        x, i, w, _, _ = cuda_experts_inputs(T, E, k, H, I, seed=seed)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(x, i, w).clone()
        assert torch.equal(out, moe_experts(x, i, w, w1, w2)), seed
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0


# (name, E, k, H, I, shared Is, sigmoid gate) of real models with shared experts
SHARED_SHAPES = [("qwen3_next_80b", 512, 10, 2048, 512, 512, True), ("deepseek_v3", 256, 8, 7168, 2048, 2048, False),
                 ("qwen2_57b_a14b", 64, 8, 3584, 2560, 20480, True)]


def _shared(H, Is, gated, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + 100)
    rnd = lambda *s: (torch.randn(*s, device="cuda", generator=g) * s[-1] ** -0.5).bfloat16()  # noqa: E731
    return [rnd(Is, H), rnd(Is, H)], rnd(H, Is), rnd(1, H) if gated else None


@pytest.mark.gpu
@pytest.mark.big_gpu
@pytest.mark.parametrize("shape", SHARED_SHAPES, ids=lambda s: s[0])
# decode path (Qwen3-Next: shared MLP in the kernels; larger ones: cuBLAS) ... sorted path
@pytest.mark.parametrize("T", [1, 3, 16, 300])
def test_experts_with_shared_experts_bf16(shape, T):
    _, E, k, H, I, Is, gated = shape
    inputs = cuda_experts_inputs(T, E, k, H, I, seed=T)
    shared = _shared(H, Is, gated, seed=T)
    out = poisoned_run(lambda: OP(*inputs, None, None, *op_args(shared)))
    ref = experts_reference_by_expert(*inputs) + shared_reference(inputs[0], *shared)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
def test_experts_with_shared_experts_capture_and_replay():
    T, E, k, H, I, Is = 4, 64, 8, 512, 256, 512
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(T, E, k, H, I)
    shared = _shared(H, Is, True)
    op = lambda: OP(hidden, ids, weights, w1, w2, None, None, *op_args(shared))  # noqa: E731
    graph, out = captured(op)
    for seed in range(1, 4):
        new_hidden, new_ids, new_weights, _, _ = cuda_experts_inputs(T, E, k, H, I, seed=seed)
        hidden.copy_(new_hidden), ids.copy_(new_ids), weights.copy_(new_weights)
        replay(graph, out)
        assert torch.equal(out, op())


@pytest.mark.gpu
def test_out_of_range_ids_fail_loudly_on_device():
    script = textwrap.dedent(
        """
        import torch, moe_compiler
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
        ids = torch.full((4, 2), 9, device="cuda")
        w = torch.rand(4, 2, device="cuda", dtype=torch.bfloat16)
        w1 = torch.randn(8, 64, 64, device="cuda", dtype=torch.bfloat16)
        w2 = torch.randn(8, 64, 32, device="cuda", dtype=torch.bfloat16)
        moe_compiler.moe_experts(x, ids, w, w1, w2)
        torch.cuda.synchronize()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "assert" in proc.stderr.lower()




@pytest.mark.parametrize("spec", [s for s in SPECS if s.transposed], ids=spec_id)
def test_expert_by_expert_reference_takes_biases(spec):
    """The real-shape reference (one expert at a time, the benchmarks' check) equals the fp64 reference with the
    GPT-OSS biases in it."""
    hidden, ids, weights, w1, w2, b1, b2 = experts_inputs(7, 32, 16, 8, 2, torch.float32, spec, bias=True)
    want = experts_reference(hidden, ids, weights, w1, w2, b1, b2, spec=spec)
    got = experts_reference_by_expert(hidden, ids, weights, w1, w2, spec, torch.float64, b1, b2)
    assert rel_err(got, want) <= 1e-12
    assert rel_err(experts_reference_by_expert(hidden, ids, weights, w1, w2, spec), want) > 1e-3  # biases count
