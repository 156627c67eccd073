"""The permute step and the segment matmuls of the torch composite (torch_experts.py), three ways.

Permute: (token, slot) pairs sorted by expert into contiguous per-expert segments.

    topk_ids [T, k] --flatten--> ids [S] --stable sort--> sorted_ids [S], perm [S]
    pair p = perm[i] is the i-th row of the sorted order; its token is perm[i] // k, its slot perm[i] % k.
    counts [E] int32: pairs per expert;  offs [E] int32: cumsum(counts), the end of each expert's segment
    (the `offs` convention of torch._grouped_mm). Sentinel pairs (id E: routed to another rank's expert under
    transformers' expert parallelism) sort after every segment, outside them: no matmul computes their rows
    (`live` marks the others; `gather_ids` are the sorted ids clamped into [0, E) for per-row gathers).

Segment matmuls over rows sorted by expert (one implementation per class, chosen by dispatch.select):

    mm(x [S,K], w [E,N,K])    -> [S,N]     row block of expert e: x_e @ w[e]^T
    mm_nn(x [S,N], w [E,N,K]) -> [S,K]     x_e @ w[e]
    wgrad(a [S,N], b [S,K])   -> [E,N,K]   a_e^T @ b_e (zeros for experts with no rows)

and, for an expert weight stored [E, out, in] (or [E, in, out]: `transposed`), the three uses every path makes of
it: project (x @ W^T), project_dx (dy @ W: the input gradient), project_dw (the weight gradient, in the weight's
own layout).

    LoopMM      CPU: one fp32 `mm` per non-empty segment (host sync: the CPU path only)
    GroupedMM   torch._grouped_mm: CUTLASS on sm90/sm100 for bf16 (capture-safe), torch's C++ per-group loop
                on the CPU; both need 16-byte aligned rows
    GatherBmm   CUDA, any dtype: each row gathers its expert's weight and runs bmm (capture-safe, static
                shapes, bandwidth-hungry: the fallback where grouped_mm cannot run)

Everything but LoopMM is capture-safe: the counts come from a scatter-add of ones, not `bincount` (whose
output size depends on the data).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import device


@dataclasses.dataclass
class Segments:
    sorted_ids: torch.Tensor  # [S] expert of each sorted row, ids' dtype (E: a sentinel row)
    perm: torch.Tensor  # [S] int64, flat pair index of each sorted row
    offs: torch.Tensor  # [E] int32, exclusive end of each expert's rows
    num_experts: int

    @classmethod
    def build(cls, topk_ids: torch.Tensor, num_experts: int) -> Segments:
        flat = topk_ids.reshape(-1)
        sorted_ids, perm = torch.sort(flat, stable=True)
        counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)  # the last bin: sentinels
        counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
        return cls(sorted_ids, perm, counts[:num_experts].cumsum(0, dtype=torch.int32), num_experts)

    @functools.cached_property
    def live(self) -> torch.Tensor:
        """[S] bool: the sorted rows that belong to an expert (False: sentinel rows, never computed)."""
        return self.sorted_ids < self.num_experts

    @functools.cached_property
    def gather_ids(self) -> torch.Tensor:
        """[S] int64 expert of each sorted row for gathers, sentinel rows clamped to E - 1 (their rows are zero
        or dropped wherever a gather feeds a result)."""
        return self.sorted_ids.clamp(max=self.num_experts - 1).long()

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        """[S] int64: the sorted row of each flat pair (perm's inverse), so unsorting is a gather."""
        arange = torch.arange(self.perm.numel(), device=self.perm.device)
        return torch.empty_like(self.perm).scatter_(0, self.perm, arange)

    @functools.cached_property
    def host_ranges(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) of every non-empty segment. Host sync: for the CPU path only."""
        ends = self.offs.tolist()
        starts = [0] + ends[:-1]
        return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


def project(impl, x, w, seg: Segments, transposed: bool):
    return impl.mm_nn(x, w, seg) if transposed else impl.mm(x, w, seg)


def project_dx(impl, dy, w, seg: Segments, transposed: bool):
    return impl.mm(dy, w, seg) if transposed else impl.mm_nn(dy, w, seg)


def project_dw(impl, x, dy, seg: Segments, transposed: bool):
    return impl.wgrad(x, dy, seg) if transposed else impl.wgrad(dy, x, seg)


def _base_aligned(t: torch.Tensor) -> bool:
    """t's first element on a 16-byte boundary. A traced tensor (fake: no data pointer) by its storage offset, as
    Inductor decides it for its own kernels: a compiled graph copies an input it so assumed aligned whenever a
    call's is not (torch._inductor.utils.copy_misaligned_inputs), and its own buffers are aligned."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if is_fake(t):
        return statically_known_true(t.storage_offset() * t.element_size() % 16 == 0)
    return t.data_ptr() % 16 == 0


class LoopMM:
    """Inputs of any float dtype are upcast one segment or one expert at a time, so the math is fp32 and the
    extra memory is one expert's weight, not a copy of the whole stack."""

    name = "cpu_loop"

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    @staticmethod
    def mm(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[1], dtype=torch.float32)
        for e, s, t in seg.host_ranges:
            torch.mm(x[s:t].float(), w[e].float().t(), out=out[s:t])
        return out

    @staticmethod
    def mm_nn(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[2], dtype=torch.float32)
        for e, s, t in seg.host_ranges:
            torch.mm(x[s:t].float(), w[e].float(), out=out[s:t])
        return out

    @staticmethod
    def wgrad(a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = a.new_zeros(seg.num_experts, a.shape[1], b.shape[1], dtype=torch.float32)
        for e, s, t in seg.host_ranges:
            torch.mm(a[s:t].float().t(), b[s:t].float(), out=out[e])
        return out


class GroupedMM:
    """`offs` (int32 [E], cumulative rows) is read on the device, so on CUDA there is no host sync and the path
    can be captured; other dtypes or GPUs make torch fall back to a loop that copies `offs` to the host, so
    dispatch.select picks this path on CUDA only for bf16 on sm90+."""

    name = "torch_grouped_mm"

    @staticmethod
    def takes(like: torch.Tensor, widths: tuple[int, ...], operands: tuple[torch.Tensor, ...] = ()) -> bool:
        """Whether torch._grouped_mm runs its grouped GEMM on operands of like's dtype and device with rows of
        these widths (elements): on CUDA, bf16 on sm90+ (otherwise torch loops with host syncs); on the CPU any
        dtype. CUTLASS loads 16-byte vectors: every row width and every operand's base a multiple of 16 bytes."""
        if like.device.type == "cuda":
            if like.dtype != torch.bfloat16 or not device.sm90_or_newer(device.index(like)):
                return False
        size = like.element_size()
        return all(w * size % 16 == 0 for w in widths) and all(_base_aligned(t) for t in operands)

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    @staticmethod
    def mm(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=seg.offs)

    @staticmethod
    def mm_nn(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        return torch._grouped_mm(x, w, offs=seg.offs)

    @staticmethod
    def wgrad(a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
        # 2D x 2D with offs along the shared S axis yields one [N, K] block per expert.
        return torch._grouped_mm(a.t(), b, offs=seg.offs)


class GatherBmm:
    """Never looks at `offs`: every row carries its expert id (`seg.sorted_ids`). The price is bandwidth (each
    row reads its expert's whole weight matrix). Rows go in chunks so the gathered weights stay under
    CHUNK_BYTES."""

    name = "torch_gather_bmm"
    # 256 MiB of gathered weights per chunk: large enough that a chunk fills the GPU, small enough to sit
    # beside an 80 GB model.
    CHUNK_BYTES = 256 << 20

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    @classmethod
    def _chunks(cls, rows: int, n: int, k: int, itemsize: int):
        step = max(1, cls.CHUNK_BYTES // max(1, n * k * itemsize))
        for s in range(0, rows, step):
            yield s, min(rows, s + step)

    @classmethod
    def mm(cls, x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[1])
        for s, t in cls._chunks(x.shape[0], w.shape[1], w.shape[2], w.element_size()):
            out[s:t] = torch.bmm(w[seg.gather_ids[s:t]], x[s:t].unsqueeze(-1)).squeeze(-1)
        return out

    @classmethod
    def mm_nn(cls, x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[2])
        for s, t in cls._chunks(x.shape[0], w.shape[1], w.shape[2], w.element_size()):
            out[s:t] = torch.bmm(x[s:t].unsqueeze(1), w[seg.gather_ids[s:t]]).squeeze(1)
        return out

    @classmethod
    def wgrad(cls, a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = a.new_zeros(seg.num_experts, a.shape[1], b.shape[1], dtype=torch.float32)
        for s, t in cls._chunks(a.shape[0], a.shape[1], b.shape[1], 4):
            outer = a[s:t].float().unsqueeze(-1) * b[s:t].float().unsqueeze(1)
            out.index_add_(0, seg.gather_ids[s:t], outer)  # sentinel rows arrive as zeros
        return out.to(a.dtype)
