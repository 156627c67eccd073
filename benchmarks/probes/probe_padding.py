"""Probe: what BLOCK_M padding costs the sorted path (NOTES.md "v4", padding). Every expert's segment is padded
to a multiple of block_m, so at T*k/E ~ block_m rows per expert the GEMMs multiply more rows than there are
(the probe prints padded/real per point). The same T is timed with uniform routing and with balanced routing
(every expert exactly T*k/E rows, a multiple of block_m: no padding; in token order, and shuffled so that each
expert's rows are as scattered as with uniform routing), each kernel under a CUDA graph from a cold L2
(moe_compiler/tune/timing.py); the time the balanced case saves bounds what any fix of the padding can win.
(Half-height tiles for the partial blocks: tried and reverted, same NOTES section.)

With --tails R ...: what one partial tile costs. Balanced routing plus R·E/k more tokens, each routed to one of
E/k disjoint groups of k experts, so that every expert holds exactly its balanced rows + R: one partial block of R
rows per expert on top of whole blocks. Printed per R: the extra time over balanced routing in units of one whole
block's time (balanced time / whole blocks) — ~1.0 at every R says a tile costs its weight stream whatever its rows
(the model NOTES v4 drew from the half-height tiles), ~R/block_m says it costs its rows.

    python -m benchmarks.probes.probe_padding [--points qwen3_30b_a3b:4096 deepseek_v3:4096 ...] [--tails 1 16 64]
"""

from __future__ import annotations

import torch

from moe_compiler.lowering import triton_config
from moe_compiler.testing import experts_reference_by_expert, rel_err
from moe_compiler.tune.search import Bench, problem
from moe_compiler.tune.shapes import SHAPES

from .. import harness

POINTS = ["qwen3_30b_a3b:4096", "deepseek_v3:4096", "deepseek_v3:16384", "mixtral_8x7b:1024", "qwen3_30b_a3b:16384"]


def balanced_ids(T, E, k, device):
    """Token t takes experts (t*k + j) mod E: distinct per token, exactly T*k/E rows per expert."""
    t = torch.arange(T, device=device)[:, None]
    return (t * k + torch.arange(k, device=device)[None, :]) % E


def tailed_ids(T, E, k, tail, device):
    """balanced_ids(T) and then tail * E / k tokens more, token i of them on the experts of group i mod (E / k)
    (k consecutive experts): every expert gets exactly `tail` rows more. E must be a multiple of k."""
    if E % k:
        raise ValueError(f"--tails needs E a multiple of k: got E={E}, k={k}")
    groups = E // k
    extra = torch.arange(tail * groups, device=device)[:, None] % groups * k + torch.arange(k, device=device)[None, :]
    return torch.cat([balanced_ids(T, E, k, device), extra])


def sorted_config(gpu, cap, E, k, H, I, T) -> triton_config.SortedConfig:
    """The config the op looks up, where it is the sorted path's; else (a CUTLASS or grouped_mm entry: DeepSeek-V3
    T = 4096 on both GPUs) the nearest sorted entry of this GPU's table, else the untuned sorted tiles."""
    cfg = triton_config.lookup(gpu, cap, torch.bfloat16, E, k, H, I, T)
    if isinstance(cfg, triton_config.SortedConfig):
        return cfg
    path = triton_config.gpu_file(gpu)
    entries = [e for e in triton_config.load_file(path) if isinstance(e["config"], triton_config.SortedConfig)] \
        if path.exists() else []
    near = triton_config.nearest_entry(entries, torch.bfloat16, E, k, H, I, T)
    return near or triton_config.default_sorted_config(torch.bfloat16, E, k, T)


def point_problem(point: str, gpu: str, cap):
    """("shape:T" -> T, (E, k, H, I), the bf16 problem (x, ids, w, w1, w2) and the sorted config it runs)."""
    name, T = point.split(":")
    T = int(T)
    E, k, H, I = SHAPES[name]
    return T, (E, k, H, I), problem(T, E, k, H, I, torch.bfloat16), sorted_config(gpu, cap, E, k, H, I, T)


def padding(ids, E, block_m):
    counts = torch.bincount(ids.flatten(), minlength=E)
    return ((counts + block_m - 1) // block_m * block_m).sum().item() / counts.sum().item()


def main():
    ap = harness.parser(__doc__)
    ap.add_argument("--points", nargs="+", default=POINTS, metavar="SHAPE:T", help=f"shapes of {list(SHAPES)}")
    ap.add_argument("--tails", nargs="*", type=int, default=[], metavar="R",
                    help="rows of one partial block per expert, each timed on top of balanced routing")
    args = ap.parse_args()
    gpu, cap = harness.gpu_name(), torch.cuda.get_device_capability()
    timer = harness.Timer("cuda")
    timer.calls = 2
    table = []
    for point in args.points:
        T, (E, k, H, I), (x, ids, w, w1, w2), cfg = point_problem(point, gpu, cap)
        bal = balanced_ids(T, E, k, x.device)
        # the same counts with tokens and expert labels shuffled: the gathered rows scatter as in uniform routing
        shuffled = torch.randperm(E, device=x.device)[bal[torch.randperm(T, device=x.device)]]
        routings = [("uniform", ids), ("balanced", bal), ("shuffled", shuffled)]
        routings += [(f"tail {r}", tailed_ids(T, E, k, r, x.device)) for r in args.tails]
        for kind, routing in routings:
            xs = x if routing.shape[0] == T else torch.randn(routing.shape[0], H, device=x.device).to(x.dtype)
            ws = w if routing.shape[0] == T else torch.rand(routing.shape[0], k, device=x.device).to(w.dtype)
            b = Bench(xs, routing, ws, w1, w2)
            row = {"point": point, "routing": kind, "padded/real": padding(routing, E, cfg.block_m)}
            kernels = (("gate_up", b.sorted_gate_up(cfg)), ("down", b.sorted_down(cfg)), ("forward", b.forward(cfg)))
            for part, fn in kernels:
                row[part] = timer.graph(fn, calls=timer.calls) * 1e6
            row["rel_err"] = rel_err(b.forward(cfg)(), experts_reference_by_expert(xs, routing, ws, w1, w2,
                                                                                   spec=b.spec))
            if kind.startswith("tail"):  # the extra time in whole blocks' time (balanced: T*k/block_m blocks)
                base = next(r for r in table if r["point"] == point and r["routing"] == "balanced")
                block = {part: base[part] / (T * k / cfg.block_m) for part in ("gate_up", "down")}
                row["tile_cost"] = {part: (row[part] - base[part]) / (E * block[part]) for part in block}
            table.append(row)
            print(row, flush=True)
        x = ids = w = w1 = w2 = b = None  # free this point's weights before the next point's
        torch.cuda.empty_cache()
    print(f"{'point':>20} {'routing':>9} {'pad/real':>8} {'gate_up us':>10} {'down us':>9} {'forward us':>10} "
          f"{'rel err':>8}")
    for r in table:
        cost = r.get("tile_cost")
        cost = f"  a partial tile: {cost['gate_up']:.2f} / {cost['down']:.2f} whole blocks" if cost else ""
        print(f"{r['point']:>20} {r['routing']:>9} {r['padded/real']:>8.3f} {r['gate_up']:>10.1f} {r['down']:>9.1f} "
              f"{r['forward']:>10.1f} {r['rel_err']:>8.1e}{cost}")


if __name__ == "__main__":
    main()
