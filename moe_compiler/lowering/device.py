"""Static facts about the device an op runs on: which kernels may run there, and the GPU's properties.

Every choice made from these is a function of device, dtype and shape only, never of data, so it is stable
under CUDA graph capture. Cached per device index: they are host time on the critical path of small T.

Environment: MOE_COMPILER_KERNELS=torch runs the torch composite on CUDA too (for comparisons, or as a way
around a Triton problem); the default, MOE_COMPILER_KERNELS=triton, uses the Triton kernels wherever CUDA
and Triton are available.
"""

from __future__ import annotations

import functools
import os

import torch
from torch._subclasses.fake_tensor import is_fake

KERNELS_ENV = "MOE_COMPILER_KERNELS"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels() -> str:
    """MOE_COMPILER_KERNELS: 'triton' (the default) or 'torch' (the composite on CUDA too)."""
    value = os.environ.get(KERNELS_ENV, "triton")
    if value not in ("triton", "torch"):
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected 'triton' or 'torch'")
    return value


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the ops' forwards run Triton kernels for tensors like `t`."""
    return t.device.type == "cuda" and kernels() == "triton" and triton_available()


def index(t: torch.Tensor) -> int:
    """The CUDA device index of `t` (the current device for an index-less "cuda")."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def sm90_or_newer(index: int) -> bool:
    """Hopper / Blackwell data center GPUs: torch._grouped_mm runs CUTLASS there (bf16)."""
    return capability(index)[0] in (9, 10)


def has_tma(index: int) -> bool:
    return capability(index)[0] >= 9


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (kernels launched now are recorded, not run)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@functools.cache
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def aligned16(t: torch.Tensor) -> bool:
    """Whether t's first element sits on a 16-byte boundary (what TMA and csrc/'s loads need). A traced (fake)
    tensor has no address: its offset into a storage the allocator aligns stands in (csrc/'s ops check the
    address again per call)."""
    return (t.storage_offset() * t.element_size() if is_fake(t) else t.data_ptr()) % 16 == 0
