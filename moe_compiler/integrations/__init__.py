"""Integrations with model libraries (each imports transformers only when called):
    hf_experts.py  the "fused_moe" experts implementation for transformers' quantized experts modules; from_pretrained
    hf_linear.py   transformers' FP8Linear layers through linear_quantized (no Hub kernel)
"""
