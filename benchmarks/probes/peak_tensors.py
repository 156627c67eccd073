"""Which tensors make a step's memory peak? Reads the allocator histories that
`python -m benchmarks.bench_models --parts train --memory-snapshots DIR` writes (one step each, Python stacks),
replays each one's allocations and frees, and prints at the peak: the bytes allocated, and the live tensors that
the step itself allocated, largest first, each named by the frame that asked for it (the first frame outside
torch's own files: a line of the model, of moe_compiler, or of Inductor's generated code). Runs on the CPU.

    python -m benchmarks.probes.peak_tensors DIR/*.pickle [--top 25]

Two snapshots of one point (inductor vs fused_train) side by side say where the difference in peak lies.
"""

from __future__ import annotations

import argparse
import collections
import pickle

# Frames from these files are torch's machinery, not the line that wanted the memory; Inductor's generated code
# lives outside them (its cache directory), so it stays a frame worth naming.
_MACHINERY = ("/torch/", "/site-packages/triton/", "<frozen", "/contextlib.py", "/functools.py")


def site(frames: list[dict]) -> str:
    """The innermost frame outside torch's machinery, as file:line(function), else the innermost frame."""
    for f in frames:
        if not any(m in f["filename"] for m in _MACHINERY):
            return f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']}({f['name']})"
    return f"{frames[0]['filename'].rsplit('/', 1)[-1]}:{frames[0]['line']}({frames[0]['name']})" if frames else "?"


def at_peak(snapshot: dict, device: int = 0) -> tuple[int, int, list[tuple[int, str]]]:
    """(bytes allocated at the peak, at the start of the history, [(bytes, site)] of the history's own allocations
    live at the peak). The start is the allocator's state at the dump less the history's net change: blocks
    allocated before the history began (parameters) and freed during it count against it."""
    live: dict[int, tuple[int, str]] = {}
    delta = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for e in snapshot["device_traces"][device]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], site(e.get("frames", [])))
            delta += e["size"]
            if delta > peak:
                peak, peak_live = delta, dict(live)
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
            delta -= e["size"]
    end = sum(b["size"] for seg in snapshot["segments"] if seg.get("device", device) == device
              for b in seg["blocks"] if b["state"] == "active_allocated")
    start = end - delta
    return start + peak, start, sorted(peak_live.values(), reverse=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshots", nargs="+")
    ap.add_argument("--top", type=int, default=25, help="sites listed per snapshot")
    args = ap.parse_args()
    for path in args.snapshots:
        with open(path, "rb") as f:
            peak, start, tensors = at_peak(pickle.load(f))
        by_site = collections.defaultdict(lambda: [0, 0])
        for size, where in tensors:
            by_site[where][0] += size
            by_site[where][1] += 1
        print(f"{path}: peak {peak / 2**30:.3f} GiB = {start / 2**30:.3f} before the step "
              f"+ {sum(s for s, _ in tensors) / 2**30:.3f} allocated by it and live at the peak")
        for where, (size, n) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {size / 2**20:10.1f} MiB  x{n:<4d} {where}")


if __name__ == "__main__":
    main()
