"""The experts forward over a library's grouped GEMM with Triton glue (triton_grouped.py): against the fp64
reference, every spec, sentinel pairs and experts without rows; on the GPU over torch._grouped_mm and every
CUTLASS config, under CUDA-graph replay with changing routing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, DTYPES, SPECS, device_inputs, poisoned_allocations, spec_id  # noqa: E402

from moe_compiler.lowering import cutlass, triton_grouped  # noqa: E402
from moe_compiler.lowering.torch_segment_mm import GroupedMM, LoopMM  # noqa: E402
from moe_compiler.spec import ExpertsSpec  # noqa: E402
from moe_compiler.testing import experts_reference, pre_activations, rel_err  # noqa: E402
from moe_compiler.testing.cuda_graphs import captured, replay  # noqa: E402


def _run(T, H, I, E, k, dtype, spec, mm, seed=0, sentinels=()):
    cpu, dev = device_inputs(T, H, I, E, k, dtype, spec, seed)
    for t, j in sentinels:  # another rank's expert (id E): its pair adds nothing, whatever its weight
        cpu[1][t, j] = E
        dev[1][t, j] = E
    with poisoned_allocations():
        out = triton_grouped.experts_forward(mm, *dev, spec)
    assert out.dtype == dtype and out.shape == (T, H)
    return rel_err(out.cpu(), experts_reference(*cpu, spec=spec))


SHAPES = [
    (1, 32, 16, 8, 2),  # one token: most experts without rows
    (9, 40, 24, 5, 2),  # H, I not powers of two: masked tails
    (20, 16, 16, 3, 1),  # k = 1, long segments
]


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("T,H,I,E,k", SHAPES)
def test_forward_against_fp64(spec, dtype, tol, T, H, I, E, k):
    assert _run(T, H, I, E, k, dtype, spec, GroupedMM) <= tol


@pytest.mark.skipif(DEVICE != "cpu", reason="LoopMM is the CPU's segment matmul")
@pytest.mark.parametrize("T,H,I,E,k", SHAPES)
def test_glue_takes_fp32_rows_from_the_gemm(T, H, I, E, k):
    # LoopMM returns fp32 rows whatever the input dtype: the act and combine passes read whatever the GEMM gives.
    assert _run(T, H, I, E, k, torch.float16, ExpertsSpec(), LoopMM) <= 2e-3


@pytest.mark.parametrize("spec", [ExpertsSpec(), SPECS[4]], ids=spec_id)
def test_sentinel_pairs_add_nothing(spec):
    # Pairs routed to another rank's expert: not gathered, not computed, no bias, no weight.
    err = _run(7, 32, 16, 4, 2, torch.float32, spec, GroupedMM, sentinels=[(0, 0), (3, 1), (6, 0), (6, 1)])
    assert err <= 1e-5


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.scale_input], ids=spec_id)
def test_a_training_forward_saves_z_at_each_pairs_row(spec):
    """With z (experts_train on a library entry): each live pair's pre-activation row, bias added, at t*k + j in
    w_gate_up's row order — the Triton backward's contract; a sentinel pair's row untouched; out unchanged."""
    T, H, I, E, k = 9, 40, 24, 5, 2
    cpu, dev = device_inputs(T, H, I, E, k, torch.float32, spec, seed=2)
    cpu[1][4, 1] = dev[1][4, 1] = E
    z = torch.full((T * k, 2 * I), float("nan"), device=DEVICE)
    with poisoned_allocations():
        out = triton_grouped.experts_forward(GroupedMM, *dev, spec, z=z)
    assert rel_err(out.cpu(), experts_reference(*cpu, spec=spec)) <= 1e-5
    want = pre_activations(cpu[0], cpu[1], cpu[3], cpu[5], spec)
    live = ~want.isnan().any(-1)
    assert live.sum() == T * k - 1 and z.cpu()[~live].isnan().all()
    assert rel_err(z.cpu()[live], want[live]) <= 1e-5


def test_the_glue_kernels_bound_their_rows_on_the_device():
    # Only the live pairs' rows are gathered and activated: every row past them stays as allocated.
    spec = ExpertsSpec()
    _, dev = device_inputs(6, 16, 16, 4, 2, torch.float32, spec)
    dev[1][:, 1] = 4  # half the pairs are sentinels
    inputs = []  # of each GEMM: the gathered rows xs, then the activated rows a

    class Recording(GroupedMM):
        @classmethod
        def mm(cls, x, w, seg):
            inputs.append(x.clone())
            return super().mm(x, w, seg)

    with poisoned_allocations():
        triton_grouped.experts_forward(Recording, *dev, spec)
    assert len(inputs) == 2
    for rows in inputs:
        assert torch.isfinite(rows[:6]).all() and torch.isnan(rows[6:]).all()


def test_the_activation_in_the_gate_up_epilogue_where_it_applies():
    """A library class with act_epilogue (CutlassConfig.act_epilogue): SwiGLU experts over [E, 2I, H] concatenated
    weights, no gate_up bias, take its gate_up_silu (here torch's grouped GEMMs and silu, as the CUTLASS kernels
    compute it) instead of the [S, 2I] GEMM and the activation pass; every other spec, and a training forward (z),
    runs the pass. Right either way."""
    calls = []

    class ActEpilogue(GroupedMM):
        act_epilogue = True
        act_epilogue_dtypes = (torch.float32,)  # (CUTLASS's: bf16; the interpreter's trusted dtype here)

        @classmethod
        def gate_up_silu(cls, x, w_gate_up, seg):
            calls.append(x.shape)
            I = w_gate_up.shape[1] // 2
            gate = GroupedMM.mm(x, w_gate_up[:, :I], seg)
            return (torch.nn.functional.silu(gate.float()) * GroupedMM.mm(x, w_gate_up[:, I:], seg).float()).to(x.dtype)

    for spec in SPECS:
        calls.clear()
        assert _run(9, 40, 32, 5, 2, torch.float32, spec, ActEpilogue, sentinels=[(2, 1)]) <= 1e-5, spec_id(spec)
        suits = spec == ExpertsSpec()  # the only spec of the list with plain SwiGLU, concatenated [E, 2I, H]
        assert calls == ([(18, 40)] if suits else []), spec_id(spec)
    _, dev = device_inputs(9, 40, 32, 5, 2, torch.float32, ExpertsSpec())
    calls.clear()
    triton_grouped.experts_forward(ActEpilogue, *dev, ExpertsSpec(), z=torch.empty(18, 64, device=DEVICE))
    assert calls == []  # z wanted: the pass stores it
    _, dev = device_inputs(9, 40, 32, 5, 2, torch.float16, ExpertsSpec())
    triton_grouped.experts_forward(ActEpilogue, *dev, ExpertsSpec())
    assert calls == []  # a dtype the epilogue is not built for


def _libraries():
    libs = [GroupedMM]
    if DEVICE == "cuda" and cutlass.missing() is None:
        libs += [cutlass.with_config(i, act) for act in (False, True) for i in range(len(cutlass.CONFIGS))]
    return libs


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_bf16_over_every_library_on_the_gpu(spec):
    for mm in _libraries():
        # 16-byte rows throughout (CUTLASS, torch._grouped_mm): H, I multiples of 8
        assert _run(37, 256, 128, 16, 4, torch.bfloat16, spec, mm, sentinels=[(0, 1), (5, 3)]) <= 1e-2, mm.name
        assert _run(1, 64, 32, 8, 2, torch.bfloat16, spec, mm) <= 1e-2, mm.name


@pytest.mark.gpu
def test_capture_and_replay_with_changing_routing():
    spec = ExpertsSpec()
    cpu, dev = device_inputs(64, 128, 64, 8, 2, torch.bfloat16, spec)
    cpu = list(cpu)
    for mm in _libraries():
        graph, out = captured(lambda mm=mm: triton_grouped.experts_forward(mm, *dev, spec))
        for seed in range(3):
            ids = torch.rand(64, 8, generator=torch.Generator().manual_seed(seed)).argsort(1)[:, :2]
            ids[: 16 * (seed + 1), 0] = seed  # skewed: one expert takes more rows on each replay
            ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % 8, ids[:, 1])
            ids[seed, 1] = 8  # a sentinel pair
            dev[1].copy_(ids)
            cpu[1] = ids
            replay(graph, out)
            assert rel_err(out.float().cpu(), experts_reference(*cpu, spec=spec)) <= 1e-2, (mm.name, seed)


@pytest.mark.gpu
@pytest.mark.big_gpu
def test_index_math_past_2_31():
    """T k H > 2^31 (DeepSeek-V3's shape, T = 40000; ~36 GB): the gathered rows, the act rows and the combine stay
    right at the far end, over every library."""
    from moe_compiler.testing import cuda_experts_inputs, experts_reference_by_expert

    E, k, H, I, T = 256, 8, 7168, 2048, 40000
    assert T * k * H > 2**31
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(T, E, k, H, I)
    rows = torch.cat([torch.arange(0, 32, device="cuda"), torch.arange(T - 32, T, device="cuda")])
    ref = experts_reference_by_expert(hidden[rows], ids[rows], weights[rows], w1, w2)
    for mm in _libraries():
        out = triton_grouped.experts_forward(mm, hidden, ids, weights, w1, w2, None, None, ExpertsSpec())
        assert rel_err(out[rows], ref) <= 1e-2, mm.name
        del out
