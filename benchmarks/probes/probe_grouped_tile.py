"""Probe: does torch._grouped_mm's kernel choice by buffer size cost the library backward (and forward) time?

torch's sm90 bf16 grouped GEMM (aten/src/ATen/native/cuda/GroupMM.cu, as read in torch's main branch) picks one
of two CUTLASS kernels from the operands' sizes, not from offs: a 2-D x 3-D call (mat_a [R, K] x mat_b [E, K, N]) with
R // E <= 128 or N <= 128 runs a 64 x 128 x 128 ping-pong kernel, else a 128 x 256 x 64 cooperative one. The
library backward's buffers have R = T*k rows since session 50 (BackwardConfig.unpadded) and T*k + ~16 E before
it, so at ~128 rows per expert (DeepSeek-V3 at T = 4096: exactly 128) the padding changed the kernel; session 52
measured the op's forward + backward at 263 TF/s unpadded against session 49's 288 padded (H100, NOTES).

Per point (shape:T, bf16, uniform top-k routing), each 2-D x 3-D GEMM a training step runs through the library:
    dA       G [S, H] @ W_down[e] ([E, H, I] as transformers stores it)     the backward's first GEMM
    dx       dz [S, 2I] @ W_gate_up[e] ([E, 2I, H])                         the backward's last GEMM
    gate_up  x [S, H] @ W_gate_up[e]^T                                      the forward's (triton_grouped.py)
    down     act [S, I] @ W_down[e]^T
timed with the operand as it is (R = S: torch's pick), inside a buffer of (128 + 1) E rows
(triton_backward.GroupedTile.LARGE: the cooperative kernel; the trailing rows are in no group) where that changes
torch's pick, and (where csrc/ builds) with each of our CUTLASS configs (lowering/cutlass.py CONFIGS: the tiles,
clusters and schedules the forward's table chooses from, and `tune --backward` for dA / dx), all in the same
rounds (interleaved CUDA-event medians). Each output's first experts are checked against fp32 before timing.
The last points are issue 17's op-level shapes (more than 128 rows per expert: torch's cooperative kernel), where
the question is whether a tuned tile would beat torch's one choice. Each point also times the step's two weight
gradients (dW_down = G^T act, dW_gate_up = dz^T X per expert: 2-D x 2-D; torch's, and where csrc/ builds each
of cutlass.WGRAD_CONFIGS), so that the six GEMMs' times add up to the step's GEMM time (TFLOP/s of each beside the
GPU's dense peak). A weight gradient writes the weights' size (E M N bf16) over K loops of one expert's rows: its
row also has the write's floor at the GPU's copy bandwidth (write_floor_us, from --copy-tbs).

    python -m benchmarks.probes.probe_grouped_tile [--points deepseek_v3:4096 kimi_k2:4096 ...] [--no-cutlass]
"""

from __future__ import annotations

import functools

import torch

from moe_compiler.lowering import cutlass
from moe_compiler.lowering.triton_backward import GROUPED_SMALL_ROWS
from moe_compiler.testing import rel_err
from moe_compiler.tune.shapes import ALL_SHAPES
from moe_compiler.tune.timing import interleaved

from .. import harness

POINTS = ["deepseek_v3:2048", "deepseek_v3:3072", "deepseek_v3:4096", "kimi_k2:4096", "kimi_k2:6144",
          "qwen3_30b_a3b:2048", "qwen3_next_80b:4096", "olmoe:1024", "gpt_oss_20b:1024", "mixtral_8x7b:512",
          "qwen3_30b_a3b:32768", "mixtral_8x7b:32768", "gpt_oss_20b:32768", "qwen3_235b_a22b:4096"]


def offsets(T, E, k, gen):
    """offs [E] int32 of uniform top-k routing (k distinct experts per token)."""
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(k, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return counts.cumsum(0).to(torch.int32)


def checked(out, a, w, offs, transpose, experts=3):
    """rel err of the first `experts` non-empty experts' rows of out against fp32."""
    ends = offs.tolist()
    errs, start = [], 0
    for e, end in enumerate(ends):
        if end > start and len(errs) < experts:
            we = w[e].float()
            want = a[start:end].float() @ (we.t() if transpose else we)
            errs.append(rel_err(out[start:end].float(), want))
        start = end
    return max(errs)


def point(name, T, rounds, cutlass_configs=(), wgrad_configs=(), copy_tbs=None):
    E, k, H, I = ALL_SHAPES[name]
    gen = torch.Generator("cuda").manual_seed(T)
    S = T * k
    R = (GROUPED_SMALL_ROWS + 1) * E
    offs = offsets(T, E, k, gen)
    w_gate_up = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=gen) * H ** -0.5
    w_down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=gen) * I ** -0.5
    gemms = {"dA": (H, w_down, False), "dx": (2 * I, w_gate_up, False), "gate_up": (H, w_gate_up, True),
             "down": (I, w_down, True)}
    rows = []
    for gemm, (K, w, transpose) in gemms.items():
        b = w.transpose(-2, -1) if transpose else w
        N = b.shape[-1]
        big = torch.randn(max(S, R), K, device="cuda", dtype=torch.bfloat16, generator=gen)
        a = big[:S]  # the same rows, in a buffer of S rows (a view: torch reads its size) and of R
        small_pick = S // E <= GROUPED_SMALL_ROWS or N <= GROUPED_SMALL_ROWS
        bodies = {"torch": functools.partial(torch._grouped_mm, a, b, offs=offs)}
        if small_pick and N > GROUPED_SMALL_ROWS:  # (at N <= 128 the small kernel whatever the rows)
            bodies["large"] = functools.partial(torch._grouped_mm, big, b, offs=offs)
        for i, config in cutlass_configs:  # w as stored: [E, N, K] for a @ w[e]^T (b_nk), [E, K, N] for a @ w[e]
            bodies[f"cutlass_{config}"] = functools.partial(cutlass.grouped_mm, a, w, offs, transpose, i)
        row = {"shape": name, "T": T, "rows_per_expert": S / E, "gemm": gemm, "torch_kernel":
               "64x128 ping-pong" if small_pick else "128x256 cooperative"}
        for variant, body in list(bodies.items()):
            try:
                out = body()  # torch allocates it: nothing of an earlier call to poison
            except RuntimeError as e:  # a CUTLASS config this GEMM's sizes do not suit: said, not timed
                if not variant.startswith("cutlass_"):
                    raise
                print(f"{name}:{T} {gemm} {variant}: {str(e).splitlines()[0]}", flush=True)
                del bodies[variant]
                continue
            row[f"{variant}_err"] = checked(out, a, w, offs, transpose)
            del out
        times = interleaved(bodies, rounds)
        flops = 2 * S * K * N
        for variant, seconds in times.items():
            row[f"{variant}_us"] = seconds * 1e6
            row[f"{variant}_tflops"] = flops / seconds / 1e12
        best = min((v for v in times if v.startswith("cutlass_")), key=times.get, default=None)
        if best:
            row["best_cutlass"] = best
        print(row, flush=True)
        rows.append(row)
        del big, a, bodies
    del w_gate_up, w_down
    rows += weight_gradients(name, T, S, E, H, I, offs, gen, rounds, wgrad_configs, copy_tbs)
    torch.cuda.empty_cache()
    return rows


def weight_gradients(name, T, S, E, H, I, offs, gen, rounds, wgrad_configs=(), copy_tbs=None):
    """The step's other two GEMMs, 2-D x 2-D with offs along the reduction (torch's kernel does not follow the
    rows): dW_down [E, H, I] = G^T act and dW_gate_up [E, 2I, H] = dz^T X per expert, as triton_backward_library's
    down_grads / gate_up_grads run them, torch's and csrc/'s weight-gradient configs (`wgrad_configs`: (index, name)
    of cutlass.WGRAD_CONFIGS) in the same rounds. Their rows, to set each GEMM's share of the step beside the four
    above; each output's first experts checked against fp32."""
    copy_tbs = copy_tbs or harness.peaks()[1] / 1e12  # a write floor at another GPU's bandwidth misleads (session 55)
    rows = []
    for gemm, (M, N) in {"dW_down": (H, I), "dW_gate_up": (2 * I, H)}.items():
        left = torch.randn(S, M, device="cuda", dtype=torch.bfloat16, generator=gen)
        right = torch.randn(S, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        bodies = {"torch": functools.partial(torch._grouped_mm, left.t(), right, offs=offs)}
        for i, config in wgrad_configs:
            bodies[f"cutlass_{config}"] = functools.partial(cutlass.grouped_mm_wgrad, left, right, offs, i)
        row = {"shape": name, "T": T, "rows_per_expert": S / E, "gemm": gemm, "torch_kernel": "128x256 cooperative",
               "write_floor_us": E * M * N * 2 / (copy_tbs * 1e12) * 1e6, "copy_tbs": copy_tbs}
        for variant, body in bodies.items():
            out = body()
            errs, start = [], 0
            for e, end in enumerate(offs.tolist()):
                if end > start and len(errs) < 3:
                    errs.append(rel_err(out[e].float(), left[start:end].float().t() @ right[start:end].float()))
                start = end
            row[f"{variant}_err"] = max(errs)
            del out
        times = interleaved(bodies, rounds)
        for variant, seconds in times.items():
            row[f"{variant}_us"] = seconds * 1e6
            row[f"{variant}_tflops"] = 2 * S * M * N / seconds / 1e12
        best = min((v for v in times if v.startswith("cutlass_")), key=times.get, default=None)
        if best:
            row["best_cutlass"] = best
        print(row, flush=True)
        rows.append(row)
        del left, right, bodies
        torch.cuda.empty_cache()
    return rows


def main():
    ap = harness.parser(__doc__)
    ap.add_argument("--points", nargs="+", default=POINTS, metavar="SHAPE:T")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", metavar="PATH", help="the rows as JSON")
    ap.add_argument("--no-cutlass", action="store_true", help="torch's kernels only")
    ap.add_argument("--copy-tbs", type=float, default=None,
                    help="the GPU's device-copy bandwidth, TB/s, for the weight gradients' write floor (default: the "
                         "measured one of this GPU, harness.PEAKS: H200 4.26, H100 3.02)")
    args = ap.parse_args()
    print(harness.gpu_name(), torch.__version__, flush=True)
    configs = wgrad_configs = ()
    if not args.no_cutlass:
        reason = cutlass.missing()
        if reason is None:
            cutlass.load()
            configs = tuple(enumerate(cutlass.CONFIGS))
            wgrad_configs = tuple(enumerate(cutlass.WGRAD_CONFIGS))
        else:
            print(f"CUTLASS off: {reason}", flush=True)
    rows = []
    for p in args.points:
        name, T = p.split(":")
        rows += point(name, int(T), args.rounds, configs, wgrad_configs, args.copy_tbs)
    if args.out:
        harness.write_json(args.out, {"gpu": harness.gpu_name(), "torch": torch.__version__, "rows": rows})
    nan = float("nan")
    print(f"\n{'point':>22} {'rows/E':>7} {'gemm':>8} {'torch picks':>20} {'torch us':>9} {'large us':>9} "
          f"{'torch/large':>11} {'best CUTLASS':>30} {'us':>9} {'torch/it':>8} {'worst err':>9}")
    for r in rows:
        large, best = r.get("large_us"), r.get("best_cutlass")
        best_us = r[f"{best}_us"] if best else nan
        err = max(v for key, v in r.items() if key.endswith("_err"))
        print(f"{r['shape'] + ':' + str(r['T']):>22} {r['rows_per_expert']:7.1f} {r['gemm']:>8} "
              f"{r['torch_kernel']:>20} {r['torch_us']:9.1f} {large or nan:9.1f} "
              f"{r['torch_us'] / large if large else nan:11.3f} {best or '-':>30} {best_us:9.1f} "
              f"{r['torch_us'] / best_us:8.3f} {err:9.1e}")


if __name__ == "__main__":
    main()
