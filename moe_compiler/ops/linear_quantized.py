"""`torch.ops.moe_compiler.linear_quantized`: an nn.Linear over a block-scaled FP8 weight, read in place.

    linear_quantized(x, weight, weight_scale, bias=None, *, weight_format="fp8_e4m3", scale_block_n=128,
                     scale_block_k=128) -> y [..., N]

    y = x @ (weight * scale per block)^T + bias                                   (spec.QuantizedLinearSpec)

transformers' FP8Linear (the attention, dense-MLP and shared-expert projections of an FP8 checkpoint) runs Triton
kernels it downloads from the Hub; integrations/hf_linear.py points those modules here instead, so an FP8 model
runs with no network. Inference only, like experts_quantized.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lowering import device
from ..spec import QuantizedLinearSpec
from . import checks, inline
from .signature import SIGNATURES, QuantizedLinearTensors, make_spec, schema


def bind(tensors: tuple, spec_kwargs: dict) -> tuple[QuantizedLinearTensors, QuantizedLinearSpec]:
    t = QuantizedLinearTensors(*tensors)
    spec = make_spec(QuantizedLinearSpec, spec_kwargs)
    checks.check_quantized_linear(t.x, t.weight, t.weight_scale, t.bias, spec)
    return t, spec


def forward(t: QuantizedLinearTensors, spec: QuantizedLinearSpec) -> Tensor:
    from ..lowering import torch_quantized

    x = t.x.reshape(-1, t.x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    args = (x, t.weight, t.weight_scale, t.bias, spec.scale_block_n, spec.scale_block_k)
    if device.uses_triton(x):
        from ..lowering import triton_linear_fp8

        y = triton_linear_fp8.linear_forward(*args)
    else:
        y = torch_quantized.linear_forward(*args)
    return y.reshape(*t.x.shape[:-1], t.weight.shape[0])


@torch.library.custom_op(
    "moe_compiler::linear_quantized", mutates_args=(),
    schema=schema(QuantizedLinearTensors, QuantizedLinearSpec, "Tensor"),
)
def linear_quantized(*tensors, **spec) -> Tensor:
    """y [..., N] in x's dtype; see the module docstring."""
    return forward(*bind(tensors, spec))


@linear_quantized.register_fake
def _(*tensors, **spec):
    t, _ = bind(tensors, spec)
    return t.x.new_empty(*t.x.shape[:-1], t.weight.shape[0])


def _inlinable(*tensors, **spec) -> bool:
    # (a symbolic row count, inline.hinted, splits the tiles at 16 rows by a guard of its own)
    t = QuantizedLinearTensors(*tensors)
    weights = (t.weight, t.weight_scale, t.bias)
    return inline.static(*weights) and inline.hinted(*t) and device.uses_triton(t.x)


inline.register(linear_quantized, _inlinable, lambda *tensors, **spec: forward(*bind(tensors, spec)))


def _no_backward(ctx, grad_out):
    raise NotImplementedError(
        "moe_compiler.linear_quantized has no backward: FP8 layers run inference only. Run the forward under "
        "torch.no_grad() / torch.inference_mode()."
    )


linear_quantized.register_autograd(_no_backward, setup_context=lambda ctx, inputs, keyword_only_inputs, output: None)
SIGNATURES[torch.ops.moe_compiler.linear_quantized.default] = (QuantizedLinearTensors, QuantizedLinearSpec)
