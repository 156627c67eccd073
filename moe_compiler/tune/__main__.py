"""Tune the Triton experts kernels on this GPU and write moe_compiler/lowering/configs/<gpu>.json.

    python -m moe_compiler.tune                                  # the three benchmark shapes, bf16
    python -m moe_compiler.tune --shape 128,8,2048,768 --dtype bfloat16 --tokens 1 16 128
    python -m moe_compiler.tune --merge                          # keep other shapes' entries in the file
    python -m moe_compiler.tune --refine --tokens 1024 16384     # raster / grid / warp spec / folded tails of
                                                                 # existing entries
    python -m moe_compiler.tune --quick 30 --shapes kimi_k2 olmoe --merge   # the pruned search of autotune on
                                                                 # first use (tune/first_use.py), 30 s per point
    python -m moe_compiler.tune --bands --shapes deepseek_v3 --merge        # the config of each band's graph
                                                                 # (prompts of varying length; tune/bands.py)
    python -m moe_compiler.tune --backward --shapes qwen3_235b_a22b --tokens 4096 --merge   # the training
                                                                 # backward's GEMMs (tune/backward.py)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
import triton

from moe_compiler.lowering import triton_config

from . import backward, bands, first_use, search
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
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help=f"default: {TOKENS}; with --bands, the lengths timed: {list(bands.LENGTHS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                   help="processes compiling the candidates")
    p.add_argument("--out", help="config file (default: moe_compiler/lowering/configs/<gpu>.json)")
    p.add_argument("--merge", action="store_true", help="keep the file's entries of other shapes / dtypes / T")
    p.add_argument("--log", default=None, help="jsonl of every option timed (default: <out>.log.jsonl)")
    p.add_argument("--quick", type=float, nargs="?", const=first_use.BUDGET_S, metavar="SECONDS",
                   help="the pruned search of autotune on first use instead of the full one, SECONDS per point "
                        f"(default {first_use.BUDGET_S:.0f})")
    p.add_argument("--cutlass", action="store_true",
                   help="build / load csrc/'s CUTLASS kernels first (minutes the first time) so that their configs "
                        "are candidates of the quick search too (the full search times them wherever they run)")
    p.add_argument("--refine", action="store_true",
                   help="only re-tune raster / persistent grid / warp specialization / folded tails of existing sorted "
                        "entries")
    p.add_argument("--bands", action="store_true",
                   help="only choose, among the file's entries, the config of each band's graph (tune/bands.py)")
    p.add_argument("--backward", action="store_true",
                   help="only time the training backward's dA / dx GEMMs and its weight gradients, torch's against "
                        "csrc/'s CUTLASS configs, and write the file's backward entries (tune/backward.py; builds the "
                        "CUTLASS kernels)")
    args = p.parse_args()
    if args.tokens is None:
        args.tokens = list(bands.LENGTHS if args.bands else TOKENS)
    return args


def refined_by(data: dict) -> list[str]:
    """The file's --refine commands, oldest first (a single string in files written before it was a list)."""
    commands = data.get("refined_by", [])
    return [commands] if isinstance(commands, str) else commands


def write(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def quick(shapes, tokens, dtype, gpu, budget_s):
    """(entries, table) as search.tune returns them, from first_use's pruned search of each point."""
    dname = str(dtype).removeprefix("torch.")
    capability = torch.cuda.get_device_capability()
    entries, table = [], []
    for E, k, H, I in shapes:
        for T in tokens:
            found = first_use.tune_point(gpu, capability, dtype, E, k, H, I, T, budget_s=budget_s)
            if found is None:
                print(f"  E={E} k={k} H={H} I={I} T={T}: no correct candidate fits; not written", flush=True)
                continue
            cfg, best_s, default_s = found
            entries.append({"dtype": dname, "E": E, "k": k, "H": H, "I": I, "T": T,
                            "config": triton_config.to_dict(cfg), "us": round(best_s * 1e6, 2)})
            table.append(((E, k, H, I), T, best_s, default_s, cfg))
            print(f"  E={E} k={k} H={H} I={I} T={T:>6}: {best_s * 1e6:9.1f} us, default {default_s * 1e6:9.1f} us  "
                  f"{cfg}", flush=True)
            torch.cuda.empty_cache()
    return entries, table


def write_bands(out_path: str, args, dtype, timer, command: str) -> None:
    """--bands: measure the named shapes' bands (bands.measure) and write their band entries into the file, in
    place of the ones it had for those shapes and bands (--merge keeps the others; without it they are dropped)."""
    if not os.path.exists(out_path):
        raise SystemExit(f"{COMMAND} --bands: no table at {out_path} to choose from; tune the shapes first")
    if args.shape:
        raise SystemExit(f"{COMMAND} --bands: takes named shapes only (--shapes of {list(ALL_SHAPES)}), got --shape "
                         f"{args.shape}")
    data = json.load(open(out_path))
    entries = triton_config.load_file(pathlib.Path(out_path))
    written, table = bands.measure(args.shapes, args.tokens, dtype, timer, entries, command)
    measured = {(args.dtype, *ALL_SHAPES[n], tuple(b)) for n in args.shapes for b in bands.lengths_by_band(args.tokens)}
    kept = [b for b in data.get("bands", []) if args.merge
            and (b["dtype"], b["E"], b["k"], b["H"], b["I"], tuple(b["band"])) not in measured]
    data["bands"] = sorted(kept + written, key=lambda b: (b["dtype"], b["E"], b["k"], b["H"], b["I"], b["band"][0]))
    write(out_path, data)
    print(f"wrote {out_path} ({len(data['bands'])} band entries)")
    print(f"{'shape':>16} {'band':>12} {'T':>6} | us of each candidate (today's marked *)")
    for name, band, T, us, today in table:
        cells = "  ".join(f"{label}{'*' if label == today else ''} {t:9.1f}" for label, t in us.items())
        print(f"{name:>16} {str(band):>12} {T:>6} | {cells}")


def write_backward(out_path: str, args, shapes, dtype, gpu: str, command: str) -> None:
    """--backward: the backward entries of these shapes and lengths (tune/backward.py) into the file, in place of
    the ones it had at those points (--merge keeps its others; without it they are dropped). The forward's entries
    stay as they are; a file that does not exist yet gets none."""
    from moe_compiler.lowering import cutlass

    if dtype != torch.bfloat16:
        raise SystemExit(f"{COMMAND} --backward: the library backward whose GEMMs this times runs in bfloat16 only "
                         f"(torch's grouped GEMM), got --dtype {args.dtype}")
    cutlass.load()
    if os.path.exists(out_path):
        data = json.load(open(out_path))
    else:
        data = {"schema": triton_config.SCHEMA, "gpu": gpu, "capability": list(torch.cuda.get_device_capability()),
                "triton": triton.__version__, "torch": torch.__version__, "written_by": command, "entries": []}
    new = backward.tune(shapes, args.tokens, dtype)
    data["backward"] = backward.merged(data.get("backward", []) if args.merge else [], new)
    data["backward_by"] = (data.get("backward_by", []) if args.merge else []) + [command]
    write(out_path, data)
    print(f"wrote {out_path} ({len(data['backward'])} backward entries)")


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{COMMAND}: needs a CUDA GPU (it times the Triton kernels on the GPU it tunes for)")
    dtype = getattr(torch, args.dtype)
    if args.cutlass:
        from moe_compiler.lowering import cutlass

        cutlass.load()
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
        # Every refine's command: a later refine of other entries must not lose where these came from.
        data["refined_by"] = refined_by(data) + [command]
        write(out_path, data)
        print(f"wrote {out_path}")
        return
    if args.bands:
        write_bands(out_path, args, dtype, timer, command)
        return
    if args.backward:
        write_backward(out_path, args, shapes, dtype, gpu, command)
        return
    entries, earlier, kept_bands, refined, kept_backward = [], [], [], [], {}
    if args.merge and os.path.exists(out_path):
        keys = {(args.dtype, *s, T) for s in shapes for T in args.tokens}  # only the points re-tuned now
        old = json.load(open(out_path))
        entries = [e for e in old["entries"] if (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"]) not in keys]
        # The commands whose entries the file keeps: a merge must not lose where the rest came from.
        earlier = [c for c in old.get("earlier", []) + [old.get("written_by")] if c]
        refined = refined_by(old)
        # A band entry was chosen among its shape's entries: re-tuning the shape drops it (tune --bands again).
        retuned = {(args.dtype, *s) for s in shapes}
        kept_bands = [b for b in old.get("bands", []) if (b["dtype"], b["E"], b["k"], b["H"], b["I"]) not in retuned]
        # The backward's entries do not depend on the forward's configs.
        kept_backward = {key: old[key] for key in ("backward", "backward_by") if key in old}
    if args.quick is not None:
        tuned, table = quick(shapes, args.tokens, dtype, gpu, args.quick)
    else:
        with open(args.log or out_path + ".log.jsonl", "a") as log:
            tuned, table = search.tune(shapes, args.tokens, dtype, timer, args.workers, log)
    data = {
        "schema": triton_config.SCHEMA,
        "gpu": gpu,
        "capability": list(torch.cuda.get_device_capability()),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "written_by": command,
        **({"earlier": list(dict.fromkeys(earlier))} if earlier else {}),
        **({"refined_by": refined} if refined else {}),
        "entries": sorted(entries + tuned, key=lambda e: (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"])),
        **({"bands": kept_bands} if kept_bands else {}),
        **kept_backward,
    }
    write(out_path, data)
    print(f"wrote {out_path} ({len(data['entries'])} entries)")
    print(f"{'shape':>22} {'T':>6} {'tuned us':>10} {'default us':>11}  config")
    for shape, T, tb, td, cfg in table:
        block_m = getattr(cfg, "block_m", "")
        print(f"{str(shape):>22} {T:>6} {tb * 1e6:>10.1f} {td * 1e6:>11.1f}  {cfg.path.value} {block_m}")


if __name__ == "__main__":
    main()
