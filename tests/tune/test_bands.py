"""python -m moe_compiler.tune --bands (tune/bands.py): which entries stand for a band, as what they run, which one
wins, and what the file keeps."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("triton")

from moe_compiler.lowering import triton_config  # noqa: E402
from moe_compiler.lowering.triton_config import CutlassConfig, DecodeConfig, KernelConfig, SortedConfig  # noqa: E402
from moe_compiler.tune import __main__ as tune_main  # noqa: E402
from moe_compiler.tune import bands  # noqa: E402
from moe_compiler.tune.shapes import ALL_SHAPES  # noqa: E402

TILE = KernelConfig(64, 64)


def _entries(shape, by_T: dict) -> list[dict]:
    E, k, H, I = shape
    return [{"dtype": "bfloat16", "E": E, "k": k, "H": H, "I": I, "T": T, "config": cfg, "us": 1.0}
            for T, cfg in by_T.items()]


def _sorted(block_m: int, tma: bool = False) -> SortedConfig:
    return SortedConfig(block_m=block_m, gate_up=TILE, down=TILE, tma=tma)


DSV3 = ALL_SHAPES["deepseek_v3"]
MIXTRAL = ALL_SHAPES["mixtral_8x7b"]


def test_lengths_group_by_band_and_a_band_needs_two():
    assert bands.lengths_by_band(bands.LENGTHS) == {(17, 256): [32, 64, 128, 256], (257, 4096): [512, 1024, 2048, 4096]}
    assert bands.lengths_by_band([4096, 512, 16384]) == {(257, 4096): [512, 4096]}


def test_the_band_s_entries_stand_as_a_graph_runs_them_and_today_s_is_its_point_s(monkeypatch):
    """DeepSeek-V3's table: decode at 1, sorted at 512 and 1024, CUTLASS at 4096, grouped_mm at 16384 (outside the
    band). Its TMA at the band's point is 7.2e11 GEMM FLOP: kept (descriptors built on the device), as the graph
    runs it."""
    table = {1: DecodeConfig(TILE, TILE), 512: _sorted(32, tma=True), 1024: _sorted(64), 4096: CutlassConfig(1),
             16384: triton_config.GroupedMMConfig()}
    cands, today, eligible = bands.candidates(_entries(DSV3, table), torch.bfloat16, *DSV3, (257, 4096))
    assert cands == {"512 sorted": _sorted(32, tma=True), "1024 sorted": _sorted(64), "4096 cutlass": CutlassConfig(1)}
    assert today == "1024 sorted" and eligible == set(cands)
    # Qwen3-30B-A3B's is 7.7e10: a traced call of the band loads by pointer, with recorded TMA on or off
    qwen = ALL_SHAPES["qwen3_30b_a3b"]
    for recorded in ("1", "0"):
        monkeypatch.setenv("MOE_COMPILER_RECORDED_TMA", recorded)
        cands, today, _ = bands.candidates(_entries(qwen, {1024: _sorted(64, tma=True)}), torch.bfloat16, *qwen,
                                           (257, 4096))
        assert cands == {"1024 sorted": _sorted(64, tma=False)} and today == "1024 sorted"


def test_today_s_config_is_timed_beside_the_band_s_entries_even_where_it_may_not_be_chosen():
    """A table of entries at 128 (outside the band) and 4096 (grouped_mm): the band's point 1024 takes the nearer,
    grouped_mm, today; it is timed (as the yardstick) but may not be chosen, and nothing else of the band may."""
    table = {128: _sorted(16), 4096: triton_config.GroupedMMConfig()}
    cands, today, eligible = bands.candidates(_entries(MIXTRAL, table), torch.bfloat16, *MIXTRAL, (257, 4096))
    assert today == "4096 grouped_mm (today)" and cands[today] == triton_config.GroupedMMConfig()
    assert eligible == set()  # nothing of the band's own may stand for it: grouped_mm stays opaque in a graph


def test_the_best_geometric_mean_wins_where_it_beats_today_s_by_the_margin():
    times = {"1024 sorted": [5.4, 5.4, 7.7, 12.1], "4096 cutlass": [5.5, 5.7, 6.0, 7.0],
             "512 sorted": [5.1, 6.6, 10.0, 17.0]}
    label, gain = bands.choose(times, "1024 sorted", set(times))
    assert label == "4096 cutlass" and gain == pytest.approx(1.19, abs=0.01)
    near = {"1024 sorted": [1.0, 1.0], "4096 sorted": [0.99, 0.98]}  # 1.5%: noise, not a reason to change
    assert bands.choose(near, "1024 sorted", set(near)) is None
    # the fastest of all is not eligible: it still sets each length's best, and the eligible runner-up must beat today
    ineligible = {"today": [2.0, 2.0], "grouped_mm": [1.0, 1.0], "4096 sorted": [1.5, 1.5]}
    assert bands.choose(ineligible, "today", {"4096 sorted"}) == ("4096 sorted", pytest.approx(4 / 3))


def test_tune_bands_rewrites_the_measured_bands_and_keeps_the_others_with_merge(tmp_path, monkeypatch):
    out = tmp_path / "FAKE_GPU.json"
    E, k, H, I = DSV3
    entry = {"dtype": "bfloat16", "E": E, "k": k, "H": H, "I": I, "T": 1024, "us": 1.0,
             "config": triton_config.to_dict(_sorted(64))}
    band = {"dtype": "bfloat16", "E": E, "k": k, "H": H, "I": I, "config": triton_config.to_dict(_sorted(64))}
    stale = dict(band, band=[257, 4096], T=512)  # measured again now: replaced by what this run finds
    other = dict(band, band=[17, 256], T=64)  # a band this run does not measure
    out.write_text(json.dumps({"schema": 1, "entries": [entry], "bands": [stale, other]}))
    new = dict(band, band=[257, 4096], config=triton_config.to_dict(CutlassConfig(0)), T=4096)
    seen = {}

    def measure(names, tokens, dtype, timer, entries, command):
        seen.update(names=names, tokens=tokens, entries=[e["config"] for e in entries])
        return [new], []

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(tune_main, "Timer", lambda device: None)
    monkeypatch.setattr(bands, "measure", measure)
    for merge, kept in (([], []), (["--merge"], [other])):
        out.write_text(json.dumps({"schema": 1, "entries": [entry], "bands": [stale, other]}))
        argv = ["moe_compiler.tune", "--bands", "--shapes", "deepseek_v3", "--tokens", "512", "4096", "--out", str(out)]
        monkeypatch.setattr(sys, "argv", argv + merge)
        tune_main.main()
        data = json.loads(out.read_text())
        assert data["entries"] == [entry] and data["bands"] == kept + [new]
        assert seen == {"names": ["deepseek_v3"], "tokens": [512, 4096], "entries": [_sorted(64)]}
        found = triton_config.load_bands(out)
        assert found[-1]["band"] == (257, 4096) and found[-1]["config"] == CutlassConfig(0)
