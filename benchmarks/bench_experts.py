"""Kernel-level benchmark of the experts op against Hugging Face's implementations (DESIGN.md §6).

    python -m benchmarks.bench_experts                 # full grid on the GPU, writes results/<gpu>.json + .png
    python -m benchmarks.bench_experts --shapes qwen3_30b_a3b --tokens 1 16 --routing uniform   # merged by cell
    python -m benchmarks.bench_experts --smoke         # tiny shapes, any device: checks the harness runs
    python -m benchmarks.bench_experts --from-jsonl benchmarks/results/<gpu>.jsonl   # tables of a (partial) run

Grid: the 13 real shapes of moe_compiler.tune.shapes.ALL_SHAPES x T in {1, 16, 128, 1024, 4096, 16384} x
{uniform, skewed_shuffled} routing (the tuner's two: Zipf-like popularity with the popular experts at random
ids, as a trained router places them; `--routing skewed`, the runs up to session 38, puts them at adjacent ids,
so the sorted GEMMs run the hot experts' tiles and then the cold ones' in two phases, which real routing does
not: NOTES.md session 33), bf16, each shape in the experts module of its model where that layout differs from
Qwen3's (GPT-OSS: GptOssExperts, [E, H, 2I] interleaved / [E, I, H] with biases; harness.hf_experts).
`--routing ep2` (not in the grid's targets): what one rank's experts compute under
transformers' all-reduce expert parallelism over 2 GPUs, on one GPU — its E/2 experts, every route to the other
rank's experts the sentinel id E/2 with weight 0 (issue 20: the GEMVs skip sentinel pairs).
Floor per point = harness.floor_s(FLOPs, bytes) (the measured peaks of the GPU
it runs on), FLOPs = 6*T*k*H*I, bytes =
weights of the experts actually hit + hidden in + out. Variants (same run, same inputs, same parameters):
    hf_eager            transformers' eager loop (one_hot / nonzero / per-expert GEMMs)
    hf_grouped_mm       transformers' default grouped_mm experts forward (eager)
    hf_batched_mm       transformers' batched_mm (gathers one weight per (token, slot); skipped past 8 GB)
    hf_grouped_mm_tc    hf_grouped_mm under torch.compile (Inductor, dynamic T)                   GPU only
    moe_torch_v0        our torch composite (torch_experts.py; grouped_mm on CUDA bf16)           GPU only
    moe_atomic_combine  our sorted Triton path with the fp32-atomic combine, not gather-and-sum   GPU only
    moe_cutlass         csrc/'s CUTLASS grouped GEMMs with Triton glue (triton_grouped.py; the table's
                        CUTLASS config, else config 0), where it runs (sm90, built), T * k >= E   GPU only
    moe_compiler        torch.ops.moe_compiler.experts
and each capturable variant again under a CUDA graph (`*+graph`) at T <= --graph-max-t: by default at every T,
as the shapes issue's targets are stated (CUDA graphs; its GPU time, without the host's launch time, which a
model compiled in default mode pays at decode: bench_models measures that). `--graph-max-t 128` is the method
of the runs up to session 38 (prefill eager, as an eager model runs it). Every timed call
starts from a cold L2 (a 256 MB buffer is read before each call, its own time subtracted;
moe_compiler/tune/timing.py), so small-T weights are really read from HBM. moe_compiler's output is checked at
every point against an fp32 reference (moe_compiler.testing), rel err <= 1e-2.
"""


from __future__ import annotations

import dataclasses
import json
import os

import torch

import moe_compiler
from moe_compiler.lowering import cutlass, dispatch, torch_experts, triton_grouped
from moe_compiler.testing import experts_reference_by_expert, rel_err
from moe_compiler.tune.shapes import ALL_SHAPES as REAL_SHAPES
from moe_compiler.tune.shapes import KINDS, ROUTINGS, routes

from . import harness

SMOKE_SHAPES = {"smoke": (8, 2, 64, 32)}
ALL_SHAPES = {**REAL_SHAPES, **SMOKE_SHAPES}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
BATCHED_MM_MAX_BYTES = 8 << 30

BASELINES = ["hf_eager", "hf_grouped_mm", "hf_batched_mm", "hf_grouped_mm_tc", "moe_torch_v0"]
CURVES = BASELINES + ["moe_atomic_combine", "moe_cutlass", "moe_compiler"]
COLORS = dict(zip(CURVES, ["tab:gray", "tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:cyan", "tab:green",
                           "tab:blue"]))

# The shapes issue's targets (H200, bf16, CUDA graphs at every T): every point >= 1.0x HF grouped_mm and >= 1.15x
# at T >= 1024; T <= 128 within 1.25x the floor; T >= 4096 within PREFILL_FLOOR_RATIO x the floor (1.35x, 1.2x
# for the shapes below); the geometric mean vs HF grouped_mm >= 0.85x the at-floor bound.
PREFILL_FLOOR_RATIO = {"mixtral_8x7b": 1.2, "mixtral_8x22b": 1.2, "gpt_oss_20b": 1.2, "gpt_oss_120b": 1.2}


def routing(T, E, k, kind, gen):
    """ids [T, k]: tune.shapes.routes (uniform, skewed, skewed_shuffled), or ep2's."""
    if kind != "ep2":
        return routes(T, E, k, kind, gen)
    # ep2: rank 0 of 2 holds experts [0, E/2); the rest are its sentinel E/2 (transformers' remap)
    ids = routes(T, E, k, "uniform", gen)
    return torch.where(ids < E // 2, ids, E // 2)


def held_experts(E: int, kind: str) -> int:
    """The experts one process holds: all E, or rank 0's E/2 under ep2."""
    return E // 2 if kind == "ep2" else E


def floor_seconds(T, E, k, H, I, ids, itemsize=2):
    """Floor, FLOPs and bytes of the live pairs: ids < E (E: the experts held; E itself is the sentinel)."""
    live = ids[ids < E]
    flops = 6 * live.numel() * H * I
    hit = int(torch.unique(live).numel())
    nbytes = hit * 3 * H * I * itemsize + 2 * T * H * itemsize
    return harness.floor_s(flops, nbytes), flops, nbytes


def variants(cfg, experts, T, k, H, I, dtype, on_gpu):
    """{name: (fn(x, ids, w), capturable in a CUDA graph)}."""
    ops, spec = harness.op_operands(experts)  # (w_gate_up, w_down, b_gate_up, b_down) in the module's layout
    def ours(x, ids, w):
        return moe_compiler.moe_experts(x, ids, w, *ops, spec=spec)

    def ours_v0(x, ids, w):
        impl = dispatch.select(x, ops[0], ops[1])
        return torch_experts.experts_forward(impl, x, ids, w, *ops, spec)

    def ours_atomic(x, ids, w):
        from moe_compiler.lowering.triton_config import Combine, Path

        config = dispatch.triton_config_for(x, ids, ops[0], I, spec.transposed)
        if config.path is Path.SORTED:
            # The fp32 atomic epilogue of a warp-specialized down GEMM needs more shared memory than a block
            # has (NOTES.md v3): this variant runs the down GEMM without the specialization.
            down = dataclasses.replace(config.down, warp_specialize=False)
            config = dataclasses.replace(config, combine=Combine.ATOMIC, down=down)
        return dispatch.triton_forward(x, ids, w, *ops, spec, config)

    def ours_cutlass(x, ids, w):
        from moe_compiler.lowering.triton_config import CutlassConfig

        config = dispatch.triton_config_for(x, ids, ops[0], I, spec.transposed)
        impl = (cutlass.with_config(config.config, config.act_epilogue) if isinstance(config, CutlassConfig)
                else cutlass.with_config(0))
        return triton_grouped.experts_forward(impl, x, ids, w, *ops, spec)

    out = {"hf_eager": (harness.hf_forward(cfg, experts, "eager"), False),
           "hf_grouped_mm": (harness.hf_forward(cfg, experts, "grouped_mm"), True)}
    if T * k * 3 * H * I * torch.finfo(dtype).bits // 8 <= BATCHED_MM_MAX_BYTES:
        out["hf_batched_mm"] = (harness.hf_forward(cfg, experts, "batched_mm"), True)
    if on_gpu:
        out["hf_grouped_mm_tc"] = (compiled_grouped_mm(cfg, experts), False)
        out["moe_torch_v0"] = (ours_v0, True)
        out["moe_atomic_combine"] = (ours_atomic, True)
    w1, w2 = ops[:2]
    # (cutlass.runs asks for the hidden's dtype and device: w1's)
    if on_gpu and T * k >= w1.shape[0] and not spec.transposed and cutlass.runs(w1, w1, w2):
        out["moe_cutlass"] = (ours_cutlass, True)
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


def bench_point(name, cfg, experts, T, kind, timer, device, dtype, gen, only=(), graph_max_t=TOKENS[-1]):
    E, k, H, I = ALL_SHAPES[name]
    x = torch.randn(T, H, device=device, generator=gen).to(dtype)
    ids = routing(T, E, k, kind, gen)
    w = torch.rand(T, k, device=device, generator=gen).to(dtype)
    held = experts.gate_up_proj.shape[0]  # E, or E/2 under ep2 (sentinel pairs: weight 0, as transformers sets)
    w = torch.where(ids < held, w, 0.0)
    floor, flops, nbytes = floor_seconds(T, held, k, H, I, ids, torch.finfo(dtype).bits // 8)
    row = {"shape": name, "E": E, "k": k, "H": H, "I": I, "T": T, "routing": kind, "floor_s": floor, "flops": flops,
           "bytes": nbytes, "times_s": {}}

    with torch.no_grad():
        ops, spec = harness.op_operands(experts)
        out = moe_compiler.moe_experts(x, ids, w, *ops, spec=spec)
        ref = experts_reference_by_expert(x, ids, w, ops[0], ops[1], spec, torch.float32, ops[2], ops[3])
        row["rel_err"] = rel_err(out, ref) if T else 0.0
        assert row["rel_err"] <= 1e-2, row
        for vname, (fn, capturable) in variants(cfg, experts, T, k, H, I, dtype, device == "cuda").items():
            if only and vname not in only:
                continue
            try:
                row["times_s"][vname] = timer.eager(lambda: fn(x, ids, w))
                if capturable and device == "cuda" and T <= graph_max_t:
                    row["times_s"][vname + "+graph"] = timer.graph(lambda: fn(x, ids, w))
            except Exception as e:  # noqa: BLE001 - OOM or a variant that can't be captured: record, go on
                row["times_s"].setdefault(vname, None)
                first = str(e).splitlines()[0][:160] if str(e) else ""
                row.setdefault("errors", {})[vname] = f"{type(e).__name__}: {first}"
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
    return row


def best_time(row, variant):
    """A variant's time at a grid point: under a CUDA graph where it was captured (T <= --graph-max-t), else
    eager."""
    t = row["times_s"]
    return t.get(variant + "+graph") or t.get(variant)


def print_table(rows):
    head = (f"{'shape':>14} {'T':>6} {'routing':>8} {'floor us':>9} {'ours us':>9} {'x floor':>7} {'TFLOP/s':>7} "
            "| speedup vs")
    print(head + " " + " ".join(f"{b:>16}" for b in BASELINES))
    for r in rows:
        ours = best_time(r, "moe_compiler")
        if not ours:
            continue
        cells = []
        for b in BASELINES:
            t = best_time(r, b)
            cells.append(f"{t / ours:>15.2f}x" if t else f"{'-':>16}")
        print(f"{r['shape']:>14} {r['T']:>6} {r['routing']:>8} {r['floor_s'] * 1e6:>9.1f} {ours * 1e6:>9.1f} "
              f"{ours / r['floor_s']:>7.2f} {r['flops'] / ours / 1e12:>7.0f} |           " + " ".join(cells))


def targets(rows):
    lines, ratios, bounds = [], [], []
    for r in rows:
        ours, hf = best_time(r, "moe_compiler"), best_time(r, "hf_grouped_mm")
        if not r["T"] or not ours or r["routing"] == "ep2":  # (ep2 is not in the shapes issue's grid)
            continue
        name = f"{r['shape']} T={r['T']} {r['routing']}"
        if hf:
            ratios.append(hf / ours)
            bounds.append(hf / r["floor_s"])  # the speedup of a kernel that ran exactly at the floor
            goal = 1.15 if r["T"] >= 1024 else 1.0
            lines.append((hf / ours >= goal, f"vs HF   {name}: {hf / ours:.2f}x HF grouped_mm (goal >= {goal}x)"))
        ratio = ours / r["floor_s"]
        if r["T"] <= 128:
            lines.append((ratio <= 1.25, f"decode  {name}: {ours * 1e6:.1f} us = {ratio:.2f}x floor (goal <= 1.25x)"))
        if r["T"] >= 4096:
            goal = PREFILL_FLOOR_RATIO.get(r["shape"], 1.35)
            lines.append((ratio <= goal, f"prefill {name}: {ours * 1e6:.0f} us = {ratio:.2f}x floor, "
                                         f"{r['flops'] / ours / 1e12:.0f} TFLOP/s (goal <= {goal}x)"))
    for ok, text in lines:
        print(("  met    " if ok else "  MISSED ") + text)
    if ratios:
        measured, bound = harness.geomean(ratios), harness.geomean(bounds)
        print(f"moe_compiler vs hf_grouped_mm over {len(ratios)} points: geometric mean {measured:.2f}x, min "
              f"{min(ratios):.2f}x; a kernel at the roofline floor at every point: {bound:.2f}x; measured / bound "
              f"{measured / bound:.2f} (goal >= 0.85)")


def plot(rows, path):
    plt = harness.pyplot(path)
    if plt is None:
        return
    shapes = [s for s in ALL_SHAPES if any(r["shape"] == s for r in rows)]
    cols = min(4, len(shapes))  # the whole list in rows of four panels, not one strip 13 panels wide
    nrows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.8 * nrows), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax, shape in zip(axes.flat, shapes):
        for kind, style in (("uniform", "-"), ("skewed_shuffled", ":"), ("skewed", "--")):
            pts = sorted((r for r in rows if r["shape"] == shape and r["routing"] == kind and r["T"]),
                         key=lambda r: r["T"])
            for v in CURVES:
                xy = [(r["T"], best_time(r, v) / r["floor_s"]) for r in pts if best_time(r, v)]
                if xy:
                    ax.plot(*zip(*xy), style, marker="o", ms=3, color=COLORS[v], lw=2.2 if v == "moe_compiler" else 1.1,
                            label=v if kind == "uniform" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.25, color="k", lw=0.5, ls="--")
        E, k, H, I = ALL_SHAPES[shape]
        ax.set_title(f"{shape} (E={E}, k={k}, H={H}, I={I})", fontsize=9)
        graphs = [r["T"] for r in rows if r["shape"] == shape and "moe_compiler+graph" in r["times_s"]]
        ax.set_xlabel(f"tokens T (CUDA graphs for T <= {max(graphs, default=0)})")
        ax.set_ylabel("time / roofline floor")
    axes[0][0].legend(fontsize=7, loc="upper left", title="solid: uniform, dotted: skewed_shuffled, dashed: skewed",
                      title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=TOKENS)
    p.set_defaults(shapes=list(REAL_SHAPES))
    p.add_argument("--routing", nargs="+", choices=[*KINDS, "ep2"], default=list(ROUTINGS))
    p.add_argument("--out", default=harness.RESULTS, help="directory of the results (<gpu>.json, .jsonl, .png)")
    p.add_argument("--variants", nargs="+", choices=CURVES, metavar="NAME", help=f"time only these of {CURVES}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device: harness check only")
    p.add_argument("--graph-max-t", type=int, default=TOKENS[-1],
                   help="time under CUDA graphs too up to this T (default: every T of the grid; 128: decode only)")
    p.add_argument("--from-jsonl", help="re-make the table, JSON and plot from a (partial) .jsonl of an earlier run")
    args = p.parse_args()
    if args.from_jsonl:
        stem = args.from_jsonl.removesuffix(".jsonl")
        meta = {"gpu": os.path.basename(stem), "from": args.from_jsonl}
        return finish(merged([], harness.read_jsonl(args.from_jsonl)), stem, meta)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.shapes, args.tokens = list(SMOKE_SHAPES), [1, 5]
    os.makedirs(args.out, exist_ok=True)
    stem = harness.result_path("", "_smoke" if args.smoke else "", args.out, device)
    timer = harness.Timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in args.shapes:
        E, k, H, I = ALL_SHAPES[name]
        held = {n: harness.hf_experts(n, k, H, I, dtype, device, own_layout=True)
                for n in {held_experts(E, r) for r in args.routing}}
        for T in args.tokens:
            for kind in args.routing:
                cfg, experts = held[held_experts(E, kind)]
                rows.append(bench_point(name, cfg, experts, T, kind, timer, device, dtype, gen, args.variants or (),
                                       args.graph_max_t))
                harness.append_jsonl(stem + ".jsonl", rows[-1])
        del held, experts
        _COMPILED.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    peak_flops, peak_bytes = harness.peaks()
    meta = {"gpu": harness.device_label(device), "torch": torch.__version__, "dtype": str(dtype),
            "peak_flops": peak_flops, "peak_bytes": peak_bytes, "graph_max_t": args.graph_max_t}
    if os.path.exists(stem + ".json"):  # a run of some points updates those cells of the committed table
        with open(stem + ".json") as f:
            earlier = json.load(f)["rows"]
        ran = len(rows)
        rows = merged(earlier, rows)
        meta["cells_kept_from_earlier_runs"] = len(rows) - ran
    finish(rows, stem, meta)


CELL = ("shape", "T", "routing")


def merged(earlier, rows):
    """earlier's rows of the cells (shape, T, routing) rows lacks, then rows, the last row of a cell winning (a
    .jsonl appended to by several runs): a row stays one run's, so its variants' ratios are same-run ones."""
    cells = {tuple(r[c] for c in CELL): r for r in [*earlier, *rows]}
    return list(cells.values())


def finish(rows, stem, meta):
    harness.write_json(stem + ".json", {"meta": meta, "rows": rows})
    plot(rows, stem + ".png")
    print_table(rows)
    targets(rows)


if __name__ == "__main__":
    main()
