"""Probe: does autotune on first use land within 1.1x of the full search? (issue 16's check: "a shape never seen
before, autotuned on first use, lands within 1.1x of the committed table's time for that shape")

    python -m benchmarks.probes.probe_autotune [--shapes qwen3_30b_a3b mixtral_8x7b deepseek_v3] [--tokens 16 1024 4096]
                                               [--budget 60]

For each fully tuned shape of this GPU's committed table (the full `python -m moe_compiler.tune` search) and each
T: every entry of that shape is hidden from every table (a shape never seen before: its own winners are not
candidates), the pruned search of autotune on first use runs as it would in a user's process
(tune.first_use.tune_point, its budget), then the committed config and the found one are timed in alternating
rounds in the same process (whole forward, CUDA graph, cold L2; median of the rounds). Ratio = found / committed:
<= 1.1 meets the target. Also: the search's wall time, and the untuned default's time.
"""

from __future__ import annotations

import os
import time

import torch

from moe_compiler.lowering import device, triton_config
from moe_compiler.tune import first_use
from moe_compiler.tune.shapes import SHAPES

from .. import harness


def hidden(shape: tuple, load=triton_config.load_file):
    """load_file without any entry of `shape` = (dtype name, E, k, H, I)."""

    def load_file(path):
        return [e for e in load(path) if (e["dtype"], e["E"], e["k"], e["H"], e["I"]) != shape]

    return load_file


def main():
    ap = harness.parser(__doc__, shapes=SHAPES, tokens=[16, 1024, 4096])
    ap.add_argument("--budget", type=float, default=first_use.BUDGET_S, help="seconds per point (autotune's own)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    gpu = harness.gpu_name()
    capability = device.capability(torch.cuda.current_device())
    dtype = torch.bfloat16
    rows = []
    for name in args.shapes:
        E, k, H, I = SHAPES[name]
        for T in args.tokens:
            committed = triton_config.lookup(gpu, capability, dtype, E, k, H, I, T)
            key = (str(dtype).removeprefix("torch."), E, k, H, I)
            triton_config.load_file, real_load = hidden(key), triton_config.load_file
            try:
                t0 = time.monotonic()
                found = first_use.tune_point(gpu, capability, dtype, E, k, H, I, T, budget_s=args.budget)
                search_s = time.monotonic() - t0
            finally:
                triton_config.load_file = real_load
            if found is None:
                print(f"{name} T={T}: no correct candidate found (or does not fit)", flush=True)
                continue
            best, _, default_s = found
            measure, _ = first_use._measure_on_gpu(dtype, E, k, H, I, T)
            t_committed, t_found = [], []
            for _ in range(args.rounds):
                t_committed.append(measure(committed))
                t_found.append(measure(best))
            row = {"shape": name, "T": T, "committed_us": harness.median(t_committed) * 1e6,
                   "found_us": harness.median(t_found) * 1e6, "default_us": default_s * 1e6,
                   "search_s": search_s, "same_config": best == committed, "found": str(best)}
            row["ratio"] = row["found_us"] / row["committed_us"]
            print(row, flush=True)
            rows.append(row)
    print(f"\n{'shape':>16} {'T':>6} {'committed us':>13} {'found us':>9} {'ratio':>6} {'default us':>11} "
          f"{'search s':>9}")
    for r in rows:
        print(f"{r['shape']:>16} {r['T']:>6} {r['committed_us']:>13.1f} {r['found_us']:>9.1f} {r['ratio']:>6.3f} "
              f"{r['default_us']:>11.1f} {r['search_s']:>9.0f}")
    if rows:
        ratios = [r["ratio"] for r in rows]
        print(f"worst ratio {max(ratios):.3f}, geomean {harness.geomean(ratios):.3f}")
    if os.environ.get("OUT"):
        harness.write_json(os.path.join(os.environ["OUT"], "probe_autotune.json"), rows)


if __name__ == "__main__":
    main()
