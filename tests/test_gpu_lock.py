"""tests/gpu_lock.py, the lock the suite's xdist workers share one GPU by: run here in processes on the CPU,
sequenced by events (not by sleeps) so that a loaded machine cannot reorder them."""

from __future__ import annotations

import fcntl
import multiprocessing
import time

from gpu_lock import gpu_share

CTX = multiprocessing.get_context("spawn")  # no forked copy of the test process's torch state


def _hold(root, exclusive, name, log, entered, release):
    with gpu_share(root, exclusive):
        log.put((name, "in", time.monotonic()))
        entered.set()
        assert release.wait(30)
        log.put((name, "out", time.monotonic()))


class _Holder:
    def __init__(self, root, exclusive, name, log, release):
        self.entered = CTX.Event()
        self.proc = CTX.Process(target=_hold, args=(root, exclusive, name, log, self.entered, release))
        self.proc.start()


def _wait_for_gate_taken(root, seconds=20.0):
    """Until some process holds the gate (a big test waiting for the sharers to leave)."""
    deadline = time.monotonic() + seconds
    with open(root / "gpu.gate", "a") as gate:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(gate, fcntl.LOCK_UN)
            time.sleep(0.01)
    raise AssertionError("no process took the gate: the big test did not wait at it")


def _times(log, holders):
    for h in holders:
        h.proc.join(30)
        assert h.proc.exitcode == 0, h.proc
    times = {}
    while not log.empty():
        name, what, t = log.get()
        times.setdefault(name, {})[what] = t
    return times


def test_sharers_overlap_and_a_big_test_runs_alone(tmp_path):
    log, release, go = CTX.Queue(), CTX.Event(), CTX.Event()
    go.set()
    s1, s2 = (_Holder(tmp_path, False, name, log, release) for name in ("s1", "s2"))
    assert s1.entered.wait(30) and s2.entered.wait(30)  # two ordinary tests inside together
    big = _Holder(tmp_path, True, "big", log, go)
    _wait_for_gate_taken(tmp_path)
    s3 = _Holder(tmp_path, False, "s3", log, go)  # asks while big waits for s1 and s2
    time.sleep(0.5)
    assert not big.entered.is_set() and not s3.entered.is_set()
    release.set()
    t = _times(log, (s1, s2, big, s3))
    assert t["big"]["in"] >= max(t["s1"]["out"], t["s2"]["out"]), t
    assert t["s3"]["in"] >= t["big"]["out"], t  # behind big (the gate), not beside s1 and s2 ahead of it


def test_two_big_tests_never_overlap(tmp_path):
    log, release = CTX.Queue(), CTX.Event()
    a = _Holder(tmp_path, True, "a", log, release)
    assert a.entered.wait(30)
    b = _Holder(tmp_path, True, "b", log, release)
    time.sleep(0.5)
    assert not b.entered.is_set()
    release.set()
    t = _times(log, (a, b))
    assert t["b"]["in"] >= t["a"]["out"], t
