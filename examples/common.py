"""Shared runner of the examples: build or load a model, compile it with backend="fused_moe", print
what was fused, compare logits with eager and time eager, Inductor alone and fused_moe.

Nothing here imports moe_compiler for unquantized models: the backend is found through its
`torch_dynamo_backends` entry point, exactly as in a user's script. Quantized checkpoints (--fp8, --int4) load
through `moe_compiler.from_pretrained`, which keeps their experts quantized and points them at our ops.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="local checkpoint directory (default: a tiny random model of that architecture)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--fp8", dest="quantized", action="store_const", const="fp8",
                   help="a finegrained-FP8 checkpoint (default model: the tiny one, written as one first)")
    p.add_argument("--int4", dest="quantized", action="store_const", const="int4",
                   help="a compressed-tensors INT4 checkpoint (default model: the tiny one, written as one first)")
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args


def build_quantized(args, model_type: str, tiny_config: dict):
    """A quantized checkpoint through moe_compiler.from_pretrained; without --model the tiny model is written as
    one first, in the on-disk format of the real releases (FP8: every Linear but lm_head, 128 x 128 blocks, as
    DeepSeek-V3's; INT4: the routed experts in groups of 32, as Kimi-K2-Thinking's)."""
    import atexit
    import shutil
    import tempfile

    import moe_compiler

    path = args.model
    if path is None:
        from moe_compiler.testing import quantized

        tiny = build_model(args, model_type, tiny_config).float().cpu()
        path = tempfile.mkdtemp(prefix=f"{model_type}_{args.quantized}_")
        atexit.register(shutil.rmtree, path, ignore_errors=True)  # a throwaway: the run's own tiny model
        if args.quantized == "fp8":
            quantized.save_fp8_checkpoint(tiny, path, (128, 128), linears=True)
        else:
            quantized.save_int4_checkpoint(tiny, path, group=32)
        print(f"wrote a tiny {args.quantized} checkpoint to {path} (removed at exit)")
    model = moe_compiler.from_pretrained(path, dtype=args.dtype, device_map=args.device, local_files_only=True)
    experts = [type(m).__name__ for n, m in model.named_modules() if n.endswith(".experts")]
    print(f"loaded: experts modules {sorted(set(experts))}, experts_implementation="
          f"{model.config._experts_implementation}" + ("" if args.device == "cuda" or args.quantized == "int4" else
                                                       " (FP8 on a CPU: transformers loads it dequantized)"))
    args.experts_implementation = model.config._experts_implementation
    return model.eval()


def build_model(args, model_type: str, tiny_config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(dtype=args.dtype, experts_implementation=args.experts_implementation)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, **kwargs)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **tiny_config), **kwargs)
        # Random routers with std 1 so experts are well separated (no ties between eager and compiled).
        with torch.no_grad():
            for name, p in model.named_parameters():
                is_router = name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] > 1
                if is_router and p.shape[1] == model.config.hidden_size:
                    p.normal_(0.0, 1.0)
    return model.to(args.device).eval()


def _time(fn, iters: int, device: str) -> float:
    fn()  # warm-up (and compile)
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(description: str, model_type: str, tiny_config: dict) -> None:
    args = parse_args(description)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logging.getLogger("moe_compiler").addHandler(handler)
    logging.getLogger("moe_compiler").setLevel(logging.DEBUG)

    build = build_quantized if args.quantized else build_model
    model = build(args, model_type, tiny_config)
    n_experts_modules = sum(1 for m in model.modules() if type(m).__name__.endswith("Experts"))
    print(f"{model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{n_experts_modules} MoE layers, {args.dtype}, {args.device}, "
          f"experts_implementation={args.experts_implementation}")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)

    print("fusion report:")
    fused = torch.compile(model, backend="fused_moe", mode=args.mode)
    inductor = torch.compile(model, mode=args.mode)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        t0 = time.perf_counter()
        out = fused(input_ids=ids).logits.float()
        t_compile_fused = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_inductor = inductor(input_ids=ids).logits.float()
        t_compile_inductor = time.perf_counter() - t0
    counts = dict(torch._dynamo.utils.counters["moe_compiler"])
    n_fused = sum(v for k, v in counts.items() if k.startswith("fused_experts"))
    n_routers = sum(v for k, v in counts.items() if k.startswith("fused_router"))
    print(f"fused {n_fused} of {n_experts_modules} MoE layers ({n_routers} routers too); counters: {counts}")
    print(f"compile time (first call): fused_moe {t_compile_fused:.1f} s, torch.compile (inductor) "
          f"{t_compile_inductor:.1f} s")
    for name, logits in (("fused_moe", out), ("torch.compile (inductor)", out_inductor)):
        rel = float((logits - ref).norm() / ref.norm())
        top1 = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"logits vs eager, {name}: max abs diff {float((logits - ref).abs().max()):.3e}, "
              f"relative error {rel:.3e}, top-1 agreement {top1:.1%}")

    with torch.no_grad():
        t_eager = _time(lambda: model(input_ids=ids), args.iters, args.device)
        t_inductor = _time(lambda: inductor(input_ids=ids), args.iters, args.device)
        t_fused = _time(lambda: fused(input_ids=ids), args.iters, args.device)
    print(f"forward, {args.batch}x{args.seq} tokens (median of {args.iters}): eager {t_eager * 1e3:.2f} ms | "
          f"torch.compile (inductor) {t_inductor * 1e3:.2f} ms | fused_moe {t_fused * 1e3:.2f} ms")
    print(f"speed-up of fused_moe (time of the other / time of fused_moe; above 1: fused_moe is faster): "
          f"{t_eager / t_fused:.2f}x vs eager, {t_inductor / t_fused:.2f}x vs torch.compile (inductor)")
