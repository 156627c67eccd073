"""Legacy expert loops (transformers-v4 `for e in range(E)` + index_add_ over nn.ModuleList experts): the whole
MoE block as eager runs it, as Inductor compiles it, and as fused_moe rewrites it (moe_compiler.experts_unstacked
reading the re-laid-out parameters in place), at real shapes, bf16, uniform routing.

    python -m benchmarks.bench_loop [--out [PATH]]     # bare --out: benchmarks/results/loop_<gpu>.json

Variants (one run, same inputs): eager loop; Inductor (torch.compile default backend; the loop keeps its
`nonzero`s, so no CUDA graph); fused_moe called eagerly; fused_moe captured in a CUDA graph (T <= 128, as
decode runs); and `stacked`: moe_compiler.experts on stacked copies of the same weights (what a v5 checkpoint
gets), so `fused / stacked` is the cost of reading per-expert parameters (host check of E*3 tensors).
Floor: harness.floor_s of the expert weights the routed tokens touch (expected distinct experts under uniform
routing) and the FLOPs. Cold L2 before every call (moe_compiler/tune/timing.py).
"""

from __future__ import annotations

import json

import torch

import moe_compiler
from moe_compiler.testing import rel_err
from moe_compiler.testing.legacy_models import FORMS, LoopMoeBlock

from . import harness

# name -> (v4 form, H, I, E, k) of real v4 checkpoints (configs on the Hub)
SHAPES = {
    "mixtral_8x7b_v4": ("mixtral_v4", 4096, 14336, 8, 2),
    "qwen1.5_moe_a2.7b_v4": ("deepseek_style", 2048, 1408, 60, 4),
}
TOKENS = (1, 16, 128, 2048)


def floor_s(T, H, I, E, k) -> float:
    touched = E * (1 - (1 - k / E) ** T)
    nbytes = 2 * (touched * 3 * H * I + 2 * T * H)
    return harness.floor_s(2 * T * k * 3 * H * I, nbytes)


def stacked_copies(block, form):
    names = ("w1", "w3", "w2") if form == "mixtral_v4" else ("gate_proj", "up_proj", "down_proj")
    gate, up, down = ([getattr(ex, n).weight for ex in block.experts] for n in names)
    return torch.stack([torch.cat(gu) for gu in zip(gate, up)]), torch.stack(down)


def main():
    args = harness.parser(__doc__, out="loop").parse_args()
    gpu = harness.gpu_name()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    harness.compile_per_shape()
    timer = harness.Timer("cuda")
    rows = []
    for name, (form, H, I, E, k) in SHAPES.items():
        torch.manual_seed(0)
        block = LoopMoeBlock(H, I, E, k, FORMS[form]).to("cuda", torch.bfloat16)
        with torch.no_grad():
            block.gate.weight.normal_(0, 1)
        fused = torch.compile(block, backend="fused_moe", dynamic=False)
        inductor = torch.compile(block, dynamic=False)
        for T in TOKENS:
            x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ref = block(x)[0]
                err = rel_err(fused(x)[0].float(), ref.float())  # compiles (and re-lays out the experts once)
                parts = [p for n, p in block.named_parameters() if n.startswith("experts.")]
                stacked = stacked_copies(block, form)
                logits = block.gate(x.view(-1, H))
                w, ids = torch.topk(torch.softmax(logits, -1, dtype=torch.float), k, -1)
                if FORMS[form].renormalize:
                    w = w / w.sum(-1, keepdim=True)
                w = w.to(torch.bfloat16)
                row = dict(shape=name, T=T, H=H, I=I, E=E, k=k, rel_err=err, floor_us=floor_s(T, H, I, E, k) * 1e6,
                           parts=len(parts))
                row["eager_us"] = timer.eager(lambda: block(x)) * 1e6
                row["inductor_us"] = timer.eager(lambda: inductor(x)) * 1e6
                row["fused_us"] = timer.eager(lambda: fused(x)) * 1e6
                row["fused_graph_us"] = timer.graph(lambda: fused(x)) * 1e6 if T <= harness.GRAPH_MAX_T else None
                time = harness.as_run(timer, T)
                row["stacked_op_us"] = time(lambda: moe_compiler.moe_experts(x.view(-1, H), ids, w, *stacked)) * 1e6
                stacked = None  # free the copies before the next T's
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{gpu}: v4 expert loop, whole block (router + experts), bf16; us per call")
    print(f"{'shape':22} {'T':>5} {'eager':>9} {'inductor':>9} {'fused':>9} {'fused+CG':>9} {'op only':>9} "
          f"{'floor':>8} {'x floor':>7} {'vs eager':>8} {'vs ind.':>7} {'err':>8}")
    for r in rows:
        best = r["fused_graph_us"] or r["fused_us"]
        print(f"{r['shape']:22} {r['T']:5} {r['eager_us']:9.1f} {r['inductor_us']:9.1f} {r['fused_us']:9.1f} "
              f"{(r['fused_graph_us'] or float('nan')):9.1f} {r['stacked_op_us']:9.1f} {r['floor_us']:8.1f} "
              f"{best / r['floor_us']:7.2f} {r['eager_us'] / best:7.1f}x {r['inductor_us'] / best:6.1f}x "
              f"{r['rel_err']:8.1e}")
    harness.save_rows(args.out, "loop", rows, gpu)


if __name__ == "__main__":
    main()
