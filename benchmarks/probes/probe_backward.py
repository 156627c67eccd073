"""Where does the Triton backward's time go, and which tiles does it want? Per (shape, T), bf16, uniform routing:
(1) one backward call profiled, CUDA time per kernel (recomputed gate_up, dz, d hidden's down + combine, the two
weight-gradient calls, align), beside the forward, with every GEMM by Triton kernels and with every GEMM by the
library (WGrad / DGrad.GROUPED_MM); (2) the Triton weight-gradient tile and dz tile swept one at a time around
the all-Triton config, beside default_config (library weight gradients) and the all-library config, whole
backward timed from a cold L2. NOTES.md: "training op v1", "backward tiles", "train step v1". JSON lines under
$OUT.

    python -m benchmarks.probes.probe_backward --shapes qwen3_30b_a3b mixtral_8x7b gpt_oss_20b --tokens 32768
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections import defaultdict

import torch

from moe_compiler.lowering import triton_backward
from moe_compiler.lowering.triton_config import KernelConfig
from moe_compiler.spec import ExpertsSpec
from moe_compiler.tune.shapes import ALL_SHAPES
from moe_compiler.tune.timing import Timer

from .. import harness

WGRAD = [(m, KernelConfig(n, k, w, s)) for m, n, k, (w, s) in
         itertools.product((64, 128), (64, 128), (32, 64), ((4, 3), (8, 3), (8, 4))) if not (m == 128 and w == 4)]
DZ = [KernelConfig(n, k, w, s) for n, k, (w, s) in itertools.product((64, 128), (64, 128), ((4, 3), (8, 3), (4, 4)))]


def _inputs(E, k, H, I, T):
    gen = torch.Generator("cuda").manual_seed(T)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, H, generator=gen, **bf)
    ids = torch.rand(T, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, device="cuda", generator=gen).to(torch.bfloat16)
    w1 = torch.randn(E, 2 * I, H, generator=gen, **bf) * H**-0.5
    w2 = torch.randn(E, H, I, generator=gen, **bf) * I**-0.5
    return torch.randn(T, H, generator=gen, **bf), (x, ids, w, w1, w2, None, None)


def profile(grad_out, args, spec, config):
    """{kernel name: ms} of one backward call (median of 3 profiled calls)."""
    call = lambda: triton_backward.experts_backward(grad_out, *args, spec, config)  # noqa: E731
    call()
    torch.cuda.synchronize()
    per_call = defaultdict(list)
    for _ in range(3):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        sums = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                sums[e.name[:48]] += e.device_time_total / 1e3
        for name, ms in sums.items():
            per_call[name].append(ms)
    return {name: sorted(v)[len(v) // 2] for name, v in per_call.items()}


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[32768])
    ap.set_defaults(shapes=["qwen3_30b_a3b", "mixtral_8x7b", "gpt_oss_20b"])
    ap.add_argument("--budget-s", type=float, default=120.0, help="sweep time per (shape, T) and part")
    args = ap.parse_args()
    gpu = harness.gpu_name()
    out_path = os.path.join(os.environ.get("OUT", "."), "backward_tiles.jsonl")
    timer = Timer("cuda")
    spec = ExpertsSpec()
    summary = []
    for name in args.shapes:
        E, k, H, I = ALL_SHAPES[name]
        for T in args.tokens:
            grad_out, inputs = _inputs(E, k, H, I, T)
            default = triton_backward.default_config(torch.bfloat16, E, k, H, I, T)
            base = dataclasses.replace(default, wgrad_path=triton_backward.WGrad.TRITON,
                                       dgrad_path=triton_backward.DGrad.TRITON)  # the tiles below are its
            kernels = profile(grad_out, inputs, spec, base)
            total = sum(kernels.values())
            print(f"{name} T={T}: {total:.2f} ms of kernels per backward; "
                  + ", ".join(f"{n} {ms:.2f}" for n, ms in sorted(kernels.items(), key=lambda i: -i[1])[:8]),
                  flush=True)
            flops = 12 * T * k * H * I
            results = {}
            # The library GEMMs: default_config's (weight gradients), and every GEMM (DGrad.GROUPED_MM), profiled.
            library = [default, dataclasses.replace(default, dgrad_path=triton_backward.DGrad.GROUPED_MM)]
            lib_kernels = profile(grad_out, inputs, spec, library[1])
            print(f"  every GEMM by the library: {sum(lib_kernels.values()):.2f} ms; "
                  + ", ".join(f"{n} {ms:.2f}" for n, ms in sorted(lib_kernels.items(), key=lambda i: -i[1])[:8]),
                  flush=True)
            for part, candidates in (("wgrad", WGRAD), ("library", library), ("dz", DZ)):
                start, timed = time.time(), []
                for cand in candidates:
                    if time.time() - start > args.budget_s:
                        break
                    if part == "wgrad":
                        cfg = dataclasses.replace(base, wgrad_m=cand[0], wgrad=cand[1])
                    else:
                        cfg = cand if part == "library" else dataclasses.replace(base, dz=cand)
                    try:
                        s = timer.eager(lambda c=cfg: triton_backward.experts_backward(grad_out, *inputs, spec, c))
                    except Exception as exc:  # noqa: BLE001 - a tile the GPU refuses (shared memory)
                        print(f"  skip {part} {cand}: {type(exc).__name__}", flush=True)
                        continue
                    timed.append((s, cfg))
                    with open(out_path, "a") as f:
                        f.write(json.dumps({"gpu": gpu, "shape": name, "T": T, "part": part, "ms": s * 1e3,
                                            "tflops_counted": flops / s / 1e12, "config": repr(cfg)}) + "\n")
                timed.sort(key=lambda r: r[0])
                results[part] = timed[0] if timed else None
            base_s = timer.eager(lambda: triton_backward.experts_backward(grad_out, *inputs, spec, base))
            summary.append((name, T, base_s, results, flops))
            torch.cuda.empty_cache()
    print(f"\n{'shape':>16} {'T':>6} {'Triton ms':>10} {'best wgrad ms':>14} {'best library':>16} "
          f"{'best dz ms':>11}  (backward only; TFLOP/s count 12 T k H I)")
    for name, T, base_s, results, flops in summary:
        cells = [f"{r[0] * 1e3:8.2f} ({flops / r[0] / 1e12:4.0f})" if r else "       -" for r in results.values()]
        print(f"{name:>16} {T:>6} {base_s * 1e3:10.2f} {cells[0]:>14} {cells[1]:>16} {cells[2]:>11}")
        for part, r in results.items():
            if r:
                print(f"{'':>24}{part}: {r[1]}")


if __name__ == "__main__":
    main()
