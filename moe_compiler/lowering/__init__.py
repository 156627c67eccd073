"""Lowering: picks how the experts op runs for a given device, dtype and shape.

    CUDA (any float dtype)  -> Triton: decode path (triton_decode.py) or sorted path (triton_align.py +
                               triton_experts.py), the kernel config looked up in triton_config.py
    CPU, or CUDA with MOE_COMPILER_KERNELS=torch, and every backward
                            -> composite.py over one segment-matmul implementation (`select`)
The route op (routing.py) asks `uses_triton` the same way: its CUDA forward is triton_route.py.

The choice is made per call from static facts only (device, dtype, shapes, alignment), never from data,
so it is stable under CUDA graph capture.

Environment: MOE_COMPILER_KERNELS=torch runs the torch composite on CUDA too (the v0 path: for
comparisons, or as a way around a Triton problem); the default, MOE_COMPILER_KERNELS=triton, uses the
Triton forward wherever CUDA and Triton are available.
"""

from __future__ import annotations

import functools
import os

import torch

from . import composite, cpu_loop, gather_bmm, grouped_mm

KERNELS_ENV = "MOE_COMPILER_KERNELS"


@functools.cache
def _sm90_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] in (9, 10)


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _rows_16b_aligned(w_gate_up: torch.Tensor, w_down: torch.Tensor, *tensors: torch.Tensor) -> bool:
    # CUTLASS grouped GEMM loads 16-byte vectors: every operand's base and every row stride (H, I and 2I
    # elements, in whichever layout) must be a multiple of 16 bytes.
    dims = (*w_gate_up.shape[1:], *w_down.shape[1:])
    size = w_gate_up.element_size()
    return all(d * size % 16 == 0 for d in dims) and all(t.data_ptr() % 16 == 0 for t in (w_gate_up, w_down, *tensors))


def select(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """The segment-matmul implementation for these operands (a module with mm / mm_nn / wgrad)."""
    if hidden.device.type == "cpu":
        # torch's grouped GEMM loops over groups in C++ (faster than our Python loop for many experts);
        # the Python loop remains for rows that are not 16-byte aligned.
        return grouped_mm if _rows_16b_aligned(w_gate_up, w_down, hidden) else cpu_loop
    if hidden.device.type != "cuda":
        return cpu_loop
    if (
        hidden.dtype == torch.bfloat16
        and w_gate_up.dtype == torch.bfloat16
        and _sm90_or_newer(hidden.device.index if hidden.device.index is not None else torch.cuda.current_device())
        and _rows_16b_aligned(w_gate_up, w_down, hidden)
    ):
        return grouped_mm
    return gather_bmm


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def uses_triton(hidden: torch.Tensor) -> bool:
    kernels = os.environ.get(KERNELS_ENV, "triton")
    if kernels not in ("triton", "torch"):
        raise ValueError(f"{KERNELS_ENV}={kernels!r}: expected 'triton' or 'torch'")
    return hidden.device.type == "cuda" and kernels == "triton" and _triton_available()


def triton_config_for(hidden, topk_ids, w_gate_up, I: int):
    """The tuned (or default, with a warning) Triton config of this problem on hidden's GPU."""
    index = hidden.device.index if hidden.device.index is not None else torch.cuda.current_device()
    T, H = hidden.shape
    return _config_for(index, hidden.dtype, w_gate_up.shape[0], topk_ids.shape[1], H, I, T)


@functools.lru_cache(maxsize=4096)  # per call it is host time on the critical path of small T
def _config_for(index: int, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int):
    from . import triton_config, triton_decode

    config = triton_config.lookup(_gpu_name(index), _capability(index), dtype, E, k, H, I, T)
    if config.path is triton_config.Path.DECODE and T * k > triton_decode.MAX_PAIRS:
        config = triton_config.default_config(dtype, E, k, H, I, max(T, triton_decode.MAX_PAIRS))
    return config


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config=None):
    """The experts op's forward on whichever implementation fits (see the module docstring)."""
    T, k = topk_ids.shape
    if T == 0 or k == 0:
        return hidden.new_zeros(hidden.shape)
    if not uses_triton(hidden):
        impl = select(hidden, w_gate_up, w_down)
        return composite.experts_forward(impl, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    return triton_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config)


# The decode kernels take the shared MLP in only when its weights are small: fusing saves its own ~5
# launches and ramps (~20 us under a CUDA graph) but adds its tiles to grids whose programs each stream
# ~1-2 MB at decode, so a large shared MLP lengthens the last wave by more than it saves. Measured on the
# H100 at T=1 (benchmarks/NOTES.md "shared experts v2"): Qwen3-Next's 6 MB shared MLP 1.39x faster fused;
# DeepSeek-V3's 88 MB, Llama-4's 250 MB and Qwen2-57B's 440 MB 0.90-0.93x.
SHARED_IN_KERNEL_MAX_BYTES = 16 << 20


def _shared_in_kernel(mlp) -> bool:
    return 3 * mlp.down.numel() * mlp.down.element_size() <= SHARED_IN_KERNEL_MAX_BYTES


def experts_shared_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, mlp, spec, config=None):
    """The experts op plus the block's shared MLP (shared_mlp.py). On the Triton decode path a small shared
    MLP is one more pair per token inside the experts kernels (its weights stream beside the routed ones,
    no launches of its own); otherwise it runs as cuBLAS GEMMs after the routed experts."""
    from .. import shared_mlp

    T, k = topk_ids.shape
    if T > 0 and k > 0 and uses_triton(hidden) and _shared_in_kernel(mlp):
        from . import triton_config

        if config is None:
            config = triton_config_for(hidden, topk_ids, w_gate_up, spec.intermediate(w_down))
        if config.path is triton_config.Path.DECODE:
            return triton_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config, mlp)
    routed = experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config)
    return shared_mlp.forward(routed, hidden, mlp, spec)


def triton_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config=None, mlp=None):
    """The Triton forward with a given config (None: looked up); returns out [T, H]. T > 0. A shared MLP
    `mlp` is taken by the decode kernels only (experts_shared_forward sends it here on that path)."""
    from . import triton_config, triton_decode, triton_experts

    if config is None:
        config = triton_config_for(hidden, topk_ids, w_gate_up, spec.intermediate(w_down))
    # Out-of-range ids: the kernels clamp them (no stray memory access) and the kernel that checks them fails
    # the launch with a device-side assert (triton_config.LIVE_ASSERTS): loud, no host sync, capture-safe.
    if config.path is triton_config.Path.DECODE:
        out, _ = triton_decode.experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config, mlp)
    else:
        assert mlp is None, "the sorted path does not take a shared MLP"
        out, _ = triton_experts.experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config)
    return out
