"""GEMM recognizer for `experts_implementation="batched_mm"`.

Mirrors `batched_mm_experts_forward` / `_batched_linear` in transformers/integrations/moe.py
(5.17-5.23): every (token, slot) row gathers its expert's weight and runs one bmm:

    out = bmm(W[expert_ids], x.unsqueeze(-1)).squeeze(-1)    # W [E, out, in]  (is_transposed=False)
    out = bmm(x.unsqueeze(1), W[expert_ids]).squeeze(1)      # W [E, in, out]  (is_transposed=True)
"""

from __future__ import annotations

import torch.fx as fx

from .experts_common import GemmUse
from .fx_utils import follow, is_tensor_index, op_name
from .match import ExpertsForm

FORM = ExpertsForm.BATCHED_MM


def _gathered_weight(node) -> fx.Node | None:
    node = follow(node)
    if isinstance(node, fx.Node) and op_name(node) == "getitem" and is_tensor_index(node.args[1]):
        return follow(node.args[0])
    return None


def match_gemm(node: fx.Node) -> GemmUse | None:
    if op_name(node) not in ("bmm", "matmul"):
        return None
    a, b = node.args[0], node.args[1]
    out = next(iter(node.users), node) if len(node.users) == 1 else node
    out = out if op_name(out) == "squeeze" else node
    if (w := _gathered_weight(a)) is not None and op_name(b) == "unsqueeze" and b.args[1] in (-1, 2):
        return GemmUse(node, x=b.args[0], weight=w, transposed_storage=False, out=out)
    if (w := _gathered_weight(b)) is not None and op_name(a) == "unsqueeze" and a.args[1] in (1, -2):
        return GemmUse(node, x=a.args[0], weight=w, transposed_storage=True, out=out)
    return None
