"""Probe: where a `generate()` token's time goes outside the compiled decode step (static cache, transformers'
auto-compile through CompileConfig, mode reduce-overhead), for plain Inductor and fused_moe. NOTES.md "generate
host time".

    python -m benchmarks.probes.probe_generate [--shapes gpt_oss_20b qwen3_30b_a3b] [--batch 1] [--tokens 64]
                                               [--out DIR]

Per backend, after a warm-up generate (compiles, CUDA-graph recordings): wall ms per token of one generate; the
GPU's busy time per token (the profiler's CUDA kernel time, summed); how many graphs Dynamo compiled and how many
CUDA graphs Inductor recorded during the timed generate (a recording per token is a cost a replay does not
have); the top host functions of that generate by cumulative time (cProfile) and the profiler's top CPU ops by
self time. With --out, the chrome trace and the cProfile stats land there.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time

import torch

import moe_compiler  # noqa: F401 - registers the fused_moe backend

from .. import harness
from ..models import MODELS, build


def generate_fn(model, backend, B, tokens, prompt=16):
    from transformers import CompileConfig

    ids = torch.randint(0, model.config.vocab_size, (B, prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(B))
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, cache_implementation="static",
                  pad_token_id=0, compile_config=CompileConfig(backend=backend, mode="reduce-overhead"))
    return lambda: model.generate(ids, **kwargs)


def counts():
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            **{k: v for k, v in counters["inductor"].items() if "cudagraph" in k}}


def probe(model, backend, B, tokens, out, tag):
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    fn = generate_fn(model, backend, B, tokens)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn()
        first_s = time.perf_counter() - t0
        fn()
        before = counts()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
        after = counts()
        prof_py = cProfile.Profile()
        prof_py.enable()
        fn()
        torch.cuda.synchronize()
        prof_py.disable()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages())
    s = io.StringIO()
    pstats.Stats(prof_py, stream=s).sort_stats("cumulative").print_stats(45)
    print(f"\n=== {tag}: cProfile of one generate ({tokens} tokens), by cumulative time\n{s.getvalue()}")
    print(f"=== {tag}: profiler CPU ops by self time\n"
          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    if out:
        prof.export_chrome_trace(os.path.join(out, f"{tag}.trace.json"))
        prof_py.dump_stats(os.path.join(out, f"{tag}.prof"))
    return {"first_s": first_s, "ms_per_token": wall_ms / tokens, "gpu_ms_per_token": gpu_us / 1e3 / tokens,
            "new_graphs": after["graphs"] - before["graphs"],
            "cudagraph_counters": {k: v - before.get(k, 0) for k, v in after.items() if k != "graphs"}}


def main():
    ap = harness.parser(__doc__, shapes=MODELS, tokens=None)
    ap.set_defaults(shapes=["gpt_oss_20b", "qwen3_30b_a3b"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generate")
    ap.add_argument("--backends", nargs="+", default=["inductor", "fused_moe"],
                    help="in this order, in one process; one named twice runs twice (does an earlier compile slow "
                         "the host for the next?)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    harness.gpu_name()
    rows = []
    for name in args.shapes:
        model = build(name)
        for i, backend in enumerate(args.backends):  # a backend named twice (inductor fused_moe inductor) runs twice
            r = probe(model, backend, args.batch, args.tokens, args.out, f"{name}_{i}_{backend}_B{args.batch}")
            rows.append({"model": name, "backend": backend, **r})
            print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"\n{'model':>14} {'backend':>10} {'ms/token':>9} {'GPU ms/token':>13} {'host-only ms':>13} "
          f"{'graphs':>7} {'first s':>8}  cudagraph counters during the timed generate")
    for r in rows:
        print(f"{r['model']:>14} {r['backend']:>10} {r['ms_per_token']:9.3f} {r['gpu_ms_per_token']:13.3f} "
              f"{r['ms_per_token'] - r['gpu_ms_per_token']:13.3f} {r['new_graphs']:7d} {r['first_s']:8.1f}  "
              f"{r['cudagraph_counters']}")


if __name__ == "__main__":
    main()
