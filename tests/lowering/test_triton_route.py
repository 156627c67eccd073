"""Triton route kernel (lowering/triton_route.py) against the route op's reference (torch_route.route_forward),
every RouterSpec form. Without CUDA it runs under TRITON_INTERPRET (fp32); on the GPU also at real router shapes
under graph capture."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE  # noqa: E402

from moe_compiler.lowering import triton_route  # noqa: E402
from moe_compiler.lowering.torch_route import route_forward  # noqa: E402
from moe_compiler.spec import RouterSpec  # noqa: E402
from moe_compiler.testing import rel_err, sparsemixer_edge_logits  # noqa: E402
from moe_compiler.testing.cuda_graphs import captured, replay  # noqa: E402

CASES = {
    # name: (T, E, spec, with correction bias)
    "qwen3_softmax_renorm": (13, 16, RouterSpec(top_k=4, norm_topk_prob=True), False),
    "mixtral_k2_no_renorm": (5, 8, RouterSpec(top_k=2), False),
    "gpt_oss_topk_then_softmax": (9, 32, RouterSpec(top_k=4, order="topk_then_score"), False),
    "llama4_topk_then_sigmoid": (7, 16, RouterSpec(top_k=1, order="topk_then_score", scoring="sigmoid"), False),
    "deepseek_v3_groups": (11, 32, RouterSpec(top_k=4, scoring="sigmoid", norm_topk_prob=True,
                                               routed_scaling_factor=2.5, n_group=4, topk_group=2), True),
    "deepseek_v2_group_max_odd_group_size": (6, 24, RouterSpec(top_k=3, n_group=8, topk_group=2, group_score="max"),
                                             False),
    "glm4_masked_score_zero": (8, 16, RouterSpec(top_k=2, scoring="sigmoid", norm_topk_prob=True, n_group=2,
                                                  topk_group=1, masked_score=0.0), True),
    "ernie_softmax_bias": (10, 12, RouterSpec(top_k=3, norm_topk_prob=True), True),  # E not a power of two
    "k_equals_e": (4, 8, RouterSpec(top_k=8), False),
    "phimoe_sparsemixer": (12, 16, RouterSpec(top_k=2, order="sparsemixer", jitter_eps=0.01), False),
    "sparsemixer_k3_odd_e": (9, 12, RouterSpec(top_k=3, order="sparsemixer", jitter_eps=0.05), False),
    "many_rows_several_programs": (300, 64, RouterSpec(top_k=8, scoring="sigmoid", norm_topk_prob=True), True),
    "kolibri_biased_topk_then_sigmoid_renorm": (10, 16, RouterSpec(top_k=3, order="topk_then_score", scoring="sigmoid",
                                                                   norm_topk_prob=True, routed_scaling_factor=2.0),
                                                True),
    "deepseek_v4_sqrtsoftplus": (11, 16, RouterSpec(top_k=4, scoring="sqrtsoftplus", norm_topk_prob=True,
                                                    routed_scaling_factor=1.5), True),
    # routers computing in the model's dtype, each op rounded (fp16: the interpreter converts it right, bf16 not)
    "deepseek_v4_in_fp16": (13, 16, RouterSpec(top_k=4, scoring="sqrtsoftplus", norm_topk_prob=True,
                                               routed_scaling_factor=1.5, score_dtype="float16"), True),
    "mistral4_groups_in_fp16": (9, 16, RouterSpec(top_k=2, norm_topk_prob=True, n_group=4, topk_group=2,
                                                  score_dtype="float16"), False),
    # a correction bias cast with the model: scores + bias, and the groups' top-2 sums, rounded to fp16 too
    "deepseek_v4_in_fp16_fp16_bias": (13, 16, RouterSpec(top_k=4, scoring="sqrtsoftplus", norm_topk_prob=True,
                                                         score_dtype="float16"), torch.float16),
    "sigmoid_groups_in_fp16_fp16_bias": (11, 16, RouterSpec(top_k=2, scoring="sigmoid", norm_topk_prob=True,
                                                            n_group=4, topk_group=2, score_dtype="float16"),
                                         torch.float16),
}


def _bias(E: int, with_bias, g) -> torch.Tensor | None:
    """A case's correction bias: None, fp32 (True) or in the dtype given."""
    if not with_bias:
        return None
    bias = torch.randn(E, generator=g) * 0.3
    return bias.to(with_bias) if isinstance(with_bias, torch.dtype) else bias


@pytest.mark.parametrize("name", list(CASES))
def test_route_kernel_matches_reference(name):
    T, E, spec, with_bias = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    logits = torch.randn(T, E, generator=g) * 2
    if spec.order.value == "sparsemixer":
        logits = 1 + 0.02 * logits  # near-ties: rounds shared by several experts
    bias = _bias(E, with_bias, g)
    want_w, want_i = route_forward(logits, bias, spec)
    got_w, got_i = triton_route.route_forward(logits.to(DEVICE), bias.to(DEVICE) if bias is not None else None, spec)
    assert got_w.dtype == torch.float32 and got_i.dtype == torch.int64 and got_w.shape == (T, spec.top_k)
    # The same experts for every token (slot order is free), with the same weights.
    want_i, order_w = want_i.sort(dim=1)
    got_i, order_g = got_i.cpu().sort(dim=1)
    assert torch.equal(got_i, want_i)
    assert rel_err(got_w.cpu().gather(1, order_g), want_w.gather(1, order_w)) <= 1e-6


@pytest.mark.parametrize("eps", [0.0, 1e-20])
def test_renormalization_adds_the_spec_epsilon(eps):
    """Sigmoid scores ~1e-22 (logits near -50), where DeepSeek-V3's sum + 1e-20 and MiniMax-M2's bare sum give
    different weights: kernel and reference add renorm_eps, checked against fp64."""
    logits = -50 + torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    spec = RouterSpec(top_k=2, scoring="sigmoid", norm_topk_prob=True, renorm_eps=eps)
    for got_w, got_i in (route_forward(logits, None, spec), triton_route.route_forward(logits.to(DEVICE), None, spec)):
        got_w, got_i = got_w.cpu(), got_i.cpu()
        scores = logits.double().sigmoid()
        assert torch.equal(got_i.sort(1).values, scores.topk(2, dim=1).indices.sort(1).values)
        picked = scores.gather(1, got_i)
        assert rel_err(got_w.double(), picked / (picked.sum(-1, keepdim=True) + eps)) <= 1e-5


def test_no_tokens():
    w, ids = triton_route.route_forward(torch.empty(0, 8, device=DEVICE), None, RouterSpec(top_k=2))
    assert w.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float32])
def test_a_bias_in_the_routers_dtype_rounds_the_choice(bias_dtype):
    """scores + bias in fp16 (a bias cast with an fp16 model) rounds 0.5 + 0.125 + 2^-13 to 0.625, a tie with
    expert 3's 0.5 + 0.125 that the kernel breaks to the lower id, as eager's fp16 choice sees no difference
    between the two; with an fp32 bias the choice is fp32 and expert 5 is ahead. The logits are 0, so every score
    is 0.5 exactly and the bias alone decides."""
    T, E = 5, 8
    bias = torch.randn(E, generator=torch.Generator().manual_seed(1)).clamp(-0.1, 0.1).half()
    bias[0], bias[3], bias[5] = 0.25, 0.125, 0.125 + 2**-13
    spec = RouterSpec(top_k=2, scoring="sigmoid", score_dtype="float16")
    w, ids = triton_route.route_forward(torch.zeros(T, E, dtype=torch.float16, device=DEVICE),
                                        bias.to(bias_dtype).to(DEVICE), spec)
    want = [0, 3] if bias_dtype == torch.float16 else [0, 5]
    assert ids.cpu().sort(dim=1).values.tolist() == [want] * T
    assert torch.equal(w.cpu(), torch.full((T, 2), 0.5))  # the unbiased scores


def test_bf16_logits_are_routed_in_fp32():
    if DEVICE == "cpu":
        logits = torch.randn(6, 16).to(torch.float16)  # the interpreter stores fp16 right, bf16 not
    else:
        logits = torch.randn(6, 16).to(torch.bfloat16)
    spec = RouterSpec(top_k=2, norm_topk_prob=True)
    want_w, want_i = route_forward(logits, None, spec)
    got_w, got_i = triton_route.route_forward(logits.to(DEVICE), None, spec)
    assert torch.equal(got_i.cpu().sort(1).values, want_i.sort(1).values)
    assert math.isclose(float(got_w.sum()), float(want_w.sum()), rel_tol=1e-5)


def test_sparsemixer_near_ties_round_as_eager():
    """Edge pairs whose near-tie test flips if computed in fp32: the kernel rounds each step to the logits'
    dtype as eager does (torch_route.py), so it picks the same experts and weights as the reference."""
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # the interpreter stores fp16 right, bf16 not
    g = torch.Generator().manual_seed(1)
    logits = sparsemixer_edge_logits(33, 16, dtype, g)
    spec = RouterSpec(top_k=2, order="sparsemixer", jitter_eps=0.01)
    want_w, want_i = route_forward(logits, None, spec)
    got_w, got_i = triton_route.route_forward(logits.to(DEVICE), None, spec)
    assert torch.equal(got_i.cpu(), want_i)
    assert rel_err(got_w.cpu(), want_w) <= 1e-6
    assert float((want_w < 0.99).float().mean()) > 0.4  # the edge rows share their first round


# --- on the GPU: real router shapes under graph capture ---------------------------------------------

ROUTERS = {
    "qwen3_30b_a3b": (128, dict(top_k=8, norm_topk_prob=True), False),
    "deepseek_v3": (256, dict(top_k=8, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8,
                              topk_group=4), True),
    "kimi_k2": (384, dict(top_k=8, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.827), True),
    "gpt_oss_20b": (32, dict(top_k=4, order="topk_then_score"), False),
    "llama4_scout": (16, dict(top_k=1, order="topk_then_score", scoring="sigmoid"), False),
    "phi_3_5_moe": (16, dict(top_k=2, order="sparsemixer", jitter_eps=0.01), False),
    "deepseek_v4_in_bf16": (256, dict(top_k=6, scoring="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
                                      score_dtype="bfloat16"), True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("T", [1, 37, 4096])
def test_triton_route_kernel_at_real_router_shapes(name, T):
    E, kw, with_bias = ROUTERS[name]
    spec = RouterSpec(**kw)
    g = torch.Generator(device="cuda").manual_seed(T)
    logits = torch.randn(T, E, device="cuda", generator=g).bfloat16()
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if with_bias else None
    want_w, want_i = route_forward(logits, bias, spec)
    graph, (got_w, got_i) = captured(lambda: triton_route.route_forward(logits, bias, spec))
    replay(graph, got_w)
    want_i, ow = want_i.sort(dim=1)
    got_i, og = got_i.sort(dim=1)
    # bf16 logits upcast exactly: ties are rare but possible among E values; allow a few tokens to differ.
    same = (want_i == got_i).all(dim=1)
    assert same.float().mean() >= 0.99
    assert rel_err(got_w.gather(1, og)[same], want_w.gather(1, ow)[same]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4096])
def test_a_bf16_router_is_routed_as_eager_computes_it_on_the_gpu(T):
    """DeepSeek-V4's router (transformers 5.25's DeepseekV4TopKRouter, its ops written out: the device may run an
    older release) in bf16 on CUDA, eager, against the kernel with score_dtype bf16: the same ids and weights, bit
    for bit (eager's bf16 ops compute in fp32 and round, as the kernel's emulation does)."""
    g = torch.Generator(device="cuda").manual_seed(T)
    logits = torch.randn(T, 256, device="cuda", generator=g).bfloat16()
    bias = torch.randn(256, device="cuda", generator=g) * 0.1
    scores = torch.nn.functional.softplus(logits).sqrt()
    ref_ids = torch.topk(scores + bias, 6, dim=-1, sorted=False).indices
    ref_w = scores.gather(1, ref_ids)
    ref_w = ref_w / (ref_w.sum(dim=-1, keepdim=True) + 1e-20) * 1.5
    spec = RouterSpec(top_k=6, scoring="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
                      score_dtype="bfloat16", weights_dtype="bfloat16")
    w, ids = triton_route.route_forward(logits, bias, spec)
    ref_ids, o_ref = ref_ids.sort(dim=1)
    ids, o = ids.sort(dim=1)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(w.gather(1, o), ref_w.gather(1, o_ref))


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][2].order.value != "sparsemixer"])
def test_route_backward_kernel_matches_reference(name):
    """The one-launch route backward (MOE_COMPILER_BACKWARD=triton) against torch_route.route_backward, the
    selection held fixed (the reference's own ids)."""
    from moe_compiler.lowering.torch_route import route_backward

    T, E, spec, with_bias = CASES[name]
    g = torch.Generator().manual_seed(len(name) + 1)
    logits = torch.randn(T, E, generator=g) * 2
    bias = _bias(E, with_bias, g)
    _, ids = route_forward(logits, bias, spec)
    grad = torch.randn(T, spec.top_k, generator=g)
    want = route_backward(grad, logits, ids, spec)
    got = triton_route.route_backward(grad.to(DEVICE), logits.to(DEVICE), ids.to(DEVICE), spec)
    assert got.dtype == logits.dtype and got.shape == (T, E)
    assert rel_err(got.cpu(), want) <= 1e-5


def test_route_backward_refuses_the_sparse_mixer():
    spec = CASES["phimoe_sparsemixer"][2]
    with pytest.raises(ValueError, match="sparse mixer"):
        triton_route.route_backward(torch.randn(2, 2), torch.randn(2, 16), torch.zeros(2, 2, dtype=torch.long), spec)


# bf16 stores are wrong in the interpreter (triton 3.9): bf16 on the GPU only.
STORED = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", STORED, ids=str)
@pytest.mark.parametrize("name", ["qwen3_softmax_renorm", "deepseek_v3_groups", "phimoe_sparsemixer"])
def test_weights_stored_in_the_blocks_dtype_are_the_fp32_weights_rounded(name, dtype):
    """RouterSpec.weights_dtype: computed in fp32, rounded once by the store, as `.to(dtype)` rounds — by the
    kernel, the reference and the op's fake alike."""
    import dataclasses

    from torch._subclasses.fake_tensor import FakeTensorMode

    T, E, spec, with_bias = CASES[name]
    stored = dataclasses.replace(spec, weights_dtype=str(dtype).removeprefix("torch."))
    g = torch.Generator().manual_seed(len(name))
    logits = torch.randn(T, E, generator=g) * 2
    bias = _bias(E, with_bias, g)
    dev_bias = bias.to(DEVICE) if bias is not None else None
    want_w, want_i = triton_route.route_forward(logits.to(DEVICE), dev_bias, spec)
    got_w, got_i = triton_route.route_forward(logits.to(DEVICE), dev_bias, stored)
    assert got_w.dtype == dtype and torch.equal(got_i, want_i) and torch.equal(got_w, want_w.to(dtype))
    ref_w, _ = route_forward(logits, bias, stored)
    assert ref_w.dtype == dtype and torch.equal(ref_w, route_forward(logits, bias, spec)[0].to(dtype))
    with FakeTensorMode() as mode:
        fake_w, _ = torch.ops.moe_compiler.route(mode.from_tensor(logits), None, **stored.op_kwargs())
    assert fake_w.dtype == dtype
