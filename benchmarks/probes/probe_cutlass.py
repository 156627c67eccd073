"""Is csrc/'s CUTLASS grouped GEMM worth a path? Per (shape, T), bf16, uniform routing, H200, CUDA graphs, cold L2:
(1) the two GEMMs alone on rows already sorted by expert — torch._grouped_mm (torch's CUTLASS instance) vs each
of our CONFIGS (lowering/cutlass.py), with the roofline floor of each GEMM; (2) the whole experts op: the
tuned Triton path vs torch._grouped_mm and our best config with Triton glue (triton_grouped.py) vs the torch composite.
The first call builds csrc/ (minutes, logged). JSON lines under $OUT; the table last. --kernels: where the whole
op's device time goes, per kernel (profiler), for the Triton path and the best config with Triton glue.

    python -m benchmarks.probes.probe_cutlass --shapes qwen3_30b_a3b deepseek_v3 kimi_k2 --tokens 4096 16384 [--kernels]
"""

from __future__ import annotations

import json
import os
import time

import torch

from moe_compiler.lowering import cutlass, dispatch, torch_experts, triton_grouped
from moe_compiler.lowering.torch_segment_mm import GroupedMM, Segments
from moe_compiler.spec import ExpertsSpec
from moe_compiler.tune.shapes import ALL_SHAPES
from moe_compiler.tune.timing import Timer

from .. import harness


def _inputs(E, k, H, I, T):
    gen = torch.Generator("cuda").manual_seed(T)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, H, generator=gen, **bf)
    ids = torch.rand(T, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, device="cuda", generator=gen)
    w1 = torch.randn(E, 2 * I, H, generator=gen, **bf) * H**-0.5
    w2 = torch.randn(E, H, I, generator=gen, **bf) * I**-0.5
    return x, ids, w, w1, w2


def gemm_points(timer, E, k, H, I, T, x, ids, w1, w2) -> list[dict]:
    """The gate_up and down GEMMs alone over sorted rows: torch._grouped_mm vs every CUTLASS config."""
    seg = Segments.build(ids, E)
    rows = {"gate_up": (x[seg.perm // k].contiguous(), w1), "down": (torch.randn(T * k, I, device="cuda").bfloat16(),
                                                                    w2)}
    out = []
    for gemm, (a, wt) in rows.items():
        N, K = wt.shape[1], wt.shape[2]
        flops = 2 * a.shape[0] * N * K
        floor = harness.floor_s(flops, (wt.numel() + a.numel() + a.shape[0] * N) * 2)
        ref = GroupedMM.mm(a, wt, seg).float()
        impls = {"torch_grouped_mm": GroupedMM} | {c: cutlass.with_config(i) for i, c in enumerate(cutlass.CONFIGS)}
        for name, impl in impls.items():
            try:
                got = impl.mm(a, wt, seg).float()
                s = timer.graph(lambda impl=impl: impl.mm(a, wt, seg))
            except RuntimeError as exc:  # a config the GPU refuses (shared memory): recorded, not fatal
                out.append({"gemm": gemm, "impl": name, "error": str(exc)[:200]})
                continue
            err = ((got - ref).norm() / ref.norm()).item()
            out.append({"gemm": gemm, "impl": name, "ms": s * 1e3, "tflops": flops / s / 1e12,
                        "x_floor": s / floor, "err_vs_torch": err})
    return out


def op_calls(args, best: type) -> dict:
    """Calls of the whole experts op (T, H) -> (T, H): the tuned Triton path; torch._grouped_mm and `best` with
    Triton glue (triton_grouped.py, what a grouped_mm / cutlass table entry runs), `best` also with the SwiGLU
    activation in the up GEMM's epilogue (CutlassConfig.act_epilogue: gate and up GEMMs, no activation pass); the
    torch composite over torch._grouped_mm (the reference: fp32 glue)."""
    x, ids, w, w1, w2 = args
    spec = ExpertsSpec()
    a = (x, ids, w, w1, w2, None, None, spec)
    act = cutlass.with_config(best.config, True)
    return {
        "triton": lambda: dispatch.triton_forward(*a),
        "grouped_torch_grouped_mm": lambda: triton_grouped.experts_forward(GroupedMM, *a),
        f"grouped_{best.name}": lambda: triton_grouped.experts_forward(best, *a),
        f"grouped_{act.name}": lambda: triton_grouped.experts_forward(act, *a),
        "composite_torch_grouped_mm": lambda: torch_experts.experts_forward(GroupedMM, *a),
    }


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[4096, 16384])
    ap.set_defaults(shapes=["qwen3_30b_a3b", "deepseek_v3", "kimi_k2"])
    ap.add_argument("--kernels", action="store_true", help="the op's device time per kernel (profiler)")
    args = ap.parse_args()
    t0 = time.time()
    cutlass.load()
    print(f"csrc/ built or loaded in {time.time() - t0:.0f} s", flush=True)
    gpu = harness.gpu_name()
    out_path = os.path.join(os.environ.get("OUT", "."), "cutlass.jsonl")
    timer = Timer("cuda")
    table = []
    for name in args.shapes:
        E, k, H, I = ALL_SHAPES[name]
        for T in args.tokens:
            inputs = _inputs(E, k, H, I, T)
            rows = gemm_points(timer, E, k, H, I, T, inputs[0], inputs[1], inputs[3], inputs[4])
            timed = [r for r in rows if "ms" in r and r["impl"] != "torch_grouped_mm"]
            by_config = {}
            for r in timed:
                by_config[r["impl"]] = by_config.get(r["impl"], 0.0) + r["ms"]
            best = min(by_config, key=by_config.get) if by_config else None
            calls = op_calls(inputs, cutlass.with_config(cutlass.CONFIGS.index(best))) if best else {}
            rows += [{"op": op, "ms": timer.graph(fn) * 1e3} for op, fn in calls.items()]
            if args.kernels:
                rows += [{"op": op, "kernel": kname, "us": us, "launches": n}
                         for op, fn in calls.items() if not op.startswith("composite")
                         for us, n, kname in harness.kernel_times(fn, calls=10)]
            with open(out_path, "a") as f:
                for r in rows:
                    f.write(json.dumps({"gpu": gpu, "shape": name, "T": T, **r}) + "\n")
            table.append((name, T, rows))
            torch.cuda.empty_cache()
    print(f"\n{'shape':>14} {'T':>6}  GEMM ms (TFLOP/s, x floor) per impl; op ms")
    for name, T, rows in table:
        for r in rows:
            if "gemm" in r:
                cell = (f"{r['ms']:8.3f} ({r['tflops']:4.0f}, {r['x_floor']:.2f}x) err {r['err_vs_torch']:.1e}"
                        if "ms" in r else r["error"][:60])
                print(f"{name:>14} {T:>6}  {r['gemm']:>7} {r['impl']:>26} {cell}")
            elif "kernel" in r:
                print(f"{name:>14} {T:>6}  {'kernel':>7} {r['op']:>26} {r['us'] / 1e3:8.3f} {r['launches']}x "
                      f"{r['kernel'][:60]}")
            else:
                print(f"{name:>14} {T:>6}  {'op':>7} {r['op']:>26} {r['ms']:8.3f}")


if __name__ == "__main__":
    main()
