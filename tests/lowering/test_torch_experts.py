"""lowering/torch_experts.py over every segment-matmul implementation of torch_segment_mm.py, on the CPU.

The CUDA paths (torch._grouped_mm, gather + bmm) are plain torch, so their math runs here too; only their speed
and capture-safety need the GPU (the backward's GPU tests in tests/ops/test_experts.py run them).
"""

from __future__ import annotations

import pytest
import torch

from moe_compiler.lowering import torch_experts
from moe_compiler.lowering.torch_segment_mm import GatherBmm, GroupedMM, LoopMM
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout
from moe_compiler.testing import experts_inputs, experts_reference, rel_err

IMPLS = [LoopMM, GatherBmm, GroupedMM]
SPECS = [ExpertsSpec(), ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.name)
@pytest.mark.parametrize("spec", SPECS, ids=["swiglu", "gpt_oss"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_backward(impl, spec, bias):
    # H = 16, I = 8: 16-byte rows in fp32, as torch._grouped_mm requires.
    hidden, ids, weights, w1, w2, b1, b2 = experts_inputs(11, 16, 8, 6, 2, torch.float32, spec, bias=bias, seed=3)
    out = torch_experts.experts_forward(impl, hidden, ids, weights, w1, w2, b1, b2, spec)
    assert rel_err(out, experts_reference(hidden, ids, weights, w1, w2, b1, b2, spec)) <= 1e-5

    grad_out = torch.randn(hidden.shape)
    grads = torch_experts.experts_backward(impl, grad_out, hidden, ids, weights, w1, w2, b1, b2, spec)
    leaves = [t.double().requires_grad_(True) for t in (hidden, weights, w1, w2) + ((b1, b2) if bias else ())]
    biases = leaves[4:] if bias else (None, None)
    ref = experts_reference(leaves[0], ids, leaves[1], leaves[2], leaves[3], *biases, spec=spec)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, grad_out.double())):
        assert rel_err(got, want) <= 1e-5
    # Frozen experts: the same input gradients, no weight or bias gradient computed.
    frozen = torch_experts.experts_backward(impl, grad_out, hidden, ids, weights, w1, w2, b1, b2, spec,
                                            weight_grads=False)
    assert frozen[2:] == (None,) * 4
    assert torch.equal(frozen[0], grads[0]) and torch.equal(frozen[1], grads[1])


def test_GatherBmm_chunks(monkeypatch):
    """Chunking over rows (to bound the gathered weights' memory) does not change the result."""
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(13, 16, 8, 4, 2, torch.float32)
    full = torch_experts.experts_forward(GatherBmm, hidden, ids, weights, w1, w2, None, None, ExpertsSpec())
    monkeypatch.setattr(GatherBmm, "CHUNK_BYTES", 16 * 16 * 4 * 3)  # 3 rows per chunk
    chunked = torch_experts.experts_forward(GatherBmm, hidden, ids, weights, w1, w2, None, None, ExpertsSpec())
    torch.testing.assert_close(full, chunked)
