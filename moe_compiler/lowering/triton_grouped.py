"""The experts forward with its two GEMMs from a grouped-GEMM library (torch._grouped_mm, or csrc/'s CUTLASS
through lowering/cutlass.py) and everything between them Triton passes in the model's dtype.

The torch composite (torch_experts.py) over the same GEMMs is the reference and the backward's recompute: its
glue runs in fp32 torch ops (sort, gathers, a [S, 2I] fp32 copy for the activation, an unpermute and a sum)
and costs more than the GEMMs it feeds at prefill sizes (H200, Qwen3-30B-A3B, T = 4096: 2.14 ms against
0.67 ms of GEMMs; benchmarks/NOTES.md "CUTLASS v0 measured"). A tuned entry that names a library path
(triton_config.GroupedMMConfig / CutlassConfig) runs this file instead.

Data contract (S = T * k pairs; the GEMMs see rows sorted by expert, segment e = [offs[e-1], offs[e]))
    hidden        [T, H]        bf16 / fp16 (fp32 on the CPU, for the tests)
    topk_ids      [T, k]        values in [0, E]; E: a sentinel (another rank's expert), contributing nothing
    topk_weights  [T, k]        any float dtype, applied in fp32
    w_gate_up     [E, 2I, H] (transposed [E, H, 2I]), w_down [E, H, I] (transposed [E, I, H]): read in place
    b_gate_up     [E, 2I] / None, b_down [E, H] / None
    rows          triton_align.align_rows(ids, E, block_m=1): no padding, so seg_end is the GEMMs' `offs`,
                  block_expert the expert of each sorted row, num_padded the live pairs, pos the sorted row
                  of each pair (-1: a sentinel)
    xs   [S, H]   xs[r] = hidden[sorted_rows[r] // k]         (x its router weight under spec.scale_input)
    h    [S, 2I]  grouped GEMM (library)                     rows past the live pairs: never written nor read
    a    [S, I]   act(gate + b) * (up + b), fp32 math        (gate / up concatenated or interleaved)
                  or, CutlassMM with act_epilogue on SwiGLU experts (cutlass.silu_epilogue_suits): g [S, I] by a
                  gate GEMM, then a = silu(g) * up in the up GEMM's epilogue (no h, no activation pass)
    z    [S, 2I]  optional (a training forward): h + b at each pair's row t*k + j, what the backward reads
    y    [S, H]   grouped GEMM (library)
    out  [T, H]   sum_j w[t, j] * (y[pos[t k + j]] + b_down[e]), fp32, slot order: deterministic

    route -> permute (align, gather) -> gate_up GEMM (library) -> act -> down GEMM (library) -> combine

Six Triton launches (align's three, gather, act, combine) around the two library GEMMs, against the sorted
path's align and three kernels: this path pays one [S, H] write + read (xs), one [S, 2I] write + read (h) and
the weighting in the combine, and wins where the library's GEMM tiles beat Triton's by more than that — large
experts with many rows each (H200, op ms, Triton / this over torch._grouped_mm: Mixtral-8x7B T = 4096 5.09 /
4.96; Qwen3-30B-A3B T = 16384 2.34 / 2.72); the tuner measures it per point. Capture-safe: static sizes,
nothing read on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import ExpertsSpec, GateUpLayout
from . import launch
from .cutlass import silu_epilogue_suits
from .torch_segment_mm import Segments, project
from .triton_act import ACT_CODE, gated_act
from .triton_align import align_rows, gathered, row_block
from .triton_experts import launch_combine


@triton.jit
def _act_kernel(h_ptr, a_ptr, b_ptr, z_ptr, expert_ptr, sorted_rows_ptr, num_live_ptr, I, stride_hm, stride_am,
                stride_be, stride_zm, alpha, limit, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
                HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if r < tl.load(num_live_ptr):
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = c < I
        # Column of each output's gate and up partner in h (and in b_gate_up): 2c, 2c + 1 interleaved; c, I + c.
        g_col = 2 * c if INTERLEAVED else c
        u_col = 2 * c + 1 if INTERLEAVED else I + c
        row = h_ptr + r.to(tl.int64) * stride_hm
        gate = tl.load(row + g_col, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(row + u_col, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = b_ptr + tl.load(expert_ptr + r).to(tl.int64) * stride_be
            gate += tl.load(b + g_col, mask=ok, other=0.0).to(tl.float32)
            up += tl.load(b + u_col, mask=ok, other=0.0).to(tl.float32)
        if STORE_Z:  # the pre-activation row, bias added, at the pair's row (triton_experts' z contract)
            z = z_ptr + tl.load(sorted_rows_ptr + r).to(tl.int64) * stride_zm
            tl.store(z + g_col, gate.to(z_ptr.dtype.element_ty), mask=ok)
            tl.store(z + u_col, up.to(z_ptr.dtype.element_ty), mask=ok)
        a = gated_act(gate, up, alpha, limit, ACT)
        tl.store(a_ptr + r.to(tl.int64) * stride_am + c, a.to(a_ptr.dtype.element_ty), mask=ok)


def experts_forward(mm, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                    spec: ExpertsSpec, z=None) -> torch.Tensor:
    """out [T, H] through the segment-matmul class `mm` (GroupedMM, a CutlassMM: their `mm` / `mm_nn` read only
    the segments' `offs`); with `z` [T*k, 2I], each live pair's pre-activation row stored there too (a sentinel
    pair's is not written). T, k > 0; ids out of [0, E] fail align's device-side assert."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, I, S = w_gate_up.shape[0], spec.intermediate(w_down), T * k
    rows = align_rows(topk_ids, E, 1)
    seg = Segments(sorted_ids=None, perm=None, offs=rows.seg_end, num_experts=E)  # all a library mm reads
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1).contiguous()

    xs = gathered(hidden, rows, weights, k, 1, scale=spec.scale_input, out=hidden.new_empty(S, H))
    if getattr(mm, "act_epilogue", False) and silu_epilogue_suits(spec, w_gate_up, b_gate_up, z,
                                                                  mm.act_epilogue_dtypes):
        a = mm.gate_up_silu(xs, w_gate_up, seg)  # two GEMMs, the activation in the second's epilogue
    else:
        a = _gate_up_act(mm, xs, w_gate_up, b_gate_up, rows, seg, spec, I, z)
    y = project(mm, a, w_down, seg, spec.transposed)
    out = hidden.new_empty(T, H)
    launch_combine(y, rows, k, out, weights=None if spec.scale_input else weights,
                   ids=topk_ids.reshape(-1).contiguous(), b_down=b_down)
    return out


def _gate_up_act(mm, xs, w_gate_up, b_gate_up, rows, seg: Segments, spec: ExpertsSpec, I: int, z):
    """a [S, I]: the gate_up GEMM into h [S, 2I], then the activation pass (biases added, z stored there)."""
    h = project(mm, xs, w_gate_up, seg, spec.transposed)
    a = xs.new_empty(xs.shape[0], I)
    launch.kernel(_act_kernel)[(xs.shape[0], triton.cdiv(I, row_block(I)))](
        h, a, b_gate_up if b_gate_up is not None else h, z if z is not None else h, rows.block_expert,
        rows.sorted_rows, rows.num_padded, I, h.stride(0), a.stride(0), b_gate_up.stride(0) if b_gate_up is not None
        else 0, z.stride(0) if z is not None else 0, float(spec.swiglu_alpha), float(spec.swiglu_limit),
        ACT=ACT_CODE[spec.activation], INTERLEAVED=spec.gate_up is GateUpLayout.INTERLEAVED,
        HAS_BIAS=b_gate_up is not None, STORE_Z=z is not None, BLOCK=row_block(I), num_warps=4,
    )
    return a
