"""Regions found without the class-name rule (passes/regions.py): top-k ids reaching expert computations in a
module of another name are a region; where none can be formed, the log and the dump say why."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from moe_compiler.testing import rel_err
from moe_compiler.testing.handwritten_models import TinyHandwrittenLM

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _compile(model, **options):
    with torch.no_grad():
        ref = model(IDS)
        out = torch.compile(model, backend="fused_moe", options=options)(IDS)
    return out, ref


def test_hand_written_experts_module_is_found_by_data_flow_and_fused(tmp_path):
    torch.manual_seed(0)
    out, ref = _compile(TinyHandwrittenLM("batched"), **{"moe_compiler.dump_dir": str(tmp_path)})
    assert counters["moe_compiler"]["fused_experts_batched_mm"] == 2  # RoutedMLP: not a `*Experts` class
    assert counters["moe_compiler"]["fused_router_softmax_topk"] == 2
    assert rel_err(out, ref) <= 1e-5
    summary = next(tmp_path.glob("graph_*/summary.txt")).read_text()
    assert "[fused] blocks.0.experts (RoutedMLP, " in summary and "found by data flow" in summary


def test_gpt_fast_block_is_reported_with_the_reason(tmp_path, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="moe_compiler"):
        out, ref = _compile(TinyHandwrittenLM("gpt_fast"), **{"moe_compiler.dump_dir": str(tmp_path)})
    assert counters["moe_compiler"]["rejected_experts"] == 2
    assert rel_err(out, ref) <= 1e-5
    assert "2 experts regions, 0 fused, 2 rejected" in caplog.text and "einsum" in caplog.text
    (reason,) = {p.read_text() for p in tmp_path.glob("graph_*/region_*_rejected_blocks.*cond_ffn/reason.txt")}
    assert reason.startswith("no expert GEMM found") and "einsum" in reason


class _FlatMoE(nn.Module):
    """Router and expert gathers in the compiled module's own forward: no module boundary to take."""

    def __init__(self, E=4, H=16, I=8):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(E, 2 * I, H))
        self.w_down = nn.Parameter(torch.randn(E, H, I))

    def forward(self, x):
        weights, ids = torch.topk(F.softmax(F.linear(x, self.gate.weight), dim=-1), 2)
        flat = ids.reshape(-1)
        h = torch.bmm(self.w_gate_up[flat], x.repeat_interleave(2, dim=0).unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(self.w_down[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y.view(-1, 2, x.shape[-1]) * weights.unsqueeze(-1)).sum(1)


def test_top_k_feeding_experts_outside_any_module_is_explained(caplog):
    model = _FlatMoE()
    x = torch.randn(5, 16)
    with caplog.at_level(logging.INFO, logger="moe_compiler"), torch.no_grad():
        out = torch.compile(model, backend="fused_moe")(x)
        ref = model(x)
    assert counters["moe_compiler"]["rejected_experts"] == 1
    assert "the top-k `topk` feeds expert computations" in caplog.text
    assert rel_err(out, ref) <= 1e-5


def test_a_top_k_without_expert_computations_is_no_candidate():
    """Sampling-style top-k (values only, no weight gathers): nothing reported."""
    model = nn.Sequential(nn.Linear(16, 16))
    fn = torch.compile(lambda x: torch.topk(model(x), 3).values.sum(), backend="fused_moe")
    with torch.no_grad():
        fn(torch.randn(4, 16))
    assert counters["moe_compiler"]["rejected_experts"] == 0
