"""The quantized kernels' configs (triton_quantized_config.py): validation with what-to-do messages, and which
path and tiles the untuned defaults pick."""

from __future__ import annotations

import pytest
import torch

from moe_compiler.lowering import triton_quantized
from moe_compiler.lowering.triton_quantized_config import QuantizedConfig, default_config
from moe_compiler.spec import QuantizedExpertsSpec


def test_default_config_picks_a_block_k_that_divides_the_scale_block():
    hidden = torch.zeros(4, 8)
    assert default_config(hidden, 8, 2, QuantizedExpertsSpec(), I=64).block_k == 128
    assert default_config(hidden, 8, 2, QuantizedExpertsSpec(scale_block_k=96), I=64).block_k == 32
    assert not default_config(hidden, 8, 2, QuantizedExpertsSpec(), I=64).act_fp8


def test_default_int4_tiles_follow_the_rows_per_expert():
    spec = QuantizedExpertsSpec(weight_format="int4_packed", scale_block_n=1, scale_block_k=32)
    few = default_config(torch.zeros(128, 64), 384, 8, spec, I=2048)  # 1024 pairs: sorted, 16-row blocks
    many = default_config(torch.zeros(4096, 64), 384, 8, spec, I=2048)  # 85 rows per expert
    assert not few.decode and (few.block_m, few.int4_planes) == (16, True)
    # the GEMVs while the pairs are at most twice the experts (past the bf16 op's decode_suits: T <= 6 here)
    assert default_config(torch.zeros(96, 64), 384, 8, spec, I=2048).decode
    assert not default_config(torch.zeros(97, 64), 384, 8, spec, I=2048).decode
    assert not many.decode and (many.block_m, many.int4_planes) == (64, False)
    gemvs = default_config(torch.zeros(1, 64), 384, 8, spec, I=2048)
    assert gemvs.decode and (gemvs.block_n, gemvs.down_block_n, gemvs.block_k) == (16, 16, 512)
    # 256 values per step where I is no multiple of 512 (the down GEMV's K tail)
    assert default_config(torch.zeros(1, 64), 128, 8, spec, I=768).block_k == 256


def test_default_config_takes_the_decode_gemvs_for_few_pairs():
    spec = QuantizedExpertsSpec()
    assert default_config(torch.zeros(1, 8), 256, 8, spec, I=64).decode  # one token
    assert default_config(torch.zeros(4, 8), 256, 8, spec, I=64).decode  # 32 pairs of 256 experts
    assert not default_config(torch.zeros(64, 8), 256, 8, spec, I=64).decode
    # the GEMVs step over two whole scale blocks of up to 128 columns, else inside one (NOTES "quantized GEMVs v4")
    assert default_config(torch.zeros(1, 8), 256, 8, spec, I=64).block_k == 256
    assert default_config(torch.zeros(1, 8), 256, 8, QuantizedExpertsSpec(scale_block_k=64), I=64).block_k == 128
    assert default_config(torch.zeros(1, 8), 256, 8, QuantizedExpertsSpec(scale_block_k=96), I=64).block_k == 32
    assert default_config(torch.zeros(1, 8), 256, 8, spec, I=64).slot_split


@pytest.mark.parametrize("major", [8, 9])
def test_default_fp8_prefill_loads_by_tma_above_32_rows_per_expert_on_sm90(major, monkeypatch):
    """w8a8_rows' sorted path: both GEMMs by TMA from 33 rows per expert where the GPU has TMA (H200: DeepSeek-V3
    T = 4096 5.70 vs 6.32 ms; Kimi-K2 T = 1024, 21 rows, 4.52 vs 4.44 pointer), by pointer below and on sm89."""
    from moe_compiler.lowering import device, triton_quantized_config

    monkeypatch.setattr(triton_quantized_config, "fp8_cores", lambda t: True)
    monkeypatch.setattr(device, "index", lambda t: 0)
    monkeypatch.setattr(device, "capability", lambda i: (major, 0))
    hidden = torch.zeros(4096, 64, dtype=torch.bfloat16)
    spec = QuantizedExpertsSpec()
    many = default_config(hidden, 256, 8, spec, I=2048)  # 128 rows per expert
    assert (many.act.value, many.block_m, many.fused_act, many.tma) == ("w8a8_rows", 64, False, major >= 9)
    assert not default_config(hidden[:1024], 256, 8, spec, I=2048).tma  # 32 rows
    assert triton_quantized.wants_tma(many, spec) == (major >= 9)


def test_tma_config_is_checked():
    with pytest.raises(ValueError, match="warp_specialize: needs tma=True"):
        QuantizedConfig(block_m=64, block_n=128, block_k=128, act="w8a8_rows", warp_specialize=True)
    with pytest.raises(ValueError, match="not with fused_act=True"):
        QuantizedConfig(block_m=64, block_n=128, block_k=128, act="w8a8_rows", tma=True, warp_specialize=True)
    with pytest.raises(ValueError, match="sorted_copy=False: needs tma=True"):
        QuantizedConfig(block_m=64, block_n=128, block_k=128, act="w8a8_rows", sorted_copy=False)
    with pytest.raises(ValueError, match="programs_per_sm: expected an int in"):
        QuantizedConfig(block_m=64, block_n=128, block_k=128, act="w8a8_rows", programs_per_sm=9)
    spec = QuantizedExpertsSpec()
    assert not triton_quantized.wants_tma(QuantizedConfig(64, 128, 128, "w8a16", tma=True), spec)  # rows only
    assert triton_quantized.wants_tma(QuantizedConfig(64, 128, 128, "w8a8_rows", tma=True), spec)


def test_down_block_n_is_checked():
    with pytest.raises(ValueError, match="down_block_n: expected 0 \\(block_n\\) or a power of two, got 24"):
        QuantizedConfig(block_m=16, block_n=8, block_k=256, act="w8a16", decode=True, down_block_n=24)
