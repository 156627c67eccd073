"""lowering/backward_table.py: the training backward's measured GEMM choices (dA / dx, the weight gradients), read for
this GPU, at the call's grid point and weight layout only; bad entries named."""

from __future__ import annotations

import json

import pytest
import torch
from config_files import write_config_file

from moe_compiler.lowering import backward_table, cutlass, triton_config

POINT = {"dtype": "bfloat16", "E": 128, "k": 8, "H": 4096, "I": 1536, "T": 4096, "transposed": False}


def _table(tmp_path, monkeypatch, entries, gpu="GPU A"):
    monkeypatch.setattr(triton_config, "CONFIG_DIR", tmp_path)
    backward_table._own.cache_clear()
    write_config_file(tmp_path, gpu, [9, 0], [], backward=entries)


@pytest.fixture(autouse=True)
def _fresh():
    backward_table._own.cache_clear()
    yield
    backward_table._own.cache_clear()


def test_the_measured_config_at_the_calls_grid_point_layout_and_gpu(tmp_path, monkeypatch):
    _table(tmp_path, monkeypatch, [dict(POINT, dgrad="pingpong_64x256", wgrad="pingpong_64x128"),
                                   dict(POINT, T=16384, dgrad="torch"), dict(POINT, T=1024, dgrad="torch",
                                                                             wgrad="coop_128x128")])
    args = (torch.bfloat16, 128, 8, 4096, 1536)
    measured = (cutlass.CONFIGS.index("pingpong_64x256"), cutlass.WGRAD_CONFIGS.index("pingpong_64x128"))
    assert backward_table.configs("GPU A", *args, 4096, False) == measured
    assert backward_table.configs("GPU A", *args, 3000, False) == measured
    assert backward_table.configs("GPU A", *args, 16384, False) == (-1, -1)  # measured: torch's (no wgrad: torch)
    assert backward_table.configs("GPU A", *args, 1024, False) == (-1, cutlass.WGRAD_CONFIGS.index("coop_128x128"))
    assert backward_table.configs("GPU A", *args, 512, False) == (-1, -1)  # not measured at this grid point
    assert backward_table.configs("GPU A", *args, 4096, True) == (-1, -1)  # nor in the transposed layout
    assert backward_table.configs("GPU B", *args, 4096, False) == (-1, -1)  # nor on another GPU
    assert backward_table.configs("GPU A", torch.float16, *args[1:], 4096, False) == (-1, -1)


@pytest.mark.parametrize("bad,match", [({"dgrad": "pingpong_1x1"}, "dgrad 'pingpong_1x1' is neither 'torch' nor"),
                                       ({"wgrad": "coop_256x128_cluster2x1"},  # a forward tile, not a wgrad one
                                        "wgrad 'coop_256x128_cluster2x1' is neither 'torch' nor"),
                                       ({"dgrad": None, "transposed": None}, r"lacks \['dgrad', 'transposed'\]")])
def test_bad_entries_are_named(tmp_path, monkeypatch, bad, match):
    entry = {key: v for key, v in {**POINT, "dgrad": "torch", **bad}.items() if v is not None}
    _table(tmp_path, monkeypatch, [entry])
    with pytest.raises(ValueError, match=match):
        backward_table.configs("GPU A", torch.bfloat16, 128, 8, 4096, 1536, 4096, False)


@pytest.mark.parametrize("path", sorted(triton_config.CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_committed_backward_entries_validate(path):
    entries = backward_table.load(path)
    keys = [tuple(e[f] for f in backward_table.KEYS) for e in entries]
    assert len(keys) == len(set(keys)), "duplicate backward entries"
    assert all(e["T"] in triton_config.T_GRID for e in entries)
    assert json.loads(path.read_text())["schema"] == triton_config.SCHEMA
