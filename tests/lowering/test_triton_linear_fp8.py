"""Triton FP8 linear (triton_linear_fp8.py) against fp64 on the dequantized weight: decode rows, tails, scale
formats, bias, poisoned outputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, poisoned_allocations  # noqa: E402

from moe_compiler.lowering import triton_linear_fp8  # noqa: E402
from moe_compiler.lowering.torch_quantized import dequantize  # noqa: E402
from moe_compiler.testing import rel_err  # noqa: E402
from moe_compiler.testing.quantized import quantize_fp8_blocks  # noqa: E402

# bf16 stores are unreliable in the CPU interpreter: fp32 and fp16 here.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "M,N,K,bn,bk,scale_dtype,bias",
    [
        (1, 48, 64, 16, 32, torch.float32, False),  # decode row; N tail of the 64-wide tile wraps
        (37, 40, 72, 16, 32, torch.float8_e8m0fnu, True),  # K tail, M past one 16-row tile, bias
        (20, 130, 96, 128, 32, torch.bfloat16, False),  # 64-row tiles, N past one 128-wide tile
    ],
)
def test_linear_matches_fp64(dtype, tol, M, N, K, bn, bk, scale_dtype, bias):
    g = torch.Generator().manual_seed(M)
    q, s = quantize_fp8_blocks(torch.randn(N, K, generator=g) * K**-0.5, bn, bk, scale_dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    with poisoned_allocations():
        y = triton_linear_fp8.linear_forward(*[t.to(DEVICE) if t is not None else None for t in (x, q, s, b)], bn,
                                            bk).cpu()
    ref = x.double() @ dequantize(q, s, bn, bk).double().T + (b.double() if bias else 0)
    assert y.dtype == dtype and rel_err(y, ref) <= tol
