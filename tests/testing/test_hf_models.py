"""moe_compiler.testing.hf_models: the weights the tests and benchmarks draw for HF models."""

from __future__ import annotations

import torch

from moe_compiler.testing.hf_models import redraw


class _Block(torch.nn.Module):
    def __init__(self, E: int, H: int, sigmoid: bool):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        if sigmoid:  # DeepSeek-V3's router: scores = sigmoid(logits), a correction bias added for the choice
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(E))


def test_a_sigmoid_router_is_redrawn_so_that_tokens_spread_over_the_experts():
    """At DeepSeek-V3's width, std-1 rows saturate the sigmoid (scores exactly 1.0 tie, and top-k sent every token
    to the same few experts); the redrawn rows keep the scores distinct and below 1 and reach every expert. A softmax
    router keeps std 1 (its logits never tie in bf16)."""
    E, H, T, k = 256, 7168, 512, 8
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"sigmoid": _Block(E, H, True), "softmax": _Block(E, H, False)})
    redraw(model, None, torch.bfloat16, H)
    sig, soft = model["sigmoid"].gate.weight, model["softmax"].gate.weight
    assert abs(sig.std().item() * H**0.5 - 1) < 0.01 and abs(soft.std().item() - 1) < 0.01
    x = torch.nn.functional.rms_norm(torch.randn(T, H), (H,))
    scores = model["sigmoid"].gate(x).sigmoid()
    assert scores.max() < 1.0
    assert scores.topk(k, dim=-1).indices.unique().numel() == E
    saturated = (x @ soft.T).sigmoid()  # what std-1 rows gave the sigmoid router
    assert (saturated == 1.0).float().mean() > 0.3
