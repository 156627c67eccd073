"""benchmarks/harness.py's results file: a partial run merges into the committed table instead of replacing it."""

import json

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
