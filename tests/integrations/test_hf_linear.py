"""transformers' FP8Linear through linear_quantized (integrations/hf_linear.py, ops/linear_quantized.py): the op
against fp64, its checks, the class swap, and a model whose every Linear but lm_head is FP8, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from moe_compiler.integrations import hf_linear
from moe_compiler.lowering.torch_quantized import dequantize
from moe_compiler.testing import rel_err
from moe_compiler.testing.quantized import fp8_experts_model, quantize_fp8_blocks

OP = torch.ops.moe_compiler.linear_quantized.default


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu], ids=["fp32", "e8m0"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_op_matches_fp64(scale_dtype, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 72, generator=g) * 72**-0.5
    q, s = quantize_fp8_blocks(w, 16, 32, scale_dtype)
    x = torch.randn(2, 5, 72, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    y = OP(x, q, s, b, scale_block_n=16, scale_block_k=32)
    ref = x.double() @ dequantize(q, s, 16, 32).double().T + (b.double() if bias else 0)
    assert y.shape == (2, 5, 40) and rel_err(y, ref) <= 1e-6


def test_op_checks_say_expected_and_got():
    q, s = quantize_fp8_blocks(torch.randn(40, 72), 16, 32)
    with pytest.raises(ValueError, match=r"weight_scale: expected \[ceil\(40/8\), ceil\(72/32\)\]"):
        OP(torch.randn(3, 72), q, s, scale_block_n=8, scale_block_k=32)
    with pytest.raises(ValueError, match=r"weight: expected a \[N, K=64\] float8_e4m3fn tensor"):
        OP(torch.randn(3, 64), q, s, scale_block_n=16, scale_block_k=32)


def test_opcheck():
    q, s = quantize_fp8_blocks(torch.randn(40, 72), 16, 32)
    torch.library.opcheck(OP, (torch.randn(3, 72), q, s, torch.randn(40)), {"scale_block_n": 16, "scale_block_k": 32},
                          test_utils=("test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_every_fp8_linear_runs_the_op_eagerly_and_compiled(arch):
    model, reference = fp8_experts_model(arch, (32, 32), linears=True)
    from transformers.integrations.finegrained_fp8 import FP8Linear

    n_fp8 = sum(type(m) is FP8Linear for m in model.modules())
    assert n_fp8 > 0 and hf_linear.use_fused_linears(model) == n_fp8
    assert all(isinstance(m, FP8Linear) for m in model.modules() if type(m) is hf_linear.fused_class())
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(input_ids=ids).logits
        assert rel_err(model(input_ids=ids).logits, ref) <= 1e-5
        compiled = torch.compile(model, backend="fused_moe", fullgraph=True)
        assert rel_err(compiled(input_ids=ids).logits, ref) <= 1e-5
    assert torch._dynamo.utils.counters["moe_compiler"]["fused_experts_implementation"] == 2


def test_static_activation_scales_keep_transformers_forward():
    model, _ = fp8_experts_model("qwen3_moe", (32, 32), linears=True)
    hf_linear.use_fused_linears(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(hf_linear.spec_of(layer), hf_linear.QuantizedLinearSpec)
    layer.activation_scheme = "static"
    assert "static activation scales" in hf_linear.spec_of(layer)
