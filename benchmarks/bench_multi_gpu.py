"""Scaling under transformers' expert parallelism: the same model on 1 and 2 GPUs, fused_moe vs plain
torch.compile (Inductor) under the same sharding, plus the collectives the sharding adds, measured alone.

    torchrun --nproc-per-node 1 -m benchmarks.bench_multi_gpu --model qwen3_30b_a3b --out  # 1 GPU, no EP
    torchrun --nproc-per-node 2 -m benchmarks.bench_multi_gpu --model qwen3_30b_a3b --out  # EP over 2
    torchrun --nproc-per-node 2 -m benchmarks.bench_multi_gpu --tiny qwen3_moe             # CPU (gloo): mechanics

Rank 0 builds the real-dimension model with random weights (benchmarks/models.py: the released config, fewer
layers) and writes it to a temporary checkpoint; every rank loads it with `from_pretrained(distributed_config=...)`
as a user would (examples/multi_gpu.py: experts sharded by transformers' EP plan, attention tensor-parallel).
Points, each timed on every rank after warm-up (CUDA events, medians), rank 0 reporting:
    prefill         B=1, --prefill-tokens tokens, default mode (no CUDA graphs)
    decode          B tokens of one position (use_cache=False), default mode: the host path
    decode_graphs   the same under mode="reduce-overhead" (the all-reduce captured with the graph)
    all_reduce      the all-reduce EP adds per MoE layer: [T, H] in the model's dtype
    all_to_all      what all-to-all EP would move instead: T * k rows of H each way (dispatch; combine alike)
Rows: --out writes results/multi_gpu_<gpu>.json (rows keyed by model, world, part, backend).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

import moe_compiler  # noqa: F401 - registers the backend

from . import harness
from .models import MODELS

BACKENDS = ("inductor", "fused_moe")


def timed(fn, reps: int, cuda: bool) -> float:
    """Median seconds of fn() on this rank, the ranks lined up first (each call may hold collectives)."""
    for _ in range(3):
        fn()
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
        return harness.events(fn, reps)
    return harness.wall_clock(fn, reps)


def checkpoint(args) -> str:
    """Rank 0 writes the model; every rank gets the directory."""
    path = [None]
    if dist.get_rank() == 0:
        path[0] = tempfile.mkdtemp(prefix="moe_bench_ep_")
        if args.tiny:
            from moe_compiler.testing.hf_models import tiny_model

            model = tiny_model(args.tiny)
        else:
            from .models import build

            model = build(args.model, args.layers, device="cuda" if torch.cuda.is_available() else "cpu")
        model.save_pretrained(path[0])
        del model
    dist.broadcast_object_list(path, src=0)
    return path[0]


@functools.cache
def _example():
    """examples/multi_gpu.py: how a user joins the ranks and asks transformers for its EP plan."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "multi_gpu_example", os.path.join(os.path.dirname(__file__), "..", "examples", "multi_gpu.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def load(path: str, world: int, dtype):
    from transformers import AutoModelForCausalLM

    if world == 1:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    config = _example().ep_config(world)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=dtype).eval()


def model_points(model, args, cuda: bool, device) -> list[dict]:
    rows = []
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    shapes = [("prefill", 1, args.prefill_tokens, None)] + [
        (part, B, 1, mode) for B in args.decode_batch
        for part, mode in (("decode", None), ("decode_graphs", "reduce-overhead" if cuda else None))
    ]
    for backend in BACKENDS:
        for part, B, S, mode in shapes:
            torch._dynamo.reset()
            ids = torch.randint(0, vocab, (B, S), generator=gen).to(device)
            fn = torch.compile(model, backend=backend, mode=mode, dynamic=False)

            def call():
                with torch.no_grad():
                    return fn(input_ids=ids, use_cache=False, logits_to_keep=1).logits

            t0 = time.perf_counter()
            call()
            compile_s = time.perf_counter() - t0
            s = timed(call, args.reps, cuda)
            rows.append({"part": part, "backend": backend, "B": B, "S": S, "ms": s * 1e3,
                         "tok_s": B * S / s, "compile_s": compile_s})
    return rows


def collective_points(model, args, cuda: bool, device) -> list[dict]:
    """The all-reduce all-reduce EP adds per MoE layer, and what all-to-all EP would move instead, alone."""
    rows, world = [], dist.get_world_size()
    H, k = model.config.hidden_size, model.config.num_experts_per_tok
    dtype = model.dtype
    for T in sorted({1, *args.decode_batch, args.prefill_tokens}):
        x = torch.randn(T, H, device=device).to(dtype)
        s = timed(lambda x=x: dist.all_reduce(x), args.reps, cuda)
        rows.append({"part": "all_reduce", "T": T, "bytes": x.numel() * x.element_size(), "ms": s * 1e3})
        rows_out = T * k - (T * k) % world
        y = torch.randn(rows_out, H, device=device).to(dtype)
        out = torch.empty_like(y)
        s = timed(lambda y=y, out=out: dist.all_to_all_single(out, y), args.reps, cuda)
        rows.append({"part": "all_to_all", "T": T, "bytes": y.numel() * y.element_size(), "ms": s * 1e3})
    return rows


def main():
    ap = harness.parser(__doc__, out="multi_gpu")
    ap.add_argument("--model", default="qwen3_30b_a3b", choices=sorted(MODELS))
    ap.add_argument("--tiny", help="a tiny random model of this architecture instead (CPU mechanics)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    rank, world, device = _example().init_ranks()
    if args.tiny:
        args.prefill_tokens, args.decode_batch, args.reps = min(args.prefill_tokens, 64), [1, 4], min(args.reps, 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    path = checkpoint(args)
    model = load(path, world, dtype)
    rows = model_points(model, args, cuda, device)
    if world > 1:
        rows += collective_points(model, args, cuda, device)
    name = args.tiny or args.model
    run = f"{name}/{world}"
    for r in rows:
        r.update(model=name, world=world, run=run)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        gpu = harness.gpu_name() if cuda else "CPU"
        harness.save_rows(args.out, "multi_gpu", rows, gpu, key="run", replaced={run})
        print_table(rows, f"{name} on {world} x {gpu}")
    dist.destroy_process_group()


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    for r in rows:
        if "backend" in r:
            what = f"{r['backend']:>9} B={r['B']:<3} S={r['S']:<5}"
        else:
            what = f"T={r['T']:<5} {r['bytes']:>11} B"
        print(f"  {r['part']:>13} {what} {r['ms']:9.3f} ms" + (f" {r['tok_s']:12.0f} tok/s" if "tok_s" in r else ""))
    ms = {(r["part"], r["B"], r["backend"]): r["ms"] for r in rows if "backend" in r}
    for part, B, backend in ms:
        if backend == "fused_moe" and (part, B, "inductor") in ms:
            ratio = ms[part, B, "inductor"] / ms[part, B, backend]
            print(f"  {part:>13} B={B:<3} torch.compile / fused_moe = {ratio:.2f}x")


if __name__ == "__main__":
    main()
