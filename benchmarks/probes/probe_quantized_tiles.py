"""Which tiles does the quantized experts op want per (format, shape, T)? A pruned sweep of QuantizedConfig
around default_config, timed like bench_quantized (CUDA graph up to T = 128, eager from a cold L2 above), one
line per config to a JSON-lines file, the best per point printed last. NOTES.md: "quantized tiles".

    python -m benchmarks.probes.probe_quantized_tiles --format fp8 --shapes deepseek_v3 --tokens 1 8 128 1024 4096
    python -m benchmarks.probes.probe_quantized_tiles --format int4 --shapes kimi_k2 --tokens 1 8 128 1024

Decode points (default_config(...).decode) sweep the down GEMV per pair or per token, the GEMVs' block_n, block_k,
warps and stages, and the sorted path at small tiles beside them. Sorted points try the GEMVs first where at most
one row per expert (decode_suits stops at T k <= E / 8), then FP8 w8a8_rows by TMA (warp-specialized or not,
persistent or not), then sweep block_m (the two sizes nearest the rows per expert), block_n, warps/stages and the
format's switch (FP8: act; INT4: int4_planes), and for FP8 from 8 rows per expert the unfused gate_up
(fused_act=False) under w8a8_rows. --kernels: the best config's time per kernel (profiler). Configs a GPU cannot
run (shared memory) are skipped and counted. Each point times its default once before the record (the first
timing read up to 20% high: Kimi-K2 INT4 T = 1, 185 then 153 us for the same config).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time

import torch

import moe_compiler  # noqa: F401 - registers the ops
from moe_compiler.lowering import triton_quantized, triton_quantized_config
from moe_compiler.spec import QuantizedExpertsSpec
from moe_compiler.tune.shapes import ALL_SHAPES
from moe_compiler.tune.timing import Timer

from .. import harness
from ..bench_quantized import GROUP, fp8_weights, int4_weights


def candidates(base: triton_quantized_config.QuantizedConfig, T: int, E: int, k: int, int4: bool):
    rep = dataclasses.replace
    if base.decode:
        # The down GEMV's own height (down_block_n) around the default's, gate_up's tile kept
        for dn in (8, 16, 32):
            if dn != base.down_rows:
                yield rep(base, down_block_n=dn)
        # The down GEMV per token (slots in a loop) against the default per pair, at the tiles that won per token.
        for bn, bk in itertools.product((8, 16), (256, 512)):
            yield rep(base, block_n=bn, block_k=bk, num_warps=2, num_stages=3, slot_split=False)
            yield rep(base, block_n=bn, block_k=bk, num_warps=2, num_stages=3)
        ks = (128, 256, 512)  # FP8 GEMV steps may span whole scale blocks (K_GROUPS)
        for bn, bk, (w, s) in itertools.product((8, 16, 32), ks, ((2, 3), (4, 3), (4, 4))):
            yield rep(base, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
        if int4:  # the GEMVs' other INT4 form: word-wise nibbles (lost to planes at every H200 point)
            for bn, bk in itertools.product((8, 16), (256, 512)):
                yield rep(base, block_n=bn, block_k=bk, num_warps=2, num_stages=3, int4_planes=not base.int4_planes)
        for bn, (w, s) in itertools.product((32, 64, 128), ((4, 3), (4, 4))):
            yield rep(base, decode=False, block_m=16, block_n=bn, block_k=128, num_warps=w, num_stages=s,
                      act="w8a16")
        return
    rows = T * k / E
    if rows <= (4 if int4 else 1):  # few pairs share an expert: the GEMVs (each pair reads its expert) may still win
        for bn, bk in ((16, 512), (16, 256), (8, 256)) if int4 else ((16, 256), (16, 128)):
            yield rep(base, decode=True, block_n=bn, block_k=bk, num_warps=2, num_stages=3, int4_planes=True)
    sizes = (16, 32, 64, 128)
    block_ms = sorted(sorted(sizes, key=lambda m: abs(m - rows))[:2])
    if not int4 and base.act.value == "w8a8_rows":  # by TMA (x sorted first), warp-specialized, persistent
        # the gate_up's A gathered per token instead of the sorted copy (the weights by TMA)
        yield rep(base, tma=True, sorted_copy=False)
        for bm, bn, w in ((base.block_m, base.block_n, base.num_warps), (128, 128, 8), (64, 256, 8)):
            for ws, pps in ((False, 0), (True, 0), (True, 1), (True, 2)):
                yield rep(base, block_m=bm, block_n=bn, num_warps=w, tma=True, warp_specialize=ws,
                          programs_per_sm=pps, fused_act=base.fused_act and not ws)
    base = rep(base, tma=False)  # the rest by pointer (the default may load by TMA)
    switch = ("int4_planes", (False, True)) if int4 else ("act", ("w8a16", "w8a8_tile", "w8a8_rows"))
    # The unfused gate_up (one accumulator) where the GEMMs carry weight, under w8a8_rows; first, since a point's
    # time budget may end the sweep.
    if not int4 and rows >= 8:
        for bm, bn, (w, s) in itertools.product(block_ms, (128, 256), ((4, 3), (8, 3), (8, 4))):
            yield rep(base, block_m=bm, block_n=bn, num_warps=w, num_stages=s, act="w8a8_rows", fused_act=False)
    for bm, bn, (w, s), on in itertools.product(block_ms, (64, 128, 256), ((4, 3), (4, 4), (8, 3)),
                                                switch[1]):
        if (bm >= 128 and w == 4) or (on == "w8a8_rows" and bn != 128):
            continue
        yield rep(base, block_m=bm, block_n=bn, num_warps=w, num_stages=s, **{switch[0]: on})


def print_kernels(fn, calls=20):
    """Where one call's device time goes, per kernel (CUDA time from the profiler, mean over `calls`)."""
    for us, count, name in harness.kernel_times(fn, calls, top=6):
        print(f"    {us:8.1f} us  {count}x  {name[:90]}")


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[1, 8, 128, 1024, 4096])
    ap.add_argument("--format", choices=["fp8", "int4"], default="fp8")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="stop sweeping a point after this long")
    ap.add_argument("--kernels", action="store_true", help="each point's best config: time per kernel (profiler)")
    args = ap.parse_args()
    gpu = harness.gpu_name()
    out_path = os.path.join(os.environ.get("OUT", "."), f"quantized_tiles_{args.format}.jsonl")
    int4 = args.format == "int4"
    timer = Timer("cuda")
    best = []
    for name in args.shapes:
        E, k, H, I = ALL_SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        w1, q1, s1 = fp8_weights(E, 2 * I, H, "cuda", gen)
        w2, q2, s2 = fp8_weights(E, H, I, "cuda", gen)
        if int4:
            (q1, s1), (q2, s2) = int4_weights(w1), int4_weights(w2)
            spec = QuantizedExpertsSpec(weight_format="int4_packed", scale_block_n=1, scale_block_k=GROUP)
        else:
            spec = QuantizedExpertsSpec()
        for T in args.tokens:
            x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
            ids = torch.rand(T, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
            wts = torch.rand(T, k, device="cuda", generator=gen).to(torch.bfloat16)
            qargs = (x, ids, wts, q1, s1, q2, s2)
            base = triton_quantized_config.default_config(x, E, k, spec, I=I)
            run = timer.graph if T <= harness.GRAPH_MAX_T else timer.eager
            # One untimed-for-the-record run first: the first config timed at a point read up to 20% high
            # (Kimi-K2 INT4 T=1: 185 then 153 us for the same config), the GPU still ramping.
            run(lambda: triton_quantized.experts_forward(*qargs, spec, base))
            results, skipped, start = [], 0, time.time()
            for cfg in [base, *candidates(base, T, E, k, int4)]:
                if time.time() - start > args.budget_s:
                    break
                try:
                    us = run(lambda c=cfg: triton_quantized.experts_forward(*qargs, spec, c)) * 1e6
                except Exception as exc:  # noqa: BLE001 - out of shared memory, a tile the GPU refuses
                    skipped += 1
                    print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                results.append((us, cfg))
                with open(out_path, "a") as f:
                    f.write(json.dumps({"gpu": gpu, "format": args.format, "shape": name, "T": T, "us": us,
                                        "default": cfg == base, **dataclasses.asdict(cfg)}) + "\n")
            results.sort(key=lambda r: r[0])
            base_us = next((us for us, c in results if c == base), float("nan"))
            print(f"{name} T={T} {args.format}: default {base_us:.1f} us, best {results[0][0]:.1f} us "
                  f"{results[0][1]} ({len(results)} run, {skipped} skipped)", flush=True)
            best.append((name, T, base_us, results[:3]))
            if args.kernels:
                print_kernels(lambda c=results[0][1]: triton_quantized.experts_forward(*qargs, spec, c))
        del w1, w2, q1, q2, s1, s2
        torch.cuda.empty_cache()
    print(f"\n{'shape':>14} {'T':>5} {'default us':>11} {'best us':>9}  best configs")
    for name, T, base_us, top in best:
        desc = " | ".join(f"{us:.0f}: m{c.block_m} n{c.block_n} k{c.block_k} w{c.num_warps} s{c.num_stages}"
                          f"{' dec' if c.decode else ''}{' ' + c.act.value if c.act_fp8 and not int4 else ''}"
                          f"{' pl' if int4 and c.int4_planes else ''}{'' if c.fused_act else ' unfused'}"
                          f"{' per-token' if c.decode and not c.slot_split else ''}"
                          f"{' tma' if c.tma else ''}{' gathered' if c.tma and not c.sorted_copy else ''}"
                          f"{' ws' if c.warp_specialize else ''}"
                          f"{f' pps{c.programs_per_sm}' if c.programs_per_sm else ''}"
                          for us, c in top)
        print(f"{name:>14} {T:>5} {base_us:11.1f} {top[0][0]:9.1f}  {desc}")


if __name__ == "__main__":
    main()
