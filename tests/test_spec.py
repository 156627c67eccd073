"""spec.py: the typed specs check their fields (expected vs got) and become the ops' keyword arguments as a
person would write them."""

from __future__ import annotations

import math

import pytest

from moe_compiler.spec import (
    Activation,
    ExpertsSpec,
    GateUpLayout,
    GroupScore,
    RouteOrder,
    RouterSpec,
    Scoring,
)


def test_bad_experts_spec_raises_clear_error():
    with pytest.raises(ValueError, match="ExpertsSpec.activation: expected one of"):
        ExpertsSpec("swish")
    with pytest.raises(ValueError, match="ExpertsSpec.gate_up"):
        ExpertsSpec(Activation.SILU, "stacked")
    with pytest.raises(ValueError, match="ExpertsSpec.transposed: expected a bool"):
        ExpertsSpec(transposed="yes")
    with pytest.raises(ValueError, match="ExpertsSpec.swiglu_limit: expected > 0"):
        ExpertsSpec(Activation.GPT_OSS_SWIGLU, swiglu_limit=0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=0), "RouterSpec.top_k"),
        (dict(top_k=2, order="topk_then_score", norm_topk_prob=True), "topk_then_score"),
        (dict(top_k=2, order="topk_then_score", n_group=2, topk_group=1), "topk_then_score"),
        (dict(top_k=2, n_group=2, topk_group=3), "RouterSpec.topk_group"),
        (dict(top_k=2, group_score="mean"), "RouterSpec.group_score"),
        (dict(top_k=2, order="sparsemixer", jitter_eps=0.01, norm_topk_prob=True), "sparsemixer"),
        (dict(top_k=2, order="sparsemixer", jitter_eps=-1.0), "RouterSpec.jitter_eps"),
        (dict(top_k=2, norm_topk_prob=True, renorm_eps=-1e-6), "RouterSpec.renorm_eps"),
        (dict(top_k=2, norm_topk_prob=True, renorm_eps=float("inf")), "RouterSpec.renorm_eps"),
        (dict(top_k=2, jitter_eps=0.01), "only the sparsemixer order"),
    ],
)
def test_bad_router_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterSpec(**kwargs)


def test_specs_store_enums_whatever_they_were_given():
    spec = ExpertsSpec("gelu", "interleaved")
    assert spec.activation is Activation.GELU and spec.gate_up is GateUpLayout.INTERLEAVED
    router = RouterSpec(top_k=2, scoring="sigmoid", order="score_then_topk", group_score="max")
    assert router.scoring is Scoring.SIGMOID and router.order is RouteOrder.SCORE_THEN_TOPK
    assert router.group_score is GroupScore.MAX


def test_experts_op_kwargs_name_the_layout_and_only_the_constants_that_apply():
    assert ExpertsSpec().op_kwargs() == {"activation": "silu", "gate_up": "concat", "transposed": False}
    gpt_oss = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True, swiglu_limit=1.0)
    assert gpt_oss.op_kwargs() == {"activation": "gpt_oss_swiglu", "gate_up": "interleaved", "transposed": True,
                                   "swiglu_alpha": 1.702, "swiglu_limit": 1.0}
    assert ExpertsSpec(transposed=True, scale_input=True).op_kwargs()["scale_input"] is True


def test_router_op_kwargs_are_top_k_and_what_differs_from_the_defaults():
    assert RouterSpec(top_k=8).op_kwargs() == {"top_k": 8}
    deepseek = RouterSpec(top_k=8, scoring=Scoring.SIGMOID, norm_topk_prob=True, routed_scaling_factor=2.5,
                          n_group=8, topk_group=4, masked_score=0.0)
    assert deepseek.op_kwargs() == {"top_k": 8, "scoring": "sigmoid", "norm_topk_prob": True,
                                    "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "masked_score": 0.0}
    assert math.isinf(RouterSpec(top_k=1).masked_score) and "masked_score" not in RouterSpec(top_k=1).op_kwargs()
