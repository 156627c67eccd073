"""Triton kernels against the fp64 reference. Without CUDA they run under TRITON_INTERPRET on the CPU
(tiny fp32/fp16 shapes; bf16 stores are unreliable in the interpreter, so bf16 is tested on the GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are decorated (imported)

triton = pytest.importorskip("triton")

from moe_compiler.lowering import triton_experts  # noqa: E402
from moe_compiler.lowering.triton_align import align_rows, padded_size  # noqa: E402
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout  # noqa: E402
from reference import experts_reference, rel_err  # noqa: E402
from test_ops import make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)] + ([(torch.bfloat16, 1e-2)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize(
    "T,E,k,block_m",
    [
        (0, 4, 2, 16),  # no tokens
        (1, 8, 2, 16),  # decode: T*k << E, most experts empty
        (9, 5, 2, 4),  # odd sizes, segments spanning several blocks
        (6, 4, 4, 16),  # k = E
        (300, 3, 1, 16),  # k = 1, more pairs than one CHUNK of the kernel? (CHUNK=1024: no) many blocks
        (700, 7, 2, 8),  # S = 1400 > CHUNK: the kernel's loops take two trips
    ],
)
def test_align_invariants(T, E, k, block_m):
    ids = torch.rand(T, E).argsort(dim=1)[:, :k].to(DEVICE)
    rows = align_rows(ids, E, block_m)
    S = T * k
    flat = ids.reshape(-1).cpu()
    sorted_rows, pos = rows.sorted_rows.cpu().long(), rows.pos.cpu().long()
    block_expert, n = rows.block_expert.cpu(), int(rows.num_padded)
    counts = torch.bincount(flat, minlength=E)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_rows.numel() >= n and sorted_rows.numel() <= padded_size(S, E, block_m) + block_m
    assert torch.equal(sorted_rows[pos], torch.arange(S))  # pos is the inverse of sorted_rows
    assert (sorted_rows[n:] == S).all()
    real = sorted_rows[:n] < S
    assert int(real.sum()) == S
    # every block holds one expert's rows; block_expert says which; blocks past the end are -1
    slot_expert = block_expert.repeat_interleave(block_m)[:n]
    assert torch.equal(slot_expert[real], flat[sorted_rows[:n][real]])
    assert (block_expert[n // block_m:] == -1).all()
    assert torch.equal(block_expert[: n // block_m], block_expert[: n // block_m].sort().values)


SPECS = [
    ExpertsSpec(),
    ExpertsSpec(Activation.GELU, GateUpLayout.INTERLEAVED),
    ExpertsSpec(Activation.GELU_TANH),
    ExpertsSpec(Activation.RELU, GateUpLayout.INTERLEAVED),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation.value}-{s.gate_up.value}")
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "T,H,I,E,k",
    [
        (1, 32, 16, 8, 2),  # decode
        (9, 40, 24, 5, 2),  # H, I not multiples of the block: masked tails
        (6, 32, 16, 4, 4),  # k = E
        (20, 16, 16, 3, 1),  # k = 1
    ],
)
def test_experts_forward(spec, dtype, tol, T, H, I, E, k):
    inputs = make_inputs(T, H, I, E, k, dtype, spec, seed=T)
    dev_inputs = [t.to(DEVICE) if t is not None else None for t in inputs]
    out = triton_experts.experts_forward(*dev_inputs[:5], spec, block_m=16, block_n=16, block_k=16)
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out.cpu(), experts_reference(*inputs, spec=spec)) <= tol


def test_unsupported_spec_is_a_clear_nyi():
    spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)
    inputs = make_inputs(2, 16, 8, 4, 2, torch.float32, spec)
    with pytest.raises(NotImplementedError, match="NYI: Triton experts"):
        triton_experts.experts_forward(*inputs[:5], spec)
