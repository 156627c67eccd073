"""FP8 linear layers (the linear_quantized op): transformers' FP8Linear weights (e4m3 [N, K] with block scales) read
in place; the activations stay exact (w8a16).

Data contract (bn, bk: the weight's scale blocks)
    x        [M, K]                       bf16/fp16/fp32, unit column stride
    w        [N, K] float8_e4m3fn         scales [ceil(N/bn), ceil(K/bk)] fp32 / float8_e8m0fnu
    bias     [N] or None
    y        [M, N]                       x's dtype: x @ (w * scales)^T + bias, one output tile per program
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .triton_experts import _tile_coords, dot_precision
from .triton_quantized import _column_scales, _scale_view
from .triton_quantized_config import step_k


@triton.jit
def _linear_fp8_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    stride_xm, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, E8M0: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y [M, N] = x [M, K] @ (w [N, K] * block scales)^T (+ bias): w8a16, one output tile per program."""
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    kk = tl.arange(0, BLOCK_K)
    rows = tl.minimum(m, M - 1).to(tl.int64)  # rows past M re-read the last one; never stored
    x_ptrs = x_ptr + rows[:, None] * stride_xm + kk[None, :]
    w_ptrs = w_ptr + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(kk[None, :] < K - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(kk[:, None] < K - k0), other=0.0)
        sw = _column_scales(s_ptr, 0, n, k0, 0, stride_sn, stride_sk, SCALE_BN, SCALE_BK, E8M0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION) * sw[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + n).to(tl.float32)[None, :]
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (m < M)[:, None] & (n_out < N)[None, :]
    tl.store(y_ptr + m[:, None].to(tl.int64) * stride_ym + n_out[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def linear_forward(x, w, s, bias, block_n: int, block_k: int) -> torch.Tensor:
    """x [M, K] (unit column stride) -> [M, N] in x's dtype. Untuned tiles: 16 rows at decode, 64 above."""
    M, K = x.shape
    N = w.shape[0]
    y = x.new_empty(M, N)
    if M == 0:
        return y
    block_m = 16 if M <= 16 else 64
    block_kk = step_k(block_k)
    block_nn = 64 if M <= 16 else 128
    s, e8m0 = _scale_view(s)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_nn),)
    launch.kernel(_linear_fp8_kernel)[grid](
        x, w, s, bias if bias is not None else s, y, M, N, K, block_n, block_k,
        x.stride(0), *w.stride(), *s.stride(), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=K % block_kk == 0, E8M0=e8m0, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_nn, BLOCK_K=block_kk, GROUP_M=8, num_warps=4, num_stages=4,
    )
    return y
