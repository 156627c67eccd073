"""Which config should the graph of a band run? A symbolic token count (prompts of varying length) takes ONE
config for every length of its band: the entry of the band's grid point (triton_config.config_tokens), with its
weight tiles loaded by pointer where the call is recorded into Inductor's code (dispatch.INLINE_TMA_MAX_FLOP).
This probe times, at each T, the whole experts forward with every candidate that could stand for T's band: this
GPU's tuned entries at the grid points inside the band (Triton, torch._grouped_mm or CUTLASS), each Triton TMA
entry also without TMA. Same inputs, the candidates interleaved, each under a CUDA graph from a cold L2 (the
tuner's timing, moe_compiler/tune/search.py): GPU time only. A compiled graph keeps a grouped_mm candidate as one
opaque call whose host path (~0.5 ms a layer) these times leave out; a TMA one above INLINE_TMA_MAX_FLOP builds
its descriptors on the device, timed here with host ones (within 1-3%, probe_device_tma). NOTES.md "session 25".

    python -m benchmarks.probes.probe_band --shapes mixtral_8x7b deepseek_v3 --tokens 512 1024 2048 4096 [--out]

Per row: µs of each candidate and its ratio to the row's best. Last, per shape and band, each candidate's
geometric mean of that ratio over the band's T: the candidate to give the band is the one nearest 1.0 (the band's
point, marked *, is what runs today).
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from moe_compiler.lowering import triton_config
from moe_compiler.tune.search import benches, forward_times, graph_calls
from moe_compiler.tune.shapes import ALL_SHAPES

from .. import harness


def candidates(entries, dtype, E, k, H, I, T) -> dict[str, triton_config.Config]:
    """label -> config: the shape's entries at the grid points of T's band (the band's point marked *), and each
    sorted TMA entry (`tma`) also with pointer loads (`ptr`: what a recorded call runs)."""
    lo, hi = triton_config.band(T)
    point = triton_config.band_point(T)
    found = {}
    for e in triton_config.shape_entries(entries, dtype, E, k, H, I):
        if e["T"] < lo or (hi is not None and e["T"] > hi):
            continue
        config = e["config"]
        label = f"{e['T']}{'*' if e['T'] == point else ''} {config.path.value}"
        if isinstance(config, triton_config.SortedConfig) and config.tma:
            found[label + " tma"] = config
            found[label + " ptr"] = dataclasses.replace(config, tma=False)
        else:
            found[label] = config
    return found


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[512, 1024, 2048, 4096], out="band")
    ap.set_defaults(shapes=["mixtral_8x7b", "deepseek_v3"])
    args = ap.parse_args()
    dtype = torch.bfloat16
    gpu = harness.gpu_name()
    entries = triton_config.load_file(triton_config.gpu_file(gpu))
    timer = harness.Timer("cuda")
    rows = []
    for name, T, b in benches(args.shapes, args.tokens, dtype):
        cands = candidates(entries, dtype, b.E, b.k, b.H, b.I, T)
        if not cands:
            print(f"{name} T={T}: no entries of {gpu} in its band {triton_config.band(T)}")
            continue
        timer.calls = graph_calls(T, b.k, b.H, b.I)
        times = forward_times(timer, b, list(cands.values()))
        us = {label: times[c] * 1e6 for label, c in cands.items()}
        best = min(us.values())
        row = {"shape": name, "T": T, "band": list(triton_config.band(T)), "us": us}
        rows.append(row)
        print(f"{name:16} T={T:6} " + "  ".join(f"{label} {t:8.1f} ({t / best:.3f})" for label, t in us.items()),
              flush=True)
        del b
    harness.save_rows(args.out, "band", rows, gpu)
    ratios = collections.defaultdict(list)  # (shape, band, label) -> [t / row's best]
    for r in rows:
        best = min(r["us"].values())
        for label, t in r["us"].items():
            ratios[(r["shape"], tuple(r["band"]), label)].append(t / best)
    print(f"\n{'shape':>16} {'band':>12} | candidate: geometric mean of time / best over the band's T (points)")
    for (shape, band, label), rs in sorted(ratios.items(), key=lambda kv: (kv[0][0], kv[0][1], harness.geomean(kv[1]))):
        print(f"{shape:>16} {str(band):>12} | {label:24} {harness.geomean(rs):.3f} ({len(rs)})")


if __name__ == "__main__":
    main()
