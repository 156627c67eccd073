"""triton_align.align_rows: the block-aligned expert sort, checked against torch.sort(stable=True)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, fails_with_ids_assert, poisoned_allocations  # noqa: E402

from moe_compiler.lowering import triton_align  # noqa: E402


def _check(ids, E, block_m):
    with poisoned_allocations():
        rows = triton_align.align_rows(ids, E, block_m)
    flat = ids.reshape(-1).cpu().long()
    S = flat.numel()
    sorted_rows, pos = rows.sorted_rows.cpu().long(), rows.pos.cpu().long()
    block_expert, seg_end, n = rows.block_expert.cpu().long(), rows.seg_end.cpu().long(), int(rows.num_padded)
    counts = torch.bincount(flat.clamp(0, E - 1), minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    assert n == int(padded.sum()) and n % block_m == 0
    assert rows.max_blocks == triton_align.max_blocks(S, E, block_m) >= n // block_m
    starts = padded.cumsum(0) - padded
    assert torch.equal(seg_end, starts + counts)
    assert torch.equal(sorted_rows[pos], torch.arange(S))  # pos inverts sorted_rows
    # The real rows, expert by expert, are exactly torch's stable sort: deterministic order.
    real = torch.cat([sorted_rows[s:s + c] for s, c in zip(starts.tolist(), counts.tolist())])
    assert torch.equal(real, torch.sort(flat.clamp(0, E - 1), stable=True).indices)
    # Every block holds one expert's rows, in order; blocks past the end are -1.
    expect = torch.repeat_interleave(torch.arange(E), padded // block_m)
    assert torch.equal(block_expert[: n // block_m], expect)
    assert (block_expert[n // block_m:] == -1).all()
    return int(rows.ids_ok)


@pytest.mark.parametrize(
    "T,E,k,block_m",
    [
        (1, 8, 2, 16),  # decode: T*k << E, most experts empty
        (9, 5, 2, 16),  # odd sizes, prime E
        (6, 4, 4, 16),  # k = E
        (300, 3, 1, 16),  # k = 1, many blocks per expert
        (700, 7, 2, 32),  # S = 1400 > CHUNK: two count/scatter programs and a cross-chunk offset
        (1100, 130, 2, 16),  # E + 1 > 128: BLOCK_E = 256; two chunks; many small segments
    ],
)
def test_align_matches_stable_sort(T, E, k, block_m):
    ids = torch.rand(T, E).argsort(dim=1)[:, :k].to(DEVICE)
    assert _check(ids, E, block_m) == 1


def test_skewed_routing_one_hot_expert():
    # Every token's first choice is expert 0: one long segment spanning chunks, the rest short.
    ids = torch.rand(1500, 16).argsort(dim=1)[:, :2]
    ids[:, 0] = 0
    ids[:, 1] = ids[:, 1].clamp_min(1)
    assert _check(ids.to(DEVICE), 16, 16) == 1


def test_int32_ids_and_strided_view():
    ids = torch.rand(40, 12).argsort(dim=1)[:, :3].to(torch.int32)
    assert _check(ids[:, 1:2].to(DEVICE), 12, 16) == 1  # a [T, 1] slice of a wider tensor


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU kernel asserts instead: test_out_of_range_ids_fail_the_launch")
@pytest.mark.parametrize("bad", [-1, 9, 1000])  # 8 = E is the expert-parallel sentinel: test_sentinel_ids.py
def test_out_of_range_ids_are_flagged_and_clamped(bad):
    ids = torch.rand(20, 8).argsort(dim=1)[:, :2]
    ids[3, 1] = bad
    assert _check(ids.to(DEVICE), 8, 16) == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs no asserts: the test of flags and clamps covers it")
@pytest.mark.parametrize("bad", [-1, 9])
def test_out_of_range_ids_fail_the_launch(bad):
    fails_with_ids_assert(
        f"""
        from moe_compiler.lowering import triton_align
        ids = torch.zeros(20, 2, dtype=torch.long, device="cuda")
        ids[3, 1] = {bad}
        triton_align.align_rows(ids, 8, 16)
        """
    )


@pytest.mark.parametrize("T,k,launches", [(64, 8, ["_align_one_chunk_kernel"]),  # S = 512: one chunk
                                          (129, 8, ["_count_kernel", "_offsets_kernel", "_scatter_kernel"])])
def test_one_chunk_of_pairs_is_one_launch(T, k, launches, monkeypatch):
    """Each launch is host time in a decode step without CUDA graphs: pairs that fit one chunk align in one."""
    from moe_compiler.lowering import launch

    names, real = [], launch.kernel
    monkeypatch.setattr(launch, "kernel", lambda kern: names.append(getattr(kern, "__name__", None)
                                                                    or kern.fn.__name__) or real(kern))
    ids = torch.rand(T, 16).argsort(dim=1)[:, :k].to(DEVICE)
    assert _check(ids, 16, 16) == 1
    assert names == launches
