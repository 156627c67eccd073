"""Probe: the decode forward as one weight stream — each program's gate_up rows, then its slice of the down GEMV —
instead of two kernels (issue 16: T <= 128 within 1.25x the floor; the H200 grid misses Qwen3-30B-A3B T=1 at
1.37x, Qwen3-Next-80B T=1 at 1.53x, DeepSeek-V2-Lite T=1 at 1.27x).

The decode path (lowering/triton_decode.py) is two launches: gate_up GEMV + activation writing act [S, I], then the
down GEMV reading it. NOTES "decode v5" / "decode v4" / session 9 measured what is left at T = 1 as each kernel's
ramp and tail (~6 µs of Qwen3's 24 on the H200), and three ways of overlapping the two (one launch with programs
waiting on tickets; down weights pulled into L2 on a side stream; programmatic dependent launch) all lost: each
made some program wait, or took bandwidth from the kernel on the critical path. This one has no wait:

    program (pair p, I-chunk c of BI columns), p = t*k + j, e = topk_ids[p]:
        a[BI]  = act(x_t W_gate[e][c]^T, x_t W_up[e][c]^T) * w[t, j]       (rounded to x's dtype, as act is stored)
        part[t, j*NC + c, :] = W_down[e][:, c] @ a                          (fp32, H values)
    then program (t, H tile): out[t] = sum over q = 0 .. k*NC-1 of part[t, q]   (in order: deterministic)

Every weight byte is read once, by one kernel whose programs never wait. The cost: the partials, S * (I / BI) * H
fp32 written and read (~0.7 / BI of the weight bytes: 1% at BI = 64), a second launch that only sums them, and
the down slice read as BI columns of each of H rows (BI * 2 bytes per row: a sector wants BI >= 16).
Prediction (H200, Qwen3-30B-A3B T = 1): 24.4 -> ~20 µs (the weights' 17.7 µs floor + one ramp + the sum).

Timed per point: the op's decode forward (its tuned config; the baseline), and this pair of kernels over a small
sweep of (BI, BLOCK_K, BLOCK_H, warps, stages), each under a CUDA graph from a cold L2, every output checked
against the fp32 per-expert reference first. Standard layout only (gate_up [E, 2I, H] gate then up, down [E, H, I],
SwiGLU, no biases): the question is the schedule, not the variants.

    python -m benchmarks.probes.probe_fused_decode [--shapes qwen3_30b_a3b qwen3_next_80b deepseek_v2_lite]
                                                   [--tokens 1 4 16]
    python -m benchmarks.probes.probe_fused_decode --smoke      # tiny shape, any device (the interpreter on a CPU)
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

import moe_compiler
from moe_compiler.lowering.triton_act import gated_act
from moe_compiler.lowering.triton_decode import _gate_up_rows
from moe_compiler.testing import experts_reference_by_expert, rel_err
from moe_compiler.tune.search import problem
from moe_compiler.tune.shapes import ALL_SHAPES

from .. import harness
from ..bench_experts import floor_seconds

SHAPES = {name: ALL_SHAPES[name] for name in ("qwen3_30b_a3b", "qwen3_next_80b", "deepseek_v2_lite", "deepseek_v3")}
SMOKE = {"smoke": (8, 2, 96, 40)}
# (BI, BLOCK_K, BLOCK_H, num_warps, stages): the sweep of the fused kernel (the sum's tile is fixed). The gate and
# up accumulators are [BI, BLOCK_K] fp32 each: BI * BLOCK_K <= 1024 * warps keeps them at <= 64 registers a thread.
SWEEP = [(bi, bk, 64, warps, stages)
         for (bi, bk), warps, stages in itertools.product(((16, 256), (32, 128), (64, 64), (16, 512), (32, 256),
                                                           (64, 128)), (4, 8), (3, 4))
         if bi * bk <= 1024 * warps]
SMOKE_SWEEP = [(16, 32, 16, 4, 2), (32, 64, 32, 4, 1)]


@triton.jit
def _fused_pair_chunk(x_ptr, ids_ptr, w_ptr, w1_ptr, w2_ptr, part_ptr, E, H, I, TOP_K, NC,
                      stride_xm, stride_1e, stride_1n, stride_2e, stride_2h,
                      BI: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr):
    p = tl.program_id(0)
    c = tl.program_id(1)
    t = p // TOP_K
    e = tl.load(ids_ptr + p).to(tl.int64)
    n = c * BI + tl.arange(0, BI)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    part_row = part_ptr + (p.to(tl.int64) * NC + c) * H  # part [T, k * NC, H] = [S * NC, H]
    hh = tl.arange(0, BLOCK_H)
    if e < E:  # (the sentinel E: a slot that adds nothing; its partial is zeros)
        rows = tl.where(n_ok, n, 0).to(tl.int64)
        wg_ptrs = w1_ptr + e * stride_1e + rows[:, None] * stride_1n + kk[None, :]
        wu_ptrs = wg_ptrs + I * stride_1n
        x_ptrs = x_ptr + t.to(tl.int64) * stride_xm + kk
        gate, up = _gate_up_rows(x_ptrs, wg_ptrs, wu_ptrs, H, 1, False, BI, BLOCK_K, NUM_STAGES)  # the decode path's
        a = gated_act(gate, up, 1.0, 0.0, 0)
        # rounded as the two-kernel path stores act, then weighted (it weights the down result: same product)
        a = tl.where(n_ok, a.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0) * tl.load(w_ptr + p).to(tl.float32)
        wd_ptrs = w2_ptr + e * stride_2e + hh[:, None].to(tl.int64) * stride_2h + rows[None, :]
        for h0 in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
            h_ok = hh < H - h0
            wd = tl.load(wd_ptrs, mask=h_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            tl.store(part_row + h0 + hh, tl.sum(wd * a[None, :], axis=1), mask=h_ok)
            wd_ptrs += BLOCK_H * stride_2h
    else:
        for h0 in range(0, H, BLOCK_H):
            tl.store(part_row + h0 + hh, tl.zeros([BLOCK_H], dtype=tl.float32), mask=hh < H - h0)


@triton.jit
def _sum_parts(part_ptr, out_ptr, H, Q, stride_om, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr):
    # BLOCK_Q partial rows a step, pipelined: a load per row, each waited for, would be Q global-load latencies
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    qq = tl.arange(0, BLOCK_Q)
    base = part_ptr + t.to(tl.int64) * Q * H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for q0 in tl.range(0, Q, BLOCK_Q, num_stages=3):  # a fixed order and reduction tree: the same sum every run
        q = q0 + qq
        tile = tl.load(base + q[:, None].to(tl.int64) * H + h[None, :], mask=(q < Q)[:, None] & h_ok[None, :],
                       other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def fused_decode(x, ids, w, w1, w2, cfg, sum_block_h=64, sum_block_q=32):
    """out [T, H] of the standard-layout experts by the two kernels above; cfg = (BI, BLOCK_K, BLOCK_H, warps,
    stages). Buffers are allocated per call (a captured graph keeps them)."""
    BI, BLOCK_K, BLOCK_H, warps, stages = cfg
    ids, w = ids.contiguous(), w.contiguous()  # read at p = t * k + j (a routing's ids may be a strided view)
    T, k = ids.shape
    E, H, I = w1.shape[0], x.shape[1], w2.shape[2]
    NC = triton.cdiv(I, BI)
    part = torch.empty(T * k * NC, H, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    if T == 0:
        return out
    _fused_pair_chunk[(T * k, NC)](x, ids, w, w1, w2, part, E, H, I, k, NC, x.stride(0), w1.stride(0), w1.stride(1),
                                   w2.stride(0), w2.stride(1), BI=BI, BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H,
                                   NUM_STAGES=stages, num_warps=warps)
    _sum_parts[(T, triton.cdiv(H, sum_block_h))](part, out, H, k * NC, out.stride(0), BLOCK_Q=sum_block_q,
                                                 BLOCK_H=sum_block_h, num_warps=4)
    return out


def run_point(name, E, k, H, I, T, timer, device, dtype, sweep):
    x, ids, w, w1, w2 = problem(T, E, k, H, I, dtype, device=device, seed=T)
    ref = experts_reference_by_expert(x, ids, w, w1, w2, dtype=torch.float32)
    op = lambda: moe_compiler.moe_experts(x, ids, w, w1, w2)  # noqa: E731
    floor = floor_seconds(T, E, k, H, I, ids, torch.finfo(dtype).bits // 8)[0] * 1e6 if device == "cuda" else None
    row = {"shape": name, "T": T, "floor_us": floor,
           "op_err": rel_err(op(), ref), "op_us": time_us(timer, op, device)}
    best = None
    for cfg in sweep:
        fn = lambda cfg=cfg: fused_decode(x, ids, w, w1, w2, cfg)  # noqa: E731
        err = rel_err(fn(), ref)
        assert err <= (1e-2 if dtype == torch.bfloat16 else 1e-4), (name, T, cfg, err)
        us = time_us(timer, fn, device)
        row[f"fused {cfg}"] = us
        if best is None or us < best[1]:
            best = (cfg, us, err)
    row["fused_best"], row["fused_us"], row["fused_err"] = best
    return row


def time_us(timer, fn, device) -> float:
    return (timer.graph(fn) if device == "cuda" else timer.eager(fn)) * 1e6


def main():
    p = harness.parser(__doc__, shapes={**SHAPES, **SMOKE}, tokens=[1, 4, 16], out="fused_decode")
    p.set_defaults(shapes=[n for n in SHAPES if n != "deepseek_v3"])
    p.add_argument("--smoke", action="store_true", help="a tiny shape on whatever device (the harness check)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = SMOKE if args.smoke else {n: s for n, s in {**SHAPES, **SMOKE}.items() if n in args.shapes}
    sweep = SMOKE_SWEEP if args.smoke else SWEEP
    timer = harness.Timer(device)
    rows = []
    for name, (E, k, H, I) in shapes.items():
        for T in ([1, 3] if args.smoke else args.tokens):
            rows.append(run_point(name, E, k, H, I, T, timer, device, dtype, sweep))
            r = rows[-1]
            floor = f"{r['floor_us']:.1f}" if r["floor_us"] else "-"
            print(f"{name:>18} T={T:<3} floor {floor:>7} µs | op {r['op_us']:8.1f} (err {r['op_err']:.1e}) | fused "
                  f"{r['fused_us']:8.1f} (err {r['fused_err']:.1e}) {r['fused_best']} | op / fused "
                  f"{r['op_us'] / r['fused_us']:.2f}x", flush=True)
    if device == "cuda":
        print(f"geometric mean op / fused over {len(rows)} points: "
              f"{math.exp(sum(math.log(r['op_us'] / r['fused_us']) for r in rows) / len(rows)):.3f}x")
    harness.save_rows(args.out, "fused_decode", rows, harness.gpu_name() if device == "cuda"
                      else "cpu")


if __name__ == "__main__":
    main()
