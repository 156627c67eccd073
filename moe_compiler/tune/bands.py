"""Which config the graph of a band runs. A symbolic token count (prompts of varying length) runs ONE config for
every length of its band (triton_config.T_BANDS): by default the entry of the band's grid point, tuned for that
one length. Where the table's entries change path between grid points (DeepSeek-V3: Triton tiles at 1024 tokens,
CUTLASS at 4096) that point's entry can be far from the best at the band's other lengths (the 1024 point's tiles
took 1.27x the CUTLASS GEMMs' time at 2048 tokens, 1.73x at 4096; benchmarks/NOTES.md, session 26).

This measures, per shape and band, the candidates that could stand for the band at lengths across it (powers of
two inside it), each timed as a whole forward under a CUDA graph from a cold L2 (the tuner's timing), the
candidates interleaved on the same inputs (scored, as the tuner's final, by the geometric mean over uniform and
skewed routing of the same tokens: shapes.ROUTINGS): this GPU's own entries at the band's grid points, and the entry the
band runs today. Each candidate runs as a compiled graph would run it: a TMA entry with pointer loads where a
traced call of the band's point does (dispatch.INLINE_TMA_MAX_FLOP). Not candidates: decode entries (GEMV
tiles of one length) and torch._grouped_mm ones (kept opaque in a graph: the op's host path, ~0.5 ms a layer, is
not in these times). A candidate's score is the geometric mean over the lengths of its time / the best time at
that length; the best scorer is written as the band's entry (`bands` in the GPU's table) where it beats today's
by BAND_MIN_GAIN.

    python -m moe_compiler.tune --bands --shapes deepseek_v3 mixtral_8x7b --merge
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moe_compiler.lowering import dispatch, triton_config
from moe_compiler.lowering.triton_config import Config, Path

from .search import benches, graph_calls, scores

# The bands measured by default: the decode band's graph runs GEMV tiles of single lengths, and the unbounded
# band's lengths (8192+) cost minutes per shape; neither has shown a gap.
LENGTHS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# A band entry must beat the band's config of today by this much (geometric mean): the timing's noise is ~1%.
BAND_MIN_GAIN = 1.03


def lengths_by_band(tokens) -> dict[tuple, list[int]]:
    """The given lengths grouped by band, bands of fewer than two lengths dropped (one length is no band)."""
    groups: dict[tuple, list[int]] = {}
    for T in sorted(set(tokens)):
        groups.setdefault(triton_config.band(T), []).append(T)
    return {b: ts for b, ts in groups.items() if len(ts) >= 2}


def as_recorded(config: Config, point: int, k: int, H: int, I: int) -> Config:
    """The config as a traced call of the band's point runs it: a TMA entry with pointer loads up to
    INLINE_TMA_MAX_FLOP; above it TMA is kept (descriptors built on the device, or one opaque call with recorded TMA
    off: launch.py), timed here with host descriptors (within 1-3% of device ones: NOTES.md, session 27)."""
    if isinstance(config, triton_config.SortedConfig) and config.tma:
        if dispatch.gemm_flop(point, k, H, I) <= dispatch.INLINE_TMA_MAX_FLOP:
            return dataclasses.replace(config, tma=False)
    return config


def today_config(entries, dtype, E: int, k: int, H: int, I: int, band: tuple) -> tuple[int, Config] | None:
    """(its entry's T, the config) the band's graph runs without a band entry, as dispatch.triton_config_for takes
    it: the entry nearest the band's point, a decode one replaced by the sorted default where the band reaches past
    the decode kernels; None for a shape without entries."""
    lo, hi = band
    point = triton_config.band_point(lo)
    entry = triton_config.nearest_shape_entry(entries, dtype, E, k, H, I, point)
    if entry is None:
        return None
    config = dispatch.decode_within(entry["config"], dtype, E, k, point, hi)
    return entry["T"], as_recorded(config, point, k, H, I)


def candidates(entries, dtype, E: int, k: int, H: int, I: int, band: tuple):
    """({label: config as a graph of the band runs it}, today's label or None, the labels a band entry may take):
    the shape's own entries at grid points inside the band (not decode or grouped_mm ones, above), and the config
    the band runs today (today_config), timed beside them whatever its path."""
    lo, hi = band
    point = triton_config.band_point(lo)
    found, eligible = {}, set()
    for e in sorted(triton_config.shape_entries(entries, dtype, E, k, H, I), key=lambda e: e["T"]):
        if e["T"] < lo or (hi is not None and e["T"] > hi) or e["config"].path in (Path.DECODE, Path.GROUPED_MM):
            continue
        label = f"{e['T']} {e['config'].path.value}"
        found[label] = as_recorded(e["config"], point, k, H, I)
        eligible.add(label)
    today = today_config(entries, dtype, E, k, H, I, band)
    if today is None:
        return found, None, eligible
    today_label = next((label for label, cfg in found.items() if cfg == today[1]), None)
    if today_label is None:
        today_label = f"{today[0]} {today[1].path.value} (today)"
        found[today_label] = today[1]
    return found, today_label, eligible


def choose(times: dict[str, list[float]], today: str | None, eligible) -> tuple[str, float] | None:
    """(the winning label among `eligible`, its gain over today's) from {label: [seconds at each length]}, or None
    where none beats today's by BAND_MIN_GAIN. Scores: geometric mean over the lengths of time / the best at that
    length."""
    n = len(next(iter(times.values())))
    best = [min(ts[i] for ts in times.values()) for i in range(n)]
    score = {label: math.exp(sum(math.log(t / b) for t, b in zip(ts, best)) / n) for label, ts in times.items()}
    winner = min((label for label in score if label in eligible), key=score.get, default=None)
    if winner is None or today is None:
        return None
    gain = score[today] / score[winner]
    return (winner, gain) if gain >= BAND_MIN_GAIN else None


def measure(shape_names, tokens, dtype, timer, entries, command: str) -> tuple[list[dict], list[tuple]]:
    """(band entries to write, the measured table: (shape name, band, T, {label: us}, today's label)) of each
    named shape over the bands of `tokens`."""
    from .shapes import ALL_SHAPES

    dname = str(dtype).removeprefix("torch.")
    written, table = [], []
    for name in shape_names:
        E, k, H, I = ALL_SHAPES[name]
        for band, lengths in lengths_by_band(tokens).items():
            cands, today, eligible = candidates(entries, dtype, E, k, H, I, band)
            if len(cands) < 2:
                print(f"  {name} band {band}: {len(cands)} candidate(s), nothing to choose", flush=True)
                continue
            times: dict[str, list[float]] = {label: [] for label in cands}
            for _, T, b in benches([name], lengths, dtype):
                timer.calls = graph_calls(T, k, H, I)
                # the final's score: the geometric mean of the same tokens under each routing (Bench.routed)
                got, _ = scores(timer, b.routed(seed=T), list(cands.values()))
                for label, cfg in cands.items():
                    times[label].append(got[cfg])
                table.append((name, band, T, {label: got[cfg] * 1e6 for label, cfg in cands.items()}, today))
                del b
                torch.cuda.empty_cache()
            chosen = choose(times, today, eligible)
            verdict = "keeps its point's entry" if chosen is None else f"takes {chosen[0]} ({chosen[1]:.3f}x)"
            print(f"  {name} band {band}: {verdict}", flush=True)
            if chosen is not None:
                label, gain = chosen
                written.append({"dtype": dname, "E": E, "k": k, "H": H, "I": I, "band": list(band),
                                "config": triton_config.to_dict(cands[label]), "T": int(label.split()[0]),
                                "gain": round(gain, 3), "lengths": lengths, "written_by": command})
    return written, table
