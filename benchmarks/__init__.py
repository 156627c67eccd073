"""moe_compiler's benchmarks, one harness (harness.py) run from the repository root as modules:

    python -m benchmarks.bench_experts     the experts op vs transformers' implementations (GPU; --smoke on CPU)
    python -m benchmarks.bench_loop        transformers-v4 expert loops: eager, Inductor and fused_moe (GPU)
    python -m benchmarks.bench_route       the route op vs Inductor's and eager routers (GPU)
    python -m benchmarks.bench_shared      shared experts inside the experts op vs beside it (GPU)
    python -m benchmarks.cpu_experts       the experts op vs transformers' on the CPU

probes/ holds one-off measurements that take one cost apart each (probes/README.md); the results and what was
learned are in NOTES.md and results/. The tuner is part of the package: `python -m moe_compiler.tune`.
"""
