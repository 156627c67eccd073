"""What do TMA descriptors built on the device cost against host-built ones? A call compiled into Inductor's code
cannot carry host TMA descriptors, so with recorded TMA (moe_compiler.recorded_tma) its sorted kernels build them
on the device from their pointer arguments (triton_experts.TMA_DEVICE): every program writes its descriptors to
global scratch and fences them before its first load. This times, at each shape and T, the table's entry for T
as a whole experts forward three ways: weight tiles by pointer (what a recorded call runs by default), by host
descriptors (an eager or opaque call) and by device descriptors (a recorded call with recorded TMA). Same inputs,
the variants interleaved, each under a CUDA graph from a cold L2 (the tuner's timing): GPU time only, the host
paths apart. NOTES.md "session 26".

    python -m benchmarks.probes.probe_device_tma --shapes mixtral_8x7b qwen3_30b_a3b --tokens 512 1024 2048 4096

Per row: µs of each variant and device / host. Last, per shape, the geometric mean of device / host and of
device / pointer.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton

from moe_compiler.lowering import triton_config, triton_experts
from moe_compiler.tune.search import benches, graph_calls
from moe_compiler.tune.shapes import ALL_SHAPES
from moe_compiler.tune.timing import median

from .. import harness


@contextlib.contextmanager
def descriptors(mode: int):
    """Launches inside take TMA through `mode`'s descriptors wherever they would take TMA at all."""
    real = triton_experts.tma_mode

    def forced(config, spec, *tensors):
        return mode if real(config, spec, *tensors) != triton_experts.TMA_OFF else triton_experts.TMA_OFF

    triton_experts.tma_mode = forced
    try:
        yield
    finally:
        triton_experts.tma_mode = real


def main():
    ap = harness.parser(__doc__, shapes=ALL_SHAPES, tokens=[512, 1024, 2048, 4096], out="device_tma")
    ap.set_defaults(shapes=["mixtral_8x7b", "qwen3_30b_a3b", "gpt_oss_20b"])
    args = ap.parse_args()
    dtype = torch.bfloat16
    gpu = harness.gpu_name()
    # (what Inductor's launcher installs before its launches: the descriptors' global scratch)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    entries = triton_config.load_file(triton_config.gpu_file(gpu))
    timer = harness.Timer("cuda")
    rows = []
    for name, T, b in benches(args.shapes, args.tokens, dtype):
        same = triton_config.shape_entries(entries, dtype, b.E, b.k, b.H, b.I)
        config = triton_config.nearest_entry(entries, dtype, b.E, b.k, b.H, b.I, T) if same else None
        if not (isinstance(config, triton_config.SortedConfig) and config.tma):
            print(f"{name} T={T}: its entry is not a sorted TMA config ({config}); skipped", flush=True)
            continue
        variants = {"pointer": (dataclasses.replace(config, tma=False), triton_experts.TMA_OFF),
                    "host": (config, triton_experts.TMA_HOST), "device": (config, triton_experts.TMA_DEVICE)}
        calls = graph_calls(T, b.k, b.H, b.I)
        times = {label: [] for label in variants}
        for _ in range(3):  # rounds, the variants interleaved in each
            for label, (cfg, mode) in variants.items():
                with descriptors(mode):
                    times[label].append(timer.graph(b.forward(cfg), calls=calls))
        us = {label: median(ts) * 1e6 for label, ts in times.items()}
        rows.append({"shape": name, "T": T, "us": us})
        print(f"{name:16} T={T:6} " + "  ".join(f"{label} {t:8.1f}" for label, t in us.items())
              + f"  device/host {us['device'] / us['host']:.3f}", flush=True)
        del b
    harness.save_rows(args.out, "device_tma", rows, gpu)
    print(f"\n{'shape':>16} | geomean device/host, device/pointer")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r["us"] for r in rows if r["shape"] == shape]
        print(f"{shape:>16} | {harness.geomean(u['device'] / u['host'] for u in mine):.3f}, "
              f"{harness.geomean(u['device'] / u['pointer'] for u in mine):.3f}")


if __name__ == "__main__":
    main()
