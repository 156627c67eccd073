"""Probe: how the build time of Inductor's C++ host code (cpp_wrapper) grows with a model's depth, at -O3 and -O1.
Runs on a CPU; NOTES.md "session 13".

    python -m benchmarks.probes.probe_cpp_build [--layers 4 16 48] [--builds apart together]

Why a CPU proxy: the backend builds a CUDA decode graph's host code in C++ (backend.cpp_wrapper_skip_reason), one
function with a few lines per buffer and per launch, so its file grows with the layers. torch 2.11 builds it -O3
unless the kernels are built apart (`cpp_wrapper_build_separate`: then -O1; torch 2.12+ build GPU graphs -O1
anyway), and what -O3 costs on a long function is the question. A CPU graph's C++ host code is the same kind of
function (its kernels are C++ too, which "apart" moves to their own -O3 file), and torch 2.13 on a CPU keeps -O3 for
it unless built apart — so plain Inductor with cpp_wrapper on a tiny Qwen3-MoE of L layers (T = 1) times both,
here, without a GPU. Each point compiles in a fresh process with its own Inductor cache (no reuse between points).
Printed: g++ seconds of each file the build compiles (main = the host code's file), and the first call's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BUILDS = {"apart": True, "together": False}  # -> cpp_wrapper_build_separate


def one(layers: int, apart: bool) -> dict:
    """In this process (a fresh one): compile and run the model once, timing every g++ call of the build."""
    import torch
    import torch._inductor.cpp_builder as cpp_builder

    from moe_compiler.testing.hf_models import tiny_model

    builds = []
    run = cpp_builder._run_compile_cmd

    def timed(cmd_line: str, cwd: str) -> None:
        start = time.perf_counter()
        run(cmd_line, cwd)
        name = "main" if "main.cpp" in cmd_line else "kernels" if "optimized" in cmd_line else "other"
        opt = next((w for w in cmd_line.split() if w.startswith("-O")), "?")
        builds.append((name, opt, round(time.perf_counter() - start, 1)))

    cpp_builder._run_compile_cmd = timed
    model = tiny_model("qwen3_moe", num_hidden_layers=layers)
    options = {"cpp_wrapper": True, "cpp_wrapper_build_separate": apart}
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend="inductor", options=options)(input_ids=torch.randint(0, 128, (1, 1)))
    return {"layers": layers, "apart": apart, "first_call_s": round(time.perf_counter() - start, 1), "g++": builds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--builds", nargs="+", choices=list(BUILDS), default=list(BUILDS))
    ap.add_argument("--one", nargs=2, metavar=("LAYERS", "BUILD"), help=argparse.SUPPRESS)  # a worker process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), BUILDS[args.one[1]])))
        return
    print(f"{'layers':>6} {'build':>9} {'first call s':>12}  g++ s per file (main: the host code)")
    for layers in args.layers:
        for build in args.builds:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, "-m", "benchmarks.probes.probe_cpp_build", "--one", str(layers),
                                      build], env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            files = ", ".join(f"{name} {opt} {s}" for name, opt, s in r["g++"] if name != "other")
            print(f"{layers:>6} {build:>9} {r['first_call_s']:>12}  {files}", flush=True)


if __name__ == "__main__":
    main()
