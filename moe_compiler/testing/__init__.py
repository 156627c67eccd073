"""What the tests, the benchmarks and the tools share: fp64 references and random inputs (reference.py),
tiny random Hugging Face MoE models (hf_models.py: six architectures with real transformers classes;
hf_zoo.py: every MoE architecture transformers ships), and legacy / hand-written expert loops
(legacy_models.py). Importable from the installed package, so nothing needs `sys.path` edits; the model
builders import transformers when called.
"""

from .reference import (
    SPARSEMIXER_EDGE_PAIRS,
    cuda_experts_inputs,
    expert_parts,
    experts_inputs,
    experts_reference,
    experts_reference_by_expert,
    poisoned_run,
    pre_activations,
    rel_err,
    shared_inputs,
    shared_reference,
    sparsemixer_edge_logits,
    spec_id,
)

__all__ = [
    "SPARSEMIXER_EDGE_PAIRS",
    "cuda_experts_inputs",
    "expert_parts",
    "experts_inputs",
    "experts_reference",
    "experts_reference_by_expert",
    "poisoned_run",
    "pre_activations",
    "rel_err",
    "shared_inputs",
    "shared_reference",
    "sparsemixer_edge_logits",
    "spec_id",
]
