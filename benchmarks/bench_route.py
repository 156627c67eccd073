"""Router benchmark: the route op's Triton kernel against the same router compiled by Inductor (what a
fused_moe graph runs when the router is left alone) and against eager torch, at real router shapes.

    python -m benchmarks.bench_route [--out [PATH]] [--routers NAME ...] [--sweep JSONL]

Bare --out writes benchmarks/results/route_<gpu>.json; with --routers, only those routers run and their rows
replace theirs in an existing --out file.

Two times per variant, both from the same run:
  graph  per-call GPU time, 20 calls captured in one CUDA graph (reduce-overhead: no host cost)
  eager  per-call wall time of 200 back-to-back calls then one sync (default mode: host cost included
         where it exceeds the GPU time)
The logits stay in L2 as they do in a model (they are the router GEMM's output, written just before), so
unlike the experts benchmarks nothing flushes the L2 here.
"""

from __future__ import annotations

import json
import time

import torch

from moe_compiler.lowering import triton_route
from moe_compiler.lowering.torch_route import route_forward
from moe_compiler.spec import RouterSpec

from . import harness

# name -> (E, RouterSpec kwargs, correction bias?) of the real models' routers
ROUTERS = {
    "qwen3_30b_a3b": (128, dict(top_k=8, norm_topk_prob=True), False),
    "mixtral_8x7b": (8, dict(top_k=2, norm_topk_prob=True), False),
    "deepseek_v3": (256, dict(top_k=8, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8,
                              topk_group=4), True),
    "kimi_k2": (384, dict(top_k=8, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.827), True),
    "gpt_oss_120b": (128, dict(top_k=4, order="topk_then_score"), False),
    "phi_3_5_moe": (16, dict(top_k=2, order="sparsemixer", jitter_eps=0.01), False),
}
TOKENS = (1, 16, 128, 1024, 4096, 16384)
VARIANTS = ("eager_torch", "inductor", "triton_route", "route_op")


def graph_time(fn, calls=20, replays=10):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return harness.events(g.replay, replays) / calls


def eager_time(fn, calls=200, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return harness.median(times)


def inputs(name, T):
    """(logits [T, E] bf16, correction bias or None, spec) of a router."""
    E, kw, with_bias = ROUTERS[name]
    logits = torch.randn(T, E, device="cuda").bfloat16()
    bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
    return logits, bias, RouterSpec(**kw)


def sweep(path):
    """Triton route tile sweep at a few (router, T): graph µs per (block_t, num_warps), against the
    default tile (triton_route.default_block_t was chosen from this sweep)."""
    lines = []
    for name in ("qwen3_30b_a3b", "deepseek_v3", "kimi_k2"):
        for T in (1, 128, 4096, 16384):
            logits, bias, spec = inputs(name, T)
            res = {}
            for bt in (1, 2, 4, 8, 16):
                for nw in (1, 4):
                    res[f"{bt}x{nw}"] = graph_time(lambda: triton_route.route_forward(logits, bias, spec, bt, nw)) * 1e6
            best = min(res, key=res.get)
            default_us = graph_time(lambda: triton_route.route_forward(logits, bias, spec)) * 1e6
            lines.append(dict(router=name, T=T, best=best, best_us=res[best], default_us=default_us, all=res))
            print(f"sweep {name:14} T={T:6} best {best:6} {res[best]:7.1f} µs  default {default_us:7.1f} µs",
                  flush=True)
    if path:
        harness.write_jsonl(path, lines)


def main():
    ap = harness.parser(__doc__, out="route")
    ap.add_argument("--sweep", default=None, metavar="JSONL",
                    help="also sweep the kernel's tile (rows per program x warps) into this file")
    ap.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS), metavar="NAME",
                    help=f"of {list(ROUTERS)}")
    args = ap.parse_args()
    gpu = harness.gpu_name()
    harness.compile_per_shape()
    if args.sweep:
        sweep(args.sweep)
    compiled = torch.compile(route_forward, fullgraph=True, dynamic=False)
    rows = []
    for name in args.routers:
        for T in TOKENS:
            logits, bias, spec = inputs(name, T)
            want_w, want_i = route_forward(logits, bias, spec)
            got_w, got_i = triton_route.route_forward(logits, bias, spec)
            same = (want_i.sort(1)[0] == got_i.sort(1)[0]).all(1).float().mean().item()
            variants = {
                "eager_torch": lambda: route_forward(logits, bias, spec),
                "inductor": lambda: compiled(logits, bias, spec),
                "triton_route": lambda: triton_route.route_forward(logits, bias, spec),
                "route_op": lambda: torch.ops.moe_compiler.route(logits, bias, **spec.op_kwargs()),
            }
            row = dict(router=name, E=logits.shape[1], T=T, same_ids=same)
            for v, fn in variants.items():
                row[f"{v}_graph_us"] = graph_time(fn) * 1e6
                row[f"{v}_eager_us"] = eager_time(fn) * 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{gpu}: router time, µs per call (graph = captured, eager = host-inclusive)")
    head = f"{'router':14} {'T':>6} {'ids ok':>6} | " + " | ".join(f"{v:>19}" for v in VARIANTS)
    print(head + " | triton/inductor graph, eager")
    for r in rows:
        cells = " | ".join(f"{r[v + '_graph_us']:8.1f} {r[v + '_eager_us']:8.1f}  " for v in VARIANTS)
        print(f"{r['router']:14} {r['T']:6} {r['same_ids']:6.3f} | {cells} | "
              f"{r['triton_route_graph_us'] / r['inductor_graph_us']:.2f} "
              f"{r['route_op_eager_us'] / r['inductor_eager_us']:.2f}")
    harness.save_rows(args.out, "route", rows, gpu, key="router", replaced=args.routers)


if __name__ == "__main__":
    main()
