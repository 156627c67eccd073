"""Probe: does folding an expert's small last block into its previous tile pay (issue 16, deliverable 3)?

probe_padding --tails (NOTES.md session 37) measured that a partial tile costs about one whole tile whatever its
rows: the tile streams its expert's whole weight tile and runs the whole tile's MMAs. A smaller tail tile would
cut only the MMAs (v4's half-height tiles: nothing saved). This probe tries the other cut: no tile of its own for a
tail of <= TAIL_M rows — the expert's previous tile takes those rows as a second, TAIL_M-row operand of the same
K loop, so the weight tile it already loads serves both (one weight stream; the tail costs its MMAs and its row
loads). The tail's own tile finds itself folded and returns before loading anything.

Stripped GEMMs — gate_up (gathered rows, concatenated gate/up weights [E, 2I, H], SiLU(gate) * up) and down (act
rows in sorted order, W_down [E, H, I]), pointer loads, no bias / router weight / TMA / warp specialization — each
with TAIL_M = 0 (no folding) and TAIL_M > 0, per point and routing (uniform; balanced, where nothing folds: the
test's overhead), under a CUDA graph from a cold L2; the production kernels with the table's config beside them for
scale, and the production kernels with SortedConfig.tail_m (warp specialization off) against the same config
unfolded. Every probe output is poisoned first and checked against an fp32 reference (the production kernels'
folding is checked by tests/lowering/test_triton_experts.py).

    python -m benchmarks.probes.probe_fold_tail [--points qwen3_30b_a3b:4096 ...] [--tails 32 64] [--block-n 64 128]
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from moe_compiler.lowering.triton_align import align_rows
from moe_compiler.lowering.triton_experts import _tile_coords
from moe_compiler.testing import rel_err
from moe_compiler.tune.search import Bench
from moe_compiler.tune.shapes import SHAPES

from .. import harness
from .probe_padding import balanced_ids, point_problem

POINTS = ["qwen3_30b_a3b:4096", "deepseek_v3:4096", "mixtral_8x7b:1024"]


@triton.jit
def _gate_up_k_loop(x_ptr, w_base, tok, valid, tail_tok, tail_valid, H, I, stride_xm, stride_wn, n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_M: tl.constexpr,
                    FOLD: tl.constexpr):
    """gate / up accumulators of the block's rows and, with FOLD, of the tail's rows, over one weight stream."""
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + kk[None, :]
    wg_ptrs = w_base + n[None, :].to(tl.int64) * stride_wn + kk[:, None]
    wu_ptrs = wg_ptrs + I * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FOLD:
        t_ptrs = x_ptr + tail_tok[:, None] * stride_xm + kk[None, :]
        t_gate = tl.zeros([TAIL_M, BLOCK_N], dtype=tl.float32)
        t_up = tl.zeros([TAIL_M, BLOCK_N], dtype=tl.float32)
    else:
        t_gate = gate
        t_up = up
    for k0 in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        wg = tl.load(wg_ptrs)
        wu = tl.load(wu_ptrs)
        gate = tl.dot(a, wg, gate)
        up = tl.dot(a, wu, up)
        if FOLD:
            t = tl.load(t_ptrs, mask=tail_valid[:, None], other=0.0)
            t_gate = tl.dot(t, wg, t_gate)
            t_up = tl.dot(t, wu, t_up)
            t_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    return gate, up, t_gate, t_up


@triton.jit
def _fold_state(pid_m, block_expert_ptr, seg_end_ptr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    """(expert, its segment's end slot, the block's first slot, fold: this tile takes the expert's next <= TAIL_M
    rows too, folded: this block is such a tail, done by the tile before it)."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    end = tl.load(seg_end_ptr + expert)
    first = pid_m * BLOCK_M
    own = end - first  # rows from this block's first slot to the expert's end (> BLOCK_M: later blocks too)
    fold = own < 0  # False, as a tensor like the TAIL_M > 0 values
    folded = own < 0
    if TAIL_M > 0:
        fold = (own > BLOCK_M) & (own <= BLOCK_M + TAIL_M)
        prev = tl.load(block_expert_ptr + pid_m - 1, mask=pid_m > 0, other=-1)
        folded = (own <= TAIL_M) & (prev == expert)
    return expert, end, first, fold, folded


@triton.jit
def _fold_gate_up_kernel(x_ptr, w_ptr, act_ptr, sorted_rows_ptr, block_expert_ptr, seg_end_ptr, num_padded_ptr,
                         H, I, TOP_K, GROUP_M, stride_xm, stride_we, stride_wn, stride_am,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_M: tl.constexpr):
    num_pid_n = tl.cdiv(I, BLOCK_N)
    num_pid_m = tl.load(num_padded_ptr) // BLOCK_M
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        expert, end, first, fold, folded = _fold_state(pid_m, block_expert_ptr, seg_end_ptr, BLOCK_M, TAIL_M)
        if not folded:
            slots = first + tl.arange(0, BLOCK_M)
            valid = slots < end
            tok = (tl.load(sorted_rows_ptr + slots, mask=valid, other=0) // TOP_K).to(tl.int64)
            n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % I
            w_base = w_ptr + expert * stride_we
            n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            if TAIL_M > 0:  # (a constexpr test first: Triton compiles both arms of a runtime `if`)
                if fold:
                    t_slots = first + BLOCK_M + tl.arange(0, TAIL_M)
                    t_valid = t_slots < end
                    t_tok = (tl.load(sorted_rows_ptr + t_slots, mask=t_valid, other=0) // TOP_K).to(tl.int64)
                    gate, up, t_gate, t_up = _gate_up_k_loop(x_ptr, w_base, tok, valid, t_tok, t_valid, H, I,
                                                             stride_xm, stride_wn, n, BLOCK_M, BLOCK_N, BLOCK_K,
                                                             TAIL_M, True)
                    t_out = t_gate / (1.0 + tl.exp(-t_gate)) * t_up
                    tl.store(act_ptr + t_slots[:, None].to(tl.int64) * stride_am + n_out[None, :],
                             t_out.to(act_ptr.dtype.element_ty), mask=t_valid[:, None] & (n_out < I)[None, :])
                else:
                    gate, up, _, _ = _gate_up_k_loop(x_ptr, w_base, tok, valid, tok, valid, H, I, stride_xm,
                                                     stride_wn, n, BLOCK_M, BLOCK_N, BLOCK_K, TAIL_M, False)
            else:
                gate, up, _, _ = _gate_up_k_loop(x_ptr, w_base, tok, valid, tok, valid, H, I, stride_xm, stride_wn,
                                                 n, BLOCK_M, BLOCK_N, BLOCK_K, TAIL_M, False)
            out = gate / (1.0 + tl.exp(-gate)) * up
            tl.store(act_ptr + slots[:, None].to(tl.int64) * stride_am + n_out[None, :],
                     out.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (n_out < I)[None, :])


@triton.jit
def _fold_down_kernel(a_ptr, w_ptr, y_ptr, block_expert_ptr, seg_end_ptr, num_padded_ptr, H, I, GROUP_M,
                      stride_am, stride_we, stride_wn, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_M: tl.constexpr):
    """y[slot] = act[slot] @ W_down[e]^T over sorted slots (act rows contiguous), the tail folded as in gate_up."""
    num_pid_n = tl.cdiv(H, BLOCK_N)
    num_pid_m = tl.load(num_padded_ptr) // BLOCK_M
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        expert, end, first, fold, folded = _fold_state(pid_m, block_expert_ptr, seg_end_ptr, BLOCK_M, TAIL_M)
        if not folded:
            slots = (first + tl.arange(0, BLOCK_M)).to(tl.int64)
            valid = slots < end
            kk = tl.arange(0, BLOCK_K)
            n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
            n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            a_ptrs = a_ptr + slots[:, None] * stride_am + kk[None, :]
            w_ptrs = w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if TAIL_M > 0:  # (a constexpr test first: Triton compiles both arms of a runtime `if`)
                if fold:
                    t_slots = (first + BLOCK_M + tl.arange(0, TAIL_M)).to(tl.int64)
                    t_valid = t_slots < end
                    t_ptrs = a_ptr + t_slots[:, None] * stride_am + kk[None, :]
                    t_acc = tl.zeros([TAIL_M, BLOCK_N], dtype=tl.float32)
                    for k0 in range(0, I, BLOCK_K):
                        w = tl.load(w_ptrs)
                        acc = tl.dot(tl.load(a_ptrs, mask=valid[:, None], other=0.0), w, acc)
                        t_acc = tl.dot(tl.load(t_ptrs, mask=t_valid[:, None], other=0.0), w, t_acc)
                        a_ptrs += BLOCK_K
                        t_ptrs += BLOCK_K
                        w_ptrs += BLOCK_K
                    tl.store(y_ptr + t_slots[:, None] * stride_ym + n_out[None, :], t_acc.to(y_ptr.dtype.element_ty),
                             mask=t_valid[:, None] & (n_out < H)[None, :])
                else:
                    for k0 in range(0, I, BLOCK_K):
                        acc = tl.dot(tl.load(a_ptrs, mask=valid[:, None], other=0.0), tl.load(w_ptrs), acc)
                        a_ptrs += BLOCK_K
                        w_ptrs += BLOCK_K
            else:
                for k0 in range(0, I, BLOCK_K):
                    acc = tl.dot(tl.load(a_ptrs, mask=valid[:, None], other=0.0), tl.load(w_ptrs), acc)
                    a_ptrs += BLOCK_K
                    w_ptrs += BLOCK_K
            tl.store(y_ptr + slots[:, None] * stride_ym + n_out[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=valid[:, None] & (n_out < H)[None, :])


def fold_down(act, w2, rows, y, block_m, block_n, block_k, tail_m, group_m=8, num_warps=8, num_stages=3):
    """y[slot] = act[slot] @ w2[e]^T; w2 [E, H, I] with a unit last stride."""
    I, H = act.shape[1], y.shape[1]
    if w2.stride(2) != 1 or I % block_k:
        raise ValueError(f"probe kernel: needs w2 [E, H, I] with unit I stride and I % block_k == 0, got strides "
                         f"{tuple(w2.stride())}, I={I}, block_k={block_k}")
    grid = (rows.max_blocks * triton.cdiv(H, block_n),)
    _fold_down_kernel[grid](act, w2, y, rows.block_expert, rows.seg_end, rows.num_padded, H, I, group_m,
                            act.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, TAIL_M=tail_m,
                            num_warps=num_warps, num_stages=num_stages)
    return y


def fold_gate_up(x, w1, rows, k, act, block_m, block_n, block_k, tail_m, group_m=8, num_warps=8, num_stages=3):
    """act[slot] = silu(gate) * up of the pair at each sorted slot; w1 [E, 2I, H] with a unit last stride."""
    H, I = x.shape[1], act.shape[1]
    if w1.stride(2) != 1 or H % block_k:
        raise ValueError(f"probe kernel: needs w1 [E, 2I, H] with unit H stride and H % block_k == 0, got strides "
                         f"{tuple(w1.stride())}, H={H}, block_k={block_k}")
    grid = (rows.max_blocks * triton.cdiv(I, block_n),)
    _fold_gate_up_kernel[grid](x, w1, act, rows.sorted_rows, rows.block_expert, rows.seg_end, rows.num_padded,
                               H, I, k, group_m, x.stride(0), w1.stride(0), w1.stride(1), act.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, TAIL_M=tail_m,
                               num_warps=num_warps, num_stages=num_stages)
    return act


def reference(x, ids, w1, rows, act_like):
    """fp32 silu(gate) * up at each pair's sorted slot (rows.pos), expert by expert; slots holding no pair stay
    NaN."""
    out = torch.full(act_like.shape, float("nan"), dtype=torch.float32, device=x.device)
    k, I = ids.shape[1], act_like.shape[1]
    flat, pos = ids.flatten(), rows.pos.long()
    for e in range(w1.shape[0]):
        pairs = (flat == e).nonzero().flatten()  # a probe's reference: host syncs are fine here
        h = x[pairs // k].float() @ w1[e].float().T
        out[pos[pairs]] = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    return out


def reference_down(act, ids, w2, rows, y_like):
    """fp32 act[slot] @ w2[e]^T at each pair's sorted slot; other slots NaN."""
    out = torch.full(y_like.shape, float("nan"), dtype=torch.float32, device=act.device)
    flat, pos = ids.flatten(), rows.pos.long()
    for e in range(w2.shape[0]):
        slots = pos[(flat == e).nonzero().flatten()]
        out[slots] = act[slots].float() @ w2[e].float().T
    return out


def checked(act, ref):
    live = ~torch.isnan(ref[:, 0])
    return rel_err(act[live].float(), ref[live])


def fold_counts(ids, E: int, block_m: int, tails) -> dict:
    """Tiles of the padded order and, per TAIL_M, how many of them folding removes (host-side counts)."""
    c = torch.bincount(ids.flatten(), minlength=E)
    r = c % block_m
    out = {"tiles": int(((c + block_m - 1) // block_m).sum())}
    for t in tails:
        out[f"folded tail{t}"] = int(((r > 0) & (r <= t) & (c > block_m)).sum())
    return out


def timed(timer, fn, check) -> tuple[float, float]:
    """(µs under a CUDA graph, rel err of the first call's output) of one variant."""
    err = check(fn())
    return timer.graph(fn, calls=2) * 1e6, err


def main():
    ap = harness.parser(__doc__)
    ap.add_argument("--points", nargs="+", default=POINTS, metavar="SHAPE:T", help=f"shapes of {list(SHAPES)}")
    ap.add_argument("--tails", nargs="+", type=int, default=[32, 64], help="TAIL_M values to try (powers of 2)")
    ap.add_argument("--block-n", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--block-k", type=int, default=64)
    args = ap.parse_args()
    gpu, cap = harness.gpu_name(), torch.cuda.get_device_capability()
    timer = harness.Timer("cuda")
    table = []
    for point in args.points:
        T, (E, k, H, I), (x, ids, w, w1, w2), cfg = point_problem(point, gpu, cap)
        # the probe kernels' layouts: [E, 2I, H] and [E, H, I], unit last stride
        w1c = w1 if w1.shape[1] == 2 * I else w1.transpose(1, 2).contiguous()
        w2c = w2 if w2.shape[1] == H else w2.transpose(1, 2).contiguous()
        for kind, routing in (("uniform", ids), ("balanced", balanced_ids(T, E, k, x.device))):
            b = Bench(x, routing, w, w1, w2)
            rows = align_rows(routing, E, cfg.block_m)
            act = x.new_empty(rows.sorted_rows.numel(), I)
            y = x.new_empty(rows.sorted_rows.numel(), H)
            ref_act = reference(x, routing, w1c, rows, act)
            tails = [t for t in args.tails if t <= cfg.block_m]
            row = {"point": point, "routing": kind, "block_m": cfg.block_m,
                   **fold_counts(routing, E, cfg.block_m, tails),
                   "gate_up production": (timer.graph(b.sorted_gate_up(cfg), calls=2) * 1e6, float("nan")),
                   "down production": (timer.graph(b.sorted_down(cfg), calls=2) * 1e6, float("nan"))}
            # the production kernels with SortedConfig.tail_m (warp specialization off: the two do not combine),
            # against the same config unfolded; correctness is the suite's (tests/lowering/test_triton_experts.py)
            plain = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, warp_specialize=False),
                                        down=dataclasses.replace(cfg.down, warp_specialize=False))
            for tail in [0] + tails:
                folded = dataclasses.replace(plain, tail_m=tail)
                row[f"gate_up production no-ws tail{tail}"] = (timer.graph(b.sorted_gate_up(folded), calls=2) * 1e6,
                                                               float("nan"))
                row[f"down production no-ws tail{tail}"] = (timer.graph(b.sorted_down(folded), calls=2) * 1e6,
                                                            float("nan"))
            for bn in args.block_n:
                for tail in [0] + tails:
                    act.fill_(float("nan"))  # poisoned: a slot the kernel skips fails the check

                    def gate_up(bn=bn, tail=tail):
                        return fold_gate_up(x, w1c, rows, k, act, cfg.block_m, bn, args.block_k, tail)
                    row[f"gate_up n{bn} tail{tail}"] = timed(timer, gate_up, lambda a: checked(a, ref_act))
                # the down GEMM reads the gate_up's act (last variant's: every live slot checked above)
                ref_y = reference_down(act, routing, w2c, rows, y)
                for tail in [0] + tails:
                    y.fill_(float("nan"))

                    def down(bn=bn, tail=tail):
                        return fold_down(act, w2c, rows, y, cfg.block_m, bn, args.block_k, tail)
                    row[f"down n{bn} tail{tail}"] = timed(timer, down, lambda o: checked(o, ref_y))
            table.append(row)
            print(row, flush=True)
        x = ids = w = w1 = w2 = w1c = w2c = b = act = y = None
        torch.cuda.empty_cache()
    print("µs under a CUDA graph from a cold L2 (rel err vs fp32); tail0 = the same probe kernel without folding")
    for r in table:
        folds = ", ".join(f"{key[7:]} folds {v}" for key, v in r.items() if key.startswith("folded "))
        print(f"{r['point']} {r['routing']} (block_m {r['block_m']}, {r['tiles']} row blocks; {folds})")
        for gemm in ("gate_up", "down"):
            cells = [f"{key[len(gemm) + 1:]}: {us:.1f} ({err:.0e})" for key, (us, err) in
                     ((key, v) for key, v in r.items() if key.startswith(gemm + " "))]
            print(f"  {gemm:>8}  " + " | ".join(cells))


if __name__ == "__main__":
    main()
