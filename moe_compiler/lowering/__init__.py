"""Lowering: how each op runs. Both implementations of each op sit side by side:

    dispatch.py            the choice per call (device, dtype, shape; never data: capture-safe)
    device.py              device facts (Triton available and allowed, GPU name, capability, SMs, TMA)

    torch_experts.py       experts: the reference / CPU path and every backward (route -> permute -> GEMM ->
    torch_segment_mm.py      combine in torch ops, over one of three segment-matmul implementations)
    torch_activations.py   gated activations, forward and backward
    torch_shared.py        the shared experts' MLP (cuBLAS GEMMs), forward and backward
    torch_route.py         route: reference / CPU path and backward

    triton_decode.py       experts forward, decode: GEMVs per (token, expert) pair, no sort
    triton_align.py        experts forward, prefill: sort pairs into BLOCK_M-aligned segments ...
    triton_experts.py        ... gather-GEMM + activation, down GEMM x router weight, combine
    triton_act.py          the gated activation as a Triton function (and a one-pass kernel)
    triton_route.py        route forward: one launch
    triton_config.py       tuned kernel configs, stored per GPU as data in configs/*.json

Importing this package imports no Triton (dispatch.py loads the triton_* modules on first CUDA use).
"""
