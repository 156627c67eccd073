"""Tiny random Hugging Face MoE models for tests: real transformers classes, offline, seconds to build.

Sizes keep every GEMM row 16-byte aligned (torch._grouped_mm needs it) and routers well separated:
router weights are re-drawn with std 1 so no two experts tie in bf16, and eager and compiled runs pick
the same experts (a tie would make the logits differ for reasons that have nothing to do with us).
Expert biases are re-drawn (they start at zero), and in fp32 the expert weights too, so the experts'
output is O(1) and a wrong result shows in the logits.
"""

from __future__ import annotations

import torch

TINY = {
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=128),
    "mixtral": dict(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128),
    # first_k_dense_replace=1: layer 0 is a dense MLP, layers 1-2 are MoE (2 MoE layers of 3).
    "deepseek_v3": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=128),
    "olmoe": dict(hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=128, pad_token_id=None, bos_token_id=None,
        eos_token_id=None),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    # Biased experts, [E, H, 2I] / [E, I, H] weights, interleaved gate/up, clamped SwiGLU: a low limit so
    # the clamps actually cut (hidden states here are O(1)).
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        swiglu_limit=1.0, layer_types=["sliding_attention", "full_attention"], pad_token_id=None, bos_token_id=None,
        eos_token_id=None),
}
MOE_LAYERS = {"qwen3_moe": 2, "mixtral": 2, "deepseek_v3": 2, "olmoe": 2, "qwen2_moe": 2, "gpt_oss": 2}
ARCHS = tuple(TINY)


def tiny_model(arch: str, experts_implementation: str = "grouped_mm", dtype=torch.float32, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, **{**TINY[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation=experts_implementation)
    redraw(model, cfg, dtype, cfg.hidden_size)
    return model.eval()


def redraw(model, cfg, dtype, hidden: int, router_rows=None, extra_router_suffixes=(), router_std=None):
    """Routers with std 1 (sigmoid-scored ones hidden^-1/2, or `router_std`), expert biases with std 0.2 and, in
    fp32, expert weights with fan_in^-1/2."""
    # A sigmoid router (DeepSeek-V3, Kimi-K2: a score correction bias beside its weight) with std-1 rows gives logits
    # of std ~hidden^1/2 (85 at H = 7168): ~40% of the scores round to exactly 1.0 in fp32, top-k breaks the ties by
    # position, and every token went to the same ~40 of 256-384 experts (benchmarks/NOTES.md, session 26). Rows of
    # std hidden^-1/2 give logits of std ~1 (RMS-normed inputs): distinct scores, tokens spread over the experts.
    sigmoid_routers = {n.rsplit(".", 1)[0] for n, _ in [*model.named_buffers(), *model.named_parameters()]
                       if n.endswith("e_score_correction_bias")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_router = name.endswith(("gate.weight", "router.weight", *extra_router_suffixes))
            if (
                is_router and p.dim() == 2 and p.shape[1] == hidden and p.shape[0] > 1
                and (router_rows is None or p.shape[0] in router_rows)
            ):
                std = hidden**-0.5 if name.rsplit(".", 1)[0] in sigmoid_routers else 1.0
                p.normal_(0.0, router_std or std)
            elif name.endswith("proj_bias"):  # expert biases start at zero: make them matter
                p.normal_(0.0, 0.2)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")) and dtype == torch.float32:
                # The default init (std 0.02) makes expert outputs tiny next to the residual stream, so a
                # wrong experts result would barely move the logits. fan_in^-1/2 makes them O(1). Only in
                # fp32: in bf16, O(1) experts amplify rounding through the layers until plain Inductor
                # differs from eager by ~4% (seen: GPT-OSS tiny), so bf16 parity is checked at the default
                # init, and the function itself in fp32 (1e-5) and by the op tests against fp64.
                fan_in = p.shape[1] if cfg.model_type == "gpt_oss" else p.shape[2]  # GPT-OSS stores [E, in, out]
                p.normal_(0.0, fan_in**-0.5)


def count_experts_modules(model) -> int:
    return sum(1 for m in model.modules() if type(m).__name__.endswith("Experts"))
