"""Does every Triton kernel a quantized experts call launches compile for sm90 with the GPU machine's Triton, and
at what registers and shared memory — without a GPU. For a session with no device time: a kernel changed here
and interpreter-tested is compiled as the device would compile it (its launcher's specializations, TMA
descriptors included), so a Triton-version or sm90-only failure shows before a device minute is spent.

    pip install --no-deps --target /tmp/t36 triton==3.6.0      # the H200 machine's Triton
    PYTHONPATH=/tmp/t36:. python -m benchmarks.probes.probe_compile --format int4 --shapes kimi_k2 --tokens 1 16
    PYTHONPATH=/tmp/t36:. python -m benchmarks.probes.probe_compile --format fp8 --tokens 4096 --tma

The call runs on CPU tensors, each launch compiled and never run (moe_compiler.testing.sm90, the device taken to
be an H200: TMA, FP8 tensor cores). Weights are uninitialized tensors of the shape's real H and I with few experts
(strides are what compile).
Prints per kernel: compiled or the error, registers per thread, spill stores, shared memory.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import triton

import moe_compiler  # noqa: F401 - registers the ops
from moe_compiler.lowering import triton_quantized, triton_quantized_config
from moe_compiler.lowering.triton_quantized_config import ActQuant
from moe_compiler.spec import QuantizedExpertsSpec
from moe_compiler.testing.sm90 import compiled_not_run
from moe_compiler.tune.shapes import ALL_SHAPES

from ..bench_quantized import GROUP


def quantized_call(fmt: str, T: int, E: int, k: int, H: int, I: int):
    """(args, spec) of an experts_quantized call with uninitialized weights in the format's real layout."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    wts = torch.rand(T, k, generator=gen).to(torch.bfloat16)
    if fmt == "int4":
        spec = QuantizedExpertsSpec(weight_format="int4_packed", scale_block_n=1, scale_block_k=GROUP)
        w1, w2 = torch.empty(E, 2 * I, H // 8, dtype=torch.int32), torch.empty(E, H, I // 8, dtype=torch.int32)
        s1 = torch.ones(E, 2 * I, H // GROUP, dtype=torch.bfloat16)
        s2 = torch.ones(E, H, I // GROUP, dtype=torch.bfloat16)
    else:
        spec = QuantizedExpertsSpec()
        w1 = torch.empty(E, 2 * I, H, dtype=torch.float8_e4m3fn)
        w2 = torch.empty(E, H, I, dtype=torch.float8_e4m3fn)
        s1 = torch.ones(E, -(-2 * I // 128), -(-H // 128))
        s2 = torch.ones(E, -(-H // 128), -(-I // 128))
    return (x, ids, wts, w1, s1, w2, s2), spec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["fp8", "int4"], default="fp8")
    ap.add_argument("--shapes", nargs="+", default=["deepseek_v3"], choices=sorted(ALL_SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 4096])
    ap.add_argument("--experts", type=int, default=16, help="experts built (their number only sets a stride; the "
                    "default config sees the shape's own E)")
    ap.add_argument("--tma", action="store_true", help="FP8 sorted points: also the TMA / warp-specialized forms")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm90", flush=True)
    failed = 0
    for name in args.shapes:
        E_real, k, H, I = ALL_SHAPES[name]
        E = max(args.experts, k)
        for T in args.tokens:
            qargs, spec = quantized_call(args.format, T, E, k, H, I)
            with compiled_not_run(h200=True):  # an H200's defaults (FP8 tensor cores), rows per expert of the real E
                base = triton_quantized_config.default_config(qargs[0], E_real, k, spec, I=I)
            configs = {"default": base}
            if args.tma and base.act is ActQuant.ROWS and not base.decode:  # the TMA forms' only act
                ws = replace(base, tma=True, warp_specialize=True, fused_act=False)  # (fused: see QuantizedConfig)
                configs |= {"tma": replace(base, tma=True), "tma+ws": ws,
                            "tma+ws persistent": replace(ws, programs_per_sm=1)}
            for label, config in configs.items():
                with compiled_not_run(resources=True, record_errors=True, h200=True) as rows:
                    triton_quantized.experts_forward(*qargs, spec, config)
                print(f"{name} T={T} {args.format} {label}: {config}", flush=True)
                for r in rows:
                    failed += "error" in r
                    detail = r.get("error") or (f"{r['registers']} registers, {r['stack']} B stack, "
                                                f"{r['shared'] / 1024:.1f} KB shared, {r['warps']} warps")
                    print(f"    {r['kernel']:<32} {detail}", flush=True)
    print(f"{failed} launch(es) failed to compile")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
