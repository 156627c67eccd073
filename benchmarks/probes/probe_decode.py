"""Where does a decode step's time go? Three probes of the T = 1 experts forward (NOTES.md "decode v5").

    python -m benchmarks.probes.probe_decode stream       # the weight bytes read with no math (the practical
                                                          # floor) vs each decode kernel at 1-5 pipelined stages
    python -m benchmarks.probes.probe_decode l2-reuse     # does the cold-L2 flush evict the weights? same experts
                                                          # in every captured call vs a disjoint set per call
    python -m benchmarks.probes.probe_decode l2-prefetch  # down weights pulled into L2 by a side stream during
                                                          # gate_up; and the cost of a separate id-assert kernel

All under CUDA graphs from a cold L2 (moe_compiler/tune/timing.py), like the benchmark; Qwen3-30B-A3B unless
stated.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from moe_compiler.lowering import dispatch, triton_config, triton_decode
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig
from moe_compiler.tune.search import problem
from moe_compiler.tune.shapes import ALL_SHAPES, model_spec

from .. import harness

SHAPES = {name: ALL_SHAPES[name] for name in ("qwen3_30b_a3b", "qwen3_next_80b", "deepseek_v3")}
QWEN3 = SHAPES["qwen3_30b_a3b"]
STAGES = (1, 2, 3, 4, 5)
CALLS = 10


@triton.jit
def _sum_slabs(w1_ptr, w2_ptr, ids_ptr, out_ptr, N1, N2, stride1, stride2, CHUNKS1, CHUNKS2,
               BLOCK: tl.constexpr, STEPS: tl.constexpr, POLICY: tl.constexpr):
    # program (pair j, chunk c): STEPS blocks of BLOCK elements of expert ids[j]'s w1 slab (its first N1
    # elements), then of its w2 slab (first N2); one sum per program, so no load is optimized away.
    j = tl.program_id(0)
    c = tl.program_id(1)
    e = tl.load(ids_ptr + j).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if c < CHUNKS1:
        base, start, n = w1_ptr + e * stride1, c.to(tl.int64) * BLOCK * STEPS, N1
    else:
        base, start, n = w2_ptr + e * stride2, (c - CHUNKS1).to(tl.int64) * BLOCK * STEPS, N2
    for s in range(STEPS):
        offs = start + s * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(base + offs, mask=offs < n, other=0.0, eviction_policy=POLICY).to(tl.float32)
    tl.store(out_ptr + j * (CHUNKS1 + CHUNKS2) + c, tl.sum(acc, 0))


def slab_reader(w1, w2, ids, n1, n2, block=1024, steps=4, warps=4, policy=""):
    """A launch reading the first n1 / n2 elements of each touched expert's w1 / w2 slab."""
    k = ids.numel()
    c1, c2 = triton.cdiv(n1, block * steps), triton.cdiv(n2, block * steps)
    out = torch.empty(k * (c1 + c2), device="cuda")
    return lambda: _sum_slabs[(k, c1 + c2)](w1, w2, ids, out, n1, n2, w1.stride(0), w2.stride(0), c1, c2,
                                            BLOCK=block, STEPS=steps, POLICY=policy, num_warps=warps)


def median_graph(timer, fn, rounds=3):
    """Median µs per call over `rounds` graph timings."""
    return harness.median([timer.graph(fn, calls=CALLS) for _ in range(rounds)]) * 1e6


class Step:
    """One T = 1 decode problem and the two decode kernels' launches on it."""

    def __init__(self, shape, config=None):
        E, k, H, I = shape
        self.x, ids, self.w, self.w1, self.w2 = problem(1, E, k, H, I, torch.bfloat16)
        self.ids = ids.reshape(-1).contiguous()
        self.weights = self.w.reshape(-1)
        self.k, self.H, self.I = k, H, I
        self.spec = model_spec(H, I)  # the model's layout (problem draws its weights in it)
        self.config = config or triton_config.lookup(torch.cuda.get_device_name(), torch.cuda.get_device_capability(),
                                                     torch.bfloat16, E, k, H, I, 1)
        self.act = self.x.new_empty(k, I)
        self.ok = torch.empty(1, dtype=torch.int32, device="cuda")
        self.out = torch.empty_like(self.x)

    def gate_up(self, config=None, ids=None):
        ids = self.ids if ids is None else ids
        config = config or self.config
        return lambda: triton_decode.launch_gate_up(self.x, ids, self.w1, None, self.spec, config, self.k, self.act,
                                                    self.ok, self.weights)

    def down(self, config=None, ids=None):
        ids = self.ids if ids is None else ids
        config = config or self.config
        return lambda: triton_decode.launch_down(self.act, ids, self.weights, self.w2, None, self.spec, config, self.k,
                                                 self.out)


def stream(timer):
    rows = []
    for name, shape in SHAPES.items():
        s = Step(shape)
        n1, n2 = 2 * s.I * s.H, s.H * s.I
        for part, a, b in (("gate_up", n1, 0), ("down", 0, n2), ("both", n1, n2)):
            readers = {(blk, st, wp): median_graph(timer, slab_reader(s.w1, s.w2, s.ids, a, b, blk, st, wp), rounds=1)
                       for blk in (1024, 2048, 4096) for st in (1, 2, 4, 8) for wp in (4, 8)}
            best = min(readers, key=readers.get)
            kernels = {}
            if part != "both":
                for st in STAGES:
                    staged = (dataclasses.replace(kc, num_stages=st) for kc in (s.config.gate_up, s.config.down))
                    cfg = DecodeConfig(*staged)
                    kernels[st] = median_graph(timer, s.gate_up(cfg) if part == "gate_up" else s.down(cfg))
            nbytes = s.k * (a + b) * 2
            rows.append((name, part, nbytes / 1e6, nbytes / harness.peaks()[1] * 1e6, readers[best], best, kernels))
        del s
        torch.cuda.empty_cache()
    cols = " ".join(f"{f'stages={st}':>9}" for st in STAGES)
    print(f"{'shape':16} {'bytes of':8} {'MB':>6} {'floor':>6} {'reader':>7} x floor (block, steps, warps)  "
          f"tuned decode kernel: {cols}")
    for name, part, mb, floor, t, best, kernels in rows:
        ks = " ".join(f"{kernels[st]:9.1f}" if st in kernels else f"{'':9}" for st in STAGES)
        print(f"{name:16} {part:8} {mb:6.1f} {floor:6.1f} {t:7.1f} {t / floor:5.2f}   {str(best):18} {'':21}{ks}")


def rotating(fns):
    """One closure calling fns[0], fns[1], ... in turn: each captured call gets its own inputs."""
    i = [0]

    def call():
        fns[i[0] % len(fns)]()
        i[0] += 1
    return call


def l2_reuse(timer):
    E, k = QWEN3[0], QWEN3[1]
    s = Step(QWEN3)
    perm = torch.randperm(E, device="cuda")
    id_sets = [perm[i * k:(i + 1) * k].reshape(1, k).contiguous() for i in range(E // k)]  # disjoint experts
    configs = {
        "gate_up 32x256 w4 s1": DecodeConfig(KernelConfig(32, 256, 4, 1), KernelConfig(8, 64, 4, 4)),
        "gate_up 8x256 w4 s3": DecodeConfig(KernelConfig(8, 256, 4, 3), KernelConfig(8, 64, 4, 4)),
    }
    print(f"{'config':22} {'kernel':14} {'same experts':>12} {'rotating':>9}  (us per call)")
    for name, cfg in configs.items():
        per_set = {
            "gate_up alone": [s.gate_up(cfg, i.reshape(-1)) for i in id_sets],
            "down alone": [s.down(cfg, i.reshape(-1)) for i in id_sets],
            "whole forward": [lambda i=i: dispatch.triton_forward(s.x, i, s.w, s.w1, s.w2, None, None, s.spec, cfg)
                              for i in id_sets],
        }
        for part, fns in per_set.items():
            print(f"{name:22} {part:14} {median_graph(timer, fns[0]):12.1f} {median_graph(timer, rotating(fns)):9.1f}")


def l2_prefetch(timer):
    s = Step(QWEN3, DecodeConfig(KernelConfig(8, 256, 4, 3), KernelConfig(8, 64, 4, 4)))
    side = torch.cuda.Stream()
    n2 = s.H * s.I
    gate_up, down = s.gate_up(), s.down()

    def touch(policy, warps=4):
        return slab_reader(s.w1, s.w2, s.ids, 0, n2, warps=warps, policy=policy)

    def on_side(fn):  # fork fn onto the side stream (captured as a parallel branch), join later
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()

    def join():
        torch.cuda.current_stream().wait_stream(side)

    def seq(*fns):
        return lambda: [f() for f in fns]

    def assert_ids():
        torch._assert_async(s.ok, "ids")

    variants = {
        "two launches": seq(gate_up, down),
        "two launches + _assert_async(flag)": seq(gate_up, down, assert_ids),
        "  ... the assert on a side stream": seq(gate_up, lambda: on_side(assert_ids), down, join),
        "side-stream prefetch evict_last w4": seq(lambda: on_side(touch("evict_last")), gate_up, join, down),
        "side-stream prefetch evict_last w8": seq(lambda: on_side(touch("evict_last", 8)), gate_up, join, down),
        "side-stream prefetch (no hint)": seq(lambda: on_side(touch("")), gate_up, join, down),
        "touch(evict_last), then two launches": seq(touch("evict_last"), gate_up, down),
        "touch(evict_last) + down": seq(touch("evict_last"), down),
        "touch(no hint) + down": seq(touch(""), down),
        f"touch alone ({s.k * n2 * 2 / 1e6:.0f} MB)": touch("evict_last"),
    }
    seq(gate_up, down)()
    ref = s.out.clone()
    times = {}
    for _ in range(5):
        for name, fn in variants.items():
            times.setdefault(name, []).append(timer.graph(fn, calls=CALLS) * 1e6)
            assert torch.equal(s.out, ref), name
    for name, ts in times.items():
        print(f"{name:40} {harness.median(ts):7.1f} us")


PROBES = {"stream": stream, "l2-reuse": l2_reuse, "l2-prefetch": l2_prefetch}


def main():
    ap = harness.parser(__doc__)
    ap.add_argument("probe", choices=list(PROBES))
    args = ap.parse_args()
    harness.gpu_name()
    PROBES[args.probe](harness.Timer("cuda"))


if __name__ == "__main__":
    main()
