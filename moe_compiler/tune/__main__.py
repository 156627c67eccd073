"""Tune the Triton experts kernels on this GPU and write moe_compiler/lowering/configs/<gpu>.json.

    python -m moe_compiler.tune                                  # the three benchmark shapes, bf16
    python -m moe_compiler.tune --shape 128,8,2048,768 --dtype bfloat16 --tokens 1 16 128
    python -m moe_compiler.tune --merge                          # keep other shapes' entries in the file
    python -m moe_compiler.tune --refine --tokens 1024 16384     # raster / grid / warp spec of existing entries
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

from moe_compiler.lowering import triton_config

from . import search
from .shapes import ALL_SHAPES, SHAPES, TOKENS
from .timing import Timer

COMMAND = "python -m moe_compiler.tune"


def parse_args():
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__, epilog=search.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = list(SHAPES)  # the default; --shapes takes any of ALL_SHAPES
    p.add_argument("--shapes", nargs="*", default=names,
                   help=f"names from {list(ALL_SHAPES)} (default {names}; none: only --shape)")
    p.add_argument("--shape", action="append", default=[], help="E,k,H,I (repeatable): extra shapes")
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                   help="processes compiling the candidates")
    p.add_argument("--out", help="config file (default: moe_compiler/lowering/configs/<gpu>.json)")
    p.add_argument("--merge", action="store_true", help="keep the file's entries of other shapes / dtypes / T")
    p.add_argument("--log", default=None, help="jsonl of every option timed (default: <out>.log.jsonl)")
    p.add_argument("--refine", action="store_true",
                   help="only re-tune raster / persistent grid / warp specialization of existing sorted entries")
    return p.parse_args()


def write(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{COMMAND}: needs a CUDA GPU (it times the Triton kernels on the GPU it tunes for)")
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    out_path = args.out or str(triton_config.gpu_file(gpu))
    unknown = sorted(set(args.shapes) - set(ALL_SHAPES))
    if unknown:
        raise SystemExit(f"{COMMAND}: unknown shape names {unknown}; expected names from {list(ALL_SHAPES)}")
    shapes = [ALL_SHAPES[n] for n in args.shapes] + [tuple(int(v) for v in s.split(",")) for s in args.shape]
    command = f"{COMMAND} {' '.join(sys.argv[1:])}".strip()
    timer = Timer("cuda")
    if args.refine:
        data = json.load(open(out_path))
        search.refine(data["entries"], dtype, set(shapes), args.tokens, timer)
        data["refined_by"] = command
        write(out_path, data)
        print(f"wrote {out_path}")
        return
    entries = []
    if args.merge and os.path.exists(out_path):
        keys = {(args.dtype, *s, T) for s in shapes for T in args.tokens}  # only the points re-tuned now
        entries = [e for e in json.load(open(out_path))["entries"]
                   if (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"]) not in keys]
    with open(args.log or out_path + ".log.jsonl", "a") as log:
        tuned, table = search.tune(shapes, args.tokens, dtype, timer, args.workers, log)
    data = {
        "schema": triton_config.SCHEMA,
        "gpu": gpu,
        "capability": list(torch.cuda.get_device_capability()),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "written_by": command,
        "entries": sorted(entries + tuned, key=lambda e: (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"])),
    }
    write(out_path, data)
    print(f"wrote {out_path} ({len(data['entries'])} entries)")
    print(f"{'shape':>22} {'T':>6} {'tuned us':>10} {'default us':>11}  config")
    for shape, T, tb, td, cfg in table:
        block_m = getattr(cfg, "block_m", "")
        print(f"{str(shape):>22} {T:>6} {tb * 1e6:>10.1f} {td * 1e6:>11.1f}  {cfg.path.value} {block_m}")


if __name__ == "__main__":
    main()
