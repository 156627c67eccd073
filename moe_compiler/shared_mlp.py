"""The shared experts of an MoE block: a dense gated MLP every token passes, added to the routed output.

    x [T, H] -> g = x Wg^T, u = x Wu^T [T, Is] -> a = act(g) * u [T, Is] -> y = a Wd^T [T, H]
    out = routed + s * y,   s = sigmoid(x wg^T) [T, 1] (Qwen2-MoE / Qwen3-Next / Qwen3.5 "sigmoid_gated")
                            s = 1                       (DeepSeek / Kimi / GLM4 / Granite ... "plain")

Weights are the block's own nn.Linear parameters ([out, in]), read in place: gate and up are two
[Is, H] tensors or the halves of one [2Is, H] (gate rows first), down is [H, Is], the gate [1, H].
The activation is the routed experts' (spec.activation); the shared MLP always has concat gate/up.

`forward` is the op's path where the experts kernels do not take the shared MLP (prefill, CPU): cuBLAS
GEMMs, the activation in one pass (fp32 math), the gate and add in one; `backward` writes the gradients
out, recomputing g, u, a and y rather than saving them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .activations import gated_backward_halves, gated_forward_halves
from .spec import ExpertsSpec


@dataclasses.dataclass(frozen=True)
class SharedMLP:
    gate: torch.Tensor  # [Is, H]  (a view of the fused [2Is, H] weight when there is one)
    up: torch.Tensor  # [Is, H]
    down: torch.Tensor  # [H, Is]
    expert_gate: torch.Tensor | None  # [1, H] for the sigmoid-gated form

    @classmethod
    def from_parts(cls, gate_up: list[torch.Tensor], down: torch.Tensor, expert_gate: torch.Tensor | None) -> SharedMLP:
        """gate_up = [gate, up] or [gate_up] (halves split as views; no copy)."""
        if len(gate_up) == 1:
            gate, up = gate_up[0].chunk(2, dim=0)
        else:
            gate, up = gate_up
        return cls(gate, up, down, expert_gate)

    @property
    def intermediate(self) -> int:
        return self.down.shape[1]


def _act(g: torch.Tensor, u: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """act(g) * u in g's dtype, computed in fp32: one Triton pass on CUDA, torch ops elsewhere."""
    from . import lowering

    if lowering.uses_triton(g):
        from .lowering.triton_act import gated_rows

        return gated_rows(g, u, spec)
    return gated_forward_halves(g.float(), u.float(), spec).to(g.dtype)


def _mlp(x: torch.Tensor, mlp: SharedMLP, spec: ExpertsSpec):
    """(g, u, a, y): the MLP's intermediates in x's dtype."""
    g, u = F.linear(x, mlp.gate), F.linear(x, mlp.up)
    a = _act(g, u, spec)
    return g, u, a, F.linear(a, mlp.down)


def forward(routed: torch.Tensor, x: torch.Tensor, mlp: SharedMLP, spec: ExpertsSpec) -> torch.Tensor:
    """routed + s * MLP(x), added in place into `routed` (the op's own fresh output, x's dtype)."""
    _, _, _, y = _mlp(x, mlp, spec)
    if mlp.expert_gate is None:
        return routed.add_(y)
    s = torch.sigmoid(F.linear(x, mlp.expert_gate))  # [T, 1] in x's dtype, as the model computes it
    return routed.addcmul_(s, y)


def backward(grad_out: torch.Tensor, x: torch.Tensor, mlp: SharedMLP, spec: ExpertsSpec):
    """Gradients of s * MLP(x) w.r.t. (x, gate, up, down, expert_gate); expert_gate's is None without one."""
    g, u, a, y = _mlp(x, mlp, spec)
    grad = grad_out.float()
    d_z = None  # d loss / d (x wg^T), the expert gate's pre-sigmoid input
    if mlp.expert_gate is not None:
        s = torch.sigmoid(F.linear(x, mlp.expert_gate).float())  # [T, 1]
        d_z = (grad * y.float()).sum(-1, keepdim=True) * s * (1 - s)
        grad = grad * s
    dy = grad.to(x.dtype)
    d_down = dy.t() @ a
    d_g, d_u = gated_backward_halves((dy @ mlp.down).float(), g.float(), u.float(), spec)
    d_g, d_u = d_g.to(x.dtype), d_u.to(x.dtype)
    d_x = (d_g @ mlp.gate).float() + (d_u @ mlp.up).float()
    if d_z is None:
        return d_x, d_g.t() @ x, d_u.t() @ x, d_down, None
    d_expert_gate = (d_z.t() @ x.float()).to(mlp.expert_gate.dtype)
    return d_x + d_z * mlp.expert_gate.float(), d_g.t() @ x, d_u.t() @ x, d_down, d_expert_gate
