"""Capture once, replay with new inputs: the CUDA-graph check every GPU test of an op makes.

    graph, out = captured(lambda: op(*inputs))       # one call outside the capture (compiles, allocates), then one
                                                     # inside; `out`: the captured call's outputs (their memory is
                                                     # what each replay writes)
    ... copy new routing / activations into the inputs in place ...
    replay(graph, out)                               # every float output poisoned (NaN), the graph replayed and
                                                     # waited for: an element a replay did not write shows
"""

from __future__ import annotations

import torch


def captured(fn):
    """(graph, outputs of fn() as captured): fn() warmed up outside the capture first."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def replay(graph, out) -> None:
    """Poison every floating-point tensor in `out` (a tensor or nested tuples / lists of them, Nones allowed),
    replay the graph, wait for it."""
    for t in _tensors(out):
        if t.is_floating_point():
            t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()


def reroute(offs: torch.Tensor, S: int, seed: int) -> None:
    """New random per-expert row ends for S sorted rows, written into the grouped GEMMs' `offs` [E] (int32) in
    place: expert seed % E gets no rows, the others a random share; what a replay of a captured GEMM reads."""
    E = offs.numel()
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(0, E, (S,), generator=gen), minlength=E)
    counts[seed % E] = 0  # an expert without rows
    counts[(seed + 1) % E] += S - int(counts.sum())
    offs.copy_(counts.cumsum(0).to(torch.int32))
