"""torch.ops.moe_compiler.experts_quantized (ops/experts_quantized.py): against fp64 on the dequantized weights,
every scale format and block shape, the shared MLP, opcheck, bad inputs with their messages; on the GPU the
Triton FP8 kernels at bf16."""

from __future__ import annotations

import pytest
import torch

from moe_compiler import Activation, QuantizedExpertsSpec
from moe_compiler.testing import (
    experts_reference,
    experts_reference_by_expert,
    rel_err,
    shared_inputs,
    shared_reference,
)
from moe_compiler.testing.cuda_graphs import captured, replay
from moe_compiler.testing.quantized import quantize_fp8_blocks, quantized_experts_inputs

OP = torch.ops.moe_compiler.experts_quantized.default
E8M0 = torch.float8_e8m0fnu

# (block_n, block_k, scale dtype): DeepSeek's 128 x 128 with fp32 and e8m0 scales, blocks that cut H and I
# unevenly (ceil-sized scale grids), bf16 scales.
BLOCKS = [(128, 128, torch.float32), (128, 128, E8M0), (32, 16, torch.float32), (16, 32, torch.bfloat16),
          (24, 40, torch.float32)]


@pytest.mark.parametrize("bn,bk,scale_dtype", BLOCKS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("T,H,I,E,k", [(7, 64, 48, 6, 2), (1, 40, 24, 5, 3), (0, 16, 8, 4, 2)])
def test_matches_fp64_on_the_dequantized_weights(bn, bk, scale_dtype, T, H, I, E, k):
    args, (w1, w2) = quantized_experts_inputs(T, H, I, E, k, torch.float32, bn, bk, scale_dtype, seed=T + bn)
    spec = QuantizedExpertsSpec(scale_block_n=bn, scale_block_k=bk)
    out = OP(*args, **spec.op_kwargs())
    assert out.shape == (T, H) and out.dtype == torch.float32
    if T:
        assert rel_err(out, experts_reference(*args[:3], w1, w2)) <= 1e-5


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_int4_matches_fp64_on_the_dequantized_weights(scale_dtype):
    args, (w1, w2) = quantized_experts_inputs(7, 96, 64, 6, 2, torch.float32, 1, 32, scale_dtype,
                                              weight_format="int4_packed")
    assert args[3].dtype == torch.int32 and args[3].shape == (6, 128, 12) and args[4].shape == (6, 128, 3)
    spec = QuantizedExpertsSpec(weight_format="int4_packed", scale_block_n=1, scale_block_k=32)
    assert rel_err(OP(*args, **spec.op_kwargs()), experts_reference(*args[:3], w1, w2)) <= 1e-5


def test_int4_packing_is_compressed_tensors_layout():
    # Word j holds values 8j .. 8j+7, value 8j+t at bits 4t, stored + 8 (compressed-tensors' pack_to_int32).
    from moe_compiler.lowering.torch_quantized import unpack_int4
    from moe_compiler.testing.quantized import pack_int4

    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]])
    assert int(pack_int4(q)[0, 0]) == int.from_bytes(bytes([0x10, 0x98, 0xBA, 0xFE]), "little", signed=True)
    q = torch.randint(-8, 8, (3, 4, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_quantization_is_what_the_checkpoint_holds():
    # The op reads the weights the checkpoint holds: relative to the unquantized weights, FP8 costs ~4%.
    args, (w1, w2) = quantized_experts_inputs(9, 256, 128, 4, 2, torch.float32)
    from moe_compiler.testing import experts_inputs

    *_, o1, o2, _, _ = experts_inputs(9, 256, 128, 4, 2, torch.float32)
    assert 1e-3 < rel_err(w1, o1) < 6e-2 and 1e-3 < rel_err(w2, o2) < 6e-2


@pytest.mark.parametrize("activation", [Activation.GELU, Activation.GPT_OSS_SWIGLU])
def test_activations(activation):
    args, (w1, w2) = quantized_experts_inputs(5, 32, 16, 4, 2, torch.float32, 16, 16)
    spec = QuantizedExpertsSpec(activation=activation, swiglu_limit=1.0, scale_block_n=16, scale_block_k=16)
    ref = experts_reference(*args[:3], w1, w2, spec=spec.experts())
    assert rel_err(OP(*args, **spec.op_kwargs()), ref) <= 1e-5


def test_shared_mlp_joins_the_quantized_experts():
    args, (w1, w2) = quantized_experts_inputs(6, 32, 16, 4, 2, torch.float32, 16, 16)
    (gate, up), down, egate = shared_inputs(32, 24, torch.float32, fused=False, gated=True)
    spec = QuantizedExpertsSpec(scale_block_n=16, scale_block_k=16)
    out = OP(*args, gate, up, down, egate, **spec.op_kwargs())
    ref = experts_reference(*args[:3], w1, w2) + shared_reference(args[0], [gate, up], down, egate)
    assert rel_err(out, ref) <= 1e-5


def test_opcheck():
    args, _ = quantized_experts_inputs(5, 32, 16, 4, 2, torch.float32, 16, 16)
    # Not test_schema: it compares fp8 tensors with mul, which the CPU does not implement for float8_e4m3fn.
    torch.library.opcheck(OP, args, QuantizedExpertsSpec(scale_block_n=16, scale_block_k=16).op_kwargs(),
                          test_utils=("test_faketensor", "test_autograd_registration"))


def test_backward_says_what_to_do():
    args, _ = quantized_experts_inputs(3, 32, 16, 4, 2, torch.float32, 16, 16)
    hidden = args[0].clone().requires_grad_()
    out = OP(hidden, *args[1:], scale_block_n=16, scale_block_k=16)
    with pytest.raises(NotImplementedError, match="inference only"):
        out.sum().backward()


def _bad(change, match):
    args, _ = quantized_experts_inputs(3, 32, 16, 4, 2, torch.float32, 16, 16)
    args = list(args)
    kwargs = {"scale_block_n": 16, "scale_block_k": 16}
    change(args, kwargs)
    with pytest.raises(ValueError, match=match):
        OP(*args, **kwargs)


def test_bad_inputs_say_expected_and_got():
    _bad(lambda a, kw: a.__setitem__(3, a[3].float()), r"w_gate_up: expected a 3-D float8_e4m3fn tensor")
    _bad(lambda a, kw: kw.update(scale_block_n=8), r"w_gate_up_scale shape: expected \[E=4, ceil\(32/8\)=4")
    _bad(lambda a, kw: a.__setitem__(4, a[4].half()), r"w_gate_up_scale dtype: expected float32, bfloat16")
    _bad(lambda a, kw: a.__setitem__(0, a[0][:, :16]), r"weight shapes: expected w_gate_up \[E, 2I, H=16\]")
    _bad(lambda a, kw: a.__setitem__(1, a[1][:2]), r"routing shapes")
    _bad(lambda a, kw: kw.update(weight_format="int4_packed"),
         r"w_gate_up: expected a 3-D int32 tensor \(int4_packed\)")
    with pytest.raises(ValueError, match="concatenated"):
        QuantizedExpertsSpec(transposed=True)


def test_out_of_range_ids_are_a_clear_error_on_the_cpu():
    args, _ = quantized_experts_inputs(3, 32, 16, 4, 2, torch.float32, 16, 16)
    args[1][0, 0] = 5  # 4 = E: the expert-parallel sentinel, valid
    with pytest.raises(ValueError, match=r"topk_ids values: expected expert ids in \[0, 4\] .* got min 0, max 5"):
        OP(*args, scale_block_n=16, scale_block_k=16)


def test_quantize_round_trip_is_within_fp8_precision():
    w = torch.randn(3, 40, 72)
    for scale_dtype in (torch.float32, E8M0):
        q, s = quantize_fp8_blocks(w, 16, 32, scale_dtype)
        assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (3, 3, 3)
        from moe_compiler.lowering.torch_quantized import dequantize

        assert rel_err(dequantize(q, s, 16, 32), w) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["w8a16", "w8a8_tile", "w8a8_rows"])
@pytest.mark.parametrize("T", [1, 37, 2048])
def test_triton_fp8_on_the_gpu_bf16(act, T):
    """DeepSeek-V3-like blocks at bf16: w8a16 within bf16's bound of the fp64 result on the dequantized weights;
    w8a8 (the sorted path at every T, either way of quantizing) within 2e-2 of fp64 with its activation rounding
    simulated. Not 1e-2: the kernel rounds its fp32 gate/up to bf16 and then to e4m3, the reference its fp64
    ones, and where the bf16 roundings differ (1 bf16 ulp) an e4m3 rounding can flip by a whole e4m3 step
    (2^-3): ~1% on Gaussian data."""
    from moe_compiler.lowering import triton_quantized, triton_quantized_config
    from moe_compiler.testing.quantized import w8a8_reference

    H, I, E, k = 512, 256, 16, 4
    args, (w1, w2) = quantized_experts_inputs(T, H, I, E, k, torch.bfloat16, seed=T)
    dev = [a.cuda() for a in args]
    spec = QuantizedExpertsSpec()
    config = triton_quantized_config.default_config(dev[0], E, k, spec, I=I)
    import dataclasses

    config = dataclasses.replace(config, act=act)
    act_fp8 = config.act_fp8
    if act_fp8:
        config = dataclasses.replace(config, decode=False, block_m=16, block_n=128,  # sorted: a step in one block
                                     block_k=triton_quantized_config.step_k(spec.scale_block_k))
    out = triton_quantized.experts_forward(*dev, spec, config).cpu()
    exact = experts_reference_by_expert(*args[:3], w1, w2)
    ref = w8a8_reference(*args[:3], w1, w2, 128) if act_fp8 else exact
    assert rel_err(out, ref) <= (2e-2 if act_fp8 else 1e-2)
    # and the op itself (default config) on CUDA
    assert rel_err(OP(*dev, **spec.op_kwargs()).cpu(), exact) <= (
        1e-2 if not triton_quantized_config.default_config(dev[0], E, k, spec, I=I).act_fp8 else 8e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4_packed"])
@pytest.mark.parametrize("T", [1, 64, 256], ids=["decode", "sorted", "sorted-64-rows"])
def test_cuda_graph_capture_and_replay_with_changing_routing(fmt, T):
    """The op captured once in a CUDA graph; each replay with new routing and activations equals the eager op.
    (T = 256: 64 rows per expert, where FP8 loads by TMA on sm90 — host descriptors recorded into the graph.)"""
    int4 = fmt == "int4_packed"
    bn, bk = (1, 32) if int4 else (128, 128)
    args, _ = quantized_experts_inputs(T, 256, 128, 16, 4, torch.bfloat16, bn, bk, seed=0, weight_format=fmt)
    dev = [a.cuda() for a in args]
    kwargs = QuantizedExpertsSpec(weight_format=fmt, scale_block_n=bn, scale_block_k=bk).op_kwargs()
    graph, out = captured(lambda: OP(*dev, **kwargs))
    for seed in range(1, 4):
        new, _ = quantized_experts_inputs(T, 256, 128, 16, 4, torch.bfloat16, bn, bk, seed=seed, weight_format=fmt)
        for i in range(3):  # hidden, ids, weights
            dev[i].copy_(new[i])
        replay(graph, out)
        assert torch.equal(out, OP(*dev, **kwargs))
