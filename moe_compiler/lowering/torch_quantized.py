"""Quantized experts from torch ops: dequantize the block-scaled weights, then torch_experts.py's forward. The
reference of the Triton kernels (triton_quantized.py) and the path everywhere they do not run (the CPU).

Data contract (spec.QuantizedExpertsSpec; bn, bk = scale_block_n, scale_block_k)
    w          [E, N, K]                    float8_e4m3fn
    scale      [E, ceil(N / bn), ceil(K / bk)] float32 / bfloat16 / float8_e8m0fnu (power-of-two scales)
    W[e, n, k] = float(w[e, n, k]) * scale[e, n // bn, k // bk]

The dequantized weights live for the call only (no copy is kept between calls); on the CPU that is the price of
using torch's matmuls.
"""

from __future__ import annotations

import torch

from ..spec import QuantizedExpertsSpec
from . import torch_experts


def dequantize(w: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [E, N, K] in `dtype` (the product taken in fp32, then rounded once)."""
    N, K = w.shape[-2:]
    s = scale.float().repeat_interleave(block_n, dim=-2)[..., :N, :].repeat_interleave(block_k, dim=-1)[..., :K]
    return (w.float() * s).to(dtype)


def experts_forward(select, hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                    spec: QuantizedExpertsSpec) -> torch.Tensor:
    """out [T, H] in hidden's dtype: the experts op's math on the weights dequantized to hidden's dtype."""
    bn, bk = spec.scale_block_n, spec.scale_block_k
    w1 = dequantize(w_gate_up, w_gate_up_scale, bn, bk, hidden.dtype)
    w2 = dequantize(w_down, w_down_scale, bn, bk, hidden.dtype)
    impl = select(hidden, w1, w2)  # the segment-matmul implementation for the dequantized operands
    return torch_experts.experts_forward(impl, hidden, topk_ids, topk_weights, w1, w2, None, None, spec.experts())


def linear_forward(x, w, s, bias, block_n: int, block_k: int) -> torch.Tensor:
    """x [M, K] @ dequantize(w [N, K])^T (+ bias) in x's dtype."""
    return torch.nn.functional.linear(x, dequantize(w, s, block_n, block_k, x.dtype), bias)
