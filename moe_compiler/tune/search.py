"""The tuner's search: candidate tiles per path, the problem buffers and kernel launches (Bench), the
parallel precompile, the per-kernel stages and the whole-forward final (tune_point), the raster / grid stage
(tune_raster, also `--refine`), and the correctness check of each winner.

For each shape (E, k, H, I) and T: uniform random routing (skewed too in the final); candidates of the decode
path (T*k small) and of the sorted path for the block_m values that suit T*k/E rows per expert. Each kernel is
timed alone (gate_up and down configs are independent), under a CUDA graph from a cold L2 (timing.py), median of
replays; per block_m the best gate_up + down (+ align + combine, fixed) goes on, with the raster group and
persistent grid tuned on it; of the decode path the top three gate_up x top three down pairs go on. The
final times each remaining option and the untuned default as a whole forward (rounds interleaved, median):
single timings of the short decode kernels are within the timing noise, and a whole forward also counts
launch gaps and each path's extra kernels. The final's score is the geometric mean over two routings of the same
tokens and weights (shapes.ROUTINGS): uniform, and skewed (Zipf-like expert popularity, the popular experts at
random ids): a path chosen on uniform routing alone lost 2% under skew at DeepSeek-V3 T=4096 on the H100
(NOTES.md session 34). The winner is checked against an fp32 reference.
Candidates are compiled first by a pool of processes on a small-E copy of the problem (E does not enter
the GEMM kernels' specialization), so the timing loop only loads cached kernels.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing as mp
import statistics
import time

import torch
import triton

from moe_compiler.lowering import (
    cutlass,
    dispatch,
    triton_align,
    triton_config,
    triton_decode,
    triton_experts,
)
from moe_compiler.lowering.torch_segment_mm import GroupedMM
from moe_compiler.lowering.triton_config import (
    CutlassConfig,
    DecodeConfig,
    GroupedMMConfig,
    KernelConfig,
    SortedConfig,
)
from moe_compiler.testing import experts_reference_by_expert, rel_err

from .shapes import ALL_SHAPES, ROUTINGS, model_spec, routes
from .timing import median

SMEM_BYTES = 220 * 1024  # Hopper: 227 KB per block; keep a margin for the epilogue
MAX_ERR = 1e-2  # rel err of a winner against the fp32 reference (bf16 outputs)


def decode_candidates(slots: int = 1, transposed: bool = False, down: bool = False) -> list[KernelConfig]:
    """GEMV tiles; the down kernel loads `slots` (k rounded up to a power of two) tiles of [bn, bk] per step.
    Stages: weight steps in flight per program (1: none; the GEMV loops pipeline all their loads).
    Transposed weights ([E, H, 2I] / [E, I, H]: contiguous along the output columns) want the opposite shape: wide
    column tiles (unit-stride runs of 64-512 bytes) and short K steps held elementwise (gate_up: gate and up, 2 bn
    columns; down: a slots x bn x bk fp32 accumulator over the program's threads), and the down reduction split
    over programs (split_k) where H / bn programs per token leave the GPU short."""
    out = []
    if transposed and not down:
        for bn, bk, warps, stages in itertools.product([16, 32, 64, 128], [16, 32, 64], [4, 8], [3, 4]):
            if 1024 <= 2 * bn * bk <= 2048 * warps:
                out.append(KernelConfig(bn, bk, warps, stages))
    elif transposed:
        for bn, bk, warps, split in itertools.product([64, 128, 256], [16, 32], [4, 8], [1, 2, 4, 8, 16]):
            if 1024 <= slots * bn * bk <= 2048 * warps:
                out.append(KernelConfig(bn, bk, warps, 3, split_k=split))
    else:
        for bn, bk, warps, stages in itertools.product([2, 4, 8, 16, 32, 64], [64, 128, 256, 512], [4, 8],
                                                       [1, 2, 3, 4]):
            if 2048 <= slots * bn * bk <= 16384:
                out.append(KernelConfig(bn, bk, warps, stages))
    return out


def fits_smem(bm, bn_total, bk, stages, itemsize) -> bool:
    """Whether `stages` buffers of a [bm, bk] activation tile and a [bk, bn_total] weight tile fit."""
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
        if fits_smem(block_m, (2 if gate_up else 1) * bn, bk, stages, itemsize):
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
    # 256-row blocks (each weight tile read once per 256 rows) measured slower at every point (NOTES.md v3)
    return [64, 128]


def uses_decode(T, k, E) -> bool:
    """Whether the decode path is a candidate: few (token, slot) pairs, at most one per expert on average."""
    return T * k <= triton_decode.MAX_PAIRS and T * k <= E


def problem(T, E, k, H, I, dtype, device="cuda", seed=0, weights=None):
    """(x [T, H], ids [T, k] distinct per token, router weights [T, k], w1 [E, 2I, H], w2 [E, H, I] — or in the
    model's transposed layout, [E, H, 2I] / [E, I, H]: shapes.model_spec); `weights` (w1, w2) of an earlier call
    are reused instead of drawn. Uniform routing (Bench.rerouted: another)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    ids = routes(T, E, k, "uniform", g)
    w = torch.rand(T, k, device=device, generator=g).to(dtype)
    if weights is None:
        # Drawn in dtype and scaled in place: the weights' own bytes only (an fp32 draw and its scaled copy took 8
        # bytes per value more: 10.6 GiB per compile worker at Llama-4-Scout, out of memory at 13 workers).
        w1 = torch.randn(E, 2 * I, H, device=device, generator=g, dtype=dtype).mul_(H**-0.5)
        w2 = torch.randn(E, H, I, device=device, generator=g, dtype=dtype).mul_(I**-0.5)
        if model_spec(H, I).transposed:  # the model's own strides: contiguous in its layout
            w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        weights = (w1, w2)
    return x, ids, w, *weights


def shape_benches(shape, tokens, dtype):
    """(T, Bench) for each T of one shape (E, k, H, I): one set of weights for all, freed after the last (the
    caller drops its Bench at the end of each step)."""
    weights = None
    for T in tokens:
        x, ids, w, w1, w2 = problem(T, *shape, dtype, weights=weights)
        weights = (w1, w2)
        yield T, Bench(x, ids, w, w1, w2)
    del weights
    torch.cuda.empty_cache()


def benches(shape_names, tokens, dtype):
    """(shape name, T, Bench) for each named shape and T, shape by shape (shape_benches)."""
    for name in shape_names:
        for T, b in shape_benches(ALL_SHAPES[name], tokens, dtype):
            yield name, T, b


# --- launching one kernel of a config on a problem --------------------------------------------------

class Bench:
    """Buffers of one (T, shape) problem and closures launching each kernel with a given config, in the layout
    and activation of the model the shape comes from (`spec`, shapes.model_spec)."""

    def __init__(self, x, ids, w, w1, w2, routing: str = "uniform"):
        self.x, self.ids, self.w, self.w1, self.w2 = x, ids, w, w1, w2
        self.routing = routing  # how ids were drawn (a label: ids are what runs)
        self.T, self.H = x.shape
        self.k = ids.shape[1]
        self.E, self.I = w1.shape[0], w1[0].numel() // (2 * self.H)
        self.spec = model_spec(self.H, self.I)
        self._rows = {}

    def rerouted(self, kind: str, seed: int = 0) -> Bench:
        """The same tokens, router weights and experts with ids drawn by `routes(kind)`."""
        ids = routes(self.T, self.E, self.k, kind, torch.Generator(self.x.device).manual_seed(seed))
        return Bench(self.x, ids, self.w, self.w1, self.w2, kind)

    def routed(self, seed: int = 0) -> list[Bench]:
        """This bench and the same problem under each other routing of ROUTINGS: what the final's score times."""
        return [self] + [self.rerouted(kind, seed) for kind in ROUTINGS if kind != self.routing]

    def rows(self, block_m):
        if block_m not in self._rows:
            self._rows[block_m] = triton_align.align_rows(self.ids, self.E, block_m)
        return self._rows[block_m]

    def decode_gate_up(self, kc: KernelConfig):
        ids = self.ids.reshape(-1).contiguous()
        weights = self.w.reshape(-1)  # (read under spec.scale_input)
        act = self.x.new_empty(self.T * self.k, self.I)
        ok = torch.empty(1, dtype=torch.int32, device=self.x.device)
        cfg = DecodeConfig(kc, kc)
        return lambda: triton_decode.launch_gate_up(self.x, ids, self.w1, None, self.spec, cfg, self.k, act, ok,
                                                                weights)

    def decode_down(self, kc: KernelConfig):
        ids = self.ids.reshape(-1).contiguous()
        act = torch.randn(self.T * self.k, self.I, device=self.x.device).to(self.x.dtype)
        out = self.x.new_empty(self.T, self.H)
        cfg = DecodeConfig(dataclasses.replace(kc, split_k=1), kc)
        weights = self.w.reshape(-1)
        tickets = triton_decode.tickets_for(cfg, self.T, self.H, self.I, self.x.device)
        if tickets is not None:  # zeroed here once: the down kernel leaves them zero (gate_up zeroes them per call)
            tickets.zero_()
        return lambda: triton_decode.launch_down(act, ids, weights, self.w2, None, self.spec, cfg, self.k, out,
                                                 tickets=tickets)

    def align(self, block_m):
        return lambda: triton_align.align_rows(self.ids, self.E, block_m)

    def sorted_gate_up(self, cfg: SortedConfig):
        rows = self.rows(cfg.block_m)
        act = self.x.new_empty(rows.sorted_rows.numel(), self.I)
        return lambda: triton_experts.launch_gate_up(self.x, rows, self.w1, None, self.spec, cfg, self.k, act,
                                                                 self.w.reshape(-1))

    def sorted_down(self, cfg: SortedConfig):
        rows = self.rows(cfg.block_m)
        act = torch.randn(rows.sorted_rows.numel(), self.I, device=self.x.device).to(self.x.dtype)
        y = self.x.new_empty(rows.sorted_rows.numel(), self.H)
        weights = self.w.reshape(-1)
        return lambda: triton_experts.launch_down(act, rows, self.w2, None, weights, self.spec, cfg, self.k, y)

    def combine(self, block_m):
        rows = self.rows(block_m)
        y = torch.randn(rows.sorted_rows.numel(), self.H, device=self.x.device).to(self.x.dtype)
        out = self.x.new_empty(self.T, self.H)
        return lambda: triton_experts.launch_combine(y, rows, self.k, out)

    def forward(self, config):
        """The whole Triton forward with `config`, as the experts op runs it."""
        return lambda: dispatch.triton_forward(self.x, self.ids, self.w, self.w1, self.w2, None, None, self.spec,
                                               config)


def sorted_config(block_m, gate_up=None, down=None, **kw):
    base = KernelConfig(64, 64)
    return SortedConfig(block_m=block_m, gate_up=gate_up or base, down=down or base, **kw)


def sorted_options(block_m, itemsize, gate_up: bool) -> list[SortedConfig]:
    """The configs timing one sorted GEMM: each candidate tile with and without TMA weight tiles."""
    key = "gate_up" if gate_up else "down"
    kcs = sorted_candidates(block_m, itemsize, gate_up)
    return [sorted_config(block_m, **{key: kc}, tma=tma) for tma in (False, True) for kc in kcs]


def jobs_for(shape, dtype, tokens):
    """Every (kind, config) the timing loop will launch for this shape: the compile list."""
    E, k, H, I = shape
    itemsize = torch.finfo(dtype).bits // 8
    jobs = set()
    for T in tokens:
        if uses_decode(T, k, E):
            t = model_spec(H, I).transposed
            jobs |= {("decode_gate_up", kc) for kc in decode_candidates(transposed=t)}
            jobs |= {("decode_down", kc) for kc in decode_candidates(triton.next_power_of_2(k), t, down=True)}
        for bm in block_m_candidates(T, k, E):
            jobs |= {("sorted_gate_up", cfg) for cfg in sorted_options(bm, itemsize, True)}
            jobs |= {("sorted_down", cfg) for cfg in sorted_options(bm, itemsize, False)}
    return sorted(jobs, key=repr)


def _compile_experts(E: int) -> int:
    """E of the compile workers' copy of a problem: 16 keeps E's divisibility by 16 (a Triton specialization)."""
    return 16 if E % 16 == 0 else 2


def _compile_worker(args):
    """Launch each job once on a small-E copy of the problem (T = 1 and 16: both int specializations)."""
    shape, dtype_name, jobs = args
    E, k, H, I = shape
    dtype = getattr(torch, dtype_name)
    small_e = _compile_experts(E)
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


def compile_worker_bytes(shape, dtype) -> int:
    """GPU bytes one compile worker holds at most: its small-E weights (twice while a transposed layout is copied
    into place) and a CUDA context."""
    E, k, H, I = shape
    return 2 * 3 * _compile_experts(E) * H * I * (torch.finfo(dtype).bits // 8) + (1 << 30)


def compile_workers(shape, dtype, workers: int, free_bytes: int) -> int:
    """`workers`, fewer where that many would not fit in 80% of the GPU's free memory (at least one)."""
    return max(1, min(workers, int(0.8 * free_bytes) // compile_worker_bytes(shape, dtype)))


def precompile(shape, dtype, tokens, workers):
    """Compile every job of this shape in `workers` processes (fewer where their weights would not fit on the GPU);
    {(kind, repr(config))} of those that failed."""
    jobs = jobs_for(shape, dtype, tokens)
    workers = compile_workers(shape, dtype, workers, torch.cuda.mem_get_info()[0])
    chunks = [(shape, str(dtype).removeprefix("torch."), jobs[i::workers]) for i in range(workers)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = [f for part in pool.map(_compile_worker, chunks) for f in part]
    print(f"  compiled {len(jobs)} kernel variants in {time.time() - t0:.0f} s with {workers} processes; "
          f"{len(failed)} failed", flush=True)
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
        except Exception as e:  # noqa: BLE001 - a launch error is a lost candidate, not a lost run
            print(f"    {kind} {c}: {type(e).__name__}: {str(e)[:100]}")
            torch.cuda.synchronize()
    results.sort(key=lambda r: r[0])
    return results


def gemm_seconds(b: Bench, timer, cfg: SortedConfig) -> float:
    """Seconds of the sorted path's two GEMMs with `cfg`, each timed alone."""
    return timer.graph(b.sorted_gate_up(cfg), calls=timer.calls) + timer.graph(b.sorted_down(cfg), calls=timer.calls)


def tune_point(b: Bench, timer, dtype, failed, log):
    """(whole-forward seconds, config, parts) of the winner, and the untuned default's whole-forward seconds.
    Every option of the final goes to `log` as one JSON line."""
    T, k, E = b.T, b.k, b.E
    itemsize = torch.finfo(dtype).bits // 8
    options = []  # (total seconds, config, parts)
    if uses_decode(T, k, E):
        t = b.spec.transposed
        gu = best_of(timer, b.decode_gate_up, decode_candidates(transposed=t), failed, "decode_gate_up")
        dn = best_of(timer, b.decode_down, decode_candidates(triton.next_power_of_2(k), t, down=True), failed,
                     "decode_down")
        # A decode kernel alone takes about as long as the noise of one graph timing: the fastest of ~100
        # single timings is partly luck, so the top three of each go on to the whole-forward final
        # (NOTES.md decode v5).
        for tg, g in gu[:3]:
            for td, d in dn[:3]:
                options.append((tg + td, DecodeConfig(g, d), {"gate_up": tg, "down": td}))
    for bm in block_m_candidates(T, k, E):
        t_align = timer.graph(b.align(bm), calls=timer.calls)
        t_comb = timer.graph(b.combine(bm), calls=timer.calls)
        gu = best_of(timer, b.sorted_gate_up, sorted_options(bm, itemsize, True), failed, "sorted_gate_up")
        dn = best_of(timer, b.sorted_down, sorted_options(bm, itemsize, False), failed, "sorted_down")
        # Both kernels share config.tma: keep the best pair that agrees on it.
        pairs = [(tg + td, g, d) for tg, g in gu[:6] for td, d in dn[:6] if g.tma == d.tma]
        if not pairs:
            continue
        t_pair, g, d = min(pairs, key=lambda x: x[0])
        base = sorted_config(bm, gate_up=g.gate_up, down=d.down, tma=g.tma)
        t_gemms, cfg = tune_raster(b, timer, base, t_pair)
        parts = {"align": t_align, "gemms": t_gemms, "combine": t_comb,
                 "gate_up_top3": [(t, repr(c)) for t, c in gu[:3]], "down_top3": [(t, repr(c)) for t, c in dn[:3]]}
        options.append((t_align + t_gemms + t_comb, cfg, parts))
        folded = tune_fold(b, timer, cfg)
        if folded is not None:
            options.append((t_align + gemm_seconds(b, timer, folded) + t_comb, folded, {**parts, "folded": True}))
    if dispatch.select(b.x, b.w1, b.w2) is GroupedMM:  # torch's grouped GEMM (CUTLASS on sm90): no tiles to tune
        options.append((float("inf"), GroupedMMConfig(), {"grouped_mm": True}))
    if not uses_decode(T, k, E) and cutlass.runs(b.x, b.w1, b.w2):  # csrc/'s grouped GEMM, each of its configs
        options += [(float("inf"), CutlassConfig(i), {"cutlass": name}) for i, name in enumerate(cutlass.CONFIGS)]
    # The final: every option and the untuned default as a whole forward (launch gaps, the id check and
    # the path's own extra kernels included), rounds interleaved, median.
    default = triton_config.default_config(dtype, b.E, k, b.H, b.I, T, b.spec.transposed)
    routed = b.routed(seed=T)
    forward, each = scores(timer, routed, [cfg for _, cfg, _ in options] + [default])
    act = act_epilogue_option(routed, timer, forward, each, options)
    if act is not None:
        options.append(act)
    final = [(forward[cfg], cfg, {**parts, "kernels": total, "routings": each[cfg]}) for total, cfg, parts in options]
    final.append((forward[default], default, {"default": True, "routings": each[default]}))
    final.sort(key=lambda o: o[0])
    for t, cfg, parts in final:
        row = {"T": T, "E": E, "k": k, "H": b.H, "I": b.I, "us": t * 1e6, "config": triton_config.to_dict(cfg),
               "parts": parts}
        log.write(json.dumps(row) + "\n")
    return (*final[0], forward[default])


def act_epilogue_option(routed: list[Bench], timer, forward: dict, each: dict, options: list):
    """The fastest CUTLASS config again with the SwiGLU activation in its up GEMM's epilogue (CutlassConfig
    .act_epilogue) as one more option, its score added to `forward` (and `each`); None where the experts do not
    suit it. Only beside the winner: across 9 configs x 6 points on an H100 the fused form never won (0-19% slower:
    the gate and up GEMMs each read A, at half the N; NOTES.md session 34), so timing it beside every config doubled
    the CUTLASS final for nothing."""
    b = routed[0]
    plain = [cfg for _, cfg, _ in options if isinstance(cfg, CutlassConfig)]
    if not plain or not cutlass.silu_epilogue_suits(b.spec, b.w1, None, None, cutlass.CutlassMM.act_epilogue_dtypes):
        return None
    best = min(plain, key=lambda cfg: forward[cfg])
    fused = dataclasses.replace(best, act_epilogue=True)
    # Timed in rounds of its own beside `best`: its times are best's from the final scaled by their ratio there.
    again, again_each = scores(timer, routed, [fused, best])
    forward[fused] = forward[best] * again[fused] / again[best]
    each[fused] = {kind: each[best][kind] * again_each[fused][kind] / again_each[best][kind] for kind in each[best]}
    return (float("inf"), fused, {"cutlass": cutlass.CONFIGS[best.config] + "_act"})


def forward_times(timer, b: Bench, configs, rounds: int = 3) -> dict:
    """Median whole-forward seconds of each config, the rounds interleaved (slow drifts hit all alike)."""
    times = {cfg: [] for cfg in configs}
    for _ in range(rounds):
        for cfg in times:
            times[cfg].append(timer.graph(b.forward(cfg), calls=timer.calls))
    return {cfg: median(ts) for cfg, ts in times.items()}


def scores(timer, routed: list[Bench], configs, rounds: int = 3) -> tuple[dict, dict]:
    """({config: the geometric mean of its forward_times over the benches}, {config: {routing: seconds}}): the
    final's score, one problem under each routing."""
    each = {cfg: {} for cfg in configs}
    for b in routed:
        for cfg, t in forward_times(timer, b, configs, rounds).items():
            each[cfg][b.routing] = t
    return {cfg: statistics.geometric_mean(ts.values()) for cfg, ts in each.items()}, each


def tune_raster(b: Bench, timer, base: SortedConfig, t_base: float) -> tuple[float, SortedConfig]:
    """(gate_up + down seconds, config): the raster group and persistent grid (both kernels share them) on
    the winning tiles, and the down GEMM's warp specialization of its persistent tile loop (needs
    programs_per_sm >= 1; NOTES.md v3, benchmarks/probes/probe_warp_spec.py)."""
    best = (t_base, base)
    for group_m, pps, ws in itertools.product([1, 8], [0, 1, 2], [False, True]):
        if ws and not pps:
            continue
        down = dataclasses.replace(base.down, warp_specialize=ws)
        cfg = dataclasses.replace(base, group_m=group_m, programs_per_sm=pps, down=down)
        if cfg == base:
            continue
        try:
            t = gemm_seconds(b, timer, cfg)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is skipped
            print(f"    raster {group_m}/{pps}/ws{ws}: {type(e).__name__}: {str(e)[:100]}")
            continue
        if t < best[0]:
            best = (t, cfg)
    return best


FOLD_TAILS = (32, 64)


def tune_fold(b: Bench, timer, cfg: SortedConfig) -> SortedConfig | None:
    """`cfg` with each GEMM's fastest folded tail (KernelConfig.tail_m of FOLD_TAILS, at most half a block: a
    fold of a whole block's rows spilled registers on an H100) where that GEMM timed alone beats it unfolded; None
    where neither GEMM gains. A warp-specialized GEMM keeps its loop (the two do not combine). Timed on this
    bench's routing only: the final scores the folded config beside `cfg` under every routing, since folding costs
    a few per cent where no tail folds (benchmarks/NOTES.md session 38)."""
    kernels = {}
    for name, launch in (("gate_up", b.sorted_gate_up), ("down", b.sorted_down)):
        kc = getattr(cfg, name)
        tails = [t for t in FOLD_TAILS if 2 * t <= cfg.block_m and not kc.warp_specialize]
        if not tails:
            continue
        best = (timer.graph(launch(cfg), calls=timer.calls), kc)
        for tail in tails:
            folded = dataclasses.replace(kc, tail_m=tail)
            try:
                t = timer.graph(launch(dataclasses.replace(cfg, **{name: folded})), calls=timer.calls)
            except Exception as e:  # noqa: BLE001 - a fold that does not fit the SM is a lost variant
                print(f"    {name} tail_m {tail}: {type(e).__name__}: {str(e)[:100]}")
                torch.cuda.synchronize()
                continue
            if t < best[0]:
                best = (t, folded)
        kernels[name] = best[1]
    folded = dataclasses.replace(cfg, **kernels)
    return None if folded == cfg else folded


def graph_calls(T, k, H, I) -> int:
    """Calls per captured graph: fewer for the long points."""
    return 5 if T * k * H * I <= 2**34 else 2


def tune(shapes, tokens, dtype, timer, workers, log):
    """(entries of the config file, [(shape, T, tuned s, default s, config)]) of every shape and T; each
    winner checked against the fp32 reference."""
    dname = str(dtype).removeprefix("torch.")
    entries, table = [], []
    for shape in shapes:
        E, k, H, I = shape
        print(f"shape E={E} k={k} H={H} I={I} {dname}", flush=True)
        failed = precompile(shape, dtype, tokens, workers)
        for T, b in shape_benches(shape, tokens, dtype):
            timer.calls = graph_calls(T, k, H, I)
            t_best, cfg, parts, t_default = tune_point(b, timer, dtype, failed, log)
            err = checked(b, cfg)
            # "us": the uniform routing's time, as entries before the two-routing score held; the score in the log
            us = {"us" if kind == "uniform" else f"us_{kind}": round(t * 1e6, 2)
                  for kind, t in parts["routings"].items()}
            entries.append({"dtype": dname, "E": E, "k": k, "H": H, "I": I, "T": T,
                            "config": triton_config.to_dict(cfg), **us})
            table.append((shape, T, t_best, t_default, cfg))
            print(f"  T={T:>6}: {t_best * 1e6:9.1f} us tuned, {t_default * 1e6:9.1f} us default (geometric means over "
                  f"{'/'.join(parts['routings'])} routing), err {err:.1e}  {cfg}", flush=True)
            del b
    return entries, table


def refine(entries, dtype, shapes, tokens, timer) -> None:
    """Re-run tune_raster, then tune_fold, on the sorted-path entries of `dtype`, `shapes` and `tokens`, starting
    from each entry's config. A new raster replaces the entry's (in place) only if its GEMMs are >= 2% faster (the
    timing noise); a fold only if the whole forward's score over every routing (the final's) is >= 2% better."""
    dname = str(dtype).removeprefix("torch.")
    weights, last = None, None
    for e in entries:
        shape = (e["E"], e["k"], e["H"], e["I"])
        cfg = triton_config.from_dict(e["config"])
        wanted = e["dtype"] == dname and shape in shapes and e["T"] in tokens
        if not wanted or cfg.path is not triton_config.Path.SORTED:
            continue
        if shape != last:
            weights, last = None, shape
            torch.cuda.empty_cache()
        x, ids, w, w1, w2 = problem(e["T"], *shape, dtype, weights=weights)
        weights = (w1, w2)
        b = Bench(x, ids, w, w1, w2)
        timer.calls = graph_calls(e["T"], *shape[1:])
        t_old = gemm_seconds(b, timer, cfg)
        t_new, new = tune_raster(b, timer, cfg, t_old)
        if new != cfg and t_new > 0.98 * t_old:
            t_new, new = t_old, cfg
        fold = ""
        folded = tune_fold(b, timer, new)
        if folded is not None:
            score, _ = scores(timer, b.routed(seed=e["T"]), [new, folded])
            won = score[folded] < 0.98 * score[new]
            fold = f"; folded {score[new] * 1e6:.1f} -> {score[folded] * 1e6:.1f} us {'(taken)' if won else '(not)'}"
            if won:
                new = folded
        if new != cfg:
            checked(b, new, "refined")
            e["config"] = triton_config.to_dict(new)
            e["us"] = round(timer.graph(b.forward(new), calls=3) * 1e6, 2)
        print(f"  {shape} T={e['T']:>6}: GEMMs {t_old * 1e6:9.1f} -> {t_new * 1e6:9.1f} us{fold} "
              f"{'(kept)' if new == cfg else new}", flush=True)
        del b


def check(b: Bench, config) -> float:
    """Rel err of the Triton forward with `config` against the fp32 reference."""
    out = b.forward(config)()
    ref = experts_reference_by_expert(b.x, b.ids, b.w, b.w1, b.w2, b.spec, dtype=torch.float32)
    return rel_err(out, ref)


def checked(b: Bench, config, what: str = "tuned") -> float:
    """check(), raising SystemExit where the config is wrong (a config file must never hold one)."""
    err = check(b, config)
    if err > MAX_ERR:
        raise SystemExit(f"{what} config {config} is wrong at T={b.T}: rel err {err:.2e}")
    return err
