"""Detector for `experts_implementation="eager"`: explain its graph breaks instead of matching.

The eager experts forward (transformers 5.x modeling files, `*Experts.forward` without the
`use_experts_implementation` dispatch) loops over `one_hot(top_k_index).sum(...).nonzero()`: a
data-dependent shape, so Dynamo breaks the graph there (~10 graphs per model) and the loop body runs in
fragments that carry no nn_module_stack. There is no MoE region to fuse; what we can do is say so, once
per graph, with the fix.
"""

from __future__ import annotations

import torch.fx as fx

from .fx_utils import op_name

_SIGNATURE_OPS = {"one_hot", "nonzero"}


def find_eager_experts_fragments(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of an eager experts loop's routing mask: one_hot / nonzero whose source line names experts."""
    hits = []
    for n in gm.graph.nodes:
        if op_name(n) in _SIGNATURE_OPS and "expert" in (n.meta.get("stack_trace") or "").lower():
            hits.append(n)
    return hits
