"""moe_compiler: a torch.compile backend that fuses Mixture-of-Experts blocks into one op.

    model = torch.compile(model, backend="fused_moe")   # no import of this package needed

Importing the package registers the `torch.ops.moe_compiler.*` operators (and imports no Triton, nor
transformers). Quantized (FP8) checkpoints: see integrations/hf_experts.py (`from_pretrained`).
"""

from .integrations.hf_experts import from_pretrained
from .integrations.hf_experts import register as register_experts_implementation
from .ops import moe_experts, moe_route
from .spec import Activation, ExpertsSpec, GateUpLayout, QuantizedExpertsSpec, RouterSpec, SharedMLP, WeightFormat
from .stacked_weights import restack_experts

__all__ = [
    "Activation",
    "ExpertsSpec",
    "GateUpLayout",
    "QuantizedExpertsSpec",
    "RouterSpec",
    "SharedMLP",
    "WeightFormat",
    "from_pretrained",
    "moe_experts",
    "moe_route",
    "register_experts_implementation",
    "restack_experts",
]
