"""`python -m moe_compiler.tune --backward`: which grouped GEMM runs the training backward's dA and dx on this GPU —
torch's or one of csrc/'s CUTLASS configs — per (dtype, E, k, H, I, T), written as the "backward" entries of
lowering/configs/<gpu>.json (lowering/backward_table.py reads them).

    dA      = G [S, H] @ W_down[e]        W_down    [E, H, I]   (transformers' layout)
    dx_rows = dz [S, 2I] @ W_gate_up[e]   W_gate_up [E, 2I, H]
    S = T k rows in expert order (unpadded: z saved), offs [E] int32 on the device

Why measured: above the GroupedTile band torch runs one kernel (128 x 256 cooperative) at every shape; our 64 x 256
ping-pong tile ran both GEMMs 1.14x faster at Qwen3-235B-A22B T = 4096 and our best tile lost up to 1% at GPT-OSS-20B
T = 32768 (H100, benchmarks/probes/probe_grouped_tile.py, NOTES.md session 53).

How: bf16 operands drawn per point, each routing of tune.shapes.ROUTINGS (uniform, skewed); torch's candidate in the
buffer the default backward gives it (GroupedTile.LARGE's 129 E rows where large_tile_pays), CUTLASS's over the S
rows; every candidate's dA + dx timed in the same interleaved rounds (tune.timing.interleaved), scored by the
geometric mean over the routings. A CUTLASS config is chosen only where its outputs equal torch's (rel err <= ERR)
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
    """Random operands of one point: G [R, H], dz [R, 2I] (R = max(T k, min_slots) rows, the trailing ones in no
    segment), W_down [E, H, I], W_gate_up [E, 2I, H], offs [E] of `routing`'s ids."""
    dev = gen.device
    S = T * k
    counts = torch.bincount(routes(T, E, k, routing, gen).reshape(-1), minlength=E)
    rows = max(S, min_slots)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dtype)

    return {"G": draw(rows, H), "dz": draw(rows, 2 * I), "w_down": draw(E, H, I, scale=H**-0.5),
            "w_gate_up": draw(E, 2 * I, H, scale=(2 * I) ** -0.5), "offs": counts.cumsum(0).to(torch.int32), "S": S}


def candidates(ops: dict, configs) -> dict[str, Callable[[], tuple]]:
    """name -> a call computing (dA, dx_rows) over the S real rows: "torch" in its own buffer (its pick follows the
    buffer's rows), each CUTLASS config over the S rows."""
    G, dz, w_down, w_gate_up, offs, S = (ops[n] for n in ("G", "dz", "w_down", "w_gate_up", "offs", "S"))
    bodies = {backward_table.TORCH: lambda: (torch._grouped_mm(G, w_down, offs=offs)[:S],
                                             torch._grouped_mm(dz, w_gate_up, offs=offs)[:S])}
    for i in configs:
        bodies[cutlass.CONFIGS[i]] = lambda i=i: (cutlass.grouped_mm(G[:S], w_down, offs, False, i),
                                                  cutlass.grouped_mm(dz[:S], w_gate_up, offs, False, i))
    return bodies


def timed(bodies: dict) -> dict:
    """{name: median seconds} of the candidates, in the same interleaved rounds."""
    return interleaved(bodies, ROUNDS)


def measure(E: int, k: int, H: int, I: int, T: int, dtype: torch.dtype, configs, gen: torch.Generator,
            time_bodies: Callable[[dict], dict] = timed) -> tuple[dict, dict]:
    """({name: score in seconds}, {name: worst rel err against torch's}) of every candidate at one point."""
    library = triton_backward.default_config(dtype, E, k, H, I, T, library=True, saved=True)
    per_routing, errs = [], {}
    for routing in ROUTINGS:
        bodies = candidates(operands(E, k, H, I, T, routing, dtype, library.min_slots(E), gen), configs)
        want = [t.float() for t in bodies[backward_table.TORCH]()]
        for name, body in bodies.items():
            errs[name] = max(errs.get(name, 0.0), *(rel_err(g.float(), w) for g, w in zip(body(), want)))
        per_routing.append(time_bodies(bodies))
        del bodies, want
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


def tune(shapes, tokens, dtype: torch.dtype, configs=None, seed: int = 0, time_bodies=timed) -> list[dict]:
    """The backward entries of every (shape, T), in transformers' weight layout (transposed False)."""
    configs = range(len(cutlass.CONFIGS)) if configs is None else configs
    dname = str(dtype).removeprefix("torch.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    entries = []
    for E, k, H, I in shapes:
        for T in tokens:
            gen = torch.Generator(device).manual_seed(seed)
            scores, errs = measure(E, k, H, I, T, dtype, configs, gen, time_bodies)
            chosen = choose(scores, errs)
            entries.append({"dtype": dname, "E": E, "k": k, "H": H, "I": I, "T": T, "transposed": False,
                            "dgrad": chosen, "us": {n: round(s * 1e6, 1) for n, s in scores.items()},
                            "err": {n: float(f"{e:.2e}") for n, e in errs.items()}})
            print(f"  E={E} k={k} H={H} I={I} T={T:>6}: torch {scores['torch'] * 1e6:9.1f} us, {chosen} "
                  f"{scores[chosen] * 1e6:9.1f} us", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return entries


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """old's entries at points new does not measure, then new's; sorted by point."""
    points = {backward_table.point(e) for e in new}
    return sorted([e for e in old if backward_table.point(e) not in points] + new, key=backward_table.point)
