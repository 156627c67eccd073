"""Probe: how much host time does one training step of the experts (forward + backward) spend, ours against HF
grouped_mm under torch.compile, and where does ours go? (issue 17: at T = 4096 the op-level step of ours has
~800 µs more than its kernels' sum on an H100, HF's compiled step ~400 µs; NOTES session 43.)

    python -m benchmarks.probes.probe_train_host [--shapes olmoe gpt_oss_20b] [--tokens 4096] [--profile 30]

Per variant: host µs per forward and per step (the GPU given a long sleep first, so that no launch waits for it:
probe_host.host_us), the step's time from an idle GPU (CUDA events, as bench_train_op times it) and its kernels'
sum. --profile N: cProfile of N steps of moe_train_tc with the backward on the calling thread, its top functions.
"""

from __future__ import annotations

import cProfile
import io
import pstats

import torch

from moe_compiler.tune.shapes import ALL_SHAPES

from .. import harness
from ..bench_train_op import _step, setup
from .probe_host import host_us


def variants(name, T):
    hf, x, ids, w, grad_out, params = setup(name, T)
    ours = lambda x, ids, w: torch.ops.moe_compiler.experts_train(x, ids, w, *params)[0]  # noqa: E731
    fns = {"hf_grouped_mm_tc": torch.compile(hf, dynamic=False), "moe_train": ours,
           "moe_train_tc": torch.compile(ours, dynamic=False)}
    return {v: (fn, _step(fn, x, ids, w, params, grad_out), (x, ids, w)) for v, fn in fns.items()}


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[4096])
    ap.set_defaults(shapes=["olmoe", "gpt_oss_20b"])
    ap.add_argument("--profile", type=int, default=30, metavar="N", help="cProfile N steps of moe_train_tc (0: none)")
    args = ap.parse_args()
    harness.gpu_name()
    rows = []
    for name in args.shapes:
        for T in args.tokens:
            vs = variants(name, T)
            for v, (fn, step, inputs) in vs.items():
                step()
                torch.cuda.synchronize()
                fwd = lambda fn=fn, inputs=inputs: fn(*inputs)  # noqa: E731
                every = harness.kernel_times(step, calls=5, top=10_000)
                rows.append((name, T, v, host_us(fwd, 20), host_us(step, 20), harness.events(step, 10) * 1e6,
                             sum(us for us, _, _ in every), sum(n for _, n, _ in every)))
            if args.profile:
                step = vs["moe_train_tc"][1]
                prof = cProfile.Profile()
                with torch.autograd.set_multithreading_enabled(False):
                    step()
                    torch.cuda.synchronize()
                    prof.enable()
                    for _ in range(args.profile):
                        step()
                    prof.disable()
                torch.cuda.synchronize()
                text = io.StringIO()
                stats = pstats.Stats(prof, stream=text)
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats(40)
                print(f"\n== {name} T={T} moe_train_tc, {args.profile} steps ==\n" + text.getvalue()[-12000:])
    print(f"\n{'shape':>14} {'T':>6} {'variant':>18} {'host fwd µs':>12} {'host step µs':>13} {'step µs':>9} "
          f"{'kernels µs':>11} {'launches':>9}")
    for name, T, v, hf, hs, step_us, k_us, n in rows:
        print(f"{name:>14} {T:>6} {v:>18} {hf:12.0f} {hs:13.0f} {step_us:9.0f} {k_us:11.0f} {n:9d}")


if __name__ == "__main__":
    main()
