"""`python -m moe_compiler.tune --backward`: which grouped GEMMs run the training backward's dA and dx, and its weight
gradients, on this GPU — torch's or one of csrc/'s CUTLASS configs — per (dtype, E, k, H, I, T), written as the
"backward" entries of lowering/configs/<gpu>.json (lowering/backward_table.py reads them).

    dA         = G [S, H] @ W_down[e]        W_down    [E, H, I]   (transformers' layout)
    dx_rows    = dz [S, 2I] @ W_gate_up[e]   W_gate_up [E, 2I, H]
    dW_down    = G_e^T act_e   [E, H, I]     act [S, I]   (the weight gradients: each expert's rows reduced)
    dW_gate_up = dz_e^T X_e    [E, 2I, H]    X   [S, H]
    S = T k rows in expert order (unpadded: z saved), offs [E] int32 on the device

Why measured: above the GroupedTile band torch runs one kernel (128 x 256 cooperative) at every shape; our 64 x 256
ping-pong tile ran both GEMMs 1.14x faster at Qwen3-235B-A22B T = 4096 and our best tile lost up to 1% at GPT-OSS-20B
T = 32768 (H100, benchmarks/probes/probe_grouped_tile.py, NOTES.md session 53).

How: bf16 operands drawn per point, each routing of tune.shapes.ROUTINGS (uniform, skewed); torch's candidate in the
buffer the default backward gives it (GroupedTile.LARGE's 129 E rows where large_tile_pays), CUTLASS's over the S
rows; every candidate's dA + dx (or dW_down + dW_gate_up: cutlass.WGRAD_CONFIGS) timed in the same interleaved
rounds (tune.timing.interleaved), scored by the geometric mean over the routings. A CUTLASS config is chosen only
where its outputs equal torch's (rel err <= ERR, checked one GEMM at a time: a weight gradient is the weights' size)
and its score beats torch's by MARGIN; otherwise the entry says "torch", which is measured too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moe_compiler.lowering import backward_table, cutlass, triton_backward
from moe_compiler.testing import rel_err

from .shapes import ROUTINGS, routes
from .timing import interleaved

ROUNDS = 20
MARGIN = 1.03  # a CUTLASS config must be this much faster than torch's: "not slower anywhere it is selected"
ERR = 1e-2  # bf16 GEMMs of the same operands, different tile orders


def operands(E: int, k: int, H: int, I: int, T: int, routing: str, dtype: torch.dtype, min_slots: int,
             gen: torch.Generator) -> dict:
    """Random operands of one point: G [R, H], dz [R, 2I], act [R, I], X [R, H] (R = max(T k, min_slots) rows, the
    trailing ones in no segment), W_down [E, H, I], W_gate_up [E, 2I, H], offs [E] of `routing`'s ids."""
    dev = gen.device
    S = T * k
    counts = torch.bincount(routes(T, E, k, routing, gen).reshape(-1), minlength=E)
    rows = max(S, min_slots)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dtype)

    return {"G": draw(rows, H), "dz": draw(rows, 2 * I), "act": draw(rows, I), "X": draw(rows, H),
            "w_down": draw(E, H, I, scale=H**-0.5), "w_gate_up": draw(E, 2 * I, H, scale=(2 * I) ** -0.5),
            "offs": counts.cumsum(0).to(torch.int32), "S": S}


def candidates(ops: dict, configs) -> dict[str, tuple[Callable[[], torch.Tensor], ...]]:
    """name -> the calls computing dA and dx_rows over the S real rows: "torch" in its own buffer (its pick follows
    the buffer's rows), each CUTLASS config (cutlass.CONFIGS) over the S rows."""
    G, dz, w_down, w_gate_up, offs, S = (ops[n] for n in ("G", "dz", "w_down", "w_gate_up", "offs", "S"))
    gemms = {backward_table.TORCH: (lambda: torch._grouped_mm(G, w_down, offs=offs)[:S],
                                    lambda: torch._grouped_mm(dz, w_gate_up, offs=offs)[:S])}
    for i in configs:
        gemms[cutlass.CONFIGS[i]] = (lambda i=i: cutlass.grouped_mm(G[:S], w_down, offs, False, i),
                                     lambda i=i: cutlass.grouped_mm(dz[:S], w_gate_up, offs, False, i))
    return gemms


def wgrad_candidates(ops: dict, configs) -> dict[str, tuple[Callable[[], torch.Tensor], ...]]:
    """name -> the calls computing dW_down [E, H, I] and dW_gate_up [E, 2I, H]: "torch" over its own buffer, each
    CUTLASS weight-gradient config (cutlass.WGRAD_CONFIGS) over the S rows."""
    G, dz, act, X, offs, S = (ops[n] for n in ("G", "dz", "act", "X", "offs", "S"))
    gemms = {backward_table.TORCH: (lambda: torch._grouped_mm(G.t(), act, offs=offs),
                                    lambda: torch._grouped_mm(dz.t(), X, offs=offs))}
    for i in configs:
        gemms[cutlass.WGRAD_CONFIGS[i]] = (lambda i=i: cutlass.grouped_mm_wgrad(G[:S], act[:S], offs, i),
                                           lambda i=i: cutlass.grouped_mm_wgrad(dz[:S], X[:S], offs, i))
    return gemms


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """rel_err in slices of the first axis, in fp32: a weight gradient is the weights' size (DeepSeek-V3's
    dW_gate_up: 15 GB in bf16), too large for rel_err's fp64 copies."""
    if got.dim() == 2:
        return rel_err(got, want)
    num = den = 0.0
    for g, w in zip(got, want):
        num += float((g.float() - w.float()).square().sum())
        den += float(w.float().square().sum())
    return math.sqrt(num / max(den, 1e-60))


def timed(bodies: dict) -> dict:
    """{name: median seconds} of the candidates, in the same interleaved rounds."""
    return interleaved(bodies, ROUNDS)


def measure(E: int, k: int, H: int, I: int, T: int, dtype: torch.dtype, configs, gen: torch.Generator,
            time_bodies: Callable[[dict], dict] = timed, make=candidates) -> tuple[dict, dict]:
    """({name: score in seconds}, {name: worst rel err against torch's}) of every candidate of `make` (candidates:
    dA and dx; wgrad_candidates: the weight gradients) at one point."""
    library = triton_backward.default_config(dtype, E, k, H, I, T, library=True, saved=True)
    per_routing, errs = [], {}
    for routing in ROUTINGS:
        gemms = make(operands(E, k, H, I, T, routing, dtype, library.min_slots(E), gen), configs)
        for j, torch_gemm in enumerate(gemms[backward_table.TORCH]):  # one GEMM's outputs live at a time
            want = torch_gemm()
            for name, calls in gemms.items():
                errs[name] = max(errs.get(name, 0.0), _err(calls[j](), want))
            del want
        per_routing.append(time_bodies({name: lambda calls=calls: [c() for c in calls]
                                        for name, calls in gemms.items()}))
        del gemms
    scores = {name: math.exp(sum(math.log(max(t[name], 1e-12)) for t in per_routing) / len(per_routing))
              for name in per_routing[0]}
    return scores, errs


def choose(scores: dict, errs: dict) -> str:
    """The fastest CUTLASS config within ERR of torch's outputs and MARGIN faster than torch's, else "torch"."""
    right = [n for n in scores if n != backward_table.TORCH and errs[n] <= ERR]
    best = min(right, key=scores.get, default=None)
    if best is not None and scores[backward_table.TORCH] >= MARGIN * scores[best]:
        return best
    return backward_table.TORCH


def tune(shapes, tokens, dtype: torch.dtype, configs=None, seed: int = 0, time_bodies=timed,
         wgrad_configs=None) -> list[dict]:
    """The backward entries of every (shape, T), in transformers' weight layout (transposed False): dA / dx among
    `configs` (cutlass.CONFIGS indices, default all), the weight gradients among `wgrad_configs` (WGRAD_CONFIGS
    indices, default all; empty: not timed, the entry has no "wgrad")."""
    configs = range(len(cutlass.CONFIGS)) if configs is None else configs
    wgrad_configs = range(len(cutlass.WGRAD_CONFIGS)) if wgrad_configs is None else wgrad_configs
    dname = str(dtype).removeprefix("torch.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    entries = []
    for E, k, H, I in shapes:
        for T in tokens:
            entry = {"dtype": dname, "E": E, "k": k, "H": H, "I": I, "T": T, "transposed": False}
            for key, make, chosen_from in (("dgrad", candidates, configs), ("wgrad", wgrad_candidates, wgrad_configs)):
                if key == "wgrad" and not chosen_from:  # (dgrad is always written: the table needs it)
                    continue
                gen = torch.Generator(device).manual_seed(seed)
                scores, errs = measure(E, k, H, I, T, dtype, chosen_from, gen, time_bodies, make)
                chosen = choose(scores, errs)
                prefix = "" if key == "dgrad" else "wgrad_"
                entry.update({key: chosen, f"{prefix}us": {n: round(s * 1e6, 1) for n, s in scores.items()},
                              f"{prefix}err": {n: float(f"{e:.2e}") for n, e in errs.items()}})
                print(f"  E={E} k={k} H={H} I={I} T={T:>6} {key}: torch {scores['torch'] * 1e6:9.1f} us, {chosen} "
                      f"{scores[chosen] * 1e6:9.1f} us", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
            entries.append(entry)
    return entries


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """old's entries at points new does not measure, then new's; sorted by point."""
    points = {backward_table.point(e) for e in new}
    return sorted([e for e in old if backward_table.point(e) not in points] + new, key=backward_table.point)
