"""python -m moe_compiler.tune (tune/__main__.py): what a --merge or a --refine keeps of the file it rewrites."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from moe_compiler.tune import __main__ as tune_main

KEPT = {"dtype": "bfloat16", "E": 8, "k": 2, "H": 64, "I": 32, "T": 1, "config": {"path": "grouped_mm"}, "us": 1.0}


def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(tune_main, "Timer", lambda device: None)


def test_merge_keeps_other_entries_and_where_they_came_from(tmp_path, monkeypatch):
    out = tmp_path / "FAKE_GPU.json"
    kept = KEPT
    retuned = dict(kept, E=64, k=8, H=2048, I=1024, T=16)  # OLMoE at T = 16: replaced by this run
    out.write_text(json.dumps({"schema": 1, "written_by": "second", "earlier": ["first"], "refined_by": "refine 1",
                               "entries": [kept, retuned]}))
    new = dict(retuned, us=0.5)
    fake_gpu(monkeypatch)
    monkeypatch.setattr(tune_main, "quick", lambda *a: ([new], []))
    argv = ["moe_compiler.tune", "--quick", "1", "--shapes", "olmoe", "--tokens", "16", "--out", str(out), "--merge"]
    monkeypatch.setattr(sys, "argv", argv)
    tune_main.main()
    data = json.loads(out.read_text())
    assert data["entries"] == [kept, new]
    assert data["earlier"] == ["first", "second"] and data["written_by"].endswith("--merge")
    assert data["refined_by"] == ["refine 1"]  # the entries it left were refined by it (a str before lists)


def test_refine_adds_its_command_to_the_earlier_ones(tmp_path, monkeypatch):
    out = tmp_path / "FAKE_GPU.json"
    out.write_text(json.dumps({"schema": 1, "written_by": "tune", "refined_by": ["refine 1"], "entries": [KEPT]}))
    fake_gpu(monkeypatch)
    refined = []
    monkeypatch.setattr(tune_main.search, "refine", lambda entries, *a: refined.append(entries))
    argv = ["moe_compiler.tune", "--refine", "--shapes", "olmoe", "--tokens", "16", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    tune_main.main()
    data = json.loads(out.read_text())
    assert refined == [[KEPT]] and data["written_by"] == "tune"
    assert data["refined_by"][0] == "refine 1" and "--refine --shapes olmoe" in data["refined_by"][1]


BACKWARD = {"dtype": "bfloat16", "E": 128, "k": 8, "H": 4096, "I": 1536, "T": 4096, "transposed": False,
            "dgrad": "pingpong_64x256"}


def test_backward_writes_its_entries_beside_the_forwards_and_a_forward_merge_keeps_them(tmp_path, monkeypatch):
    out = tmp_path / "FAKE_GPU.json"
    other = dict(BACKWARD, T=16384, dgrad="torch")
    out.write_text(json.dumps({"schema": 1, "written_by": "tune", "entries": [KEPT], "backward": [other],
                               "backward_by": ["first"]}))
    fake_gpu(monkeypatch)
    from moe_compiler.lowering import cutlass

    monkeypatch.setattr(cutlass, "load", lambda: None)
    measured = []
    monkeypatch.setattr(tune_main.backward, "tune", lambda shapes, tokens, dtype: measured.append(
        (shapes, tokens, dtype)) or [BACKWARD])
    argv = ["moe_compiler.tune", "--backward", "--shapes", "qwen3_235b_a22b", "--tokens", "4096", "--out", str(out),
            "--merge"]
    monkeypatch.setattr(sys, "argv", argv)
    tune_main.main()
    data = json.loads(out.read_text())
    assert measured == [([(128, 8, 4096, 1536)], [4096], torch.bfloat16)]
    assert data["entries"] == [KEPT] and data["written_by"] == "tune"  # the forward's, untouched
    assert data["backward"] == [BACKWARD, other] and data["backward_by"][0] == "first"
    assert "--backward --shapes qwen3_235b_a22b" in data["backward_by"][1]

    # a forward --merge of another shape keeps the backward's entries
    monkeypatch.setattr(tune_main, "quick", lambda *a: ([dict(KEPT, T=16)], []))
    monkeypatch.setattr(sys, "argv", ["moe_compiler.tune", "--quick", "1", "--shapes", "olmoe", "--tokens", "16",
                                      "--out", str(out), "--merge"])
    tune_main.main()
    assert json.loads(out.read_text())["backward"] == [BACKWARD, other]


def test_backward_takes_bfloat16_only(tmp_path, monkeypatch):
    fake_gpu(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["moe_compiler.tune", "--backward", "--dtype", "float16", "--shapes", "olmoe",
                                      "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="runs in bfloat16 only"):
        tune_main.main()
