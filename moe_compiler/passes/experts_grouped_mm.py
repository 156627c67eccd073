"""GEMM recognizer for `experts_implementation="grouped_mm"` (the transformers 5.x default).

Mirrors `grouped_mm_experts_forward` / `_grouped_linear` in transformers/integrations/moe.py
(5.17-5.23). Each projection is one grouped GEMM over the expert-sorted rows:

    out = grouped_mm(x_sorted, W.transpose(-2, -1), offs=offsets)   # W [E, out, in]  (is_transposed=False)
    out = grouped_mm(x_sorted, W, offs=offsets)                     # W [E, in, out]  (is_transposed=True)

where grouped_mm is `torch._grouped_mm` / `F.grouped_mm` (bf16) or the opaque
`torch.ops.transformers.grouped_mm_fallback` (other dtypes under torch.compile).
"""

from __future__ import annotations

import torch.fx as fx

from .experts_common import GemmUse
from .fx_utils import arg, follow, op_name
from .match import ExpertsForm

FORM = ExpertsForm.GROUPED_MM
GEMM_OPS = {"_grouped_mm", "grouped_mm", "transformers::grouped_mm_fallback"}


def match_gemm(node: fx.Node) -> GemmUse | None:
    if op_name(node) not in GEMM_OPS:
        return None
    x, w = node.args[0], node.args[1]
    if arg(node, 2, "offs") is None:
        return None  # a plain batched matmul, not grouped over experts
    if op_name(w) == "transpose" and sorted(d % 3 for d in w.args[1:3]) == [1, 2]:
        return GemmUse(node, x=x, weight=follow(w.args[0]), transposed_storage=False, out=node)
    return GemmUse(node, x=x, weight=follow(w), transposed_storage=True, out=node)
