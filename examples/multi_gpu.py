"""Expert parallelism with backend="fused_moe":

    torchrun --nproc-per-node 2 examples/multi_gpu.py [--arch qwen3_moe|deepseek_v3] [--model PATH]
                                                      [--dtype bf16] [--mode reduce-overhead]

Loads the model with transformers' own expert-parallel plan — each rank holds E / world of the routed experts
(`grouped_gemm` shards), attention tensor-parallel where the model's plan has it — compiles it with
`backend="fused_moe"`, and checks on every rank: the compiled logits against eager under the same sharding and
against the unsharded model, and every MoE layer fused. Ranks on GPUs talk over NCCL, CPU ranks over gloo (the
test suite runs it that way: tests/integrations/test_expert_parallel.py).

What the backend sees (transformers 5.24, all-reduce EP at inference): every rank gets the whole batch; inside the
experts module the global ids become local ones, routes to other ranks' experts the sentinel id E_local (weight
0); the experts run on the local shards (`param.to_local()`, read in place); an all-reduce sums the ranks'
outputs. The op takes the local ids and weights and the local shards; the remap and the all-reduce stay in the
graph around it (NOTES.md, expert parallelism). Without --model a tiny random model is written to a temporary
directory by rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import moe_compiler  # noqa: F401 - registers the backend
from moe_compiler.testing import rel_err

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ep_config(world: int):
    """transformers' DistributedConfig for experts sharded over `world` ranks (attention tensor-parallel):
    `ep_size` from 5.21 on, `enable_expert_parallel` before."""
    from transformers.distributed import DistributedConfig

    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if "ep_size" in fields:
        return DistributedConfig(tp_size=world, ep_size=world, tp_plan="auto")
    return DistributedConfig(tp_size=world, tp_plan="auto", enable_expert_parallel=True)


def tiny_checkpoint(arch: str) -> str:
    """Rank 0 writes a tiny random model; every rank gets its path."""
    path = [None]
    if dist.get_rank() == 0:
        from moe_compiler.testing.hf_models import tiny_model

        path[0] = tempfile.mkdtemp(prefix=f"moe_ep_{arch}_")
        tiny_model(arch).save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    return path[0]


def fused_layers() -> int:
    return sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_experts"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe", help="tiny model's architecture (without --model)")
    ap.add_argument("--model", help="a checkpoint directory instead of a tiny random model")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (GPUs)")
    ap.add_argument("--tokens", type=int, default=33)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    path = args.model or tiny_checkpoint(args.arch)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=ep_config(world), dtype=dtype).eval()
    layers = sum(1 for _, m in model.named_modules() if type(m).__name__.endswith("Experts"))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits.float()

    eager = logits(model)
    compiled = logits(torch.compile(model, backend="fused_moe", mode=args.mode))
    if args.mode == "reduce-overhead":  # replays of the captured graph, the all-reduce inside it
        compiled = logits(torch.compile(model, backend="fused_moe", mode=args.mode))
    fused = fused_layers()
    single = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    result = {
        "rank": rank, "world": world, "device": str(device), "dtype": args.dtype, "moe_layers": layers,
        "fused_layers": fused, "compiled_vs_eager": rel_err(compiled, eager),
        "ep_vs_single": rel_err(eager, logits(single)), "counters": dict(counters["moe_compiler"]),
    }
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    result["ok"] = fused == layers and result["compiled_vs_eager"] <= tol and result["ep_vs_single"] <= tol
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
    if not result["ok"]:
        raise SystemExit(f"rank {rank}: fused {fused}/{layers} MoE layers, errors above {tol:.0e}: {result}")


if __name__ == "__main__":
    main()
