"""Does a GPU's own tuning beat a borrowed one? The experts forward at each shape and T with this GPU's
tuned config and with the nearest-T entry of another GPU's file (what lookup borrows without an own file),
same inputs, same run, alternating; whole forward under a CUDA graph from a cold L2
(moe_compiler/tune/timing.py). NOTES.md: "H200 configs". Also a table against its own earlier version
(`git show REV:moe_compiler/lowering/configs/NVIDIA_H200.json > old.json; --other old.json`), under the routings the
tuner's final scores (tune.shapes.ROUTINGS: uniform, skewed_shuffled) or any of tune.shapes.KINDS.

    python -m benchmarks.probes.compare_configs --other moe_compiler/lowering/configs/NVIDIA_H100_80GB_HBM3.json
                                                [--routing uniform skewed]   # default: the tuner's routings
"""

from __future__ import annotations

import os
import pathlib

import torch

from moe_compiler.lowering import triton_config
from moe_compiler.tune.search import benches, forward_times, graph_calls
from moe_compiler.tune.shapes import ALL_SHAPES, KINDS, ROUTINGS, SHAPES

from .. import harness


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[1, 16, 128, 1024, 4096, 16384])
    ap.set_defaults(shapes=list(SHAPES))
    ap.add_argument("--other", required=True, help="another GPU's config file")
    ap.add_argument("--routing", nargs="+", choices=list(KINDS), default=list(ROUTINGS))
    args = ap.parse_args()
    dtype = torch.bfloat16
    gpu = harness.gpu_name()
    own = triton_config.load_file(triton_config.gpu_file(gpu))
    other = triton_config.load_file(pathlib.Path(args.other))
    timer = harness.Timer("cuda")
    print(f"{gpu}: own tuning vs {os.path.basename(args.other)} (µs, whole forward)")
    ratios = []
    for name, T, b in benches(args.shapes, args.tokens, dtype):
        # What lookup would pick from each file (no borrowing between them here).
        cfgs = {v: triton_config.nearest_entry(entries, dtype, b.E, b.k, b.H, b.I, T)
                for v, entries in (("own", own), ("other", other))}
        timer.calls = graph_calls(T, b.k, b.H, b.I)
        for kind in args.routing:
            routed = b if kind == b.routing else b.rerouted(kind, seed=T)  # the same tokens and weights
            times = forward_times(timer, routed, list(cfgs.values()))
            t = {v: times[c] * 1e6 for v, c in cfgs.items()}
            ratios.append(t["other"] / t["own"])
            print(f"{name:14} T={T:6} {kind:8} own {t['own']:9.1f}  other {t['other']:9.1f}  "
                  f"own speedup {t['other'] / t['own']:.2f}", flush=True)
        del b, routed  # (the shape's weights are freed after its last T only without these)
    print(f"geometric mean own speedup {harness.geomean(ratios):.3f} over {len(ratios)} points")


if __name__ == "__main__":
    main()
