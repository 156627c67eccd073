"""Probe: what BLOCK_M padding costs the sorted path. Every expert's segment is padded to a multiple of
block_m, so at T*k/E ~ block_m rows per expert the GEMMs multiply up to 1.5x the real rows (DeepSeek-V3
T=4096: 1.49x, Qwen3-30B-A3B T=4096: 1.25x, with uniform routing). The same T is timed with uniform routing
and with balanced routing (every expert exactly T*k/E rows, a multiple of block_m: no padding; in token order,
and shuffled so that each expert's rows are as scattered as with uniform routing), each kernel
under a CUDA graph from a cold L2 (timing.py); the time the balanced case saves bounds what any fix of the
padding can win. (Half-height tiles for the partial blocks won little of it: NOTES v4.)

    python benchmarks/probe_padding.py [--points qwen3_30b_a3b:4096 deepseek_v3:4096 ...]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import experts_reference_by_expert, rel_err  # noqa: E402
from timing import Timer  # noqa: E402
from tune_experts import SHAPES, SPEC, Bench, problem  # noqa: E402

from moe_compiler import lowering  # noqa: E402
from moe_compiler.lowering import triton_config  # noqa: E402


def balanced_ids(T, E, k, device):
    """Token t takes experts (t*k + j) mod E: distinct per token, exactly T*k/E rows per expert."""
    t = torch.arange(T, device=device)[:, None]
    return (t * k + torch.arange(k, device=device)[None, :]) % E


def padding(ids, E, block_m):
    counts = torch.bincount(ids.flatten(), minlength=E)
    return ((counts + block_m - 1) // block_m * block_m).sum().item() / counts.sum().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", nargs="+", default=["qwen3_30b_a3b:4096", "deepseek_v3:4096", "deepseek_v3:16384",
                                                     "mixtral_8x7b:1024", "qwen3_30b_a3b:16384"])
    args = ap.parse_args()
    timer = Timer("cuda")
    timer.calls = 2
    gpu, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    table = []
    for point in args.points:
        name, T = point.split(":")
        T = int(T)
        E, k, H, I = SHAPES[name]
        x, ids, w, w1, w2 = problem(T, E, k, H, I, torch.bfloat16)
        cfg = triton_config.lookup(gpu, cap, torch.bfloat16, E, k, H, I, T)
        bal = balanced_ids(T, E, k, x.device)
        # the same counts with tokens and expert labels shuffled: the gathered rows scatter as in uniform routing
        shuffled = torch.randperm(E, device=x.device)[bal[torch.randperm(T, device=x.device)]]
        for kind, routing in (("uniform", ids), ("balanced", bal), ("shuffled", shuffled)):
            b = Bench(x, routing, w, w1, w2)
            row = {"point": point, "routing": kind, "padded/real": padding(routing, E, cfg.block_m)}
            for part, fn in (("gate_up", b.sorted_gate_up(cfg)), ("down", b.sorted_down(cfg)),
                             ("forward", lambda: lowering.triton_forward(x, routing, w, w1, w2, None, None, SPEC, cfg))):
                row[part] = timer.graph(fn, calls=timer.calls) * 1e6
            out = lowering.triton_forward(x, routing, w, w1, w2, None, None, SPEC, cfg)
            row["rel_err"] = rel_err(out, experts_reference_by_expert(x, routing, w, w1, w2, spec=SPEC))
            table.append(row)
            print(row, flush=True)
        x = ids = w = w1 = w2 = b = None  # free this point's weights before the next point's
        torch.cuda.empty_cache()
    print(f"{'point':>20} {'routing':>9} {'pad/real':>8} {'gate_up us':>10} {'down us':>9} {'forward us':>10} {'rel err':>8}")
    for r in table:
        print(f"{r['point']:>20} {r['routing']:>9} {r['padded/real']:>8.3f} {r['gate_up']:>10.1f} {r['down']:>9.1f} "
              f"{r['forward']:>10.1f} {r['rel_err']:>8.1e}")


if __name__ == "__main__":
    main()
