"""Kimi-K2-style model with backend="fused_moe": `python examples/kimi_k2.py [--model PATH] [--device cuda] [--int4]`.

Kimi-K2 checkpoints load as transformers' `deepseek_v3` (there is no kimi_k2 model type in 5.x). Default:
Kimi-K2's routing - 384 experts, top-8, a single expert group, routed_scaling_factor 2.827, one shared
expert, first layer dense - with widths and depth scaled down.

--int4: the tiny model is first written as a compressed-tensors INT4 checkpoint (routed experts packed,
groups of 32, as Kimi-K2-Thinking's), then loaded with moe_compiler.from_pretrained, experts kept packed;
with --model PATH a real INT4 checkpoint is.
"""

from common import run
from deepseek_v3 import TINY as DEEPSEEK_V3_TINY

# DeepSeek-V3's architecture at the same scaled-down widths, with Kimi-K2's routing.
TINY = dict(DEEPSEEK_V3_TINY, n_routed_experts=384, n_group=1, topk_group=1, routed_scaling_factor=2.827)

if __name__ == "__main__":
    run(__doc__, "deepseek_v3", TINY)
