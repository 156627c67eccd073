"""Instructions per value of the quantized decode GEMVs' main loop, from SASS compiled here for sm90 — no GPU needed
(benchmarks/NOTES.md "quantized GEMVs v3": at 5-7 instructions per value these GEMVs are bound by instruction issue
before bytes).

    python -m benchmarks.probes.probe_sass --format int4 --tiles 8,512,2,3
    python -m benchmarks.probes.probe_sass --format fp8 --tiles 16,128,2,3 16,256,2,3

Each tile (block_n, block_k, warps, stages) of the gate_up GEMV at the shape's real strides (Kimi-K2 for INT4,
DeepSeek-V3 for FP8; the down GEMV's loop is the same step) is compiled by Triton's own compiler with the
launcher's specializations (ints equal to 1 as constexprs, pointers and multiples of 16 marked divisible by 16:
without them nothing is vectorized), disassembled by the nvdisasm Triton ships, and the main loop (the longest
backward branch) counted. Prints instructions per value per thread, registers per thread (occupancy), spill
stores and the most frequent opcodes; --out DIR keeps each kernel's SASS and TTGIR.

Compile with the GPU machine's Triton, not this one's: ptxas versions differ (Triton 3.9's keeps a LOP3 constant in
a register where 3.6's splits the LOP3 in two: the INT4 GEMV counted 6.12 per value with 3.9 and 7.09 with 3.6).
    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:. python -m benchmarks.probes.probe_sass --format int4 --tiles 8,256,2,3
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_compiler.lowering import triton_quantized_decode as qd
from moe_compiler.lowering.triton_config import LIVE_ASSERTS  # as launched (launch.asserts)
from moe_compiler.testing import sm90

TYPES = dict(x_ptr="*bf16", ids_ptr="*i32", s_ptr="*bf16", act_ptr="*bf16", ok_ptr="*i32", tickets_ptr="*i32",
             alpha="fp32", limit="fp32")
# gate_up GEMV's runtime arguments at a real shape (E, H = 7168, I = 2048: Kimi-K2 / DeepSeek-V3)
SHAPES = {
    "int4": dict(S=8, E=384, H=7168, I=2048, TOP_K=8, SCALE_BN=1, SCALE_BK=32, stride_xm=9 * 896,
                 stride_we=4096 * 896, stride_wn=896, stride_wk=1, stride_se=4096 * 224, stride_sn=224, stride_sk=1,
                 stride_am=9 * 256, base_bits=0x41800000, N_TICKETS=0),  # x and act as fp32 planes [9, K / 8]
    "fp8": dict(S=8, E=256, H=7168, I=2048, TOP_K=8, SCALE_BN=128, SCALE_BK=128, stride_xm=7168,
                stride_we=4096 * 7168, stride_wn=7168, stride_wk=1, stride_se=32 * 56, stride_sn=56, stride_sk=1,
                stride_am=2048, base_bits=0x41800000, N_TICKETS=0),
}


def compile_sass(fn, values: dict, constexprs: dict, types: dict, num_warps: int, num_stages: int,
                 maxnreg: int | None = None):
    """(SASS text, TTGIR text, registers per thread) of `fn` for sm90 with the launcher's specializations of
    `values`."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(fn.params):
        if p.name in constexprs or p.is_constexpr:
            signature[p.name] = "constexpr"
            constants.setdefault(p.name, values.get(p.name))
            continue
        v = values.get(p.name)
        if isinstance(v, int) and v == 1 and not p.do_not_specialize:
            signature[p.name], constants[p.name] = "constexpr", 1
            continue
        signature[p.name] = types.get(p.name, "i32")
        if signature[p.name].startswith("*") or (isinstance(v, int) and v % 16 == 0 and not p.do_not_specialize):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, **LIVE_ASSERTS,
                                         **({"maxnreg": maxnreg} if maxnreg else {})))
    return sm90.sass(kernel), kernel.asm["ttgir"], sm90.resources(kernel)["registers"]


def main_loop_ops(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop body: from a label to the last branch back to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    start, end = max(spans, key=lambda s: s[1] - s[0])
    ops = collections.Counter()
    for line in lines[start:end + 1]:
        if m := re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", line):
            ops[m.group(1)] += 1
    return ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=list(SHAPES), default="int4")
    ap.add_argument("--tiles", nargs="+", default=["8,512,2,3"], help="block_n,block_k,warps,stages")
    ap.add_argument("--out", help="directory for each kernel's .sass and .ttgir")
    ap.add_argument("--per-value-scales", action="store_true",
                    help="FP8: scale each weight value (as before ROW_SCALE) instead of the step's inputs")
    ap.add_argument("--maxnreg", type=int, help="cap registers per thread (Triton's maxnreg): occupancy vs spills")
    args = ap.parse_args()
    int4 = args.format == "int4"
    types = {**TYPES, "w_ptr": "*i32" if int4 else "*fp8e4nv", "s_ptr": "*bf16" if int4 else "*fp32"}
    if int4:
        types.update(x_ptr="*fp32", act_ptr="*fp32")
    for tile in args.tiles:
        bn, bk, warps, stages = (int(v) for v in tile.split(","))
        constexprs = dict(ACT=0, EVEN_K=True, INT4=int4, E8M0=False, BLOCK_N=bn, BLOCK_K=bk,
                          BLOCK_KW=bk // 8 if int4 else bk, BLOCK_S=128, NUM_STAGES=stages,
                          K_GROUPS=1 if int4 else max(1, bk // 128), PLANES=int4, TILE3D=False, ROUND=1,
                          ZERO_TICKETS=False, ROW_SCALE=not int4 and not args.per_value_scales,
                          GROUP_W=qd.group_words(SHAPES[args.format]["SCALE_BK"], bk) if int4 else 1)
        sass, ttgir, regs = compile_sass(qd._gate_up_q_gemv_kernel, SHAPES[args.format], constexprs, types, warps,
                                         stages, args.maxnreg)
        ops = main_loop_ops(sass)
        per_thread = 2 * bn * bk // (warps * 32)  # gate and up tiles
        name = f"{args.format}_{'planes' if int4 else 'fma'}_n{bn}_k{bk}_w{warps}_s{stages}"
        print(f"{name}: {sum(ops.values())} instructions per iteration for {per_thread} values per thread = "
              f"{sum(ops.values()) / per_thread:.2f} per value, {regs} registers, {sass.count('STL')} spill stores; "
              f"{ops.most_common(10)}", flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            for ext, text in (("sass", sass), ("ttgir", ttgir)):
                with open(os.path.join(args.out, f"{name}.{ext}"), "w") as f:
                    f.write(text)


if __name__ == "__main__":
    main()
