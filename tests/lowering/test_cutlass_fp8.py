"""lowering/cutlass_fp8.py and csrc/'s block-scaled FP8 grouped GEMM: the config field, the scale conversion, the
switch off the GPU, and (GPU, sm90) the GEMM against an fp64 reference on dequantized operands — every config,
K and N tails, experts with no rows, no rows at all, capture and replay with changing routing, clear errors — and
the experts_quantized op forced onto it against the w8a8 reference and the Triton path."""

from __future__ import annotations

import pytest
import torch
from triton_cases import poisoned_allocations

from moe_compiler.lowering import cutlass, cutlass_fp8
from moe_compiler.lowering.torch_quantized import dequantize
from moe_compiler.lowering.triton_quantized_config import QuantizedConfig, cutlass_fp8_choice, cutlass_fp8_config
from moe_compiler.spec import QuantizedExpertsSpec
from moe_compiler.testing import rel_err
from moe_compiler.testing.cuda_graphs import captured, replay, reroute
from moe_compiler.testing.quantized import quantize_fp8_blocks, quantized_experts_inputs, w8a8_reference

ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def test_the_config_names_a_cutlass_fp8_config_or_triton():
    assert QuantizedConfig(16, 128, 128, "w8a8_rows").cutlass == -1
    assert QuantizedConfig(1, 128, 128, "w8a8_rows", cutlass=len(cutlass.FP8_CONFIGS) - 1).cutlass >= 0
    with pytest.raises(ValueError, match=r"-1 \(Triton\) or a CUTLASS FP8 config in \[0, 3\].*got 4"):
        QuantizedConfig(1, 128, 128, "w8a8_rows", cutlass=len(cutlass.FP8_CONFIGS))


def test_the_choice_follows_the_measured_points():
    """cutlass_fp8_choice's docstring figures: Triton where it won or tied, 64-row ping-pong tiles at 32 rows per
    expert, 128 x 128 tiles in 1 x 2 clusters from 48 rows (128 on Qwen3-30B-A3B's short K loops)."""
    pingpong, clustered = cutlass.FP8_CONFIGS.index("pingpong_64x128"), cutlass.FP8_CONFIGS.index(
        "coop_128x128_cluster1x2")
    assert cutlass_fp8_choice(1024, 256, 8, 7168) == pingpong  # DeepSeek-V3
    assert cutlass_fp8_choice(4096, 256, 8, 7168) == cutlass_fp8_choice(16384, 256, 8, 7168) == clustered
    assert cutlass_fp8_choice(1024, 384, 8, 7168) == -1  # Kimi-K2, 21 rows per expert: a tie
    assert cutlass_fp8_choice(1024, 128, 8, 4096) == clustered  # Qwen3-235B-A22B
    assert cutlass_fp8_choice(1024, 128, 8, 2048) == -1  # Qwen3-30B-A3B, 64 rows: Triton won
    assert cutlass_fp8_choice(4096, 128, 8, 2048) == clustered


def test_scales_become_packed_fp32_without_changing_a_value():
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None:
        exps = torch.tensor([[[127, 130], [120, 127]]], dtype=torch.uint8)
        assert torch.equal(cutlass_fp8.fp32_scales(exps.view(e8m0)), torch.tensor([[[1.0, 8.0], [2.0**-7, 1.0]]]))
    s = torch.rand(3, 5, 4)
    assert cutlass_fp8.fp32_scales(s) is s  # packed fp32: read in place
    assert torch.equal(cutlass_fp8.fp32_scales(s.bfloat16()), s.bfloat16().float())
    view = s.transpose(1, 2).contiguous().transpose(1, 2)  # same values, K-major rows no longer packed
    out = cutlass_fp8.fp32_scales(view)
    assert torch.equal(out, s) and out.stride() == (20, 4, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU does")
def test_forcing_cutlass_changes_nothing_off_the_gpu(monkeypatch):
    monkeypatch.setenv(cutlass.ENV, "1")
    args, _ = quantized_experts_inputs(4, 256, 128, 4, 2, torch.bfloat16)
    assert cutlass_fp8_config(args[0], 4, 4, 2, QuantizedExpertsSpec(), (args[3], args[4], args[5], args[6])) == -1


def _reference(x, xs, w, ws, offs):
    """fp64 per segment on the dequantized operands (each value times its block's scale)."""
    xd = dequantize(x.unsqueeze(0), xs.unsqueeze(0), 1, 128)[0].double()
    wd = dequantize(w, ws, 128, 128).double()
    out, start = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64), 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = xd[start:end] @ wd[e].t()
        start = end
    return out


def _problem(counts, N, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, xs = quantize_fp8_blocks(torch.randn(sum(counts), K, generator=gen) * 3, 1, 128)
    w, ws = quantize_fp8_blocks(torch.randn(len(counts), N, K, generator=gen) * K**-0.5, 128, 128)
    return x, xs, w, ws, torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the glue on the CPU interpreter (the GPU runs the real GEMM)")
def test_the_glue_around_the_gemms_on_the_interpreter(monkeypatch):
    """cutlass_fp8.experts_forward's Triton passes (quantize, sorted copy, act + quantize, combine) with the CUTLASS
    GEMM stood in by the fp64 reference of its contract: equal to the Triton w8a8_rows path (the same rounding
    kernels; the interpreter's e4m3 rounding differs from the w8a8 reference's at powers of two), sentinel ids
    adding nothing (fp16 activations: the interpreter's bf16 stores are wrong)."""
    from moe_compiler.lowering import triton_quantized

    pytest.importorskip("triton")

    class Reference:
        @staticmethod
        def grouped_mm_fp8(x, xs, w, ws, offs, config):
            assert xs.dtype == ws.dtype == torch.float32 and config == 0
            return _reference(x, xs, w, ws, offs).to(torch.float16)

    monkeypatch.setattr(cutlass, "load", lambda: Reference)
    T, E, k, H, I = 9, 4, 2, 256, 128
    args, _ = quantized_experts_inputs(T, H, I, E, k, torch.float16, 128, 128, seed=3)
    args[1][::4, 0] = E  # expert parallelism's sentinel
    spec = QuantizedExpertsSpec()
    with poisoned_allocations():
        out = cutlass_fp8.experts_forward(*args, spec, 0)
        triton = triton_quantized.experts_forward(*args, spec, QuantizedConfig(16, 128, 128, "w8a8_rows",
                                                                              fused_act=False))
    assert rel_err(out.float(), triton.float()) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
@pytest.mark.parametrize("config", range(len(cutlass.FP8_CONFIGS)), ids=cutlass.FP8_CONFIGS)
def test_grouped_mm_fp8_against_fp64(config):
    ops = cutlass.load()
    # K and N tails (272 = 2 x 128 + 16, 264 = 2 x 128 + 8), empty experts, a partial row tile, one big group
    for counts, N, K in (([0, 7, 1, 300, 0, 129], 264, 272), ([1000] * 4, 2048, 768), ([3], 16, 16)):
        x, xs, w, ws, offs = _problem(counts, N, K)
        out = ops.grouped_mm_fp8(*(t.cuda() for t in (x, xs, w, ws, offs)), config)
        assert out.shape == (x.shape[0], N) and out.dtype == torch.bfloat16
        assert rel_err(out.cpu(), _reference(x, xs, w, ws, offs)) <= 1e-2, (counts, N, K)
    empty = ops.grouped_mm_fp8(*(t.cuda() for t in (x[:0], xs[:0], w, ws, torch.zeros_like(offs))), config)
    assert empty.shape == (0, N)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_bad_fp8_operands_get_clear_errors():
    ops = cutlass.load()
    x, xs, w, ws, offs = (t.cuda() for t in _problem([4, 4], 256, 256))
    with pytest.raises(RuntimeError, match="expected fp32 scales.*convert bf16 / e8m0"):
        ops.grouped_mm_fp8(x, xs, w, ws.bfloat16(), offs, 0)
    with pytest.raises(RuntimeError, match="128 x 128 weight blocks and 1 x 128 activation groups"):
        ops.grouped_mm_fp8(x, xs, w, ws.repeat_interleave(2, 1), offs, 0)
    with pytest.raises(RuntimeError, match="expected float8_e4m3fn x and w"):
        ops.grouped_mm_fp8(x.bfloat16(), xs, w, ws, offs, 0)
    with pytest.raises(RuntimeError, match="int32 offs of E = 2"):
        ops.grouped_mm_fp8(x, xs, w, ws, offs.long(), 0)
    n = len(cutlass.FP8_CONFIGS)
    with pytest.raises(RuntimeError, match=rf"config {n} not in \[0, {n - 1}\]"):
        ops.grouped_mm_fp8(x, xs, w, ws, offs, n)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_fp8_capture_and_replay_with_changing_routing():
    ops = cutlass.load()
    E, S = 8, 512
    x, xs, w, ws, _ = (t.cuda() for t in _problem([S // E] * E, 256, 384))
    offs = torch.empty(E, dtype=torch.int32, device="cuda")
    reroute(offs, S, 0)
    graph, out = captured(lambda: ops.grouped_mm_fp8(x, xs, w, ws, offs, 1))
    for seed in (1, 2, 3):
        reroute(offs, S, seed)
        replay(graph, out)
        want = _reference(*(t.cpu() for t in (x, xs, w, ws, offs)))
        assert rel_err(out.cpu(), want) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, "e8m0"])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_the_fp8_experts_op_forced_onto_cutlass(monkeypatch, scale_dtype, T):
    """MOE_COMPILER_CUTLASS=1: the experts_quantized op's sorted path runs both GEMMs on CUTLASS (and no Triton
    GEMM), equal to the w8a8 reference and, up to accumulation order and where the router weight is applied, to
    the Triton w8a8_rows path. Sentinel ids add nothing. (T = 1 is forced onto the sorted path: the GEMVs
    take it by default.)"""
    from moe_compiler.lowering import triton_quantized

    if scale_dtype == "e8m0":
        scale_dtype = getattr(torch, "float8_e8m0fnu", None)
        if scale_dtype is None:
            pytest.skip("no float8_e8m0fnu in this torch")
    E, k, H, I = 16, 4, 384, 256
    args, (w1, w2) = quantized_experts_inputs(T, H, I, E, k, torch.bfloat16, 128, 128, scale_dtype, seed=T)
    args[1][::7, 0] = E  # expert parallelism's sentinel
    dev = [a.cuda() for a in args]
    spec = QuantizedExpertsSpec()
    monkeypatch.setenv(cutlass.ENV, "1")
    assert cutlass_fp8_config(dev[0], T, E, k, spec, (dev[3], dev[4], dev[5], dev[6])) >= 0
    launched = []
    real = triton_quantized.launch_gate_up
    monkeypatch.setattr(triton_quantized, "launch_gate_up", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    with poisoned_allocations():
        out = triton_quantized.experts_forward(*dev, spec, QuantizedConfig(1, 128, 128, "w8a8_rows", cutlass=0))
        triton = triton_quantized.experts_forward(*dev, spec, QuantizedConfig(64, 128, 128, "w8a8_rows",
                                                                              fused_act=False))
    assert len(launched) == 1  # the Triton run's only
    assert rel_err(out.float().cpu(), triton.float().cpu()) <= 1e-2
    # The reference rounds act from fp64 products, the kernels from bf16 gate_up rows: e4m3 flips (6% steps) on a
    # few values, which over one token's 384 outputs measured 2.5e-2 (T = 1, fp32 scales), 1e-2 over more rows.
    want = w8a8_reference(*args[:3], w1, w2, group=128)
    assert rel_err(out.float().cpu(), want) <= (2e-2 if T > 1 else 3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_the_op_takes_cutlass_by_default_where_it_measured_faster(monkeypatch):
    """MOE_COMPILER_CUTLASS=auto: 128 rows per expert (the rule's threshold at H < 4096) runs the CUTLASS GEMMs
    inside torch.ops.moe_compiler.experts_quantized, equal to the w8a8 reference; =0 keeps the Triton kernels."""
    T, E, k, H, I = 512, 8, 2, 256, 128
    args, (w1, w2) = quantized_experts_inputs(T, H, I, E, k, torch.bfloat16, 128, 128, seed=1)
    dev = [a.cuda() for a in args]
    calls = []
    real = cutlass_fp8.experts_forward
    monkeypatch.setattr(cutlass_fp8, "experts_forward", lambda *a: calls.append(a[-1]) or real(*a))
    outs = {}
    for mode in ("auto", "0"):
        monkeypatch.setenv(cutlass.ENV, mode)
        outs[mode] = torch.ops.moe_compiler.experts_quantized(*dev, **QuantizedExpertsSpec().op_kwargs()).float().cpu()
    assert calls == [cutlass.FP8_CONFIGS.index("coop_128x128_cluster1x2")]  # auto only
    want = w8a8_reference(*args[:3], w1, w2, group=128)
    assert rel_err(outs["auto"], want) <= 2e-2 and rel_err(outs["auto"], outs["0"]) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_the_op_on_cutlass_captures_and_replays_with_changing_routing(monkeypatch):
    """The experts_quantized op forced onto the CUTLASS GEMMs, captured once: each replay with new routing and
    activations equals the eager op bit for bit (per-expert arguments rebuilt on the device at every replay)."""
    monkeypatch.setenv(cutlass.ENV, "1")
    T, H, I, E, k = 256, 256, 128, 16, 4
    kwargs = QuantizedExpertsSpec().op_kwargs()
    args, _ = quantized_experts_inputs(T, H, I, E, k, torch.bfloat16, seed=0)
    dev = [a.cuda() for a in args]
    op = torch.ops.moe_compiler.experts_quantized
    graph, out = captured(lambda: op(*dev, **kwargs))
    for seed in range(1, 4):
        new, _ = quantized_experts_inputs(T, H, I, E, k, torch.bfloat16, seed=seed)
        for i in range(3):  # hidden, ids, weights
            dev[i].copy_(new[i])
        replay(graph, out)
        assert torch.equal(out, op(*dev, **kwargs))
