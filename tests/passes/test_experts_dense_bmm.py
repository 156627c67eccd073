"""Llama-4's every-expert block (passes/experts_dense_bmm.py): fused into one scale_input experts call that
computes only the top-k experts, logits and gradients equal eager; blocks whose unchosen experts would not
score 0 are left alone."""

from __future__ import annotations

import json

import torch
from torch._dynamo.utils import counters
from transformers.models.llama4 import modeling_llama4 as llama4

from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_zoo import zoo_model

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_llama4_block_becomes_a_top_k_experts_call(tmp_path):
    model = zoo_model("llama4")  # 8 experts, top-2, both layers MoE
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        compiled = torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})
        out = compiled(input_ids=IDS).logits
    assert rel_err(out, ref) <= 1e-5
    assert counters["moe_compiler"]["fused_experts_dense_bmm"] == 2
    assert counters["moe_compiler"]["fused_router_topk_sigmoid"] == 2
    specs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("graph_*/region_*_fused_*/spec.json"))]
    assert len(specs) == 2
    assert specs[0]["spec"].endswith("router weight scales the input")
    assert "only the top-2 of 8 experts computed" in specs[0]["check"]
    assert specs[0]["router"]["spec"] == "top-2 of the logits, then sigmoid of each"


def test_llama4_training_gradients_equal_eager():
    eager, fused = zoo_model("llama4").train(), zoo_model("llama4").train()
    fused.load_state_dict(eager.state_dict())
    labels = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    loss_ref = eager(input_ids=IDS, labels=labels).loss
    loss_ref.backward()
    compiled = torch.compile(fused, backend="fused_moe", options={"moe_compiler.training": True})
    loss = compiled(input_ids=IDS, labels=labels).loss
    loss.backward()
    assert counters["moe_compiler"]["fused_experts_dense_bmm"] == 2
    assert rel_err(loss, loss_ref) <= 1e-5
    ref = dict(eager.named_parameters())
    checked = 0
    for name, p in fused.named_parameters():
        if ref[name].grad is not None:
            assert rel_err(p.grad, ref[name].grad) <= 1e-4, name
            checked += name.endswith(("router.weight", "experts.gate_up_proj", "experts.down_proj"))
    assert checked == 6  # router and both expert weights of both layers


def test_dense_scores_on_every_expert_are_left_alone(monkeypatch, caplog):
    """If every expert gets a non-zero score, every expert counts: the top-k op would be wrong."""

    def dense_router(self, hidden_states):
        router_logits = torch.nn.functional.linear(hidden_states, self.weight)
        return torch.sigmoid(router_logits.float()).to(router_logits.dtype), router_logits

    monkeypatch.setattr(llama4.Llama4Router, "forward", dense_router)
    model = zoo_model("llama4")
    with caplog.at_level("INFO", logger="moe_compiler"), torch.no_grad():
        ref = model(input_ids=IDS).logits
        out = torch.compile(model, backend="fused_moe")(input_ids=IDS).logits
    assert counters["moe_compiler"]["fused_experts_dense_bmm"] == 0
    assert counters["moe_compiler"]["rejected_experts"] == 2
    assert "not a scatter of the top-k values" in caplog.text
    assert rel_err(out, ref) <= 1e-5
