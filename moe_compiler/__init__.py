"""moe_compiler: a torch.compile backend that fuses Mixture-of-Experts blocks into one op.

    model = torch.compile(model, backend="fused_moe")   # no import of this package needed

Importing the package registers the `torch.ops.moe_compiler.*` operators (and imports no Triton).
"""

from .ops import moe_experts, moe_route
from .spec import Activation, ExpertsSpec, GateUpLayout, RouterSpec, SharedMLP
from .stacked_weights import restack_experts

__all__ = [
    "Activation",
    "ExpertsSpec",
    "GateUpLayout",
    "RouterSpec",
    "SharedMLP",
    "moe_experts",
    "moe_route",
    "restack_experts",
]
