"""Fine-tune an MoE model compiled with backend="fused_moe":
`python examples/train_moe.py [--model PATH | --size qwen3-30b-a3b --layers 4] [--device cuda] [--steps 20]`.

Default: a tiny random Qwen3-MoE that runs anywhere offline; `--size qwen3-30b-a3b` builds Qwen3-30B-A3B's real
dimensions with random weights and a few layers (a GPU's worth). The data is synthetic and learnable: token
streams over the first DATA_VOCAB ids drawn from a fixed random bigram table, so the loss falls from ln(vocab)
towards the table's entropy (ln 4) and visibly within a few steps even at a 152k vocabulary.

Each variant starts from the same weights and trains the same batches with AdamW:
    eager                 the model as transformers runs it
    torch.compile         plain torch.compile (Inductor)
    fused_moe             backend="fused_moe" as is: a training graph keeps Inductor's MoE today (its log and
                          counters say so), because a whole train step through the op is only about as fast as
                          plain torch.compile so far (the README's Training paragraph)
    fused_moe training    backend="fused_moe", options={"moe_compiler.training": True}: the MoE blocks run as the
                          fused op, forward (saving Z) and the op's backward (torch's grouped GEMMs over rows in
                          expert order with Triton row passes; MOE_COMPILER_BACKWARD=torch: the torch composite)
Printed: the loss at every step per variant, the median step time after the first (compiling) step, peak GPU
memory, and each variant's largest loss difference from eager.

Nothing here imports moe_compiler: the backend is found through its `torch_dynamo_backends` entry point.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

TINY = dict(
    hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
    norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    vocab_size=512,
)
QWEN3_30B_A3B = dict(
    hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
)
VARIANTS = {
    "eager": None,
    "torch.compile": dict(),
    "fused_moe": dict(backend="fused_moe"),
    "fused_moe training": dict(backend="fused_moe", options={"moe_compiler.training": True}),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local checkpoint directory (default: a random model, see --size)")
    p.add_argument("--size", choices=["tiny", "qwen3-30b-a3b"], default="tiny")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of a random model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(dtype=args.dtype, experts_implementation="grouped_mm")
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, **kwargs).to(args.device)
    dims = TINY if args.size == "tiny" else QWEN3_30B_A3B
    config = AutoConfig.for_model("qwen3_moe", **dict(dims, num_hidden_layers=args.layers))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    with torch.no_grad():  # routers with a wide spread: no near-ties between eager's and a compiler's choices
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    return model


# Tokens the data uses. Over Qwen3's whole 152k vocabulary a few steps barely move the loss (12 AdamW steps of 4 x 1024
# tokens on the real dimensions, H100: 12.35 -> 12.34); over 1024 ids the model first learns which ids occur at all
# (a tiny model at 152k vocabulary, CPU, 12 steps: 11.95 -> 10.59, against 11.95 -> 11.94 over every id).
DATA_VOCAB = 1024


def batches(vocab: int, batch: int, seq: int, steps: int, device: str):
    """`steps` batches of token streams from a fixed random bigram table over the first `vocab` ids (each token has
    4 likely successors)."""
    g = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 4, (batch,), generator=g)]
        out.append(ids.to(device))
    return out


def train(model, how, data, lr, device):
    """(losses, median step seconds after the first step, peak GiB or None)."""
    model = copy.deepcopy(model).train()
    step_model = model if how is None else torch.compile(model, **how)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for ids in data:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach().item())
    later = sorted(times[1:]) or times
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return losses, later[len(later) // 2], peak


def main():
    args = parse_args()
    model = build_model(args)
    experts = sum(1 for m in model.modules() if type(m).__name__.endswith("Experts"))
    print(f"{model.config.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{experts} MoE layers, {args.dtype}, {args.device}; {args.steps} AdamW steps of "
          f"{args.batch}x{args.seq} tokens")
    data = batches(min(model.config.vocab_size, DATA_VOCAB), args.batch, args.seq, args.steps, args.device)
    results = {}
    for name in args.variants:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        results[name] = train(model, VARIANTS[name], data, args.lr, args.device)
        counts = dict(torch._dynamo.utils.counters["moe_compiler"])
        fused = sum(v for k, v in counts.items() if k.startswith("fused_experts"))
        left = counts.get("left_for_training", 0)
        note = f" (MoE layers fused: {fused}, left for training: {left})" if counts else ""
        print(f"{name}: loss {results[name][0][0]:.3f} -> {results[name][0][-1]:.3f}{note}")
    print("\nstep  " + "  ".join(f"{n:>18}" for n in results))
    for i in range(args.steps):
        print(f"{i:>4}  " + "  ".join(f"{r[0][i]:>18.4f}" for r in results.values()))
    ref = results.get("eager")
    print(f"\n{'variant':>18} {'step ms':>9} {'peak GiB':>9} {'max |loss - eager|':>19}")
    for name, (losses, step_s, peak) in results.items():
        # "-" where eager did not run (--variants without it): nothing to compare with
        diff_s = f"{max(abs(a - b) for a, b in zip(losses, ref[0])):19.2e}" if ref else f"{'-':>19}"
        peak_s = f"{peak:9.2f}" if peak is not None else f"{'-':>9}"
        print(f"{name:>18} {step_s * 1e3:9.1f} {peak_s} {diff_s}")


if __name__ == "__main__":
    main()
