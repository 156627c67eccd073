"""Kernel configs: the committed per-GPU files validate, lookup picks the nearest tuned T, misses warn."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from config_files import SMALL, write_config_file

from moe_compiler.lowering import triton_config
from moe_compiler.lowering.triton_config import (
    Combine,
    DecodeConfig,
    KernelConfig,
    Path,
    SortedConfig,
)

FILES = sorted(triton_config.CONFIG_DIR.glob("*.json"))


def test_there_is_a_tuned_file_for_the_h100():
    assert triton_config.gpu_file("NVIDIA H100 80GB HBM3") in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_committed_config_files_validate(path):
    data = json.loads(path.read_text())
    assert data["schema"] == triton_config.SCHEMA and data["gpu"] and len(data["capability"]) == 2
    entries = triton_config.load_file(path)
    assert entries, "an empty config file"
    keys = [(e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"]) for e in entries]
    assert len(keys) == len(set(keys)), "duplicate entries"
    for e in entries:
        assert e["us"] > 0
        if e["config"].path is Path.DECODE:
            assert e["T"] * e["k"] <= 4096  # triton_decode.MAX_PAIRS, without importing triton
        # Round trip: what the tuner writes is what lookup reads.
        assert triton_config.from_dict(triton_config.to_dict(e["config"])) == e["config"]
    found = triton_config.load_bands(path)  # a symbolic T's band entries: one per shape and band, of a real path
    keys = [(e["dtype"], e["E"], e["k"], e["H"], e["I"], e["band"]) for e in found]
    assert len(keys) == len(set(keys)), "duplicate band entries"
    assert all(e["config"].path in (Path.SORTED, Path.CUTLASS) and e["gain"] >= 1.0 for e in found)


def test_lookup_takes_the_nearest_tuned_t(config_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tuned shape on its own GPU warns about nothing
        assert isinstance(triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 64, 4, 512, 256, 2), DecodeConfig)
        big = triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 64, 4, 512, 256, 700)
    assert isinstance(big, SortedConfig) and big.block_m == 64 and big.tma


def test_a_band_entry_is_taken_for_its_band_only_and_only_on_the_gpu_that_measured_it(config_dir):
    cutlass = {"path": "cutlass", "config": 1}
    band = {"dtype": "bfloat16", "E": 64, "k": 4, "H": 512, "I": 256, "band": [257, 4096], "config": cutlass}
    entries = json.loads((config_dir / "GPU_A.json").read_text())["entries"]
    write_config_file(config_dir, "GPU A", [9, 0], entries, bands=[band])
    assert triton_config.band_entry("GPU A", torch.bfloat16, 64, 4, 512, 256, 1024) == triton_config.CutlassConfig(1)
    assert triton_config.band_entry("GPU A", torch.bfloat16, 64, 4, 512, 256, 64) is None  # another band
    assert triton_config.band_entry("GPU A", torch.float16, 64, 4, 512, 256, 1024) is None  # another dtype
    write_config_file(config_dir, "GPU B", [9, 0], entries)  # same capability: its entries borrowed, not bands
    assert triton_config.band_entry("GPU B", torch.bfloat16, 64, 4, 512, 256, 1024) is None
    write_config_file(config_dir, "GPU C", [9, 0], entries, bands=[dict(band, band=[300, 4096])])
    with pytest.raises(ValueError, match=r"band entry 0: \[300, 4096\] is not one of the bands"):
        triton_config.band_entry("GPU C", torch.bfloat16, 64, 4, 512, 256, 1024)


def test_untuned_shape_warns_once_and_uses_defaults(config_dir):
    want = r"no tuned Triton config for bfloat16 experts E=8, k=2.*python -m moe_compiler.tune --shape 8,2,512,256"
    with pytest.warns(UserWarning, match=want):
        cfg = triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 8, 2, 512, 256, 4096)
    assert cfg == triton_config.default_config(torch.bfloat16, 8, 2, 512, 256, 4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (GPU, dtype, shape), not per call
        triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 8, 2, 512, 256, 16)


def test_gpu_without_a_file_borrows_a_same_capability_file_and_says_so(config_dir):
    with pytest.warns(UserWarning, match="no Triton configs tuned on GPU B for this shape; using those tuned on GPU A"):
        cfg = triton_config.lookup("GPU B", (9, 0), torch.bfloat16, 64, 4, 512, 256, 1)
    assert isinstance(cfg, DecodeConfig)
    with pytest.warns(UserWarning, match="no tuned Triton config"):  # another architecture: defaults
        triton_config.lookup("GPU C", (10, 0), torch.bfloat16, 64, 4, 512, 256, 1)


def test_own_file_without_the_shape_borrows_it_from_a_same_capability_file(config_dir):
    """An H200 tuned for some shapes still takes the H100's tuning of the others rather than defaults."""
    own = [{"dtype": "bfloat16", "E": 8, "k": 2, "H": 512, "I": 256, "T": 1, "us": 5.0,
            "config": {"path": "decode", "gate_up": SMALL, "down": SMALL}}]
    write_config_file(config_dir, "GPU B", [9, 0], own)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own shape: no warning
        assert isinstance(triton_config.lookup("GPU B", (9, 0), torch.bfloat16, 8, 2, 512, 256, 1), DecodeConfig)
    with pytest.warns(UserWarning, match="no Triton configs tuned on GPU B for this shape; using those tuned on GPU A"):
        big = triton_config.lookup("GPU B", (9, 0), torch.bfloat16, 64, 4, 512, 256, 1024)
    assert isinstance(big, SortedConfig) and big.block_m == 64


def test_a_ranks_share_of_a_tuned_model_takes_its_tiles_at_equal_rows_per_expert(config_dir):
    """Expert parallelism over 2 ranks: E = 32 of the tuned 64. Inference (k = 4, the whole batch) at T = 1024
    has 128 rows per expert, as the tuned model at T = 2048 (none tuned: 1024 is 2x off, still taken); all-to-all
    training (k = 1, T = 512 rows received) has 16, as T = 256 (nearest tuned 1024: 4x off, defaults)."""
    with pytest.warns(UserWarning, match=r"E=32, k=4.*using the one tuned for E=64, k=4, T=1024 on GPU A"):
        cfg = triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 32, 4, 512, 256, 1024)
    assert isinstance(cfg, SortedConfig) and cfg.block_m == 64 and cfg.tma
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per shape: the decode point (1/8 row per expert) says nothing new
        assert isinstance(triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 32, 4, 512, 256, 1), DecodeConfig)
    with pytest.warns(UserWarning, match="no tuned Triton config"):
        cfg = triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 32, 1, 512, 256, 512)
    assert cfg == triton_config.default_config(torch.bfloat16, 32, 1, 512, 256, 512)
    with pytest.warns(UserWarning, match="no tuned Triton config"):  # 48 experts are no share of 64
        triton_config.lookup("GPU A", (9, 0), torch.bfloat16, 48, 4, 512, 256, 1024)


def test_defaults_pick_decode_for_few_pairs_and_sorted_tiles_by_rows_per_expert():
    assert isinstance(triton_config.default_config(torch.bfloat16, 128, 8, 2048, 768, 1), DecodeConfig)
    small = triton_config.default_config(torch.bfloat16, 128, 8, 2048, 768, 64)
    large = triton_config.default_config(torch.bfloat16, 128, 8, 2048, 768, 16384)
    assert isinstance(small, SortedConfig) and small.block_m == 16
    assert isinstance(large, SortedConfig) and large.block_m == 128 and large.combine is Combine.GATHER


KC = KernelConfig(32, 64)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: KernelConfig(block_n=48, block_k=64), "block_n: expected a power of two"),
        (lambda: KernelConfig(block_n=32, block_k=64, num_stages=0), "num_stages: expected an int in"),
        (lambda: KernelConfig(block_n=32, block_k=64, warp_specialize=1), "warp_specialize: expected a bool"),
        (lambda: SortedConfig(block_m=8, gate_up=KC, down=KC), "block_m: expected a power of two in \\[16, 256\\]"),
        (lambda: SortedConfig(block_m=16, gate_up=KC, down=KC, tma="yes"), "tma: expected a bool"),
        (lambda: SortedConfig(block_m=16, gate_up=KC, down=KernelConfig(8, 64)),
         "down.block_n: expected >= 16 on the sorted path"),
        (lambda: KernelConfig(block_n=1, block_k=64), "block_n: expected a power of two in \\[2, 512\\]"),
        (lambda: triton_config.from_dict({"path": "sorted", "block_m": 64, "gate_up": SMALL}),
         "invalid experts kernel config"),
        (lambda: triton_config.from_dict({"path": "warp", "gate_up": SMALL, "down": SMALL}),
         "invalid experts kernel config"),
        (lambda: triton_config.from_dict({"path": "grouped_mm", "block_m": 64}), "invalid experts kernel config"),
    ],
)
def test_bad_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_grouped_mm_config_round_trips():
    cfg = triton_config.GroupedMMConfig()
    assert triton_config.to_dict(cfg) == {"path": "grouped_mm"}
    assert triton_config.from_dict(triton_config.to_dict(cfg)) == cfg


def test_bad_schema_names_the_fix(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"schema": 0, "entries": []}))
    with pytest.raises(ValueError, match="re-run python -m moe_compiler.tune"):
        triton_config.load_file(path)


def test_transposed_default_decode_tiles_are_wide_and_split_to_fill_the_gpu():
    # GPT-OSS-20B's shape at T = 1: 23 column tiles of 128 per token, so the down reduction splits 16 ways.
    cfg = triton_config.default_config(torch.bfloat16, 32, 4, 2880, 2880, 1, transposed=True)
    assert isinstance(cfg, DecodeConfig) and cfg.down.block_n == 128 and cfg.down.split_k == 16
    assert cfg.gate_up.split_k == 1 and cfg.gate_up.block_k < cfg.down.block_n
    # enough programs already: no split; the row layout's default keeps its narrow tiles
    many = triton_config.default_config(torch.bfloat16, 1024, 2, 4096, 512, 16, transposed=True)  # 16 x 32 programs
    assert isinstance(many, DecodeConfig) and many.down.split_k == 1
    rows = triton_config.default_config(torch.bfloat16, 32, 4, 2880, 2880, 1)
    assert rows.down.split_k == 1 and rows.down.block_n <= 64
