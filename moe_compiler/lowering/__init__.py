"""Lowering: picks how the experts op runs for a given device, dtype and shape.

Every implementation provides the three segment matmuls of cpu_loop.py (`mm`, `mm_nn`, `wgrad`) and a
`compute_dtype`; composite.py builds the experts forward and backward from them. The choice is made
per call from static facts only (device, dtype, alignment), never from data, so it is stable under
CUDA graph capture.
"""

from __future__ import annotations

import functools

import torch

from . import cpu_loop, gather_bmm, grouped_mm


@functools.cache
def _sm90_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] in (9, 10)


def _rows_16b_aligned(w_gate_up: torch.Tensor, w_down: torch.Tensor, *tensors: torch.Tensor) -> bool:
    # CUTLASS grouped GEMM loads 16-byte vectors: every operand's base and every row stride (H, I and 2I
    # elements, in whichever layout) must be a multiple of 16 bytes.
    dims = (*w_gate_up.shape[1:], *w_down.shape[1:])
    size = w_gate_up.element_size()
    return all(d * size % 16 == 0 for d in dims) and all(t.data_ptr() % 16 == 0 for t in (w_gate_up, w_down, *tensors))


def select(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """The segment-matmul implementation for these operands (a module with mm / mm_nn / wgrad)."""
    if hidden.device.type == "cpu":
        # torch's grouped GEMM loops over groups in C++ (faster than our Python loop for many experts);
        # the Python loop remains for rows that are not 16-byte aligned.
        return grouped_mm if _rows_16b_aligned(w_gate_up, w_down, hidden) else cpu_loop
    if hidden.device.type != "cuda":
        return cpu_loop
    if (
        hidden.dtype == torch.bfloat16
        and w_gate_up.dtype == torch.bfloat16
        and _sm90_or_newer(hidden.device.index if hidden.device.index is not None else torch.cuda.current_device())
        and _rows_16b_aligned(w_gate_up, w_down, hidden)
    ):
        return grouped_mm
    return gather_bmm
