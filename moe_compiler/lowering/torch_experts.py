"""The experts op built from torch ops and one segment-matmul implementation (torch_segment_mm.py): the
reference, the CPU path, and every backward (dispatch.py picks the implementation).

Data contract
    hidden        [T, H]     float (fp32 / bf16 / fp16)           x
    topk_ids      [T, k]     int32 / int64, values in [0, E]       expert of (token t, slot j); E: a sentinel
    topk_weights  [T, k]     float (any float dtype)               router weight of (t, j)
    w_gate_up     [E, 2I, H] (transposed: [E, H, 2I])              read in place, never copied
    w_down        [E, H, I]  (transposed: [E, I, H])
    b_gate_up     [E, 2I] or None, b_down [E, H] or None
    out           [T, H]     hidden's dtype, accumulated in fp32

    route (given) -> permute (torch_segment_mm.Segments) -> gate_up GEMM -> gated act -> down GEMM -> weight, unpermute,
    sum over k (combine)

    ids [T,k] --sort--> perm [S]          x_sorted = hidden[perm // k]                       [S, H]
    h = x_sorted @ W_gate_up[e]^T  [S, 2I]  ->  a = act(gate) * up  [S, I]  ->  y = a @ W_down[e]^T  [S, H]
    y *= topk_weights.flat[perm]  ->  pairs[perm] = y  ->  out = pairs.view(T, k, H).sum(1)

A sentinel pair (id E: another rank's expert under transformers' expert parallelism) contributes nothing, whatever
its weight: its sorted row lies outside every segment, and every row a segment matmul leaves unwritten is zeroed
(`_drop_sentinels`) before it reaches a sum.

With spec.scale_input (Llama-4) the weight scales the gathered rows instead: x_sorted *= weight, and y is
not weighted. The combine is an unpermute + sum over k, not an index_add: deterministic on every device.
The backward recomputes h, a and y instead of saving them (memory: 3 x S x I less per layer).
"""

from __future__ import annotations

import torch

from ..spec import ExpertsSpec
from .torch_activations import gated_backward, gated_forward
from .torch_segment_mm import Segments, project, project_dw, project_dx


def _unpermute_sum(rows: torch.Tensor, seg: Segments, T: int, k: int) -> torch.Tensor:
    """rows [S, D] in sorted order -> [T, D], summing each token's k slots (in fp32)."""
    # A gather by the inverse permutation, not `pairs[perm] = rows`: index_put is ~10x slower on CPU.
    return rows.float()[seg.inverse].view(T, k, rows.shape[-1]).sum(1)


def _drop_sentinels(rows: torch.Tensor, seg: Segments) -> torch.Tensor:
    """rows [S, D] in sorted order with the sentinel rows (never computed: whatever memory held) set to 0."""
    return rows.masked_fill(~seg.live.unsqueeze(-1), 0.0)


def _row_weights(topk_weights, seg: Segments) -> torch.Tensor:
    """[S] fp32 router weight of each sorted row."""
    return topk_weights.reshape(-1)[seg.perm].float()


def _forward_rows(impl, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec):
    """Sorted-order intermediates: (segments, x_sorted, h, a, y) with y before the router weight (x_sorted
    already scaled by it under spec.scale_input)."""
    k = topk_ids.shape[1]
    seg = Segments.build(topk_ids, w_gate_up.shape[0])
    cdt = impl.compute_dtype(hidden.dtype)
    x = hidden[seg.perm // k]
    if spec.scale_input:
        x = x.float() * _row_weights(topk_weights, seg).unsqueeze(-1)
    x = x.to(cdt)
    h = project(impl, x, w_gate_up, seg, spec.transposed).float()
    if b_gate_up is not None:
        h = h + b_gate_up[seg.gather_ids].float()
    a = gated_forward(h, spec).to(cdt)
    y = project(impl, a, w_down, seg, spec.transposed).float()
    if b_down is not None:
        y = y + b_down[seg.gather_ids].float()
    return seg, x, h, a, _drop_sentinels(y, seg)


def experts_forward(impl, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec):
    T, k = topk_ids.shape
    if T == 0 or k == 0:
        return hidden.new_zeros(hidden.shape)
    seg, _, _, _, y = _forward_rows(impl, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    if not spec.scale_input:
        y = y * _row_weights(topk_weights, seg).unsqueeze(-1)
    return _unpermute_sum(y, seg, T, k).to(hidden.dtype)


def experts_backward(impl, grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec,
                     weight_grads=True):
    """Returns (d_hidden, d_topk_weights, d_w_gate_up, d_w_down, d_b_gate_up, d_b_down); absent biases -> None;
    without weight_grads (frozen experts) the weights' and biases' are None and not computed."""
    T, k = topk_ids.shape
    if T == 0 or k == 0:
        zeros = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
        wz = zeros if weight_grads else (lambda t: None)
        return (zeros(hidden), zeros(topk_weights), wz(w_gate_up), wz(w_down), wz(b_gate_up), wz(b_down))
    seg, x, h, a, y = _forward_rows(impl, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    cdt = impl.compute_dtype(hidden.dtype)
    tr = spec.transposed
    s = _row_weights(topk_weights, seg).unsqueeze(-1)  # [S, 1]

    g = _drop_sentinels(grad_out[seg.perm // k].float(), seg)  # [S, H] upstream gradient of each row's token
    if spec.scale_input:
        dy = g  # y reaches the output unweighted; the weight's gradient comes from the input side below
    else:
        d_weights = (g * y).sum(-1)[seg.inverse]
        dy = g * s  # [S, H]

    d_b_down = d_w_down = d_b_gate_up = d_w_gate_up = None
    if b_down is not None and weight_grads:
        d_b_down = torch.zeros_like(b_down, dtype=torch.float32).index_add_(0, seg.gather_ids, dy)
    dy_c = dy.to(cdt)
    if weight_grads:
        d_w_down = project_dw(impl, a, dy_c, seg, tr)
    da = project_dx(impl, dy_c, w_down, seg, tr).float()  # [S, I]

    dh = _drop_sentinels(gated_backward(da, h, spec), seg)  # [S, 2I] fp32
    if b_gate_up is not None and weight_grads:
        d_b_gate_up = torch.zeros_like(b_gate_up, dtype=torch.float32).index_add_(0, seg.gather_ids, dh)
    dh_c = dh.to(cdt)
    if weight_grads:
        d_w_gate_up = project_dw(impl, x, dh_c, seg, tr)
    dx = _drop_sentinels(project_dx(impl, dh_c, w_gate_up, seg, tr), seg)  # [S, H], w.r.t. the GEMM's input rows
    if spec.scale_input:
        # rows = weight * x: d weight = <x, d rows>, d x = weight * d rows
        d_weights = (hidden[seg.perm // k].float() * dx.float()).sum(-1)[seg.inverse]
        dx = dx.float() * s

    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return (
        _unpermute_sum(dx, seg, T, k).to(hidden.dtype),
        d_weights.view(T, k).to(topk_weights.dtype),
        cast(d_w_gate_up, w_gate_up),
        cast(d_w_down, w_down),
        cast(d_b_gate_up, b_gate_up),
        cast(d_b_down, b_down),
    )
