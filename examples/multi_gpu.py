"""Expert parallelism and FSDP2 with backend="fused_moe":

    torchrun --nproc-per-node 2 examples/multi_gpu.py [--arch qwen3_moe|deepseek_v3] [--model PATH]
                                                      [--dtype bf16] [--mode reduce-overhead]
    torchrun --nproc-per-node 2 examples/multi_gpu.py --fsdp | --ep-train [--arch ...] [--model PATH] [--dtype bf16]

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

--ep-train: one training step under transformers' all-to-all EP (5.21+; its training path), loss and gradients
against one process. The split sizes read back each layer break the graph; the experts' part, in a resumed frame
without a module stack, is found by the experts forward in its stack trace and fused like any other.

--fsdp: one training step with FSDP2 (`fully_shard` per decoder layer), compiled with fused_moe in training mode,
each rank its own rows; loss and gradients against one process running the whole batch unsharded. FSDP's hooks
split the graph per layer; inside each, the op reads the parameters FSDP has just all-gathered, in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import moe_compiler  # noqa: F401 - registers the backend
from moe_compiler.testing import rel_err

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ep_config(world: int, implementation: str = "auto"):
    """transformers' DistributedConfig for experts sharded over `world` ranks (attention tensor-parallel):
    `ep_size` from 5.21 on, `enable_expert_parallel` before (no choice of implementation there)."""
    from transformers.distributed import DistributedConfig

    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if "ep_size" in fields:
        return DistributedConfig(tp_size=world, ep_size=world, tp_plan="auto", ep_implementation=implementation)
    if implementation != "auto":
        raise SystemExit(f"transformers {__import__('transformers').__version__} has no ep_implementation "
                         f"(from 5.21): {implementation!r} needs a newer transformers")
    return DistributedConfig(tp_size=world, tp_plan="auto", enable_expert_parallel=True)


def init_ranks() -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) once in the process group: NCCL on GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


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


def expert_parallel(args, path: str, device, dtype) -> dict:
    """Inference under transformers' EP plan: compiled vs eager (same sharding) and vs the unsharded model."""
    from transformers import AutoModelForCausalLM

    world = dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=ep_config(world), dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits.float()

    eager = logits(model)
    compiled = logits(torch.compile(model, backend="fused_moe", mode=args.mode))
    if args.mode == "reduce-overhead":  # replays of the captured graph, the all-reduce inside it
        compiled = logits(torch.compile(model, backend="fused_moe", mode=args.mode))
    single = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    result = {"moe_layers": moe_layers(model), "compiled_vs_eager": rel_err(compiled, eager),
              "ep_vs_single": rel_err(eager, logits(single))}
    if dtype != torch.float32:  # bf16 noise of a real-dimension model: what plain torch.compile gets, the bound
        torch._dynamo.reset()  # (keeps the counters)
        result["inductor_err"] = rel_err(logits(torch.compile(model, mode=args.mode)), eager)
    return result


def ep_train(args, path: str, device, dtype) -> dict:
    """One training step under transformers' all-to-all EP (its training path: the routed rows sent to their
    experts' ranks and back; the split sizes read back between, a graph break each layer), compiled with fused_moe
    in training mode: loss and every gradient against one process on the same batch, unsharded."""
    from transformers import AutoModelForCausalLM

    world = dist.get_world_size()
    config = ep_config(world, implementation="all_to_all")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=dtype).train()
    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
    ids = torch.randint(0, model.config.vocab_size, (2, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    return _train_vs_single(model, single, ids, ids, mean_over_ranks=False)


def fsdp_train(args, path: str, device, dtype) -> dict:
    """One training step under FSDP2 (`fully_shard` per decoder layer, then the root), compiled with fused_moe in
    training mode, each rank its own rows of the batch; loss and every gradient against one process running
    the whole batch unsharded (FSDP averages the ranks' gradients: the whole batch's mean-loss gradient)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).train()
    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
    split = fully_shard_layers(model, init_device_mesh(device.type, (world,)))
    ids = torch.randint(0, model.config.vocab_size, (world, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    return _train_vs_single(model, single, ids[rank:rank + 1], ids, mean_over_ranks=True) | {"split_groups": split}


def fully_shard_layers(model, mesh) -> int:
    """FSDP2 as a user applies it: each decoder layer one group, then the root. FSDP2 wants one dtype per group:
    a module transformers keeps in fp32 inside a bf16 model (DeepSeek-V3's router) becomes a group of its own.
    Returns how many such groups: their hooks break the layer's graph, and the layers' resumed frames share code."""
    from torch.distributed.fsdp import fully_shard

    own = [m for m in model.modules()
           if m is not model and any(p.dtype != model.dtype for p in m.parameters(recurse=False))]
    for module in own:
        fully_shard(module, mesh=mesh)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(own)


def _train_vs_single(model, single, mine, whole, mean_over_ranks: bool) -> dict:
    """One step of `model` compiled with fused_moe on this rank's rows `mine` (loss averaged over the ranks where
    each has its own rows) against `single` on the whole batch: the loss and every gradient (sharded ones
    gathered). `single` runs in fp32: in bf16 the gradients of a random model are tens of percent off the fp32 ones
    in eager as well, and the same step compiled by plain torch.compile gives the noise the error is held to."""
    ref = single(input_ids=whole, labels=whole).loss
    ref.backward()
    ref_grads = _grads(single)

    def step(backend, options) -> tuple[float, float]:
        torch._dynamo.reset()  # (keeps the counters)
        loss = torch.compile(model, backend=backend, options=options)(input_ids=mine, labels=mine).loss
        loss.backward()
        loss = loss.detach().clone()
        if mean_over_ranks:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        grads = _grads(model)
        model.zero_grad(set_to_none=True)
        return rel_err(loss, ref.detach()), rel_err(grads, ref_grads)

    result = dict(zip(("loss_vs_single", "grads_vs_single"), step("fused_moe", {"moe_compiler.training": True})))
    result["moe_layers"] = moe_layers(model)
    if model.dtype != torch.float32:
        result["inductor_err"] = max(step("inductor", None))
    return result


def _grads(model) -> torch.Tensor:
    """Every gradient of `model` (sharded ones gathered), flattened in parameter order."""
    return torch.cat([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).flatten().float()
                      for p in model.parameters()])


def moe_layers(model) -> int:
    return sum(1 for _, m in model.named_modules() if type(m).__name__.endswith("Experts"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe", help="tiny model's architecture (without --model)")
    ap.add_argument("--model", help="a checkpoint directory instead of a tiny random model")
    ap.add_argument("--fsdp", action="store_true", help="a training step under FSDP2 instead of EP inference")
    ap.add_argument("--ep-train", action="store_true", help="a training step under all-to-all EP instead")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (GPUs)")
    ap.add_argument("--tokens", type=int, default=33)
    args = ap.parse_args()

    rank, world, device = init_ranks()
    dtype = DTYPES[args.dtype]
    path = args.model or tiny_checkpoint(args.arch)
    result = (fsdp_train if args.fsdp else ep_train if args.ep_train else expert_parallel)(args, path, device, dtype)
    fused = fused_layers()
    result.update(rank=rank, world=world, device=str(device), dtype=args.dtype, fused_layers=fused,
                  counters=dict(counters["moe_compiler"]))
    tol = 1e-4 if dtype == torch.float32 else max(3e-2, 1.5 * result.pop("inductor_err", 0.0))
    errors = {k: v for k, v in result.items() if k.endswith("_vs_eager") or k.endswith("_vs_single")}
    result["tol"] = tol
    result["checkpoint"] = path  # (a tiny one is removed at exit)
    # After a graph break inside the experts module (all-to-all EP) or the MoE block (FSDP2 groups of their own), the
    # layers' resumed frames share code: Dynamo compiles it once per distinct shape set, so fewer graphs than layers
    # may hold all the (fused) experts.
    shared_frames = args.ep_train or result.get("split_groups", 0) > 0
    complete = fused >= 1 if shared_frames else fused == result["moe_layers"]
    result["ok"] = complete and not counters["moe_compiler"]["rejected_experts"] and all(
        v <= tol for v in errors.values())
    print("RESULT " + json.dumps(result), flush=True)
    # Teardown in step: no rank closes its gloo pairs while the other still uses them, and none leaves tensors in
    # gloo's worker threads for interpreter finalization to free without the GIL (a SIGABRT after the result,
    # seen once in CI on the FSDP2 step; pytorch#179291 describes the finalization case). The result is out.
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and args.model is None:  # the tiny checkpoint: every rank loaded it before the barrier
        shutil.rmtree(path, ignore_errors=True)
    if not result["ok"]:
        print(f"rank {rank}: fused {fused}/{result['moe_layers']} MoE layers, errors {errors} (<= {tol:.0e})",
              file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
