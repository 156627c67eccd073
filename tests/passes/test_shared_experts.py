"""Shared experts (passes/shared_experts.py): proven from data flow and reported, or named as not proven;
the logits equal eager either way (nothing is rewritten). Which architectures have which form:
test_architectures.py with hf_zoo.SHARED_EXPERTS."""

from __future__ import annotations

import json
import pathlib

import torch
from torch._dynamo.utils import counters

from hf_zoo import zoo_model
from reference import rel_err

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _compile(model, dump: pathlib.Path):
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        out = torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(dump)})(input_ids=IDS).logits
    assert rel_err(out, ref) <= 1e-5
    return [json.loads(p.read_text())["shared_experts"] for p in sorted(dump.glob("graph_*/region_*_fused_*/spec.json"))]


def test_qwen2_gated_shared_expert_is_described_in_the_dump(tmp_path):
    reports = _compile(zoo_model("qwen2_moe"), tmp_path)
    assert [r["status"] for r in reports] == ["matched", "matched"]
    assert reports[0]["match"] == "sigmoid(gate(x)) x MLP(x) at model.layers.0.mlp.shared_expert: silu, gate/up Linears, I=32"
    assert "shared experts: 2 matched" in (tmp_path / "summary.txt").read_text()


class _ScaledInput(torch.nn.Module):
    """The shared MLP fed 2x instead of x: not the block input, so not a shared expert of the block."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x * 2)


def test_shared_mlp_on_another_input_is_not_proven(tmp_path):
    model = zoo_model("deepseek_v3")
    for layer in model.model.layers:
        layer.mlp.shared_experts = _ScaledInput(layer.mlp.shared_experts)
    reports = _compile(model, tmp_path)
    assert [r["status"] for r in reports] == ["rejected", "rejected"]
    assert "not the experts' input" in reports[0]["reason"]
    assert counters["moe_compiler"]["rejected_shared_experts"] == 2


def test_shared_mlp_with_a_bias_is_not_proven(tmp_path):
    model = zoo_model("deepseek_v3")
    for layer in model.model.layers:
        mlp = layer.mlp.shared_experts
        up = torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=True)
        mlp.up_proj = up
    reports = _compile(model, tmp_path)
    assert [r["status"] for r in reports] == ["rejected", "rejected"]
    assert reports[0]["reason"] == "shared up projection Linear has a bias (not a form we know)"


def test_block_without_shared_experts_reports_none(tmp_path):
    reports = _compile(zoo_model("mixtral"), tmp_path)
    assert [r["status"] for r in reports] == ["none", "none"]
    assert not [k for k in counters["moe_compiler"] if "shared" in k]
