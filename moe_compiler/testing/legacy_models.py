"""Legacy and hand-written MoE blocks: the static expert loop ending in `index_add_`.

transformers 5.x no longer ships these forward functions, so the blocks are written out here the way
transformers v4 wrote them (Mixtral / Qwen2-MoE / OLMoE `*SparseMoeBlock.forward`, 4.36-4.47: `for
expert_idx in range(self.num_experts)`, `torch.where(expert_mask[expert_idx])`, `index_add_`), plus the
forms remote code and hand-written models use: DeepSeek's (token, slot) mask order and plain
`hidden[token]` gather, one fused gate_up Linear, and stacked 3-D parameters sliced per expert.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tiny_lm import TinyLM


@dataclasses.dataclass(frozen=True)
class LoopForm:
    mlp: str = "w1w3w2"  # "w1w3w2" (Mixtral) | "gate_up_down" (Qwen2-MoE) | "fused_gate_up" | "stacked"
    mask: str = "slot_token"  # permute(2, 1, 0) -> where gives (slot, token); "token_slot": permute(2, 0, 1)
    act: str = "silu"
    renormalize: bool = True
    shared: bool = False  # Qwen2-MoE's sigmoid-gated shared expert
    experts_run: int | None = None  # run only the first n experts (a broken loop the matcher must refuse)
    expert_bias: bool = False


FORMS = {
    "mixtral_v4": LoopForm(),
    "qwen2_moe_v4": LoopForm(mlp="gate_up_down", renormalize=False, shared=True),
    "deepseek_style": LoopForm(mlp="gate_up_down", mask="token_slot"),
    "fused_gate_up_gelu": LoopForm(mlp="fused_gate_up", act="gelu"),
    "stacked_params": LoopForm(mlp="stacked"),
}


class ExpertMLP(nn.Module):
    def __init__(self, H: int, I: int, form: LoopForm):
        super().__init__()
        self.form = form
        bias = form.expert_bias
        if form.mlp == "w1w3w2":
            self.w1, self.w3, self.w2 = (nn.Linear(H, I, bias=bias), nn.Linear(H, I, bias=bias),
                                         nn.Linear(I, H, bias=bias))
        elif form.mlp == "gate_up_down":
            self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(H, I, bias=bias), nn.Linear(H, I, bias=bias),
                                                            nn.Linear(I, H, bias=bias))
        else:
            self.gate_up_proj, self.down_proj = nn.Linear(H, 2 * I, bias=bias), nn.Linear(I, H, bias=bias)
        self.act = nn.SiLU() if form.act == "silu" else nn.GELU()

    def forward(self, x):
        if self.form.mlp == "w1w3w2":
            return self.w2(self.act(self.w1(x)) * self.w3(x))
        if self.form.mlp == "gate_up_down":
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LoopMoeBlock(nn.Module):
    def __init__(self, H: int = 32, I: int = 16, E: int = 4, k: int = 2, form: LoopForm = LoopForm()):
        super().__init__()
        self.num_experts, self.top_k, self.form = E, k, form
        self.gate = nn.Linear(H, E, bias=False)
        if form.mlp == "stacked":
            self.w_gate_up = nn.Parameter(torch.randn(E, 2 * I, H) * H**-0.5)
            self.w_down = nn.Parameter(torch.randn(E, H, I) * I**-0.5)
        else:
            self.experts = nn.ModuleList([ExpertMLP(H, I, form) for _ in range(E)])
        if form.shared:
            self.shared_expert = ExpertMLP(H, 2 * I, LoopForm(mlp="gate_up_down"))
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def _expert(self, e: int, x):
        if self.form.mlp == "stacked":
            gate, up = F.linear(x, self.w_gate_up[e]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, self.w_down[e])
        return self.experts[e](x)

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.form.renormalize:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((b * s, h), dtype=hidden_states.dtype, device=hidden_states.device)
        one_hot = F.one_hot(selected_experts, num_classes=self.num_experts)
        if self.form.mask == "slot_token":
            expert_mask = one_hot.permute(2, 1, 0)
            for expert_idx in range(self.form.experts_run or self.num_experts):
                idx, top_x = torch.where(expert_mask[expert_idx])
                current_state = hidden_states[None, top_x].reshape(-1, h)
                current = self._expert(expert_idx, current_state) * routing_weights[top_x, idx, None]
                final.index_add_(0, top_x, current.to(hidden_states.dtype))
        else:
            expert_mask = one_hot.permute(2, 0, 1)
            for expert_idx in range(self.form.experts_run or self.num_experts):
                token_indices, weight_indices = torch.where(expert_mask[expert_idx])
                expert_weights = routing_weights[token_indices, weight_indices]
                out = self._expert(expert_idx, hidden_states[token_indices])
                final.index_add_(0, token_indices, out * expert_weights.unsqueeze(-1))
        if self.form.shared:
            shared = self.shared_expert(hidden_states)
            final = final + F.sigmoid(self.shared_expert_gate(hidden_states)) * shared
        return final.reshape(b, s, h), router_logits


class TinyLoopLM(TinyLM):
    def __init__(self, form: LoopForm, layers: int = 2, vocab: int = 64, H: int = 32, I: int = 16, E: int = 4,
                 k: int = 2):
        super().__init__(lambda: LoopMoeBlock(H, I, E, k, form), layers, vocab, H)


def expert_parts(block: LoopMoeBlock) -> list[torch.Tensor]:
    return [p for name, p in block.named_parameters() if name.startswith("experts.")]
