"""CUDA segment matmuls through `torch._grouped_mm` (CUTLASS on sm90/sm100, bf16): capture-safe.

Same contract as cpu_loop.py; `offs` (int32 [E], cumulative rows) is read on the device, so there is
no host sync and the path can be captured in a CUDA graph. Other dtypes, or other GPUs, make torch
fall back to a loop that copies `offs` to the host, so lowering/__init__.py only picks this path for
bf16 on sm90+ with 16-byte aligned rows.
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
