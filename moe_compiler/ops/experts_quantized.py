"""`torch.ops.moe_compiler.experts_quantized`: the experts op over block-scaled quantized weights, read in place
(the checkpoint's FP8 tensors and their scales: no dequantized copy is kept between calls).

    experts_quantized(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                      shared_gate_proj=None, shared_up_proj=None, shared_down_proj=None, shared_expert_gate=None,
                      *, <ExpertsSpec fields>, weight_format="fp8_e4m3", scale_block_n=128, scale_block_k=128)
        -> out [T, H]

    out = experts(hidden, ..., dequantize(w_gate_up), dequantize(w_down)) [+ shared MLP]   (spec.QuantizedExpertsSpec)

Its callers: the "fused_moe" experts implementation of transformers' quantized experts modules
(integrations/hf_experts.py), which Dynamo traces as one call; the pipeline then fuses the router and the shared
experts around it as around the experts op. Inference only: the weights are frozen by nature, and a forward
that needs gradients runs transformers' own experts forward instead (hf_experts.py says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lowering import device, dispatch
from ..spec import QuantizedExpertsSpec, SharedMLP
from . import checks, inline
from .experts import bind_shared
from .signature import SIGNATURES, QuantizedTensors, make_spec, schema


def bind(tensors: tuple, spec_kwargs: dict) -> tuple[QuantizedTensors, QuantizedExpertsSpec, SharedMLP | None]:
    t = QuantizedTensors(*tensors)
    spec = make_spec(QuantizedExpertsSpec, spec_kwargs)
    checks.check_quantized_experts(*t[:7], spec)
    return t, spec, bind_shared(t)


def forward(t: QuantizedTensors, spec: QuantizedExpertsSpec, shared: SharedMLP | None) -> Tensor:
    return dispatch.experts_quantized_forward(*t[:7], spec, shared)


@torch.library.custom_op(
    "moe_compiler::experts_quantized", mutates_args=(), schema=schema(QuantizedTensors, QuantizedExpertsSpec, "Tensor")
)
def experts_quantized(*tensors, **spec) -> Tensor:
    """out [T, H] in hidden's dtype; see the module docstring."""
    return forward(*bind(tensors, spec))


@experts_quantized.register_fake
def _(*tensors, **spec):
    t, _, _ = bind(tensors, spec)
    return t.hidden.new_empty(t.hidden.shape)


def _inlinable(*tensors, **spec) -> bool:
    # Sizes only (see experts.py): a traced call with static shapes, or a symbolic token count (inline.hinted), records
    # its launches (and its CUTLASS GEMMs as calls of their op: cutlass.py) — unless its Triton config loads by TMA
    # (host descriptors cannot be recorded outside Dynamo: dispatch.py).
    t = QuantizedTensors(*tensors)
    weights = (t.w_gate_up, t.w_gate_up_scale, t.w_down, t.w_down_scale)
    if not (inline.static(*weights) and inline.hinted(*t) and device.uses_triton(t.hidden)):
        return False
    from ..lowering import triton_quantized, triton_quantized_config

    qspec = make_spec(QuantizedExpertsSpec, spec)
    k, I = t.topk_ids.shape[1], t.w_gate_up.shape[1] // 2
    config = triton_quantized_config.default_config(t.hidden, t.w_gate_up.shape[0], k, qspec, I=I, weights=weights)
    return config.cutlass >= 0 or not triton_quantized.wants_tma(config, qspec)


inline.register(experts_quantized, _inlinable, lambda *tensors, **spec: forward(*bind(tensors, spec)))


def _no_backward(ctx, grad_out):
    raise NotImplementedError(
        "moe_compiler.experts_quantized has no backward: quantized experts run inference only. Run the forward "
        "under torch.no_grad() / torch.inference_mode(); for training through them, use transformers' own experts "
        "implementation (the fused_moe implementation hands gradient-needing forwards to it)."
    )


experts_quantized.register_autograd(_no_backward, setup_context=lambda ctx, inputs, keyword_only_inputs, output: None)
SIGNATURES[torch.ops.moe_compiler.experts_quantized.default] = (QuantizedTensors, QuantizedExpertsSpec)
