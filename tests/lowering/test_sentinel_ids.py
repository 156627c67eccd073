"""Sentinel expert ids (transformers' all-reduce expert parallelism): a pair routed to id E (one past the last
local expert) contributes nothing, whatever its weight, in every path; ids below 0 or above E still fail."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, device_inputs, poisoned_allocations  # noqa: E402

from moe_compiler.lowering import (  # noqa: E402
    dispatch,
    torch_experts,
    torch_quantized,
    triton_align,
    triton_backward,
    triton_decode,
    triton_experts,
    triton_quantized,
    triton_quantized_config,
)
from moe_compiler.lowering.torch_segment_mm import LoopMM  # noqa: E402
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig, SortedConfig  # noqa: E402
from moe_compiler.lowering.triton_quantized_config import ACT_GROUP, QuantizedConfig  # noqa: E402
from moe_compiler.passes.verify import with_sentinels  # noqa: E402
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout, QuantizedExpertsSpec  # noqa: E402
from moe_compiler.testing import experts_reference, rel_err  # noqa: E402
from moe_compiler.testing.cuda_graphs import captured, replay  # noqa: E402
from moe_compiler.testing.quantized import quantized_experts_inputs, w8a8_reference  # noqa: E402

SMALL = KernelConfig(block_n=16, block_k=16, num_warps=4, num_stages=2)
SORTED = SortedConfig(block_m=16, gate_up=SMALL, down=SMALL, group_m=2)
DECODE = DecodeConfig(SMALL, SMALL)
BIASED = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)


def _with_sentinels(ids: torch.Tensor, E: int) -> torch.Tensor:
    """Every third pair (the backend's numerical check routes so) and the whole first token off this rank: id E."""
    ids = with_sentinels(ids, E)
    ids[0] = E
    return ids


def _inputs(T, H, I, E, k, spec=ExpertsSpec(), seed=0):
    cpu, dev = device_inputs(T, H, I, E, k, torch.float32, spec, seed)
    cpu, dev = list(cpu), list(dev)
    cpu[1] = _with_sentinels(cpu[1], E)
    dev[1] = cpu[1].to(DEVICE)
    return cpu, dev


def test_reference_drops_sentinel_pairs():
    cpu, _ = _inputs(6, 32, 16, 4, 2)
    hidden, ids, w, w1, w2 = cpu[:5]
    kept = experts_reference(hidden, ids, w, w1, w2)
    live = ids < 4
    by_hand = experts_reference(hidden, torch.where(live, ids, 0), torch.where(live, w, 0.0), w1, w2)
    assert torch.equal(kept, by_hand) and kept[0].abs().max() == 0  # token 0: every slot off the rank


@pytest.mark.parametrize("spec", [ExpertsSpec(), BIASED], ids=["plain", "biased"])
def test_torch_path_forward_and_backward(spec):
    cpu, _ = _inputs(7, 32, 16, 4, 2, spec)
    hidden, ids, w, w1, w2, b1, b2 = cpu
    out = torch_experts.experts_forward(LoopMM, hidden, ids, w, w1, w2, b1, b2, spec)
    assert rel_err(out, experts_reference(hidden, ids, w, w1, w2, b1, b2, spec=spec)) <= 1e-5
    grad_out = torch.randn_like(hidden)
    got = torch_experts.experts_backward(LoopMM, grad_out, hidden, ids, w, w1, w2, b1, b2, spec)
    leaves = [None if t is None else t.double().requires_grad_(True) for t in (hidden, w, w1, w2, b1, b2)]
    ref = experts_reference(leaves[0], ids, *leaves[1:4], leaves[4], leaves[5], spec=spec)
    want = torch.autograd.grad(ref, [t for t in leaves if t is not None], grad_out.double())
    for g, r in zip([g for g in got if g is not None], want):
        assert rel_err(g, r) <= 1e-5
    assert got[1][ids == 4].abs().max() == 0  # a sentinel pair's weight gets no gradient


def test_the_op_on_the_cpu_takes_sentinels_and_refuses_ids_beyond():
    cpu, _ = _inputs(5, 32, 16, 4, 2)
    hidden, ids, w, w1, w2 = cpu[:5]
    out = torch.ops.moe_compiler.experts(hidden, ids, w, w1, w2, **ExpertsSpec().op_kwargs())
    assert rel_err(out, experts_reference(hidden, ids, w, w1, w2)) <= 1e-5
    for bad in (-1, 5):
        ids_bad = ids.clone()
        ids_bad[1, 0] = bad
        with pytest.raises(ValueError, match=r"expert ids in \[0, 4\] \(4: the sentinel"):
            torch.ops.moe_compiler.experts(hidden, ids_bad, w, w1, w2, **ExpertsSpec().op_kwargs())


def _more_slots_than_experts(T, H, I, E, k, spec=ExpertsSpec(), seed=0):
    """Inputs of an expert-parallel rank holding fewer experts than the top-k (E < k): each token's first E slots
    hold its E distinct local experts in a random order (some moved off the rank too), the other slots the
    sentinel E."""
    cpu, dev = device_inputs(T, H, I, E, E, torch.float32, spec, seed)
    cpu, dev = list(cpu), list(dev)
    cpu[1], cpu[2] = _routing_beyond_experts(T, E, k, seed)
    dev[1], dev[2] = cpu[1].to(DEVICE), cpu[2].to(DEVICE)
    return cpu, dev


def _routing_beyond_experts(T, E, k, seed):
    """(ids [T, k], weights [T, k]) with k > E: each token's E distinct local experts and k - E sentinels, in a
    random slot order, and every fifth slot moved off the rank too."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.cat([torch.rand(T, E, generator=gen).argsort(dim=1), torch.full((T, k - E), E)], dim=1)
    ids = ids.gather(1, torch.rand(T, k, generator=gen).argsort(dim=1))
    ids.view(-1)[::5] = E
    return ids, torch.rand(T, k, generator=gen)


@pytest.mark.parametrize("E", [1, 3])
def test_more_slots_than_experts_on_a_rank(E):
    """k = 4 > E: the op (CPU), the sorted and decode Triton forwards and the Triton backward equal the reference
    (sentinel slots add nothing, their weights get no gradient)."""
    cpu, dev = _more_slots_than_experts(7, 32, 16, E, 4)
    hidden, ids, w, w1, w2 = cpu[:5]
    want = experts_reference(hidden, ids, w, w1, w2)
    assert rel_err(torch.ops.moe_compiler.experts(hidden, ids, w, w1, w2, **ExpertsSpec().op_kwargs()), want) <= 1e-5
    for forward, config in ((triton_experts.experts_forward, SORTED), (triton_decode.experts_forward, DECODE)):
        with poisoned_allocations():
            out, ok = forward(*dev, ExpertsSpec(), config)
        assert int(ok) == 1 and rel_err(out.cpu(), want) <= 1e-5
    grad_out = torch.randn(7, 32)
    config = triton_backward.BackwardConfig(rows=SORTED, dz=SMALL, wgrad_m=16, wgrad=SMALL)
    with poisoned_allocations():
        got = triton_backward.experts_backward(grad_out.to(DEVICE), *dev, ExpertsSpec(), config)
    leaves = [t.double().requires_grad_(True) for t in (hidden, w, w1, w2)]
    ref = experts_reference(leaves[0], ids, *leaves[1:])
    wants = torch.autograd.grad(ref, leaves, grad_out.double())
    for g, r in zip((got[0], got[1], got[2], got[3]), wants):
        assert rel_err(g.cpu(), r) <= 1e-4
    assert got[1].cpu()[ids == E].abs().max() == 0


def test_align_leaves_sentinel_pairs_out():
    ids = _with_sentinels(torch.randint(0, 5, (9, 2)), 5).to(DEVICE)
    rows = triton_align.align_rows(ids, 5, 16)
    live = (ids.view(-1) < 5).cpu()
    pos = rows.pos.cpu()
    assert (pos[~live] == -1).all() and (pos[live] >= 0).all()
    assert int(rows.num_padded) == sum(-(-int((ids == e).sum()) // 16) * 16 for e in range(5))
    assert int(rows.ids_ok) == 1
    assert torch.equal(rows.sorted_rows.cpu()[pos[live].long()], torch.arange(18)[live].int())


@pytest.mark.parametrize("spec", [ExpertsSpec(), BIASED], ids=["plain", "biased"])
@pytest.mark.parametrize("path", ["sorted", "decode"])
def test_triton_forward(spec, path):
    cpu, dev = _inputs(6, 40, 24, 5, 2, spec)
    with poisoned_allocations():
        if path == "sorted":
            out, ok = triton_experts.experts_forward(*dev, spec, SORTED)
        else:
            out, ok = triton_decode.experts_forward(*dev, spec, DECODE)
    assert int(ok) == 1
    assert rel_err(out.cpu(), experts_reference(*cpu, spec=spec)) <= 1e-5


def test_triton_backward():
    cpu, dev = _inputs(9, 40, 24, 5, 2)
    config = triton_backward.BackwardConfig(rows=SORTED, dz=SMALL, wgrad_m=16, wgrad=SMALL)
    grad_out = torch.randn(9, 40)
    with poisoned_allocations():
        got = triton_backward.experts_backward(grad_out.to(DEVICE), *dev, ExpertsSpec(), config)
    hidden, ids, w, w1, w2 = cpu[:5]
    leaves = [t.double().requires_grad_(True) for t in (hidden, w, w1, w2)]
    ref = experts_reference(leaves[0], ids, *leaves[1:])
    want = torch.autograd.grad(ref, leaves, grad_out.double())
    for g, r in zip(got[:4], want):
        assert rel_err(g.cpu(), r) <= 1e-4
    assert got[1].cpu()[ids == 5].abs().max() == 0


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4_packed"])
@pytest.mark.parametrize("decode", [False, True], ids=["sorted", "decode"])
@pytest.mark.parametrize("E", [5, 2], ids=["k<E", "k>E"])
def test_quantized_paths(fmt, decode, E):
    int4 = fmt == "int4_packed"
    bn, bk = (1, 32) if int4 else (32, 32)
    args, (w1, w2) = quantized_experts_inputs(6, 64, 32, E, 2, torch.float32, bn, bk, seed=0, weight_format=fmt)
    args = list(args)
    if E == 2:  # a rank holding fewer experts than the top-k (here k = 3 > E = 2)
        args[1], args[2] = _routing_beyond_experts(6, E, 3, seed=0)
    else:
        args[1] = _with_sentinels(args[1], E)
    spec = QuantizedExpertsSpec(weight_format=fmt, scale_block_n=bn, scale_block_k=bk)
    config = QuantizedConfig(block_m=16, block_n=16, block_k=32, act="w8a16", decode=decode, int4_planes=False)
    ref = experts_reference(*args[:3], w1, w2)
    with poisoned_allocations():
        out = triton_quantized.experts_forward(*[a.to(DEVICE) for a in args], spec, config).cpu()
    assert rel_err(out, ref) <= 1e-5
    cpu_out = torch_quantized.experts_forward(dispatch.select, *args, spec)
    assert rel_err(cpu_out, ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64], ids=["decode", "sorted"])
def test_the_ops_on_the_gpu_under_a_cuda_graph(T):
    """bf16 experts op and FP8 experts_quantized op, captured once; replays with new routing (sentinels included)
    equal the eager ops, and the eager ops the fp64 reference."""
    from moe_compiler.testing import experts_inputs

    h, ids, w, w1, w2, _, _ = experts_inputs(T, 256, 128, 16, 4, torch.bfloat16, seed=0)
    args, (q1, q2) = quantized_experts_inputs(T, 256, 128, 16, 4, torch.bfloat16, seed=0)
    spec = QuantizedExpertsSpec()
    dense = [t.cuda() for t in (h, ids, w, w1, w2)]
    quant = [t.cuda() for t in args]
    w8a8 = triton_quantized_config.default_config(quant[0], 16, 4, spec, I=128).act_fp8
    calls = {"experts": lambda: torch.ops.moe_compiler.experts(*dense, **ExpertsSpec().op_kwargs()),
             "quantized": lambda: torch.ops.moe_compiler.experts_quantized(*quant, **spec.op_kwargs())}
    for name, call in calls.items():
        graph, out = captured(call)
        for seed in range(1, 3):
            routing = torch.rand(T, 16, generator=torch.Generator().manual_seed(seed)).argsort(1)[:, :4]
            new = _with_sentinels(routing, 16)
            dense[1].copy_(new)
            quant[1].copy_(new)
            replay(graph, out)
            eager = call()
            assert torch.equal(out, eager), name
            if name == "experts":
                ref = experts_reference(h, new, w, w1, w2)
            elif w8a8:  # the GPU's default at 16 rows per expert: activations rounded to e4m3 (4% from exact)
                ref = w8a8_reference(args[0], new, args[2], q1, q2, ACT_GROUP)
            else:
                ref = experts_reference(args[0], new, args[2], q1, q2)
            # w8a8: 2e-2, its own bound (a bf16 ulp before an e4m3 rounding can move it a whole step; the ops tests)
            assert rel_err(eager.cpu(), ref) <= (2e-2 if w8a8 and name == "quantized" else 1e-2), name
