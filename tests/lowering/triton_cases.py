"""Shared cases of the Triton kernel tests: device, dtypes with tolerances, specs, and input builders."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import torch

from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout
from moe_compiler.testing import experts_inputs, spec_id  # noqa: F401 - the cases' test ids

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, rel tol vs fp64). bf16 stores are unreliable in the CPU interpreter: bf16 runs on the GPU only.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)] + ([(torch.bfloat16, 1e-2)] if DEVICE == "cuda" else [])

SPECS = [
    ExpertsSpec(),  # SwiGLU, concat (Qwen / Mixtral / DeepSeek)
    ExpertsSpec(Activation.GELU, GateUpLayout.INTERLEAVED),
    ExpertsSpec(Activation.GELU_TANH),
    ExpertsSpec(Activation.RELU, GateUpLayout.INTERLEAVED),
    # GPT-OSS: [E, H, 2I] weights, interleaved, biases, clamps; a low limit so the clamps bite.
    ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True, swiglu_limit=1.0),
    # DeepSeek-V4: the same clamps around plain SwiGLU; [E, 2I, H], concat
    ExpertsSpec(Activation.SILU_CLAMPED, swiglu_limit=1.0),
    # Llama-4: [E, H, 2I] weights, the router weight scales the expert input (f(w x), not w f(x)).
    ExpertsSpec(transposed=True, scale_input=True),
]


def device_inputs(T, H, I, E, k, dtype, spec, seed=0):
    """(cpu inputs for the reference, the same on DEVICE); GPT-OSS-like specs get biases."""
    inputs = experts_inputs(T, H, I, E, k, dtype, spec, bias=spec.transposed, seed=seed)
    return inputs, [t.to(DEVICE) if t is not None else None for t in inputs]


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / Tensor.new_empty return poisoned memory (NaN, or -2^30 for ints) inside the block, so
    an output element no kernel wrote, or a padding slot a kernel read, shows in the results."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype in (torch.int32, torch.int64):
            return t.fill_(-(2**30))
        return t.fill_(True) if t.dtype == torch.bool else t.fill_(torch.iinfo(t.dtype).max)  # uint8: e8m0 scales

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: poison(real_new_empty(self, *a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.Tensor.new_empty = real_empty, real_new_empty


def fails_with_ids_assert(body: str):
    """Run `body` (python, after `import torch`) in a fresh process and check that it dies of the kernels'
    topk_ids assert: a device-side assert leaves the CUDA context of its process unusable, so never here."""
    code = "import torch\n" + textwrap.dedent(body) + "\ntorch.cuda.synchronize()"
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "topk_ids out of [0, E]" in proc.stderr, proc.stderr[-2000:]
