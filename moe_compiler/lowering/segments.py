"""The permute step: (token, slot) pairs sorted by expert into contiguous per-expert segments.

    topk_ids [T, k] --flatten--> ids [S] --stable sort--> sorted_ids [S], perm [S]
    pair p = perm[i] is the i-th row of the sorted order; its token is perm[i] // k, its slot perm[i] % k.
    counts [E] int32: pairs per expert;  offs [E] int32: cumsum(counts), the end of each expert's segment
    (the `offs` convention of torch._grouped_mm).

Everything here is capture-safe (no host sync, static shapes): the counts come from a scatter-add of
ones, not `bincount` (whose output size depends on the data).
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass
class Segments:
    sorted_ids: torch.Tensor  # [S] expert of each sorted row, ids' dtype
    perm: torch.Tensor  # [S] int64, flat pair index of each sorted row
    offs: torch.Tensor  # [E] int32, exclusive end of each expert's rows
    num_experts: int

    @classmethod
    def build(cls, topk_ids: torch.Tensor, num_experts: int) -> Segments:
        flat = topk_ids.reshape(-1)
        sorted_ids, perm = torch.sort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
        return cls(sorted_ids, perm, counts.cumsum(0, dtype=torch.int32), num_experts)

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        """[S] int64: the sorted row of each flat pair (perm's inverse), so unsorting is a gather."""
        return torch.empty_like(self.perm).scatter_(0, self.perm, torch.arange(self.perm.numel(), device=self.perm.device))

    @functools.cached_property
    def host_ranges(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) of every non-empty segment. Host sync: for the CPU path only."""
        ends = self.offs.tolist()
        starts = [0] + ends[:-1]
        return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]
