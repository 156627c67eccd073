"""Hand-written MoE blocks whose experts module is not named `*Experts`: found from routing data flow.

    "batched":  stacked [E, 2I, H] / [E, H, I] parameters, one weight gathered per (token, slot) and a bmm
                (transformers' batched_mm form, written by hand in a module called RoutedMLP): fuses
    "gpt_fast": gpt-fast's MOEFeedForward / ConditionalFeedForward (github.com/pytorch-labs/gpt-fast, mixtral-moe
                model.py): separate w1 / w3 stacks and einsum over gathered weights; the op needs one gate_up
                tensor and the GEMMs are einsums, so it is left alone, with the reason
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tiny_lm import TinyLM


class RoutedMLP(nn.Module):
    def __init__(self, E: int, H: int, I: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(E, 2 * I, H) * H**-0.5)
        self.down = nn.Parameter(torch.randn(E, H, I) * I**-0.5)

    def forward(self, x, ids, weights):
        T, k = ids.shape
        rows = x.repeat_interleave(k, dim=0)  # [T * k, H] in (token, slot) order
        flat = ids.reshape(-1)
        h = torch.bmm(self.gate_up[flat], rows.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(self.down[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y.view(T, k, -1) * weights.unsqueeze(-1)).sum(dim=1)


class ConditionalFeedForward(nn.Module):
    """gpt-fast's experts: einsum over the gathered weights of each (token, slot)."""

    def __init__(self, E: int, H: int, I: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, I, H) * H**-0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * I**-0.5)
        self.w3 = nn.Parameter(torch.randn(E, I, H) * H**-0.5)

    def forward(self, x, expert_indices):
        w1_weights = self.w1[expert_indices]  # [T, A, I, H]
        w3_weights = self.w3[expert_indices]
        w2_weights = self.w2[expert_indices]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        return torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)


class MoEFeedForward(nn.Module):
    def __init__(self, form: str, H: int = 32, I: int = 16, E: int = 4, k: int = 2):
        super().__init__()
        self.form, self.k = form, k
        self.gate = nn.Linear(H, E, bias=False)
        if form == "batched":
            self.experts = RoutedMLP(E, H, I)
        else:
            self.cond_ffn = ConditionalFeedForward(E, H, I)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(scores, self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if self.form == "batched":
            out = self.experts(x, ids, weights)
        else:
            out = torch.einsum("tai,ta -> ti", self.cond_ffn(x, ids), weights)
        return out.reshape(shape)


class TinyHandwrittenLM(TinyLM):
    def __init__(self, form: str, layers: int = 2, vocab: int = 64, H: int = 32, I: int = 16, E: int = 4, k: int = 2):
        super().__init__(lambda: MoEFeedForward(form, H, I, E, k), layers, vocab, H)
