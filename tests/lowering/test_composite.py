"""Every segment-matmul implementation, driven through the shared composite on the CPU.

The CUDA paths (torch._grouped_mm, gather + bmm) are plain torch, so their math runs here too; only
their speed and capture-safety need the GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from moe_compiler.lowering import dispatch
from moe_compiler.lowering import torch_experts as composite
from moe_compiler.lowering.torch_segment_mm import GatherBmm as gather_bmm
from moe_compiler.lowering.torch_segment_mm import GroupedMM as grouped_mm
from moe_compiler.lowering.torch_segment_mm import LoopMM as cpu_loop
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout
from reference import experts_reference, rel_err
from test_ops import make_inputs

IMPLS = [cpu_loop, gather_bmm, grouped_mm]
SPECS = [ExpertsSpec(), ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.name)
@pytest.mark.parametrize("spec", SPECS, ids=["swiglu", "gpt_oss"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_backward(impl, spec, bias):
    # H = 16, I = 8: 16-byte rows in fp32, as torch._grouped_mm requires.
    hidden, ids, weights, w1, w2, b1, b2 = make_inputs(11, 16, 8, 6, 2, torch.float32, spec, bias=bias, seed=3)
    out = composite.experts_forward(impl, hidden, ids, weights, w1, w2, b1, b2, spec)
    assert rel_err(out, experts_reference(hidden, ids, weights, w1, w2, b1, b2, spec)) <= 1e-5

    grad_out = torch.randn(hidden.shape)
    grads = composite.experts_backward(impl, grad_out, hidden, ids, weights, w1, w2, b1, b2, spec)
    leaves = [t.double().requires_grad_(True) for t in (hidden, weights, w1, w2) + ((b1, b2) if bias else ())]
    ref = experts_reference(leaves[0], ids, leaves[1], leaves[2], leaves[3], *(leaves[4:] if bias else (None, None)), spec=spec)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, grad_out.double())):
        assert rel_err(got, want) <= 1e-5


def test_gather_bmm_chunks(monkeypatch):
    """Chunking over rows (to bound the gathered weights' memory) does not change the result."""
    hidden, ids, weights, w1, w2, _, _ = make_inputs(13, 16, 8, 4, 2, torch.float32)
    full = composite.experts_forward(gather_bmm, hidden, ids, weights, w1, w2, None, None, ExpertsSpec())
    monkeypatch.setattr(gather_bmm, "CHUNK_BYTES", 16 * 16 * 4 * 3)  # 3 rows per chunk
    chunked = composite.experts_forward(gather_bmm, hidden, ids, weights, w1, w2, None, None, ExpertsSpec())
    torch.testing.assert_close(full, chunked)


def test_cpu_selection_by_alignment():
    hidden, _, _, w1, w2, _, _ = make_inputs(2, 16, 8, 4, 2, torch.bfloat16)  # 32-byte rows
    assert dispatch.select(hidden, w1, w2) is grouped_mm
    hidden, _, _, w1, w2, _, _ = make_inputs(2, 24, 12, 4, 2, torch.bfloat16)  # I = 12: 24-byte rows
    assert dispatch.select(hidden, w1, w2) is cpu_loop
