"""The op layer: `torch.ops.moe_compiler.*`, one module per op, each with its fake, autograd and input checks.

    signature.py          every op's signature, written once (tables -> schemas, fakes, the passes' OpCall)
    checks.py             input checks (expected vs got, and the fix), run by fakes and real calls alike
    experts.py            experts (+ the block's shared experts), experts_train (+ Z saved for the backward),
                          experts_backward, and the same backward as three ops where Z was saved
                          (experts_backward_down, experts_backward_gate_up, experts_backward_combine)
    experts_unstacked.py  experts_unstacked and its backward: per-expert nn.Linear weights read in place
    experts_quantized.py  experts_quantized: block-scaled FP8 expert weights read in place (inference)
    linear_quantized.py   linear_quantized: an FP8 nn.Linear (transformers' FP8Linear) read in place (inference)
    route.py              route and route_backward

Importing this package registers the ops. Implementations live in lowering/ (dispatch.py picks one).
"""

from .experts import (
    experts,
    experts_backward,
    experts_backward_combine,
    experts_backward_down,
    experts_backward_gate_up,
    experts_train,
    moe_experts,
)
from .experts_quantized import experts_quantized
from .experts_unstacked import experts_unstacked, experts_unstacked_backward
from .linear_quantized import linear_quantized
from .route import moe_route, route, route_backward
from .signature import OpCall

__all__ = [
    "OpCall",
    "experts",
    "experts_backward",
    "experts_backward_combine",
    "experts_backward_down",
    "experts_backward_gate_up",
    "experts_quantized",
    "experts_train",
    "experts_unstacked",
    "experts_unstacked_backward",
    "linear_quantized",
    "moe_experts",
    "moe_route",
    "route",
    "route_backward",
]
