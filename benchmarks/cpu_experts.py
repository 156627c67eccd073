"""CPU: moe_compiler.experts vs transformers' own experts implementations on one real-shaped layer.

    python benchmarks/cpu_experts.py [--tokens 16 256] [--dtype float32]

Shape: Qwen3-30B-A3B's experts (E=128, k=8, H=2048, I=768), random weights and routing. Every variant
runs the same module parameters; outputs are checked against each other before timing. Median wall
time of --iters calls after one warm-up (CPU: no device events needed).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import moe_compiler


def median_time(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    E, k, H, I = 128, 8, 2048, 768
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(cfg).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, H**-0.5)
        experts.down_proj.normal_(0, I**-0.5)

    def hf(impl):
        def run(x, ids, w):
            cfg._experts_implementation = impl
            return experts(x, ids, w)
        return run

    variants = {
        "hf eager loop": hf("eager"),
        "hf grouped_mm": hf("grouped_mm"),
        "hf batched_mm": hf("batched_mm"),
        "moe_compiler.experts": lambda x, ids, w: moe_compiler.moe_experts(x, ids, w, experts.gate_up_proj, experts.down_proj),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, E={E} k={k} H={H} I={I}")
    print(f"{'T':>6} " + " ".join(f"{name:>22}" for name in variants) + "   speedup vs eager loop")
    with torch.no_grad():
        for T in args.tokens:
            x = torch.randn(T, H, dtype=dtype)
            ids = torch.rand(T, E).argsort(dim=1)[:, :k]
            w = torch.rand(T, k, dtype=dtype)
            # batched_mm gathers one [2I, H] weight per (token, slot): T*k*3*I*H elements (25 GB at T=256).
            run = {n: fn for n, fn in variants.items() if n != "hf batched_mm" or T * k * 3 * I * H * x.element_size() < 4e9}
            outs = {name: fn(x, ids, w).float() for name, fn in run.items()}
            ref = outs["hf eager loop"]
            for name, out in outs.items():
                err = float((out - ref).norm() / ref.norm())
                assert err < (1e-4 if dtype == torch.float32 else 2e-2), (name, err)
            times = {name: median_time(lambda fn=fn: fn(x, ids, w), args.iters) for name, fn in run.items()}
            ours = times["moe_compiler.experts"]
            cells = [f"{times[n] * 1e3:>19.2f} ms" if n in times else f"{'(too large)':>22}" for n in variants]
            print(f"{T:>6} " + " ".join(cells) + f"   {times['hf eager loop'] / ours:.2f}x")


if __name__ == "__main__":
    main()
