"""The backend's own options, typed.

Set them through `torch.compile(..., options={"moe_compiler.<field>": value, ...})` (any other option key
goes to Inductor unchanged) or through the environment variables named below.
"""

from __future__ import annotations

import dataclasses
import os

from .lowering import launch, triton_config

PREFIX = "moe_compiler."


@dataclasses.dataclass(frozen=True)
class MoECompilerConfig:
    # Rewrite MoE regions at all (False: a plain Inductor compile, still with the dump / log of what
    # would have been matched). Env: MOE_COMPILER_DISABLE=1.
    enabled: bool = True
    # Run each proven region and the op once on random inputs before rewriting (passes/verify.py).
    # It costs one layer's forward per MoE layer at compile time. Env: MOE_COMPILER_VERIFY=0 to skip.
    verify: bool = True
    # Directory for the debug dump (per compiled graph: summary, before/after code, specs, rejection
    # reasons). Env: MOE_COMPILER_DUMP_DIR.
    dump_dir: str | None = None
    # Fold a proven shared-experts branch into the experts call (its shared_* arguments); False leaves it to
    # Inductor (reported as matched). Env: MOE_COMPILER_SHARED_EXPERTS=0.
    shared_experts: bool = True
    # Tune a shape the committed tables lack the first time it runs, cache it on disk (tune/first_use.py).
    # Off: nearest tuned entry, then defaults, with a warning. Env: MOE_COMPILER_AUTOTUNE=1 / 0; on by default
    # (lowering/triton_config.AUTOTUNE_DEFAULT).
    autotune: bool = True
    # Rewrite regions whose output needs gradients (a training forward). Off by default: a whole train step
    # through the op measured only 0.99-1.05x plain torch.compile (H200, 4 layers; the op's own forward + backward
    # 1.03-1.16x), so such regions are left to Inductor and reported (issue 17). Env: MOE_COMPILER_TRAINING=1.
    training: bool = False
    # Compile the rewritten graph with Inductor. False runs it as traced (Dynamo's eager backend after the
    # rewrite): to tell a problem of ours from one of Inductor's, and for the tests of the matcher across the
    # architecture zoo, where Inductor's CPU code generation would cost most of the time. Env: MOE_COMPILER_INDUCTOR=0.
    inductor: bool = True
    # Launch the op's recorded Triton kernels (ops/inline.py) through Inductor's static C++ launcher, as Inductor
    # launches its own kernels, instead of Triton's Python launcher (torch._inductor.config.
    # static_launch_user_defined_triton_kernels; a kernel the static launcher cannot take falls back to the Python
    # one). In default mode a decode layer is host-bound: 3-8 launches of ours per layer at ~25-100 µs each on the
    # H200 machine's CPU (benchmarks/NOTES.md "session 9"). Off: measured (session 10) it made decode B=32 slower in
    # both models tried (logits equal), B=1 mixed; timed interleaved (session 12) no step moved by more than 1%.
    # Applies to Python host code only (cpp_wrapper below launches every kernel from C++).
    # Env: MOE_COMPILER_STATIC_LAUNCH=1.
    static_launch: bool = False
    # Inductor's host code in C++ (torch._inductor.config.cpp_wrapper) for a graph where the host is the cost: CUDA,
    # inference (no gradient), no CUDA graphs, no collectives, every MoE op at most CPP_WRAPPER_MAX_TOKENS tokens
    # (decode) — a step's launches then cost what cuLaunchKernel costs, not Python's launcher (H200 machine,
    # Qwen3-30B-A3B: host per MoE layer 160 -> 57 µs; decode step B=1 at 4 layers 2.51 -> 1.45 ms = 2.18x plain
    # torch.compile, at 24 layers 7.54 -> 4.37 ms = 2.45x; NOTES "session 14"). It costs compile time (a C++ build
    # per graph, torch 2.11: 10 -> 18 s at 4 layers, 35 -> 80 s at 24) and, while
    # compiling, one run of each kernel on example tensors (one layer's expert weights allocated again, freed after;
    # NOTES "session 13"). A graph whose C++ build fails is compiled with Python host code (logged). The Inductor
    # option `cpp_wrapper`, when given, decides instead. Env: MOE_COMPILER_CPP_WRAPPER=0 to keep Python host code.
    cpp_wrapper: bool = True
    # In a graph built with C++ host code (above), each route op's router linear of at most 32 rows becomes a
    # reduction Inductor fuses into one Triton kernel, casts and bias folded in, instead of one or two cuBLAS
    # launches (+ two cast kernels for DeepSeek-V3's fp32 router): passes/router_linear.py. Measured on the H200
    # (blocks alone, T = 1 / 32, same rounds): host per MoE layer 7-25 µs less (Qwen3-30B-A3B 28.2 -> 20.9 µs at
    # T = 1, GPT-OSS-20B 49.8 -> 37.5, DeepSeek-V3 93.6 -> 76.4), GPU time even or less (NOTES "router linear as
    # a reduction, measured"); tiny models' logits vs eager as with the cuBLAS linear (session 19's GPU test).
    # Env: MOE_COMPILER_ROUTER_GEMV=0 keeps the linear.
    router_gemv: bool = True
    # Keep the TMA loads of a sorted-path (prefill) call whose launches are recorded into Inductor's code, where its
    # GEMMs are long enough for TMA to pay (dispatch.INLINE_TMA_MAX_FLOP): its kernels build their TMA descriptors
    # on the device (lowering/launch.py). Off: such a call stays one opaque op to keep host descriptors, and pays
    # the op's host path (~0.5 ms a call) and the config of its concrete length rather than its band's: measured
    # (benchmarks/NOTES.md, session 27) Mixtral-8x7B 1.11x -> 1.31x plain torch.compile at 512 tokens of a dynamic
    # length, Kimi-K2 0.97x -> 1.21x at 2048. Graphs with C++ host code (decode) load by pointer either way.
    # Env: MOE_COMPILER_RECORDED_TMA=0.
    recorded_tma: bool = True

    @classmethod
    def from_options(cls, options: dict) -> MoECompilerConfig:
        env = {
            "enabled": os.environ.get("MOE_COMPILER_DISABLE", "0") != "1",
            "verify": os.environ.get("MOE_COMPILER_VERIFY", "1") != "0",
            "dump_dir": os.environ.get("MOE_COMPILER_DUMP_DIR") or None,
            "shared_experts": os.environ.get("MOE_COMPILER_SHARED_EXPERTS", "1") != "0",
            "autotune": triton_config.autotune_enabled(),  # MOE_COMPILER_AUTOTUNE, parsed where lookups read it
            "training": os.environ.get("MOE_COMPILER_TRAINING", "0") == "1",
            "inductor": os.environ.get("MOE_COMPILER_INDUCTOR", "1") != "0",
            "static_launch": os.environ.get("MOE_COMPILER_STATIC_LAUNCH", "0") == "1",
            "cpp_wrapper": os.environ.get("MOE_COMPILER_CPP_WRAPPER", "1") != "0",
            "router_gemv": os.environ.get("MOE_COMPILER_ROUTER_GEMV", "1") != "0",
            "recorded_tma": launch.recorded_tma(),  # MOE_COMPILER_RECORDED_TMA, parsed where the traces read it
        }
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in options.items():
            name = key.removeprefix(PREFIX)
            if name not in fields:
                raise ValueError(f"unknown option {key!r}: expected one of {sorted(PREFIX + f for f in fields)}")
            want = bool if name != "dump_dir" else (str, type(None))
            if not isinstance(value, want):
                raise ValueError(f"option {key!r}: expected {want}, got {value!r}")
            env[name] = value
        return cls(**env)
