"""Does a GPU's own tuning beat a borrowed one? The experts forward at each shape and T with this GPU's
tuned config and with the nearest-T entry of another GPU's file (what lookup borrows without an own file),
same inputs, same run, alternating; whole forward under a CUDA graph from a cold L2 (timing.py).

    python benchmarks/compare_configs.py --other moe_compiler/lowering/configs/NVIDIA_H100_80GB_HBM3.json
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import Timer  # noqa: E402
from tune_experts import SHAPES, benches, forward_times  # noqa: E402

from moe_compiler.lowering import triton_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="another GPU's config file")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096, 16384])
    args = ap.parse_args()
    dtype = torch.bfloat16
    gpu = torch.cuda.get_device_name()
    own = triton_config.load_file(triton_config.gpu_file(gpu))
    other = triton_config.load_file(pathlib.Path(args.other))
    timer = Timer("cuda")
    print(f"{gpu}: own tuning vs {os.path.basename(args.other)} (µs, whole forward)")
    ratios = []
    for name, T, b in benches(args.shapes, args.tokens, dtype):
        # What lookup would pick from each file (no borrowing between them here).
        cfgs = {v: triton_config.nearest_entry(entries, dtype, b.E, b.k, b.H, b.I, T) for v, entries in (("own", own), ("other", other))}
        timer.calls = 5 if T * b.k * b.H * b.I <= 2**34 else 2
        times = forward_times(timer, b, list(cfgs.values()))
        t = {v: times[c] * 1e6 for v, c in cfgs.items()}
        ratios.append(t["other"] / t["own"])
        print(f"{name:14} T={T:6}  own {t['own']:9.1f}  other {t['other']:9.1f}  own speedup {t['other'] / t['own']:.2f}", flush=True)
        del b
    print(f"geometric mean own speedup {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f} over {len(ratios)} points")


if __name__ == "__main__":
    main()
