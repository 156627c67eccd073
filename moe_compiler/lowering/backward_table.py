"""The training backward's measured GEMM choices: the "backward" entries of lowering/configs/<gpu>.json.

    {"dtype": "bfloat16", "E": 128, "k": 8, "H": 4096, "I": 1536, "T": 4096, "transposed": false,
     "dgrad": "pingpong_64x256", "us": {"torch": 2978.0, "pingpong_64x256": 2616.0, ...},
     "wgrad": "torch", "wgrad_us": {"torch": 3100.0, "pingpong_64x128": 3350.0, ...}}

`dgrad` names what runs the library backward's two 2-D x 3-D GEMMs (dA = G @ W_down[e], dx_rows = dz @ W_gate_up[e];
triton_backward.BackwardConfig.cutlass) at that point: "torch" (torch._grouped_mm's own pick) or one of
cutlass.CONFIGS; `wgrad` (optional: absent is "torch") what runs its two weight gradients (dW_down = G^T act_s,
dW_gate_up = dz^T X; BackwardConfig.wgrad_cutlass): "torch" or one of cutlass.WGRAD_CONFIGS. Written by `python -m
moe_compiler.tune --backward` (tune/backward.py), which times every candidate on this GPU; read for this GPU only, at
the grid point of the call's T (triton_config.bucket), in the weights' layout it was measured in. Nothing is
borrowed from another GPU, shape, T or layout: where no entry matches, torch's grouped GEMM runs, as before the table
existed.
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
        for key, names in (("dgrad", cutlass.CONFIGS), ("wgrad", cutlass.WGRAD_CONFIGS)):
            value = e.get(key, TORCH)
            if value != TORCH and value not in names:
                raise ValueError(f"{path}: backward entry {i}: {key} {value!r} is neither {TORCH!r} nor one of "
                                 f"{list(names)}; re-run python -m moe_compiler.tune --backward")
    return entries


def point(entry: dict) -> tuple:
    """An entry's point: its KEYS' values, in order."""
    return tuple(entry[f] for f in KEYS)


def _index(name: str, names: tuple) -> int:
    return -1 if name == TORCH else names.index(name)


@functools.cache
def _own(gpu_name: str) -> dict[tuple, tuple[int, int]]:
    """This GPU's entries as point -> (dgrad, wgrad) CUTLASS config indices (-1: torch's), read once: the lookup runs
    per call."""
    path = triton_config.gpu_file(gpu_name)
    entries = load(path) if path.exists() else []
    return {point(e): (_index(e["dgrad"], cutlass.CONFIGS), _index(e.get("wgrad", TORCH), cutlass.WGRAD_CONFIGS))
            for e in entries}


def configs(gpu_name: str, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int,
            transposed: bool) -> tuple[int, int]:
    """The CUTLASS configs measured fastest at this point on this GPU: (for dA and dx_rows, an index into
    cutlass.CONFIGS; for the weight gradients, into cutlass.WGRAD_CONFIGS), each -1 for torch's grouped GEMM
    (measured faster, or not measured)."""
    key = (str(dtype).removeprefix("torch."), E, k, H, I, triton_config.bucket(T), transposed)
    return _own(gpu_name).get(key, (-1, -1))
