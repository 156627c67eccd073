"""Triton launches compiled for Hopper (sm90) without a GPU: what tests/lowering/test_compiles_for_sm90.py and
benchmarks/probes/probe_compile.py share.

The interpreter runs the kernels' semantics on the CPU but never compiles them (and it skips bf16), so a kernel
the GPU compiler rejects would show only on a GPU. Inside `compiled_not_run()` every launch site
(lowering/launch.py's `kernel(k)[grid](...)`) compiles `k` with Triton's own compiler for an sm90 target from
the launch's real arguments — specialized as Triton's launcher does: ints equal to 1 as constexprs, pointers and
multiples of 16 as divisible by 16, host TMA descriptors as tensordesc types — and launches nothing (ptxas ships
with Triton; no driver is needed). The calls run on CPU tensors, so outputs are never written and later launches
read them as they are: only shapes, strides and dtypes matter. Run it in a process where TRITON_INTERPRET is
unset: with it, kernels are replaced by their interpreted twins at import.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator

import torch

TARGET = ("cuda", 90, 32)


def _signature(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of a launch of JITFunction `fn`, as Triton's launcher specializes."""
    from triton.runtime.jit import mangle_type

    names = [p.name for p in fn.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}  # num_warps, num_stages, debug ...
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound.get(p.name, p.default if p.has_default else None)
        if p.is_constexpr or v is None or (type(v) is int and v == 1 and not p.do_not_specialize):
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        signature[p.name] = mangle_type(v)
        if isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0 and not p.do_not_specialize):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _cubin_tool(kernel, tool: str, *flags: str) -> str:
    """The output of one of the CUDA tools Triton ships (nvdisasm, cuobjdump) on a compiled kernel's cubin."""
    import triton

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
        return subprocess.run([exe, *flags, path], capture_output=True, text=True, check=True).stdout


def sass(kernel) -> str:
    """A compiled kernel's SASS."""
    return _cubin_tool(kernel, "nvdisasm", "-c")


def resources(kernel) -> dict:
    """Registers per thread and stack bytes of a compiled kernel (cuobjdump), and its shared memory."""
    usage = _cubin_tool(kernel, "cuobjdump", "--dump-resource-usage")
    stack = re.search(r"STACK:(\d+)", usage)
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "stack": int(stack.group(1)) if stack else 0,
            "shared": kernel.metadata.shared}


class _Launches:
    def __init__(self, resources: bool, record_errors: bool):
        self.rows: list[dict] = []
        self._done: dict = {}
        self.resources, self.record_errors = resources, record_errors

    def compile(self, fn, args: tuple, kwargs: dict):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        while not isinstance(fn, JITFunction):  # heuristics / autotuner wrappers
            fn = fn.fn
        signature, constexprs, attrs, options = _signature(fn, args, kwargs)
        key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               repr(sorted(attrs)), repr(sorted(options.items())))
        if key not in self._done:  # the same specialization compiles once
            row = {"kernel": fn.__name__, "warps": options.get("num_warps", 4)}
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*TARGET),
                                        options=options)
                if self.resources:
                    row |= resources(kernel)
            except Exception as exc:
                if not self.record_errors:
                    raise
                row["error"] = str(exc).strip().splitlines()[-1][:300]
            self._done[key] = row
        self.rows.append(self._done[key])


class _Kernel:
    def __init__(self, fn, launches: _Launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.compile(self.fn, args, kwargs)


@contextlib.contextmanager
def compiled_not_run(resources: bool = False, record_errors: bool = False, h200: bool = False) -> Iterator[list[dict]]:
    """Inside, each launch.kernel(k)[grid](...) compiles k for sm90 instead of running; yields the launches' rows
    ({kernel, warps} + registers / stack / shared with `resources`; a compile error raises, or is recorded as
    row["error"] with `record_errors`). The paths taken are the CPU's where they ask the device (pointer loads,
    no FP8 tensor cores), or with `h200` an H200's: TMA, FP8 tensor cores, compute capability 9.0."""
    from ..lowering import device, launch, triton_experts, triton_quantized, triton_quantized_config

    launches = _Launches(resources, record_errors)
    patches = [(launch, "kernel", lambda k: _Kernel(k, launches)), (device, "uses_triton", lambda t: True),
               (device, "num_sms", lambda index: 132)]
    if h200:
        # (device.index: CPU tensors stand in for the GPU's, whose index the capability lookups ask for)
        patches += [(device, "capability", lambda index: (9, 0)), (device, "index", lambda t: 0),
                    (triton_experts, "tma_ok", lambda *t: True),
                    (triton_quantized, "tma_ok", lambda *t: True),
                    (triton_quantized_config, "fp8_cores", lambda t: True)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield launches.rows
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
