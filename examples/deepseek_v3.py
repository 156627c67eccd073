"""DeepSeek-V3 with backend="fused_moe": `python examples/deepseek_v3.py [--model PATH] [--device cuda] [--fp8]`.

Default: a random DeepSeek-V3-shaped model (256 routed experts, top-8 from 4 of 8 groups, sigmoid scores
with correction bias, one shared expert) scaled down. The shared expert and the router go to Inductor;
the routed experts become one moe_compiler.experts call per layer.

--fp8: the tiny model is first written as a finegrained-FP8 checkpoint (every Linear but lm_head in
e4m3 with 128 x 128 block scales, as DeepSeek-V3's release), then loaded with moe_compiler.from_pretrained;
with --model PATH a real FP8 checkpoint is. On a CPU transformers loads FP8 dequantized.
"""

from common import run

TINY = dict(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=64, n_routed_experts=256, num_experts_per_tok=8,
    n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, vocab_size=1024,
)

if __name__ == "__main__":
    run(__doc__, "deepseek_v3", TINY)
