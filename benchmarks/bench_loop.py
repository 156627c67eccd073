"""Legacy expert loops (transformers-v4 `for e in range(E)` + index_add_ over nn.ModuleList experts): the whole
MoE block as eager runs it, as Inductor compiles it, and as fused_moe rewrites it (moe_compiler.experts_unstacked
reading the re-laid-out parameters in place), at real shapes, bf16, uniform routing.

    python benchmarks/bench_loop.py [--out benchmarks/results/loop_<gpu>.json]

Variants (one run, same inputs): eager loop; Inductor (torch.compile default backend; the loop keeps its
`nonzero`s, so no CUDA graph); fused_moe called eagerly; fused_moe captured in a CUDA graph (T <= 128, as
decode runs); and `stacked`: moe_compiler.experts on stacked copies of the same weights (what a v5 checkpoint
gets), so `fused / stacked` is the cost of reading per-expert parameters (host check of E*3 tensors).
Floor: the expert weights the routed tokens touch (expected distinct experts under uniform routing) at
3.02 TB/s, or the FLOPs at 785 TFLOP/s, whichever is larger. Cold L2 before every call (timing.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from legacy_models import FORMS, LoopMoeBlock  # noqa: E402
from timing import Timer  # noqa: E402

import moe_compiler  # noqa: E402

PEAK_FLOPS, PEAK_BYTES = 785e12, 3.02e12

# name -> (v4 form, H, I, E, k) of real v4 checkpoints (configs on the Hub)
SHAPES = {
    "mixtral_8x7b_v4": ("mixtral_v4", 4096, 14336, 8, 2),
    "qwen1.5_moe_a2.7b_v4": ("deepseek_style", 2048, 1408, 60, 4),
}
TOKENS = (1, 16, 128, 2048)


def floor_s(T, H, I, E, k) -> float:
    touched = E * (1 - (1 - k / E) ** T)
    nbytes = 2 * (touched * 3 * H * I + 2 * T * H)
    return max(nbytes / PEAK_BYTES, 2 * T * k * 3 * H * I / PEAK_FLOPS)


def stacked_copies(block, form):
    names = ("w1", "w3", "w2") if form == "mixtral_v4" else ("gate_proj", "up_proj", "down_proj")
    gate, up, down = ([getattr(ex, n).weight for ex in block.experts] for n in names)
    return torch.stack([torch.cat(gu) for gu in zip(gate, up)]), torch.stack(down)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.recompile_limit = 1000
    timer = Timer("cuda")
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
                ref = block(x)[0].float()
                out = fused(x)[0].float()  # compiles (and re-lays out the experts once)
                err = ((out - ref).norm() / ref.norm()).item()
                parts = [p for n, p in block.named_parameters() if n.startswith("experts.")]
                stacked_gu, stacked_dn = stacked_copies(block, form)
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
                row["fused_graph_us"] = timer.graph(lambda: fused(x)) * 1e6 if T <= 128 else None
                time = timer.graph if T <= 128 else timer.eager
                row["stacked_op_us"] = time(lambda: moe_compiler.moe_experts(x.view(-1, H), ids, w, stacked_gu, stacked_dn)) * 1e6
                del stacked_gu, stacked_dn
            rows.append(row)
            print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}: v4 expert loop, whole block (router + experts), bf16; us per call")
    print(f"{'shape':22} {'T':>5} {'eager':>9} {'inductor':>9} {'fused':>9} {'fused+CG':>9} {'op only':>9} {'floor':>8} {'x floor':>7} {'vs eager':>8} {'vs ind.':>7} {'err':>8}")
    for r in rows:
        best = r["fused_graph_us"] or r["fused_us"]
        print(f"{r['shape']:22} {r['T']:5} {r['eager_us']:9.1f} {r['inductor_us']:9.1f} {r['fused_us']:9.1f} "
              f"{(r['fused_graph_us'] or float('nan')):9.1f} {r['stacked_op_us']:9.1f} {r['floor_us']:8.1f} {best / r['floor_us']:7.2f} "
              f"{r['eager_us'] / best:7.1f}x {r['inductor_us'] / best:6.1f}x {r['rel_err']:8.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
