"""Segment matmuls through `torch._grouped_mm`: CUTLASS on sm90/sm100 for bf16 (capture-safe), and
torch's C++ per-group loop on the CPU (any float dtype, fp32 accumulation).

Same contract as cpu_loop.py. On CUDA, `offs` (int32 [E], cumulative rows) is read on the device, so
there is no host sync and the path can be captured in a CUDA graph; other dtypes or GPUs make torch
fall back to a loop that copies `offs` to the host, so lowering/__init__.py picks this path on CUDA
only for bf16 on sm90+. Both devices need 16-byte aligned rows.
"""

from __future__ import annotations

import torch

from .segments import Segments

name = "torch_grouped_mm"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype


def mm(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=seg.offs)


def mm_nn(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=seg.offs)


def wgrad(a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
    # 2D x 2D with offs along the shared S axis yields one [N, K] block per expert.
    return torch._grouped_mm(a.t(), b, offs=seg.offs)
