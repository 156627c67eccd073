"""Lowering: how each op runs. Both implementations of each op sit side by side:

    dispatch.py            the choice per call (device, dtype, shape; never data: capture-safe)
    device.py              device facts (Triton available and allowed, GPU name, capability, SMs, TMA)

    torch_experts.py       experts: the reference / CPU path and the backward off Triton (route -> permute ->
    torch_segment_mm.py      GEMM -> combine in torch ops, over one of three segment-matmul implementations)
    torch_activations.py   gated activations, forward and backward
    torch_shared.py        the shared experts' MLP (cuBLAS GEMMs), forward and backward
    torch_route.py         route: reference / CPU path and backward

    triton_decode.py       experts forward, decode: GEMVs per (token, expert) pair, no sort
    triton_align.py        experts forward, prefill: sort pairs into BLOCK_M-aligned segments (and gathered
                             copies of rows in that order, for a library's GEMMs) ...
    triton_experts.py        ... gather-GEMM + activation, down GEMM x router weight, combine
    triton_grouped.py      experts forward over a library's grouped GEMM (torch._grouped_mm, CUTLASS), Triton glue
    triton_backward.py     experts backward on CUDA (its GEMMs by the library: triton_backward_library.py)
    triton_act.py          the gated activation as a Triton function (and a one-pass kernel)
    triton_route.py        route forward: one launch
    triton_config.py       tuned kernel configs, stored per GPU as data in configs/*.json

Importing this package imports no Triton (dispatch.py loads the triton_* modules on first CUDA use).
"""
