"""The language-model scaffold around a test MoE block: embed -> (RMSNorm -> MoE block, residual) x layers ->
norm -> lm_head, so compiled and eager runs compare as logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class TinyLM(nn.Module):
    def __init__(self, make_block: Callable[[], nn.Module], layers: int, vocab: int, H: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, H)
        self.norms = nn.ModuleList([nn.RMSNorm(H) for _ in range(layers)])
        self.blocks = nn.ModuleList([make_block() for _ in range(layers)])
        self.norm = nn.RMSNorm(H)
        self.lm_head = nn.Linear(H, vocab, bias=False)
        with torch.no_grad():
            for blk in self.blocks:
                blk.gate.weight.normal_(0.0, 1.0)  # well-separated routers: no top-k ties between runs

    def forward(self, ids):
        x = self.embed(ids)
        for norm, block in zip(self.norms, self.blocks):
            out = block(norm(x))
            x = x + (out[0] if isinstance(out, tuple) else out)  # transformers-v4 blocks also return router logits
        return self.lm_head(self.norm(x))
