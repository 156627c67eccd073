"""Router fusion (passes/router.py): the facts read off the graph, and the routers left alone with a reason.

Which form every architecture's router fuses as is asserted by test_pipeline.py; training through the
route op's backward by test_experts_common.py::test_training_gradients_equal_eager."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers.models.phimoe import modeling_phimoe as phimoe
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_models import tiny_model
from moe_compiler.testing.hf_zoo import model_type_known, zoo_model


def _compile(model, ids, **options):
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="fused_moe", options=options)(input_ids=ids).logits
    return out, ref


def _router_reports(dump: pathlib.Path) -> list[dict]:
    return [json.loads(p.read_text())["router"] for p in sorted(dump.glob("graph_*/region_*_fused_*/spec.json"))]


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_deepseek_v3_group_limited_router_is_read_off_the_graph(tmp_path):
    # Tiny DeepSeek-V3 (moe_compiler/testing/hf_zoo.py): 8 experts in 4 groups, best 2 groups, top-4, scaling 2.5.
    out, ref = _compile(zoo_model("deepseek_v3"), IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert rel_err(out, ref) <= 1e-5
    reports = _router_reports(tmp_path)
    assert len(reports) == 2 and all(r["status"] == "fused" for r in reports)
    assert reports[0]["spec"] == "sigmoid, top-4, best 2 of 4 groups (top2_sum, others -inf), renormalized, x 2.5"
    assert reports[0]["check"].startswith("same experts for 14 tokens")


def test_gpt_oss_router_bias_stays_in_the_logits(tmp_path):
    out, ref = _compile(zoo_model("gpt_oss"), IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert rel_err(out, ref) <= 1e-5
    assert [r["spec"] for r in _router_reports(tmp_path)] == ["top-4 of the logits, then softmax over them"] * 2


def test_phimoe_sparse_mixer_router_is_read_off_the_graph(tmp_path):
    out, ref = _compile(zoo_model("phimoe"), IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert rel_err(out, ref) <= 1e-5
    reports = _router_reports(tmp_path)
    assert [r["form"] for r in reports] == ["sparsemixer"] * 2
    assert reports[0]["spec"] == (
        "sparse mixer, 2 rounds of argmax, softmax over the experts within 0.02 (relative) of each round's best"
    )
    assert reports[0]["check"].startswith("same experts for 14 tokens")


def test_minimax_m2_router_divides_by_the_bare_sum(tmp_path):
    """MiniMax-M2 renormalizes by the top-k sum without DeepSeek's + 1e-20: the spec carries the epsilon."""
    model = zoo_model("minimax_m2")
    with torch.no_grad():
        for block in _moe_blocks(model):  # a correction bias that moves the choice
            block.e_score_correction_bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    out, ref = _compile(model, IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert rel_err(out, ref) <= 1e-5
    assert [r["spec"] for r in _router_reports(tmp_path)] == ["sigmoid, top-2, renormalized (top-k sum + 0)"] * 2


def test_a_clamped_renormalization_that_can_bite_is_left_to_inductor(monkeypatch, tmp_path):
    """x / sum.clamp(min=1e-3) differs from any x / (sum + eps) once sigmoid scores are small: not a route op."""
    from transformers.models.minimax_m2 import modeling_minimax_m2 as minimax_m2

    def clamped_router(self, hidden_states, e_score_correction_bias):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.to(self.weight.dtype), self.weight)
        routing_weights = torch.sigmoid(router_logits.float())
        _, top_k_index = torch.topk(routing_weights + e_score_correction_bias, self.top_k, dim=-1, sorted=False)
        top_k_weights = routing_weights.gather(1, top_k_index)
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True).clamp(min=1e-3)
        return router_logits, top_k_weights, top_k_index

    monkeypatch.setattr(minimax_m2.MiniMaxM2TopKRouter, "forward", clamped_router)
    out, ref = _compile(zoo_model("minimax_m2"), IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert rel_err(out, ref) <= 1e-5
    reasons = [r["reason"] for r in _router_reports(tmp_path)]
    assert len(reasons) == 2 and all("clamps the top-k sum at 0.001" in r for r in reasons)


def _moe_blocks(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def test_phimoe_training_mode_sampling_is_left_to_inductor(tmp_path):
    """In training mode PhiMoE samples each round's expert (Gumbel noise): not a route op."""
    model = zoo_model("phimoe").train()
    with torch.no_grad():
        torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(input_ids=IDS)
    assert counters["moe_compiler"]["fused_experts_grouped_mm"] == 2
    reasons = [r["reason"] for r in _router_reports(tmp_path)]
    assert len(reasons) == 2 and all("only eval mode is a route op" in r for r in reasons)


def _sparsemixer_other_factor(scores, jitter_eps, training, top_k=2):
    """Eval-mode sparsemixer whose second round scales by the untaken logits' |x| (inf at the first pick)
    instead of the logits': a near miss the route op does not compute."""
    weights, ids, untaken = [], [], scores
    for _ in range(2):
        best, i = untaken.max(dim=-1, keepdim=True)
        factor = untaken.abs().clamp(min=best)
        drop = ((best - scores) / factor) > (2 * jitter_eps)
        weights.append(torch.softmax(untaken.masked_fill(drop, float("-inf")), dim=-1).gather(dim=-1, index=i))
        ids.append(i)
        untaken = torch.scatter(untaken, -1, i, float("-inf"))
    return torch.concat(weights, dim=-1), torch.concat(ids, dim=-1)


def test_sparse_mixer_near_miss_is_left_to_inductor(monkeypatch, tmp_path):
    monkeypatch.setattr(phimoe, "sparsemixer", _sparsemixer_other_factor)
    out, ref = _compile(zoo_model("phimoe"), IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert rel_err(out, ref) <= 1e-5
    reasons = [r["reason"] for r in _router_reports(tmp_path)]
    assert len(reasons) == 2 and all("sparse mixer round 1" in r and "is not |logits| clamped" in r for r in reasons)


def test_a_router_scoring_in_bf16_fuses_rounding_as_eager(monkeypatch, tmp_path):
    """A router computing its softmax in bf16 (DeepSeek-V4 and Mistral-4 do, transformers 5.25): the route op rounds
    after each op as eager does (RouterSpec.score_dtype; bit for bit: tests/ops/test_route.py)."""

    def bf16_softmax_router(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(router_logits, dim=-1)  # bf16 in a bf16 model
        top_value, indices = torch.topk(probs, self.top_k, dim=-1)
        return router_logits, top_value / top_value.sum(dim=-1, keepdim=True), indices

    monkeypatch.setattr(qwen3.Qwen3MoeTopKRouter, "forward", bf16_softmax_router)
    model = tiny_model("qwen3_moe", "grouped_mm", torch.bfloat16)
    out, ref = _compile(model, IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert counters["moe_compiler"]["fused_router_softmax_topk"] == 2
    specs = [r["spec"] for r in _router_reports(tmp_path)]
    want = "softmax, top-2, renormalized (top-k sum + 0); computed in bfloat16; weights stored as bfloat16"
    assert specs == [want] * 2
    assert rel_err(out, ref) <= 2e-2


def test_a_bf16_router_upcasting_midway_is_left_to_inductor(monkeypatch, tmp_path):
    """Scores in bf16, renormalized in fp32: the op's rounding after every op would not be this math."""

    def mixed_router(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        top_value, indices = torch.topk(F.softmax(router_logits, dim=-1), self.top_k, dim=-1)
        top_value = top_value.float()
        return router_logits, (top_value / top_value.sum(dim=-1, keepdim=True)).to(hidden_states.dtype), indices

    monkeypatch.setattr(qwen3.Qwen3MoeTopKRouter, "forward", mixed_router)
    model = tiny_model("qwen3_moe", "grouped_mm", torch.bfloat16)
    out, ref = _compile(model, IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert counters["moe_compiler"]["fused_experts_grouped_mm"] == 2
    assert counters["moe_compiler"]["rejected_router"] == 2
    reasons = [r["reason"] for r in _router_reports(tmp_path)]
    assert all("computes its scores in torch.bfloat16 but" in r and "in torch.float32: NYI" in r for r in reasons)
    assert rel_err(out, ref) <= 2e-2


def test_router_ids_read_outside_the_experts_are_left_to_inductor(monkeypatch, caplog):
    """The route op picks the same experts but may list them in another slot order: a router whose ids
    are read by anything but the experts must stay as written."""

    def block_using_ids(self, hidden_states):
        b, s, h = hidden_states.shape
        flat = hidden_states.view(-1, h)
        _, weights, ids = self.gate(flat)
        out = self.experts(flat, ids, weights)
        return out.reshape(b, s, h) + ids[:, :1].to(out.dtype).reshape(b, s, 1) * 1e-3

    monkeypatch.setattr(qwen3.Qwen3MoeSparseMoeBlock, "forward", block_using_ids)
    with caplog.at_level("INFO", logger="moe_compiler"):
        out, ref = _compile(tiny_model("qwen3_moe"), IDS)
    assert counters["moe_compiler"]["fused_experts_grouped_mm"] == 2
    assert counters["moe_compiler"]["rejected_router"] == 2
    assert "are also read by" in caplog.text
    assert rel_err(out, ref) <= 1e-5


def test_disabled_verify_still_proves_the_router_structurally():
    out, ref = _compile(tiny_model("mixtral"), IDS, **{"moe_compiler.verify": False})
    assert counters["moe_compiler"]["fused_router_softmax_topk"] == 2
    assert rel_err(out, ref) <= 1e-5


def test_routers_of_cuda_graphs_stay_with_inductor_without_triton(monkeypatch):
    """MOE_COMPILER_KERNELS=torch: the route op would be several torch kernels on CUDA, so a CUDA graph
    keeps Inductor's router (with Triton it is one launch: the GPU cases of tests/passes/test_pipeline.py fuse it)."""
    monkeypatch.setenv("MOE_COMPILER_KERNELS", "torch")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_compiler.config import MoECompilerConfig
    from moe_compiler.debug import RegionReport
    from moe_compiler.passes.pipeline import ROUTER_ON_CUDA, _fuse_router

    graph = torch.fx.Graph()
    args = [graph.placeholder(name) for name in ("x", "ids", "w", "w_gate_up", "w_down")]
    with FakeTensorMode():
        args[0].meta["example_value"] = torch.empty(4, 8, device="cuda")
    call = graph.call_function(torch.ops.moe_compiler.experts.default, tuple(args))
    rr = RegionReport("layers.0.mlp.experts", "Qwen3MoeExperts", 1, status="fused")
    _fuse_router(torch.fx.GraphModule(torch.nn.Module(), graph), call, rr, {}, MoECompilerConfig())
    assert (rr.router_status, rr.router_reason) == ("rejected", ROUTER_ON_CUDA)
    assert counters["moe_compiler"]["router_left_on_cuda"] == 1


def test_weights_cast_to_the_blocks_dtype_are_stored_so_by_the_route_op(tmp_path):
    """A bf16 block casts its fp32 top-k weights to bf16 for the experts: the route op stores them in bf16
    itself (RouterSpec.weights_dtype), no cast of its own after it (a launch per layer), the same bits."""
    model = tiny_model("qwen3_moe", "grouped_mm", torch.bfloat16)
    out, ref = _compile(model, IDS, **{"moe_compiler.dump_dir": str(tmp_path)})
    assert rel_err(out, ref) <= 2e-2
    reports = _router_reports(tmp_path)
    assert reports[0]["spec"] == "softmax, top-2; weights stored as bfloat16"
    assert "weights rel err 0.0e+00" in reports[0]["check"]  # bit for bit the block's own cast weights
    after = next(tmp_path.glob("graph_*/region_*_fused_*/after.py")).read_text()
    assert "weights_dtype = 'bfloat16'" in after and ".to(" not in after and "convert_element_type" not in after


def test_a_bf16_router_with_its_bias_cast_to_bf16_fuses_choosing_in_bf16(tmp_path):
    """`model.to(torch.bfloat16)` casts DeepSeek-V4's fp32 correction bias too (and 5.17's from_config in bf16 made
    it bf16 from the start): scores + bias is then bf16, rounded, and the route op rounds the choice there
    (RouterSpec.choice_dtype). Its top-k layer fuses; the hash-routed one stays."""
    if not model_type_known("deepseek_v4"):
        pytest.skip("transformers has no deepseek_v4")
    model = zoo_model("deepseek_v4", "grouped_mm", torch.bfloat16).to(torch.bfloat16)
    biases = [b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")]
    assert biases and all(b.dtype == torch.bfloat16 for b in biases)
    # the rewritten graph as traced (no Inductor): the matcher and the route op are what this tests
    out, ref = _compile(model, IDS, **{"moe_compiler.dump_dir": str(tmp_path), "moe_compiler.inductor": False})
    assert counters["moe_compiler"]["fused_router_sqrtsoftplus_topk"] == 1
    assert counters["moe_compiler"]["rejected_router"] == 1
    fused = [r for r in _router_reports(tmp_path) if r["status"] == "fused"]
    assert len(fused) == 1 and "computed in bfloat16" in fused[0]["spec"]
    assert fused[0]["check"].startswith("same experts for 14 tokens")
    assert rel_err(out, ref) <= 2e-2
