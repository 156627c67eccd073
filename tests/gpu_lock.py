"""One GPU shared by pytest-xdist workers: a big_gpu test (tens of GB of real-model weights) runs alone, every other
test runs beside others. A readers-writer lock over two files in the run's shared temporary directory (fcntl:
released if a worker dies):

    shared     gate EX -> lock SH -> gate UN ... lock UN
    exclusive  gate EX -> lock EX -> gate UN ... lock UN

The gate is held by an exclusive taker while it waits for the sharers to leave, so no new sharer slips in meanwhile
(a bare flock readers-writer lock lets a stream of sharers starve the writer: with 7 other workers there is always
one inside). Both orders take gate before lock and hold gate only while waiting for lock: no deadlock.

Before the lock: the old big_gpu-only lock ordered big tests among themselves, and a 60 GB test then met another
worker's 17 GB model-shape test and ran out of memory (session 42, tests/lowering/test_triton_backward.py at -n 8).
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


@contextlib.contextmanager
def gpu_share(root: Path, exclusive: bool):
    """Hold the GPU with others (exclusive=False) or alone (True) while the block runs."""
    with open(root / "gpu.gate", "w") as gate, open(root / "gpu.lock", "w") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
