"""Triton: (token, slot) pairs sorted by expert into a BLOCK_M-aligned layout. Capture-safe, deterministic.

Data contract (S = T * k pairs, pair p = t * k + j; C = CHUNK pairs per program, NB = cdiv(S, C) chunks)
    topk_ids      [S]            int32/int64, values in [0, E]; E is the expert-parallel sentinel (a route to another
                                 rank's expert): sorted nowhere, pos -1. Others are clamped, flagged in ids_ok, and
                                 fail the launch
    sorted_rows   [S_pad]        int32  pair index at each padded sorted position (padding slots unwritten)
    pos           [S]            int32  padded sorted position of each pair (sorted_rows[pos[p]] == p); -1: sentinel
    block_expert  [MAX_BLOCKS]   int32  expert of each BLOCK_M block of sorted positions; -1 past the end
    seg_end       [E]            int32  end of expert e's real rows (its padding follows, up to the block edge)
    num_padded    [1]            int32  used length of sorted_rows, a multiple of BLOCK_M
    ids_ok        [1]            int32  1 if every id was in [0, E], else 0 (on the GPU the kernel also asserts)
    MAX_BLOCKS = cdiv(S, BLOCK_M) + min(E, S) bounds the blocks of any routing (each non-empty expert
    adds at most one partial block); S_pad = MAX_BLOCKS * BLOCK_M. BLOCK_M = 1 (unpadded rows) has no
    partial blocks: MAX_BLOCKS = S. Static, so the grid and buffers are fixed under CUDA graph capture, and no
    host sync is needed.

    route -> [permute: this file] -> gate_up GEMM -> down GEMM -> combine  (triton_experts.py)

and, for GEMMs that take their rows in sorted order (a library's: triton_grouped.py, triton_backward_library.py),
`gathered` copies token rows into that order (padding rows 0) and `zero_padding_rows` clears the padding slots
a kernel left unwritten.

Three launches, none serial over S (one where the pairs fit one chunk, S <= CHUNK: the decode-sized calls of the
sorted path, where each launch is host time in a step without CUDA graphs — `_align_one_chunk_kernel` does the
three steps in one program):
    count    (NB programs)  per-chunk expert histogram              -> counts [NB, BLOCK_E]
    offsets  (1 program)    per-expert totals, padded prefix sum, and for every (chunk, expert) the
                            position where that chunk's rows of that expert start, minus the chunk's
                            rows of lower experts (so that adding a row's rank in the chunk's sorted
                            order gives its destination)  -> in place over counts
    scatter  (NB programs)  sort the chunk's keys (expert * C + i) in registers; the q-th key goes to
                            offsets[chunk, expert] + q; each program also fills its share of the
                            block -> expert table
The result is the stable sort by expert (the order of torch.sort(stable=True)): identical on every run.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import launch

CHUNK = 1024  # most pairs per count/scatter program: one register-resident bitonic sort of 1024 keys


@triton.jit
def _clamped_ids(e, live, E):
    """The chunk's ids `e` (loaded by the caller) -> (live, e clamped, bad, sentinel).

    The load stays in each kernel's own body: torch's write analysis of a recorded kernel follows a written
    address back through the arguments of a called function but not through a load, so ids loaded in here
    (and `e` then feeding the scatter's addresses) would count as written, and Inductor would copy topk_ids
    before every call."""
    bad = live & ((e < 0) | (e > E))
    # Sentinel pairs (id E) take part in nothing: treated as dead lanes, their pos set to -1 by the scatter.
    sentinel = live & (e == E)
    live = live & (e != E)
    # Out-of-range ids are clamped so that every later access stays in bounds until the assert stops the op.
    e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int32)
    return live, e, bad, sentinel


@triton.jit
def _chunk_pairs(chunk, S, CHUNK: tl.constexpr):
    """The chunk's pair indices and which of them exist (no load here: see _clamped_ids)."""
    offs = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    return offs, offs < S


@triton.jit
def _count_kernel(ids_ptr, S, E, counts_ptr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    offs, live = _chunk_pairs(chunk, S, CHUNK)
    live, e, bad, _ = _clamped_ids(tl.load(ids_ptr + offs, mask=live, other=0), live, E)
    spare = BLOCK_E - 1  # BLOCK_E > E: the last bin is free; it receives the dead lanes, then holds the bad count
    hist = tl.histogram(tl.where(live, e, spare), BLOCK_E)
    e_idx = tl.arange(0, BLOCK_E)
    hist = tl.where(e_idx == spare, tl.sum(bad.to(tl.int32), 0), hist)
    tl.store(counts_ptr + chunk * BLOCK_E + e_idx, hist)


@triton.jit
def _segments(counts, n_bad, real, seg_end_ptr, num_padded_ptr, ok_ptr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """From every expert's pair count [BLOCK_E] (0 past E) and the number of bad ids: ids_ok (a bad id fails the
    launch), num_padded and seg_end stored; returns (starts, ends) of the padded segments, ends past E 2**30 (never
    <= a block start, for the block -> expert table), and num_padded."""
    tl.store(ok_ptr, (n_bad == 0).to(tl.int32))
    tl.device_assert(n_bad == 0, "moe_compiler.experts: topk_ids out of [0, E]")  # live: see LIVE_ASSERTS
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    num_padded = tl.sum(padded, 0)
    tl.store(num_padded_ptr, num_padded)
    tl.store(seg_end_ptr + tl.arange(0, BLOCK_E), starts + counts, mask=real)
    return starts, tl.where(real, ends, 2**30), num_padded


@triton.jit
def _offsets_kernel(
    counts_ptr, NB, E, seg_end_ptr, pad_end_ptr, num_padded_ptr, ok_ptr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
):
    e_idx = tl.arange(0, BLOCK_E)
    r_idx = tl.arange(0, ROWS)
    real = e_idx < E

    totals = tl.zeros([BLOCK_E], dtype=tl.int32)
    for r0 in range(0, NB, ROWS):
        rows = r0 + r_idx
        tile = tl.load(counts_ptr + rows[:, None] * BLOCK_E + e_idx[None, :], mask=(rows < NB)[:, None], other=0)
        totals += tl.sum(tile, axis=0)
    n_bad = tl.sum(tl.where(e_idx == BLOCK_E - 1, totals, 0), 0)
    starts, ends, _ = _segments(tl.where(real, totals, 0), n_bad, real, seg_end_ptr, num_padded_ptr, ok_ptr, BLOCK_M,
                             BLOCK_E)
    tl.store(pad_end_ptr + e_idx, ends)  # for the block -> expert table, built by the scatter programs

    # offsets[c, e] = starts[e] + (rows of e in chunks < c) - (rows of experts < e in chunk c)
    run = starts
    for r0 in range(0, NB, ROWS):
        rows = r0 + r_idx
        ptrs = counts_ptr + rows[:, None] * BLOCK_E + e_idx[None, :]
        tile = tl.load(ptrs, mask=(rows < NB)[:, None], other=0)
        tile = tl.where(real[None, :], tile, 0)
        earlier_chunks = tl.cumsum(tile, axis=0) - tile
        lower_experts = tl.cumsum(tile, axis=1) - tile
        tl.store(ptrs, run[None, :] + earlier_chunks - lower_experts, mask=(rows < NB)[:, None])
        run += tl.sum(tile, axis=0)


@triton.jit
def _scatter_kernel(
    ids_ptr, S, E, offsets_ptr, sorted_rows_ptr, pos_ptr, pad_end_ptr, num_padded_ptr, block_expert_ptr,
    MAX_BLOCKS, BLOCKS_PER_PROGRAM,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_B: tl.constexpr,
):
    chunk = tl.program_id(0)
    offs, live = _chunk_pairs(chunk, S, CHUNK)
    live, e, _, sentinel = _clamped_ids(tl.load(ids_ptr + offs, mask=live, other=0), live, E)
    _scatter_chunk(chunk, offs, live, e, sentinel, E, offsets_ptr + chunk * BLOCK_E, sorted_rows_ptr, pos_ptr,
                   CHUNK, BLOCK_E)
    first = chunk * BLOCKS_PER_PROGRAM
    _block_table(block_expert_ptr, tl.load(pad_end_ptr + tl.arange(0, BLOCK_E)), tl.load(num_padded_ptr) // BLOCK_M,
                 first, tl.minimum(first + BLOCKS_PER_PROGRAM, MAX_BLOCKS), BLOCK_M, CHUNK_B)


@triton.jit
def _scatter_chunk(chunk, offs, live, e, sentinel, E, chunk_offsets_ptr, sorted_rows_ptr, pos_ptr,
                   CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """The chunk's pairs to their sorted positions: the q-th key of the chunk's sorted order goes to
    chunk_offsets_ptr[its expert] + q (the offsets of _offsets_kernel); sentinel pairs get pos -1."""
    tl.store(pos_ptr + offs, tl.full([CHUNK], -1, tl.int32), mask=sentinel)
    local = tl.arange(0, CHUNK)
    # Dead lanes sort last (spare expert BLOCK_E - 1); keys are unique, so the sort is stable by construction.
    keys = tl.sort(tl.where(live, e, BLOCK_E - 1) * CHUNK + local)
    sorted_e = keys // CHUNK
    pair = chunk.to(tl.int64) * CHUNK + keys % CHUNK
    keep = sorted_e < E
    dest = tl.load(chunk_offsets_ptr + sorted_e, mask=keep, other=0) + local
    tl.store(sorted_rows_ptr + dest, pair.to(tl.int32), mask=keep)
    tl.store(pos_ptr + pair, dest, mask=keep)


@triton.jit
def _block_table(block_expert_ptr, ends, n_blocks, first, last, BLOCK_M: tl.constexpr, CHUNK_B: tl.constexpr):
    """Blocks [first, last) of the block -> expert table: the expert of block b is the number of experts whose
    padded segment ends (`ends` [BLOCK_E], past E: never <= a block start) at or before b * BLOCK_M; -1 past the
    n_blocks used."""
    for b0 in range(first, last, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        expert = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(b < n_blocks, expert, -1), mask=b < last)


@triton.jit
def _align_one_chunk_kernel(
    ids_ptr, S, E, offsets_ptr, sorted_rows_ptr, pos_ptr, seg_end_ptr, num_padded_ptr, block_expert_ptr, ok_ptr,
    MAX_BLOCKS, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_B: tl.constexpr,
):
    """count, offsets and scatter of a single chunk (S <= CHUNK) in one program: the same results."""
    chunk = tl.program_id(0)  # 0
    offs, live = _chunk_pairs(chunk, S, CHUNK)
    live, e, bad, sentinel = _clamped_ids(tl.load(ids_ptr + offs, mask=live, other=0), live, E)
    e_idx = tl.arange(0, BLOCK_E)
    real = e_idx < E
    counts = tl.where(real, tl.histogram(tl.where(live, e, BLOCK_E - 1), BLOCK_E), 0)
    starts, ends, num_padded = _segments(counts, tl.sum(bad.to(tl.int32), 0), real, seg_end_ptr, num_padded_ptr,
                                         ok_ptr, BLOCK_M, BLOCK_E)
    # The one chunk's offsets (_offsets_kernel's, no earlier chunks), through memory: the scatter reads them by
    # each sorted key's expert; the barrier makes the program's stores visible to all its threads.
    tl.store(offsets_ptr + e_idx, starts - (tl.cumsum(counts, 0) - counts))
    tl.debug_barrier()
    _scatter_chunk(chunk, offs, live, e, sentinel, E, offsets_ptr, sorted_rows_ptr, pos_ptr, CHUNK, BLOCK_E)
    _block_table(block_expert_ptr, ends, num_padded // BLOCK_M, 0, MAX_BLOCKS, BLOCK_M, CHUNK_B)


@dataclasses.dataclass
class AlignedRows:
    sorted_rows: torch.Tensor  # [S_pad] int32
    pos: torch.Tensor  # [S] int32
    block_expert: torch.Tensor  # [MAX_BLOCKS] int32
    seg_end: torch.Tensor  # [E] int32
    num_padded: torch.Tensor  # [1] int32
    ids_ok: torch.Tensor  # [1] int32

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def max_blocks(num_pairs: int, num_experts: int, block_m: int, min_slots: int = 0) -> int:
    """MAX_BLOCKS of the data contract, raised to cover at least min_slots slots (trailing slots no routing uses:
    for a library GEMM that picks its kernel from its operand's row count, triton_backward.GroupedTile)."""
    if block_m == 1:  # unpadded rows (the library backward's: triton_backward.BackwardConfig.unpadded)
        bound = num_pairs
    else:
        # (sym_min: a symbolic num_pairs gives an expression, not a guard on which term is smaller)
        bound = triton.cdiv(num_pairs, block_m) + torch.sym_min(num_experts, num_pairs)
    return torch.sym_max(bound, triton.cdiv(min_slots, block_m)) if min_slots else bound


def chunk_size(num_pairs: int) -> int:
    """Pairs per count/scatter program: the sort's cost grows with it, so small problems take small chunks. A
    symbolic num_pairs takes the chunk of the largest it can be (launch.upper_bound)."""
    most = launch.upper_bound(num_pairs)
    return CHUNK if most is None else max(64, min(CHUNK, triton.next_power_of_2(most)))


def align_rows(topk_ids: torch.Tensor, num_experts: int, block_m: int, min_slots: int = 0) -> AlignedRows:
    """Sort the pairs of topk_ids [T, k] by expert into BLOCK_M-aligned segments (see the data contract), with
    S_pad at least min_slots (max_blocks)."""
    flat = topk_ids.reshape(-1).contiguous()  # a [T, 1] slice of a wider tensor reshapes to a strided view
    S = flat.numel()
    if S >= 2**31 - num_experts * block_m:
        raise ValueError(
            f"moe_compiler: {S} (token, slot) pairs exceed the int32 row index; split the batch below 2^31 pairs"
        )
    n_blocks = max_blocks(S, num_experts, block_m, min_slots)
    chunk = chunk_size(S)
    nb = triton.cdiv(S, chunk)
    block_e = triton.next_power_of_2(num_experts + 1)
    sizes = [n_blocks * block_m, S, n_blocks, num_experts, 1, 1, nb * block_e, block_e]
    if launch.tracing():
        # Recorded launches: one buffer each. Kernels writing views of one buffer would be functionalized into
        # slice_scatter copies of the whole buffer after every launch; Inductor allocates from its own pool.
        parts = [torch.empty(n, dtype=torch.int32, device=flat.device) for n in sizes]
    else:
        # Eager: one allocation carved into every buffer (allocations are host time on the critical path).
        parts = torch.empty(sum(sizes), dtype=torch.int32, device=flat.device).split(sizes)
    rows = AlignedRows(*parts[:6])
    # counts [NB, BLOCK_E] row-major, kept flat: the kernels index it themselves, and a 2-D buffer of a symbolic NB
    # would have torch's functional copy of it guard on whether NB is 1
    counts, pad_end = parts[6], parts[7]
    chunk_b = max(16, min(128, 8192 // block_e))
    most = launch.upper_bound(S)
    if most is not None and most <= chunk:  # one chunk for every size the call can have
        launch.kernel(_align_one_chunk_kernel)[(1,)](
            flat, S, num_experts, counts, rows.sorted_rows, rows.pos, rows.seg_end, rows.num_padded,
            rows.block_expert, rows.ids_ok, n_blocks,
            CHUNK=chunk, BLOCK_E=block_e, BLOCK_M=block_m, CHUNK_B=chunk_b, **launch.asserts(),
        )
        return rows
    launch.kernel(_count_kernel)[(nb,)](flat, S, num_experts, counts, CHUNK=chunk, BLOCK_E=block_e)
    launch.kernel(_offsets_kernel)[(1,)](
        counts, nb, num_experts, rows.seg_end, pad_end, rows.num_padded, rows.ids_ok,
        BLOCK_M=block_m, BLOCK_E=block_e, ROWS=max(1, 16384 // block_e), num_warps=8, **launch.asserts(),
    )
    launch.kernel(_scatter_kernel)[(nb,)](
        flat, S, num_experts, counts, rows.sorted_rows, rows.pos, pad_end, rows.num_padded, rows.block_expert,
        n_blocks, triton.cdiv(n_blocks, nb), CHUNK=chunk, BLOCK_E=block_e, BLOCK_M=block_m, CHUNK_B=chunk_b,
    )
    return rows


@triton.jit
def _sorted_rows_kernel(src_ptr, dst_ptr, topk_w_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, num_padded_ptr,
                        N, TOP_K, stride_src, stride_dst,
                        GATHER: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst [S_pad, N] in padded sorted order, for a library GEMM over the sorted rows: with GATHER, each real
    slot's row is src's row of its token (times the pair's router weight with SCALE) and each padding slot's is 0;
    without, only dst's padding slots are set to 0 (rows a kernel left unwritten: whatever memory held). Slots
    past num_padded are not touched."""
    r = tl.program_id(0)
    if r < tl.load(num_padded_ptr):
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = n < N
        end = tl.load(seg_end_ptr + tl.load(block_expert_ptr + r // BLOCK_M))  # of the slot's expert's real rows
        real = tl.full([BLOCK_N], r, tl.int32) < end  # (as a vector: the interpreter takes no scalar masks)
        dst = dst_ptr + r.to(tl.int64) * stride_dst + n
        if GATHER:
            pair = tl.where(r < end, tl.load(sorted_rows_ptr + r), 0).to(tl.int64)  # a padding slot's: unwritten
            row = tl.load(src_ptr + (pair // TOP_K) * stride_src + n, mask=ok & real, other=0.0)
            if SCALE:
                s = tl.load(topk_w_ptr + pair).to(tl.float32)
                row = (row.to(tl.float32) * s).to(dst_ptr.dtype.element_ty)
            tl.store(dst, row, mask=ok)
        else:
            tl.store(dst, tl.zeros([BLOCK_N], dtype=dst_ptr.dtype.element_ty), mask=ok & ~real)


def _launch_sorted_rows(src, dst, rows: AlignedRows, weights, k: int, block_m: int, gather: bool, scale: bool):
    N = dst.shape[1]
    # at least 2 KB per program: 1-byte rows (the FP8 path's e4m3 copy, DeepSeek-V3 T = 4096: 215 us at 1 KB per
    # program, 143 at 2 KB; NOTES "FP8 row passes and TMA measured") take 2048 columns, wider types row_block's
    block_n = max(row_block(N), min(2048 // dst.element_size(), triton.next_power_of_2(N)))
    launch.kernel(_sorted_rows_kernel)[(rows.sorted_rows.numel(), triton.cdiv(N, block_n))](
        src, dst, weights, rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
        N, k, src.stride(0), dst.stride(0),
        GATHER=gather, SCALE=scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return dst


def row_block(n: int) -> int:
    """The column block of a pass over rows of n elements (one program per row and block)."""
    return min(1024, triton.next_power_of_2(max(n, 16)))


def gathered(src, rows: AlignedRows, weights, k: int, block_m: int, *, scale: bool = False, out=None):
    """src's token rows copied into padded sorted order (x the pair's router weight `weights`: scale; without
    scale weights may be None), padding rows 0: into `out` (default: a new [S_pad, N]; any buffer with a row per
    used slot)."""
    out = launch.empty(src, rows.sorted_rows.numel(), src.shape[1]) if out is None else out
    return _launch_sorted_rows(src, out, rows, weights if scale else src, k, block_m, gather=True, scale=scale)


def zero_padding_rows(t, rows: AlignedRows, block_m: int):
    """t [S_pad, N] (a kernel's output in padded sorted order) with its unwritten padding rows set to 0, in place."""
    if block_m == 1:  # unpadded: every used row is a real one
        return t
    return _launch_sorted_rows(t, t, rows, t, 1, block_m, gather=False, scale=False)
