"""bench_experts' results table: a run of some points replaces those cells' rows whole (one run per row)."""

from benchmarks.bench_experts import merged


def _row(shape, T, routing, us):
    return {"shape": shape, "T": T, "routing": routing, "times_s": {"moe_compiler": us}}


def test_a_partial_run_replaces_its_cells_and_keeps_the_others_in_place():
    earlier = [_row("a", 1, "uniform", 1), _row("a", 1, "skewed", 2), _row("b", 16, "uniform", 3)]
    got = merged(earlier, [_row("a", 1, "skewed", 9), _row("c", 1, "uniform", 4)])
    assert [(r["shape"], r["routing"], r["times_s"]["moe_compiler"]) for r in got] == [
        ("a", "uniform", 1), ("a", "skewed", 9), ("b", "uniform", 3), ("c", "uniform", 4)]


def test_a_jsonl_appended_by_two_runs_keeps_each_cell_s_last_row():
    got = merged([], [_row("a", 1, "uniform", 1), _row("a", 1, "uniform", 5)])
    assert got == [_row("a", 1, "uniform", 5)]
