"""Probe: does folding an expert's small last block into its previous tile pay (issue 16, deliverable 3)?

probe_padding --tails (NOTES.md session 37) measured that a partial tile costs about one whole tile whatever its
rows: the tile streams its expert's whole weight tile and runs the whole tile's MMAs. A smaller tail tile would
cut only the MMAs (v4's half-height tiles: nothing saved). KernelConfig.tail_m tries the other cut: no tile of its
own for a tail of <= tail_m rows — the expert's previous tile takes those rows as a second operand of the same K
loop, so the weight tile it already loads serves both (one weight stream; the tail costs its MMAs and its row
loads), and the tail's own tile returns before loading anything (triton_experts._fold_state).

Per point and routing (uniform; balanced, where nothing folds: the fold test's overhead), the table's sorted config
with warp specialization off (the two do not combine) and each gate_up / down block_n asked for, unfolded
(tail 0) and with each tail_m: the gate_up and the down kernel alone under a CUDA graph from a cold L2, and the
whole forward checked against the fp32 per-expert reference. The table's own config is timed beside them for scale.

    python -m benchmarks.probes.probe_fold_tail [--points qwen3_30b_a3b:4096 ...] [--tails 32 64] [--block-n 64 128]
"""

from __future__ import annotations

import dataclasses

import torch
from triton.runtime.errors import OutOfResources

from moe_compiler.lowering import triton_experts
from moe_compiler.testing import experts_reference_by_expert, rel_err
from moe_compiler.tune.search import Bench
from moe_compiler.tune.shapes import SHAPES

from .. import harness
from .probe_padding import balanced_ids, point_problem

POINTS = ["qwen3_30b_a3b:4096", "deepseek_v3:4096", "mixtral_8x7b:1024"]


def fold_counts(ids, E: int, block_m: int, tails) -> dict:
    """Tiles of the padded order and, per tail_m, how many of them folding removes (host-side counts)."""
    c = torch.bincount(ids.flatten(), minlength=E)
    r = c % block_m
    out = {"tiles": int(((c + block_m - 1) // block_m).sum())}
    for t in tails:
        out[f"folded tail{t}"] = int(((r > 0) & (r <= t) & (c > block_m)).sum())
    return out


def timed(timer, fn) -> float:
    """µs under a CUDA graph, or nan where the variant does not fit the SM (shared memory, registers)."""
    try:
        return timer.graph(fn, calls=2) * 1e6
    except OutOfResources:
        return float("nan")


def checked(forward, ref) -> float:
    try:
        return rel_err(forward(), ref)
    except OutOfResources:
        return float("nan")


def variant(cfg, block_n: int, tail: int):
    """cfg with both GEMMs' block_n and no warp specialization, folding tails of <= `tail` rows (0: none)."""
    def kernel(kc):
        return dataclasses.replace(kc, block_n=block_n, warp_specialize=False, tail_m=tail)
    return dataclasses.replace(cfg, gate_up=kernel(cfg.gate_up), down=kernel(cfg.down))


def main():
    ap = harness.parser(__doc__)
    ap.add_argument("--points", nargs="+", default=POINTS, metavar="SHAPE:T", help=f"shapes of {list(SHAPES)}")
    ap.add_argument("--tails", nargs="+", type=int, default=[32, 64], help="tail_m values (powers of 2, >= 16)")
    ap.add_argument("--block-n", nargs="+", type=int, default=[64, 128])
    args = ap.parse_args()
    gpu, cap = harness.gpu_name(), torch.cuda.get_device_capability()
    timer = harness.Timer("cuda")
    table = []
    for point in args.points:
        T, (E, k, H, I), (x, ids, w, w1, w2), cfg = point_problem(point, gpu, cap)
        tails = [t for t in args.tails if t <= cfg.block_m]
        for kind, routing in (("uniform", ids), ("balanced", balanced_ids(T, E, k, x.device))):
            b = Bench(x, routing, w, w1, w2)
            ref = experts_reference_by_expert(x, routing, w, w1, w2, spec=b.spec)
            row = {"point": point, "routing": kind, "block_m": cfg.block_m,
                   **fold_counts(routing, E, cfg.block_m, tails),
                   "covered": (triton_experts.folds_gate_up(variant(cfg, 64, 16), b.spec, None, None) > 0,
                               triton_experts.folds_down(variant(cfg, 64, 16), None) > 0)}
            configs = {"table": cfg}
            configs |= {f"n{bn} tail{t}": variant(cfg, bn, t) for bn in args.block_n for t in [0] + tails}
            for name, c in configs.items():
                row[name] = (timed(timer, b.sorted_gate_up(c)), timed(timer, b.sorted_down(c)),
                             checked(b.forward(c), ref))
            table.append(row)
            print(row, flush=True)
        x = ids = w = w1 = w2 = b = ref = None
        torch.cuda.empty_cache()
    print("µs under a CUDA graph from a cold L2, gate_up / down (forward rel err vs fp32); tail0: the same tiles, "
          "unfolded; nan: does not fit the SM")
    for r in table:
        folds = ", ".join(f"{key[7:]} folds {v}" for key, v in r.items() if key.startswith("folded "))
        print(f"{r['point']} {r['routing']} (block_m {r['block_m']}, {r['tiles']} row blocks; {folds}; "
              f"gate_up / down calls covered: {r['covered']})")
        for key, v in r.items():
            if isinstance(v, tuple) and len(v) == 3:
                print(f"  {key:>14}: {v[0]:9.1f} / {v[1]:9.1f}  ({v[2]:.1e})")


if __name__ == "__main__":
    main()
