"""Block-scaled FP8 test data: quantize weights the way the checkpoints are made, and random quantized experts."""

from __future__ import annotations

import torch

from ..lowering.torch_quantized import dequantize
from .reference import experts_inputs

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_fp8_blocks(w: torch.Tensor, block_n: int, block_k: int, scale_dtype=torch.float32):
    """(q [..., N, K] float8_e4m3fn, scale [..., ceil(N/bn), ceil(K/bk)]) with w ~ q * scale per block: the block's
    amax maps to 448 (transformers' Fp8Quantize). float8_e8m0fnu scales: the power of two at or above that."""
    N, K = w.shape[-2:]
    nb, kb = -(-N // block_n), -(-K // block_k)
    padded = torch.zeros(*w.shape[:-2], nb * block_n, kb * block_k, dtype=torch.float32, device=w.device)
    padded[..., :N, :K] = w.float()
    blocks = padded.unflatten(-1, (kb, block_k)).unflatten(-3, (nb, block_n))  # [..., nb, bn, kb, bk]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    if scale_dtype != torch.float32 and scale_dtype != torch.bfloat16:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))  # e8m0: exponents only
    scale = scale.to(scale_dtype)
    q = (blocks / scale.float()[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :N, :K].to(torch.float8_e4m3fn)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [..., K] values in [-8, 7] -> int32 [..., K/8]: value k at bits 4 (k % 8) of word k // 8, stored + 8
    (compressed-tensors' pack_to_int32 for 4 bits)."""
    nibbles = (q.to(torch.int64) + 8).unflatten(-1, (-1, 8))
    words = (nibbles << torch.arange(0, 32, 4, dtype=torch.int64, device=nibbles.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantize_int4_groups(w: torch.Tensor, group: int = 32, scale_dtype=torch.bfloat16):
    """(packed int32 [..., N, K/8], scale [..., N, K/group]): symmetric 4-bit per row and `group` input columns,
    scale = amax / 7.5, values round(w / scale) clamped to [-8, 7] (compressed-tensors' symmetric int4)."""
    g = w.float().unflatten(-1, (-1, group))
    scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-12).to(scale_dtype)
    q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-8, 7).flatten(-2)
    return pack_int4(q), scale


def quantize_int4_experts(w: torch.Tensor, group: int = 32, scale_dtype=torch.bfloat16, chunk: int = 8):
    """quantize_int4_groups of stacked experts w [E, N, K], a few experts at a time (a real model's whole fp32
    intermediate would not fit beside it)."""
    E, N, K = w.shape
    q = torch.empty(E, N, K // 8, dtype=torch.int32, device=w.device)
    s = torch.empty(E, N, K // group, dtype=scale_dtype, device=w.device)
    for e in range(0, E, chunk):
        q[e:e + chunk], s[e:e + chunk] = quantize_int4_groups(w[e:e + chunk], group, scale_dtype)
    return q, s


def quantize_weights(w: torch.Tensor, weight_format: str, block_n: int, block_k: int, scale_dtype):
    """(stored weight, scales) of w in `weight_format` (spec.WeightFormat values)."""
    if weight_format == "int4_packed":
        assert block_n == 1, "INT4 group scales are per row"
        return quantize_int4_groups(w, block_k, scale_dtype)
    return quantize_fp8_blocks(w, block_n, block_k, scale_dtype)


def quantized_experts_inputs(T, H, I, E, k, dtype, block_n=128, block_k=128, scale_dtype=torch.float32, seed=0,
                             weight_format="fp8_e4m3"):
    """Random (hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale) on the CPU
    and the dequantized fp32 weights (w_gate_up, w_down) for the reference."""
    hidden, ids, weights, w1, w2, _, _ = experts_inputs(T, H, I, E, k, torch.float32, seed=seed)
    q1, s1 = quantize_weights(w1, weight_format, block_n, block_k, scale_dtype)
    q2, s2 = quantize_weights(w2, weight_format, block_n, block_k, scale_dtype)
    deq = (dequantize(q1, s1, block_n, block_k), dequantize(q2, s2, block_n, block_k))
    return (hidden.to(dtype), ids, weights.to(dtype), q1, s1, q2, s2), deq


def quantize_activations_fp8(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., K] through the w8a8 kernels' activation rounding (per row, per `group` columns: amax -> 448,
    float8_e4m3fn), back in fp32: the reference of the act_fp8 path."""
    K = x.shape[-1]
    pad = (-K) % group
    xp = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, group))
    s = xp.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return ((xp / s).to(torch.float8_e4m3fn).float() * s).flatten(-2)[..., :K]


def w8a8_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, group: int, spec=None):
    """The w8a8 kernels' math in fp64 on dequantized weights [E, 2I, H] / [E, H, I], one expert at a time: each
    GEMM's input rows rounded by quantize_activations_fp8 first (the gated activation stored in hidden's dtype
    before that). A pair routed to e = E (the expert-parallel sentinel) adds nothing."""
    from ..lowering.torch_activations import gated_forward
    from ..spec import ExpertsSpec

    spec = spec or ExpertsSpec()
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    x = quantize_activations_fp8(hidden, group).double()
    for e in torch.unique(topk_ids).tolist():
        if e == w_gate_up.shape[0]:
            continue
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        a = gated_forward(x[tok] @ w_gate_up[e].double().t(), spec).to(hidden.dtype)
        a = quantize_activations_fp8(a, group).double()
        out.index_add_(0, tok, topk_weights[tok, slot].double().unsqueeze(-1) * (a @ w_down[e].double().t()))
    return out


W8A8_REFERENCE = "moe_compiler_w8a8_reference"


def use_w8a8_reference_experts(model, group: int | None = None):
    """`model` (unquantized experts: a dequantized_reference) with its experts computed as the FP8 kernels compute
    them under w8a8 — each GEMM's input rows rounded through e4m3 per row and `group` columns, the dynamic
    activation scheme of transformers' FP8Experts and DeepSeek's release — by w8a8_reference in fp64, an expert at a
    time (eager only: it reads the routing on the host). The reference of an FP8 model whose experts run w8a8 (the
    sorted path in bf16 / fp16 on a GPU with FP8 tensor cores, triton_quantized_config._default_fp8), against which
    the dequantized model alone differs by the activation rounding (0.07-0.27 of the tiny DeepSeek-V3's logits).
    `group`: the kernels' activation group (triton_quantized_config.ACT_GROUP) unless given."""
    from transformers.integrations.moe import ExpertsInterface

    from ..integrations.hf_experts import activation_fields
    from ..lowering.triton_quantized_config import ACT_GROUP
    from ..spec import ExpertsSpec

    group = ACT_GROUP if group is None else group

    def forward(self, hidden_states, top_k_index, top_k_weights):
        plain = not (getattr(self, "is_transposed", False) or getattr(self, "has_bias", False))
        fields = activation_fields(self) if plain else "transposed or biased"
        if isinstance(fields, str):
            raise ValueError(f"use_w8a8_reference_experts: {type(self).__name__} is not a [E, 2I, H] / [E, H, I] "
                             f"experts module without biases of an activation the op takes ({fields})")
        out = w8a8_reference(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, group,
                             ExpertsSpec(**fields))
        return out.to(hidden_states.dtype)

    ExpertsInterface.register(W8A8_REFERENCE, forward)
    model.set_experts_implementation(W8A8_REFERENCE)
    return model


_FP8_EXPERTS_CLASS = None


def _fp8_experts_class():
    """transformers' FP8Experts under its experts-implementation dispatch, wrapped once per process (as its
    quantizer does at load)."""
    global _FP8_EXPERTS_CLASS
    if _FP8_EXPERTS_CLASS is None:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
        from transformers.integrations.moe import use_experts_implementation

        _FP8_EXPERTS_CLASS = use_experts_implementation(experts_class=FP8Experts,
                                                        experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    return _FP8_EXPERTS_CLASS


def to_fp8_experts(model, block=(128, 128), scale_dtype=torch.float32, reference=None, chunk: int = 8) -> int:
    """Replace every `.experts` module of `model` in place by transformers' FP8Experts holding its weights
    block-quantized (what transformers' FP8 quantizer builds from a finegrained-FP8 checkpoint), a few experts at a
    time on the weights' device (a whole fp32 copy of a real model's gate_up would not fit); with `reference` (a
    copy of the model), write the dequantized values into its experts. Returns the number of modules replaced.
    The experts implementation is left as it was (fp8_experts_model and the benchmarks set it)."""
    cls = _fp8_experts_class()
    config = model.config.get_text_config()
    scale_fmt = "float" if scale_dtype == torch.float32 else "ue8m0"
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name.endswith(".experts"):
            continue
        if getattr(module, "gate_up_proj_bias", None) is not None or getattr(module, "is_transposed", False):
            raise ValueError(f"{name}: experts with biases or [E, K, N] weights (GPT-OSS's) have no finegrained-FP8 "
                             "form in transformers; quantize a model whose experts are [E, N, K] without biases")
        with torch.device(module.gate_up_proj.device):
            fp8 = cls(config=config, block_size=tuple(block), scale_fmt=scale_fmt)
        for proj in ("gate_up_proj", "down_proj"):
            w, q = getattr(module, proj).detach(), getattr(fp8, proj)  # (q: FP8Experts' own e4m3 parameter)
            E, N, K = w.shape
            nb = -(-N // block[0])
            # the scales in the dtype given, as the quantizer loads them (not FP8Experts' allocation, which follows
            # scale_fmt); rows past nb: transformers' 2-row floor for gate_up, the last row repeated, never read
            s = torch.empty(E, getattr(fp8, proj + "_scale_inv").shape[1], -(-K // block[1]), dtype=scale_dtype,
                            device=w.device)
            for e in range(0, E, chunk):
                q_e, s[e:e + chunk, :nb] = quantize_fp8_blocks(w[e:e + chunk], *block, scale_dtype)
                with torch.no_grad():
                    q[e:e + chunk] = q_e
                    if reference is not None:
                        getattr(reference.get_submodule(name), proj)[e:e + chunk].copy_(
                            dequantize(q_e, s[e:e + chunk, :nb], *block).to(w.dtype))
            s[:, nb:] = s[:, nb - 1:nb]
            setattr(fp8, proj + "_scale_inv", torch.nn.Parameter(s, requires_grad=False))
        model.set_submodule(name, fp8)
        replaced += 1
    return replaced


def to_int4_experts(model, group: int = 32, scale_dtype=torch.bfloat16, chunk: int = 8) -> int:
    """Replace every `.experts` module of `model` in place by PackedInt4Experts holding its weights quantized to
    symmetric INT4 groups of `group` (what moe_compiler.from_pretrained builds from a Kimi-K2-Thinking checkpoint), a
    few experts at a time on the weights' device. Returns the number of modules replaced."""
    from ..integrations.hf_int4 import packed_like

    replaced = 0
    for name, module in list(model.named_modules()):
        if not name.endswith(".experts"):
            continue
        with torch.device(module.gate_up_proj.device):
            packed = packed_like(name, module, group, scale_dtype)
        for proj in ("gate_up_proj", "down_proj"):
            q, scale = quantize_int4_experts(getattr(module, proj).detach(), group, scale_dtype, chunk)
            with torch.no_grad():
                getattr(packed, proj).copy_(q)
                getattr(packed, proj + "_scale").copy_(scale)
        model.set_submodule(name, packed)
        replaced += 1
    return replaced


def fp8_experts_model(arch: str = "qwen3_moe", block=(32, 32), scale_dtype=torch.float32, dtype=torch.float32,
                      seed: int = 0, linears: bool = False, **overrides):
    """(model, reference): a tiny transformers model whose experts are transformers' FP8Experts holding
    block-quantized weights (to_fp8_experts), with experts_implementation="fused_moe"; and the same model with those
    experts dequantized (their values in the original modules), the reference for logits. With `linears`, the other
    Linear layers but lm_head become transformers' FP8Linear too (not yet pointed at our op:
    hf_linear.use_fused_linears does that)."""
    import copy

    from ..integrations import hf_experts
    from .hf_models import tiny_model

    hf_experts.register()
    model = tiny_model(arch, "grouped_mm", dtype=dtype, seed=seed, **overrides)
    reference = copy.deepcopy(model)
    to_fp8_experts(model, block, scale_dtype, reference)
    if linears:
        from transformers.integrations.finegrained_fp8 import FP8Linear

        scale_fmt = "float" if scale_dtype == torch.float32 else "ue8m0"
        for name in _quantized_linears(model):
            linear = model.get_submodule(name)
            fp8 = FP8Linear(linear.in_features, linear.out_features, block_size=tuple(block), scale_fmt=scale_fmt,
                            has_bias=linear.bias is not None)
            q, s = quantize_fp8_blocks(linear.weight.detach(), *block, scale_dtype)
            fp8.weight = torch.nn.Parameter(q, requires_grad=False)
            fp8.weight_scale_inv = torch.nn.Parameter(s, requires_grad=False)
            if linear.bias is not None:
                fp8.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(dequantize(q, s, *block).to(dtype))
            model.set_submodule(name, fp8)
    model.set_experts_implementation(hf_experts.NAME)
    return model.eval(), reference.eval()


def _quantized_linears(model) -> list[str]:
    """The nn.Linear layers an FP8 checkpoint quantizes: all but the output head."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def _expert_parts(name: str, p: torch.Tensor):
    """(the experts module's name, {projection: [E, N, K] weight}) of a stacked experts parameter, split as the
    checkpoints store it per expert (gate_up_proj's halves are gate_proj and up_proj); None for other parameters."""
    prefix, _, leaf = name.rpartition(".")
    if leaf not in ("gate_up_proj", "down_proj") or not prefix.endswith(".experts"):
        return None
    if leaf == "down_proj":
        return prefix, {"down_proj": p}
    I = p.shape[1] // 2
    return prefix, {"gate_proj": p[:, :I], "up_proj": p[:, I:]}


def _save(path, tensors: dict, config: dict, shards: int = 1) -> None:
    """model.safetensors, or with shards > 1 model-0000i-of-0000n.safetensors and their index (tensors dealt out in
    turn: an expert's projections, packed words and scales land in different files, as in the big releases)."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        weight_map = {key: names[i % shards] for i, key in enumerate(sorted(tensors))}
        for name in names:
            part = {key: tensors[key] for key, file in weight_map.items() if file == name}
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)


def _round_trip_in_place(model, round_trip, linears=frozenset()):
    """Each stacked experts weight (by the projections a checkpoint stores) and each named Linear weight replaced by
    round_trip(weight): what a loader reads back from the checkpoint, dequantized."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = _expert_parts(name, p)
            if parts is not None:
                p.copy_(torch.cat([round_trip(w) for w in parts[1].values()], dim=1))
            elif name.endswith(".weight") and name[: -len(".weight")] in linears:
                p.copy_(round_trip(p))
    return model


def save_fp8_checkpoint(model, path, block=(32, 32), scale_dtype=torch.float32, linears: bool = False) -> None:
    """Write `model` (a tiny transformers MoE model with stacked experts) as a finegrained-FP8 checkpoint in the
    on-disk form of the FP8 releases: per-expert `experts.{e}.{gate,up,down}_proj.weight` float8_e4m3fn with
    `weight_scale_inv` block scales, config `quantization_config` {"quant_method": "fp8", "weight_block_size"}.
    With `linears`, the other Linear layers but lm_head are quantized too (as DeepSeek-V3's release is);
    otherwise they stay unquantized and are listed in `modules_to_not_convert`."""
    e8m0 = scale_dtype not in (torch.float32, torch.bfloat16)
    quantized = set(_quantized_linears(model)) if linears else set()
    tensors = {}

    def put(name, w):
        q, s = quantize_fp8_blocks(w.detach(), *block, scale_dtype)
        tensors[f"{name}.weight"] = q.contiguous()
        tensors[f"{name}.weight_scale_inv"] = s.contiguous().view(torch.uint8) if e8m0 else s.contiguous()

    for name, p in model.state_dict().items():
        parts = _expert_parts(name, p)
        if parts is not None:
            for proj, w in parts[1].items():
                for e in range(w.shape[0]):
                    put(f"{parts[0]}.{e}.{proj}", w[e])
        elif name.endswith(".weight") and name[: -len(".weight")] in quantized:
            put(name[: -len(".weight")], p)
        else:
            tensors[name] = p.detach().contiguous()
    config = model.config.to_dict()
    unquantized = ["lm_head"] if linears else [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    config["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": unquantized, **({"scale_fmt": "ue8m0"} if e8m0 else {}),
    }
    _save(path, tensors, config)


def dequantized_reference(model, block=(32, 32), scale_dtype=torch.float32, linears: bool = False):
    """`model` with the weights save_fp8_checkpoint quantizes replaced in place by their dequantized values: the
    reference a loaded FP8 checkpoint is compared with."""
    def round_trip(w):
        return dequantize(*quantize_fp8_blocks(w, *block, scale_dtype), *block).to(w.dtype)

    return _round_trip_in_place(model, round_trip, set(_quantized_linears(model)) if linears else frozenset())


def save_int4_checkpoint(model, path, group: int = 32, scale_dtype=torch.bfloat16, shards: int = 1) -> None:
    """Write `model`'s routed experts as a compressed-tensors pack-quantized INT4 checkpoint (Kimi-K2-Thinking's
    on-disk form: per-expert `weight_packed` int32 [N, K/8], `weight_scale` [N, K/g], `weight_shape`; config
    `quantization_config` with quant_method "compressed-tensors", format "pack-quantized", 4-bit symmetric groups
    of g, every other Linear in `ignore`); the other weights as they are; in `shards` files with an index."""
    tensors = {}
    for name, p in model.state_dict().items():
        parts = _expert_parts(name, p)
        if parts is None:
            tensors[name] = p.detach().contiguous()
            continue
        for proj, w in parts[1].items():
            packed, scale = quantize_int4_groups(w.detach(), group, scale_dtype)
            for e in range(w.shape[0]):
                tensors[f"{parts[0]}.{e}.{proj}.weight_packed"] = packed[e].contiguous()
                tensors[f"{parts[0]}.{e}.{proj}.weight_scale"] = scale[e].contiguous()
                tensors[f"{parts[0]}.{e}.{proj}.weight_shape"] = torch.tensor(list(w.shape[1:]), dtype=torch.int64)
    config = model.config.to_dict()
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None}},
        "ignore": [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)],
        "kv_cache_scheme": None,
    }
    _save(path, tensors, config, shards)


def as_kimi_k2_release(path) -> None:
    """Rewrite a DeepSeek-V3 checkpoint's config.json as Kimi-K2-Instruct / -Thinking ship theirs: model_type
    "kimi_k2" (no transformers registration) with an auto_map to the release's remote copy of DeepSeek-V3's code."""
    import json
    import os

    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config["model_type"] = "kimi_k2"
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                          "AutoModel": "modeling_deepseek.DeepseekV3Model",
                          "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    with open(file, "w") as f:
        json.dump(config, f, indent=2)


def int4_reference(model, group: int = 32, scale_dtype=torch.bfloat16):
    """`model` with its experts replaced in place by the dequantized values save_int4_checkpoint writes."""
    def round_trip(w):
        return dequantize(*quantize_int4_groups(w, group, scale_dtype), 1, group).to(w.dtype)

    return _round_trip_in_place(model, round_trip)
