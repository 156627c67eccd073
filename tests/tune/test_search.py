"""The tuner (moe_compiler.tune) on a machine without a GPU: its command line, its candidate lists, its problems,
every kernel launch it times (under the Triton interpreter), and the search itself with a stub timer."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import random
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from moe_compiler.lowering import dispatch, triton_config  # noqa: E402
from moe_compiler.lowering.torch_segment_mm import GroupedMM  # noqa: E402
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig, SortedConfig  # noqa: E402
from moe_compiler.tune import search  # noqa: E402
from moe_compiler.tune.shapes import ALL_SHAPES, KINDS, ROUTINGS, SHAPES, TOKENS, routes  # noqa: E402
from moe_compiler.tune.timing import Timer, interleaved, median, wall_clock  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = (3, 8, 2, 32, 16)  # T, E, k, H, I: T*k <= E, so both paths are candidates


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_cli_help_names_the_command_and_its_options():
    r = run("-m", "moe_compiler.tune", "--help")
    assert r.returncode == 0, r.stderr
    for text in ("python -m moe_compiler.tune --shape", "--merge", "--refine", "--workers", "--log", "--out"):
        assert text in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cli_without_a_gpu_says_so():
    r = run("-m", "moe_compiler.tune", "--shapes", "--shape", "8,2,64,32", "--tokens", "1")
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr


def test_importing_the_package_leaves_the_tuner_out_and_its_shared_parts_need_no_triton():
    code = ("import sys, moe_compiler; assert 'moe_compiler.tune' not in sys.modules; "
            "import moe_compiler.tune.timing, moe_compiler.tune.shapes; assert 'triton' not in sys.modules")
    r = run("-c", code)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("k", [1, 2, 4, 8, 10])
def test_decode_candidates_are_valid_tiles_in_the_gemv_bounds(k):
    slots = triton.next_power_of_2(k)
    cands = search.decode_candidates(slots)
    assert cands and len(set(cands)) == len(cands)
    for kc in cands:
        assert isinstance(kc, KernelConfig) and 2048 <= slots * kc.block_n * kc.block_k <= 16384
        DecodeConfig(kc, kc)


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate_up", [True, False])
def test_sorted_candidates_fit_shared_memory_and_make_valid_configs(block_m, dtype, gate_up):
    itemsize = torch.finfo(dtype).bits // 8
    kcs = search.sorted_candidates(block_m, itemsize, gate_up)
    assert kcs
    width = 2 if gate_up else 1
    for kc in kcs:
        smem = (block_m * kc.block_k + kc.block_k * width * kc.block_n) * itemsize * kc.num_stages
        assert smem <= search.SMEM_BYTES
    options = search.sorted_options(block_m, itemsize, gate_up)
    assert len(options) == 2 * len(kcs) and {o.tma for o in options} == {False, True}
    assert all(isinstance(o, SortedConfig) and o.block_m == block_m for o in options)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_every_point_of_the_grid_has_candidates_and_compile_jobs(shape):
    E, k, H, I = shape
    for T in TOKENS:
        bms = search.block_m_candidates(T, k, E)
        assert bms and all(search.sorted_config(bm).block_m == bm for bm in bms)
    jobs = search.jobs_for(shape, torch.bfloat16, TOKENS)
    kinds = {kind for kind, _ in jobs}
    assert {"sorted_gate_up", "sorted_down"} <= kinds
    assert ("decode_gate_up" in kinds) == any(search.uses_decode(T, k, E) for T in TOKENS)
    assert all(callable(getattr(search.Bench, kind)) for kind in kinds)


def test_problem_on_cpu():
    T, E, k, H, I = TINY
    x, ids, w, w1, w2 = search.problem(T, E, k, H, I, torch.bfloat16, device="cpu")
    assert x.shape == (T, H) and ids.shape == (T, k) and w.shape == (T, k)
    assert w1.shape == (E, 2 * I, H) and w2.shape == (E, H, I)
    assert {t.dtype for t in (x, w, w1, w2)} == {torch.bfloat16} and ids.dtype == torch.int64
    assert all(len(set(row.tolist())) == k for row in ids) and 0 <= ids.min() and ids.max() < E
    again = search.problem(T, E, k, H, I, torch.bfloat16, device="cpu", seed=1, weights=(w1, w2))
    assert again[3] is w1 and again[4] is w2 and not torch.equal(again[0], x)
    b = search.Bench(x, ids, w, w1, w2)
    assert (b.T, b.E, b.k, b.H, b.I) == (T, E, k, H, I)


def tiny_bench():
    T, E, k, H, I = TINY
    return search.Bench(*search.problem(T, E, k, H, I, torch.float32, device=DEVICE))


def test_every_kernel_the_tuner_times_launches_and_both_paths_check_out():
    b = tiny_bench()
    small = KernelConfig(16, 32, 4, 2)
    sorted_cfg = search.sorted_config(16, gate_up=small, down=small)
    for launch in (b.decode_gate_up(small), b.decode_down(small), b.align(16), b.sorted_gate_up(sorted_cfg),
                   b.sorted_down(sorted_cfg), b.combine(16)):
        launch()
    assert search.check(b, DecodeConfig(small, small)) <= 1e-4
    assert search.check(b, sorted_cfg) <= 1e-4


class StubTimer:
    """Timer's interface with made-up times and no launches: the search's logic without a GPU."""

    def __init__(self):
        self.calls = 5
        self.rng = random.Random(0)

    def graph(self, fn, calls=10, replays=5):
        return self.rng.uniform(1e-6, 1e-5)


def test_tune_point_ranks_every_option_and_the_default_and_logs_them():
    b = tiny_bench()
    log = io.StringIO()
    t_best, cfg, parts, t_default = search.tune_point(b, StubTimer(), torch.float32, set(), log)
    rows = [json.loads(line) for line in log.getvalue().splitlines()]
    paths = {triton_config.from_dict(r["config"]).path for r in rows}
    # torch's grouped GEMM is an option wherever dispatch.select would run it: on the CPU in fp32 too, on CUDA
    # not in fp32 (torch._grouped_mm takes bf16 there)
    library = dispatch.select(b.x, b.w1, b.w2) is GroupedMM
    assert paths == {triton_config.Path.DECODE, triton_config.Path.SORTED} | (
        {triton_config.Path.GROUPED_MM} if library else set())
    assert len(rows) == 9 + 1 + library + 1  # top 3 x 3 decode pairs, one sorted block_m, grouped_mm, the default
    assert [r["us"] for r in rows] == sorted(r["us"] for r in rows)
    assert triton_config.from_dict(rows[0]["config"]) == cfg and rows[0]["us"] == pytest.approx(t_best * 1e6)
    assert sum(r["parts"].get("default", False) for r in rows) == 1 and t_default > 0
    assert all(set(r["parts"]["routings"]) == set(ROUTINGS) for r in rows)
    assert search.checked(b, cfg) <= search.MAX_ERR


def test_tune_writes_each_point_s_winner_with_its_time_under_each_routing(monkeypatch):
    T, E, k, H, I = TINY
    monkeypatch.setattr(search, "precompile", lambda *a: set())
    monkeypatch.setattr(search, "shape_benches", lambda shape, tokens, dtype: ((T, tiny_bench()) for T in tokens))
    log = io.StringIO()
    entries, table = search.tune([(E, k, H, I)], [T], torch.float32, StubTimer(), 1, log)
    (entry,) = entries
    rows = [json.loads(line) for line in log.getvalue().splitlines()]
    winner = rows[0]  # the log's rows come fastest first, by the score
    assert triton_config.from_dict(entry["config"]) == table[0][4] == triton_config.from_dict(winner["config"])
    # "us" stays the uniform routing's time, as in entries written before the two-routing score
    assert entry["us"] == pytest.approx(winner["parts"]["routings"]["uniform"] * 1e6, abs=0.01)
    assert entry["us_skewed_shuffled"] == pytest.approx(winner["parts"]["routings"]["skewed_shuffled"] * 1e6,
                                                        abs=0.01)
    assert table[0][2] == pytest.approx(winner["us"] * 1e-6)  # the score


def test_routes_are_distinct_per_token_and_skewed_routes_favour_a_few_experts():
    g = torch.Generator().manual_seed(0)
    T, E, k = 2000, 16, 4
    counts = {}
    for kind in KINDS:
        ids = routes(T, E, k, kind, g)
        assert ids.shape == (T, k) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < E
        assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts per token
        counts[kind] = torch.bincount(ids.flatten(), minlength=E)
    assert counts["uniform"].max() < 1.3 * T * k / E  # ~500 each
    skewed, shuffled = counts["skewed"], counts["skewed_shuffled"]
    assert skewed[0] > 2 * skewed[E // 2] and skewed[0] > 1.5 * T * k / E  # expert 0 the most popular
    # the same popularities, at other ids
    assert shuffled.max() > 1.5 * T * k / E and not torch.equal(shuffled.argsort(), skewed.argsort())
    assert abs(shuffled.sort().values.float() - skewed.sort().values.float()).max() < 0.1 * T * k / E
    assert set(ROUTINGS) <= set(KINDS)
    with pytest.raises(ValueError, match="expected one of"):
        routes(T, E, k, "zipf", g)


def test_rerouted_bench_shares_tokens_and_weights():
    b = tiny_bench()
    s = b.rerouted("skewed_shuffled", seed=1)
    assert s.routing == "skewed_shuffled" and b.routing == "uniform"
    assert s.x is b.x and s.w is b.w and s.w1 is b.w1 and s.w2 is b.w2 and s.ids.shape == b.ids.shape
    assert torch.equal(s.ids, b.rerouted("skewed_shuffled", seed=1).ids)


class RoutedTimer:
    """Made-up whole-forward seconds per (routing, config): Bench.forward patched to return its key."""

    calls = 3

    def __init__(self, table):
        self.table = table

    def graph(self, fn, calls=10, replays=5):
        return self.table[fn()]


def test_the_final_scores_the_geometric_mean_over_both_routings(monkeypatch):
    """A config fastest under uniform routing but slow under skew loses to one a little slower under both."""
    monkeypatch.setattr(search.Bench, "forward", lambda self, cfg: lambda: (self.routing, cfg))
    b = tiny_bench()
    table = {("uniform", "a"): 1.0, ("skewed", "a"): 2.0, ("uniform", "b"): 1.1, ("skewed", "b"): 1.2}
    score, each = search.scores(RoutedTimer(table), [b, b.rerouted("skewed")], ["a", "b"])
    assert each == {"a": {"uniform": 1.0, "skewed": 2.0}, "b": {"uniform": 1.1, "skewed": 1.2}}
    assert score["a"] == pytest.approx(2 ** 0.5) and score["b"] == pytest.approx((1.1 * 1.2) ** 0.5)
    assert min(score, key=score.get) == "b"


def test_failed_candidates_are_skipped():
    b = tiny_bench()
    cands = search.decode_candidates()
    failed = {("decode_gate_up", repr(c)) for c in cands[1:]}
    ranked = search.best_of(StubTimer(), b.decode_gate_up, cands, failed, "decode_gate_up")
    assert [c for _, c in ranked] == cands[:1]


def test_refine_touches_only_the_chosen_sorted_entries(monkeypatch):
    T, E, k, H, I = TINY
    sorted_cfg = search.sorted_config(16, gate_up=KernelConfig(16, 32), down=KernelConfig(16, 32))
    decode_cfg = DecodeConfig(KernelConfig(16, 32), KernelConfig(16, 32))
    entry = dict(dtype="float32", E=E, k=k, H=H, I=I, us=1.0)
    entries = [{**entry, "T": T, "config": triton_config.to_dict(sorted_cfg)},
               {**entry, "T": T + 1, "config": triton_config.to_dict(sorted_cfg)},
               {**entry, "T": 1, "config": triton_config.to_dict(decode_cfg)}]
    before = json.loads(json.dumps(entries))
    monkeypatch.setattr(search, "problem", functools.partial(search.problem, device=DEVICE))  # the tuner's: cuda
    search.refine(entries, torch.float32, {(E, k, H, I)}, [T, 1], StubTimer())
    assert entries[1:] == before[1:]  # a T not asked for, and a decode entry
    refined = triton_config.from_dict(entries[0]["config"])
    assert isinstance(refined, SortedConfig) and (refined.gate_up, refined.block_m) == (sorted_cfg.gate_up, 16)


def test_timer_on_cpu_and_its_helpers():
    calls = []
    assert Timer("cpu").eager(lambda: calls.append(1)) >= 0 and len(calls) == 4  # one warm-up, three timed
    assert wall_clock(lambda: calls.append(1), 5) >= 0 and len(calls) == 10
    assert median([3, 1, 2]) == 2 and median([4, 1, 3, 2]) == 3


def test_interleaved_timing_rotates_the_order_and_takes_each_body_s_median():
    order = []
    bodies = {name: (lambda name=name: order.append(name) or time.sleep(0.002 if name == "slow" else 0))
              for name in ("a", "slow", "c")}
    times = interleaved(bodies, 4)
    assert order == ["a", "slow", "c", "slow", "c", "a", "c", "a", "slow", "a", "slow", "c"]
    assert set(times) == {"a", "slow", "c"} and times["slow"] >= 0.002 > times["a"]


def test_compile_workers_fit_in_gpu_memory():
    llama = ALL_SHAPES["llama_4_scout"]
    per = search.compile_worker_bytes(llama, torch.bfloat16)
    assert per == 2 * 3 * 16 * 5120 * 8192 * 2 + (1 << 30)
    assert search.compile_workers(llama, torch.bfloat16, 14, 140 << 30) == int(0.8 * (140 << 30)) // per < 14
    assert search.compile_workers(llama, torch.bfloat16, 14, 1 << 30) == 1  # at least one
    small = (64, 8, 2048, 1024)
    assert search.compile_workers(small, torch.bfloat16, 14, 140 << 30) == 14


def test_problem_draws_weights_in_their_dtype_at_the_model_layout():
    x, ids, w, w1, w2 = search.problem(2, 4, 2, 2880, 2880, torch.bfloat16, device="cpu")
    assert w1.dtype == torch.bfloat16 and w1.shape == (4, 2880, 5760) and w1.is_contiguous()  # GPT-OSS: transposed
    assert 0.5 < float(w1.float().std() * 2880**0.5) < 1.5 and w2.shape == (4, 2880, 2880)


def test_the_fused_activation_is_timed_beside_the_fastest_cutlass_config_only(monkeypatch):
    b = tiny_bench()
    routed = [b, b.rerouted("skewed")]
    plain = [triton_config.CutlassConfig(i) for i in range(3)]
    sorted_cfg = search.sorted_config(16)
    options = [(float("inf"), cfg, {}) for cfg in [sorted_cfg, *plain]]
    forward = {sorted_cfg: 1e-5, plain[0]: 4e-5, plain[1]: 2e-5, plain[2]: 3e-5}
    each = {cfg: {"uniform": t, "skewed": 2 * t} for cfg, t in forward.items()}
    timed = []

    def rounds(timer, bench, configs, rounds=3):  # the fused one at half its base's time, in rounds of their own
        timed.append((bench.routing, list(configs)))
        return {cfg: (1.0 if cfg.act_epilogue else 2.0) for cfg in configs}

    monkeypatch.setattr(search, "forward_times", rounds)
    monkeypatch.setattr(search.cutlass, "silu_epilogue_suits", lambda *a: True)
    t, cfg, parts = search.act_epilogue_option(routed, StubTimer(), forward, each, options)
    fused = triton_config.CutlassConfig(1, act_epilogue=True)
    assert (cfg, parts) == (fused, {"cutlass": search.cutlass.CONFIGS[1] + "_act"})
    # beside the fastest plain config under each routing, not the sorted winner nor every config
    assert timed == [("uniform", [fused, plain[1]]), ("skewed", [fused, plain[1]])]
    assert forward[fused] == pytest.approx(1e-5) and forward[plain[1]] == 2e-5
    assert each[fused] == pytest.approx({"uniform": 1e-5, "skewed": 2e-5})
    # experts the epilogue does not take, or no CUTLASS option: nothing more is timed
    monkeypatch.setattr(search.cutlass, "silu_epilogue_suits", lambda *a: False)
    assert search.act_epilogue_option(routed, StubTimer(), forward, each, options) is None
    monkeypatch.setattr(search.cutlass, "silu_epilogue_suits", lambda *a: True)
    assert search.act_epilogue_option(routed, StubTimer(), forward, each, options[:1]) is None
    assert len(timed) == 2


class Countdown(StubTimer):
    """Each timing faster (`step` < 0) or slower than the one before: every variant tried wins, or none does."""

    def __init__(self, step):
        super().__init__()
        self.t, self.step = 1e-3, step

    def graph(self, fn, calls=10, replays=5):
        self.t += self.step
        return self.t


def test_fold_is_tried_per_gemm_on_tiles_it_combines_with():
    b = tiny_bench()
    plain, ws = KernelConfig(16, 32, 4, 2), KernelConfig(16, 32, 4, 2, warp_specialize=True)
    cfg = search.sorted_config(64, gate_up=plain, down=ws, programs_per_sm=1)
    folded = search.tune_fold(b, Countdown(-1e-6), cfg)
    # gate_up folds at most half a block (32 of 64 rows); the warp-specialized down GEMM is left as it was
    assert folded.gate_up.tail_m == 32 and folded.down == ws and folded.block_m == 64
    assert search.tune_fold(b, Countdown(1e-6), cfg) is None  # no fold timed faster: no option
    assert search.tune_fold(b, Countdown(-1e-6), search.sorted_config(16, gate_up=plain, down=plain)) is None
    # the folded config the final would score runs and checks out against the reference
    assert search.check(b, dataclasses.replace(folded, down=dataclasses.replace(plain, tail_m=32))) <= 1e-4
