"""Probe: where an eager call of the experts op spends host time, and how much of it the benchmark's eager
points expose (the op's GPU time alone is the CUDA-graph time). NOTES.md "v4", host time of one eager op call.

    python -m benchmarks.probes.probe_host [--shapes qwen3_30b_a3b] [--tokens 1024 4096]

Host time per call: the GPU is first given a long sleep kernel, so no launch ever waits for it; N calls are
issued and the host clock read before the sleep ends (each part of the call timed alone the same way).
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from moe_compiler.lowering import triton_config
from moe_compiler.ops import checks
from moe_compiler.ops.experts import bind, forward
from moe_compiler.tune.search import benches
from moe_compiler.tune.shapes import SHAPES

from .. import harness


def host_us(fn, n=50):
    """Host microseconds per call of fn, with the GPU busy the whole time: launches never wait (n calls stay
    far below the ~1000 launches a stream queues before the host blocks)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s on a ~2 GHz clock: longer than n calls take to issue
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


@triton.jit
def _tiny(x_ptr, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32) + a)


@torch.library.custom_op("moe_compiler_probe::noop", mutates_args=())
def _noop(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


_LIB = torch.library.Library("moe_compiler_probe", "FRAGMENT")
_LIB.define("noop_lib(Tensor x, Tensor y) -> Tensor")
_LIB.impl("noop_lib", lambda x, y: x.new_empty(x.shape), "CUDA")


def parts(b):
    """Host us of the layers under one op call, and of bare launches (what each costs alone)."""
    x = torch.empty(1024, device="cuda")
    ints = list(range(1, 21))  # a .. t
    tensors, kwargs = (b.x, b.ids, b.w, b.w1, b.w2), b.spec.op_kwargs()
    return {
        "ops bind + forward": host_us(lambda: forward(*bind(tensors, kwargs))),
        "check_experts": host_us(lambda: checks.check_experts(*tensors, None, None, b.spec)),
        "custom_op noop": host_us(lambda: torch.ops.moe_compiler_probe.noop(b.x, b.ids)),
        "Library noop": host_us(lambda: torch.ops.moe_compiler_probe.noop_lib(b.x, b.ids)),
        "triton 20 args": host_us(lambda: _tiny[(1,)](x, *ints, BLOCK=128)),
        "triton debug": host_us(lambda: _tiny[(1,)](x, *ints, BLOCK=128, **triton_config.LIVE_ASSERTS)),
        "torch.empty": host_us(lambda: torch.empty(1024, device="cuda")),
    }


def main():
    ap = harness.parser(__doc__, shapes=SHAPES, tokens=[1024, 4096])
    ap.set_defaults(shapes=["qwen3_30b_a3b"])
    args = ap.parse_args()
    gpu, cap = harness.gpu_name(), torch.cuda.get_device_capability()
    timer = harness.Timer("cuda")
    table = []
    for name, T, b in benches(args.shapes, args.tokens, torch.bfloat16):
        op = lambda: torch.ops.moe_compiler.experts(b.x, b.ids, b.w, b.w1, b.w2, **b.spec.op_kwargs())  # noqa: E731
        cfg = triton_config.lookup(gpu, cap, torch.bfloat16, b.E, b.k, b.H, b.I, T)
        row = {"shape": name, "T": T, "graph_us": timer.graph(op, calls=3) * 1e6, "eager_us": timer.eager(op) * 1e6}
        row["host_op_us"] = host_us(op)
        row["host_forward_us"] = host_us(b.forward(cfg))
        if cfg.path is triton_config.Path.SORTED:
            kernels = (("align", b.align(cfg.block_m)), ("gate_up", b.sorted_gate_up(cfg)),
                       ("down", b.sorted_down(cfg)), ("combine", b.combine(cfg.block_m)))
            for part, fn in kernels:
                row[f"host_{part}_us"] = host_us(fn)
            for part, fn in kernels:
                row[f"gpu_{part}_us"] = timer.graph(fn, calls=3) * 1e6
        row.update({f"host {k}": v for k, v in parts(b).items()})
        table.append(row)
        print(row, flush=True)
    keys = [k for k in table[0] if k.endswith("_us") and k in table[-1]]
    print(f"{'shape':>14} {'T':>6} " + " ".join(f"{k[:-3]:>11}" for k in keys))
    for r in table:
        print(f"{r['shape']:>14} {r['T']:>6} " + " ".join(f"{r.get(k, float('nan')):>11.1f}" for k in keys))
    for r in table:
        host = ", ".join(f"{k[5:]} {v:.1f}" for k, v in r.items() if k.startswith("host "))
        print(f"{r['shape']} T={r['T']}: {host}")


if __name__ == "__main__":
    main()
