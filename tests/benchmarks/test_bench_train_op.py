"""benchmarks/bench_train_op.py: each of our variants runs the backward config its docstring names, for every
argument default_config takes (session 52: since the unpadded rows of session 50, moe_train_tr_dgrad and
moe_train_triton raised in BackwardConfig and moe_train_tile_pad in its own lambda, before any timing)."""

import dataclasses

import pytest
import torch

from benchmarks import bench_train_op
from moe_compiler.lowering import backward_table, cutlass, triton_backward, triton_config
from moe_compiler.lowering.triton_backward import DGrad, WGrad

# (dtype, E, k, H, I, T, library, saved): what _call_default_config passes
ARGS = (torch.bfloat16, 8, 2, 64, 32, 4096, True, True)


def _config(variant):
    with bench_train_op._backward(variant):
        return triton_backward.default_config(*ARGS)


def test_the_default_rows_are_unpadded_and_each_variant_departs_from_it_alone():
    default = _config("moe_train")
    assert default == triton_backward.default_config(*ARGS) and default.unpadded and default.row_align == 1

    pad16 = _config("moe_train_pad16")
    assert not pad16.unpadded and pad16.row_align == triton_backward.LIBRARY_BLOCK_M
    assert (pad16.wgrad_path, pad16.dgrad_path) == (default.wgrad_path, default.dgrad_path)

    tile = _config("moe_train_tile_pad")
    forward_tile = triton_config.default_sorted_config(*ARGS[:3], ARGS[5]).block_m
    assert not tile.unpadded and tile.row_align == forward_tile != triton_backward.LIBRARY_BLOCK_M

    large = _config("moe_train_large_tile")
    assert large == dataclasses.replace(default, grouped_tile=triton_backward.GroupedTile.LARGE)
    assert large.min_slots(ARGS[1]) == 129 * ARGS[1] and default.min_slots(ARGS[1]) == 0
    assert _config("moe_train_torch_tile") == default  # 1024 rows per expert: outside the LARGE band
    for variant, name in (("moe_train_cutlass_pp64x256", "pingpong_64x256"),
                          ("moe_train_cutlass_c128x256", "coop_128x256_cluster1x2")):
        assert _config(variant) == dataclasses.replace(default, cutlass=cutlass.CONFIGS.index(name))
    for variant, name in (("moe_train_wgrad_pp64x128", "pingpong_64x128"),
                          ("moe_train_wgrad_pp64x256", "pingpong_64x256")):
        assert _config(variant) == dataclasses.replace(default, wgrad_cutlass=cutlass.WGRAD_CONFIGS.index(name))

    for variant, paths in bench_train_op.PATHS.items():
        config = _config(variant)
        assert (config.wgrad_path.name, config.dgrad_path.name) == paths and not config.unpadded
    assert _config("moe_train_triton").wgrad_path is WGrad.TRITON
    assert _config("moe_train_tr_dgrad").dgrad_path is DGrad.TRITON


def test_every_variant_builds_its_config_where_the_default_takes_the_large_tile():
    """DeepSeek-V3 at T = 4096 (128 rows per expert: GroupedTile.LARGE by default): the Triton-path variants drop
    the large tile with the unpadded rows (a BackwardConfig error otherwise, before any timing)."""
    ds_v3 = (torch.bfloat16, 256, 8, 7168, 2048, 4096, True, True)
    assert triton_backward.default_config(*ds_v3).grouped_tile is triton_backward.GroupedTile.LARGE
    for variant in bench_train_op.VARIANTS:
        with bench_train_op._backward(variant):
            triton_backward.default_config(*ds_v3)


def test_the_switches_are_restored_after_each_variant():
    real = triton_backward.default_config
    for variant in bench_train_op.VARIANTS:
        _config(variant)
        assert triton_backward.default_config is real


@pytest.mark.parametrize("variant,want", [("moe_train_torch_dgrad", (-1, 3)), ("moe_train_torch_wgrad", (7, -1)),
                                          ("moe_train_no_table", (-1, -1))])
def test_the_table_variants_keep_only_their_half_of_it(monkeypatch, variant, want):
    """moe_train_torch_dgrad / _wgrad / no_table: a table naming CUTLASS configs for dA / dx (7) and the weight
    gradients (3) is read with the variant's half replaced by torch's (-1) inside the variant only."""
    monkeypatch.setattr(backward_table, "configs", lambda *a: (7, 3))
    with bench_train_op._backward(variant):
        assert backward_table.configs("GPU", *ARGS[:6], False) == want
        assert triton_backward.default_config(*ARGS) == _config("moe_train")
    assert backward_table.configs("GPU", *ARGS[:6], False) == (7, 3)
