"""Real-dimension MoE models with random weights, built on the GPU in seconds (no checkpoint, no network): the
configs of the released models with fewer layers. Shared by bench_models.py and probes/probe_host_block.py.

Routers are re-drawn with std 1 (moe_compiler.testing.redraw) so that no two experts tie in bf16 and eager,
Inductor and fused_moe pick the same experts: the logits can be compared.
"""

from __future__ import annotations

import torch

from moe_compiler.testing.hf_models import redraw

QWEN3 = dict(model_type="qwen3_moe", head_dim=128, num_key_value_heads=4, vocab_size=151936, norm_topk_prob=True,
             num_experts_per_tok=8, num_experts=128, decoder_sparse_step=1, mlp_only_layers=[])
DSV3 = dict(model_type="deepseek_v3", first_k_dense_replace=0)  # DeepseekV3Config's defaults are DeepSeek-V3's

# name -> (config overrides, layers the benchmark builds)
MODELS: dict[str, tuple[dict, int]] = {
    "qwen3_30b_a3b": (dict(QWEN3, hidden_size=2048, num_attention_heads=32, moe_intermediate_size=768), 4),
    "qwen3_235b_a22b": (dict(QWEN3, hidden_size=4096, num_attention_heads=64, moe_intermediate_size=1536), 2),
    "deepseek_v3": (DSV3, 2),
    "kimi_k2": (dict(DSV3, n_routed_experts=384, num_attention_heads=64, n_group=1, topk_group=1,
                     routed_scaling_factor=2.827, vocab_size=163840), 2),
    "mixtral_8x7b": (dict(model_type="mixtral"), 2),
    "gpt_oss_20b": (dict(model_type="gpt_oss", num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
                         intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                         sliding_window=128, vocab_size=201088), 4),
}


def config(name: str, layers: int | None = None):
    from transformers import AutoConfig

    overrides, default_layers = MODELS[name]
    overrides = dict(overrides)
    model_type = overrides.pop("model_type")
    n = layers or default_layers
    if model_type == "gpt_oss":
        overrides["layer_types"] = ["sliding_attention", "full_attention"] * (n // 2) + ["sliding_attention"] * (n % 2)
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=n, **overrides)
    cfg.eos_token_id = None  # random weights: generate() runs every requested token
    return cfg


def build(name: str, layers: int | None = None, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """The model in eval mode on `device`, routers re-drawn, experts as transformers runs them (grouped_mm)."""
    from transformers import AutoModelForCausalLM

    cfg = config(name, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation="grouped_mm")
    redraw(model, cfg, dtype, cfg.hidden_size)
    return model.eval()


def moe_blocks(model) -> list[torch.nn.Module]:
    """Each decoder layer's MoE block (the module holding the router and the experts)."""
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
