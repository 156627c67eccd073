"""Triton: (token, slot) pairs sorted by expert into a BLOCK_M-aligned layout, in one capture-safe kernel.

Data contract
    topk_ids      [S]            int32/int64, S = T * k, values in [0, E)
    sorted_rows   [S_pad]        int32  flat pair index at each padded position; S marks padding
    pos           [S]            int32  padded position of each pair (sorted_rows[pos[p]] == p)
    block_expert  [MAX_BLOCKS]   int32  expert of each BLOCK_M block of sorted_rows; -1 past the end
    num_padded    [1]            int32  used length of sorted_rows (a multiple of BLOCK_M)
    S_pad = S + E * (BLOCK_M - 1) and MAX_BLOCKS = S_pad / BLOCK_M are static upper bounds: every expert's
    segment is rounded up to a whole block, so each GEMM block reads one expert's weights.

    route -> [permute: this kernel] -> gate_up GEMM -> down GEMM -> combine  (triton_experts.py)

One program does histogram, exclusive prefix sum over padded counts, block -> expert table, then a
scatter in which each pair takes the next free slot of its expert with an atomic increment. The order
of rows inside an expert's segment therefore varies from run to run, but nothing downstream depends on
it: every row is computed independently and the combine gathers by pair index, so outputs are
bit-identical across runs. No host sync, all sizes static: safe under CUDA graph capture.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


@triton.jit
def _align_kernel(
    ids_ptr, S, E, cursor_ptr, sorted_rows_ptr, pos_ptr, block_expert_ptr, num_padded_ptr, MAX_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, CHUNK_B: tl.constexpr,
):
    e_idx = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, S, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < S
        e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        e = tl.where(mask, e, BLOCK_E - 1)  # out-of-range lanes land in the spare last bin (BLOCK_E > E)
        counts += tl.histogram(e, BLOCK_E)
    counts = tl.where(e_idx < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    tl.store(num_padded_ptr, total)
    tl.store(cursor_ptr + e_idx, starts, mask=e_idx < E)

    # Expert of block b: the number of experts whose padded segment ends at or before b * BLOCK_M.
    n_blocks = total // BLOCK_M
    for b0 in range(0, MAX_BLOCKS, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        done = (ends[None, :] <= (b * BLOCK_M)[:, None]) & (e_idx[None, :] < E)
        expert = tl.sum(done.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(b < n_blocks, expert, -1), mask=b < MAX_BLOCKS)

    tl.debug_barrier()  # the cursors stored above must be visible to every thread's atomics below
    for start in range(0, S, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < S
        e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        dest = tl.atomic_add(cursor_ptr + e, 1, mask=mask)
        tl.store(sorted_rows_ptr + dest, offs, mask=mask)
        tl.store(pos_ptr + offs, dest, mask=mask)


@dataclasses.dataclass
class AlignedRows:
    sorted_rows: torch.Tensor  # [S_pad] int32
    pos: torch.Tensor  # [S] int32
    block_expert: torch.Tensor  # [MAX_BLOCKS] int32
    num_padded: torch.Tensor  # [1] int32

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    return num_pairs + num_experts * (block_m - 1)


def align_rows(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRows:
    flat = topk_ids.reshape(-1).contiguous()  # a [T, 1] slice of a wider tensor reshapes to a strided view
    S = flat.numel()
    s_pad = triton.cdiv(padded_size(S, num_experts, block_m), block_m) * block_m
    dev = flat.device
    sorted_rows = torch.full((s_pad,), S, dtype=torch.int32, device=dev)
    pos = torch.empty(S, dtype=torch.int32, device=dev)
    block_expert = torch.empty(s_pad // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(num_experts + 1)
    _align_kernel[(1,)](
        flat, S, num_experts, cursor, sorted_rows, pos, block_expert, num_padded, s_pad // block_m,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=1024, CHUNK_B=max(16, min(128, 16384 // block_e)),
    )
    return AlignedRows(sorted_rows, pos, block_expert, num_padded)
