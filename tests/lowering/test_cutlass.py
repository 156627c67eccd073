"""lowering/cutlass.py and csrc/: the switch, why the path is off, and (GPU, sm90) the grouped GEMM against an fp32
reference — every config, both weight layouts, bf16 and fp16, experts with no rows, odd row counts, no rows at
all, capture and replay with changing routing, and the experts op forced onto it; the weight-gradient GEMM
(grouped_mm_wgrad) the same way."""

from __future__ import annotations

import os
import re

import pytest
import torch

from moe_compiler.lowering import cutlass, dispatch
from moe_compiler.lowering.torch_segment_mm import Segments
from moe_compiler.testing import rel_err
from moe_compiler.testing.cuda_graphs import captured, replay, reroute

ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def test_the_switch_takes_three_values_and_says_which(monkeypatch):
    for value in ("auto", "0", "1"):
        monkeypatch.setenv(cutlass.ENV, value)
        assert cutlass.mode() == value
    monkeypatch.setenv(cutlass.ENV, "yes")
    with pytest.raises(ValueError, match="expected 'auto'.*'0'.*'1'"):
        cutlass.mode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU reports")
def test_without_a_gpu_the_path_is_off_with_the_reason(monkeypatch):
    assert cutlass.missing() == "no CUDA GPU"
    with pytest.raises(RuntimeError, match="cannot be built: no CUDA GPU.*MOE_COMPILER_CUTLASS=0"):
        cutlass.load.__wrapped__()
    monkeypatch.setenv(cutlass.ENV, "1")  # forcing it changes nothing off the GPU: the CPU path runs
    w = torch.randn(4, 16, 8)
    assert dispatch.select(torch.randn(3, 8), w, w) is not cutlass.CutlassMM


def test_a_selection_that_wanted_cutlass_says_once_why_it_is_off(monkeypatch, caplog):
    """Where a tuned entry (or the FP8 rule) picks CUTLASS for operands it takes but the path cannot be built here
    (no nvcc, no headers), the Triton kernels run and one log line says why."""
    monkeypatch.setattr(cutlass, "missing", lambda: "no nvcc (install the CUDA toolkit or set CUDA_HOME)")
    monkeypatch.setattr(cutlass, "usable", lambda *tensors: True)
    cutlass._say_off.cache_clear()
    x = torch.randn(4, 8)
    with caplog.at_level("WARNING", logger="moe_compiler"):
        assert not cutlass.runs(x, x) and not cutlass.runs(x, x)
    lines = [r.getMessage() for r in caplog.records if "CUTLASS kernels are off" in r.getMessage()]
    assert len(lines) == 1 and "no nvcc" in lines[0] and "Triton kernels (in the training backward, torch's grouped " \
        "GEMM) run instead" in lines[0]
    monkeypatch.setenv(cutlass.ENV, "0")  # switched off: nothing was wanted, nothing to say
    cutlass._say_off.cache_clear()
    caplog.clear()
    assert not cutlass.runs(x, x) and not caplog.records


def _listed(macro: str) -> tuple[str, ...]:
    """The config names of one X-macro list of csrc/configs.h, in order."""
    header = open(os.path.join(cutlass.CSRC, "configs.h")).read()
    body = re.search(rf"#define {macro}\(X\)((?:.*\\\n)*.*)", header).group(1)
    return tuple(re.findall(r"X\((\w+), \w+\)", body))


def test_the_python_configs_are_the_cpp_ones():
    assert _listed("MOE_CUTLASS_CONFIGS") == cutlass.CONFIGS
    assert _listed("MOE_CUTLASS_FP8_CONFIGS") == cutlass.FP8_CONFIGS
    for name in cutlass.CONFIGS:  # each config's instances in a file of their own (built in parallel)
        assert f"MOE_CUTLASS_DEFINE({name}, " in open(os.path.join(cutlass.CSRC, f"grouped_gemm_{name}.cu")).read()
    for name in cutlass.FP8_CONFIGS:
        source = open(os.path.join(cutlass.CSRC, f"grouped_gemm_fp8_{name}.cu")).read()
        assert f"MOE_CUTLASS_FP8_DEFINE({name}, " in source
    assert _listed("MOE_CUTLASS_WGRAD_CONFIGS") == cutlass.WGRAD_CONFIGS
    assert set(cutlass.WGRAD_CONFIGS) <= set(cutlass.CONFIGS)  # the forward's tiles, the same struct names
    for name in cutlass.WGRAD_CONFIGS:
        source = open(os.path.join(cutlass.CSRC, f"grouped_gemm_wgrad_{name}.cu")).read()
        assert f"MOE_CUTLASS_WGRAD_DEFINE({name}, " in source
    with pytest.raises(ValueError, match=rf"not in \[0, {len(cutlass.CONFIGS) - 1}\]"):
        cutlass.with_config(len(cutlass.CONFIGS))
    with pytest.raises(ValueError, match=rf"weight-gradient config {len(cutlass.WGRAD_CONFIGS)} not in"):
        cutlass.with_wgrad_config(len(cutlass.WGRAD_CONFIGS))
    assert cutlass.with_wgrad_config(1).config == 1 and cutlass.with_wgrad_config(1).name == "cutlass_wgrad_" + (
        cutlass.WGRAD_CONFIGS[1])


def _reference(x, w, offs, b_nk):
    out, start = torch.zeros(x.shape[0], w.shape[1] if b_nk else w.shape[2], dtype=torch.float64), 0
    for e, end in enumerate(offs.tolist()):
        we = w[e].double()
        out[start:end] = x[start:end].double() @ (we.t() if b_nk else we)
        start = end
    return out


def _problem(counts, N, K, dtype, b_nk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), K, generator=gen).to(dtype)
    w = (torch.randn(len(counts), *((N, K) if b_nk else (K, N)), generator=gen) * K**-0.5).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, offs


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
@pytest.mark.parametrize("config", range(len(cutlass.CONFIGS)), ids=cutlass.CONFIGS)
@pytest.mark.parametrize("b_nk", [True, False], ids=["w_NK", "w_KN"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grouped_mm_against_fp64(config, b_nk, dtype):
    ops = cutlass.load()
    for counts, N, K in (([0, 7, 1, 300, 0, 129], 264, 136), ([1000] * 4, 2048, 768), ([3], 16, 8)):
        x, w, offs = _problem(counts, N, K, dtype, b_nk)
        out = ops.grouped_mm(x.cuda(), w.cuda(), offs.cuda(), b_nk, config)
        assert out.shape == (x.shape[0], N) and out.dtype == dtype
        assert rel_err(out.cpu(), _reference(x, w, offs, b_nk)) <= 1e-2, (counts, N, K)
    empty = ops.grouped_mm(x[:0].cuda(), w.cuda(), torch.zeros_like(offs).cuda(), b_nk, config)
    assert empty.shape == (0, N)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
@pytest.mark.parametrize("config", range(len(cutlass.CONFIGS)), ids=cutlass.CONFIGS)
def test_the_activation_in_the_up_gemms_epilogue_against_fp64(config):
    """CutlassMM.gate_up_silu (bf16): the gate GEMM over w_gate_up's first I rows, then the up GEMM over its last I
    rows storing silu(gate) * up (gate the epilogue's source), both halves read in place as views of [E, 2I, H]."""
    dtype = torch.bfloat16
    mm = cutlass.with_config(config, True)
    for counts, I, H in (([0, 7, 1, 300, 0, 129], 264, 136), ([1000] * 4, 768, 2048), ([3], 16, 8)):
        x, w, offs = _problem(counts, 2 * I, H, dtype, True, seed=config)
        seg = Segments(sorted_ids=None, perm=None, offs=offs.cuda(), num_experts=len(counts))
        a = mm.gate_up_silu(x.cuda(), w.cuda(), seg)
        h = _reference(x, w, offs, True)
        want = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        assert a.shape == (x.shape[0], I) and a.dtype == dtype
        assert rel_err(a.cpu(), want) <= 1e-2, (counts, I, H)
    empty = mm.gate_up_silu(x[:0].cuda(), w.cuda(), Segments(None, None, torch.zeros_like(offs).cuda(), w.shape[0]))
    assert empty.shape == (0, I)


def _wgrad_reference(a, b, offs):
    out, start = torch.empty(len(offs), a.shape[1], b.shape[1], dtype=torch.float64), 0
    for e, end in enumerate(offs.tolist()):
        out[e] = a[start:end].double().t() @ b[start:end].double()  # an expert without rows: 0
        start = end
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
@pytest.mark.parametrize("config", range(len(cutlass.WGRAD_CONFIGS)), ids=cutlass.WGRAD_CONFIGS)
def test_grouped_mm_wgrad_against_fp64(config):
    """out[e] = a_e^T b_e over each expert's rows: experts without rows get zeros (CUTLASS would store unwritten
    accumulators: the kernel gives them no tiles and zeroes them), odd row counts and sizes not a multiple of a tile,
    rows past offs[-1] never read, the output poisoned first."""
    ops = cutlass.load()
    for counts, M, N, tail in (([0, 0], 64, 32, 3), ([128] * 6, 2048, 768, 0), ([3], 16, 8, 0),
                               ([0, 7, 1, 300, 0, 129], 264, 136, 5)):
        gen = torch.Generator().manual_seed(config)
        S = sum(counts)
        a = torch.randn(S + tail, M, generator=gen).bfloat16()
        b = torch.randn(S + tail, N, generator=gen).bfloat16()
        b[S:] = float("nan")  # rows past the last expert's: never read
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        torch.cuda.empty_cache()
        torch.full((len(counts) * M * N + 4096,), float("nan"), device="cuda")  # poison what the allocator hands out
        out = ops.grouped_mm_wgrad(a.cuda(), b.cuda(), offs.cuda(), config)
        assert out.shape == (len(counts), M, N) and out.dtype == torch.bfloat16
        want = _wgrad_reference(a[:S], b[:S], offs)
        assert torch.isfinite(out).all(), (counts, M, N)
        for e, n in enumerate(counts):
            if n == 0:
                assert (out[e] == 0).all(), (counts, e)
        assert rel_err(out.cpu(), want) <= 1e-2, (counts, M, N)
    seg = Segments(sorted_ids=None, perm=None, offs=offs.cuda(), num_experts=len(counts))
    mm = cutlass.with_wgrad_config(config)
    assert rel_err(mm.wgrad(a.cuda(), b.cuda(), seg).cpu(), want) <= 1e-2  # bf16: ours
    assert rel_err(mm.wgrad(a.cuda().float(), b.cuda().float(), seg).cpu(), want) <= 1e-5  # fp32: torch's


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_grouped_mm_wgrad_in_a_captured_graph_with_changing_routing():
    ops = cutlass.load()
    E, M, N, S = 8, 256, 128, 512
    a = torch.randn(S, M, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(S, N, device="cuda", dtype=torch.bfloat16)
    offs = torch.empty(E, dtype=torch.int32, device="cuda")
    reroute(offs, S, 0)
    graph, out = captured(lambda: ops.grouped_mm_wgrad(a, b, offs, 1))
    for seed in (1, 2, 3):
        reroute(offs, S, seed)
        replay(graph, out)
        assert rel_err(out.cpu(), _wgrad_reference(a.cpu(), b.cpu(), offs.cpu())) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_bad_operands_get_clear_errors():
    ops = cutlass.load()
    x, w, offs = (t.cuda() for t in _problem([4, 4], 24, 16, torch.bfloat16, True))
    with pytest.raises(RuntimeError, match="int32 offs of E = 2"):
        ops.grouped_mm(x, w, offs.long(), True, 0)
    with pytest.raises(RuntimeError, match="does not reduce over K = 16"):
        ops.grouped_mm(x, w.transpose(1, 2).contiguous(), offs, True, 0)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ops.grouped_mm(x[:, :12].contiguous(), w[:, :, :12].contiguous(), offs, True, 0)
    n = len(cutlass.CONFIGS)
    with pytest.raises(RuntimeError, match=rf"config {n} not in \[0, {n - 1}\]"):
        ops.grouped_mm(x, w, offs, True, n)
    gate = torch.randn(8, 24, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"grouped_mm_silu_mul: expected a CUDA gate \[S, N\] = \[8, 24\]"):
        ops.grouped_mm_silu_mul(x, w, gate[:, :16], offs, 0)
    with pytest.raises(RuntimeError, match="gate must be a contiguous, 16-byte aligned tensor of x's dtype"):
        ops.grouped_mm_silu_mul(x, w, gate.half(), offs, 0)
    with pytest.raises(RuntimeError, match="expected bf16 x and w .the fused activation is built for bf16 only"):
        ops.grouped_mm_silu_mul(x.half(), w.half(), gate.half(), offs, 0)
    b = torch.randn(8, 24, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"grouped_mm_wgrad: expected a \[S, M\], b \[S, N\] \(the same rows\)"):
        ops.grouped_mm_wgrad(x, b[:7], offs, 0)
    with pytest.raises(RuntimeError, match="grouped_mm_wgrad: expected bf16 a and b"):
        ops.grouped_mm_wgrad(x.half(), b.half(), offs, 0)
    with pytest.raises(RuntimeError, match="grouped_mm_wgrad: rows must be 16-byte aligned"):
        ops.grouped_mm_wgrad(x[:, :12].contiguous(), b, offs, 0)
    with pytest.raises(RuntimeError, match="grouped_mm_wgrad: expected int32 offs"):
        ops.grouped_mm_wgrad(x, b, offs.long(), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_capture_and_replay_with_changing_routing():
    ops = cutlass.load()
    E, N, K, S = 8, 256, 128, 512
    x = torch.randn(S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    offs = torch.empty(E, dtype=torch.int32, device="cuda")
    reroute(offs, S, 0)
    graph, out = captured(lambda: ops.grouped_mm(x, w, offs, True, 0))
    for seed in (1, 2, 3):
        reroute(offs, S, seed)
        replay(graph, out)
        assert rel_err(out.cpu(), _reference(x.cpu(), w.cpu(), offs.cpu(), True)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="the CUTLASS kernels are sm90a")
def test_the_experts_op_forced_onto_cutlass(monkeypatch):
    from moe_compiler.spec import ExpertsSpec
    from moe_compiler.testing import experts_reference

    monkeypatch.setenv(cutlass.ENV, "1")
    calls = []
    real_mm = cutlass.CutlassMM.mm.__func__
    monkeypatch.setattr(cutlass.CutlassMM, "mm", classmethod(lambda cls, *a: calls.append(1) or real_mm(cls, *a)))
    gen = torch.Generator().manual_seed(0)
    T, E, k, H, I = 512, 16, 4, 256, 128
    x = torch.randn(T, H, generator=gen).bfloat16()
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k]
    ids[::5, 0] = E  # expert parallelism's sentinel: adds nothing
    w = torch.rand(T, k, generator=gen)
    w1 = (torch.randn(E, 2 * I, H, generator=gen) * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=gen) * I**-0.5).bfloat16()
    dev = [t.cuda() for t in (x, ids, w, w1, w2)]
    assert dispatch.select(dev[0], dev[3], dev[4]) is cutlass.CutlassMM
    out = torch.ops.moe_compiler.experts(*dev, **ExpertsSpec().op_kwargs())
    assert len(calls) == 2  # gate_up and down on CUTLASS, not the Triton kernels
    assert rel_err(out.float().cpu(), experts_reference(x, ids, w, w1, w2)) <= 1e-2
