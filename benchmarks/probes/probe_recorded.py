"""Probe: the experts ops recorded inside torch.compile (ops/inline.py: the Triton launches as Inductor's own,
CUTLASS GEMMs as calls of cutlass.py's ops) against the same compiled call kept opaque (MOE_COMPILER_INLINE=0: the
experts op's layer, checks and Python launches on every call) and the eager op. NOTES.md "session 22".

    python -m benchmarks.probes.probe_recorded [--shapes qwen3_30b_a3b qwen3_235b_a22b deepseek_v3]
        [--tokens 4096] [--models qwen3_235b_a22b] [--fp8] [--kernels]

Per shape and T, bf16 and FP8 (128 x 128 block scales), for the eager op and three compiled calls (opaque,
recorded, recorded with the token count symbolic, NOTES "session 23"): host µs per call (the GPU kept busy,
probe_host.host_us), µs per call from a cold L2 with the call's host time exposed (Timer.eager: what an opaque call
costs where the host does not run ahead), and the GPU time alone (each under a CUDA graph; --kernels: per kernel).
Then, per model (--models, 2 layers, bf16 or with --fp8 its experts in FP8), prefill 1 x 4096 with fused_moe
recorded vs opaque, timed interleaved.
"""

from __future__ import annotations

import os

import torch
import torch._functorch.config
import torch._inductor.config
from torch._dynamo.utils import counters

from moe_compiler.lowering import cutlass
from moe_compiler.lowering.triton_quantized_config import default_config
from moe_compiler.ops import inline
from moe_compiler.spec import ExpertsSpec, QuantizedExpertsSpec
from moe_compiler.testing import rel_err
from moe_compiler.tune.shapes import ALL_SHAPES

from .. import harness
from ..bench_quantized import fp8_weights
from .probe_host import host_us


def compiled_under(inline_on: bool, call, args, symbolic: bool = False):
    """torch.compile(call) bound to args, traced now with launches recorded or the op kept opaque. Each variant is
    its own function object and code object, so Dynamo traces each apart. `symbolic`: the token count compiled as
    a symbol (the row-carrying inputs marked dynamic, as prompts of varying length make it): the config of T's
    band's grid point (triton_config.config_tokens), not T's own."""
    os.environ[inline.INLINE_ENV] = "1" if inline_on else "0"
    if symbolic:
        args = (*(a.clone() for a in args[:3]), *args[3:])  # (the marks stay on the tensors: fresh ones)
        for a in args[:3]:
            torch._dynamo.mark_dynamic(a, 0)
    fn = torch.compile(call, dynamic=None if symbolic else False)
    graphs = counters["stats"]["unique_graphs"]
    try:
        with torch.no_grad():
            fn(*args)
    finally:
        os.environ.pop(inline.INLINE_ENV)
    if counters["stats"]["unique_graphs"] == graphs:
        raise RuntimeError("a compiled variant reused another's trace")
    return lambda: fn(*args)


def op_rows(shapes, tokens, timer, kernels: bool = False):
    rows = []
    for name in shapes:
        E, k, H, I = ALL_SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        w1, q1, s1 = fp8_weights(E, 2 * I, H, "cuda", gen)
        w2, q2, s2 = fp8_weights(E, H, I, "cuda", gen)
        for T in tokens:
            x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
            ids = torch.rand(T, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
            wts = torch.rand(T, k, device="cuda", generator=gen).to(torch.bfloat16)
            forms = {"bf16": (torch.ops.moe_compiler.experts, (x, ids, wts, w1, w2), ExpertsSpec().op_kwargs()),
                     "fp8": (torch.ops.moe_compiler.experts_quantized, (x, ids, wts, q1, s1, q2, s2),
                             QuantizedExpertsSpec().op_kwargs())}
            for fmt, (op, args, kw) in forms.items():
                torch._dynamo.reset()  # (the variants' code objects are traced anew for each row)
                eager = lambda op=op, args=args, kw=kw: op(*args, **kw)  # noqa: E731
                variants = {"eager": eager,
                            "opaque": compiled_under(False, lambda *a, op=op, kw=kw: op(*a, **kw), args),
                            "recorded": compiled_under(True, lambda *a, op=op, kw=kw: op(*a, **kw), args),
                            "symbolic": compiled_under(True, lambda *a, op=op, kw=kw: op(*a, **kw), args, True)}
                row = {"shape": name, "T": T, "fmt": fmt}
                if fmt == "fp8":
                    row["cutlass"] = default_config(x, E, k, QuantizedExpertsSpec(), I=I,
                                                    weights=(q1, s1, q2, s2)).cutlass
                with torch.no_grad():
                    ref = eager().float()
                    for v, fn in variants.items():
                        row[f"{v}_err"] = rel_err(fn().float(), ref)
                        row[f"{v}_host_us"] = host_us(lambda fn=fn: fn())
                        row[f"{v}_eager_us"] = timer.eager(lambda fn=fn: fn()) * 1e6
                        row[f"{v}_graph_us"] = timer.graph(fn, calls=3) * 1e6  # the GPU's time alone
                        if kernels:  # where that time goes, per kernel (profiler)
                            row[f"{v}_kernels"] = [{"us": us, "launches": n, "kernel": kernel}
                                                   for us, n, kernel in harness.kernel_times(fn)]
                            print("\n".join(f"    {v} kernel {k['us']:9.1f} us x{k['launches']} {k['kernel'][:80]}"
                                            for k in row[f"{v}_kernels"]), flush=True)
                    row["graph_us"] = row["eager_graph_us"]
                rows.append(row)
                print(row, flush=True)
    return rows


def model_rows(models, fp8: bool, reps=10):
    from ..bench_models import first_call_s, fp8_model
    from ..models import build

    rows = []
    for name in models:
        model = build(name, layers=2)
        if fp8:  # the routed experts as transformers' FP8Experts (bench_models' fused_fp8 variant)
            model = fp8_model(model)
            torch.cuda.empty_cache()
        ids = torch.randint(0, model.config.vocab_size, (1, 4096), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(0))
        calls, row = {}, {"model": name, "layers": 2, "T": 4096, "fmt": "fp8" if fp8 else "bf16"}
        torch._dynamo.reset()
        # Dynamo hands a second torch.compile of the same module with an equal backend and options the first one's
        # trace (seen: the recorded variant "compiled" in 0.01 s), so the variants differ in an option that changes
        # nothing (the numerical check, on by default, named); a variant that traced nothing is an error.
        for variant, on, options in (("opaque", False, {"moe_compiler.verify": True}), ("recorded", True, None)):
            os.environ[inline.INLINE_ENV] = "1" if on else "0"
            fn = torch.compile(model, backend="fused_moe", dynamic=False, options=options)
            calls[variant] = lambda fn=fn: fn(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            graphs = counters["stats"]["unique_graphs"]
            with torch.no_grad():
                row[f"{variant}_compile_s"] = first_call_s(calls[variant])
            if counters["stats"]["unique_graphs"] == graphs:
                raise RuntimeError(f"{name}: the {variant} variant reused another variant's trace")
            with torch.no_grad():
                for _ in range(3):
                    calls[variant]()
            os.environ.pop(inline.INLINE_ENV)
        with torch.no_grad():
            outs = {v: c().float() for v, c in calls.items()}
            times = harness.interleaved(calls, reps)
        row.update({f"{v}_ms": t * 1e3 for v, t in times.items()})
        row["err"] = rel_err(outs["recorded"], outs["opaque"])
        rows.append(row)
        print(row, flush=True)
        del model, calls
        torch.cuda.empty_cache()
    return rows


def main():
    ap = harness.parser(__doc__, shapes=list(ALL_SHAPES), tokens=[4096], out="recorded")
    ap.set_defaults(shapes=["qwen3_30b_a3b", "qwen3_235b_a22b", "deepseek_v3"])
    ap.add_argument("--models", nargs="*", default=["qwen3_235b_a22b"])
    ap.add_argument("--fp8", action="store_true", help="the models' routed experts in FP8 (transformers' FP8Experts)")
    ap.add_argument("--kernels", action="store_true", help="each variant's GPU time per kernel (profiler)")
    args = ap.parse_args()
    torch._functorch.config.enable_autograd_cache = False  # the opaque and recorded traces share a graph key
    torch._inductor.config.fx_graph_cache = False
    print("CUTLASS", cutlass.mode(), "loaded" if cutlass.buildable() and cutlass.load() else "off", flush=True)
    timer = harness.Timer("cuda")
    rows = op_rows(args.shapes, args.tokens, timer, args.kernels)
    mrows = model_rows(args.models, args.fp8)
    harness.save_rows(args.out, "recorded", rows + mrows, harness.gpu_name())
    variants = ("eager", "opaque", "recorded", "symbolic")
    print(f"{'shape':>16} {'T':>6} {'fmt':>5} | host us eager / opaque / recorded / symbolic | GPU us (graph) "
          f"eager / opaque / recorded / symbolic | err rec / sym")
    for r in rows:
        print(f"{r['shape']:>16} {r['T']:>6} {r['fmt']:>5} | "
              + " ".join(f"{r[f'{v}_host_us']:8.0f}" for v in variants) + " | "
              + " ".join(f"{r[f'{v}_graph_us']:8.0f}" for v in variants)
              + f" | {r['recorded_err']:.1e} {r['symbolic_err']:.1e}")
    for r in mrows:
        print(f"{r['model']} ({r['fmt']}) prefill 1x4096 ms: opaque {r['opaque_ms']:.2f} recorded "
              f"{r['recorded_ms']:.2f} ({r['opaque_ms'] / r['recorded_ms']:.3f}x), err {r['err']:.1e}")


if __name__ == "__main__":
    main()
