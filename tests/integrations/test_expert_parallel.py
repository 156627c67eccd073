"""transformers' expert parallelism compiled with fused_moe (examples/multi_gpu.py under torchrun): two ranks,
each holding half the routed experts; every MoE layer fused on every rank, the compiled logits equal eager
under the same sharding and the unsharded model. CPU ranks over gloo here; the multi_gpu tests run the same
on two GPUs over NCCL, in bf16 and under CUDA graphs (mode="reduce-overhead")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "multi_gpu.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(*args: str, gpus: bool = False) -> list[dict]:
    """examples/multi_gpu.py on two ranks; each rank's RESULT line."""
    env = dict(os.environ)
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           EXAMPLE, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(results) == 2, (proc.stdout[-3000:], proc.stderr[-3000:])
    return sorted(results, key=lambda r: r["rank"])


def _check(results, tol):
    for r in results:
        assert r["fused_layers"] == r["moe_layers"] > 0, r
        assert r["compiled_vs_eager"] <= tol and r["ep_vs_single"] <= tol, r
    # the ranks hold different experts but, after the all-reduce, the same logits
    assert results[0]["compiled_vs_eager"] == pytest.approx(results[1]["compiled_vs_eager"])


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_expert_parallel_on_two_cpu_ranks(arch):
    _check(run_ranks("--arch", arch), 1e-4)


@pytest.mark.multi_gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "reduce-overhead"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_expert_parallel_on_two_gpus(arch, mode):
    args = ["--arch", arch, "--dtype", "bf16"] + (["--mode", mode] if mode else [])
    _check(run_ranks(*args, gpus=True), 3e-2)
