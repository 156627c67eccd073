"""Inside torch.compile, record an op's Triton launches into the graph instead of leaving the op opaque.

AOTAutograd functionalizes every graph it traces (inference and training alike) under FunctionalTensorMode.
A rule registered for that mode sees each call of our op once, at trace time, with the call's shapes (fixed, or
under dynamic shapes a symbolic token count: a guard keeps the graph to lengths of one band, whose grid point's
config it takes, triton_config.config_tokens): where the op would run Triton kernels on those shapes (`inlinable`),
the rule runs the op's own implementation under lowering.launch.traced(), so each launch becomes a
`triton_kernel_wrapper_functional` node that Inductor compiles and launches itself (lowering/launch.py says why:
the op's Python costs more host time per call than a decode layer's GPU work); csrc/'s CUTLASS GEMMs among them
become calls of their own ops (lowering/cutlass.py), which Inductor's code makes directly. Elsewhere (CPU, the
torch composite, symbolic sizes other than the token count, torch._grouped_mm's path, large calls that keep host
TMA descriptors) the rule hands the call back and the op stays one opaque node.

torch.library.triton_op does the same unconditionally; it cannot keep the op opaque where the implementation
is not traceable (the CPU composite's data-dependent segment loop), hence this conditional form.
Eager calls never pass here. MOE_COMPILER_INLINE=0 keeps every call opaque (for comparisons).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from ..lowering import launch
from ..switches import env_switch

INLINE_ENV = "MOE_COMPILER_INLINE"


_kept_opaque: contextvars.ContextVar[bool] = contextvars.ContextVar("moe_compiler_kept_opaque", default=False)


def enabled() -> bool:
    if _kept_opaque.get():
        return False
    return env_switch(INLINE_ENV, "1", "record the launches, the default", "opaque")


@contextlib.contextmanager
def kept_opaque():
    """Every call traced inside stays one opaque node (the backend's second attempt at a graph whose recorded
    launches failed to compile)."""
    token = _kept_opaque.set(True)
    try:
        yield
    finally:
        _kept_opaque.reset(token)


def static(*tensors) -> bool:
    """Every size and stride of the (non-None) tensors is a plain int: the config, grid and buffers are facts of
    the trace."""
    return all(isinstance(s, int) for t in tensors if t is not None for s in (*t.shape, *t.stride()))


def hinted(*tensors) -> bool:
    """The (non-None) tensors' rows may be counted by symbols with hints (dynamic shapes: one graph for many lengths;
    a hint is the length being traced), their last size (features) is a plain int, and every stride is either. The
    config is then the hint's band's (lowering/triton_config.config_tokens: T guarded into the band), and the
    grids and buffers are expressions of the symbol. Unbacked symbols (data-dependent sizes) have no hint."""

    def known(s) -> bool:
        return isinstance(s, int) or s.node.has_hint()

    return all(
        all(known(s) for s in (*t.shape[:-1], *t.stride())) and isinstance(t.shape[-1], int)
        for t in tensors if t is not None and t.dim()
    )


@contextlib.contextmanager
def _kept_in_backward():
    """Nodes traced inside are tagged for AOTAutograd's partitioner to place in the backward graph. Without it, a
    recorded backward's steps that read only forward tensors (the rows' alignment, the gathered copy of X the
    library's weight gradient reads) are computed in the forward and saved across it, as a user Triton kernel is
    never recomputed: an [S_pad, H] buffer per layer held from forward to backward, which the opaque op never kept."""
    from torch.fx import traceback as fx_traceback

    if not fx_traceback.has_preserved_node_meta():  # not a joint trace: nothing to partition
        yield
        return
    meta = fx_traceback.current_meta
    before = meta.get("partitioner_tag")
    meta["partitioner_tag"] = "must_be_in_backward"
    try:
        yield
    finally:
        meta["partitioner_tag"] = before


def register(opdef, inlinable: Callable[..., bool], run: Callable, backward: bool = False):
    """Traced calls of `opdef` for which `inlinable(*args, **kwargs)` holds run `run(*args, **kwargs)` with
    their launches recorded; the others stay calls of the op. `backward`: an op of an autograd formula, whose
    recorded nodes stay in the backward graph (_kept_in_backward)."""

    def rule(mode, op, types, args, kwargs):
        # torch.export's tracer imports Triton: imported here, at trace time, so `import moe_compiler` does not
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if any(not issubclass(t, FakeTensor) and t not in (torch.Tensor, FunctionalTensor) for t in types):
            return NotImplemented  # another tensor subclass: let it handle the call first
        if custom_triton_ops_decomposition_disabled() or not (enabled() and inlinable(*args, **kwargs)):
            # (torch.export asks for custom ops to stay whole, as it does of torch.library.triton_op's)
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode, launch.traced(), _kept_in_backward() if backward else contextlib.nullcontext():
            return run(*args, **kwargs)

    opdef.register_torch_dispatch(FunctionalTensorMode, rule)
