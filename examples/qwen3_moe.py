"""Qwen3-MoE with backend="fused_moe": `python examples/qwen3_moe.py [--model PATH] [--device cuda]`.

Default: a random Qwen3-30B-A3B-shaped model (128 experts, top-8) scaled down to run anywhere offline.
"""

from common import run

# Qwen3-30B-A3B routing (E=128, k=8, softmax -> top-k -> renormalize) with small widths and 2 layers.
TINY = dict(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=96, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    vocab_size=1024,
)

if __name__ == "__main__":
    run(__doc__, "qwen3_moe", TINY)
