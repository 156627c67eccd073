"""benchmarks/harness.py: a partial run merges into the committed table instead of replacing it; the gradient error is
one norm over every tensor, computed slice by slice."""

import json

import torch

from benchmarks import harness


def test_save_rows_merges_a_partial_run_by_cell_and_keeps_the_note(tmp_path):
    path = str(tmp_path / "models.json")
    cell = ("model", "layers", "part", "mode")
    old = [{"model": "a", "layers": 4, "part": "prefill", "mode": "default", "ms": 1.0},
           {"model": "a", "layers": 4, "part": "decode B=1", "mode": "default", "ms": 2.0},
           {"model": "a", "layers": 4, "part": "decode B=1", "mode": "reduce-overhead", "ms": 3.0},
           {"model": "b", "layers": 2, "part": "prefill", "mode": "default", "ms": 4.0}]
    harness.write_json(path, {"gpu": "X", "torch": "0", "note": "how the rows ran", "rows": old})
    new = [{"model": "a", "layers": 4, "part": "decode B=1", "mode": "default", "ms": 9.0}]
    harness.save_rows(path, "models", new, "X", merge_on=cell)
    with open(path) as f:
        saved = json.load(f)
    assert saved["note"] == "how the rows ran"
    assert [r["ms"] for r in saved["rows"]] == [1.0, 3.0, 4.0, 9.0]


def test_save_rows_without_a_merge_writes_only_the_run(tmp_path):
    path = str(tmp_path / "loop.json")
    harness.write_json(path, {"gpu": "X", "torch": "0", "note": "old", "rows": [{"shape": "a", "us": 1.0}]})
    harness.save_rows(path, "loop", [{"shape": "b", "us": 2.0}], "X")
    with open(path) as f:
        saved = json.load(f)
    assert "note" not in saved and saved["rows"] == [{"shape": "b", "us": 2.0}]


def test_save_rows_merge_defaults_name_the_older_rows_cell(tmp_path):
    path = str(tmp_path / "quantized.json")
    old = [{"shape": "a", "T": 1, "us": 1.0}, {"shape": "a", "T": 16, "us": 2.0}]  # before rows said their scales
    harness.write_json(path, {"gpu": "X", "torch": "0", "rows": old})
    new = [{"shape": "a", "T": 1, "scale_fmt": "fp32", "us": 5.0},
           {"shape": "a", "T": 1, "scale_fmt": "e8m0", "us": 6.0}]
    harness.save_rows(path, "quantized", new, "X", merge_on=("shape", "T", "scale_fmt"),
                      merge_defaults={"scale_fmt": "fp32"})
    with open(path) as f:
        assert [r["us"] for r in json.load(f)["rows"]] == [2.0, 5.0, 6.0]


def test_grads_rel_err_in_slices_equals_the_whole_norm_in_fp64(monkeypatch):
    # A slice far smaller than the tensors: session 48's DeepSeek-V3 gradient (28 GiB in fp32) did not fit whole.
    monkeypatch.setattr(harness, "GRAD_SLICE", 7)
    gen = torch.Generator().manual_seed(0)
    want = [torch.randn(4, 5, 3, generator=gen), torch.randn(6, 2, generator=gen).t(), torch.randn(1, generator=gen)]
    got = [(w + 0.05 * torch.randn(w.shape, generator=gen)).to(torch.bfloat16) for w in want]
    num = sum(float((g.double() - w.double()).square().sum()) for g, w in zip(got, want))
    den = sum(float(w.double().square().sum()) for w in want)
    assert abs(harness.grads_rel_err(got, want) - (num / den) ** 0.5) < 1e-6 * (num / den) ** 0.5
