"""INT4 experts kept packed: loading compressed-tensors pack-quantized checkpoints (Kimi-K2-Thinking, Kimi-K2.5).

transformers decompresses such experts to dense bf16 while loading, even with `dequantize=False`: Kimi-K2 would
become ~2 TB. Its extension point for this is a quantizer. `moe_compiler.from_pretrained` gives a checkpoint whose
`quantization_config` is compressed-tensors, 4-bit, symmetric, grouped (`int4_config` proves each fact, or says
why not) our quantization method instead; transformers then loads everything as usual (shards, device_map, dtype,
tied weights, its renamings) except the routed experts, which `Int4Quantizer` swaps before loading for
`PackedInt4Experts` and fills from the on-disk per-expert tensors, still packed:

    on disk (per expert e)                              PackedInt4Experts parameter
    mlp.experts.e.{gate,up}_proj.weight_packed  int32 [I, H/8]  -> gate_up_proj        [E, 2I, H/8] (gate rows, then up)
    mlp.experts.e.{gate,up}_proj.weight_scale   [I, H/g]        -> gate_up_proj_scale  [E, 2I, H/g]
    mlp.experts.e.down_proj.weight_packed       int32 [H, I/8]  -> down_proj           [E, H, I/8]
    mlp.experts.e.down_proj.weight_scale        [H, I/g]        -> down_proj_scale     [E, H, I/g]
    (weight_shape: the unpacked [N, K], implied by the shapes above, which loading checks; not kept)

The module's forward is one experts_quantized call (weight_format="int4_packed", scale blocks 1 x g): the
kernels unpack nibbles and apply the group scales in registers (triton_quantized.py). GPU memory of the experts:
1/4 of bf16 plus one scale per g weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..spec import QuantizedExpertsSpec

METHOD = "moe_compiler_int4"
WEIGHT_SHAPE_KEYS = r"\.experts\.\d+\.\w+_proj\.weight_shape$"


def int4_config(quantization_config: dict) -> dict | str:
    """{"group_size", "ignore"} of a compressed-tensors config whose weights are pack-quantized symmetric 4-bit
    integers in groups, activations unquantized; otherwise the reason it is not one we keep packed."""
    if quantization_config.get("quant_method") != "compressed-tensors":
        return f"quant_method {quantization_config.get('quant_method')!r}"
    if quantization_config.get("format") != "pack-quantized":
        return f"format {quantization_config.get('format')!r} (pack-quantized only)"
    groups = list((quantization_config.get("config_groups") or {}).values())
    if len(groups) != 1:
        return f"{len(groups)} config groups (one only)"
    w = groups[0].get("weights") or {}
    facts = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    wrong = {k: w.get(k) for k, v in facts.items() if w.get(k) != v}
    if wrong or not w.get("group_size") or groups[0].get("input_activations"):
        return f"weights {wrong or w} / input activations {groups[0].get('input_activations')} (W4A16 groups only)"
    return {"group_size": int(w["group_size"]), "ignore": list(quantization_config.get("ignore") or [])}


class PackedInt4Experts(nn.Module):
    """A model's routed experts as INT4 packed weights and group scales (see the module docstring)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, group: int, spec: QuantizedExpertsSpec,
                 scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        E, H, I = num_experts, hidden, intermediate
        if H % group or I % group or group % 8:
            raise ValueError(f"moe_compiler: INT4 groups of {group} must divide H={H} and I={I} (and be a multiple "
                             "of 8, the values per int32 word)")
        self.spec = spec
        self.num_experts = E

        def param(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.gate_up_proj = param(E, 2 * I, H // 8, dtype=torch.int32)
        self.gate_up_proj_scale = param(E, 2 * I, H // group, dtype=scale_dtype)
        self.down_proj = param(E, H, I // 8, dtype=torch.int32)
        self.down_proj_scale = param(E, H, I // group, dtype=scale_dtype)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return torch.ops.moe_compiler.experts_quantized(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_scale,
            self.down_proj, self.down_proj_scale, **self.spec.op_kwargs(),
        )


def packed_like(name: str, module, group: int, scale_dtype: torch.dtype = torch.bfloat16) -> PackedInt4Experts:
    """An empty PackedInt4Experts in place of transformers' stacked experts `module` (at `name` in its model), on the
    current default device; a ValueError saying why where the module cannot be held packed."""
    spec = _packable(module, group)
    if isinstance(spec, str):
        raise ValueError(f"moe_compiler: {name} cannot be held as packed INT4: {spec}")
    return PackedInt4Experts(module.num_experts, module.hidden_dim, module.intermediate_dim, group, spec, scale_dtype)


def _packable(module, group: int) -> QuantizedExpertsSpec | str:
    """The spec of a transformers stacked experts module we can hold packed, or why not."""
    from .hf_experts import activation_fields

    for attr, want in (("is_transposed", False), ("has_bias", False), ("has_gate", True), ("is_concatenated", True)):
        if getattr(module, attr, want) != want:
            return f"{attr}={getattr(module, attr)}"
    if not all(hasattr(module, a) for a in ("num_experts", "hidden_dim", "intermediate_dim", "act_fn")):
        return f"{type(module).__name__} is not a stacked transformers experts module"
    act = activation_fields(module)
    if isinstance(act, str):
        return act
    return QuantizedExpertsSpec(**act, weight_format="int4_packed", scale_block_n=1, scale_block_k=group)


@functools.cache
def _classes():
    """(config class, quantizer class), made and registered with transformers once."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @register_quantization_config(METHOD)
    class Int4Config(QuantizationConfigMixin):
        def __init__(self, group_size: int = 32, ignore=None, **kwargs):
            self.quant_method = METHOD
            self.group_size = group_size
            self.ignore = list(ignore or [])

    @register_quantizer(METHOD)
    class Int4Quantizer(HfQuantizer):
        requires_calibration = False

        def validate_environment(self, *args, **kwargs):
            pass

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        def _process_model_before_weight_loading(self, model, **kwargs):
            group = self.quantization_config.group_size
            for name, module in list(model.named_modules()):
                if not (name.endswith(".experts") and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)):
                    continue
                model.set_submodule(name, packed_like(name, module, group))
            # weight_shape is implied by the packed tensors' shapes, which loading checks: read, not reported
            ignored = model._keys_to_ignore_on_load_unexpected
            if isinstance(ignored, set):  # (transformers 5.25: a set after post_init; a list or None before)
                ignored.add(WEIGHT_SHAPE_KEYS)
            else:
                model._keys_to_ignore_on_load_unexpected = [*(ignored or []), WEIGHT_SHAPE_KEYS]

        def update_weight_conversions(self, weight_conversions, *args, **kwargs):
            # Renamed first so that no converter of the model's own (`...gate_proj.weight`) sees these keys.
            ours = [
                WeightRenaming(source_patterns=r"(experts\.\d+\.\w+_proj)\.weight_packed$", target_patterns=r"\1.q4"),
                WeightRenaming(source_patterns=r"(experts\.\d+\.\w+_proj)\.weight_scale$", target_patterns=r"\1.s4"),
                WeightConverter(["mlp.experts.*.gate_proj.q4", "mlp.experts.*.up_proj.q4"], "mlp.experts.gate_up_proj",
                                [MergeModulelist(dim=0), Concatenate(dim=1)]),
                WeightConverter(["mlp.experts.*.gate_proj.s4", "mlp.experts.*.up_proj.s4"],
                                "mlp.experts.gate_up_proj_scale", [MergeModulelist(dim=0), Concatenate(dim=1)]),
                WeightConverter("mlp.experts.*.down_proj.q4", "mlp.experts.down_proj", [MergeModulelist(dim=0)]),
                WeightConverter("mlp.experts.*.down_proj.s4", "mlp.experts.down_proj_scale", [MergeModulelist(dim=0)]),
            ]
            return ours + list(weight_conversions)

        @property
        def is_serializable(self):
            return False

        @property
        def is_trainable(self):
            return False

    return Int4Config, Int4Quantizer


def packed_config(quantization_config: dict) -> dict | None:
    """Our quantization_config for a checkpoint's compressed-tensors INT4 one (None: not such a checkpoint)."""
    facts = int4_config(quantization_config)
    if isinstance(facts, str):
        return None
    _classes()
    return {"quant_method": METHOD, **facts}


def check_only_experts_packed(path, **hub_kwargs) -> None:
    """A checkpoint (a directory or a Hub id, as from_pretrained takes) whose packed INT4 tensors all belong to
    routed experts (the layers we keep packed); any other packed layer would be left without weights, so it is
    an error naming them."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if index is not None:
        with open(index) as f:
            keys = list(json.load(f)["weight_map"])
    else:
        with safe_open(cached_file(path, "model.safetensors", **hub_kwargs), "pt") as f:
            keys = list(f.keys())
    others = sorted(k for k in keys if k.endswith(".weight_packed") and ".experts." not in k)
    if others:
        raise ValueError(
            f"moe_compiler: this INT4 checkpoint packs layers besides the routed experts ({len(others)}, e.g. "
            f"{others[:3]}); only experts are kept packed. Load it with transformers' compressed-tensors support."
        )
