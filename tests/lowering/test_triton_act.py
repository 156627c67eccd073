"""Triton gated activation as one elementwise pass (triton_act.gated_rows, the shared MLP's activation on
CUDA): every activation against the torch reference, a ragged tail, poisoned output."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, DTYPES, SPECS, poisoned_allocations, spec_id  # noqa: E402

from moe_compiler.lowering.torch_activations import gated_forward_halves  # noqa: E402
from moe_compiler.lowering.triton_act import gated_rows  # noqa: E402
from moe_compiler.testing import rel_err  # noqa: E402


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gated_rows_matches_torch(spec, dtype, tol):
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 2051, generator=g) * 3).to(dtype), (torch.randn(3, 2051, generator=g) * 3).to(dtype)
    with poisoned_allocations():
        out = gated_rows(gate.to(DEVICE), up.to(DEVICE), spec)
    assert out.dtype == dtype and out.shape == gate.shape
    assert rel_err(out.cpu(), gated_forward_halves(gate.double(), up.double(), spec)) <= tol
