"""A config directory of made-up tuned files, in place of the package's (triton_config.CONFIG_DIR)."""

from __future__ import annotations

import pytest
from config_files import SMALL, write_config_file

from moe_compiler.lowering import backward_table, triton_config


def _clear():
    triton_config._sources.cache_clear()
    triton_config._own_bands.cache_clear()
    triton_config._warned.clear()
    backward_table._own.cache_clear()


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """GPU A (sm90) tuned for one shape (E=64, k=4, H=512, I=256): decode at T = 1, sorted with TMA at 1024."""
    monkeypatch.setattr(triton_config, "CONFIG_DIR", tmp_path)
    _clear()
    entries = [
        {"dtype": "bfloat16", "E": 64, "k": 4, "H": 512, "I": 256, "T": 1, "us": 10.0,
         "config": {"path": "decode", "gate_up": SMALL, "down": SMALL}},
        {"dtype": "bfloat16", "E": 64, "k": 4, "H": 512, "I": 256, "T": 1024, "us": 90.0,
         "config": {"path": "sorted", "block_m": 64, "gate_up": SMALL, "down": SMALL, "tma": True}},
    ]
    write_config_file(tmp_path, "GPU A", [9, 0], entries)
    yield tmp_path
    _clear()
