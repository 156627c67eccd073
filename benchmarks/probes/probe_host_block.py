"""Probe: host time of one MoE layer (router + experts + shared experts) in a model compiled without CUDA
graphs, for plain Inductor, fused_moe with the op opaque (MOE_COMPILER_INLINE=0) and fused_moe with its
Triton launches recorded into Inductor's code (the default). NOTES.md "host path".

    python -m benchmarks.probes.probe_host_block [--models qwen3_30b_a3b deepseek_v3] [--tokens 1 32]

A stack of L real-dimension MoE blocks (benchmarks/models.py) is compiled alone; host time per call is read
as the wall time of back-to-back calls, which is the host time where the host is the bottleneck: the table
shows each variant's GPU time per call (the call replayed in a CUDA graph) beside it, so a row where the GPU
is the longer is visible. (Issuing calls behind a long sleep kernel, as probe_host does for single ops, fills
the launch queue within a few whole-model calls and then measures the sleep.) Per layer = the L-block stack's
time minus the 1-block stack's, over L - 1: what one more layer costs, the graph's fixed cost apart.
Also: each variant's GPU time per call (CUDA events, no graph), and its output vs eager.
"""

from __future__ import annotations

import os
import time

import torch

import moe_compiler  # noqa: F401 - registers the fused_moe backend
from moe_compiler.testing import rel_err

from .. import harness
from ..models import MODELS, build, moe_blocks

VARIANTS = {"inductor": ("inductor", None), "fused_opaque": ("fused_moe", "0"), "fused": ("fused_moe", "1")}


def wall_us(fn, n: int = 200) -> float:
    """Wall microseconds per call of n back-to-back calls (launches pipelined, one sync at the end): the host
    time per call wherever it exceeds the GPU time per call, which the probe checks (gpu_us, CUDA graph)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def graph_us(fn) -> float:
    """GPU microseconds per call: the same call replayed from a CUDA graph (no host time)."""
    try:
        return harness.Timer("cuda").graph(fn, calls=10) * 1e6
    except RuntimeError as e:  # a variant that cannot be captured: say so in the row, keep the others
        print(f"not capturable: {e}")
        return float("nan")


class Stack(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            out = b(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


def compiled(module, variant):
    backend, inline = VARIANTS[variant]
    torch._dynamo.reset()
    if inline is not None:
        os.environ["MOE_COMPILER_INLINE"] = inline
    return torch.compile(module, backend=backend, dynamic=False)


def main():
    ap = harness.parser(__doc__, shapes=MODELS, tokens=[1, 32])
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    harness.gpu_name()
    harness.compile_per_shape()
    rows = []
    for name in args.shapes:
        model = build(name, layers=args.layers)
        blocks = moe_blocks(model)
        stacks = {1: Stack(blocks[:1]), len(blocks): Stack(blocks)}
        for T in args.tokens:
            x = torch.randn(1, T, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ref = stacks[len(blocks)](x).float()
                row = {"model": name, "T": T, "layers": len(blocks)}
                for variant in VARIANTS:
                    host = {}
                    for n, stack in stacks.items():
                        fn = compiled(stack, variant)
                        fn(x)
                        host[n] = wall_us(lambda: fn(x))
                        if n == len(blocks):
                            row[f"{variant}_err"] = rel_err(fn(x).float(), ref)
                            row[f"{variant}_gpu_us"] = graph_us(lambda: fn(x))
                    row[f"{variant}_host_1"] = host[1]
                    row[f"{variant}_host_per_layer"] = (host[len(blocks)] - host[1]) / (len(blocks) - 1)
                print(row, flush=True)
                rows.append(row)
        del model, blocks, stacks
        torch.cuda.empty_cache()
    print(f"\nwall µs per MoE layer (of a 1-layer graph call), GPU µs per {rows[0]['layers']}-layer call (CUDA graph)")
    print(f"{'model':>16} {'T':>4} " + " ".join(f"{v:>24}" for v in VARIANTS))
    for r in rows:
        cells = [f"{r[f'{v}_host_per_layer']:6.1f} ({r[f'{v}_host_1']:5.1f}) {r[f'{v}_gpu_us']:7.0f}"
                 for v in VARIANTS]
        print(f"{r['model']:>16} {r['T']:>4} " + " ".join(f"{c:>24}" for c in cells))
    print("errors vs eager: " + "; ".join(
        f"{r['model']} T={r['T']} " + " ".join(f"{v} {r[f'{v}_err']:.1e}" for v in VARIANTS) for r in rows))
    if os.environ.get("OUT"):
        harness.write_json(os.path.join(os.environ["OUT"], "probe_host_block.json"), rows)


if __name__ == "__main__":
    main()
