"""Shared experts: does computing them inside the experts op pay off? The whole MoE block (routed experts +
shared MLP), bf16, real shapes, two ways in the same run:

    unfused   our experts op + the shared MLP as Inductor compiles it (cuBLAS GEMMs + fused pointwise, the
              add fused too): what a model gets with option moe_compiler.shared_experts=False
    fused     one torch.ops.moe_compiler.experts call with the shared_* weights (the default): at decode the
              shared MLP is one more pair per token inside the experts kernels; elsewhere cuBLAS GEMMs inside the op

    python -m benchmarks.bench_shared [--out [PATH]] [--shapes NAME ...] [--tokens T ...]

Bare --out writes benchmarks/results/shared_<gpu>.json; with --shapes, an existing --out file keeps the other
shapes' rows.

Also the shared MLP alone (Inductor) against its own floor. T <= 128 under CUDA graphs (decode runs captured),
larger T eager; cold L2 (moe_compiler/tune/timing.py) as in a model. Floor of the block: harness.floor_s of
the FLOPs and the bytes of every touched expert, the shared MLP and the activations.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import moe_compiler
from moe_compiler.testing import experts_reference_by_expert, rel_err

from . import harness

# name -> (H, shared Is, sigmoid gate?, routed E, k, I) of the real models (configs on the Hub)
SHAPES = {
    "deepseek_v3": (7168, 2048, False, 256, 8, 2048),  # Kimi-K2 has the same shared MLP
    "qwen2_57b_a14b": (3584, 20480, True, 64, 8, 2560),
    "qwen3_next_80b": (2048, 512, True, 512, 10, 512),
    "llama4_scout": (5120, 8192, False, 16, 1, 8192),
}
TOKENS = (1, 16, 128, 1024, 4096, 16384)


def shared_mlp(x, w_gate, w_up, w_down, w_sg):
    out = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    return out if w_sg is None else torch.sigmoid(F.linear(x, w_sg)) * out


def block_unfused(x, ids, tw, w_gu, w_dn, w_gate, w_up, w_down, w_sg):
    return moe_compiler.moe_experts(x, ids, tw, w_gu, w_dn) + shared_mlp(x, w_gate, w_up, w_down, w_sg)


def block_fused(x, ids, tw, w_gu, w_dn, w_gate, w_up, w_down, w_sg):
    spec = moe_compiler.ExpertsSpec().op_kwargs()
    return torch.ops.moe_compiler.experts(x, ids, tw, w_gu, w_dn, None, None, w_gate, w_up, w_down, w_sg, **spec)


def reference(x, ids, tw, w_gu, w_dn, w_gate, w_up, w_down, w_sg):
    routed = experts_reference_by_expert(x, ids, tw, w_gu, w_dn, dtype=torch.float32)
    w_sg = None if w_sg is None else w_sg.float()
    return routed + shared_mlp(x.float(), w_gate.float(), w_up.float(), w_down.float(), w_sg)


def floor_s(T, H, I, Is, E, k, ids, gated):
    touched = int(torch.unique(ids).numel())
    flops = 2 * T * H * 3 * (k * I + Is) + (2 * T * H if gated else 0)
    nbytes = 2 * (touched * 3 * H * I + 3 * H * Is + (H if gated else 0) + 2 * T * H)
    return harness.floor_s(flops, nbytes)


def main():
    args = harness.parser(__doc__, shapes=SHAPES, tokens=TOKENS, out="shared").parse_args()
    gpu = harness.gpu_name()
    harness.compile_per_shape()
    timer = harness.Timer("cuda")
    compiled_shared = torch.compile(shared_mlp, dynamic=False)
    compiled_unfused = torch.compile(block_unfused, dynamic=False)
    rows = []
    for name in args.shapes:
        H, Is, gated, E, k, I = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        w = [torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
             for s in ((Is, H), (Is, H), (H, Is))]
        w_sg = torch.randn(1, H, device="cuda", generator=g).bfloat16() * 0.02 if gated else None
        w_gu = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        w_dn = torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        for T in args.tokens:
            x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
            ids = torch.rand(T, E, device="cuda", generator=g).argsort(-1)[:, :k]  # uniform routing
            tw = torch.rand(T, k, device="cuda").softmax(-1)
            block_args = (x, ids, tw, w_gu, w_dn, *w, w_sg)
            ref = reference(*block_args)
            err_fused = rel_err(block_fused(*block_args), ref)
            err_unfused = rel_err(compiled_unfused(*block_args), ref)
            time = harness.as_run(timer, T)
            t_shared = time(lambda: compiled_shared(x, *w, w_sg))
            t_unfused = time(lambda: compiled_unfused(*block_args))
            t_fused = time(lambda: block_fused(*block_args))
            shared_floor = harness.floor_s(2 * T * H * 3 * Is, 2 * (3 * H * Is + 2 * T * H))
            floor = floor_s(T, H, I, Is, E, k, ids, gated)
            row = dict(shape=name, T=T, H=H, Is=Is, gated=gated, E=E, k=k, I=I, shared_us=t_shared * 1e6,
                       shared_floor_us=shared_floor * 1e6, unfused_us=t_unfused * 1e6, fused_us=t_fused * 1e6,
                       block_floor_us=floor * 1e6, rel_err_fused=err_fused, rel_err_unfused=err_unfused)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{gpu}: MoE block = routed experts + shared MLP, bf16, uniform routing, us (T <= 128 in CUDA graphs)")
    print(f"{'shape':16} {'T':>6} {'shared alone':>12} {'unfused':>9} {'fused':>9} {'speedup':>7} {'floor':>8} "
          f"{'fused/floor':>11} {'err':>8}")
    for r in rows:
        print(f"{r['shape']:16} {r['T']:6} {r['shared_us']:12.1f} {r['unfused_us']:9.1f} {r['fused_us']:9.1f} "
              f"{r['unfused_us'] / r['fused_us']:7.2f} {r['block_floor_us']:8.1f} "
              f"{r['fused_us'] / r['block_floor_us']:11.2f} {r['rel_err_fused']:8.1e}")
    harness.save_rows(args.out, "shared", rows, gpu, key="shape", replaced=args.shapes)


if __name__ == "__main__":
    main()
