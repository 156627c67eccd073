"""Shared experts (passes/shared_experts.py): proven from data flow and folded into the experts call (its shared_*
arguments), or left to Inductor with the reason (not proven, or proven but not fusable); the logits equal eager
either way. Which architectures have which form: test_pipeline.py with hf_zoo.SHARED_EXPERTS; training gradients
through the fused call: test_experts_common.py."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_compiler.config import MoECompilerConfig
from moe_compiler.passes import fuse_moe_regions
from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_models import count_experts_modules
from moe_compiler.testing.hf_zoo import model_type_known, zoo_model

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _compile(model, dump: pathlib.Path, **options):
    options = {"moe_compiler.dump_dir": str(dump), **{f"moe_compiler.{k}": v for k, v in options.items()}}
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        out = torch.compile(model, backend="fused_moe", options=options)(input_ids=IDS).logits
    assert rel_err(out, ref) <= 1e-5
    specs = sorted(dump.glob("graph_*/region_*_fused_*/spec.json"))
    return [json.loads(p.read_text())["shared_experts"] for p in specs]


def _rewritten_graph(model) -> fx.GraphModule:
    """The Dynamo graph after our passes, run as is (no Inductor): the op calls themselves give the logits."""
    graphs = []

    def backend(gm, example_inputs):
        fuse_moe_regions(gm, example_inputs, MoECompilerConfig())
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=IDS).logits
    assert rel_err(out, ref) <= 1e-5
    (gm,) = graphs
    return gm


def test_qwen2_gated_shared_expert_is_fused_and_described_in_the_dump(tmp_path):
    reports = _compile(zoo_model("qwen2_moe"), tmp_path)
    assert [r["status"] for r in reports] == ["fused", "fused"]
    assert reports[0]["match"] == (
        "sigmoid(gate(x)) x MLP(x) at model.layers.0.mlp.shared_expert: silu, gate/up Linears, I=32"
    )
    assert "shared experts: 2 fused" in (tmp_path / "summary.txt").read_text()
    after = next(tmp_path.glob("graph_*/region_0_fused_*/after.py")).read_text()
    assert "moe_compiler.experts.default" in after and "shared_expert_gate = " in after


# afmoe (transformers 5.25): shared(x).view(B, S, H) + routed.view(B, S, H), a view on the shared side.
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "granitemoeshared", "afmoe"])
def test_fused_block_is_one_call_reading_the_shared_weights_in_place(arch):
    if not model_type_known(arch):
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {arch}")
    model = zoo_model(arch)
    layers = count_experts_modules(model)
    gm = _rewritten_graph(model)
    experts = torch.ops.moe_compiler.experts.default
    calls = [n for n in gm.graph.nodes if n.target is experts and "shared_down_proj" in n.kwargs]
    assert len(calls) == layers
    shared_weights = {n for n in gm.graph.nodes if n.op == "placeholder" and "shared" in n.name}
    # Every shared parameter is read by the op alone: the branch's Linears, activation and add are gone.
    assert shared_weights and all(set(w.users) <= set(calls) for w in shared_weights)
    # (by attribute name: transformers 5.25 also lists functions, under their module path, e.g. granitemoeshared's)
    def in_shared_module(n):
        stack = (n.meta.get("nn_module_stack") or {}).values()
        return any(part.startswith("shared") for path, _ in stack for part in path.split("."))

    assert not [n for n in gm.graph.nodes if n.op.startswith("call") and in_shared_module(n)]


def test_disabled_shared_fusion_leaves_the_branch_to_inductor(tmp_path):
    reports = _compile(zoo_model("qwen3_next"), tmp_path, shared_experts=False)
    assert [r["status"] for r in reports] == ["matched", "matched"]
    assert "disabled" in reports[0]["reason"]
    assert "shared experts: 2 matched, left to Inductor" in (tmp_path / "summary.txt").read_text()
    assert not [k for k in counters["moe_compiler"] if k.startswith("fused_shared")]


def test_shared_mlp_with_another_activation_is_left_to_inductor(tmp_path):
    model = zoo_model("deepseek_v3")
    for layer in model.model.layers:
        layer.mlp.shared_experts.act_fn = torch.nn.GELU()
    reports = _compile(model, tmp_path)
    assert [r["status"] for r in reports] == ["matched", "matched"]
    assert reports[0]["reason"] == "the shared MLP's activation (gelu) is not the routed experts' (silu)"
    summary = (tmp_path / "summary.txt").read_text().splitlines()[0]
    assert ("; routers: 2 fused; shared experts: 2 matched, left to Inductor (the shared MLP's activation (gelu) is "
            "not the routed experts' (silu)); host code: ") in summary


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
    # The log's one line per graph says so too (it said nothing of shared experts it could not prove).
    summary = (tmp_path / "summary.txt").read_text().splitlines()[0]
    assert "; shared experts: 2 not proven (shared " in summary and "not the experts' input)" in summary


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


def _deepseek_v4_clamps(model, routed_limit: float, shared_limit: float | None, monkeypatch):
    """DeepSeek-V4's clamped SiLU (transformers 5.25's DeepseekV4Experts._apply_gate and DeepseekV4MLP.forward) on a
    DeepSeek-V3 zoo model: gate.clamp(max=L), up.clamp(-L, L) around the SiLU, routed and (unless None) shared."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as dsv3

    def apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(max=routed_limit)) * up.clamp(min=-routed_limit, max=routed_limit)

    def shared_forward(self, x):
        gate = self.gate_proj(x).clamp(max=shared_limit)
        up = self.up_proj(x).clamp(min=-shared_limit, max=shared_limit)
        return self.down_proj(self.act_fn(gate) * up)

    monkeypatch.setattr(dsv3.DeepseekV3Experts, "_apply_gate", apply_gate, raising=False)
    if shared_limit is not None:
        monkeypatch.setattr(dsv3.DeepseekV3MLP, "forward", shared_forward)
    return model


def test_deepseek_v4_clamped_shared_mlp_joins_the_clamped_experts(monkeypatch, tmp_path):
    """DeepSeek-V4's shared MLP clamps its gate and up Linears as its routed experts do (both at config.swiglu_limit):
    the op computes it with the routed activation, so it fuses; L = 0.5 so the clamps bite."""
    model = zoo_model("deepseek_v3")
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    _deepseek_v4_clamps(model, 0.5, 0.5, monkeypatch)
    with torch.no_grad():
        assert rel_err(model(input_ids=IDS).logits, plain) > 1e-2  # the clamps change the model
    reports = _compile(model, tmp_path)
    assert [r["status"] for r in reports] == ["fused", "fused"]
    assert reports[0]["match"] == (
        "MLP(x) at model.layers.0.mlp.shared_experts: silu_clamped(limit=0.5), gate/up Linears, I=32"
    )


@pytest.mark.parametrize(("shared_limit", "reason"), [
    (0.25, "the shared MLP's clamp limit (0.25) is not the routed experts' (0.5)"),
    (None, "the shared MLP's activation (silu) is not the routed experts' (silu_clamped)"),
])
def test_shared_clamps_unlike_the_experts_are_left_to_inductor(shared_limit, reason, monkeypatch, tmp_path):
    model = _deepseek_v4_clamps(zoo_model("deepseek_v3"), 0.5, shared_limit, monkeypatch)
    reports = _compile(model, tmp_path)
    assert [r["status"] for r in reports] == ["matched", "matched"]
    assert reports[0]["reason"] == reason
