"""moe_compiler: a torch.compile backend that fuses Mixture-of-Experts blocks into one op.

    model = torch.compile(model, backend="fused_moe")   # no import of this package needed

Importing the package registers the `torch.ops.moe_compiler.*` operators.
"""

from . import ops, routing  # noqa: F401  (registers torch.ops.moe_compiler.*)
from .ops import moe_experts
from .stacked_weights import restack_experts
from .routing import RouterSpec, moe_route
from .spec import Activation, ExpertsSpec, GateUpLayout

__all__ = ["Activation", "ExpertsSpec", "GateUpLayout", "RouterSpec", "moe_experts", "moe_route", "restack_experts"]
