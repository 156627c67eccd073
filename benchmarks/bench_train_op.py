"""Op-level forward + backward of the experts (issue 17): transformers' experts vs ours, TFLOP/s and memory.

    python -m benchmarks.bench_train_op [--shapes qwen3_30b_a3b mixtral_8x7b gpt_oss_20b] [--tokens 4096 32768]

Per (shape, T), bf16, uniform routing, one process, every variant on the same inputs and parameters:
    hf_grouped_mm       transformers' grouped_mm experts forward, autograd backward (eager)
    hf_grouped_mm_tc    the same under torch.compile (Inductor)
    moe_torch_bwd       torch.ops.moe_compiler.experts with MOE_COMPILER_BACKWARD=torch (the torch composite)
    moe_triton_bwd      the same op, the Triton backward (lowering/triton_backward.py, the default): recomputes Z
    moe_train           experts_train(...)[0], what a compiled training graph calls: the forward saves Z, the
                        backward reads it instead of recomputing the gate_up GEMM; default_config (every backward
                        GEMM by torch's grouped GEMM over gathered rows: WGrad and DGrad.GROUPED_MM)
    moe_train_tc        moe_train under torch.compile (Inductor), as a training graph runs it: the backward as two
                        ops, the saved Z freed between them (ops/experts.py), and Inductor's memory planning —
                        the like-for-like partner of hf_grouped_mm_tc
    moe_train_tc_opaque moe_train_tc with MOE_COMPILER_INLINE=0: the forward and the backward's three ops stay opaque
                        calls, each paying its Python path per step (recorded launches: the default since session 43)
    moe_train_tr_dgrad  the same with DGrad.TRITON (dz and d hidden by the Triton kernels, weight gradients by the
                        library)
    moe_train_triton    the same with every backward GEMM by the Triton kernels (WGrad.TRITON too)
    moe_train_tile_pad  moe_train with the library backward's rows padded to the forward's GEMM tile (before
                        session 34) instead of unpadded
    moe_train_pad16     moe_train with the library backward's rows padded to triton_backward.LIBRARY_BLOCK_M
                        (sessions 34-49) instead of unpadded (BackwardConfig.unpadded, session 50)
    moe_train_large_tile moe_train with GroupedTile.LARGE: the library's buffers sized so that torch runs its
                        128 x 256 cooperative grouped GEMM kernel, not the 64 x 128 one it picks at <= 128 rows per
                        expert (the buffer's rows, not the routing's)
    moe_train_torch_tile moe_train with GroupedTile.TORCH: the buffers' own rows decide (the default outside
                        triton_backward.large_tile_pays's band)
    moe_train_cutlass_pp64x256 / moe_train_cutlass_c128x256  moe_train with dA and dx on csrc/'s CUTLASS grouped GEMM
                        (BackwardConfig.cutlass: the 64 x 256 ping-pong tile / the 128 x 256 cooperative one in 1 x 2
                        clusters) instead of torch's pick; needs the CUTLASS build
    moe_train_wgrad_pp64x128 / moe_train_wgrad_pp64x256  moe_train with the weight gradients on csrc/'s CUTLASS
                        weight-gradient GEMM (BackwardConfig.wgrad_cutlass: the 64 x 128 / 64 x 256 ping-pong tile)
    moe_train_torch_dgrad / moe_train_torch_wgrad / moe_train_no_table  moe_train with dA and dx / the weight
                        gradients / both on torch's grouped GEMM wherever the GPU's table (`python -m
                        moe_compiler.tune --backward`) names a CUTLASS config: the table's A/B, each half apart
Time: median of CUDA-event-timed forward + backward calls after warm-up (grad_out fixed, gradients of hidden,
router weights and both weight tensors). TFLOP/s counts 18*T*k*H*I (forward 6, backward 12), the issue's
measure. Memory: peak allocated during a call above what is held before it; saved: the bytes per token autograd
keeps from the forward for the backward (saved_tensors_hooks; inputs and parameters excluded). Gradients of each
variant vs hf_grouped_mm's (rel err). --kernels N: each variant's N costliest kernels per step (torch.profiler),
its kernel time and launches in total (beside the step's time: the rest is the GPU waiting on the host) and its
forward alone.
GPT-OSS's shape runs with the SwiGLU experts (the op's activation is not what is measured here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import unittest.mock

import torch

import moe_compiler  # noqa: F401 - registers the ops
from moe_compiler.lowering import backward_table, cutlass, dispatch
from moe_compiler.ops import inline
from moe_compiler.tune.shapes import ALL_SHAPES

from . import harness

VARIANTS = ("hf_grouped_mm", "hf_grouped_mm_tc", "moe_torch_bwd", "moe_triton_bwd", "moe_train", "moe_train_tc",
            "moe_train_tc_opaque", "moe_train_tr_dgrad", "moe_train_triton", "moe_train_tile_pad",
            "moe_train_pad16", "moe_train_large_tile", "moe_train_torch_tile", "moe_train_cutlass_pp64x256",
            "moe_train_cutlass_c128x256", "moe_train_wgrad_pp64x128", "moe_train_wgrad_pp64x256",
            "moe_train_torch_dgrad", "moe_train_torch_wgrad", "moe_train_no_table")
# variant -> (WGrad, DGrad) replacing default_config's
PATHS = {"moe_train_tr_dgrad": ("GROUPED_MM", "TRITON"), "moe_train_triton": ("TRITON", "TRITON")}
# variant -> BackwardConfig fields replacing default_config's (GroupedTile's values by name)
REPLACED = {
    # a Triton GEMM path tiles rows by rows.block_m: padded rows, torch's tile (the two need every GEMM by the library)
    **{v: {"wgrad_path": w, "dgrad_path": d, "unpadded": False, "grouped_tile": "TORCH"}
       for v, (w, d) in PATHS.items()},
    "moe_train_pad16": {"unpadded": False},
    "moe_train_large_tile": {"grouped_tile": "LARGE"},
    "moe_train_torch_tile": {"grouped_tile": "TORCH"},
    # dA and dx on csrc/'s CUTLASS grouped GEMM (BackwardConfig.cutlass): the two tiles probe_grouped_tile found
    # faster than torch's above the GroupedTile band (NOTES session 53)
    "moe_train_cutlass_pp64x256": {"cutlass": "pingpong_64x256", "grouped_tile": "TORCH"},
    "moe_train_cutlass_c128x256": {"cutlass": "coop_128x256_cluster1x2", "grouped_tile": "TORCH"},
    # the weight gradients on csrc/'s weight-gradient GEMM (BackwardConfig.wgrad_cutlass): the ping-pong tiles, whose
    # epilogue overlaps the next tile's main loop (a weight gradient writes the weights' size over short K loops)
    "moe_train_wgrad_pp64x128": {"wgrad_cutlass": "pingpong_64x128"},
    "moe_train_wgrad_pp64x256": {"wgrad_cutlass": "pingpong_64x256"},
}
# variant -> which of the table's (dgrad, wgrad) choices it keeps (the others: torch's)
TABLE_KEPT = {"moe_train_torch_dgrad": (False, True), "moe_train_torch_wgrad": (True, False),
              "moe_train_no_table": (False, False)}
# every variant that calls experts_train eagerly
TRAIN_VARIANTS = ("moe_train", "moe_train_tile_pad", *TABLE_KEPT, *REPLACED)


@contextlib.contextmanager
def _backward(variant: str):
    """The backward a variant of ours runs: MOE_COMPILER_BACKWARD, and default_config with REPLACED's fields."""
    from moe_compiler.lowering import triton_backward

    os.environ[dispatch.BACKWARD_ENV] = "torch" if variant == "moe_torch_bwd" else "triton"
    caches = contextlib.ExitStack()
    if variant == "moe_train_tc_opaque":
        os.environ[inline.INLINE_ENV] = "0"
        caches.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        caches.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    real = triton_backward.default_config
    if variant in REPLACED:
        enums = {"wgrad_path": triton_backward.WGrad, "dgrad_path": triton_backward.DGrad,
                 "grouped_tile": triton_backward.GroupedTile}
        names = {"cutlass": cutlass.CONFIGS, "wgrad_cutlass": cutlass.WGRAD_CONFIGS}
        fields = {f: enums[f][v] if f in enums else names[f].index(v) if f in names else v
                  for f, v in REPLACED[variant].items()}
        triton_backward.default_config = lambda *a: dataclasses.replace(real(*a), **fields)
    if variant == "moe_train_tile_pad":  # rows padded to the forward's tile: default_config(dtype, E, k, H, I, T)
        triton_backward.default_config = lambda dtype, E, k, H, I, T, *_: real(dtype, E, k, H, I, T)
    if variant in TABLE_KEPT:  # the GPU's table: some of its choices replaced by torch's (-1)
        kept, table = TABLE_KEPT[variant], backward_table.configs
        caches.enter_context(unittest.mock.patch.object(
            backward_table, "configs", lambda *a: tuple(c if keep else -1 for c, keep in zip(table(*a), kept))))
    try:
        with caches:
            yield
    finally:
        triton_backward.default_config = real
        os.environ.pop(dispatch.BACKWARD_ENV, None)
        os.environ.pop(inline.INLINE_ENV, None)


def _inputs(E, k, T, H, gen):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    ids = torch.rand(T, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(True)
    return x, ids, w


def _step(fn, x, ids, w, params, grad_out):
    def run():
        for t in (x, w, *params):
            t.grad = None
        fn(x, ids, w).backward(grad_out)

    return run


def saved_bytes(fn, x, ids, w, params) -> int:
    """Bytes autograd keeps between this forward and its backward (saved_tensors_hooks: every saved tensor, each
    storage once), the inputs and parameters excluded: the activation memory the issue's target counts."""
    own = {t.untyped_storage().data_ptr() for t in (x, ids, w, *params)}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x, ids, w)
    del out
    return sum(seen.values())


def setup(name, T):
    """(hf, x, ids, w, grad_out, params) of a shape and T: transformers' grouped_mm experts forward over its own
    parameters (w_gate_up, w_down), the inputs (x and w requiring gradients) and a fixed output gradient."""
    E, k, H, I = ALL_SHAPES[name]
    cfg, experts = harness.hf_experts(E, k, H, I, torch.bfloat16, "cuda")
    gen = torch.Generator("cuda").manual_seed(T)
    x, ids, w = _inputs(E, k, T, H, gen)
    grad_out = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    return harness.hf_forward(cfg, experts, "grouped_mm"), x, ids, w, grad_out, (experts.gate_up_proj,
                                                                                 experts.down_proj)


def point(name, T, variants=VARIANTS, kernels: int = 0):
    E, k, H, I = ALL_SHAPES[name]
    hf, x, ids, w, grad_out, params = setup(name, T)
    ops = {
        "hf_grouped_mm": hf,
        "hf_grouped_mm_tc": torch.compile(hf, dynamic=False),
        "moe_torch_bwd": lambda x, ids, w: torch.ops.moe_compiler.experts(x, ids, w, *params),
        "moe_triton_bwd": lambda x, ids, w: torch.ops.moe_compiler.experts(x, ids, w, *params),
        **{v: lambda x, ids, w: torch.ops.moe_compiler.experts_train(x, ids, w, *params)[0]
           for v in TRAIN_VARIANTS},
    }
    ops["moe_train_tc"] = torch.compile(ops["moe_train"], dynamic=False)
    # its own code object (Dynamo caches per code object) and, in _backward, no compile caches: the inline switch
    # acts inside AOTAutograd's trace, which the caches would not see
    ops["moe_train_tc_opaque"] = torch.compile(
        lambda x, ids, w: torch.ops.moe_compiler.experts_train(x, ids, w, *params)[0], dynamic=False)
    row = {"shape": name, "T": T, "E": E, "k": k, "H": H, "I": I}
    ref = None  # the reference's gradients (hf_grouped_mm runs first); each other variant's are compared and dropped
    for variant in variants:
        step = _step(ops[variant], x, ids, w, params, grad_out)
        with _backward(variant):
            try:
                step()
                torch.cuda.synchronize()
                # host copies in the gradients' own dtype: fp32 copies of every variant's on the GPU ran
                # Qwen3-235B-A22B's T = 4096 out of memory on an H100 (session 42)
                grads = [t.grad.to("cpu", copy=True) for t in (x, w, *params)]
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row[f"{variant}_mem_gib"] = (torch.cuda.max_memory_allocated() - held) / 2**30
                row[f"{variant}_saved_b_per_token"] = saved_bytes(ops[variant], x, ids, w, params) / T
                seconds = harness.events(step, 10)
                if kernels:  # where the step's device time goes (forward and backward kernels together)
                    row[f"{variant}_fwd_ms"] = harness.events(lambda op=ops[variant]: op(x, ids, w), 10) * 1e3
                    every = harness.kernel_times(step, calls=5, top=10_000)
                    row[f"{variant}_kernels"] = every[:kernels]
                    row[f"{variant}_kernel_us"] = sum(us for us, _, _ in every)
                    row[f"{variant}_launches"] = sum(n for _, n, _ in every)
            except torch.OutOfMemoryError:
                print(f"{name} T={T} {variant}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
        row[f"{variant}_ms"] = seconds * 1e3
        row[f"{variant}_tflops"] = 18 * T * k * H * I / seconds / 1e12
        if variant == "hf_grouped_mm":
            ref = grads
        elif ref is not None:
            # Compared now, not kept: Kimi-K2's weight gradients are 34 GB a variant, and four variants' host copies
            # pass the device host's 128 GiB (session 49: the process died without a word, as a host OOM kill does).
            # The worst tensor's error, each in slices: DeepSeek-V3's gate_up gradient is 28 GiB in fp32.
            row[f"{variant}_grad_err"] = max(harness.grads_rel_err([a], [b]) for a, b in zip(grads, ref))
        del grads
    print({key: v for key, v in row.items() if not key.endswith("_kernels")}, flush=True)
    del ops, ref
    torch.cuda.empty_cache()
    return row


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[4096, 32768])
    ap.set_defaults(shapes=["qwen3_30b_a3b", "mixtral_8x7b", "gpt_oss_20b"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="a subset (hf_grouped_mm, the gradients' reference, always runs)")
    ap.add_argument("--kernels", type=int, default=0, metavar="N",
                    help="also profile each variant's step: its N kernels by CUDA time, printed after the table")
    args = ap.parse_args()
    variants = tuple(dict.fromkeys(("hf_grouped_mm", *args.variants)))
    harness.gpu_name()
    harness.compile_per_shape()
    rows = []
    for name in args.shapes:
        for T in args.tokens:
            rows.append(point(name, T, variants, args.kernels))
            print(f"{name} T={T}: " + ", ".join(f"{v} {rows[-1].get(f'{v}_tflops', float('nan')):.0f} TF/s"
                                               for v in variants), flush=True)
            if os.environ.get("OUT"):  # each point as it lands: a run stopped by its time limit keeps the earlier ones
                harness.write_json(os.path.join(os.environ["OUT"], "train_op.json"), rows)
    print(f"\n{'shape':>16} {'T':>6} " + " ".join(f"{v:>22}" for v in variants)
          + "   (TFLOP/s, GiB above inputs, saved KiB per token)")
    for r in rows:
        nan = float("nan")
        cells = [f"{r.get(f'{v}_tflops', nan):5.0f} {r.get(f'{v}_mem_gib', nan):5.1f} "
                 f"{r.get(f'{v}_saved_b_per_token', nan) / 1024:6.1f}" for v in variants]
        print(f"{r['shape']:>16} {r['T']:>6} " + " ".join(f"{c:>22}" for c in cells))
    print("grad err vs hf_grouped_mm: " + "; ".join(
        f"{r['shape']} T={r['T']} " + " ".join(f"{v} {r.get(f'{v}_grad_err', float('nan')):.1e}" for v in variants[1:])
        for r in rows))
    for r in rows if args.kernels else ():
        for v in variants:
            print(f"\n{r['shape']} T={r['T']} {v}: step {r.get(f'{v}_ms', float('nan')) * 1e3:.0f} µs (forward alone "
                  f"{r.get(f'{v}_fwd_ms', float('nan')) * 1e3:.0f}), {r.get(f'{v}_kernel_us', float('nan')):.0f} µs of "
                  f"kernels in {r.get(f'{v}_launches', 0)} launches; the costliest: µs, launches, kernel")
            for us, n, key in r.get(f"{v}_kernels", ()):
                print(f"  {us:9.1f} {n:4d}  {key[:110]}")


if __name__ == "__main__":
    main()
