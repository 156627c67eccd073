"""Triton experts forward, decode path (triton_decode.py): against the fp64 reference, every spec."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import (  # noqa: E402
    DEVICE,
    DTYPES,
    SPECS,
    device_inputs,
    fails_with_ids_assert,
    poisoned_allocations,
    spec_id,
)

from moe_compiler.lowering import launch, triton_decode, triton_route  # noqa: E402
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig  # noqa: E402
from moe_compiler.spec import Activation, RouterSpec, SharedMLP  # noqa: E402
from moe_compiler.testing import experts_reference, rel_err, shared_inputs, shared_reference  # noqa: E402

CONFIG = DecodeConfig(gate_up=KernelConfig(block_n=16, block_k=16), down=KernelConfig(block_n=8, block_k=32))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "T,H,I,E,k",
    [
        (1, 32, 16, 8, 2),  # decode: one token
        (3, 40, 24, 16, 2),  # H, I not multiples of the blocks: masked K tails, wrapped columns
        (2, 32, 16, 4, 4),  # k = E
        (4, 16, 32, 9, 1),  # k = 1
    ],
)
def test_decode_forward(spec, dtype, tol, T, H, I, E, k):
    cpu, dev = device_inputs(T, H, I, E, k, dtype, spec)
    with poisoned_allocations():
        out, ids_ok = triton_decode.experts_forward(*dev, spec, CONFIG)
    assert out.dtype == dtype and out.shape == (T, H) and int(ids_ok) == 1
    assert rel_err(out.cpu(), experts_reference(*cpu, spec=spec)) <= tol


# Two and four columns per program (what the H100 tuning picks at Qwen3-30B-A3B T=1): tiles narrower than a warp's
# natural layout, one pipeline stage in the down kernel.
NARROW = DecodeConfig(
    gate_up=KernelConfig(block_n=4, block_k=32, num_stages=3), down=KernelConfig(block_n=2, block_k=16, num_stages=1)
)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_decode_forward_narrow_tiles(spec, dtype, tol):
    cpu, dev = device_inputs(3, 40, 24, 16, 2, dtype, spec)
    with poisoned_allocations():
        out, ids_ok = triton_decode.experts_forward(*dev, spec, NARROW)
    assert int(ids_ok) == 1
    assert rel_err(out.cpu(), experts_reference(*cpu, spec=spec)) <= tol


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU kernel asserts instead: test_out_of_range_id_fails_the_launch")
def test_out_of_range_id_is_flagged():
    cpu, dev = device_inputs(2, 16, 16, 4, 2, torch.float32, SPECS[0])
    dev[1][1, 0] = 7
    out, ids_ok = triton_decode.experts_forward(*dev, SPECS[0], CONFIG)
    assert int(ids_ok) == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs no device asserts: test_out_of_range_id_is_flagged")
def test_out_of_range_id_fails_the_launch():
    fails_with_ids_assert(
        """
        from moe_compiler.lowering import triton_decode
        from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig
        from moe_compiler.spec import ExpertsSpec
        x, w = torch.randn(2, 16, device="cuda"), torch.rand(2, 2, device="cuda")
        ids = torch.tensor([[0, 7], [1, 2]], device="cuda")
        w1, w2 = torch.randn(4, 32, 16, device="cuda"), torch.randn(4, 16, 16, device="cuda")
        config = DecodeConfig(KernelConfig(16, 16), KernelConfig(8, 32))
        triton_decode.experts_forward(x, ids, w, w1, w2, None, None, ExpertsSpec(), config)
        """
    )


def test_too_many_pairs_is_a_clear_error():
    cpu, dev = device_inputs(1, 16, 16, 4, 2, torch.float32, SPECS[0])
    n = triton_decode.MAX_PAIRS
    big = dev[0].expand(n, 16), dev[1].expand(n, 2), dev[2].expand(n, 2)
    with pytest.raises(ValueError, match="decode path takes at most"):
        triton_decode.experts_forward(*big, *dev[3:], SPECS[0], CONFIG)


CLAMPED = next(s for s in SPECS if s.activation is Activation.SILU_CLAMPED)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "T,H,I,Is,fused,gated,spec",
    [
        (1, 32, 16, 16, False, True, SPECS[0]),  # Qwen3-Next: Is = I, sigmoid-gated
        (3, 40, 24, 40, True, False, SPECS[0]),  # Is not a multiple of the tile or of I; H tail; one fused gate_up
        (2, 32, 16, 64, False, False, SPECS[0]),  # Is = 4 I: more shared tiles than one grid row (DeepSeek-V2-Lite)
        (2, 32, 16, 48, False, False, CLAMPED),  # DeepSeek-V4: the shared MLP clamped as the experts are
    ],
)
def test_decode_forward_with_shared_experts(dtype, tol, T, H, I, Is, fused, gated, spec):
    """The shared MLP as one more pair per token: its tiles after the routed rows of the gate_up grid and
    its down GEMV in each token's down program, with the routed experts' activation."""
    cpu, dev = device_inputs(T, H, I, 8, 2, dtype, spec)
    shared = shared_inputs(H, Is, dtype, fused, gated)
    gate_up = [w.to(DEVICE) for w in shared[0]] + [None] * (2 - len(shared[0]))  # [gate, up], or [gate_up, None]
    mlp = SharedMLP.from_parts(*gate_up, shared[1].to(DEVICE), None if shared[2] is None else shared[2].to(DEVICE))
    with poisoned_allocations():
        out, ids_ok = triton_decode.experts_forward(*dev, spec, CONFIG, mlp)
    ref = experts_reference(*cpu, spec=spec) + shared_reference(cpu[0], *shared, spec=spec)
    assert int(ids_ok) == 1
    assert rel_err(out.cpu(), ref) <= tol


def test_shared_gate_and_up_with_different_strides_is_a_clear_error():
    # The kernel walks gate and up with one stride pattern; an up weight that is a transposed view is not that.
    cpu, dev = device_inputs(1, 32, 16, 8, 2, torch.float32, SPECS[0])
    (gate, _), down, _ = shared_inputs(32, 16, torch.float32, False, False)
    up = torch.randn(32, 16).t()  # [Is, H] with strides (1, 16)
    mlp = SharedMLP.from_parts(gate.to(DEVICE), up.to(DEVICE), down.to(DEVICE), None)
    with pytest.raises(ValueError, match=r"expected the same strides.*got \(32, 1\) / \(1, 16\).*contiguous"):
        triton_decode.experts_forward(*dev, SPECS[0], CONFIG, mlp)


# The down GEMV's reduction over I split over programs (config.down.split_k): wide tiles over transposed weights.
SPLIT = DecodeConfig(gate_up=KernelConfig(block_n=16, block_k=16), down=KernelConfig(block_n=32, block_k=16, split_k=3))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "T,H,I,E,k",
    [
        (1, 32, 96, 8, 2),  # three whole splits of 32 columns
        (3, 40, 72, 16, 2),  # splits of 32, 32, 8: a K tail in the last; H tail; wrapped columns
        (2, 48, 20, 4, 4),  # I = 20: chunks of 16 and 4, so two splits where three were asked
    ],
)
def test_decode_forward_split_down(spec, dtype, tol, T, H, I, E, k):
    cpu, dev = device_inputs(T, H, I, E, k, dtype, spec)
    with poisoned_allocations():  # the tickets too: the gate_up launch must zero them
        out, ids_ok = triton_decode.experts_forward(*dev, spec, SPLIT)
        again, _ = triton_decode.experts_forward(*dev, spec, SPLIT)
    assert int(ids_ok) == 1
    assert rel_err(out.cpu(), experts_reference(*cpu, spec=spec)) <= tol
    assert torch.equal(out, again)  # partials summed in split order, whichever finished last


def test_split_down_leaves_its_tickets_zero_and_sums_in_split_order():
    spec = SPECS[4]  # GPT-OSS: transposed, interleaved, biases (the bias added once, by split 0)
    T, H, I, E, k = 2, 32, 96, 8, 2
    cpu, dev = device_inputs(T, H, I, E, k, torch.float32, spec)
    hidden, ids, weights, ids_ok, act = triton_decode.pair_buffers(dev[0], dev[1], dev[2], I)
    tickets = triton_decode.tickets_for(SPLIT, T, H, I, DEVICE)
    assert triton_decode.down_split(SPLIT, I) == (3, 32) and tickets.numel() == T * 1
    triton_decode.launch_gate_up(hidden, ids, dev[3], dev[5], spec, SPLIT, k, act, ids_ok, weights, tickets=tickets)
    assert tickets.eq(0).all()
    out = hidden.new_empty(T, H)
    triton_decode.launch_down(act, ids, weights, dev[4], dev[6], spec, SPLIT, k, out, tickets=tickets)
    assert tickets.eq(0).all()  # reset by each tile's last split: a relaunch of the down kernel alone works
    unsplit = DecodeConfig(SPLIT.gate_up, KernelConfig(block_n=32, block_k=16))
    ref = hidden.new_empty(T, H)
    triton_decode.launch_down(act, ids, weights, dev[4], dev[6], spec, unsplit, k, ref)
    assert rel_err(out.cpu(), ref.cpu()) <= 1e-6
    with pytest.raises(ValueError, match="split down GEMV needs tickets_for"):
        triton_decode.launch_down(act, ids, weights, dev[4], dev[6], spec, SPLIT, k, out)


def test_split_k_is_the_down_gemv_s_alone():
    with pytest.raises(ValueError, match="gate_up.split_k: expected 1"):
        DecodeConfig(KernelConfig(16, 16, split_k=2), KernelConfig(16, 16))
    with pytest.raises(ValueError, match="split_k: expected an int in"):
        KernelConfig(16, 16, split_k=0)


# The route in the gate_up GEMV (triton_decode.experts_forward's `routed`): each pair's program routes its token
# from the logits by the route kernel's own math; the result must be what the route launch + the decode launches
# give (the same math: equal up to the order of an fp32 sum), for every router form the route kernel runs.
ROUTES = {
    "qwen3_softmax_renorm": (RouterSpec(top_k=2, norm_topk_prob=True), False),
    "deepseek_v3_groups_bias": (RouterSpec(top_k=3, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                                           n_group=4, topk_group=2), True),
    "gpt_oss_topk_then_softmax": (RouterSpec(top_k=2, order="topk_then_score"), False),
    "glm4_masked_score_zero": (RouterSpec(top_k=2, scoring="sigmoid", norm_topk_prob=True, n_group=2, topk_group=1,
                                          masked_score=0.0), True),
    "weights_stored_fp16": (RouterSpec(top_k=2, norm_topk_prob=True, weights_dtype="float16"), False),
    # DeepSeek-V4's scores, the router computing in fp16 (rounded after each op; the interpreter converts fp16 right)
    "deepseek_v4_in_fp16": (RouterSpec(top_k=2, scoring="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
                                       score_dtype="float16", weights_dtype="float16"), True),
}


SPLIT_DOWN = DecodeConfig(gate_up=KernelConfig(16, 16), down=KernelConfig(block_n=8, block_k=16, split_k=2))


def _routed(T, E, dtype, route, seed=1):
    spec, has_bias = ROUTES[route]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(E, generator=g).to(DEVICE) if has_bias else None
    return triton_route.Routed(logits, bias, spec)


# every router form on one layout at T = 1; every layout (Qwen, GPT-OSS, Llama-4's scale_input) with narrow tiles
# and with the split down GEMV on one form
ROUTED_CASES = ([(route, SPECS[0], 1, CONFIG, "T1") for route in ROUTES]
                + [("qwen3_softmax_renorm", spec, T, config, name) for spec in (SPECS[0], SPECS[4], SPECS[6])
                   for T, config, name in ((3, NARROW, "T3_narrow"), (2, SPLIT_DOWN, "split"))])


@pytest.mark.parametrize("route,spec,T,config", [c[:4] for c in ROUTED_CASES],
                         ids=[f"{c[0]}-{spec_id(c[1])}-{c[4]}" for c in ROUTED_CASES])
def test_route_in_the_gate_up_gemv_equals_the_route_launch(route, spec, T, config):
    H, I, E = 40, 32, 16
    routed = _routed(T, E, torch.float32, route)
    weights, ids = triton_route.route_forward(routed.logits, routed.correction_bias, routed.spec)
    k = routed.spec.top_k
    _, dev = device_inputs(T, H, I, E, k, torch.float32, spec)
    args = (dev[0], ids, weights, *dev[3:])
    want, _ = triton_decode.experts_forward(*args, spec, config)
    with poisoned_allocations():
        got, ok = triton_decode.experts_forward(*args, spec, config, routed=routed)
    assert int(ok) == 1 and not got.isnan().any()
    assert rel_err(got.cpu(), want.cpu()) <= 1e-6


def test_route_in_the_gate_up_gemv_writes_the_route_s_ids_and_weights():
    T, H, I, E, k = 3, 32, 16, 16, 3
    routed = _routed(T, E, torch.float16, "deepseek_v3_groups_bias")
    want_w, want_i = triton_route.route_forward(routed.logits, routed.correction_bias, routed.spec)
    _, dev = device_inputs(T, H, I, E, k, torch.float32, SPECS[0])
    with poisoned_allocations():
        ids = torch.empty(T * k, dtype=torch.int64, device=DEVICE)
        weights = torch.empty(T * k, dtype=torch.float32, device=DEVICE)
        act = torch.empty(T * k, I, device=DEVICE)
    triton_decode.launch_gate_up(dev[0], ids, dev[3], None, SPECS[0], CONFIG, k, act, act, weights, routed=routed)
    assert torch.equal(ids.cpu(), want_i.reshape(-1).cpu())
    assert rel_err(weights.cpu(), want_w.reshape(-1).cpu()) <= 1e-6


def test_route_in_the_gate_up_gemv_with_shared_experts():
    T, H, I, E, Is = 2, 32, 16, 16, 24
    routed = _routed(T, E, torch.float32, "qwen3_softmax_renorm")
    weights, ids = triton_route.route_forward(routed.logits, routed.correction_bias, routed.spec)
    _, dev = device_inputs(T, H, I, E, 2, torch.float32, SPECS[0])
    (gate, up), down, expert_gate = shared_inputs(H, Is, torch.float32, fused=False, gated=True)
    mlp = SharedMLP.from_parts(gate.to(DEVICE), up.to(DEVICE), down.to(DEVICE), expert_gate.to(DEVICE))
    args = (dev[0], ids, weights, *dev[3:])
    want, _ = triton_decode.experts_forward(*args, SPECS[0], CONFIG, mlp)
    with poisoned_allocations():
        got, _ = triton_decode.experts_forward(*args, SPECS[0], CONFIG, mlp, routed=routed)
    assert rel_err(got.cpu(), want.cpu()) <= 1e-6


def test_route_in_the_gate_up_gemv_rejects_logits_of_another_shape():
    routed = _routed(2, 8, torch.float32, "qwen3_softmax_renorm")
    weights, ids = triton_route.route_forward(routed.logits, None, routed.spec)
    _, dev = device_inputs(2, 32, 16, 16, 2, torch.float32, SPECS[0])
    with pytest.raises(ValueError, match=r"needs logits \[2, 16\]"):
        triton_decode.experts_forward(dev[0], ids, weights, *dev[3:], SPECS[0], CONFIG, routed=routed)


def test_bad_route_in_gemv_switch_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(launch.ROUTE_IN_GEMV_ENV, "on")
    with pytest.raises(ValueError, match="MOE_COMPILER_ROUTE_IN_GEMV='on': expected '1'"):
        launch.route_in_gemv()


def test_traced_route_over_other_experts_routes_apart(monkeypatch):
    """A traced decode call handed a route's own outputs routes in its GEMV only where the route's logits are
    [T, E] of these experts; a router over 8 experts feeding 16 experts' weights (no remap between) keeps the
    route's ids and weights, rather than failing the compile."""
    monkeypatch.setenv(launch.ROUTE_IN_GEMV_ENV, "1")
    routed = _routed(2, 8, torch.float32, "qwen3_softmax_renorm")
    _, dev = device_inputs(2, 32, 16, 16, 2, torch.float32, SPECS[0])
    with launch.traced():  # (an interpreted kernel runs as is under wrap_triton: nothing is recorded)
        weights, ids = triton_route.route_forward(routed.logits, None, routed.spec)
        assert launch.route_of(weights, ids) is not None
        got, ok = triton_decode.experts_forward(dev[0], ids, weights, *dev[3:], SPECS[0], CONFIG)
    want, _ = triton_decode.experts_forward(dev[0], ids, weights, *dev[3:], SPECS[0], CONFIG)
    assert int(ok) == 1 and rel_err(got.cpu(), want.cpu()) <= 1e-6
