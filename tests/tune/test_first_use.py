"""Autotune on first use (tune/first_use.py) and the lookup that asks for it (lowering/triton_config.py,
lowering/dispatch.py): on CPU with a stub timer and a stub clock; on the GPU, a second process reuses the cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from moe_compiler.lowering import cutlass, device, dispatch, triton_config  # noqa: E402
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig, Path  # noqa: E402
from moe_compiler.tune import first_use  # noqa: E402

GPU, CAP = "NVIDIA H200", (9, 0)
UNTUNED = (torch.bfloat16, 16, 2, 256, 128)  # dtype, E, k, H, I: in no committed table


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(first_use.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(triton_config.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(device, "capturing", lambda: False)
    dispatch._CONFIGS.clear()
    triton_config._warned.clear()  # each test sees its own once-per-shape warning
    yield
    dispatch._CONFIGS.clear()


class Stub:
    """A measure factory: config i of the candidate list takes times[i] seconds (default: 1 / (i + 1), so the
    last timed is the fastest), with an error per config; records what it was asked."""

    def __init__(self, times=None, errors=None, fail=()):
        self.times, self.errors, self.fail = times, errors or {}, set(fail)
        self.order, self.calls = [], 0

    def __call__(self, dtype, E, k, H, I, T):
        self.calls += 1

        def measure(cfg):
            self.order.append(cfg)
            i = len(self.order) - 1
            if i in self.fail:
                raise RuntimeError("out of resources")
            return self.times[i] if self.times else 1.0 / (i + 1)

        return measure, lambda cfg: self.errors.get(self.order.index(cfg), 1e-3)


def test_bucket_is_the_nearest_grid_point():
    assert [triton_config.bucket(T) for T in (1, 2, 3, 5, 32, 100, 5000, 10**6)] == [1, 1, 4, 4, 16, 128, 4096, 16384]
    # between 1024 and 4096 the grid has 2048 (ties to the smaller: sqrt(2) x 1024 = 1448.2)
    assert [triton_config.bucket(T) for T in (1448, 1449, 2048, 2896, 2897)] == [1024, 2048, 2048, 2048, 4096]


def test_choose_stops_at_the_budget_and_skips_failures():
    clock = iter([0.0, 10.0, 20.0, 70.0, 80.0]).__next__  # start, then one reading before each config
    configs = ["a", "b", "c", "d"]
    times = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}

    def measure(cfg):
        if cfg == "b":
            raise RuntimeError("no")
        return times[cfg]

    best, timed = first_use.choose(configs, measure, budget_s=60.0, clock=clock)
    assert timed == {"a": 3.0, "c": 1.0}  # "b" failed, "d" came after the budget (70 s > 60 s)
    assert best == "c"


def test_choose_times_the_first_even_past_the_budget():
    best, timed = first_use.choose(["a", "b"], lambda c: 1.0, budget_s=0.0, clock=iter([0.0, 5.0, 9.0]).__next__)
    assert timed == {"a": 1.0} and best == "a"


def test_candidates_default_first_distinct_and_suited_to_T():
    dtype, E, k, H, I = UNTUNED
    decode = first_use.candidates(GPU, CAP, dtype, E, k, H, I, 1)
    assert decode[0] == triton_config.default_config(dtype, E, k, H, I, 1)
    assert len(decode) == len(set(decode)) <= first_use.MAX_CANDIDATES
    assert any(c.path is Path.DECODE for c in decode[1:])
    prefill = first_use.candidates(GPU, CAP, dtype, E, k, H, I, 4096)  # T*k > E: no decode candidate
    # the default, torch's grouped GEMM (bf16 on sm90), then tuned sorted tiles
    assert prefill[1] == triton_config.GroupedMMConfig()
    assert len(prefill) > 2 and all(c.path is Path.SORTED for c in prefill[:1] + prefill[2:])
    assert {c.block_m for c in prefill[2:]} <= {64, 128}  # block_m_candidates(4096 * 2 / 16 = 512 rows per expert)
    # torch._grouped_mm takes bf16 on sm90+ only: not a candidate for fp16 or on an A100
    assert triton_config.GroupedMMConfig() not in first_use.candidates(GPU, CAP, torch.float16, E, k, H, I, 4096)
    assert triton_config.GroupedMMConfig() not in first_use.candidates("NVIDIA A100", (8, 0), dtype, E, k, H, I, 4096)


def test_cutlass_candidates_follow_the_nearest_tuned_entry(monkeypatch):
    """With csrc/ loaded, its configs are candidates after the default, torch's grouped GEMM and the nearest
    committed Triton winner (a budget spent on the CUTLASS configs still times that one)."""
    dtype, E, k, H, I = UNTUNED
    monkeypatch.setattr(first_use, "cutlass_applies", lambda *a: True)
    got = first_use.candidates(GPU, CAP, dtype, E, k, H, I, 4096)
    n = len(cutlass.CONFIGS)
    assert got[2].path is Path.SORTED
    assert got[3:3 + n] == [triton_config.CutlassConfig(i) for i in range(n)]
    assert all(c.path is Path.SORTED for c in got[3 + n:]) and len(got) == len(set(got))
    assert first_use.candidates(GPU, CAP, dtype, E, k, H, I, 1).count(triton_config.CutlassConfig(0)) == 0


def test_first_use_tunes_caches_and_logs_once(caplog):
    dtype, E, k, H, I = UNTUNED
    stub = Stub()
    with caplog.at_level(logging.WARNING, logger="moe_compiler.autotune"):
        cfg = first_use.config_for(GPU, CAP, dtype, E, k, H, I, 16, measure_factory=stub)
    assert cfg == stub.order[-1]  # the stub makes the last timed config the fastest
    lines = [r.getMessage() for r in caplog.records if "autotuned" in r.getMessage()]
    assert len(lines) == 1 and "E=16 k=2 H=256 I=128 T=16" in lines[0]
    path = first_use.cache_file(GPU)
    assert path.parent.parent == first_use.cache_dir() and first_use.source_hash() in path.name
    (entry,) = triton_config.load_file(path)
    assert entry["config"] == cfg and (entry["E"], entry["T"]) == (16, 16)
    # a second lookup (a second process reads the same file) tunes nothing
    again = Stub()
    assert first_use.config_for(GPU, CAP, dtype, E, k, H, I, 16, measure_factory=again) == cfg
    assert again.calls == 0


def test_a_wrong_winner_is_skipped():
    dtype, E, k, H, I = UNTUNED
    stub = Stub(times=[3.0, 1.0, 2.0], errors={1: 0.5})  # the fastest (index 1) is wrong
    first_use.MAX_CANDIDATES, saved = 3, first_use.MAX_CANDIDATES
    try:
        cfg = first_use.config_for(GPU, CAP, dtype, E, k, H, I, 16, measure_factory=stub)
    finally:
        first_use.MAX_CANDIDATES = saved
    assert cfg == stub.order[2]


def test_no_tuning_inside_a_capture(monkeypatch):
    monkeypatch.setattr(device, "capturing", lambda: True)
    stub = Stub()
    assert first_use.config_for(GPU, CAP, *UNTUNED, 16, measure_factory=stub) is None
    assert stub.calls == 0


def test_a_failed_tuning_falls_back_with_a_warning(caplog):
    stub = Stub(fail=range(100))
    with caplog.at_level(logging.WARNING, logger="moe_compiler.autotune"):
        assert first_use.config_for(GPU, CAP, *UNTUNED, 16, measure_factory=stub) is None
    assert "failed" in caplog.text and not first_use.cache_file(GPU).exists()


def test_store_replaces_the_entry_of_the_same_key():
    dtype, E, k, H, I = UNTUNED
    a = DecodeConfig(KernelConfig(8, 128), KernelConfig(8, 128))
    b = DecodeConfig(KernelConfig(16, 128), KernelConfig(16, 128))
    first_use.store(GPU, CAP, dtype, E, k, H, I, 1, a, 5.0)
    first_use.store(GPU, CAP, dtype, E, k, H, I, 4, a, 6.0)
    first_use.store(GPU, CAP, dtype, E, k, H, I, 1, b, 4.0)
    entries = triton_config.load_file(first_use.cache_file(GPU))
    assert sorted((e["T"], e["config"] == b) for e in entries) == [(1, True), (4, False)]
    assert json.loads(first_use.cache_file(GPU).read_text())["written_by"] == "moe_compiler autotune"


def test_quick_tuner_writes_table_entries_of_each_point(monkeypatch):
    """`python -m moe_compiler.tune --quick`: each (shape, T) point's pruned-search winner becomes a committed-
    table entry; a point without a correct candidate is left out, said on stdout."""
    from moe_compiler.tune import __main__ as cli

    winner = DecodeConfig(KernelConfig(8, 128), KernelConfig(8, 128))
    found = {1: (winner, 2e-6, 3e-6), 16: None}
    monkeypatch.setattr(first_use, "tune_point", lambda gpu, cap, dtype, E, k, H, I, T, budget_s: found[T])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: CAP)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    entries, table = cli.quick([(16, 2, 256, 128)], [1, 16], torch.bfloat16, GPU, 30.0)
    assert entries == [{"dtype": "bfloat16", "E": 16, "k": 2, "H": 256, "I": 128, "T": 1,
                        "config": triton_config.to_dict(winner), "us": 2.0}]
    assert [(row[1], row[4]) for row in table] == [(1, winner)]


# --- the lookup asking for it ---------------------------------------------------------------------------

@pytest.fixture
def on_h200(monkeypatch):
    monkeypatch.setattr(device, "gpu_name", lambda index: GPU)
    monkeypatch.setattr(device, "capability", lambda index: CAP)
    monkeypatch.setattr(device, "index", lambda t: 0)
    asked = []
    tuned = DecodeConfig(KernelConfig(4, 256), KernelConfig(4, 256))

    def config_for(gpu, cap, dtype, E, k, H, I, T):
        asked.append((E, T))
        return tuned

    monkeypatch.setattr(first_use, "config_for", config_for)
    return asked, tuned


def _lookup(dtype, E, k, H, I, T):
    hidden = torch.empty(T, H, dtype=dtype)
    return dispatch.triton_config_for(hidden, torch.empty(T, k, dtype=torch.long), torch.empty(E, 2 * I, H), I)


def test_lookup_autotunes_an_untuned_bucket_once(on_h200):
    asked, tuned = on_h200
    dtype, E, k, H, I = UNTUNED
    assert _lookup(dtype, E, k, H, I, 3) is tuned  # T=3 -> bucket 4
    assert _lookup(dtype, E, k, H, I, 3) is tuned
    assert asked == [(16, 4)]  # asked once (then the per-process cache), for the bucket


def test_lookup_takes_the_committed_entry_without_tuning(on_h200):
    asked, _ = on_h200
    committed = triton_config.lookup(GPU, CAP, torch.bfloat16, 128, 8, 2048, 768, 16)
    assert _lookup(torch.bfloat16, 128, 8, 2048, 768, 16) == committed
    assert asked == []


def test_switched_off_lookup_warns_and_uses_defaults(on_h200, monkeypatch):
    asked, _ = on_h200
    monkeypatch.setenv(triton_config.AUTOTUNE_ENV, "0")
    dtype, E, k, H, I = UNTUNED
    with pytest.warns(UserWarning, match="untuned defaults"):
        cfg = _lookup(dtype, E, k, H, I, 16)
    assert cfg == triton_config.default_config(dtype, E, k, H, I, 16) and asked == []
    with triton_config.autotune_option(True):  # the backend option wins over the environment
        assert triton_config.autotune_enabled()


def test_a_lookup_declined_inside_a_capture_is_not_kept(on_h200, monkeypatch):
    asked, tuned = on_h200
    monkeypatch.setattr(first_use, "config_for", lambda *a: asked.append(a) or None)
    monkeypatch.setattr(device, "capturing", lambda: True)
    dtype, E, k, H, I = UNTUNED
    with pytest.warns(UserWarning):
        _lookup(dtype, E, k, H, I, 16)
    assert not dispatch._CONFIGS  # the next call, outside the capture, asks again
    monkeypatch.setattr(device, "capturing", lambda: False)
    _lookup(dtype, E, k, H, I, 16)
    assert len(asked) == 2 and dispatch._CONFIGS


def test_bad_switch_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(triton_config.AUTOTUNE_ENV, "off")
    with pytest.raises(ValueError, match="MOE_COMPILER_AUTOTUNE='off': expected '1'"):
        triton_config.autotune_enabled()


# --- GPU: a second process reuses the cache ------------------------------------------------------------------

@pytest.mark.gpu
def test_second_process_reuses_the_cache(tmp_path):
    code = textwrap.dedent("""
        import logging, time, torch
        logging.basicConfig(level=logging.WARNING)
        from moe_compiler.ops.experts import moe_experts
        from moe_compiler.testing import cuda_experts_inputs, experts_reference_by_expert, rel_err
        x, ids, w, w1, w2 = cuda_experts_inputs(16, 16, 2, 256, 128)
        t0 = time.monotonic()
        out = moe_experts(x, ids, w, w1, w2)
        torch.cuda.synchronize()
        ref = experts_reference_by_expert(x, ids, w, w1, w2, dtype=torch.float32)
        print("SECONDS", time.monotonic() - t0, "ERR", rel_err(out, ref))
    """)
    env = {**os.environ, first_use.CACHE_ENV: str(tmp_path), triton_config.AUTOTUNE_ENV: "1"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
        assert float(r.stdout.split("ERR")[1]) <= 1e-2
    assert "autotuned bfloat16 experts E=16 k=2 H=256 I=128 T=16" in runs[0].stderr
    assert "autotuned" not in runs[1].stderr  # read from the cache
    assert list(tmp_path.glob("autotune/*.json"))


@pytest.mark.gpu
def test_compiled_call_tunes_at_compile_time_and_matches_eager(tmp_path):
    """Under torch.compile the op's launches are recorded while AOTAutograd traces, and the config lookup of an
    untuned shape tunes there (first_use.py: "When"): the compile tunes once, the compiled call equals the
    eager op, a recompile in the same process reads the tuned entry without tuning again."""
    code = textwrap.dedent("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from moe_compiler.ops.experts import moe_experts
        from moe_compiler.testing import cuda_experts_inputs
        x, ids, w, w1, w2 = cuda_experts_inputs(16, 16, 2, 256, 128)
        layer = lambda x, i, w: moe_experts(x, i, w, w1, w2) * 2.0
        out = torch.compile(layer, dynamic=False)(x, ids, w)
        torch._dynamo.reset()
        again = torch.compile(layer, dynamic=False)(x, ids, w)
        print("EQUAL", torch.equal(out, layer(x, ids, w)), torch.equal(again, out))
    """)
    env = {**os.environ, first_use.CACHE_ENV: str(tmp_path), triton_config.AUTOTUNE_ENV: "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "EQUAL True True" in r.stdout
    assert r.stderr.count("autotuned bfloat16 experts E=16 k=2 H=256 I=128 T=16") == 1, r.stderr[-3000:]


def test_autotune_is_on_unless_switched_off(monkeypatch):
    monkeypatch.delenv(triton_config.AUTOTUNE_ENV, raising=False)  # (the suite's conftest sets it to 0)
    assert triton_config.autotune_enabled()
    from moe_compiler.config import MoECompilerConfig

    assert MoECompilerConfig.from_options({}).autotune
    monkeypatch.setenv(triton_config.AUTOTUNE_ENV, "0")
    assert not triton_config.autotune_enabled() and not MoECompilerConfig.from_options({}).autotune
