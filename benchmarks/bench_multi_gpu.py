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
    train_fsdp      one training step (forward + backward, no optimizer) of B=1 x --train-tokens per rank, FSDP2
                    (`fully_shard` per decoder layer and the root) on 2 GPUs, the plain model on 1
    train_ep        the same step under transformers' all-to-all EP (2 GPUs: every rank the same batch, attention
                    tensor-parallel, the routed rows sent to their experts' rank and back)
    all_reduce      the all-reduce EP adds per MoE layer: [T, H] in the model's dtype
    all_to_all      what all-to-all EP would move instead: T * k rows of H each way (dispatch; combine alike)
tok/s counts the distinct tokens a step processes (FSDP: world x B x S; EP: B x S). `err` is the logits' (inference)
or loss's (training) relative error of fused_moe against the same sharding run eagerly.
Rows: --out writes results/multi_gpu_<gpu>.json (rows keyed by model, world, part, backend); --parts runs a subset
(a separate run updates only its own rows).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import moe_compiler  # noqa: F401 - registers the backend
from moe_compiler.testing import rel_err

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


def model_points(model, args, cuda: bool, device, table: Table) -> None:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    shapes = [("prefill", 1, args.prefill_tokens, None)] + [
        (part, B, 1, mode) for B in args.decode_batch
        for part, mode in (("decode", None), ("decode_graphs", "reduce-overhead" if cuda else None))
    ]
    inputs = {(B, S): torch.randint(0, vocab, (B, S), generator=gen).to(device) for _, B, S, _ in shapes}

    def forward(m, ids):
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    eager = {shape: forward(model, ids).float() for shape, ids in inputs.items()}
    for backend in BACKENDS:
        for part, B, S, mode in shapes:
            _reset()
            ids = inputs[B, S]
            fn = torch.compile(model, backend=backend, mode=mode, dynamic=False)
            t0 = time.perf_counter()
            logits = forward(fn, ids).float()
            compile_s = time.perf_counter() - t0
            s = timed(lambda fn=fn, ids=ids: forward(fn, ids), args.reps, cuda)
            table.add({"part": part, "backend": backend, "B": B, "S": S, "ms": s * 1e3, "tok_s": B * S / s,
                       "compile_s": compile_s, "err": rel_err(logits, eager[B, S]), "fused": _example().fused_layers()})


def _reset() -> None:
    torch._dynamo.reset()
    counters["moe_compiler"].clear()


def train_points(path: str, args, cuda: bool, device, dtype, table: Table) -> None:
    """One training step (forward, backward; no optimizer) per sharding, each backend compiled in training mode."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for part in ("train_fsdp", "train_ep") if world > 1 else ("train_fsdp",):
        model = _train_model(part, path, world, device, dtype)
        rows_per_step = world if part == "train_fsdp" else 1
        seed = rank if part == "train_fsdp" else 0  # FSDP: each rank its own rows; EP: the same batch everywhere
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (1, args.train_tokens), generator=gen).to(device)

        def step(m, model=model, ids=ids):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach().float()

        ref = step(model)
        for backend in BACKENDS:
            _reset()
            options = {"moe_compiler.training": True} if backend == "fused_moe" else None
            fn = torch.compile(model, backend=backend, options=options)
            t0 = time.perf_counter()
            loss = step(fn)
            compile_s = time.perf_counter() - t0
            s = timed(lambda fn=fn: step(fn), args.reps, cuda)
            table.add({"part": part, "backend": backend, "B": 1, "S": args.train_tokens, "ms": s * 1e3,
                       "tok_s": rows_per_step * args.train_tokens / s, "compile_s": compile_s,
                       "err": rel_err(loss, ref), "fused": _example().fused_layers()})
        del model
        if cuda:
            torch.cuda.empty_cache()


def _train_model(part: str, path: str, world: int, device, dtype):
    from transformers import AutoModelForCausalLM

    if part == "train_ep":
        config = _example().ep_config(world, implementation="all_to_all")
        return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=dtype).train()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).train()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        _example().fully_shard_layers(model, init_device_mesh(device.type, (world,)))
    return model


def collective_points(model, args, cuda: bool, device, table: Table) -> None:
    """The all-reduce all-reduce EP adds per MoE layer, and what all-to-all EP would move instead, alone."""
    world = dist.get_world_size()
    H, k = model.config.hidden_size, model.config.num_experts_per_tok
    dtype = model.dtype
    for T in sorted({1, *args.decode_batch, args.prefill_tokens}):
        x = torch.randn(T, H, device=device).to(dtype)
        s = timed(lambda x=x: dist.all_reduce(x), args.reps, cuda)
        table.add({"part": "all_reduce", "T": T, "bytes": x.numel() * x.element_size(), "ms": s * 1e3})
        rows_out = T * k - (T * k) % world
        y = torch.randn(rows_out, H, device=device).to(dtype)
        out = torch.empty_like(y)
        s = timed(lambda y=y, out=out: dist.all_to_all_single(out, y), args.reps, cuda)
        table.add({"part": "all_to_all", "T": T, "bytes": y.numel() * y.element_size(), "ms": s * 1e3})


def main():
    ap = harness.parser(__doc__, out="multi_gpu")
    ap.add_argument("--model", default="qwen3_30b_a3b", choices=sorted(MODELS))
    ap.add_argument("--tiny", help="a tiny random model of this architecture instead (CPU mechanics)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--train-tokens", type=int, default=4096)
    ap.add_argument("--parts", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    rank, world, device = _example().init_ranks()
    if args.tiny:
        args.prefill_tokens, args.decode_batch, args.reps = min(args.prefill_tokens, 64), [1, 4], min(args.reps, 3)
        args.train_tokens = min(args.train_tokens, 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    path = checkpoint(args)
    table = Table(args, args.tiny or args.model, world, harness.gpu_name() if cuda else "CPU")
    if "infer" in args.parts:
        model = load(path, world, dtype)
        model_points(model, args, cuda, device, table)
        if world > 1:
            collective_points(model, args, cuda, device, table)
        del model
    if "train" in args.parts:
        train_points(path, args, cuda, device, dtype, table)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        print_table(table.rows, f"{table.name} on {world} x {table.gpu}")
    dist.destroy_process_group()


class Table:
    """The run's rows: each printed and saved (rank 0) as soon as measured, so that a run cut short keeps them."""

    def __init__(self, args, name: str, world: int, gpu: str):
        self.args, self.name, self.world, self.gpu, self.rows = args, name, world, gpu, []
        self.runs = {f"{name}/{world}/{part}" for part in args.parts}

    def add(self, row: dict) -> None:
        part = "train" if row["part"].startswith("train") else "infer"
        row.update(model=self.name, world=self.world, run=f"{self.name}/{self.world}/{part}")
        self.rows.append(row)
        if dist.get_rank() == 0:
            print("ROW " + json.dumps(row), flush=True)
            harness.save_rows(self.args.out, "multi_gpu", self.rows, self.gpu, key="run", replaced=self.runs)


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    for r in rows:
        if "backend" in r:
            what = f"{r['backend']:>9} B={r['B']:<3} S={r['S']:<5} fused {r['fused']}"
        else:
            what = f"T={r['T']:<5} {r['bytes']:>11} B"
        extra = f" {r['tok_s']:12.0f} tok/s  err {r['err']:.1e}" if "tok_s" in r else ""
        print(f"  {r['part']:>13} {what} {r['ms']:9.3f} ms{extra}")
    ms = {(r["part"], r["B"], r["backend"]): r["ms"] for r in rows if "backend" in r}
    for part, B, backend in ms:
        if backend == "fused_moe" and (part, B, "inductor") in ms:
            ratio = ms[part, B, "inductor"] / ms[part, B, backend]
            print(f"  {part:>13} B={B:<3} torch.compile / fused_moe = {ratio:.2f}x")


if __name__ == "__main__":
    main()
