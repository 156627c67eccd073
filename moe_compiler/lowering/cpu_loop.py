"""CPU segment matmuls: one fp32 `mm` per non-empty expert segment (the reference path).

Data contract (rows sorted by expert, see segments.py):
    mm(x [S,K], w [E,N,K])    -> [S,N]     row block of expert e: x_e @ w[e]^T
    mm_nn(x [S,N], w [E,N,K]) -> [S,K]     x_e @ w[e]
    wgrad(a [S,N], b [S,K])   -> [E,N,K]   a_e^T @ b_e (zeros for experts with no rows)
Inputs of any float dtype are upcast one segment or one expert at a time, so the math is fp32 and the
extra memory is one expert's weight, not a copy of the whole stack.
"""

from __future__ import annotations

import torch

from .segments import Segments

name = "cpu_loop"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32


def mm(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[1], dtype=torch.float32)
    for e, s, t in seg.host_ranges:
        torch.mm(x[s:t].float(), w[e].float().t(), out=out[s:t])
    return out


def mm_nn(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[2], dtype=torch.float32)
    for e, s, t in seg.host_ranges:
        torch.mm(x[s:t].float(), w[e].float(), out=out[s:t])
    return out


def wgrad(a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
    out = a.new_zeros(seg.num_experts, a.shape[1], b.shape[1], dtype=torch.float32)
    for e, s, t in seg.host_ranges:
        torch.mm(a[s:t].float().t(), b[s:t].float(), out=out[e])
    return out
