"""The "fused_moe" experts implementation for transformers: how quantized experts reach our op.

transformers swaps a checkpoint's quantized experts for its own modules (FP8 finegrained: `FP8Experts`) whose
forward dispatches on `config._experts_implementation` through an `ExpertsInterface`. Their traceable forwards
cannot be matched here: the grouped_mm / batched_mm ones call Triton kernels that transformers downloads from
the Hub at run time (`kernels.get_kernel`; without the `kernels` package or network access they do not load,
and Dynamo cannot trace the download), and the eager one loops over the experts found by `nonzero()` (a graph
break per layer). So instead of recognizing a traced form we register an implementation: its forward calls
`torch.ops.moe_compiler.experts_quantized` with the module's own parameters (FP8 weights and block scales, read
in place), Dynamo traces that as one call, and the backend fuses the router and the shared experts around it.

    import moe_compiler
    moe_compiler.register_experts_implementation()           # or moe_compiler.from_pretrained(...)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="fused_moe", device_map="cuda")
    model = torch.compile(model, backend="fused_moe")

Unquantized experts modules given the same name run transformers' grouped_mm forward, which the backend matches
as it does for any model. A quantized module whose math the op cannot express (listed in `why_not`) runs
transformers' own eager forward, and says why once.
"""

from __future__ import annotations

import inspect
import logging

import torch

from ..spec import Activation, QuantizedExpertsSpec

log = logging.getLogger(__name__)

NAME = "fused_moe"

# config.hidden_act -> the gate activation; the module's act_fn must be transformers' class for that name.
_ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU, "gelu": Activation.GELU,
                "gelu_pytorch_tanh": Activation.GELU_TANH, "relu": Activation.RELU}


def register() -> None:
    """Register "fused_moe" with transformers' experts interfaces (idempotent; imports transformers)."""
    from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, dense_experts_forward)
    FP8ExpertsInterface.register(NAME, fp8_experts_forward)


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Unquantized experts: transformers' grouped_mm forward, which the backend recognizes and fuses."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)


def activation_fields(module) -> dict | str:
    """The ExpertsSpec fields (activation, and the clamp constants of the clamped form) of a transformers experts
    module's gate (FP8Experts._apply_gate, the default one of the others), or why it has none of ours."""
    from transformers.activations import ACT2CLS

    if getattr(module, "gate_softcap", None) is not None or getattr(module, "up_softcap", None) is not None:
        return "soft-capped gate/up (mlp_gate_softcap / mlp_up_softcap)"
    alpha = getattr(module, "swiglu_alpha", None)
    # The clamp bound: FP8Experts.swiglu_limit up to transformers 5.24, FP8Experts.limit (+ limit_after_act) from 5.25.
    limit = getattr(module, "swiglu_limit", None)
    if limit is None:
        limit = getattr(module, "limit", None)
    if alpha is not None:  # clamp gate and up, gate * sigmoid(alpha * gate) * (up + 1): GPT-OSS's form
        if limit is None:
            return "GPT-OSS-style gate (swiglu_alpha) without its clamp bound"
        return {"activation": Activation.GPT_OSS_SWIGLU, "swiglu_alpha": float(alpha), "swiglu_limit": float(limit)}
    if limit is not None and getattr(module, "limit_after_act", False):
        return f"clamped gate/up (limit={limit} after the activation, limit_after_act) without swiglu_alpha"
    config = module.config
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    act = _ACTIVATIONS.get(name)
    cls = ACT2CLS.get(name)
    cls = cls[0] if isinstance(cls, tuple) else cls
    if act is None or cls is None or type(module.act_fn) is not cls:
        return f"activation {name!r} ({type(module.act_fn).__name__}) is not one of {sorted(_ACTIVATIONS)}"
    if limit is not None:  # gate.clamp(max=L), up.clamp(-L, L), act(gate) * up: DeepSeek-V4's form
        if act is not Activation.SILU or not limit > 0:
            return f"clamped gate/up (limit={limit}) around {name!r}: the op clamps around SiLU only"
        return {"activation": Activation.SILU_CLAMPED, "swiglu_limit": float(limit)}
    return {"activation": act}


def spec_of(module) -> QuantizedExpertsSpec | str:
    """The op's spec for a transformers FP8Experts module, or the reason it cannot run as our op."""
    if not getattr(module, "has_gate", True):
        return "experts without a gate projection (up_proj only)"
    if getattr(module, "activation_scheme", "dynamic") != "dynamic":
        return f"activation_scheme={module.activation_scheme!r} (static activation scales)"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    w = getattr(module, "gate_up_proj", None)
    if w is None or w.dtype != torch.float8_e4m3fn or module.down_proj.dtype != torch.float8_e4m3fn:
        return f"weights of dtype {None if w is None else w.dtype} (float8_e4m3fn block-scaled weights only)"
    block = getattr(module, "block_size", None)
    if block is None or len(block) != 2:
        return f"block_size={block} (per-tensor scales; block-scaled weights only)"
    act = activation_fields(module)
    if isinstance(act, str):
        return act
    return QuantizedExpertsSpec(**act, scale_block_n=int(block[0]), scale_block_k=int(block[1]))


_warned: set[str] = set()


def _say_once(module, why: str) -> None:
    key = f"{type(module).__name__}: {why}"
    if key not in _warned:
        _warned.add(key)
        log.warning("moe_compiler: %s runs transformers' eager experts forward, not experts_quantized: %s",
                    type(module).__name__, why)


def fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers FP8Experts -> experts_quantized, reading gate_up_proj / down_proj and their scale_inv in place."""
    spec = spec_of(self)
    if isinstance(spec, str):
        torch._dynamo.disable(_say_once)(self, spec)  # (not traced; decorated here: importing Dynamo imports Triton)
        return inspect.unwrap(type(self).forward)(self, hidden_states, top_k_index, top_k_weights)
    return torch.ops.moe_compiler.experts_quantized(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_scale_inv,
        self.down_proj, self.down_proj_scale_inv, **spec.op_kwargs(),
    )


# Releases whose config.json names a model type transformers does not register, with `auto_map` pointing at remote
# code, though the architecture is one transformers implements natively: Kimi-K2-Instruct / -Thinking ship
# "kimi_k2" with a remote copy of DeepSeek-V3's config and modeling (transformers' own kimi_k25 config maps its text
# model the same way). Loaded as the native type, the experts reach experts_implementation (and our op); the
# remote modeling code would not.
NATIVE_MODEL_TYPES = {"kimi_k2": "deepseek_v3"}


def _native_fields(path, trust_remote_code: bool, **hub) -> tuple[str, dict] | None:
    """(the native model type, the config.json fields to build it from) for a model type of NATIVE_MODEL_TYPES
    loaded without trust_remote_code, else None."""
    from transformers import PretrainedConfig

    if trust_remote_code:
        return None
    raw, _ = PretrainedConfig.get_config_dict(path, **hub)
    native = NATIVE_MODEL_TYPES.get(raw.get("model_type"))
    if native is None:
        return None
    return native, {k: v for k, v in raw.items() if k not in ("auto_map", "model_type")}


def load_config(path, trust_remote_code: bool = False, **hub):
    """The checkpoint's config: AutoConfig's, or for a model type of NATIVE_MODEL_TYPES (without trust_remote_code)
    the native type's config built from the same config.json, its auto_map dropped."""
    return _load_config(path, trust_remote_code, **hub)[0]


def _load_config(path, trust_remote_code: bool, **hub):
    """(load_config's config, whether it was built as a native type in place of the checkpoint's own)."""
    from transformers import AutoConfig

    native = _native_fields(path, trust_remote_code, **hub)
    if native is not None:
        log.info("moe_compiler: %s loads as transformers' native %r, its architecture (trust_remote_code=True would "
                 "run the checkpoint's own remote code instead)", path, native[0])
        return AutoConfig.for_model(native[0], **native[1]), True
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub), False


def from_pretrained(path, *args, **kwargs):
    """transformers' AutoModelForCausalLM.from_pretrained with experts_implementation="fused_moe" (registered
    first), then its FP8Linear layers pointed at linear_quantized (hf_linear.py). A compressed-tensors INT4
    checkpoint keeps its experts packed (hf_int4.py); a model type of NATIVE_MODEL_TYPES (Kimi-K2) loads as its
    native architecture. Every other argument is passed through; where this builds the config (those two cases),
    change its fields through `config=` (load_config(path), edited), not keyword arguments."""
    from transformers import AutoModelForCausalLM

    from .hf_int4 import check_only_experts_packed, packed_config
    from .hf_linear import use_fused_linears

    register()
    kwargs.setdefault("experts_implementation", NAME)
    if "config" not in kwargs:
        hub = {k: kwargs[k] for k in ("revision", "local_files_only", "token", "cache_dir") if k in kwargs}
        config, native = _load_config(path, kwargs.get("trust_remote_code", False), **hub)
        quantization = getattr(config, "quantization_config", None)
        packed = packed_config(quantization if isinstance(quantization, dict) else {})
        if packed is not None:
            check_only_experts_packed(path, **hub)
            config.quantization_config = packed
        if packed is not None or native:
            kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(path, *args, **kwargs)
    use_fused_linears(model)
    return model
