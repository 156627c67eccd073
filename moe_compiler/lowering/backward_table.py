"""The training backward's measured GEMM choice: the "backward" entries of lowering/configs/<gpu>.json.

    {"dtype": "bfloat16", "E": 128, "k": 8, "H": 4096, "I": 1536, "T": 4096, "transposed": false,
     "dgrad": "pingpong_64x256", "us": {"torch": 2978.0, "pingpong_64x256": 2616.0, ...}}

`dgrad` names what runs the library backward's two 2-D x 3-D GEMMs (dA = G @ W_down[e], dx_rows = dz @ W_gate_up[e];
triton_backward.BackwardConfig.cutlass) at that point: "torch" (torch._grouped_mm's own pick) or one of
cutlass.CONFIGS. Written by `python -m moe_compiler.tune --backward` (tune/backward.py), which times every candidate
on this GPU; read for this GPU only, at the grid point of the call's T (triton_config.bucket), in the weights' layout
it was measured in. Nothing is borrowed from another GPU, shape, T or layout: where no entry matches, torch's
grouped GEMM runs, as before the table existed.
"""

from __future__ import annotations

import functools
import json
import pathlib

import torch

from . import cutlass, triton_config

KEYS = ("dtype", "E", "k", "H", "I", "T", "transposed")
TORCH = "torch"


def load(path: pathlib.Path) -> list[dict]:
    """A config file's backward entries; raises ValueError naming what is wrong."""
    entries = json.loads(path.read_text()).get("backward", [])
    for i, e in enumerate(entries):
        missing = set(KEYS + ("dgrad",)) - set(e)
        if missing:
            raise ValueError(f"{path}: backward entry {i} lacks {sorted(missing)}")
        if e["dgrad"] != TORCH and e["dgrad"] not in cutlass.CONFIGS:
            raise ValueError(f"{path}: backward entry {i}: dgrad {e['dgrad']!r} is neither {TORCH!r} nor one of "
                             f"cutlass.CONFIGS {list(cutlass.CONFIGS)}; re-run python -m moe_compiler.tune --backward")
    return entries


def point(entry: dict) -> tuple:
    """An entry's point: its KEYS' values, in order."""
    return tuple(entry[f] for f in KEYS)


@functools.cache
def _own(gpu_name: str) -> dict[tuple, int]:
    """This GPU's entries as point -> CUTLASS config index (-1: torch's), read once: the lookup runs per call."""
    path = triton_config.gpu_file(gpu_name)
    entries = load(path) if path.exists() else []
    return {point(e): -1 if e["dgrad"] == TORCH else cutlass.CONFIGS.index(e["dgrad"]) for e in entries}


def dgrad_config(gpu_name: str, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int, transposed: bool) -> int:
    """The CUTLASS config (index into cutlass.CONFIGS) measured fastest for dA and dx_rows at this point on this GPU,
    or -1: torch's grouped GEMM (measured faster, or not measured)."""
    key = (str(dtype).removeprefix("torch."), E, k, H, I, triton_config.bucket(T), transposed)
    return _own(gpu_name).get(key, -1)
