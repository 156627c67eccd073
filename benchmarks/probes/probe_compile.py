"""Does every Triton kernel a quantized experts call launches compile for sm90 with the GPU machine's Triton, and
at what registers and shared memory — without a GPU. For a session with no device time: a kernel changed here
and interpreter-tested is compiled as the device would compile it (its launcher's specializations, TMA
descriptors included), so a Triton-version or sm90-only failure shows before a device minute is spent.

    pip install --no-deps --target /tmp/t36 triton==3.6.0      # the H200 machine's Triton
    PYTHONPATH=/tmp/t36:. python -m benchmarks.probes.probe_compile --format int4 --shapes kimi_k2 --tokens 1 16
    PYTHONPATH=/tmp/t36:. python -m benchmarks.probes.probe_compile --format fp8 --tokens 4096 --tma

The call runs on CPU tensors with `launch.kernel` intercepted: each launch is compiled (triton.compile for
GPUTarget cuda 90, the arguments specialized as Triton's launcher does: ints equal to 1 as constexprs, pointers
and multiples of 16 as divisible by 16) and never run, so the outputs are garbage and later launches read them
unchanged — only shapes, strides and dtypes matter. The device is taken to be an H200 (sm90, 132 SMs, TMA).
Weights are uninitialized tensors of the shape's real H and I with few experts (strides are what compile).
Prints per kernel: compiled or the error, registers per thread, spill stores, shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import replace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

import moe_compiler  # noqa: F401 - registers the ops
from moe_compiler.lowering import device, launch, triton_experts, triton_quantized, triton_quantized_config
from moe_compiler.lowering.triton_quantized_config import ActQuant
from moe_compiler.spec import QuantizedExpertsSpec
from moe_compiler.tune.shapes import ALL_SHAPES

from ..bench_quantized import GROUP


def compile_launch(fn, args: tuple, kwargs: dict) -> dict:
    """One launch `fn[grid](*args, **kwargs)` compiled for sm90: name, error or registers / spills / shared."""
    while not isinstance(fn, JITFunction):  # heuristics / autotuner wrappers
        fn = fn.fn
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}  # num_warps, num_stages, debug ...
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound.get(p.name, p.default if p.has_default else None)
        if p.is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1
                                           and not p.do_not_specialize):
            signature[p.name], constants[p.name] = "constexpr", v
            continue
        signature[p.name] = mangle_type(v)
        if isinstance(v, torch.Tensor) or (isinstance(v, int) and v % 16 == 0 and not p.do_not_specialize):
            attrs[(i,)] = [["tt.divisibility", 16]]
    row = {"kernel": fn.__name__}
    try:
        kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                                options=options)
    except Exception as exc:  # noqa: BLE001 - what the device would raise at its first launch
        return row | {"error": str(exc).strip().splitlines()[-1][:300]}
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(m.group(1)) if (m := re.search(r"STACK:(\d+)", usage)) else 0
    return row | {"registers": regs, "stack": spills, "shared": kernel.metadata.shared,
                  "warps": options.get("num_warps", 4)}


class _Recorder:
    def __init__(self, fn, rows: list):
        self.fn, self.rows = fn, rows

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.rows.append(compile_launch(self.fn, args, kwargs))


@contextlib.contextmanager
def compiled_not_run(rows: list):
    """Every launch.kernel(k)[grid](...) inside compiles k into `rows` instead of running; the device an H200."""
    saved = (launch.kernel, device.capability, device.num_sms, triton_experts.tma_ok, triton_quantized.tma_ok)
    launch.kernel = lambda k: _Recorder(k, rows)
    device.capability = lambda index: (9, 0)
    device.num_sms = lambda index: 132
    triton_experts.tma_ok = triton_quantized.tma_ok = lambda *tensors: True
    fp8_cores = triton_quantized_config.fp8_cores
    triton_quantized_config.fp8_cores = lambda t: True
    try:
        yield
    finally:
        launch.kernel, device.capability, device.num_sms, triton_experts.tma_ok, triton_quantized.tma_ok = saved
        triton_quantized_config.fp8_cores = fp8_cores


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
            with compiled_not_run([]):  # the defaults of an H200 (FP8 tensor cores), rows per expert of the real E
                base = triton_quantized_config.default_config(qargs[0], E_real, k, spec)
            configs = {"default": base}
            if args.tma and base.act is ActQuant.ROWS and not base.decode:  # the TMA forms' only act
                configs |= {"tma": replace(base, tma=True), "tma+ws": replace(base, tma=True, warp_specialize=True),
                            "tma+ws persistent": replace(base, tma=True, warp_specialize=True, programs_per_sm=1)}
            for label, config in configs.items():
                rows = []
                with compiled_not_run(rows):
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
