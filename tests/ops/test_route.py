"""torch.ops.moe_compiler.route (ops/route.py) against transformers' own router modules: same experts, same
weights, same gradients."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.phimoe.modeling_phimoe import sparsemixer
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moe_compiler import RouterSpec, moe_route
from moe_compiler.testing import rel_err, sparsemixer_edge_logits


def _by_id(weights, ids, E):
    """[T, E] dense view: routing outputs compare equal whatever order the k slots come in."""
    return torch.zeros(ids.shape[0], E, dtype=torch.float64).scatter_(1, ids.long(), weights.double())


def _compare(router, spec, hidden, bias=None, E=None):
    hidden = hidden.clone().requires_grad_(True)
    _, ref_w, ref_ids = router(hidden)
    logits = torch.nn.functional.linear(hidden.float(), router.weight.float())
    w, ids = moe_route(logits, spec, bias)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    assert rel_err(_by_id(w, ids, E), _by_id(ref_w, ref_ids, E)) <= 1e-6
    probe = torch.randn(ids.shape[0], E, dtype=torch.float64)  # loss depends on which expert got which weight
    (g_ref,) = torch.autograd.grad((_by_id(ref_w, ref_ids, E) * probe).sum(), hidden)
    (g,) = torch.autograd.grad((_by_id(w, ids, E) * probe).sum(), hidden)
    # k = 1 with renormalization: every weight is exactly 1 and the gradient exactly 0
    assert float((g - g_ref).norm()) <= 1e-5 * max(float(g_ref.norm()), 1.0)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 16), (5, 1)])  # k = E, k = 1, odd E
def test_softmax_then_topk_matches_qwen3_router(norm, E, k):
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=32, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    spec = RouterSpec(top_k=k, norm_topk_prob=norm)
    _compare(router, spec, torch.randn(13, 32), E=E)


@pytest.mark.parametrize("n_group,topk_group,norm,scale", [(1, 1, True, 2.5), (4, 2, True, 2.827), (8, 3, False, 1.0)])
def test_sigmoid_group_limited_matches_deepseek_v3_router(n_group, topk_group, norm, scale):
    E, k = 16, 4
    cfg = AutoConfig.for_model(
        "deepseek_v3", hidden_size=32, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale,
    )
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.3)  # steers the choice, not the weights
    spec = RouterSpec(top_k=k, scoring="sigmoid", norm_topk_prob=norm, routed_scaling_factor=scale, n_group=n_group,
                      topk_group=topk_group)
    _compare(router, spec, torch.randn(11, 32), router.e_score_correction_bias, E=E)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])  # GPT-OSS / Granite; Llama-4
def test_topk_then_score(scoring):
    logits = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    w, ids = moe_route(logits, RouterSpec(top_k=3, order="topk_then_score", scoring=scoring))
    top, ref_ids = logits.topk(3, dim=-1)
    assert torch.equal(ids, ref_ids)
    ref_w = top.softmax(-1) if scoring == "softmax" else top.sigmoid()
    assert rel_err(w, ref_w) <= 1e-6
    probe = torch.randn(9, 3)
    (g,) = torch.autograd.grad((w * probe).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref_w * probe).sum(), logits)
    assert rel_err(g, g_ref) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparsemixer_matches_phimoe_in_eval_mode(dtype):
    """PhiMoE's own sparsemixer(training=False), in the model's dtype: same experts, same weights and gradients;
    the rows of an edge pair (bf16 / fp16) only agree if the near-tie test rounds as eager does."""
    g = torch.Generator().manual_seed(0)
    logits = (1 + 0.02 * torch.randn(40, 16, generator=g)).to(dtype)  # many near-ties: rounds of 2-4 experts
    if dtype != torch.float32:
        logits = torch.cat([logits, sparsemixer_edge_logits(24, 16, dtype, g)])
    logits.requires_grad_(True)
    ref_w, ref_ids = sparsemixer(logits, jitter_eps=0.01, training=False)
    spec = RouterSpec(top_k=2, order="sparsemixer", jitter_eps=0.01)
    w, ids = moe_route(logits, spec)
    assert torch.equal(ids, ref_ids)  # slot order too: round 1 first
    assert rel_err(w.detach(), ref_w.detach().float()) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert 0.3 < float((ref_w < 0.99).float().mean()) < 0.9  # shared rounds and lone winners both occur
    probe = torch.randn(ids.shape, generator=g)
    (g_ref,) = torch.autograd.grad((ref_w.float() * probe).sum(), logits)
    (grad,) = torch.autograd.grad((w * probe).sum(), logits)
    assert rel_err(grad, g_ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
    if dtype != torch.float32:
        # The same edge rows decided in fp32 get other weights: the rounding is what the check above proves.
        naive_w, _ = moe_route(logits.detach()[40:].float(), spec)
        assert (naive_w - ref_w[40:].float()).abs().amax() > 0.1


def test_group_score_max_deepseek_v2_style():
    logits = torch.randn(7, 12)
    w, ids = moe_route(logits, RouterSpec(top_k=2, n_group=4, topk_group=1, group_score="max"))
    probs = logits.softmax(-1)
    best_group = probs.view(7, 4, 3).amax(-1).argmax(-1)
    assert ((ids // 3) == best_group[:, None]).all()  # both experts from the best group
    assert rel_err(w, probs.gather(1, ids)) <= 1e-6


def test_route_opcheck():
    logits = torch.randn(6, 8, requires_grad=True)
    spec = RouterSpec(top_k=2, scoring="sigmoid", norm_topk_prob=True, n_group=2, topk_group=1)
    torch.library.opcheck(torch.ops.moe_compiler.route.default, (logits, torch.randn(8)), spec.op_kwargs())


def test_bad_route_inputs():
    with pytest.raises(ValueError, match="top_k: expected <= E=4"):
        moe_route(torch.randn(3, 4), RouterSpec(top_k=5))
    with pytest.raises(ValueError, match="n_group: expected a divisor of E=6"):
        moe_route(torch.randn(3, 6), RouterSpec(top_k=2, n_group=4, topk_group=1))
    with pytest.raises(ValueError, match="correction_bias: expected a \\[E=6\\] tensor"):
        moe_route(torch.randn(3, 6), RouterSpec(top_k=2), torch.randn(5))
    with pytest.raises(ValueError, match="router_logits"):
        moe_route(torch.randint(0, 3, (3, 6)), RouterSpec(top_k=2))
    with pytest.raises(ValueError, match="correction_bias dtype: expected float32, bfloat16 or float16"):
        moe_route(torch.randn(3, 6), RouterSpec(top_k=2), torch.randn(6, dtype=torch.float64))
    assert math.isinf(RouterSpec(top_k=1).masked_score)


# --- DeepSeek-V4 (transformers 5.25): sqrt(softplus) scores; routers computing in the model's dtype -----------

def _deepseek_v4_router(E=16, k=4, scale=1.5):
    modeling = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")  # 5.25 on
    cfg = AutoConfig.for_model("deepseek_v4", hidden_size=32, n_routed_experts=E, num_experts_per_tok=k,
                               routed_scaling_factor=scale)
    router = modeling.DeepseekV4TopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.3)
    return router


def test_sqrtsoftplus_matches_deepseek_v4_router():
    router = _deepseek_v4_router()
    assert router.score_fn.__class__.__name__ == "SqrtSoftplusActivation"
    spec = RouterSpec(top_k=4, scoring="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5)
    hidden = torch.randn(37, 32)
    hidden[:5] *= 8  # logits past softplus's threshold (20) and far below 0 (not so far that it underflows)
    _compare(router, spec, hidden, router.e_score_correction_bias, E=16)


@pytest.mark.parametrize("bias_dtype", ["fp32", "model's"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_router_computing_in_the_models_dtype_routes_as_eager_bit_for_bit(dtype, bias_dtype):
    """DeepSeek-V4 in bf16 / fp16 computes its scores, the top-k sum, the quotient and the scaled weights in that
    dtype: with score_dtype the op rounds where eager rounds and gets its very ids and weights; the same math in
    fp32 does not. Its correction bias stays fp32 as transformers 5.24 on keeps it (the choice is fp32), or is cast
    with the model (`.to(dtype)`, or 5.17's from_config: the choice is rounded to dtype, RouterSpec.choice_dtype).
    (fp16: torch's CPU sqrt rounds correctly where fp32-then-fp16, as CUDA's and ours, rounds twice: 15 of the 63k
    fp16 inputs, 1 ulp.)"""
    torch.manual_seed(0)
    router = _deepseek_v4_router(E=64, k=6).to(dtype)
    if bias_dtype == "fp32":
        router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
    assert (router.e_score_correction_bias.dtype == torch.float32) == (bias_dtype == "fp32")
    hidden = torch.randn(257, 32, dtype=dtype)
    with torch.no_grad():
        logits, ref_w, ref_ids = router(hidden)
    assert ref_w.dtype == dtype
    kw = dict(top_k=6, scoring="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, weights_dtype=str(
        dtype).removeprefix("torch."))
    w, ids = moe_route(logits, RouterSpec(**kw, score_dtype=kw["weights_dtype"]), router.e_score_correction_bias)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    if dtype == torch.bfloat16:
        assert torch.equal(_by_id(w, ids, 64), _by_id(ref_w, ref_ids, 64))
    else:
        assert (_by_id(w, ids, 64) - _by_id(ref_w, ref_ids, 64)).abs().amax() <= 2**-11  # 1 ulp below 0.5
    naive_w, naive_ids = moe_route(logits, RouterSpec(**kw), router.e_score_correction_bias)
    assert not torch.equal(_by_id(naive_w, naive_ids, 64), _by_id(ref_w, ref_ids, 64))


def test_a_softmax_group_router_in_bf16_routes_as_eager_bit_for_bit():
    """Mistral-4's router in bf16: softmax, the groups' top-2 sums and the renormalization all rounded to bf16."""
    torch.manual_seed(0)
    modeling = pytest.importorskip("transformers.models.mistral4.modeling_mistral4")  # 5.25 on
    cfg = AutoConfig.for_model("mistral4", hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                               topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.0)
    router = modeling.Mistral4TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router = router.to(torch.bfloat16)
    hidden = torch.randn(257, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        logits, ref_w, ref_ids = router(hidden)
    spec = RouterSpec(top_k=4, norm_topk_prob=True, n_group=4, topk_group=2, weights_dtype="bfloat16",
                      score_dtype="bfloat16")
    w, ids = moe_route(logits, spec)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    assert torch.equal(_by_id(w, ids, 16), _by_id(ref_w, ref_ids, 16))


def test_a_spec_computing_in_bf16_needs_scores_before_the_top_k():
    with pytest.raises(ValueError, match="topk_then_score is defined with softmax / sigmoid scores in fp32"):
        RouterSpec(top_k=2, order="topk_then_score", score_dtype="bfloat16")
    with pytest.raises(ValueError, match="got sqrtsoftplus"):
        RouterSpec(top_k=2, order="topk_then_score", scoring="sqrtsoftplus")
    # after the top-k, a renormalization is defined over sigmoid weights only (a softmax's already sum to 1)
    with pytest.raises(ValueError, match="renormalization or scaling only after a sigmoid"):
        RouterSpec(top_k=2, order="topk_then_score", norm_topk_prob=True)
    RouterSpec(top_k=2, order="topk_then_score", scoring="sigmoid", norm_topk_prob=True)


def test_biased_topk_then_sigmoid_matches_kolibri1_router():
    """Kolibri-1 (transformers 5.25): top-k of logits + bias, then sigmoid of the picked logits, renormalized."""
    modeling = pytest.importorskip("transformers.models.kolibri1.modeling_kolibri1")
    cfg = AutoConfig.for_model("kolibri1", hidden_size=32, num_local_experts=16, num_experts_per_tok=4,
                               norm_topk_prob=True)
    router = modeling.Kolibri1TopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 1.0)  # large enough to change the choice
    spec = RouterSpec(top_k=4, order="topk_then_score", scoring="sigmoid", norm_topk_prob=True, renorm_eps=0.0)
    hidden = torch.randn(23, 32)
    _compare(router, spec, hidden, router.e_score_correction_bias, E=16)
    logits = torch.nn.functional.linear(hidden, router.weight)
    assert not torch.equal(logits.topk(4).indices.sort(-1).values,
                           (logits + router.e_score_correction_bias).topk(4).indices.sort(-1).values)
