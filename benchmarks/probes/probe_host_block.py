"""Probe: host time of one MoE layer (router + experts + shared experts) in a model compiled without CUDA
graphs, for plain Inductor and fused_moe: its Triton launches recorded into Inductor's code with Python host code
(fused_python) and as the backend compiles a decode graph, with the host code in C++ (fused; config.cpp_wrapper);
on request the op opaque (MOE_COMPILER_INLINE=0), our launches by torch's static launcher, or the route inside the
decode gate_up GEMV (fused_route_in_gemv, MOE_COMPILER_ROUTE_IN_GEMV=1), the router's linear as a fused reduction
(the default; fused_router_linear keeps the cuBLAS linear: moe_compiler.router_gemv=False). NOTES.md "host path".

    python -m benchmarks.probes.probe_host_block [--shapes qwen3_30b_a3b deepseek_v3] [--tokens 1 32] [--layers 4]
                                                 [--residual] [--profile] [--out [PATH]]
                                                 [--variants inductor fused_opaque fused_static ...]

A stack of L real-dimension MoE blocks (benchmarks/models.py) is compiled alone, each block's output the next one's
input (--residual: x + block(x), a decoder layer's add with its launch, as sessions 11-15 timed it). Host time of
a call is the wall time from entering the compiled call to its return, with the GPU idle before it (a synchronize before
each call, none inside), so no launch waits for a full queue and nothing the GPU does is in the figure; a
call that syncs inside (a bug: `.item()` and the like) shows up as host time near its GPU time. Per layer =
the L-block stack's host time minus the 1-block stack's, over L - 1: what one more layer costs, the graph's
fixed cost (guards, the wrapper) apart. Every variant's two stacks are timed in the same rounds, one call each
per round (each variant's Stack has a forward code object of its own, so Dynamo keeps all their graphs at once),
so the host's drift lands on all of them alike — variants timed one after the other differed by more than the
launch an A/B was after (sessions 16-17). Beside it: each variant's GPU time per L-block call (the call
replayed in a CUDA graph, no host time), and its output vs eager.
(An earlier version timed back-to-back calls and read the wall time per call as host time; with the
launch queue full that reads whichever of host and GPU is slower, plus queue stalls, not host time.)
"""

from __future__ import annotations

import os
import time
import types

import torch

import moe_compiler  # noqa: F401 - registers the fused_moe backend
from moe_compiler.testing import rel_err

from .. import harness
from ..models import MODELS, build, moe_blocks

# name -> (backend, environment at compile time, torch.compile options)
VARIANTS = {
    "inductor": ("inductor", {}, None),
    "fused_opaque": ("fused_moe", {"MOE_COMPILER_INLINE": "0"}, None),
    # Python host code; the default below builds it in C++ at decode T (config.cpp_wrapper)
    "fused_python": ("fused_moe", {}, {"moe_compiler.cpp_wrapper": False}),
    "fused": ("fused_moe", {}, None),
    # the route inside the decode gate_up GEMV (the default keeps the route op's own launch)
    "fused_route_in_gemv": ("fused_moe", {"MOE_COMPILER_ROUTE_IN_GEMV": "1"}, None),
    # the router's linear by cuBLAS (the default rewrites it as a fused reduction: passes/router_linear.py)
    "fused_router_linear": ("fused_moe", {}, {"moe_compiler.router_gemv": False}),
    # the same as torch 2.11 builds it by itself, -O3 (the backend's default builds it -O1: backend.CPP_WRAPPER_BUILD)
    "fused_o3": ("fused_moe", {}, {"cpp_wrapper_build_separate": False}),
    # Python host code, our kernels by torch's static C++ launcher
    "fused_static": ("fused_moe", {}, {"moe_compiler.cpp_wrapper": False, "moe_compiler.static_launch": True}),
}
DEFAULT_VARIANTS = ("inductor", "fused_python", "fused")


def host_us(fns: dict, n: int = 400) -> dict:
    """{name: median wall microseconds from entering fn to its return}, the GPU idle before each call; the
    functions called in turn, one call each per round (timing.interleaved), so that the host's drift lands on
    all of them alike: their difference is the figure, and it is small beside their size."""
    for _ in range(3):
        for fn in fns.values():
            fn()

    def host_clock(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    times = harness.interleaved(fns, n, clock=host_clock)
    torch.cuda.synchronize()
    return {name: t * 1e6 for name, t in times.items()}


def graph_us(fn) -> float:
    """GPU microseconds per call: the same call replayed from a CUDA graph (no host time)."""
    try:
        return harness.Timer("cuda").graph(fn, calls=10) * 1e6
    except RuntimeError as e:  # a variant that cannot be captured: say so in the row, keep the others
        print(f"not capturable: {e}")
        return float("nan")


class Stack(torch.nn.Module):
    """L MoE blocks, each one's output the next one's input. With `residual`, x + block(x) as a decoder layer
    has it: one more pointwise launch per layer, which in a model Inductor fuses into the next norm (so it is not
    the block's cost; sessions 11-15 counted it)."""

    def __init__(self, blocks, residual: bool = False):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.residual = residual

    def forward(self, x):
        for b in self.blocks:
            out = b(x)
            out = out[0] if isinstance(out, tuple) else out
            x = x + out if self.residual else out
        return x


def profile(fn, title, calls=20):
    """The host-side events of `calls` calls (CUDA launches, allocations, Python in Inductor's launchers)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    # CUDA activity too: the runtime / driver calls (cuLaunchKernel, cudaLaunchKernel) are its CPU-side events
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.cuda.synchronize()
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    kernels = sorted(((e.count / calls, e.key) for e in events if e.self_device_time_total > 0), reverse=True)
    print(f"\nprofile: {title}, {calls} calls; {launches / calls:.1f} kernel launches per call:")
    for n, key in kernels:
        print(f"  {n:5.1f} x {key[:110]}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=60))


_SWITCHES = ("MOE_COMPILER_INLINE", "MOE_COMPILER_ROUTE_IN_GEMV")


def own_stack(variant: str, blocks, residual: bool) -> Stack:
    """A Stack whose forward is a code object of its own: Dynamo caches compiled graphs per code object, so each
    variant keeps its graphs beside the others' (no reset between them) and all are timed in the same rounds."""
    code = Stack.forward.__code__
    code = code.replace(co_name=f"forward_{variant}", co_qualname=f"Stack_{variant}.forward")
    forward = types.FunctionType(code, Stack.forward.__globals__, code.co_name)
    return type(f"Stack_{variant}", (Stack,), {"forward": forward})(blocks, residual)


def compiled(module, variant):
    """The variant's compiled module; its environment holds while it compiles (at its first call, which follows)."""
    backend, env, options = VARIANTS[variant]
    for name in _SWITCHES:
        os.environ.pop(name, None)
    os.environ.update(env)
    return torch.compile(module, backend=backend, dynamic=False, options=options)


def main():
    ap = harness.parser(__doc__, shapes=MODELS, tokens=[1, 32], out="host_block")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                    help="the host code A/B (a variant torch cannot build is reported and left out)")
    ap.add_argument("--residual", action="store_true", help="time x + block(x) per layer (a decoder layer's add, "
                    "one more launch; the default times the blocks alone, the issue's figure)")
    ap.add_argument("--profile", action="store_true", help="print each variant's host-side profile of 20 calls of the "
                    "L-block stack (torch.profiler, CPU: launches and their cost per call)")
    args = ap.parse_args()
    gpu = harness.gpu_name()
    harness.compile_per_shape()
    rows = []
    for name in args.shapes:
        try:
            model = build(name, layers=args.layers)
        except torch.OutOfMemoryError:  # DeepSeek-V3's 4 layers need ~90 GB: the others still run
            print(f"{name}: {args.layers} layers do not fit this GPU's memory; left out (try --layers 2)", flush=True)
            torch.cuda.empty_cache()
            continue
        blocks = moe_blocks(model)
        L = len(blocks)
        for T in args.tokens:
            x = torch.randn(1, T, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ref = Stack(blocks, args.residual)(x).float()
                row = {"model": name, "T": T, "layers": L, "residual": args.residual}
                fns = {}  # (variant, stack depth) -> call; every variant's graphs cached at once (own_stack)
                for variant in args.variants:
                    try:
                        for n in (1, L):
                            fn = compiled(own_stack(variant, blocks[:n], args.residual), variant)
                            fn(x)
                            fns[variant, n] = lambda fn=fn: fn(x)
                    except torch._dynamo.exc.BackendCompilerFailed as e:  # a variant torch cannot build: say so, go on
                        harness.say_compile_failed(variant, e)
                        fns.pop((variant, 1), None)
                        continue
                    row[f"{variant}_err"] = rel_err(fns[variant, L]().float(), ref)
                    row[f"{variant}_gpu_us"] = graph_us(fns[variant, L])
                # every variant's stacks in the same rounds: the host's drift (±20% between runs of one variant)
                # lands on all of them alike
                host = host_us(fns)
                for variant in dict.fromkeys(v for v, _ in fns):
                    if args.profile:
                        profile(fns[variant, L], f"{name} T={T} {variant}, {L} layers")
                    row[f"{variant}_host_1"] = host[variant, 1]
                    row[f"{variant}_host_per_layer"] = (host[variant, L] - host[variant, 1]) / (L - 1)
                print(row, flush=True)
                rows.append(row)
        del model, blocks, fns
        torch.cuda.empty_cache()
    if not rows:
        return
    print(f"\nhost µs per MoE layer (host µs of a 1-layer graph call), GPU µs per {rows[0]['layers']}-layer call "
          "(CUDA graph)")
    print(f"{'model':>16} {'T':>4} " + " ".join(f"{v:>24}" for v in args.variants))
    for r in rows:
        cells = [f"{r[f'{v}_host_per_layer']:6.1f} ({r[f'{v}_host_1']:5.1f}) {r[f'{v}_gpu_us']:7.0f}"
                 if f"{v}_host_1" in r else "failed" for v in args.variants]
        print(f"{r['model']:>16} {r['T']:>4} " + " ".join(f"{c:>24}" for c in cells))
    harness.save_rows(args.out, "host_block", rows, gpu, merge_on=("model", "T", "layers", "residual"))
    print("errors vs eager: " + "; ".join(
        f"{r['model']} T={r['T']} " + " ".join(f"{v} {r[f'{v}_err']:.1e}" for v in args.variants if f"{v}_err" in r)
        for r in rows))
    if os.environ.get("OUT"):
        harness.write_json(os.path.join(os.environ["OUT"], "probe_host_block.json"), rows)


if __name__ == "__main__":
    main()
