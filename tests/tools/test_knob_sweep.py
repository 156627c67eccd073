"""tools/knob_sweep.py: the knobs it varies are the config's own, a rewritten model equal to eager is ok (a training
step's gradients too), a form left to Inductor (with its reason) is ok, and logits or gradients off where the backend
rewrote something are WRONG."""

import importlib.util
import math
import os

import pytest
import torch

from moe_compiler.testing.hf_zoo import MODEL_TYPE, TINY, model_type_known

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
spec = importlib.util.spec_from_file_location("knob_sweep", os.path.join(ROOT, "tools", "knob_sweep.py"))
knob_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(knob_sweep)


def _config(arch):
    from transformers import AutoConfig

    return AutoConfig.for_model(MODEL_TYPE[arch], **TINY[arch])


def test_only_the_knobs_a_config_has_are_varied():
    qwen = knob_sweep.variants(_config("qwen3_moe"))
    assert {"norm_topk_prob": False} in qwen and {"num_experts_per_tok": 1} in qwen and {"hidden_act": "relu"} in qwen
    assert not any("n_group" in v or "routed_scaling_factor" in v for v in qwen)
    deepseek = knob_sweep.variants(_config("deepseek_v3"))
    assert {"n_group": 1, "topk_group": 1} in deepseek and {"routed_scaling_factor": 1.7} in deepseek
    assert {"hidden_act": "silu"} not in deepseek  # its own activation: not a variant


def test_a_rewritten_model_equal_to_eager_is_ok():
    r = knob_sweep.run("deepseek_v3", {"norm_topk_prob": False})
    assert r["verdict"] == "ok" and r["err"] <= 1e-5
    assert r["counters"]["fused_experts_grouped_mm"] == 2 and r["counters"]["fused_router_sigmoid_group_topk"] == 2


def test_a_form_no_matcher_proves_is_left_with_its_reason():
    if not model_type_known("ernie4_5_moe"):
        pytest.skip("this transformers has no ernie4_5_moe")
    r = knob_sweep.run("ernie4_5_moe", {"moe_norm_min": 0.5})  # the renormalization clamped: the router stays
    assert r["verdict"] == "ok" and r["err"] <= 1e-5
    assert r["counters"]["rejected_router"] == 2 and "clamps the top-k sum" in " ".join(r["reasons"])


def test_logits_off_where_something_was_rewritten_are_wrong():
    assert knob_sweep.verdict(1e-6, rewrote=True) == "ok"
    assert knob_sweep.verdict(0.3, rewrote=True) == "WRONG"
    assert knob_sweep.verdict(math.nan, rewrote=True) == "WRONG"
    assert knob_sweep.verdict(0.3, rewrote=False) == "ok"  # nothing of ours in the graph: not our answer


def test_a_config_transformers_refuses_is_an_error_not_a_crash():
    r = knob_sweep.run("deepseek_v2", {"topk_method": "group_limited_greedy"})  # needs n_group, which TINY leaves None
    assert r["verdict"] == "error" and r["error"].startswith("call:")


def test_a_training_step_compares_every_gradient():
    r = knob_sweep.run("qwen2_moe", {"norm_topk_prob": True}, train=True)  # sigmoid-gated shared experts too
    assert r["verdict"] == "ok" and r["grad_err"] <= 1e-5 and r["grad_worst"] is not None
    assert r["counters"]["fused_experts_grouped_mm"] == 2 and r["counters"]["fused_shared_experts_sigmoid_gated"] == 2


def test_gradient_errors_relative_to_their_norm_floored_at_the_largest():
    big, small = torch.ones(4) * 100, torch.full((4,), 1e-7)
    want = {"big": big, "small": small, "frozen": None}
    # a gradient 0 in exact arithmetic: its noise is measured at GRAD_FLOOR of the largest norm (200), not its own
    assert knob_sweep.grad_err({"big": big, "small": -small, "frozen": None}, want)[0] < 1e-6  # (own norm: 2)
    err, where = knob_sweep.grad_err({"big": big * 1.01, "small": small, "frozen": None}, want)
    assert where == "big" and err == pytest.approx(0.01)
    assert knob_sweep.grad_err({"big": big, "small": small, "frozen": torch.ones(2)}, want) == (1.0, "frozen")
