"""Kimi-K2-style model with backend="fused_moe": `python examples/kimi_k2.py [--model PATH] [--device cuda]`.

Kimi-K2 checkpoints load as transformers' `deepseek_v3` (there is no kimi_k2 model type in 5.x). Default:
Kimi-K2's routing - 384 experts, top-8, a single expert group, routed_scaling_factor 2.827, one shared
expert, first layer dense - with widths and depth scaled down.
"""

from common import run

TINY = dict(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=64, n_routed_experts=384, num_experts_per_tok=8,
    n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.827, norm_topk_prob=True,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, vocab_size=1024,
)

if __name__ == "__main__":
    run(__doc__, "deepseek_v3", TINY)
