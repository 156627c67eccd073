"""transformers' FP8Linear layers through linear_quantized (no Hub kernel, no network).

An FP8 checkpoint quantizes more than its experts: attention, dense-MLP and shared-expert projections load as
transformers' `FP8Linear`, whose forward runs Triton kernels downloaded from the Hub at run time (`kernels`
package); where those cannot load the model cannot run at all. Unlike the experts modules, FP8Linear has no
implementation interface to register with, so `use_fused_linears` gives each such module our subclass
(`module.__class__`, same parameters read in place, still an FP8Linear to transformers), whose forward calls
`torch.ops.moe_compiler.linear_quantized`. `moe_compiler.from_pretrained` does this after loading.
"""

from __future__ import annotations

import functools

import torch

from ..spec import QuantizedLinearSpec


def spec_of(module) -> QuantizedLinearSpec | str:
    """The op's spec for a transformers FP8Linear, or why it runs transformers' own forward."""
    if module.weight.dtype != torch.float8_e4m3fn:
        return f"weight of dtype {module.weight.dtype}"
    if getattr(module, "activation_scheme", "dynamic") != "dynamic":
        return f"activation_scheme={module.activation_scheme!r} (static activation scales)"
    block = getattr(module, "block_size", None)
    if block is None:  # one scale for the whole weight
        return QuantizedLinearSpec(scale_block_n=module.weight.shape[0], scale_block_k=module.weight.shape[1])
    return QuantizedLinearSpec(scale_block_n=int(block[0]), scale_block_k=int(block[1]))


@functools.cache
def fused_class():
    """FusedFP8Linear: transformers' FP8Linear whose forward is linear_quantized (made once, on first use)."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    class FusedFP8Linear(FP8Linear):
        # The layer's spec_of, taken when use_fused_linears re-classes it (not per call: eager decode runs
        # hundreds of these layers per token).
        quantized_spec: QuantizedLinearSpec | str

        def forward(self, input):
            spec = self.quantized_spec
            if isinstance(spec, str):
                return super().forward(input)
            scale = self.weight_scale_inv
            if scale.dim() == 0:
                scale = scale.view(1, 1)
            return torch.ops.moe_compiler.linear_quantized(input, self.weight, scale, self.bias, **spec.op_kwargs())

    return FusedFP8Linear


def use_fused_linears(model: torch.nn.Module) -> int:
    """Point every transformers FP8Linear in `model` at linear_quantized; returns how many there were."""
    try:
        from transformers.integrations.finegrained_fp8 import FP8Linear
    except ImportError:
        return 0
    fused, count = fused_class(), 0
    for module in model.modules():
        if type(module) is FP8Linear:
            module.__class__ = fused
            module.quantized_spec = spec_of(module)
            count += 1
    return count
