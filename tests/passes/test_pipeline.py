"""The pipeline (passes/pipeline.py) end to end. Every MoE architecture of transformers 5.x
(moe_compiler/testing/hf_zoo.py) in both experts implementations and both dtypes: experts and router fused and
shared experts matched where we can prove them, otherwise left alone with the reason logged, logits equal eager
either way (the same grid with the errors: tools/support_matrix.py -> docs/support_matrix.md). A recognizer or
rewrite bug never leaves a half-edited graph; a meta-device model compiles with the check skipped and said so."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from moe_compiler.config import MoECompilerConfig
from moe_compiler.passes import fuse_moe_regions, rewrite
from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_models import tiny_model
from moe_compiler.testing.hf_zoo import (
    ADDED_IN_5_25,
    MODEL_TYPE,
    NOT_FUSED,
    ROUTER_LEFT,
    SHARED_LEFT,
    TINY,
    assert_fused_as_expected,
    model_type_known,
    zoo_model,
)

# Logits vs eager. bf16: Inductor's own rounding around the op, up to 2e-2 on these tiny models (the same
# error with fusion disabled: docs/support_matrix.md); a wrong block is off by O(1).
LOGIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


# batched_mm in bf16 is left to the GPU test below: what bf16 changes (the casts the matchers read around routers
# and experts) is the same in both forms, and each form's pass runs here in fp32. The architectures new in 5.25
# (hf_zoo.ADDED_IN_5_25) run grouped_mm only, without Inductor: the batched_mm pass and the op's lowering are the
# same code for every architecture, already run by the first 24 (the CPU suite's time: ~1 min for these).
def _architecture_cases():
    for arch in sorted(TINY):
        for form, dtype in (("grouped_mm", torch.float32), ("grouped_mm", torch.bfloat16),
                            ("batched_mm", torch.float32)):
            if arch in ADDED_IN_5_25 and form == "batched_mm":
                continue
            name = f"{arch}-{form}-{'fp32' if dtype == torch.float32 else 'bf16'}"
            yield pytest.param(arch, form, dtype, id=name)


@pytest.mark.parametrize(("arch", "form", "dtype"), list(_architecture_cases()))
def test_architecture(arch, form, dtype, caplog):
    if not model_type_known(arch):
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {MODEL_TYPE[arch]}")
    model = zoo_model(arch, form, dtype)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    # Inductor compiles the fp32 grouped_mm case of each of the first 24 architectures; the other cases run the
    # rewritten graph as traced (moe_compiler.inductor=False): what they test is the matcher and the op, and
    # Inductor's CPU code generation would be most of the suite's time.
    inductor = (form, dtype) == ("grouped_mm", torch.float32) and arch not in ADDED_IN_5_25
    options = None if inductor else {"moe_compiler.inductor": False}
    with caplog.at_level(logging.INFO, logger="moe_compiler"), torch.no_grad():
        ref = model(input_ids=ids)[0]  # the logits (a multimodal release's text model: its last hidden state)
        out = torch.compile(model, backend="fused_moe", options=options)(input_ids=ids)[0]
    assert_fused_as_expected(arch, model, counters)
    # Where the backend leaves a block alone, the log says why.
    if arch in NOT_FUSED:
        assert NOT_FUSED[arch] in caplog.text
    for left in (ROUTER_LEFT, SHARED_LEFT):
        if arch in left and arch not in NOT_FUSED:
            assert left[arch] in caplog.text
    assert rel_err(out, ref) <= LOGIT_TOL[dtype]


# --- failures inside the pipeline -------------------------------------------------------------------

IDS = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))


def _compile_and_compare(model):
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        out = torch.compile(model, backend="fused_moe")(input_ids=IDS).logits
    assert rel_err(out, ref) <= 1e-5


def _graphs(model, config=MoECompilerConfig()):
    """(code before, code after, report) of each graph the backend rewrites (no Inductor)."""
    seen = []

    def backend(gm, example_inputs):
        before = gm.code
        report = fuse_moe_regions(gm, example_inputs, config)
        seen.append((before, gm.code, report))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(input_ids=IDS.to(next(model.parameters()).device), use_cache=False)
    return seen


def test_a_failure_while_planning_leaves_that_region_untouched(monkeypatch):
    """A bug in the plan phase (before any edit) rejects the region as an internal error; the rest fuses."""
    real = rewrite.fake_call
    calls = []

    def fails_once(call, like):
        calls.append(call)
        if len(calls) == 1:
            raise RuntimeError("injected planning bug")
        return real(call, like)

    monkeypatch.setattr(rewrite, "fake_call", fails_once)
    model = tiny_model("qwen3_moe", "grouped_mm")
    ((before, after, report),) = _graphs(model)
    first, second = report.regions
    assert first.status == "rejected" and first.reason.startswith("internal error in the matcher")
    assert "injected planning bug" in first.reason
    assert second.status == "fused"
    assert after.count("moe_compiler.experts.default") == 1
    counters.clear()
    _compile_and_compare(model)


def test_a_failure_half_way_through_an_edit_restores_the_whole_graph(monkeypatch):
    def fails(graph, nodes):
        raise RuntimeError("injected edit bug")

    monkeypatch.setattr(rewrite, "erase_unused", fails)
    model = tiny_model("qwen3_moe", "grouped_mm")
    ((before, after, report),) = _graphs(model)
    assert after == before  # the call inserted and the uses re-pointed before the failure are gone
    assert [r.status for r in report.regions] == ["rejected", "rejected"]
    assert all("injected edit bug" in r.reason for r in report.regions)
    assert counters["moe_compiler"]["edit_failed"] == 1
    counters.clear()
    _compile_and_compare(model)


def test_meta_device_model_is_fused_with_the_check_skipped_and_said_so():
    model = tiny_model("qwen3_moe", "grouped_mm").to("meta")
    ((_, after, report),) = _graphs(model)
    assert [r.status for r in report.regions] == ["fused", "fused"]
    assert all("meta device" in r.check and "structural proof" in r.check for r in report.regions)
    assert all("meta device" in r.router_check for r in report.regions)
    assert "internal error" not in report.summary_text()


# --- every architecture bf16 on the GPU (the route op is one Triton launch there) ------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("form", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_architecture_bf16_on_gpu(arch, form):
    """As on CPU: experts and router fused where proven (on CUDA the router is one Triton route launch),
    logits equal eager. A transformers release without the architecture skips it (the CPU suite runs the
    newest); the device has 5.17."""
    if not model_type_known(arch):
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {MODEL_TYPE[arch]}")
    model = zoo_model(arch, form, torch.bfloat16).cuda()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids)[0]
        out = torch.compile(model, backend="fused_moe")(input_ids=ids)[0]
    assert_fused_as_expected(arch, model, counters)
    assert rel_err(out, ref) <= 3e-2
