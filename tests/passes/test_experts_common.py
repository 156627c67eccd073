"""The backend on tiny real HF models: every MoE layer fused, logits and gradients equal eager."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_models import (
    ARCHS,
    MOE_LAYERS,
    count_experts_modules,
    tiny_model,
)

FORMS = ["grouped_mm", "batched_mm"]
# Logits vs eager: fp32 differs only by summation order; bf16 by Inductor's fusions around our op.
LOGIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _tokens(batch=2, seq=7, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def fused_count(form=None):
    c = counters["moe_compiler"]
    return c[f"fused_experts_{form}"] if form else sum(v for k, v in c.items() if k.startswith("fused_experts"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fuses_every_moe_layer_and_matches_eager(arch, form, dtype):
    model = tiny_model(arch, form, dtype)
    assert count_experts_modules(model) == MOE_LAYERS[arch]
    ids = _tokens()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="fused_moe", fullgraph=True)(input_ids=ids).logits
    assert fused_count(form) == MOE_LAYERS[arch], dict(counters["moe_compiler"])
    assert counters["moe_compiler"]["rejected_experts"] == 0
    assert rel_err(out, ref) <= LOGIT_TOL[dtype]


# deepseek_v3 and qwen2_moe have shared experts (plain / sigmoid-gated), fused into the experts call.
@pytest.mark.parametrize(
    "arch,form",
    [("qwen3_moe", "grouped_mm"), ("deepseek_v3", "batched_mm"), ("mixtral", "grouped_mm"),
     ("qwen2_moe", "grouped_mm")],
)
def test_training_gradients_equal_eager(arch, form):
    eager = tiny_model(arch, form, torch.float32).train()
    compiled_model = tiny_model(arch, form, torch.float32).train()
    compiled_model.load_state_dict(eager.state_dict())
    ids, labels = _tokens(seed=1), _tokens(seed=2)

    loss_ref = eager(input_ids=ids, labels=labels).loss
    loss_ref.backward()
    compiled = torch.compile(compiled_model, backend="fused_moe", options={"moe_compiler.training": True})
    loss = compiled(input_ids=ids, labels=labels).loss
    loss.backward()

    assert fused_count(form) == MOE_LAYERS[arch]
    assert rel_err(loss, loss_ref) <= 1e-5
    ref_grads = dict(eager.named_parameters())
    checked = shared = 0
    for name, p in compiled_model.named_parameters():
        want = ref_grads[name].grad
        if want is None:
            assert p.grad is None, name
            continue
        assert rel_err(p.grad, want) <= 1e-4, name
        checked += name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        shared += ".shared_expert" in name
    assert checked == 2 * MOE_LAYERS[arch]  # gate_up_proj and down_proj of every MoE layer got gradients
    fused_shared = sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_shared_experts"))
    assert fused_shared == (MOE_LAYERS[arch] if shared else 0)


def test_training_forward_keeps_inductors_moe_by_default_and_says_why(tmp_path):
    """A region whose output needs gradients is left to Inductor unless asked (the op's backward is slower than
    Inductor's today); the model still trains correctly and the dump says why and how to switch. (batched_mm: on
    the CPU, transformers 5.17's grouped_mm is a fallback op whose backward plain torch.compile cannot trace, so
    Dynamo retries every frame and counts each region again; the rule under test does not depend on the form.)"""
    eager = tiny_model("qwen3_moe", "batched_mm", torch.float32).train()
    model = tiny_model("qwen3_moe", "batched_mm", torch.float32).train()
    model.load_state_dict(eager.state_dict())
    ids, labels = _tokens(seed=1), _tokens(seed=2)
    options = {"moe_compiler.dump_dir": str(tmp_path)}
    loss = torch.compile(model, backend="fused_moe", options=options)(input_ids=ids, labels=labels).loss
    loss.backward()
    ref = eager(input_ids=ids, labels=labels).loss
    ref.backward()
    assert fused_count() == 0
    assert counters["moe_compiler"]["left_for_training"] == MOE_LAYERS["qwen3_moe"]
    assert rel_err(loss, ref) <= 1e-5
    grads = dict(eager.named_parameters())
    assert all(rel_err(p.grad, grads[n].grad) <= 1e-4 for n, p in model.named_parameters() if p.grad is not None)
    reasons = "".join(p.read_text() for p in tmp_path.rglob("reason.txt"))
    assert "needs gradients" in reasons and "moe_compiler.training=True" in reasons
    # The same compiled model under no_grad (a new graph: Dynamo guards on grad mode) is fused.
    counters.clear()
    with torch.no_grad():
        out = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
        assert rel_err(out, model(input_ids=ids).logits) <= 1e-5
    assert fused_count() == MOE_LAYERS["qwen3_moe"]


def test_training_switch_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_COMPILER_TRAINING", "1")
    model = tiny_model("qwen3_moe", "grouped_mm", torch.float32).train()
    # (what is tested is the switch, read by the matcher: Inductor's CPU build of the step would be most of the time)
    options = {"moe_compiler.inductor": False}
    torch.compile(model, backend="fused_moe", options=options)(input_ids=_tokens()).logits.sum().backward()
    assert fused_count() == MOE_LAYERS["qwen3_moe"] and counters["moe_compiler"]["left_for_training"] == 0


def test_dynamic_sequence_length_compiles_once():
    model = tiny_model("qwen3_moe", "grouped_mm")
    compiled = torch.compile(model, backend="fused_moe")
    for seq in (5, 9, 13):
        ids = _tokens(seq=seq, seed=seq)
        torch._dynamo.mark_dynamic(ids, 1)
        with torch.no_grad():
            out = compiled(input_ids=ids).logits
            ref = model(input_ids=ids).logits
        assert rel_err(out, ref) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1
    assert fused_count("grouped_mm") == MOE_LAYERS["qwen3_moe"]


def test_compiled_model_follows_in_place_weight_updates():
    """No weight caches: an optimizer-style in-place update is seen by the next compiled call."""
    model = tiny_model("mixtral", "grouped_mm")
    compiled = torch.compile(model, backend="fused_moe")
    ids = _tokens()
    with torch.no_grad():
        compiled(input_ids=ids)
        for m in model.modules():
            if type(m).__name__.endswith("Experts"):
                m.down_proj.mul_(-0.5)
        assert rel_err(compiled(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5


def _assert_experts_left_alone(model, reason: str, caplog) -> None:
    """Both MoE layers of a tiny model rejected, the log saying `reason`, the compiled model still right."""
    ids = _tokens()
    with caplog.at_level(logging.INFO, logger="moe_compiler"), torch.no_grad():
        out = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
        ref = model(input_ids=ids).logits
    assert fused_count() == 0 and counters["moe_compiler"]["rejected_experts"] == 2
    assert reason in caplog.text
    assert rel_err(out, ref) <= 1e-5


def test_unknown_activation_is_rejected_with_reason_and_still_correct(caplog):
    # gelu_new is written out as 0.5 * x * (1 + tanh(...)): not an activation the op knows.
    _assert_experts_left_alone(tiny_model("qwen3_moe", "grouped_mm", hidden_act="gelu_new"),
                               "unrecognized gate activation", caplog)


def _clamped_swiglu_gate(limit: float, up_bounds: tuple[float, float] | None = None):
    """DeepseekV4Experts._apply_gate (transformers 5.24) at `limit`; other up bounds for a near miss."""
    lo, hi = up_bounds or (-limit, limit)

    def apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=lo, max=hi)
        return torch.nn.functional.silu(gate) * up

    return apply_gate


@pytest.mark.parametrize("form", FORMS)
def test_deepseek_v4_clamped_swiglu_fuses(form, monkeypatch, tmp_path):
    """silu(gate.clamp(max=L)) * up.clamp(-L, L) (DeepSeek-V4, Hunyuan-V4): one activation of the op, the bound
    read off the graph; L = 0.5 so the clamps bite on these O(1) activations."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    model = tiny_model("qwen3_moe", form)
    ids = _tokens()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        monkeypatch.setattr(qwen3.Qwen3MoeExperts, "_apply_gate", _clamped_swiglu_gate(0.5), raising=False)
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(
            input_ids=ids).logits
    assert rel_err(ref, plain) > 1e-2  # the clamps change the model
    assert fused_count(form) == 2 and rel_err(out, ref) <= 1e-5
    assert "silu_clamped(limit=0.5)" in (next(tmp_path.glob("graph_*")) / "summary.txt").read_text()


def test_other_clamps_around_an_activation_are_left_alone(monkeypatch, caplog):
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    monkeypatch.setattr(qwen3.Qwen3MoeExperts, "_apply_gate", _clamped_swiglu_gate(0.5, (-0.5, 1.0)), raising=False)
    _assert_experts_left_alone(tiny_model("qwen3_moe", "grouped_mm"),
                               "clamped gate/up around silu: gate to (None, 0.5), up to (-0.5, 1.0)", caplog)


def test_numerical_check_catches_a_wrong_proof(monkeypatch):
    """If a recognizer mis-reads the activation, the numerical check refuses the rewrite."""
    from moe_compiler.passes import gated_activation
    from moe_compiler.spec import Activation

    monkeypatch.setitem(gated_activation._SIMPLE_ACTS, "silu", Activation.RELU)
    model = tiny_model("olmoe", "grouped_mm")
    ids = _tokens()
    with torch.no_grad():
        out = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
        ref = model(input_ids=ids).logits
    assert fused_count() == 0 and counters["moe_compiler"]["rejected_experts"] == 2
    assert rel_err(out, ref) <= 1e-5


def test_eager_experts_implementation_is_explained(caplog):
    model = tiny_model("qwen3_moe", "eager")
    ids = _tokens()
    with caplog.at_level(logging.INFO, logger="moe_compiler"), torch.no_grad():
        # (the explanation is the matcher's: Inductor's CPU build of the unrolled per-expert loop would be most of
        # the time)
        out = torch.compile(model, backend="fused_moe", options={"moe_compiler.inductor": False})(input_ids=ids).logits
        ref = model(input_ids=ids).logits
    assert fused_count() == 0
    assert "experts_implementation='eager'" in caplog.text and "experts_implementation='grouped_mm'" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert rel_err(out, ref) <= 1e-5


def test_disabled_fusion_leaves_graph_alone():
    model = tiny_model("qwen3_moe", "grouped_mm")
    ids = _tokens()
    with torch.no_grad():
        out = torch.compile(model, backend="fused_moe", options={"moe_compiler.enabled": False})(input_ids=ids).logits
        ref = model(input_ids=ids).logits
    assert fused_count() == 0
    assert rel_err(out, ref) <= 1e-5


def test_inference_mode_and_dynamic_true():
    """`torch.inference_mode()` (serving) and `torch.compile(dynamic=True)` (T symbolic from the start)."""
    model = tiny_model("deepseek_v3", "grouped_mm")
    compiled = torch.compile(model, backend="fused_moe", dynamic=True)
    with torch.inference_mode():
        for seq in (3, 8):
            ids = _tokens(seq=seq, seed=seq)
            assert rel_err(compiled(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5
    # Dynamo restarts this compile once (plain Inductor too): every graph the backend saw fused every layer.
    assert fused_count("grouped_mm") == MOE_LAYERS["deepseek_v3"] * counters["moe_compiler"]["graphs"]
    assert counters["moe_compiler"]["rejected_experts"] == 0


# --- compiled HF models on the GPU -------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("form", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_models_bf16(arch, form, mode):
    """bf16 logits vs eager. In bf16 any compiler perturbs hidden states by ~1e-2, which flips top-k
    near ties (seen on the GPU: DeepSeek-V3 tiny, 4e-2 for Inductor alone as for fused_moe). So an input
    counts only if plain Inductor reproduces eager on it (no routing near-tie); on those inputs fused_moe
    must too. Several calls per model: cudagraph trees record, then replay."""
    model = tiny_model(arch, form, torch.bfloat16).cuda()
    compiled = torch.compile(model, backend="fused_moe", mode=mode)
    inductor = torch.compile(model, mode=mode)
    checked = 0
    for seed in range(6):
        ids = torch.randint(0, 128, (2, 9), device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        with torch.no_grad():
            # Two cudagraph-tree models share a memory pool: copy each output out before the next call.
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(input_ids=ids).logits.clone()
            torch.compiler.cudagraph_mark_step_begin()
            baseline = inductor(input_ids=ids).logits.clone()
            ref = model(input_ids=ids).logits
            if rel_err(baseline, ref) > 1e-2:
                continue  # a routing near-tie: no compiler can match eager here
        assert rel_err(out, ref) <= 1e-2
        checked += 1
    assert checked >= 3
    assert counters["moe_compiler"][f"fused_experts_{form}"] == MOE_LAYERS[arch]
    assert counters["moe_compiler"]["rejected_experts"] == 0


@pytest.mark.gpu
def test_training_step_on_gpu_matches_eager():
    eager = tiny_model("qwen3_moe", "grouped_mm", torch.float32).cuda().train()
    fused = tiny_model("qwen3_moe", "grouped_mm", torch.float32).cuda().train()
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 128, (2, 9), device="cuda")
    eager(input_ids=ids, labels=ids).loss.backward()
    compiled = torch.compile(fused, backend="fused_moe", options={"moe_compiler.training": True})
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert counters["moe_compiler"]["fused_experts_grouped_mm"] == 2
    ref = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        if ref[name].grad is not None:
            assert rel_err(p.grad, ref[name].grad) <= 1e-4, name
