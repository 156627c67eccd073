"""The FP8 experts forward (experts_quantized, 128 x 128 block-scaled e4m3 weights) with its two GEMMs on csrc/'s
block-scaled CUTLASS grouped GEMM (cutlass.py: grouped_mm_fp8) and Triton passes between them.

Data contract (S = T * k pairs; the GEMMs see rows sorted by expert, segment e = [offs[e-1], offs[e]))
    hidden        [T, H]              bf16
    topk_ids      [T, k]              values in [0, E]; E: a sentinel (another rank's expert), contributing nothing
    w_gate_up     [E, 2I, H] e4m3     gate rows then up rows; w_gate_up_s [E, ceil(2I/128), ceil(H/128)]
    w_down        [E, H, I] e4m3      w_down_s [E, ceil(H/128), ceil(I/128)]; scales fp32 / bf16 / e8m0
    rows          triton_align.align_rows(ids, E, block_m=1): no padding, seg_end is the GEMMs' `offs`
    xq, xs        [S, H] e4m3, [S, ceil(H/128)] fp32    hidden rounded once per token and 128 columns, its
                                                        rows copied into sorted order (quantize_sorted_rows)
    h             [S, 2I] bf16        grouped GEMM (CUTLASS): each 128-deep K block's product times its two scales
    a, a_s        [S, I] e4m3, [S, ceil(I/128)] fp32    act(gate) * up, rounded per row and 128 columns
    y             [S, H] bf16         grouped GEMM (CUTLASS)
    out           [T, H]              sum_j w[t, j] y[pos[t k + j]], fp32, slot order: deterministic

    route -> quantize -> permute (align, gather) -> gate_up GEMM -> act + quantize -> down GEMM -> combine

The numbers are the Triton w8a8_rows path's (triton_quantized.py): the same rounding of hidden and of act (the
same kernels), the same fp32 promotion per K block; only the GEMMs' tiles and the place of the router weight
(here the combine, in fp32) differ. Weight scales other than fp32 are converted per call (a [E, Nb, Kb] tensor,
0.03% of the weight bytes), never kept. Capture-safe: static sizes, nothing read on the host.
"""

from __future__ import annotations

import torch
import triton

from ..spec import QuantizedExpertsSpec
from . import cutlass
from .triton_align import align_rows
from .triton_experts import launch_combine
from .triton_quantized import _scale_view, launch_act_rows, quantize_sorted_rows
from .triton_quantized_config import ACT_GROUP


def fp32_scales(s: torch.Tensor) -> torch.Tensor:
    """Block scales as the CUTLASS kernel reads them: fp32, each expert's [Nb, Kb] packed row-major."""
    s, e8m0 = _scale_view(s)
    s = torch.exp2(s.float() - 127.0) if e8m0 else s.float()  # (e8m0: a biased power-of-two exponent)
    if s.stride(2) != 1 or s.stride(1) != s.shape[2]:
        s = s.contiguous()
    return s


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                    spec: QuantizedExpertsSpec, config: int) -> torch.Tensor:
    """out [T, H] with CUTLASS FP8 config `config` (cutlass.FP8_CONFIGS). T, k > 0; the operands passed
    cutlass.fp8_usable."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, I, S = w_gate_up.shape[0], w_down.shape[2], T * k
    rows = align_rows(topk_ids, E, 1)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1).contiguous()

    xq, xs = quantize_sorted_rows(hidden, rows, k, 1)  # [S, ...]: one token row per pair (sentinels: unused)
    h = cutlass.grouped_mm_fp8(xq, xs, w_gate_up, fp32_scales(w_gate_up_scale), rows.seg_end, config)
    a = torch.empty(S, I, dtype=torch.float8_e4m3fn, device=hidden.device)
    a_s = torch.empty(S, triton.cdiv(I, ACT_GROUP), dtype=torch.float32, device=hidden.device)
    launch_act_rows(h, a, a_s, rows.num_padded, spec, quantize=True)
    y = cutlass.grouped_mm_fp8(a, a_s, w_down, fp32_scales(w_down_scale), rows.seg_end, config)
    out = hidden.new_empty(T, H)
    launch_combine(y, rows, k, out, weights=weights, ids=topk_ids.reshape(-1).contiguous())
    return out
