"""Router benchmark: the route op's Triton kernel against the same router compiled by Inductor (what a
fused_moe graph runs when the router is left alone) and against eager torch, at real router shapes.

    python benchmarks/bench_route.py [--out benchmarks/results/route_<gpu>.json] [--routers NAME ...]

With --routers, only those routers run and their rows replace theirs in an existing --out file.

Two times per variant, both from the same run:
  graph  per-call GPU time, 20 calls captured in one CUDA graph (reduce-overhead: no host cost)
  eager  per-call wall time of 200 back-to-back calls then one sync (default mode: host cost included
         where it exceeds the GPU time)
The logits stay in L2 as they do in a model (they are the router GEMM's output, written just before).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moe_compiler.lowering import triton_route  # noqa: E402
from moe_compiler.routing import RouterSpec, route_forward  # noqa: E402

# name -> (E, RouterSpec kwargs, correction bias?) of the real models' routers
ROUTERS = {
    "qwen3_30b_a3b": (128, dict(top_k=8, norm_topk_prob=True), False),
    "mixtral_8x7b": (8, dict(top_k=2, norm_topk_prob=True), False),
    "deepseek_v3": (256, dict(top_k=8, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4), True),
    "kimi_k2": (384, dict(top_k=8, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.827), True),
    "gpt_oss_120b": (128, dict(top_k=4, order="topk_then_score"), False),
    "phi_3_5_moe": (16, dict(top_k=2, order="sparsemixer", jitter_eps=0.01), False),
}
TOKENS = (1, 16, 128, 1024, 4096, 16384)


def graph_time(fn, calls=20, replays=10):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


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
    return sorted(times)[len(times) // 2]


def sweep(path):
    """Triton route tile sweep at a few (router, T): graph µs per (block_t, num_warps), against the
    default tile (triton_route.default_block_t was chosen from this sweep)."""
    lines = []
    for name in ("qwen3_30b_a3b", "deepseek_v3", "kimi_k2"):
        E, kw, with_bias = ROUTERS[name]
        spec = RouterSpec(**kw)
        for T in (1, 128, 4096, 16384):
            logits = torch.randn(T, E, device="cuda").bfloat16()
            bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
            res = {}
            for bt in (1, 2, 4, 8, 16):
                for nw in (1, 4):
                    res[f"{bt}x{nw}"] = graph_time(lambda: triton_route.route_forward(logits, bias, spec, bt, nw)) * 1e6
            best = min(res, key=res.get)
            lines.append(dict(router=name, T=T, best=best, best_us=res[best], default_us=graph_time(lambda: triton_route.route_forward(logits, bias, spec)) * 1e6, all=res))
            print(f"sweep {name:14} T={T:6} best {best:6} {res[best]:7.1f} µs  default {lines[-1]['default_us']:7.1f} µs", flush=True)
    if path:
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", default=None, metavar="JSONL", help="also sweep the kernel's tile (rows per program x warps) into this file")
    ap.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    torch._dynamo.config.recompile_limit = 1000  # one compiled router per (spec, T): static shapes, as a model has
    if args.sweep:
        sweep(args.sweep)
    compiled = torch.compile(route_forward, fullgraph=True, dynamic=False)
    rows = []
    for name in args.routers:
        E, kw, with_bias = ROUTERS[name]
        spec = RouterSpec(**kw)
        for T in TOKENS:
            logits = torch.randn(T, E, device="cuda").bfloat16()
            bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
            want_w, want_i = route_forward(logits, bias, spec)
            got_w, got_i = triton_route.route_forward(logits, bias, spec)
            same = (want_i.sort(1)[0] == got_i.sort(1)[0]).all(1).float().mean().item()
            variants = {
                "eager_torch": lambda: route_forward(logits, bias, spec),
                "inductor": lambda: compiled(logits, bias, spec),
                "triton_route": lambda: triton_route.route_forward(logits, bias, spec),
                "route_op": lambda: torch.ops.moe_compiler.route(logits, bias, *spec.op_args()),
            }
            row = dict(router=name, E=E, T=T, same_ids=same)
            for v, fn in variants.items():
                row[f"{v}_graph_us"] = graph_time(fn) * 1e6
                row[f"{v}_eager_us"] = eager_time(fn) * 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{gpu}: router time, µs per call (graph = captured, eager = host-inclusive)")
    head = f"{'router':14} {'T':>6} {'ids ok':>6} | " + " | ".join(f"{v:>19}" for v in ("eager_torch", "inductor", "triton_route", "route_op"))
    print(head + " | triton/inductor graph, eager")
    for r in rows:
        cells = " | ".join(f"{r[v + '_graph_us']:8.1f} {r[v + '_eager_us']:8.1f}  " for v in ("eager_torch", "inductor", "triton_route", "route_op"))
        print(f"{r['router']:14} {r['T']:6} {r['same_ids']:6.3f} | {cells} | "
              f"{r['triton_route_graph_us'] / r['inductor_graph_us']:.2f} {r['route_op_eager_us'] / r['inductor_eager_us']:.2f}")
    if args.out:
        if os.path.exists(args.out):  # keep the other routers' rows of an earlier run
            rows = [r for r in json.load(open(args.out))["rows"] if r["router"] not in args.routers] + rows
        with open(args.out, "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
