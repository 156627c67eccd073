"""lowering/dispatch.py: which implementation runs each op, from static facts only; on the GPU, both Triton
paths compute the same thing at real model shapes."""

from __future__ import annotations

import json

import pytest
import torch
from config_files import SMALL, write_config_file
from triton_cases import DEVICE, device_inputs

from moe_compiler import ExpertsSpec
from moe_compiler.lowering import cutlass, device, dispatch, triton_config
from moe_compiler.lowering.torch_segment_mm import GatherBmm, GroupedMM, LoopMM
from moe_compiler.spec import SharedMLP
from moe_compiler.testing import (
    cuda_experts_inputs,
    experts_inputs,
    experts_reference_by_expert,
    poisoned_run,
    rel_err,
)
from moe_compiler.tune.shapes import SHAPES

# The tests that call the Triton forwards directly run where Triton does (triton_cases.DEVICE: the GPU, or the CPU
# interpreter). A library GEMM path takes bf16 on the GPU (torch._grouped_mm on sm90), fp32 in the interpreter.
LIBRARY_DTYPE, LIBRARY_TOL = (torch.bfloat16, 1e-2) if DEVICE == "cuda" else (torch.float32, 1e-5)


def test_cpu_selection_by_alignment():
    hidden, _, _, w1, w2, _, _ = experts_inputs(2, 16, 8, 4, 2, torch.bfloat16)  # 32-byte rows
    assert dispatch.select(hidden, w1, w2) is GroupedMM
    hidden, _, _, w1, w2, _, _ = experts_inputs(2, 24, 12, 4, 2, torch.bfloat16)  # I = 12: 24-byte rows
    assert dispatch.select(hidden, w1, w2) is LoopMM


def test_token_bands_cover_every_length_once_and_a_plain_count_is_its_own_config_point():
    bands = [triton_config.band(T) for T in range(1, 20000)]
    assert sorted(set(bands)) == [(1, 16), (17, 256), (257, 4096), (4097, None)]
    assert all(lo <= T and (hi is None or T <= hi) for T, (lo, hi) in enumerate(bands, start=1))
    assert triton_config.config_tokens(300) == (300, 300)


@pytest.mark.parametrize("hint, want", [
    (3, (4, 16, ["<= 16"])), (40, (64, 256, [">= 17", "<= 256"])), (480, (1024, 4096, [">= 257", "<= 4096"])),
    (2016, (1024, 4096, [">= 257", "<= 4096"])), (5000, (16384, None, [">= 4097"]))])
def test_symbolic_count_takes_its_band_s_point_whatever_length_traced_it(hint, want):
    # a graph compiled at 480 tokens serves 2048 too: both take the 1024 config (a config of the traced length ran
    # 2048-token prompts with 512's tiles, benchmarks/NOTES.md session 24), under guards keeping T in the band
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    T = env.create_symintnode(env.create_symbol(hint, ConstantSource("T"), DimDynamic.DYNAMIC), hint=hint)
    point, highest, guards = want
    assert triton_config.config_tokens(T) == (point, highest)
    assert [str(g.expr).split(" ", 1)[1] for g in env.guards] == guards


def test_decode_kernels_take_only_small_shared_mlps():
    """dispatch.SHARED_IN_KERNEL_MAX_BYTES: in the kernels where it measured faster (Qwen3-Next's 6 MB shared
    MLP), cuBLAS in the op where it did not (DeepSeek-V3's 88 MB)."""

    def mlp(H, Is):
        w = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")  # noqa: E731
        return SharedMLP(w(Is, H), w(Is, H), w(H, Is), None)

    assert dispatch._shared_in_kernel(mlp(2048, 512))
    assert not dispatch._shared_in_kernel(mlp(7168, 2048))


def test_triton_backward_by_default_equals_the_torch_backward(monkeypatch):
    """Where the Triton kernels run (the GPU, or interpreted on the CPU with uses_triton forced) the experts
    backward is triton_backward.py unless MOE_COMPILER_BACKWARD=torch; its gradients equal the torch backward's.
    A bad value is a clear error."""
    pytest.importorskip("triton")
    spec = ExpertsSpec()
    _, (hidden, ids, weights, w1, w2, _, _) = device_inputs(7, 32, 16, 4, 2, torch.float32, spec, seed=2)
    grad_out = torch.randn(7, 32, device=DEVICE)
    args = (grad_out, hidden, ids, weights, w1, w2, None, None, spec)
    monkeypatch.setenv(dispatch.BACKWARD_ENV, "torch")
    want = dispatch.experts_backward(*args)
    monkeypatch.setattr(device, "uses_triton", lambda t: True)
    monkeypatch.delenv(dispatch.BACKWARD_ENV)
    calls = []
    from moe_compiler.lowering import triton_backward

    real = triton_backward.experts_backward
    monkeypatch.setattr(triton_backward, "experts_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = dispatch.experts_backward(*args)
    assert calls == [1]
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or rel_err(g, w) <= 1e-4)
    # The route backward follows the same switch (one launch instead of the torch ops).
    route_calls = []
    from moe_compiler.lowering import triton_route
    from moe_compiler.spec import RouterSpec

    real_route = triton_route.route_backward
    monkeypatch.setattr(triton_route, "route_backward", lambda *a: route_calls.append(1) or real_route(*a))
    logits, spec_r = torch.randn(5, 8, device=DEVICE), RouterSpec(top_k=2, norm_topk_prob=True)
    _, ids_r = dispatch.torch_route.route_forward(logits, None, spec_r)
    got_r = dispatch.route_backward(torch.randn(5, 2, device=DEVICE), logits, ids_r, spec_r)
    assert route_calls == [1] and got_r.shape == (5, 8)
    monkeypatch.setenv(dispatch.BACKWARD_ENV, "cutlass")
    with pytest.raises(ValueError, match="expected 'triton' .* or 'torch'"):
        dispatch.experts_backward(*args)


def test_grouped_mm_config_runs_torchs_grouped_gemm_or_falls_back(monkeypatch):
    """A table entry naming torch's grouped GEMM runs triton_grouped over GroupedMM where its operands suit it
    (here: the CPU's torch._grouped_mm), the Triton default where they do not; the op then stays one call."""
    pytest.importorskip("triton")
    from moe_compiler.lowering import triton_grouped
    from moe_compiler.testing import experts_reference

    spec = ExpertsSpec()
    grouped = triton_config.GroupedMMConfig()
    ran = []
    real = triton_grouped.experts_forward
    monkeypatch.setattr(triton_grouped, "experts_forward",
                        lambda impl, *a, **kw: ran.append(impl) or real(impl, *a, **kw))
    inputs, dev = device_inputs(9, 16, 8, 4, 2, LIBRARY_DTYPE, spec, seed=4)  # 16-byte rows: GroupedMM
    want = experts_reference(*inputs, spec=spec)
    out = dispatch.triton_forward(*dev, spec, grouped)
    assert ran == [GroupedMM] and rel_err(out.cpu(), want) <= LIBRARY_TOL
    ran.clear()
    monkeypatch.setattr(dispatch, "select", lambda *a: LoopMM)  # operands torch._grouped_mm would refuse
    out = dispatch.triton_forward(*dev, spec, grouped)
    assert ran == [] and rel_err(out.cpu(), want) <= LIBRARY_TOL
    monkeypatch.setattr(device, "uses_triton", lambda t: True)
    monkeypatch.setattr(dispatch, "triton_config_for", lambda *a: grouped)
    assert not dispatch.experts_inlinable(inputs[0], inputs[1], inputs[3], inputs[4], spec)


def _tuned_sorted_config(monkeypatch, tma: bool):
    """Every lookup gives a sorted-path config, with weight tiles by TMA or not, on a GPU that runs Triton."""
    small = triton_config.KernelConfig(16, 16)
    config = triton_config.SortedConfig(block_m=64, gate_up=small, down=small, tma=tma)
    monkeypatch.setattr(device, "uses_triton", lambda t: True)
    monkeypatch.setattr(dispatch, "triton_config_for", lambda *a: config)


@pytest.mark.parametrize("shape, T, tma, recorded_tma, inlinable, keeps_tma", [
    ((128, 8, 2048, 768), 1024, True, "1", True, False),  # Qwen3-30B-A3B, 7.7e10 FLOP: pointer loads ~1-6% faster
    ((8, 2, 4096, 14336), 1024, True, "1", True, True),  # Mixtral-8x7B, 7.2e11: TMA's 5-9%, descriptors on the device
    ((8, 2, 4096, 14336), 1024, True, "0", False, False),  # ... or, recorded TMA off, worth the opaque host path
    ((8, 2, 4096, 14336), 1024, False, "0", True, False),  # ... and a config without TMA loses nothing when recorded
    ((128, 8, 2048, 768), 1024, True, "0", True, False),
])
def test_a_traced_tma_call_keeps_tma_only_where_its_gemms_are_long(shape, T, tma, recorded_tma, inlinable, keeps_tma,
                                                                   monkeypatch):
    """A recorded call cannot keep host TMA descriptors: a TMA config's call loads by pointer up to
    INLINE_TMA_MAX_FLOP of GEMM work; above it its kernels build the descriptors on the device (recorded TMA, the
    default), or with MOE_COMPILER_RECORDED_TMA=0 the call stays opaque to keep host descriptors."""
    E, k, H, I = shape
    monkeypatch.setenv("MOE_COMPILER_RECORDED_TMA", recorded_tma)
    _tuned_sorted_config(monkeypatch, tma)
    meta = dict(device="meta", dtype=torch.bfloat16)
    hidden, ids = torch.empty(T, H, **meta), torch.empty(T, k, device="meta", dtype=torch.int64)
    w_gate_up, w_down = torch.empty(E, 2 * I, H, **meta), torch.empty(E, H, I, **meta)
    assert (6 * T * k * H * I <= dispatch.INLINE_TMA_MAX_FLOP) == (shape[0] == 128)
    assert (tma and dispatch.traced_tma(T, k, H, I)) is keeps_tma
    assert dispatch.experts_inlinable(hidden, ids, w_gate_up, w_down, ExpertsSpec()) is inlinable


@pytest.mark.parametrize("shape, hint, inlinable", [
    ((8, 2, 4096, 14336), 300, False),  # Mixtral traced at 300 tokens (2.1e11 FLOP) serves up to 4096: 7.2e11 at 1024
    ((128, 8, 4096, 1536), 4000, True),  # Qwen3-235B-A22B traced at 4000 (1.2e12) runs the 1024 point's tiles: 3.1e11
])
def test_a_symbolic_tma_call_is_judged_at_its_band_s_point_not_its_traced_length(shape, hint, inlinable, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    E, k, H, I = shape
    monkeypatch.setenv("MOE_COMPILER_RECORDED_TMA", "0")  # (the rule that keeps a call opaque)
    _tuned_sorted_config(monkeypatch, tma=True)
    env, T = _symbolic_tokens(hint)
    with FakeTensorMode(shape_env=env):
        hidden, ids = torch.empty(T, H, dtype=torch.bfloat16), torch.empty(T, k, dtype=torch.int64)
        w_gate_up, w_down = torch.empty(E, 2 * I, H, dtype=torch.bfloat16), torch.empty(E, H, I, dtype=torch.bfloat16)
        assert (6 * hint * k * H * I <= dispatch.INLINE_TMA_MAX_FLOP) != inlinable
        assert dispatch.experts_inlinable(hidden, ids, w_gate_up, w_down, ExpertsSpec()) is inlinable


def _symbolic_tokens(hint: int):
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    return env, env.create_symintnode(env.create_symbol(hint, ConstantSource("T"), DimDynamic.DYNAMIC), hint=hint)


@pytest.mark.parametrize("band_path", ["sorted", "cutlass"])
def test_a_symbolic_length_takes_its_band_s_entry_and_a_static_one_its_grid_point_s(band_path, config_dir, monkeypatch):
    """GPU A's table (conftest.config_dir) has one shape, sorted with TMA at 1024 tokens; its band entry for 257-4096
    tokens, measured by tune --bands, is another config. A prompt length traced as a symbol at 2000 tokens takes the
    band entry; the same length as a plain int, the grid point's entry. A CUTLASS band entry runs only where the
    extension can be built: otherwise the band keeps its point's tuned entry."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    banded = {"sorted": {"path": "sorted", "block_m": 128, "gate_up": SMALL, "down": SMALL},
              "cutlass": {"path": "cutlass", "config": 2}}[band_path]
    entries = json.loads((config_dir / "GPU_A.json").read_text())["entries"]
    band = {"dtype": "bfloat16", "E": 64, "k": 4, "H": 512, "I": 256, "band": [257, 4096], "config": banded}
    write_config_file(config_dir, "GPU A", [9, 0], entries, bands=[band])
    for name, value in (("index", 0), ("gpu_name", "GPU A"), ("capability", (9, 0))):
        monkeypatch.setattr(device, name, lambda *a, v=value: v)
    monkeypatch.setenv(triton_config.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(dispatch, "_CONFIGS", {})
    point = triton_config.from_dict(entries[1]["config"])
    for buildable in (True, False):
        monkeypatch.setattr(cutlass, "missing", lambda b=buildable: None if b else "no nvcc")
        dispatch._CONFIGS.clear()
        env, T = _symbolic_tokens(2000)
        with FakeTensorMode(shape_env=env):
            hidden, ids = torch.empty(T, 512, dtype=torch.bfloat16), torch.empty(T, 4, dtype=torch.int64)
            w_gate_up = torch.empty(64, 512, 512, dtype=torch.bfloat16)
            traced = dispatch.triton_config_for(hidden, ids, w_gate_up, 256)
        runs = buildable or band_path == "sorted"
        assert traced == (triton_config.from_dict(banded) if runs else point)
        static = torch.empty(2000, 512, dtype=torch.bfloat16, device="meta")
        static_ids = torch.empty(2000, 4, device="meta")
        assert dispatch.triton_config_for(static, static_ids, w_gate_up.to("meta"), 256) == point


@pytest.mark.parametrize("entry", ["grouped_mm", "decode"])
def test_a_training_forward_saves_z_on_the_tuned_library_path_or_the_sorted_one(entry, monkeypatch):
    """experts_forward_saving_z: a grouped_mm entry runs triton_grouped (saving z in its act pass), a decode entry
    the sorted path (z from the gate_up epilogue); out and z against the fp64 reference either way."""
    pytest.importorskip("triton")
    from moe_compiler.lowering import triton_experts, triton_grouped
    from moe_compiler.testing import experts_reference, pre_activations

    spec = ExpertsSpec()
    small = triton_config.KernelConfig(16, 16)
    config = triton_config.GroupedMMConfig() if entry == "grouped_mm" else triton_config.DecodeConfig(small, small)
    monkeypatch.setattr(dispatch, "triton_config_for", lambda *a: config)
    ran = []
    for module in (triton_grouped, triton_experts):
        def spy(*a, real=module.experts_forward, m=module, **kw):
            ran.append(m)
            return real(*a, **kw)

        monkeypatch.setattr(module, "experts_forward", spy)
    inputs, dev = device_inputs(9, 16, 8, 4, 2, LIBRARY_DTYPE, spec, seed=5)
    out, z = dispatch.experts_forward_saving_z(*dev, spec)
    assert ran == [triton_grouped if entry == "grouped_mm" else triton_experts]
    assert rel_err(out.cpu(), experts_reference(*inputs, spec=spec)) <= LIBRARY_TOL
    assert rel_err(z.cpu(), pre_activations(inputs[0], inputs[1], inputs[3], None, spec)) <= LIBRARY_TOL


def test_cutlass_config_runs_its_tiles_or_the_triton_default(monkeypatch):
    """A table entry naming csrc/'s grouped GEMM with config i runs triton_grouped over it (here a stand-in for
    the extension records the config each GEMM got) where CUTLASS runs, the Triton default where it does not
    (not built, not sm90, MOE_COMPILER_CUTLASS=0); the op stays one call."""
    pytest.importorskip("triton")
    from moe_compiler.testing import experts_reference

    spec = ExpertsSpec()
    entry = triton_config.from_dict({"path": "cutlass", "config": 2})
    assert entry == triton_config.CutlassConfig(2) and triton_config.to_dict(entry) == {"config": 2, "path": "cutlass"}
    with pytest.raises(ValueError, match="an index into"):
        triton_config.CutlassConfig(len(cutlass.CONFIGS))
    configs = []

    class FakeExtension:
        @staticmethod
        def grouped_mm(x, w, offs, b_nk, config):
            configs.append(config)
            return torch._grouped_mm(x, w.transpose(-2, -1) if b_nk else w, offs=offs)

    monkeypatch.setattr(cutlass, "load", lambda: FakeExtension)
    monkeypatch.setattr(cutlass, "runs", lambda *a: True)
    inputs, dev = device_inputs(9, 16, 8, 4, 2, LIBRARY_DTYPE, spec, seed=4)
    want = experts_reference(*inputs, spec=spec)
    out = dispatch.triton_forward(*dev, spec, entry)
    assert configs == [2, 2] and rel_err(out.cpu(), want) <= LIBRARY_TOL
    configs.clear()
    monkeypatch.setattr(cutlass, "runs", lambda *a: False)
    out = dispatch.triton_forward(*dev, spec, entry)
    assert configs == [] and rel_err(out.cpu(), want) <= LIBRARY_TOL
    monkeypatch.setattr(device, "uses_triton", lambda t: True)
    monkeypatch.setattr(dispatch, "triton_config_for", lambda *a: entry)
    assert not dispatch.experts_inlinable(inputs[0], inputs[1], inputs[3], inputs[4], spec)


@pytest.mark.gpu
def test_cuda_forward_takes_triton_and_backward_the_capture_safe_composite(monkeypatch):
    hidden, _, _, w1, w2 = cuda_experts_inputs(4, 8, 2, 256, 128)
    assert device.uses_triton(hidden)
    assert dispatch.select(hidden, w1, w2) is GroupedMM  # the backward's segment matmuls
    assert dispatch.select(hidden.float(), w1.float(), w2.float()) is GatherBmm
    monkeypatch.setenv(device.KERNELS_ENV, "torch")
    assert not device.uses_triton(hidden)
    monkeypatch.setenv(device.KERNELS_ENV, "cutlass")
    with pytest.raises(ValueError, match="expected 'triton' or 'torch'"):
        device.uses_triton(hidden)


@pytest.mark.gpu
@pytest.mark.big_gpu
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("T", [1, 5, 64])
def test_both_triton_paths_at_real_shapes(shape, T):
    """The decode path, the sorted path and torch's grouped GEMM with Triton glue compute the same thing, whichever
    the config table picks."""
    from moe_compiler.lowering.triton_config import (
        DecodeConfig,
        GroupedMMConfig,
        KernelConfig,
        SortedConfig,
    )

    E, k, H, I = SHAPES[shape]
    hidden, ids, weights, w1, w2 = cuda_experts_inputs(T, E, k, H, I, seed=100 + T)
    ref = experts_reference_by_expert(hidden, ids, weights, w1, w2)
    decode = DecodeConfig(KernelConfig(32, 256), KernelConfig(8, 128, num_warps=8))
    tiles = SortedConfig(16, KernelConfig(64, 128, 4, 4), KernelConfig(64, 128, 4, 4), programs_per_sm=2)
    for config in (decode, tiles, GroupedMMConfig()):
        args = (hidden, ids, weights, w1, w2, None, None, ExpertsSpec(), config)
        out = poisoned_run(lambda: dispatch.triton_forward(*args))
        assert rel_err(out, ref) <= 1e-2, config
