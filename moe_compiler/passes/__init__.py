"""Graph passes: find MoE regions in a Dynamo graph, prove what they compute, rewrite them to our ops.

Entry point: `fuse_moe_regions(gm, example_inputs, config) -> GraphReport` (pipeline.py), then, after
compile_fx, `restack_planned(report)`. Files in the order a region travels through them:

    regions.py                candidates: `*Experts` modules, and modules found from routing data flow
    experts_index_add_loop.py candidates and proof: static expert loops into an index_add_ accumulator
    experts_common.py         proof of a routed-experts region (+ experts_grouped_mm.py / experts_batched_mm.py:
                              one GEMM recognizer per form; gated_activation.py: act(gate) * up)
    experts_dense_bmm.py      proof of Llama-4's every-expert block
    verify.py                 numerical checks (region vs op, router vs route op)
    rewrite.py                plan, then edit: the region's output -> one op call
    router.py                 the router feeding a fused call -> one route call
    shared_experts.py         the shared experts added to it -> the same experts call
    eager_experts.py          experts_implementation="eager": explain its graph breaks
    match.py                  the Match interface every recognizer returns; Reject and its kinds
    fx_utils.py               FX helpers: naming ops, the one data-flow walk, subgraphs, new-node metadata
    pipeline.py               the straight-line pipeline over all of the above

See README.md beside this file for the invariants every pass keeps.
"""

from .pipeline import fuse_moe_regions, restack_planned

__all__ = ["fuse_moe_regions", "restack_planned"]
