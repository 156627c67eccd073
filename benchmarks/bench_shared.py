"""Shared experts: does computing them inside the experts op pay off? Times the shared MLP as a fused_moe
graph leaves it (the block's own ops compiled by Inductor: cuBLAS GEMMs + fused pointwise) against its
own roofline floor, at real shapes, beside the routed experts of the same model (our op, same run).

    python benchmarks/bench_shared.py [--out benchmarks/results/shared_<gpu>.json]

Fusing the shared MLP into the experts pass saves at most (shared time - shared floor): X is read once
instead of twice (T*H*2 bytes, tiny next to the weights) and the shared GEMMs' ramps and tails overlap
the routed ones'. The table prints that bound as a share of the whole block (routed + shared).
T <= 128 under CUDA graphs (decode runs captured), larger T eager; cold L2 (timing.py) as in a model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from timing import Timer  # noqa: E402

import moe_compiler  # noqa: E402,F401

PEAK_FLOPS, PEAK_BYTES = 785e12, 3.02e12  # bf16 matmul and device copy measured on our H100

# name -> (H, shared I, sigmoid gate?, routed E, k, I) of the real models (configs on the Hub)
SHAPES = {
    "deepseek_v3": (7168, 2048, False, 256, 8, 2048),  # Kimi-K2 has the same shared MLP
    "qwen2_57b_a14b": (3584, 20480, True, 64, 8, 2560),
    "qwen3_next_80b": (2048, 512, True, 512, 10, 512),
    "llama4_scout": (5120, 8192, False, 16, 1, 8192),
}
TOKENS = (1, 16, 128, 1024, 4096, 16384)


def shared_mlp(x, w_gate, w_up, w_down, w_sg):
    out = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    return out if w_sg is None else torch.sigmoid(F.linear(x, w_sg)) * out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 1000
    timer = Timer("cuda")
    compiled = torch.compile(shared_mlp, dynamic=False)
    rows = []
    for name, (H, I, gated, E, k, Ie) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        w = [torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02 for s in ((I, H), (I, H), (H, I))]
        w_sg = torch.randn(1, H, device="cuda", generator=g).bfloat16() * 0.02 if gated else None
        w_gu = torch.randn(E, 2 * Ie, H, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        w_dn = torch.randn(E, H, Ie, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        for T in TOKENS:
            x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
            ids = torch.rand(T, E, device="cuda", generator=g).argsort(-1)[:, :k]  # uniform routing
            tw = torch.rand(T, k, device="cuda").softmax(-1)
            ref = shared_mlp(x.float(), *[t.float() for t in w], None if w_sg is None else w_sg.float())
            err = ((compiled(x, *w, w_sg).float() - ref).norm() / ref.norm()).item()
            time = timer.graph if T <= 128 else timer.eager
            t_shared = time(lambda: compiled(x, *w, w_sg))
            t_routed = time(lambda: moe_compiler.moe_experts(x, ids, tw, w_gu, w_dn))
            flops = 2 * T * H * 3 * I + (2 * T * H if gated else 0)
            nbytes = 2 * (3 * H * I + (H if gated else 0) + 2 * T * H)
            floor = max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES)
            row = dict(shape=name, T=T, H=H, I=I, gated=gated, shared_us=t_shared * 1e6, floor_us=floor * 1e6,
                       routed_us=t_routed * 1e6, rel_err=err)
            row["max_saving_of_block"] = max(t_shared - floor, 0) / (t_shared + t_routed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}: shared MLP as Inductor compiles it vs its floor; routed experts (our op) for scale")
    print(f"{'shape':16} {'T':>6} {'shared us':>10} {'floor us':>9} {'x floor':>7} {'routed us':>10} {'fusing saves <=':>15}")
    for r in rows:
        print(f"{r['shape']:16} {r['T']:6} {r['shared_us']:10.1f} {r['floor_us']:9.1f} {r['shared_us'] / r['floor_us']:7.2f} "
              f"{r['routed_us']:10.1f} {100 * r['max_saving_of_block']:14.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
