"""The shared experts of an MoE block: a dense gated MLP every token passes, added to the routed output.

    x [T, H] -> g = x Wg^T, u = x Wu^T [T, Is] -> a = act(g) * u [T, Is] -> y = a Wd^T [T, H]
    out = routed + s * y,   s = sigmoid(x wg^T) [T, 1] (Qwen2-MoE / Qwen3-Next / Qwen3.5 "sigmoid_gated")
                            s = 1                       (DeepSeek / Kimi / GLM4 / Granite ... "plain")

Weights are the block's own nn.Linear parameters, read in place (spec.SharedMLP).

`forward` is the op's path where the experts kernels do not take the shared MLP (prefill, CPU): cuBLAS
GEMMs, the activation in one pass (fp32 math), the gate and add in one; `backward` writes the gradients
out, recomputing g, u, a and y rather than saving them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import ExpertsSpec, SharedMLP
from .torch_activations import gated_backward_halves, gated_forward_halves


def torch_gated_rows(g: torch.Tensor, u: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """act(g) * u in g's dtype, computed in fp32 (triton_act.gated_rows is the one-pass CUDA equivalent)."""
    return gated_forward_halves(g.float(), u.float(), spec).to(g.dtype)


def _mlp(x: torch.Tensor, mlp: SharedMLP, spec: ExpertsSpec, gated_rows=torch_gated_rows):
    """(g, u, a, y): the MLP's intermediates in x's dtype."""
    g, u = F.linear(x, mlp.gate), F.linear(x, mlp.up)
    a = gated_rows(g, u, spec)
    return g, u, a, F.linear(a, mlp.down)


def forward(routed: torch.Tensor, x: torch.Tensor, mlp: SharedMLP, spec: ExpertsSpec, gated_rows=torch_gated_rows):
    """routed + s * MLP(x), added in place into `routed` (the op's own fresh output, x's dtype); `gated_rows`
    computes act(g) * u (dispatch passes the Triton pass on CUDA)."""
    _, _, _, y = _mlp(x, mlp, spec, gated_rows)
    if mlp.expert_gate is None:
        return routed.add_(y)
    s = torch.sigmoid(F.linear(x, mlp.expert_gate))  # [T, 1] in x's dtype, as the model computes it
    return routed.addcmul_(s, y)


def backward(grad_out: torch.Tensor, x: torch.Tensor, mlp: SharedMLP, spec: ExpertsSpec, gated_rows=torch_gated_rows,
             weight_grads: bool = True):
    """Gradients of s * MLP(x) w.r.t. (x, gate, up, down, expert_gate); expert_gate's is None without one, and
    every weight's is None (not computed) without weight_grads."""
    g, u, a, y = _mlp(x, mlp, spec, gated_rows)
    grad = grad_out.float()
    d_z = None  # d loss / d (x wg^T), the expert gate's pre-sigmoid input
    if mlp.expert_gate is not None:
        s = torch.sigmoid(F.linear(x, mlp.expert_gate).float())  # [T, 1]
        d_z = (grad * y.float()).sum(-1, keepdim=True) * s * (1 - s)
        grad = grad * s
    dy = grad.to(x.dtype)
    d_down = dy.t() @ a if weight_grads else None
    d_g, d_u = gated_backward_halves((dy @ mlp.down).float(), g.float(), u.float(), spec)
    d_g, d_u = d_g.to(x.dtype), d_u.to(x.dtype)
    d_x = (d_g @ mlp.gate).float() + (d_u @ mlp.up).float()
    if d_z is not None:
        d_x = d_x + d_z * mlp.expert_gate.float()
    if not weight_grads:
        return d_x, None, None, None, None
    if d_z is None:
        return d_x, d_g.t() @ x, d_u.t() @ x, d_down, None
    d_expert_gate = (d_z.t() @ x.float()).to(mlp.expert_gate.dtype)
    return d_x, d_g.t() @ x, d_u.t() @ x, d_down, d_expert_gate
