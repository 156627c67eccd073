"""Every Triton kernel the forwards and the backward launch compiles for Hopper (sm90), checked without a GPU.

The interpreter runs the kernels' semantics on CPU but never compiles them, and it skips bf16; a kernel change
that the GPU compiler rejects would otherwise show only on the GPU. Here each launch is compiled for an sm90
target from its real arguments and never run (moe_compiler.testing.sm90). Run in a fresh process: the
interpreter setting of the suite's conftest would otherwise have replaced every kernel with its interpreted twin
at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

PRELUDE = """
import dataclasses
import torch
from moe_compiler.lowering import (triton_act, triton_backward, triton_decode, triton_experts, triton_grouped,
                                   triton_route)
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig, SortedConfig
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout, RouteOrder, RouterSpec, Scoring, SharedMLP
from moe_compiler.testing import experts_inputs
from moe_compiler.testing.sm90 import compiled_not_run

SM90 = compiled_not_run()
compiled = SM90.__enter__()  # for the whole process (SM90 held: its exit would restore the launches)

DECODE = DecodeConfig(KernelConfig(16, 64), KernelConfig(16, 64))
SORTED = SortedConfig(block_m=64, gate_up=KernelConfig(64, 64), down=KernelConfig(128, 64))
SPECS = [
    ExpertsSpec(),
    ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True),
    ExpertsSpec(Activation.GELU, transposed=True, scale_input=True),
]


class LibraryGEMMs:  # triton_grouped's GEMMs are not Triton kernels: shapes only
    mm = staticmethod(lambda x, w, seg: x.new_empty(x.shape[0], w.shape[1]))
    mm_nn = staticmethod(lambda x, w, seg: x.new_empty(x.shape[0], w.shape[2]))


"""

FORWARD_KERNELS = ("_gate_up_gemv_kernel", "_down_gemv_combine_kernel", "_align_one_chunk_kernel", "_count_kernel",
                   "_offsets_kernel", "_scatter_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel",
                   "_gated_rows_kernel", "_act_kernel", "_sorted_rows_kernel")
BACKWARD_KERNELS = ("_dz_kernel", "_wgrad_kernel", "_act_backward_rows_kernel", "_sorted_rows_kernel")
OTHER_KERNELS = ("_route_kernel", "_sparsemixer_kernel", "_route_backward_kernel", "_gate_up_q_kernel",
                 "_down_q_kernel", "_linear_fp8_kernel", "_gate_up_q_gemv_kernel", "_down_q_gemv_kernel",
                 "_x_planes_kernel", "_quantize_rows_kernel", "_sorted_rows_kernel",
                 "_act_rows_kernel")
SUMMARY = 'print("COMPILED", len(compiled), sorted({r["kernel"] for r in compiled}))'
# Three parts, each in its own process (so that the suite's workers share them), with the kernels each compiles.
PARTS = {
    "forward": ("""
for dtype in (torch.bfloat16, torch.float32):
    for spec in SPECS:
        bias = spec.activation is Activation.GPT_OSS_SWIGLU
        h, ids, w, w1, w2, b1, b2 = experts_inputs(5, 64, 32, 8, 2, dtype, spec, bias=bias, seed=0)
        triton_decode.experts_forward(h, ids, w, w1, w2, b1, b2, spec, DECODE)
        triton_experts.experts_forward(h, ids, w, w1, w2, b1, b2, spec, SORTED)
        triton_grouped.experts_forward(LibraryGEMMs, h, ids, w, w1, w2, b1, b2, spec)
    mlp = SharedMLP(*(t.to(dtype) for t in (torch.randn(32, 64), torch.randn(32, 64), torch.randn(64, 32),
                                            torch.randn(1, 64))))
    triton_decode.experts_forward(h, ids, w, w1, w2, None, None, ExpertsSpec(), DECODE, mlp)
    triton_act.gated_rows(torch.randn(4, 32, dtype=dtype), torch.randn(4, 32, dtype=dtype), ExpertsSpec())
# The sorted GEMMs' TMA, descriptors built by the host (an eager call) and by each program (a recorded call,
# launch.recorded_tma()); CPU tensors stand in for aligned CUDA ones
triton_experts.tma_ok = lambda *t: True
TMA = dataclasses.replace(SORTED, tma=True)
for mode in (triton_experts.TMA_HOST, triton_experts.TMA_DEVICE):
    triton_experts.tma_mode = lambda config, spec, *t, m=mode: m
    for dtype in (torch.bfloat16, torch.float32):
        for spec in (ExpertsSpec(), ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED)):
            h, ids, w, w1, w2, b1, b2 = experts_inputs(5, 64, 32, 8, 2, dtype, spec, seed=0)
            triton_experts.experts_forward(h, ids, w, w1, w2, b1, b2, spec, TMA)
# folded tails (KernelConfig.tail_m: the second row operand of the gate_up and down tiles), bf16, by TMA (host- and
# device-built descriptors) and by pointers
h, ids, w, w1, w2, b1, b2 = experts_inputs(5, 64, 32, 8, 2, torch.bfloat16, ExpertsSpec(), seed=0)
FOLDED = dataclasses.replace(TMA, gate_up=dataclasses.replace(TMA.gate_up, tail_m=32),
                             down=dataclasses.replace(TMA.down, tail_m=32))
for mode in (triton_experts.TMA_HOST, triton_experts.TMA_DEVICE, triton_experts.TMA_OFF):
    triton_experts.tma_mode = lambda config, spec, *t, m=mode: m
    triton_experts.experts_forward(h, ids, w, w1, w2, b1, b2, ExpertsSpec(), FOLDED)
# More pairs than one chunk: the three-launch alignment (the calls above fit one chunk: one launch)
from moe_compiler.lowering import triton_align
triton_align.align_rows(torch.zeros(700, 2, dtype=torch.long), 8, 16)
""", FORWARD_KERNELS),
    "backward": ("""
# The backward reads the alignment's positions on the host side (a gather of the router-weight partials):
# nothing ran, so they are made valid.
real_align = triton_backward.align_rows
triton_backward.align_rows = lambda *a, **kw: (lambda r: (r.pos.zero_(), r)[1])(real_align(*a, **kw))
BACKWARD = triton_backward.BackwardConfig(rows=SORTED, dz=KernelConfig(64, 64), wgrad_m=64, wgrad=KernelConfig(64, 32))
for dtype in (torch.bfloat16, torch.float32):
    for spec in SPECS[:2]:
        bias = spec.activation is Activation.GPT_OSS_SWIGLU
        h, ids, w, w1, w2, b1, b2 = experts_inputs(5, 64, 32, 8, 2, dtype, spec, bias=bias, seed=0)
        triton_backward.experts_backward(torch.randn(5, 64, dtype=dtype), h, ids, w, w1, w2, b1, b2, spec, BACKWARD)
# The library weight gradients: torch's grouped GEMM is not Triton (shapes only; the offsets were never computed).
torch._grouped_mm = lambda a, b, offs=None: (a.new_empty(offs.numel(), a.shape[0], b.shape[1]) if b.dim() == 2
                                             else a.new_empty(a.shape[0], b.shape[-1]))
LIBRARY = dataclasses.replace(BACKWARD, wgrad_path=triton_backward.WGrad.GROUPED_MM)
for config in (LIBRARY, dataclasses.replace(LIBRARY, dgrad_path=triton_backward.DGrad.GROUPED_MM)):
    for spec in SPECS[:2]:
        bias = spec.activation is Activation.GPT_OSS_SWIGLU
        h, ids, w, w1, w2, b1, b2 = experts_inputs(5, 64, 32, 8, 2, torch.bfloat16, spec, bias=bias, seed=0)
        triton_backward.experts_backward(torch.randn(5, 64, dtype=torch.bfloat16), h, ids, w, w1, w2, b1, b2, spec,
                                         config)
""", BACKWARD_KERNELS),
    "route_and_quantized": ("""
for spec in (RouterSpec(top_k=2), RouterSpec(top_k=4, scoring=Scoring.SIGMOID, n_group=4, topk_group=2),
             RouterSpec(top_k=2, order=RouteOrder.SPARSEMIXER, jitter_eps=0.01)):
    for dtype in (torch.bfloat16, torch.float32):
        bias = torch.randn(16) if spec.scoring is Scoring.SIGMOID else None
        triton_route.route_forward(torch.randn(6, 16, dtype=dtype), bias, spec)
for spec in (RouterSpec(top_k=2), RouterSpec(top_k=4, scoring=Scoring.SIGMOID, norm_topk_prob=True),
             RouterSpec(top_k=2, order=RouteOrder.TOPK_THEN_SCORE)):
    for dtype in (torch.bfloat16, torch.float32):
        ids = torch.zeros(6, spec.top_k, dtype=torch.long)
        triton_route.route_backward(torch.randn(6, spec.top_k), torch.randn(6, 16, dtype=dtype), ids, spec)
# Quantized experts: FP8 w8a16 / w8a8 tile / w8a8 rows (fp32 and e8m0 scales), INT4 (bf16 group scales), the FP8 linear.
from moe_compiler.lowering import triton_linear_fp8, triton_quantized
from moe_compiler.lowering.triton_quantized_config import QuantizedConfig
from moe_compiler.spec import QuantizedExpertsSpec
from moe_compiler.testing.quantized import quantized_experts_inputs
for dtype in (torch.bfloat16, torch.float16):
    for scale_dtype in (torch.float32, torch.float8_e8m0fnu):
        args, _ = quantized_experts_inputs(5, 256, 128, 8, 2, dtype, 128, 128, scale_dtype)
        for act in ("w8a16", "w8a8_tile", "w8a8_rows"):
            for fused_act in (True, False):
                config = QuantizedConfig(block_m=64, block_n=128, block_k=128, act=act, fused_act=fused_act)
                triton_quantized.experts_forward(*args, QuantizedExpertsSpec(), config)
        # w8a8_rows by TMA (x quantized into sorted order) on a persistent grid, unfused warp-specialized and not
        triton_quantized.tma_ok = lambda *t: True  # CPU tensors stand in for CUDA ones: compiled, never run
        # and the gate_up's A gathered per token (sorted_copy=False)
        for fused_act, ws, copy in ((True, False, True), (False, True, True), (False, False, True),
                                    (False, False, False)):  # (fused + ws: rejected)
            config = QuantizedConfig(block_m=64, block_n=128, block_k=128, act="w8a8_rows", fused_act=fused_act,
                                     tma=True, warp_specialize=ws, programs_per_sm=1, sorted_copy=copy)
            triton_quantized.experts_forward(*args, QuantizedExpertsSpec(), config)
        triton_linear_fp8.linear_forward(args[0], args[3][0], args[4][0], None, 128, 128)
    args, _ = quantized_experts_inputs(5, 256, 128, 8, 2, dtype, 1, 32, torch.bfloat16, weight_format="int4_packed")
    spec = QuantizedExpertsSpec(weight_format="int4_packed", scale_block_n=1, scale_block_k=32)
    for planes in (False, True):  # INT4 sorted path: the reshaped tile, one dot per nibble plane
        triton_quantized.experts_forward(*args, spec, QuantizedConfig(block_m=16, block_n=64, block_k=128, act="w8a16",
                                                                      int4_planes=planes))
    for planes in (False, True):  # INT4 GEMVs: the 3-D nibble tile, the 2-D planes (down: per token, per pair)
        triton_quantized.experts_forward(*args, spec, QuantizedConfig(16, 16, 128, "w8a16", decode=True,
                                                                      int4_planes=planes, slot_split=planes))
    args, _ = quantized_experts_inputs(5, 256, 128, 8, 2, dtype, 128, 128, torch.float8_e8m0fnu)
    # FP8 GEMVs: a step in one scale block, a step over two; the down GEMV per pair, per token (the scales on the
    # inputs: 16-row tiles in 128-row scale blocks)
    for block_k, split in ((128, True), (256, False)):
        triton_quantized.experts_forward(*args, QuantizedExpertsSpec(), QuantizedConfig(
            16, 16, block_k, "w8a16", num_warps=2, decode=True, slot_split=split))
    # and scales per weight value: 8-row scale blocks under 16-row tiles
    args, _ = quantized_experts_inputs(5, 256, 128, 8, 2, dtype, 8, 128, torch.float32)
    triton_quantized.experts_forward(*args, QuantizedExpertsSpec(scale_block_n=8), QuantizedConfig(
        16, 16, 128, "w8a16", num_warps=2, decode=True))
""", OTHER_KERNELS),
}


@pytest.mark.parametrize("part", PARTS)
def test_every_launched_kernel_compiles_for_sm90(part):
    code, kernels = PARTS[part]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(code) + SUMMARY
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("COMPILED"))
    names = line.split(" ", 2)[2]
    for kernel in kernels:
        assert kernel in names, line
