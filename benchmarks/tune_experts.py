"""Tune the Triton experts kernels on this GPU and write moe_compiler/lowering/configs/<gpu>.json.

    python benchmarks/tune_experts.py                                  # the three benchmark shapes, bf16
    python benchmarks/tune_experts.py --shape 128,8,2048,768 --dtype bfloat16 --tokens 1 16 128
    python benchmarks/tune_experts.py --merge                          # keep other shapes' entries in the file
    python benchmarks/tune_experts.py --refine --tokens 1024 16384     # raster / grid / warp spec of existing entries

For each shape (E, k, H, I) and T: uniform random routing; candidates of the decode path (T*k small) and
of the sorted path for the block_m values that suit T*k/E rows per expert. Each kernel is timed alone
(gate_up and down configs are independent), under a CUDA graph from a cold L2 (timing.py), median of
replays; per block_m the best gate_up + down (+ align + combine, fixed) goes on, with the raster group and
persistent grid tuned on it; of the decode path the top three gate_up x top three down pairs go on. The
final times each remaining option and the untuned default as a whole forward (rounds interleaved, median):
single kernel timings of 10-25 us decode kernels are within the timing noise, and a whole forward also
counts launch gaps and each path's extra kernels. The winner is checked against an fp32 reference.
Candidates are compiled first by a pool of processes on a small-E copy of the problem (E does not enter
the GEMM kernels' specialization), so the timing loop only loads cached kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import experts_reference_by_expert, rel_err  # noqa: E402
from timing import Timer  # noqa: E402

from moe_compiler import lowering  # noqa: E402
from moe_compiler.lowering import triton_align, triton_config, triton_decode, triton_experts  # noqa: E402
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig, SortedConfig  # noqa: E402
from moe_compiler.spec import ExpertsSpec  # noqa: E402

SHAPES = {  # name: (E, k, H, I), as in bench_experts.py
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "deepseek_v3": (256, 8, 7168, 2048),
}
TOKENS = [1, 4, 16, 64, 128, 512, 1024, 4096, 16384]
SPEC = ExpertsSpec()
SMEM_BYTES = 220 * 1024  # Hopper: 227 KB per block; keep a margin for the epilogue


def decode_candidates(slots: int = 1) -> list[KernelConfig]:
    """GEMV tiles; the down kernel loads `slots` (k rounded up to a power of two) tiles of [bn, bk] per step.
    Stages: weight steps in flight per program (1: none; the GEMV loops pipeline all their loads)."""
    out = []
    for bn, bk, warps, stages in itertools.product([2, 4, 8, 16, 32, 64], [64, 128, 256, 512], [4, 8], [1, 2, 3, 4]):
        if 2048 <= slots * bn * bk <= 16384:
            out.append(KernelConfig(bn, bk, warps, stages))
    return out


def _fits(bm, bn_total, bk, stages, itemsize):
    return (bm * bk + bk * bn_total) * itemsize * stages <= SMEM_BYTES


def sorted_candidates(block_m: int, itemsize: int, gate_up: bool) -> list[KernelConfig]:
    """Tiles for one GEMM; the gate_up tile is 2*block_n wide (gate and up)."""
    if block_m <= 32:  # memory-bound: long K steps, deep pipelines
        ns, ks, ws = [32, 64, 128], [64, 128, 256], [(4, 3), (4, 4), (4, 5)]
    else:
        ns, ks, ws = ([64, 128], [64, 128], [(4, 3), (4, 4), (8, 3), (8, 4)])
        if not gate_up:
            ns = [64, 128, 256]
    out = []
    for bn, bk, (warps, stages) in itertools.product(ns, ks, ws):
        if _fits(block_m, (2 if gate_up else 1) * bn, bk, stages, itemsize):
            out.append(KernelConfig(bn, bk, warps, stages))
    return out


def block_m_candidates(T, k, E) -> list[int]:
    m = T * k / E
    if m <= 8:
        return [16]
    if m <= 24:
        return [16, 32]
    if m <= 64:
        return [32, 64]
    if m <= 160:
        return [64, 128]
    # 256-row blocks (each weight tile read once per 256 rows) measured 1.25-1.7x slower (NOTES v3)
    return [64, 128]


def problem(T, E, k, H, I, dtype, device="cuda", seed=0, weights=None):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    ids = torch.rand(T, E, device=device, generator=g).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, device=device, generator=g).to(dtype)
    if weights is None:
        w1 = (torch.randn(E, 2 * I, H, device=device, generator=g) * H**-0.5).to(dtype)
        w2 = (torch.randn(E, H, I, device=device, generator=g) * I**-0.5).to(dtype)
        weights = (w1, w2)
    return x, ids, w, *weights


def benches(shape_names, tokens, dtype):
    """(shape name, T, Bench) for each named shape and T; one set of weights per shape, freed before the next
    shape's (the caller drops its Bench at the end of each step)."""
    for name in shape_names:
        E, k, H, I = SHAPES[name]
        weights = None
        for T in tokens:
            x, ids, w, w1, w2 = problem(T, E, k, H, I, dtype, weights=weights)
            weights = (w1, w2)
            yield name, T, Bench(x, ids, w, w1, w2)
        del weights
        torch.cuda.empty_cache()


# --- launching one kernel of a config on a problem --------------------------------------------------

class Bench:
    """Buffers of one (T, shape) problem and closures launching each kernel with a given config."""

    def __init__(self, x, ids, w, w1, w2):
        self.x, self.ids, self.w, self.w1, self.w2 = x, ids, w, w1, w2
        self.T, self.H = x.shape
        self.k = ids.shape[1]
        self.E, self.I = w1.shape[0], w2.shape[2]
        self._rows = {}

    def rows(self, block_m):
        if block_m not in self._rows:
            self._rows[block_m] = triton_align.align_rows(self.ids, self.E, block_m)
        return self._rows[block_m]

    def decode_gate_up(self, kc: KernelConfig):
        ids = self.ids.reshape(-1).contiguous()
        act = self.x.new_empty(self.T * self.k, self.I)
        ok = torch.empty(1, dtype=torch.int32, device=self.x.device)
        cfg = DecodeConfig(kc, kc)
        return lambda: triton_decode.launch_gate_up(self.x, ids, self.w1, None, SPEC, cfg, self.k, act, ok)

    def decode_down(self, kc: KernelConfig):
        ids = self.ids.reshape(-1).contiguous()
        act = torch.randn(self.T * self.k, self.I, device=self.x.device).to(self.x.dtype)
        out = self.x.new_empty(self.T, self.H)
        cfg = DecodeConfig(kc, kc)
        return lambda: triton_decode.launch_down(act, ids, self.w.reshape(-1), self.w2, None, SPEC, cfg, self.k, out)

    def align(self, block_m):
        return lambda: triton_align.align_rows(self.ids, self.E, block_m)

    def sorted_gate_up(self, cfg: SortedConfig):
        rows = self.rows(cfg.block_m)
        act = self.x.new_empty(rows.sorted_rows.numel(), self.I)
        return lambda: triton_experts.launch_gate_up(self.x, rows, self.w1, None, SPEC, cfg, self.k, act)

    def sorted_down(self, cfg: SortedConfig):
        rows = self.rows(cfg.block_m)
        act = torch.randn(rows.sorted_rows.numel(), self.I, device=self.x.device).to(self.x.dtype)
        y = self.x.new_empty(rows.sorted_rows.numel(), self.H)
        return lambda: triton_experts.launch_down(act, rows, self.w2, None, self.w.reshape(-1), SPEC, cfg, self.k, y)

    def combine(self, block_m):
        rows = self.rows(block_m)
        y = torch.randn(rows.sorted_rows.numel(), self.H, device=self.x.device).to(self.x.dtype)
        out = self.x.new_empty(self.T, self.H)
        return lambda: triton_experts.launch_combine(y, rows, self.k, out)


def sorted_config(block_m, gate_up=None, down=None, **kw):
    base = KernelConfig(64, 64)
    return SortedConfig(block_m=block_m, gate_up=gate_up or base, down=down or base, **kw)


def jobs_for(shape, dtype, tokens):
    """Every (kind, config) the timing loop will launch for this shape: the compile list."""
    E, k, H, I = shape
    itemsize = torch.finfo(dtype).bits // 8
    jobs = set()
    for T in tokens:
        if T * k <= triton_decode.MAX_PAIRS and T * k <= E:
            jobs |= {("decode_gate_up", kc) for kc in decode_candidates()}
            jobs |= {("decode_down", kc) for kc in decode_candidates(triton.next_power_of_2(k))}
        for bm in block_m_candidates(T, k, E):
            for tma in (False, True):
                jobs |= {("sorted_gate_up", sorted_config(bm, gate_up=kc, tma=tma)) for kc in sorted_candidates(bm, itemsize, True)}
                jobs |= {("sorted_down", sorted_config(bm, down=kc, tma=tma)) for kc in sorted_candidates(bm, itemsize, False)}
    return sorted(jobs, key=repr)


def _compile_worker(args):
    """Launch each job once on a small-E copy of the problem (T = 1 and 16: both int specializations)."""
    shape, dtype_name, jobs = args
    E, k, H, I = shape
    dtype = getattr(torch, dtype_name)
    small_e = 16 if E % 16 == 0 else 2
    failed = []
    weights = None
    for T in (1, 16):
        x, ids, w, w1, w2 = problem(T, small_e, min(k, small_e), H, I, dtype, weights=weights)
        weights = (w1, w2)
        b = Bench(x, ids, w, w1, w2)
        for kind, cfg in jobs:
            try:
                getattr(b, kind)(cfg)()
            except Exception as e:  # noqa: BLE001 - out of shared memory / registers: drop the candidate
                failed.append((kind, repr(cfg), f"{type(e).__name__}: {str(e)[:120]}"))
    torch.cuda.synchronize()
    return failed


def precompile(shape, dtype, tokens, workers):
    jobs = jobs_for(shape, dtype, tokens)
    chunks = [(shape, str(dtype).removeprefix("torch."), jobs[i::workers]) for i in range(workers)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = [f for part in pool.map(_compile_worker, chunks) for f in part]
    print(f"  compiled {len(jobs)} kernel variants in {time.time() - t0:.0f} s with {workers} processes; {len(failed)} failed", flush=True)
    return {(kind, cfg) for kind, cfg, _ in failed}


# --- the search ------------------------------------------------------------------------------------

def best_of(timer, make, candidates, failed, kind):
    """[(seconds, candidate)] fastest first; candidates that failed to compile are skipped."""
    results = []
    for c in candidates:
        if (kind, repr(c)) in failed:
            continue
        try:
            results.append((timer.graph(make(c), calls=timer.calls, replays=5), c))
        except Exception as e:  # noqa: BLE001
            print(f"    {kind} {c}: {type(e).__name__}: {str(e)[:100]}")
            torch.cuda.synchronize()
    results.sort(key=lambda r: r[0])
    return results


def tune_point(b: Bench, timer, dtype, failed, log):
    """(whole-forward seconds, config, parts) of the winner, and the untuned default's whole-forward seconds."""
    T, k, E = b.T, b.k, b.E
    itemsize = torch.finfo(dtype).bits // 8
    options = []  # (total seconds, config, parts)
    if T * k <= triton_decode.MAX_PAIRS and T * k <= E:
        gu = best_of(timer, b.decode_gate_up, decode_candidates(), failed, "decode_gate_up")
        dn = best_of(timer, b.decode_down, decode_candidates(triton.next_power_of_2(k)), failed, "decode_down")
        # A decode kernel alone takes 10-25 us, about the noise of one graph timing (+-2 us): the fastest of
        # ~100 single timings is partly luck, so the top three of each go on to the whole-forward final.
        for tg, g in gu[:3]:
            for td, d in dn[:3]:
                options.append((tg + td, DecodeConfig(g, d), {"gate_up": tg, "down": td}))
    for bm in block_m_candidates(T, k, E):
        t_align = timer.graph(b.align(bm), calls=timer.calls)
        t_comb = timer.graph(b.combine(bm), calls=timer.calls)
        tmas = (False, True)
        gu = best_of(timer, b.sorted_gate_up,
                     [sorted_config(bm, gate_up=c, tma=t) for t in tmas for c in sorted_candidates(bm, itemsize, True)], failed, "sorted_gate_up")
        dn = best_of(timer, b.sorted_down,
                     [sorted_config(bm, down=c, tma=t) for t in tmas for c in sorted_candidates(bm, itemsize, False)], failed, "sorted_down")
        # Both kernels share config.tma: keep the best pair that agrees on it.
        pairs = [(tg + td, g, d) for tg, g in gu[:6] for td, d in dn[:6] if g.tma == d.tma]
        if not pairs:
            continue
        _, g, d = min(pairs, key=lambda x: x[0])
        base = sorted_config(bm, gate_up=g.gate_up, down=d.down, tma=g.tma)
        best = tune_raster(b, timer, base, min(pairs, key=lambda x: x[0])[0])
        parts = {"align": t_align, "gemms": best[0], "combine": t_comb, "gate_up_top3": [(t, repr(c)) for t, c in gu[:3]], "down_top3": [(t, repr(c)) for t, c in dn[:3]]}
        options.append((t_align + best[0] + t_comb, best[1], parts))
    # The final: every option and the untuned default as a whole forward (launch gaps, the id check and
    # the path's own extra kernels included), rounds interleaved, median.
    default = triton_config.default_config(dtype, b.E, k, b.H, b.I, T)
    forward = forward_times(timer, b, [cfg for _, cfg, _ in options] + [default])
    final = [(forward[cfg], cfg, {**parts, "kernels": total}) for total, cfg, parts in options] + [(forward[default], default, {"default": True})]
    final.sort(key=lambda o: o[0])
    for t, cfg, parts in final:
        log.write(json.dumps({"T": T, "E": E, "k": k, "H": b.H, "I": b.I, "us": t * 1e6, "config": triton_config.to_dict(cfg), "parts": parts}) + "\n")
    return (*final[0], forward[default])


def forward_times(timer, b: Bench, configs, rounds: int = 3) -> dict:
    """Median whole-forward seconds of each config, the rounds interleaved (slow drifts hit all alike)."""
    times = {cfg: [] for cfg in configs}
    for _ in range(rounds):
        for cfg in times:
            times[cfg].append(timer.graph(lambda cfg=cfg: lowering.triton_forward(b.x, b.ids, b.w, b.w1, b.w2, None, None, SPEC, cfg), calls=timer.calls))
    return {cfg: sorted(ts)[len(ts) // 2] for cfg, ts in times.items()}


def tune_raster(b: Bench, timer, base: SortedConfig, t_base: float) -> tuple[float, SortedConfig]:
    """(gate_up + down seconds, config): the raster group and persistent grid (both kernels share them) on
    the winning tiles, and the down GEMM's warp specialization of its persistent tile loop (needs
    programs_per_sm >= 1; 0.99-1.10x the down kernel alone at prefill: benchmarks/probe_warp_spec.py)."""
    best = (t_base, base)
    for group_m, pps, ws in itertools.product([1, 8], [0, 1, 2], [False, True]):
        if ws and not pps:
            continue
        cfg = dataclasses.replace(base, group_m=group_m, programs_per_sm=pps, down=dataclasses.replace(base.down, warp_specialize=ws))
        if cfg == base:
            continue
        try:
            t = timer.graph(b.sorted_gate_up(cfg), calls=timer.calls) + timer.graph(b.sorted_down(cfg), calls=timer.calls)
        except Exception as e:  # noqa: BLE001
            print(f"    raster {group_m}/{pps}/ws{ws}: {type(e).__name__}: {str(e)[:100]}")
            continue
        if t < best[0]:
            best = (t, cfg)
    return best


def refine(args, dtype, gpu, timer, out_path):
    """--refine: re-run only tune_raster on the file's sorted-path entries of the chosen shapes and T, starting
    from each entry's config; a new config replaces it only if its GEMMs are >= 2% faster (timing noise)."""
    data = json.load(open(out_path))
    shapes = {SHAPES[n] for n in args.shapes} | {tuple(int(v) for v in s.split(",")) for s in args.shape}
    weights, last = None, None
    for e in data["entries"]:
        shape = (e["E"], e["k"], e["H"], e["I"])
        cfg = triton_config.from_dict(e["config"])
        if e["dtype"] != args.dtype or shape not in shapes or e["T"] not in args.tokens or cfg.path is not triton_config.Path.SORTED:
            continue
        if shape != last:
            weights, last = None, shape
            torch.cuda.empty_cache()
        x, ids, w, w1, w2 = problem(e["T"], *shape, dtype, weights=weights)
        weights = (w1, w2)
        b = Bench(x, ids, w, w1, w2)
        timer.calls = 5 if e["T"] * e["k"] * e["H"] * e["I"] <= 2**34 else 2
        t_old = timer.graph(b.sorted_gate_up(cfg), calls=timer.calls) + timer.graph(b.sorted_down(cfg), calls=timer.calls)
        t_new, new = tune_raster(b, timer, cfg, t_old)
        keep = new == cfg or t_new > 0.98 * t_old
        if not keep:
            err = check(b, new)
            if err > 1e-2:
                raise SystemExit(f"refined config {new} is wrong at T={e['T']}: rel err {err:.2e}")
            e["config"] = triton_config.to_dict(new)
            e["us"] = round(timer.graph(lambda: lowering.triton_forward(x, ids, w, w1, w2, None, None, SPEC, new), calls=3) * 1e6, 2)
        print(f"  {shape} T={e['T']:>6}: GEMMs {t_old * 1e6:9.1f} -> {t_new * 1e6:9.1f} us {'(kept)' if keep else new}", flush=True)
        del b
    data["refined_by"] = "python benchmarks/tune_experts.py " + " ".join(sys.argv[1:])
    with open(out_path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {out_path}")


def check(b: Bench, config):
    from moe_compiler import lowering

    out = lowering.triton_forward(b.x, b.ids, b.w, b.w1, b.w2, None, None, SPEC, config)
    ref = experts_reference_by_expert(b.x, b.ids, b.w, b.w1, b.w2, dtype=torch.float32)
    return rel_err(out, ref)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"names from {list(SHAPES)} (none: only --shape)")
    p.add_argument("--shape", action="append", default=[], help="E,k,H,I (repeatable): extra shapes")
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--out", help="config file (default: moe_compiler/lowering/configs/<gpu>.json)")
    p.add_argument("--merge", action="store_true", help="keep the file's entries of other shapes / dtypes / T")
    p.add_argument("--log", default=None, help="jsonl of every option timed (default: <out>.log.jsonl)")
    p.add_argument("--refine", action="store_true", help="only re-tune raster / persistent grid / warp specialization of existing sorted entries")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    out_path = args.out or str(triton_config.gpu_file(gpu))
    shapes = [SHAPES[n] for n in args.shapes] + [tuple(int(v) for v in s.split(",")) for s in args.shape]
    timer = Timer("cuda")
    if args.refine:
        return refine(args, dtype, gpu, timer, out_path)
    entries = []
    if args.merge and os.path.exists(out_path):
        old = json.load(open(out_path))["entries"]
        keys = {(args.dtype, *s, T) for s in shapes for T in args.tokens}  # only the points re-tuned now
        entries = [e for e in old if (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"]) not in keys]
    log = open(args.log or out_path + ".log.jsonl", "a")
    table = []
    for shape in shapes:
        E, k, H, I = shape
        print(f"shape E={E} k={k} H={H} I={I} {args.dtype}", flush=True)
        failed = precompile(shape, dtype, args.tokens, args.workers)
        weights = None
        for T in args.tokens:
            x, ids, w, w1, w2 = problem(T, E, k, H, I, dtype, weights=weights)
            weights = (w1, w2)
            b = Bench(x, ids, w, w1, w2)
            timer.calls = 5 if T * k * H * I <= 2**34 else 2  # graphs of fewer calls for the long points
            t_best, cfg, parts, t_default = tune_point(b, timer, dtype, failed, log)
            err = check(b, cfg)
            if err > 1e-2:
                raise SystemExit(f"tuned config {cfg} is wrong at T={T}: rel err {err:.2e}")
            entries.append({"dtype": args.dtype, "E": E, "k": k, "H": H, "I": I, "T": T, "config": triton_config.to_dict(cfg), "us": round(t_best * 1e6, 2)})
            table.append((shape, T, t_best, t_default, cfg, parts))
            print(f"  T={T:>6}: {t_best * 1e6:9.1f} us tuned, {t_default * 1e6:9.1f} us default, err {err:.1e}  {cfg}", flush=True)
            del b
        del weights
        torch.cuda.empty_cache()
    data = {
        "schema": triton_config.SCHEMA,
        "gpu": gpu,
        "capability": list(torch.cuda.get_device_capability()),
        "triton": __import__("triton").__version__,
        "torch": torch.__version__,
        "written_by": "python benchmarks/tune_experts.py " + " ".join(sys.argv[1:]),
        "entries": sorted(entries, key=lambda e: (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"])),
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {out_path} ({len(data['entries'])} entries)")
    print(f"{'shape':>22} {'T':>6} {'tuned us':>10} {'default us':>11}  config")
    for shape, T, tb, td, cfg, _ in table:
        print(f"{str(shape):>22} {T:>6} {tb * 1e6:>10.1f} {td * 1e6:>11.1f}  {cfg.path.value} {getattr(cfg, 'block_m', '')}")


if __name__ == "__main__":
    main()
