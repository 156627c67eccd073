"""CPU: moe_compiler.experts vs transformers' own experts implementations on one real-shaped layer.

    python -m benchmarks.cpu_experts [--tokens 16 256] [--dtype float32] [--iters 5]

Shape: Qwen3-30B-A3B's experts (E=128, k=8, H=2048, I=768), random weights and routing. Every variant
runs the same module parameters; outputs are checked against each other before timing. Median wall
time of --iters calls after one warm-up (CPU: no device events needed).
"""

from __future__ import annotations

import torch

import moe_compiler
from moe_compiler.testing import rel_err
from moe_compiler.tune.shapes import SHAPES

from . import harness

SHAPE = SHAPES["qwen3_30b_a3b"]
BATCHED_MM_MAX_BYTES = 4e9


def main():
    p = harness.parser(__doc__, tokens=[16, 256], dtypes=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    E, k, H, I = SHAPE
    torch.manual_seed(0)
    cfg, experts = harness.hf_experts(E, k, H, I, dtype, "cpu")
    variants = {
        "hf eager loop": harness.hf_forward(cfg, experts, "eager"),
        "hf grouped_mm": harness.hf_forward(cfg, experts, "grouped_mm"),
        "hf batched_mm": harness.hf_forward(cfg, experts, "batched_mm"),
        "moe_compiler.experts": lambda x, ids, w: moe_compiler.moe_experts(x, ids, w, experts.gate_up_proj,
                                                                            experts.down_proj),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, E={E} k={k} H={H} I={I}")
    print(f"{'T':>6} " + " ".join(f"{name:>22}" for name in variants) + "   speedup vs eager loop")
    with torch.no_grad():
        for T in args.tokens:
            x = torch.randn(T, H, dtype=dtype)
            ids = torch.rand(T, E).argsort(dim=1)[:, :k]
            w = torch.rand(T, k, dtype=dtype)
            # batched_mm gathers one [2I, H] weight per (token, slot): T*k*3*I*H elements (25 GB at T=256).
            too_large = T * k * 3 * I * H * x.element_size() >= BATCHED_MM_MAX_BYTES
            run = {n: fn for n, fn in variants.items() if n != "hf batched_mm" or not too_large}
            outs = {name: fn(x, ids, w) for name, fn in run.items()}
            for name, out in outs.items():
                err = rel_err(out, outs["hf eager loop"])
                assert err < (1e-4 if dtype == torch.float32 else 2e-2), (name, err)
            times = {name: harness.wall_clock(lambda fn=fn: fn(x, ids, w), args.iters) for name, fn in run.items()}
            ours = times["moe_compiler.experts"]
            cells = [f"{times[n] * 1e3:>19.2f} ms" if n in times else f"{'(too large)':>22}" for n in variants]
            print(f"{T:>6} " + " ".join(cells) + f"   {times['hf eager loop'] / ours:.2f}x")


if __name__ == "__main__":
    main()
