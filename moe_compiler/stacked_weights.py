"""Experts held one module per expert (`nn.ModuleList` of `nn.Linear`), read in place as one stacked tensor.

transformers-v4 checkpoints and remote-code models (Mixtral / Qwen2-MoE / OLMoE v4, DeepSeek and Kimi
remote code) keep every expert's weights as separate parameters:

    gate_up parts: P per expert, in expert order   P = 2: gate_e [I, H], up_e [I, H]   (w1 / w3, gate_proj / up_proj)
                                                    P = 1: gate_up_e [2I, H]            (one fused Linear)
    down parts:    1 per expert                     down_e [H, I]

The kernels want W_gate_up [E, 2I, H] and W_down [E, H, I] (spec.py). Keeping a stacked copy beside the
model's parameters would double the expert memory and go stale when the weights change, so instead:

  * `restack_in_place` (once, at compile time): allocate one [E, 2I, H] and one [E, H, I] tensor, copy the
    parts in, and point every part parameter's `.data` at its slice. The parameters stay the same Python
    objects (optimizers, state_dict, tied references keep working), memory does not grow (the old
    per-expert storages are freed), and in-place updates (`optimizer.step()`, `load_state_dict`,
    `p.data.copy_`) write into the stacked tensor the op reads.
  * `stacked` (every call, host metadata only, capture-safe): if the parts still tile one storage in
    order, return the [E, rows, cols] view of it (no copy). If anything re-pointed a part (`p.data = t`,
    `model.to(...)` one tensor at a time), fall back to concatenating the parts for this call only:
    correct, costs one extra read + write of the expert weights, and warns once.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class UntiledWeightsWarning(RuntimeWarning):
    """The per-expert weights no longer tile one storage: each call concatenates them (correct, slower)."""


UNTILED_WARNING = (
    "moe_compiler: the per-expert weights of an experts block no longer tile one stacked tensor (a parameter "
    "was re-assigned, or the model was moved after compiling), so each call concatenates them ({mb:.1f} MB "
    "copied per call). The result is still correct. To get the in-place path back, call "
    "moe_compiler.restack_experts(parts) on them, or compile the model again after moving it."
)


def tiles(parts: list[Tensor]) -> bool:
    """True if `parts` are contiguous, equally shaped, and lie back to back in one storage, in order.

    Runs on every op call (host metadata only): one data_ptr walk, then one storage-size check, since
    two separate allocations can also sit back to back in the caching allocator's memory."""
    first = parts[0]
    shape, dtype = first.shape, first.dtype
    step = first.numel() * first.element_size()
    base = first.data_ptr()
    for i, p in enumerate(parts):
        if p.data_ptr() != base + i * step or p.dtype != dtype or p.shape != shape or not p.is_contiguous():
            return False
    return first.untyped_storage().nbytes() >= first.storage_offset() * first.element_size() + len(parts) * step


def stacked(parts: list[Tensor], num_experts: int) -> Tensor:
    """The parts as one [E, P * rows, cols] tensor: a view of their storage if they tile it, else a copy."""
    rows, cols = parts[0].shape
    per_expert = len(parts) // num_experts
    shape = (num_experts, per_expert * rows, cols)
    if tiles(parts):
        first = parts[0]
        return first.as_strided(shape, (per_expert * rows * cols, cols, 1), first.storage_offset())
    mb = sum(p.numel() * p.element_size() for p in parts) / 2**20
    warnings.warn(UNTILED_WARNING.format(mb=mb), UntiledWeightsWarning, stacklevel=2)
    return torch.cat(parts).view(shape)


@torch.no_grad()
def restack_experts(parts: list[Tensor]) -> bool:
    """Make `parts` (tensors or parameters, in op order) views of one new contiguous tensor, in place.

    Returns False when there is nothing to do (they already tile one storage). The new tensor lives
    as long as any part refers to it; nothing else keeps it."""
    if tiles(parts):
        return False
    first = parts[0]
    if any(p.shape != first.shape or p.dtype != first.dtype or p.device != first.device for p in parts):
        raise ValueError(
            "moe_compiler.restack_experts: expected parts of one shape, dtype and device, got "
            f"{sorted({(tuple(p.shape), str(p.dtype), str(p.device)) for p in parts})}"
        )
    if len({id(p) for p in parts}) != len(parts):
        raise ValueError(
            "moe_compiler.restack_experts: a tensor appears twice among the parts (tied experts cannot share one slot)"
        )
    base = torch.empty((len(parts), *first.shape), dtype=first.dtype, device=first.device)
    for slot, p in zip(base.unbind(0), parts):
        slot.copy_(p)
    for slot, p in zip(base.unbind(0), parts):
        p.data = slot
    return True
