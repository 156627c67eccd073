"""The debug dump, log summary and tlparse artifact say what was fused, what was not, and why."""

from __future__ import annotations

import json

import torch

from moe_compiler import debug
from moe_compiler.testing.hf_models import tiny_model


def _compile_and_run(model, **options):
    with torch.no_grad():
        torch.compile(model, backend="fused_moe", options=options)(input_ids=torch.randint(0, 128, (2, 5)))


def test_dump_of_fused_regions(tmp_path):
    _compile_and_run(tiny_model("qwen3_moe", "grouped_mm"), **{"moe_compiler.dump_dir": str(tmp_path)})
    (gdir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    summary = (gdir / "summary.txt").read_text()
    assert "2 experts regions, 2 fused (grouped_mm), 0 rejected" in summary
    assert "[fused] model.layers.1.mlp.experts (Qwen3MoeExperts" in summary
    report = json.loads((gdir / "report.json").read_text())
    assert [r["status"] for r in report["regions"]] == ["fused", "fused"]
    regions = sorted(d for d in gdir.iterdir() if d.is_dir())
    assert len(regions) == 2
    before = (regions[0] / "before.py").read_text()
    after = (regions[0] / "after.py").read_text()
    assert "grouped_mm_fallback" in before and "sort" in before  # fp32: transformers' opaque fallback
    assert (
        "moe_compiler.experts.default" in after
        and "activation = 'silu', gate_up = 'concat', transposed = False" in after
    )
    spec = json.loads((regions[0] / "spec.json").read_text())
    assert spec["form"] == "grouped_mm" and spec["sizes"]["E"] == "8" and spec["sizes"]["k"] == "2"
    assert spec["check"].startswith("rel err")
    assert (regions[0] / "region.dot").read_text().startswith("digraph region")
    assert "graph" in (tmp_path / "summary.txt").read_text()


def test_dump_of_rejected_regions_names_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COMPILER_DUMP_DIR", str(tmp_path))
    _compile_and_run(tiny_model("mixtral", "batched_mm", hidden_act="gelu_new"))
    (gdir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    regions = sorted(d for d in gdir.iterdir() if d.is_dir())
    assert len(regions) == 2 and all("rejected" in d.name for d in regions)
    reason = (regions[0] / "reason.txt").read_text()
    assert "unrecognized gate activation" in reason
    assert "bmm" in (regions[0] / "before.py").read_text()


def test_trace_structured_artifact(monkeypatch):
    seen = []
    real = debug.torch._logging.trace_structured

    def spy(kind, metadata_fn=dict, payload_fn=lambda: None, **kwargs):
        if metadata_fn().get("name") == "moe_compiler_report":
            seen.append((kind, metadata_fn(), payload_fn()))
        return real(kind, metadata_fn=metadata_fn, payload_fn=payload_fn, **kwargs)

    monkeypatch.setattr(debug.torch._logging, "trace_structured", spy)
    _compile_and_run(tiny_model("olmoe", "grouped_mm"))
    ((kind, meta, payload),) = seen
    assert kind == "artifact" and meta["encoding"] == "json"
    assert [r["status"] for r in json.loads(payload)["regions"]] == ["fused", "fused"]
