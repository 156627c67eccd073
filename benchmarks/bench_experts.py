"""Kernel-level benchmark of the experts op against Hugging Face's implementations (DESIGN.md §6).

    python benchmarks/bench_experts.py                       # full grid on the GPU, writes results/<gpu>.json + .png
    python benchmarks/bench_experts.py --shapes qwen3_30b_a3b --tokens 1 16 --routing uniform
    python benchmarks/bench_experts.py --smoke               # tiny shapes, any device: checks the harness runs

Grid: 3 real shapes x T in {1, 16, 128, 1024, 4096, 16384} x {uniform, skewed} routing, bf16.
Floor per point = max(FLOPs / 785 TFLOP/s, bytes / 3.02 TB/s), FLOPs = 6*T*k*H*I, bytes = weights of the
experts actually hit + hidden in + out. Variants (same run, same inputs, same parameters):
    hf_eager          transformers' eager loop (one_hot / nonzero / per-expert GEMMs)
    hf_grouped_mm     transformers' default grouped_mm experts forward (eager)
    hf_batched_mm     transformers' batched_mm (gathers one weight per (token, slot); skipped past 8 GB)
    hf_grouped_mm_tc  hf_grouped_mm under torch.compile (Inductor, dynamic T)
    moe_compiler      torch.ops.moe_compiler.experts
and, for T <= 128, each capturable variant again under a CUDA graph (`*+graph`). Every timed call
starts from a cold L2 (a 256 MB buffer is zeroed before each call, its own time subtracted), so small-T
weights are really read from HBM. moe_compiler's output is checked at every point against an fp32
reference (tests/reference.py), rel err <= 1e-2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import experts_reference_by_expert, rel_err  # noqa: E402

import moe_compiler  # noqa: E402

PEAK_FLOPS = 785e12  # bf16 matmul measured on our H100
PEAK_BYTES = 3.02e12  # device copy measured on our H100

SHAPES = {  # name: (E, k, H, I)
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "deepseek_v3": (256, 8, 7168, 2048),
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
GRAPH_MAX_T = 128
BATCHED_MM_MAX_BYTES = 8 << 30


def make_experts(E, k, H, I, dtype, device):
    """transformers' own experts module (Qwen3MoeExperts: the standard SwiGLU experts every shape uses)."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            experts = Qwen3MoeExperts(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, H**-0.5)
        experts.down_proj.normal_(0, I**-0.5)
    return cfg, experts


def routing(T, E, k, kind, device, gen):
    if kind == "uniform":
        ids = torch.rand(T, E, device=device, generator=gen).argsort(dim=1)[:, :k]
    else:  # skewed: Zipf-like expert popularity, distinct experts per token
        probs = (1.0 / torch.arange(1, E + 1, device=device, dtype=torch.float32) ** 1.2).expand(T, E)
        ids = torch.multinomial(probs, k, replacement=False, generator=gen)
    return ids


def floor_seconds(T, E, k, H, I, ids, itemsize=2):
    flops = 6 * T * k * H * I
    hit = int(torch.unique(ids).numel()) if T else 0
    nbytes = hit * 3 * H * I * itemsize + 2 * T * H * itemsize
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES), flops, nbytes


class Timer:
    """Median seconds per call from a cold L2: CUDA events around graph replays (or eager loops) of
    [flush L2, call] minus [flush L2]. CPU (smoke runs): wall clock."""

    def __init__(self, device, reps=10):
        self.device, self.reps = device, reps
        self.flush_buf = torch.empty(256 << 20, dtype=torch.int8, device=device) if device == "cuda" else None

    def _events(self, body, n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n):
            start.record()
            body()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    def eager(self, fn):
        if self.device != "cuda":
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[1]
        fn()
        torch.cuda.synchronize()
        flush = self.flush_buf.zero_
        t_both = self._events(lambda: (flush(), fn()), self.reps)
        t_flush = self._events(flush, self.reps)
        return max(t_both - t_flush, 0.0)

    def graph(self, fn, calls=10):
        fn()
        torch.cuda.synchronize()
        g_both, g_flush = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_both):
            for _ in range(calls):
                self.flush_buf.zero_()
                fn()
        with torch.cuda.graph(g_flush):
            for _ in range(calls):
                self.flush_buf.zero_()
        g_both.replay()
        g_flush.replay()
        torch.cuda.synchronize()
        t_both = self._events(g_both.replay, 5)
        t_flush = self._events(g_flush.replay, 5)
        return max(t_both - t_flush, 0.0) / calls


def variants(cfg, experts, T, k, H, I, dtype, on_gpu):
    def hf(impl):
        def run(x, ids, w):
            cfg._experts_implementation = impl
            return experts(x, ids, w)
        return run

    def ours(x, ids, w):
        return moe_compiler.moe_experts(x, ids, w, experts.gate_up_proj, experts.down_proj)

    out = {"hf_eager": (hf("eager"), False), "hf_grouped_mm": (hf("grouped_mm"), True)}
    if T * k * 3 * H * I * torch.finfo(dtype).bits // 8 <= BATCHED_MM_MAX_BYTES:
        out["hf_batched_mm"] = (hf("batched_mm"), True)
    if on_gpu:
        out["hf_grouped_mm_tc"] = (compiled_grouped_mm(cfg, experts), False)
    out["moe_compiler"] = (ours, True)
    return out


_COMPILED = {}


def compiled_grouped_mm(cfg, experts):
    key = id(experts)
    if key not in _COMPILED:
        fn = torch.compile(lambda x, ids, w: experts(x, ids, w), dynamic=True)

        def run(x, ids, w):
            cfg._experts_implementation = "grouped_mm"
            return fn(x, ids, w)

        _COMPILED[key] = run
    return _COMPILED[key]


def bench_point(name, cfg, experts, T, kind, timer, device, dtype, gen):
    E, k, H, I = SHAPES[name] if name in SHAPES else SMOKE_SHAPES[name]
    x = torch.randn(T, H, device=device, generator=gen).to(dtype)
    ids = routing(T, E, k, kind, device, gen)
    w = torch.rand(T, k, device=device, generator=gen).to(dtype)
    floor, flops, nbytes = floor_seconds(T, E, k, H, I, ids, torch.finfo(dtype).bits // 8)
    row = {"shape": name, "E": E, "k": k, "H": H, "I": I, "T": T, "routing": kind, "floor_s": floor, "flops": flops, "bytes": nbytes, "times_s": {}}

    with torch.no_grad():
        out = moe_compiler.moe_experts(x, ids, w, experts.gate_up_proj, experts.down_proj)
        ref = experts_reference_by_expert(x, ids, w, experts.gate_up_proj, experts.down_proj, dtype=torch.float32)
        row["rel_err"] = rel_err(out, ref) if T else 0.0
        assert row["rel_err"] <= 1e-2, row
        for vname, (fn, capturable) in variants(cfg, experts, T, k, H, I, dtype, device == "cuda").items():
            try:
                row["times_s"][vname] = timer.eager(lambda: fn(x, ids, w))
                if capturable and device == "cuda" and T <= GRAPH_MAX_T:
                    row["times_s"][vname + "+graph"] = timer.graph(lambda: fn(x, ids, w))
            except Exception as e:  # noqa: BLE001 - OOM or a variant that can't be captured: record, go on
                row["times_s"].setdefault(vname, None)
                row.setdefault("errors", {})[vname] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
    return row


SMOKE_SHAPES = {"smoke": (8, 2, 64, 32)}


def print_table(rows):
    print(f"{'shape':>14} {'T':>6} {'routing':>8} {'floor us':>9} | " + "variant: us (x floor)")
    for r in rows:
        cells = []
        floor = r["floor_s"]
        for v, t in r["times_s"].items():
            cells.append(f"{v} -" if t is None else f"{v} {t * 1e6:.0f} ({t / floor:.1f}x)")
        ours = r["times_s"].get("moe_compiler+graph") or r["times_s"].get("moe_compiler")
        hf = r["times_s"].get("hf_grouped_mm+graph") or r["times_s"].get("hf_grouped_mm")
        tflops = r["flops"] / ours / 1e12 if ours else 0
        speed = f"{hf / ours:.2f}x hf_grouped_mm" if ours and hf else ""
        print(f"{r['shape']:>14} {r['T']:>6} {r['routing']:>8} {r['floor_s'] * 1e6:>9.1f} | ours {tflops:.0f} TFLOP/s, {speed} | " + "; ".join(cells))


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written ({path}); `pip install matplotlib` for it")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for kind, style in (("uniform", "-"), ("skewed", "--")):
            pts = [r for r in rows if r["shape"] == shape and r["routing"] == kind]
            names = sorted({v for r in pts for v in r["times_s"]})
            for v in names:
                xs = [r["T"] for r in pts if r["times_s"].get(v)]
                ys = [r["times_s"][v] / r["floor_s"] for r in pts if r["times_s"].get(v)]
                if xs:
                    ax.plot(xs, ys, style, marker="o", label=f"{v} ({kind})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(shape)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / roofline floor")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--routing", nargs="+", default=["uniform", "skewed"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device: harness check only")
    p.add_argument("--from-jsonl", help="re-make the table, JSON and plot from a (partial) .jsonl of an earlier run")
    args = p.parse_args()
    if args.from_jsonl:
        rows = [json.loads(line) for line in open(args.from_jsonl)]
        stem = args.from_jsonl.removesuffix(".jsonl")
        return finish(rows, stem, {"gpu": os.path.basename(stem), "from": args.from_jsonl, "peak_flops": PEAK_FLOPS, "peak_bytes": PEAK_BYTES})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.shapes, args.tokens = list(SMOKE_SHAPES), [1, 5]
    gpu = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, gpu + ("_smoke" if args.smoke else ""))
    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in args.shapes:
        E, k, H, I = SHAPES[name] if name in SHAPES else SMOKE_SHAPES[name]
        cfg, experts = make_experts(E, k, H, I, dtype, device)
        for T in args.tokens:
            for kind in args.routing:
                rows.append(bench_point(name, cfg, experts, T, kind, timer, device, dtype, gen))
                with open(stem + ".jsonl", "a") as f:  # partial results survive a time-out
                    f.write(json.dumps(rows[-1]) + "\n")
        del experts
        _COMPILED.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    meta = {"gpu": gpu, "torch": torch.__version__, "dtype": str(dtype), "peak_flops": PEAK_FLOPS, "peak_bytes": PEAK_BYTES}
    finish(rows, stem, meta)


def finish(rows, stem, meta):
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, stem + ".png")
    print_table(rows)
    ratios = [
        (r["times_s"].get("hf_grouped_mm+graph") or r["times_s"]["hf_grouped_mm"]) / (r["times_s"].get("moe_compiler+graph") or r["times_s"]["moe_compiler"])
        for r in rows if r["T"] and r["times_s"].get("moe_compiler") and r["times_s"].get("hf_grouped_mm")
    ]
    if ratios:
        gmean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"moe_compiler vs hf_grouped_mm: geometric mean {gmean:.2f}x, min {min(ratios):.2f}x over {len(ratios)} points")


if __name__ == "__main__":
    main()
