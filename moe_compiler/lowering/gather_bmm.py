"""CUDA segment matmuls by gathering each row's expert weight and running `bmm`: capture-safe, any dtype.

Same contract as cpu_loop.py, but it never looks at `offs`: every row carries its expert id
(`seg.sorted_ids`), so shapes are static and nothing syncs with the host. The price is bandwidth: each
row reads its expert's whole weight matrix, so this is the stop-gap for fp16/fp32 on CUDA (and bf16
where grouped_mm can't run) until the Triton kernels land. Rows go in chunks so the gathered weights
stay under CHUNK_BYTES.
"""

from __future__ import annotations

import torch

from .segments import Segments

name = "torch_gather_bmm"

# 256 MiB of gathered weights per chunk: large enough that a chunk fills the GPU, small enough to sit
# beside an 80 GB model.
CHUNK_BYTES = 256 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype


def _chunks(rows: int, n: int, k: int, itemsize: int):
    step = max(1, CHUNK_BYTES // max(1, n * k * itemsize))
    for s in range(0, rows, step):
        yield s, min(rows, s + step)


def mm(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[1])
    for s, t in _chunks(x.shape[0], w.shape[1], w.shape[2], w.element_size()):
        out[s:t] = torch.bmm(w[seg.sorted_ids[s:t]], x[s:t].unsqueeze(-1)).squeeze(-1)
    return out


def mm_nn(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[2])
    for s, t in _chunks(x.shape[0], w.shape[1], w.shape[2], w.element_size()):
        out[s:t] = torch.bmm(x[s:t].unsqueeze(1), w[seg.sorted_ids[s:t]]).squeeze(1)
    return out


def wgrad(a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
    out = a.new_zeros(seg.num_experts, a.shape[1], b.shape[1], dtype=torch.float32)
    for s, t in _chunks(a.shape[0], a.shape[1], b.shape[1], 4):
        outer = a[s:t].float().unsqueeze(-1) * b[s:t].float().unsqueeze(1)
        out.index_add_(0, seg.sorted_ids[s:t].long(), outer)
    return out.to(a.dtype)
