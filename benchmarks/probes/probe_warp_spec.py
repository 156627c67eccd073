"""Probe: Triton warp specialization (KernelConfig.warp_specialize) on the sorted path's two GEMMs, at the tuned
configs of the three benchmark shapes, prefill T (NOTES.md "v3"). Each kernel timed alone under a CUDA graph
from a cold L2 (moe_compiler/tune/timing.py), as the tuner times them; the whole forward of each faster variant
checked against fp32.

    python -m benchmarks.probes.probe_warp_spec [--tokens 4096 16384] [--out ws.jsonl]

KernelConfig.warp_specialize specializes the persistent tile loop, flattened with the K loop (producer warps
issue the TMA loads, consumer warps the MMAs); it needs a persistent grid, so programs_per_sm >= 1 is forced,
and each variant is also timed without it on that grid (what the persistent grid alone gives).
"""

from __future__ import annotations

import dataclasses
import json

import torch

from moe_compiler.lowering import triton_config
from moe_compiler.lowering.triton_config import SortedConfig
from moe_compiler.tune.search import benches, check
from moe_compiler.tune.shapes import SHAPES

from .. import harness


def variants(cfg: SortedConfig):
    """(name, kernel, config): the tuned config, then one GEMM on a persistent grid with and without warp
    specialization at a few pipeline depths."""
    yield "tuned", None, cfg
    for kernel in ("gate_up", "down"):
        kc = getattr(cfg, kernel)
        for ws in (False, True):
            for stages in sorted({kc.num_stages, 3, 4}):
                new = dataclasses.replace(kc, warp_specialize=ws, num_stages=stages)
                c = dataclasses.replace(cfg, **{kernel: new}, programs_per_sm=max(1, cfg.programs_per_sm))
                yield f"{kernel} {'ws' if ws else 'persistent'} s{stages}", kernel, c


def main():
    ap = harness.parser(__doc__, shapes=SHAPES, tokens=[4096, 16384])
    ap.add_argument("--out", default=None, metavar="JSONL", help="also write the rows here")
    args = ap.parse_args()
    dtype = torch.bfloat16
    gpu, cap = harness.gpu_name(), torch.cuda.get_device_capability()
    timer = harness.Timer("cuda")
    rows = []
    for name, T, b in benches(args.shapes, args.tokens, dtype):
        cfg = triton_config.lookup(gpu, cap, dtype, b.E, b.k, b.H, b.I, T)
        timer.calls = 2
        base = {}
        for vname, kernel, c in variants(cfg):
            row = dict(shape=name, T=T, variant=vname, config=repr(c))
            try:
                for kern in ("gate_up", "down") if kernel is None else (kernel,):
                    row[f"{kern}_us"] = timer.graph(getattr(b, f"sorted_{kern}")(c), calls=2) * 1e6
                if kernel is None:
                    base = row
                else:
                    row["speedup"] = base[f"{kernel}_us"] / row[f"{kernel}_us"]
                    if row["speedup"] > 1.0:
                        row["rel_err"] = check(b, c)
            except Exception as e:  # noqa: BLE001 - a variant Triton cannot compile is a result too
                first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                row["error"] = f"{type(e).__name__}: {first}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        del b
    if args.out:
        harness.write_jsonl(args.out, rows)
    print(f"\n{gpu}: warp specialization vs the tuned config (kernel alone, µs)")
    for r in rows:
        if r["variant"] == "tuned":
            print(f"{r['shape']:14} T={r['T']:6} tuned      gate_up {r['gate_up_us']:9.1f}  down {r['down_us']:9.1f}")
            continue
        kern = r["variant"].split()[0]
        err = f", err {r['rel_err']:.1e}" if "rel_err" in r else ""
        cell = r.get("error") or f"{r[kern + '_us']:9.1f} ({r['speedup']:.2f}x{err})"
        print(f"{'':14} {'':8} {r['variant']:16} {cell}")


if __name__ == "__main__":
    main()
