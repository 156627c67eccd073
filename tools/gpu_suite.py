"""Run the GPU tests in parts that each fit one device call, each part's results streamed to a file as they come.

    python tools/gpu_suite.py --part 1/3 [--workers 8] [--out $OUT]     # a third of the GPU tests (big_gpu apart)
    python tools/gpu_suite.py --part 1/5 --all                          # a fifth of the whole suite (big_gpu apart)
    python tools/gpu_suite.py --big [--out $OUT]                        # the big_gpu tests, one at a time
    python tools/gpu_suite.py --ids failed.txt [--out $OUT]             # these test ids (one per line)
    python tools/gpu_suite.py --part 2/3 --budget 560                   # stop after 560 s, still summarize

Why: the device machine gives a command 10 minutes, and the suite (~1400 tests; the GPU ones compile tiny models
with Inductor on a cold cache, the others compile their Triton kernels instead of interpreting them) takes longer
than that at -n 8. Session 28 lost two calls to
it: a run killed at its limit printed no summary. Here each part is a whole number of test files, dealt so the
parts hold about as many tests each. pytest runs with -v into <out>/gpu_<part>.txt line by line, so a timed-out
part still says which tests passed or failed. The last lines printed are the counts and the failed ids.
--budget stops pytest (its whole process group: the xdist workers too) after that many seconds, so the summary
still prints inside the device call's limit (session 30 lost part 2/2's summary to an outer `timeout`), and the
tests left without a result go to <out>/gpu_<part>_left.txt, ready for --ids.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# The GPU tests: those marked gpu, and those of modules that run their kernels on the GPU where there is one
# (on_device, tests/conftest.py), with the cases only CUDA has: test_triton_backward's bf16 failures of session 38 were
# such tests, which a run of the gpu marker alone never ran. --all: every test (most of the rest run as on the CPU).
ALL, GPU, BIG = "not big_gpu", "(gpu or on_device) and not big_gpu", "big_gpu"


def collect(marker: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker, "-p",
                           "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT)
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line]


def part_of(ids: list[str], index: int, parts: int) -> list[str]:
    """The test ids of files dealt to part `index` (1-based): files largest first, each to the smallest part."""
    files: dict[str, list[str]] = {}
    for test in ids:
        files.setdefault(test.split("::")[0], []).append(test)
    buckets: list[list[str]] = [[] for _ in range(parts)]
    for _, tests in sorted(files.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        min(buckets, key=len).extend(tests)
    return buckets[index - 1]


def run(ids: list[str], workers: int, log_path: str, budget: float | None = None) -> int:
    spread = ["-n", str(workers)] if workers > 1 else ["-p", "no:xdist"]
    args = [sys.executable, "-m", "pytest", *spread, "-v", "-rfE", "-p", "no:cacheprovider", "--durations=15", *ids]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                start_new_session=True)
        timer = threading.Timer(budget, _stop, (proc, log_path)) if budget else None
        if timer:
            timer.start()
        for line in proc.stdout:
            log.write(line)
            log.flush()
        rc = proc.wait()
        if timer:
            timer.cancel()
        return rc


def _stop(proc: subprocess.Popen, log_path: str) -> None:
    """The budget ran out: stop pytest and its workers (one process group), SIGKILL if SIGTERM is not enough."""
    print(f"gpu_suite: budget spent, stopping pytest ({log_path})", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def summary(log_path: str, ids: list[str]) -> str:
    """Counts, failed ids and ids without a result; the latter also written to <log>_left.txt (for --ids)."""
    text = open(log_path).read()
    # "[gw0] [ 5%] PASSED tests/a.py::t[x]" under xdist, "tests/a.py::t[x] PASSED [ 5%]" without, "FAILED
    # tests/a.py::t[x] - why" in the -rfE summary. Whole lines: parametrized ids hold spaces ("(9, 40, 24, 5, 2)").
    status = r"(PASSED|FAILED|ERROR|SKIPPED)"
    done = {test: s for s, test in re.findall(rf"^\[gw\d+\] \[ *\d+%\] {status} (tests/.+?::.+?) *$", text, re.M)}
    done.update({test: s for test, s in re.findall(rf"^(tests/.+?::.+?) {status}(?: +\[ *\d+%\])? *$", text, re.M)})
    done.update({test: s for s, test in re.findall(r"^(FAILED|ERROR) (tests/.+?::.+?)(?: - .*)? *$", text, re.M)})
    counts = {s: sum(v == s for v in done.values()) for s in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    missing = [t for t in ids if t not in done]
    left_path = os.path.splitext(log_path)[0] + "_left.txt"
    if missing:
        with open(left_path, "w") as f:
            f.write("".join(t + "\n" for t in missing))
    elif os.path.exists(left_path):
        os.remove(left_path)
    lines = [f"{len(ids)} tests: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
             + (f", {len(missing)} without a result" if missing else "")]
    lines += [f"{s} {t}" for t, s in done.items() if s in ("FAILED", "ERROR")]
    lines += [f"NO RESULT {t}" for t in missing]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--part", help="i/n: the i-th of n parts of the GPU tests (big_gpu tests apart)")
    which.add_argument("--big", action="store_true", help="the big_gpu tests, without xdist")
    which.add_argument("--ids", help="a file of test ids, one per line")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (one H200: 8 finished most)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="where the logs go (default $OUT)")
    parser.add_argument("--all", action="store_true", help="with --part: parts of the whole suite, not the GPU tests")
    parser.add_argument("--budget", type=float, help="seconds before pytest is stopped (the summary still prints)")
    a = parser.parse_args()
    if a.part:
        index, parts = (int(x) for x in a.part.split("/"))
        if not 1 <= index <= parts:
            parser.error(f"--part {a.part}: expected i/n with 1 <= i <= n")
        ids = part_of(collect(ALL if a.all else GPU), index, parts)
        name, workers = f"part{index}of{parts}" + ("_all" if a.all else ""), a.workers
    elif a.big:
        ids, name, workers = collect(BIG), "big", 1
    else:
        ids = [line.strip() for line in open(a.ids) if line.strip()]
        name, workers = os.path.splitext(os.path.basename(a.ids))[0], a.workers
    if not ids:
        sys.exit("gpu_suite: no tests selected")
    log_path = os.path.join(a.out, f"gpu_{name}.txt")
    rc = run(ids, workers, log_path, a.budget)
    print(summary(log_path, ids))
    sys.exit(rc)


if __name__ == "__main__":
    main()
