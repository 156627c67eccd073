"""Quantized experts from torch ops: dequantize the block-scaled weights, then torch_experts.py's forward. The
reference of the Triton kernels (triton_quantized.py) and the path everywhere they do not run (the CPU).

Data contract (spec.QuantizedExpertsSpec; bn, bk = scale_block_n, scale_block_k)
    w          [E, N, K] float8_e4m3fn, or [E, N, K / 8] int32 (packed INT4: spec.WeightFormat)
    scale      [E, ceil(N / bn), ceil(K / bk)] float32 / bfloat16 / float8_e8m0fnu (power-of-two scales)
    W[e, n, k] = value(w, e, n, k) * scale[e, n // bn, k // bk]

The dequantized weights live for the call only (no copy is kept between calls); on the CPU that is the price of
using torch's matmuls.
"""

from __future__ import annotations

import torch

from ..spec import QuantizedExpertsSpec
from . import torch_experts


def unpack_int4(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., K/8] of 8 nibbles along K (value k at bits 4 (k % 8), stored + 8) -> int8 [..., K] in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 15
    return (nibbles.flatten(-2) - 8).to(torch.int8)


def dequantize(w: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [E, N, K] in `dtype` (the product taken in fp32, then rounded once); int32 weights are packed INT4."""
    q = unpack_int4(w) if w.dtype == torch.int32 else w
    N, K = q.shape[-2:]
    s = scale.float().repeat_interleave(block_n, dim=-2)[..., :N, :].repeat_interleave(block_k, dim=-1)[..., :K]
    return (q.float() * s).to(dtype)


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
