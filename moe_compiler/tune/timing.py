"""Timing shared by the tuner and the benchmarks: medians of CUDA-event-timed calls from a cold L2.

Every timed call is preceded by reading a 256 MB buffer (larger than the H100's 50 MB and the H200's 60
MB L2), whose own time is measured the same way and subtracted, so weights of small-T points are really
read from HBM as they are in a model (where other layers' weights evict them between calls). The flush
reads rather than writes: a written buffer leaves the L2 full of dirty lines, and writing those back
would be charged to the timed call (`Timer(dirty_flush=True)` keeps the writing flush, to compare).
"""

from __future__ import annotations

import time

import torch


def median(xs):
    """The middle value (the upper one of an even count): robust to the odd slow repetition."""
    return sorted(xs)[len(xs) // 2]


def wall_clock(fn, reps: int) -> float:
    """Median wall seconds of `reps` calls after one warm-up (CPU: no device events needed)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def events(body, n: int) -> float:
    """Median seconds of n calls of body, each between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record()
        body()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return median(times)


def interleaved(bodies: dict, n: int, clock=None) -> dict:
    """{name: median seconds} of n rounds in which every body is called once, the order rotated each round: drift
    of the host or the GPU (clocks, another tenant, the allocator) lands on every body alike, where timing one body
    after the other lets it decide their ratio. `clock(body)`: seconds of one call (default: CUDA events around it
    on the GPU, else the wall clock)."""
    if clock is None:
        clock = (lambda body: events(body, 1)) if torch.cuda.is_available() else _wall_once
    names = list(bodies)
    times = {name: [] for name in names}
    for r in range(n):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(clock(bodies[name]))
    return {name: median(ts) for name, ts in times.items()}


def _wall_once(body) -> float:
    t0 = time.perf_counter()
    body()
    return time.perf_counter() - t0


class Timer:
    """Median seconds per call: CUDA events around eager loops or graph replays of [flush L2, call]
    minus [flush L2]. CPU (smoke runs): wall clock."""

    def __init__(self, device, reps=10, dirty_flush=False):
        self.device, self.reps, self.dirty_flush = device, reps, dirty_flush
        self.flush_buf = torch.ones(64 << 20, dtype=torch.int32, device=device) if device == "cuda" else None
        self.calls = 5  # calls per captured graph (the tuner lowers it for long calls)

    def flush(self):
        if self.dirty_flush:
            return self.flush_buf.zero_()
        return self.flush_buf.sum()  # reads 256 MB, writes one scalar

    def eager(self, fn):
        if self.device != "cuda":
            return wall_clock(fn, 3)
        fn()
        torch.cuda.synchronize()
        flush = self.flush
        t_both = events(lambda: (flush(), fn()), self.reps)
        t_flush = events(flush, self.reps)
        return max(t_both - t_flush, 0.0)

    def graph(self, fn, calls=10, replays=5):
        """Per-call time of fn captured `calls` times in one CUDA graph (launch gaps as in a captured model)."""
        fn()
        torch.cuda.synchronize()
        g_both, g_flush = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_both):
            for _ in range(calls):
                self.flush()
                fn()
        with torch.cuda.graph(g_flush):
            for _ in range(calls):
                self.flush()
        g_both.replay()
        g_flush.replay()
        torch.cuda.synchronize()
        t_both = events(g_both.replay, replays)
        t_flush = events(g_flush.replay, replays)
        return max(t_both - t_flush, 0.0) / calls
