"""Tiny random configs of every MoE architecture that ships with transformers 5.x (issue 4's list), for
the architecture tests and the support matrix (tools/support_matrix.py).

Rules: hidden 64, expert intermediate 32, 8 routed experts, 2-4 experts per token, 2 decoder layers (all
MoE unless noted), 4 heads, vocab 128, sizes multiples of 8, special token ids < 128. Multimodal wrappers
build their text model (MODEL_TYPE). Routers are re-drawn as in hf_models.tiny_model.

Transformers 5.25 ships 77 model directories with MoE experts. Not here (surveyed 2026-12-04, NOTES "session 29"):
multimodal or encoder-decoder wrappers whose text model needs configs of their own (ernie4_5_vl_moe, glm4v_moe,
qwen3_omni_moe, step3p7, switch_transformers, nllb_moe, ...), models without the experts interface (jetmoe), and
experts of forms no matcher has (softcapped SwiGLU: inkling2; a norm inside the experts: muse_spark; ReLU^2
without a gate: ergo, like nemotron_h in NOT_FUSED), and zaya (top-1 only; its router is left, through a reshape).
"""

from __future__ import annotations

import torch

from .hf_models import count_experts_modules, redraw

V, H, I, L, NH = 128, 64, 32, 2, 4
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
              num_key_value_heads=NH, max_position_embeddings=64, pad_token_id=None,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# MLA attention (deepseek_v2/v3, kimi, longcat): all multiples of 8
MLA = dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)

TINY: dict[str, dict] = {
    "mixtral": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                      num_experts=8, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=8, num_experts_per_tok=4,
                      head_dim=16, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
    # hybrid: one Gated-DeltaNet layer + one full-attention layer, both MoE
    "qwen3_next": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                       num_experts=8, num_experts_per_tok=4, head_dim=16, num_key_value_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4, decoder_sparse_step=1, mlp_only_layers=[],
                       layer_types=["linear_attention", "full_attention"]),
    # Qwen3.5-MoE text model (model_type qwen3_5_moe_text); every layer is MoE
    "qwen3_5_moe": dict(COMMON, moe_intermediate_size=I, shared_expert_intermediate_size=I, num_experts=8,
                        num_experts_per_tok=4, head_dim=16, num_key_value_heads=2, linear_key_head_dim=16,
                        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                        layer_types=["linear_attention", "full_attention"]),
    "deepseek_v2": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
                        topk_method="greedy", n_group=None, topk_group=None),
    # group-limited routing: 4 groups of 2, pick 2 groups, top-4
    "deepseek_v3": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                        first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True,
                        bos_token_id=0, eos_token_id=1),
    # Kimi-K2.5 text model = DeepseekV3 classes with Kimi-K2 routing (n_group=1, first layer dense)
    "kimi_k25": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
                     first_k_dense_replace=1, routed_scaling_factor=2.827, norm_topk_prob=True),
    "olmoe": dict(COMMON, intermediate_size=I, num_experts=8, num_experts_per_tok=2, pad_token_id=0,
                  eos_token_id=2, bos_token_id=None),
    "flex_olmo": dict(COMMON, intermediate_size=I, num_experts=8, num_experts_per_tok=4, pad_token_id=0,
                      eos_token_id=2, bos_token_id=None),
    "gpt_oss": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=4, head_dim=16,
                    num_key_value_heads=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], bos_token_id=None, eos_token_id=None,
                    max_position_embeddings=131072),  # matches its default YaRN factor 32 x 4096
    "glm4_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=0, head_dim=16,
                     num_key_value_heads=2, routed_scaling_factor=1.0, norm_topk_prob=True),
    "granitemoe": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=I),
    # DBRX uses its own names: d_model / n_heads / n_layers and nested attn/ffn configs
    "dbrx": dict(vocab_size=V, d_model=H, n_heads=NH, n_layers=L, max_seq_len=64, pad_token_id=None,
                 bos_token_id=1, eos_token_id=2,
                 # DbrxAttention reads attn_config.rope_theta
                 attn_config=dict(kv_n_heads=NH, clip_qkv=8.0, rope_theta=500000.0),
                 ffn_config=dict(ffn_hidden_size=I, moe_num_experts=8, moe_top_k=4, hidden_size=H,
                                 moe_normalize_expert_weights=1.0)),
    "phimoe": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.01),
    # hybrid: layer 0 Mamba, layer 1 attention; expert_layer_period=1 makes both layers MoE
    "jamba": dict(COMMON, intermediate_size=I, num_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  use_mamba_kernels=False, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                  pad_token_id=0),
    # Llama-4 text model (model_type llama4_text); experts 32, dense/shared MLP 64; real model is top-1
    "llama4": dict(COMMON, intermediate_size=I, intermediate_size_mlp=64, num_local_experts=8,
                   num_experts_per_tok=2, head_dim=16, num_key_value_heads=2, moe_layers=[0, 1],
                   no_rope_layers=[1, 0], attention_chunk_size=64),
    # hybrid: layer 0 full attention, layer 1 lightning (linear) attention
    "minimax": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                    num_key_value_heads=2, block_size=8, layer_types=["full_attention", "linear_attention"]),
    "ernie4_5_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, moe_num_experts=8, moe_k=4,
                         moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_end_index=1,
                         moe_layer_interval=1, pad_token_id=0, num_key_value_heads=2),
    "hunyuan_v1_moe": dict(COMMON, intermediate_size=I, num_experts=8, moe_topk=2, head_dim=16, pad_token_id=0,
                           eod_token_id=3, sep_token_id=4),
    "dots1": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=0, head_dim=16,
                  sliding_window=None, max_window_layers=2),
    # MiniMax-M2: sigmoid scores + correction bias, top-k, renormalized by the bare sum (no epsilon)
    "minimax_m2": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                       num_key_value_heads=2),
    # LongCat-Flash: num_layers (each layer = 2 attention sublayers + 2 dense MLPs + 1 MoE); 8 routed + 8 zero
    # (identity) experts
    "longcat_flash": dict({k: v for k, v in COMMON.items() if k != "num_hidden_layers"}, **MLA, num_layers=L,
                          ffn_hidden_size=64, expert_ffn_hidden_size=I, n_routed_experts=8, zero_expert_num=8,
                          moe_topk=4, head_dim=8, routed_scaling_factor=6.0),  # head_dim must equal qk_rope_head_dim
}

# MoE architectures new in transformers 5.25 (skipped on a release without them: model_type_known).
TINY_5_25: dict[str, dict] = {
    "afmoe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=8, num_experts_per_tok=2,
                  head_dim=16, layer_types=["sliding_attention", "full_attention"], pad_token_id=0),
    "aria": dict(COMMON, intermediate_size=64, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1, head_dim=16,
                 pad_token_id=0),
    "axk1": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8, n_group=4,
                 topk_group=2, num_experts_per_tok=4, head_dim=8, pad_token_id=0),
    "cohere2_moe": dict(COMMON, intermediate_size=I, head_dim=16, layer_types=["sliding_attention", "full_attention"]),
    # DeepSeek-V3.2 (indexed sparse attention); DeepSeek's group-limited routing
    "deepseek_v32": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8, n_group=4,
                         topk_group=2, num_experts_per_tok=4, head_dim=8, first_k_dense_replace=0, pad_token_id=0),
    # layer 0 hash-routed (ids from a token-id table), layer 1 top-k over sqrt(softplus(logits))
    "deepseek_v4": dict(COMMON, moe_intermediate_size=I, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
                        mlp_layer_types=["hash_moe", "moe"], pad_token_id=0),
    "exaone_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=8, num_experts_per_tok=2,
                       first_k_dense_replace=0, layer_types=["sliding_attention", "full_attention"]),
    "flint": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                  num_experts=8, num_experts_per_tok=2, mlp_only_layers=[], head_dim=16,
                  layer_types=["full_attention", "sliding_attention"], pad_token_id=0),
    "glm4_moe_lite": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                          num_experts_per_tok=4, pad_token_id=0),
    # GLM-5 (DeepSeek-V3.2's indexed attention)
    "glm_moe_dsa": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                        num_experts_per_tok=4, head_dim=8, first_k_dense_replace=0, pad_token_id=0),
    "granitemoe_swa": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2,
                           layer_types=["full_attention", "sliding_attention"], pad_token_id=0),
    "hy_v3": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=8, num_experts_per_tok=2,
                  head_dim=16, pad_token_id=0),
    "hy_v4": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                  num_experts_per_tok=2, head_dim=8, pad_token_id=0),
    # hybrid: a Kimi Delta Attention layer, then an MLA layer
    "kimi_linear": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, num_experts=8,
                        num_experts_per_token=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
                        pad_token_id=0),
    # router: top-k of logits + bias, then sigmoid of the picked logits, renormalized
    "kolibri1": dict(COMMON, moe_intermediate_size=I, shared_expert_intermediate_size=I, num_local_experts=8,
                     num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                     pad_token_id=0),
    "laguna": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                   num_experts=8, num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2,
                   pad_token_id=0),
    # hybrid, 3 layers: linear, sliding and full attention, all MoE
    "lara_mini": dict(COMMON, num_hidden_layers=3, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                      num_experts=8, num_experts_per_tok=2, head_dim=16, pad_token_id=0,
                      layer_types=["linear_attention", "sliding_attention", "full_attention"]),
    "mellum": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, num_local_experts=8, num_experts_per_tok=2,
                   head_dim=16, layer_types=["full_attention"] * 2, pad_token_id=0),
    "minicpm5_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                         num_experts_per_tok=2, head_dim=16, pad_token_id=0),
    "minimax_m3_vl": dict(COMMON, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                          layer_types=["full_attention"] * 2, pad_token_id=0),
    "mistral4": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                     num_experts_per_tok=2, head_dim=8, pad_token_id=0),
    "mistral_large4": dict(COMMON, **MLA, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=8,
                           num_experts_per_tok=2, head_dim=8, first_k_dense_replace=0,
                           layer_types=["indexed_attention", "indexed_attention"], pad_token_id=0),
    # NVIDIA Nemotron-H / Nemotron 3: Mamba-2, MoE, attention and MLP layers; experts up -> ReLU^2 -> down
    "nemotron_h": dict(COMMON, num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=I,
                       n_routed_experts=8, num_experts_per_tok=2, head_dim=16),
    "qwen3_vl_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=8, num_experts_per_tok=4,
                         head_dim=16, pad_token_id=0),
    "solar_open": dict(COMMON, moe_intermediate_size=I, n_routed_experts=8, num_experts_per_tok=2, head_dim=16,
                       pad_token_id=0),
}

ADDED_IN_5_25 = frozenset(TINY_5_25)
TINY.update(TINY_5_25)

MODEL_TYPE = {name: name for name in TINY}
MODEL_TYPE.update({"qwen3_5_moe": "qwen3_5_moe_text", "llama4": "llama4_text", "kimi_k25": "deepseek_v3",
                   "aria": "aria_text", "minimax_m3_vl": "minimax_m3_vl_text",
                   "mistral_large4": "mistral_large4_text", "qwen3_vl_moe": "qwen3_vl_moe_text"})

# Router weights that do not end in gate.weight / router.weight.
EXTRA_ROUTER_SUFFIXES = ("router.layer.weight", "gate.wg.weight", "router.classifier.weight")

# What the backend does with each architecture today, and why where it does not fuse (checked by
# tests/passes/test_pipeline.py; the full grid is docs/support_matrix.md).
NOT_FUSED = {
    "dbrx": "experts_implementation='eager'",  # DbrxExperts always loops over nonzero(): graph breaks
    # not gated: up -> ReLU^2 -> down; the op's experts are act(gate) * up
    "nemotron_h": "down GEMM input is `square`, expected act(gate) * up",
}


def transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


if not transformers_at_least("5.25"):  # LongcatFlashExperts joined the experts interface in 5.25
    NOT_FUSED["longcat_flash"] = "experts_implementation='eager'"  # before: a Python loop over experts, as DBRX
# The first release whose form of the architecture the zoo covers. 5.17's Aria loops over experts with counts read
# by `.cpu()` (AriaExperts joined the experts interface in 5.18): graph breaks, no region, nothing to explain.
MIN_TRANSFORMERS = {"aria": "5.18"}

# Router weight std where hf_models.redraw's rule does not fit. Kolibri-1 has a correction bias, so redraw takes it
# for a sigmoid-scored router (std H^-1/2, logits of std ~1), but it chooses on its raw logits and applies the
# sigmoid after: at std ~1 a bf16 model's top-k had near-ties (a 2nd-3rd gap of 0.010 at one token of 14) that
# bf16 rounding anywhere upstream flips. Logits of std ~4 keep the gaps clear of bf16 noise.
ROUTER_STD = {"kolibri1": 4 * H**-0.5}

# Routers left to Inductor while their experts fuse, with the reason the backend logs.
ROUTER_LEFT = {
    # 5.25 on: the ids of LongCat-Flash's zero (identity) experts are remapped by a where before the experts call
    "longcat_flash": "(where), expected the indices of a top-k",
    # layer 0: hash routing (ids looked up by token id); layer 1's sqrt(softplus) router fuses
    "deepseek_v4": "the top-k ids come from `indices` (long), expected the indices of a top-k",
}
# Of the MoE layers of an architecture in ROUTER_LEFT, how many keep their router (the others fuse; default: all).
ROUTERS_LEFT_OF = {"deepseek_v4": 1}


# The route-op form each architecture's router fuses as (passes/router.py): every one has one.
ROUTER_FORM = {
    "deepseek_v2": "softmax_topk", "deepseek_v3": "sigmoid_group_topk", "dots1": "sigmoid_topk",
    "ernie4_5_moe": "softmax_topk", "flex_olmo": "softmax_topk", "glm4_moe": "sigmoid_topk",
    "gpt_oss": "topk_softmax", "granitemoe": "topk_softmax", "granitemoeshared": "topk_softmax",
    "hunyuan_v1_moe": "softmax_topk", "jamba": "softmax_topk", "kimi_k25": "sigmoid_topk",
    "minimax": "softmax_topk", "minimax_m2": "sigmoid_topk", "mixtral": "softmax_topk", "olmoe": "softmax_topk",
    "qwen2_moe": "softmax_topk",
    "qwen3_5_moe": "softmax_topk", "qwen3_moe": "softmax_topk", "qwen3_next": "softmax_topk",
    "llama4": "topk_sigmoid",  # after its dense (every-expert) block became a scale_input experts call
    "phimoe": "sparsemixer",  # eval mode (zoo models are built in eval mode)
    "afmoe": "sigmoid_topk", "aria": "topk_softmax", "axk1": "sigmoid_group_topk", "cohere2_moe": "topk_softmax",
    "deepseek_v32": "sigmoid_group_topk", "deepseek_v4": "sqrtsoftplus_topk", "exaone_moe": "sigmoid_topk",
    "flint": "sigmoid_topk",
    "glm4_moe_lite": "sigmoid_topk", "glm_moe_dsa": "sigmoid_topk", "granitemoe_swa": "topk_softmax",
    "hy_v3": "sigmoid_topk", "hy_v4": "sigmoid_topk", "kimi_linear": "sigmoid_topk", "kolibri1": "topk_sigmoid",
    "laguna": "sigmoid_topk",
    "lara_mini": "softmax_topk", "mellum": "softmax_topk", "minicpm5_moe": "sigmoid_topk",
    "minimax_m3_vl": "sigmoid_topk", "mistral4": "softmax_topk", "mistral_large4": "softmax_topk",
    "qwen3_vl_moe": "softmax_topk", "solar_open": "sigmoid_topk",
}

# The shared-experts branch each architecture adds to its routed experts (passes/shared_experts.py),
# matched per fused block; the others have none.
SHARED_EXPERTS = {
    "deepseek_v2": "plain", "deepseek_v3": "plain", "kimi_k25": "plain", "dots1": "plain", "ernie4_5_moe": "plain",
    "glm4_moe": "plain", "granitemoeshared": "plain", "hunyuan_v1_moe": "plain", "llama4": "plain",
    "qwen2_moe": "sigmoid_gated", "qwen3_next": "sigmoid_gated", "qwen3_5_moe": "sigmoid_gated",
    "afmoe": "plain", "aria": "plain", "axk1": "plain", "deepseek_v32": "plain", "deepseek_v4": "plain",
    "exaone_moe": "plain", "flint": "plain", "glm4_moe_lite": "plain", "glm_moe_dsa": "plain", "hy_v4": "plain",
    "kimi_linear": "plain", "kolibri1": "plain", "lara_mini": "plain", "minicpm5_moe": "plain", "mistral4": "plain",
    "mistral_large4": "plain", "solar_open": "plain",
}
# Shared experts proven but left to Inductor, with the reason the backend logs.
SHARED_LEFT = {
    "hy_v4": "the shared MLP's activation (silu) is not the routed experts' (silu_clamped)",
}


def assert_fused_as_expected(arch: str, model, counters) -> None:
    """The moe_compiler counters of one compiled zoo model: experts fused in every MoE layer (or none, for
    NOT_FUSED), routers fused in the form of ROUTER_FORM (or left, ROUTER_LEFT), shared experts of SHARED_EXPERTS."""
    c = counters["moe_compiler"]
    fused = sum(v for k, v in c.items() if k.startswith("fused_experts"))
    if arch in NOT_FUSED:
        assert fused == 0
        return
    assert fused == count_experts_modules(model) > 0
    assert c["rejected_experts"] == 0
    left = ROUTERS_LEFT_OF.get(arch, fused) if arch in ROUTER_LEFT else 0
    assert c["rejected_router"] == left
    routers = {k: v for k, v in c.items() if k.startswith("fused_router")}
    assert routers == ({f"fused_router_{ROUTER_FORM[arch]}": fused - left} if left < fused else {})
    # The whole block is accounted for: its shared experts, if any, are proven and fused into the experts call.
    shared = {k: v for k, v in c.items() if "shared_experts" in k}
    form = SHARED_EXPERTS.get(arch)
    expected = {f"shared_experts_{form}": fused} if form else {}
    if form and arch not in SHARED_LEFT:
        expected[f"fused_shared_experts_{form}"] = fused
    assert shared == expected


def model_type_known(arch: str) -> bool:
    """Whether the installed transformers has the architecture, in a form the zoo covers (MIN_TRANSFORMERS; the zoo
    spans 5.17 to the newest release)."""
    from transformers import CONFIG_MAPPING

    return MODEL_TYPE[arch] in CONFIG_MAPPING and transformers_at_least(MIN_TRANSFORMERS.get(arch, "0"))


def num_experts_of(cfg) -> int:
    for attr in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 1:
            return v
    ffn = getattr(cfg, "ffn_config", None)
    return ffn.moe_num_experts if ffn is not None else 8


def zoo_model(name: str, experts_implementation: str = "grouped_mm", dtype=torch.float32, seed: int = 0,
              **overrides):
    """The tiny model in eval mode: a causal LM, or the text model where transformers has no causal LM for the
    text config of a multimodal release (Qwen3-VL-MoE, Mistral-Large-4, Mistral-4); `model(input_ids=ids)[0]` is
    the logits or the last hidden state. `overrides`: config fields replacing TINY's (tools/knob_sweep.py)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto = AutoModelForCausalLM if MODEL_TYPE[name] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
    cfg = AutoConfig.for_model(MODEL_TYPE[name], **{**TINY[name], **overrides})
    torch.manual_seed(seed)
    try:
        model = auto.from_config(cfg, dtype=dtype, experts_implementation=experts_implementation)
    except (ValueError, KeyError, TypeError):  # DBRX, LongCat-Flash, Llama4: no experts_implementation switch
        cfg = AutoConfig.for_model(MODEL_TYPE[name], **{**TINY[name], **overrides})
        torch.manual_seed(seed)
        model = auto.from_config(cfg, dtype=dtype)
    ne = num_experts_of(cfg)
    hidden = getattr(cfg, "hidden_size", None) or cfg.d_model
    routers = {ne, ne + (getattr(cfg, "zero_expert_num", 0) or 0)}
    redraw(model, cfg, dtype, hidden, router_rows=routers, extra_router_suffixes=EXTRA_ROUTER_SUFFIXES,
           router_std=ROUTER_STD.get(name))
    return model.eval()
