"""How the Triton kernels are launched: straight from Python (an eager call of an op), or recorded into the
graph torch.compile is tracing, so that Inductor emits the launches in its own generated code.

An eager call of `moe_compiler::experts` pays Python for every launch (Triton's binder walks ~40 arguments:
25-65 µs per kernel on an H200 host) plus the custom-op layer and the input checks: 220-260 µs at T = 1, more
than the GPU time of a decode layer. Inside a compiled graph none of that needs to run per call: the shapes
are fixed, so the checks, the config lookup and the grid are facts of the trace. ops/ registers a
FunctionalTensorMode rule (what torch.library.triton_op does, applied only where it can be) that runs the
op's implementation under `traced()`, where `kernel(k)` wraps each kernel with torch.library.wrap_triton:
the launch becomes a `triton_kernel_wrapper_functional` node, Inductor compiles the kernel and launches it
from its C++-backed launcher, and the op's Python is gone from the call path.

    eager call          op -> checks -> config -> kernel[grid](...)             (Python per call)
    torch.compile       trace: op -> checks -> config -> wrap_triton(kernel)[grid](...)   (once)
                        call:  Inductor's wrapper -> launcher(kernel)                    (per call)
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from ..switches import OptionSwitch, env_switch
from .triton_config import LIVE_ASSERTS

_state = threading.local()

# MOE_COMPILER_ROUTE_IN_GEMV=1 routes traced decode calls inside their gate_up GEMV. Off by default: measured on
# the H200 (NOTES "sessions 16-17"), Qwen3-30B-A3B T = 1 under a CUDA graph +1.5 µs per layer of GPU time (every
# program routes before its weight stream starts), GPT-OSS-20B even; the host time it saves in default mode was
# below that probe's run-to-run noise (variants timed apart). The A/B timed in the same rounds decides.
ROUTE_IN_GEMV_ENV = "MOE_COMPILER_ROUTE_IN_GEMV"


def route_in_gemv() -> bool:
    return env_switch(ROUTE_IN_GEMV_ENV, "0", "route inside the gate_up GEMV of a traced decode call",
                      "the route op's own launch, the default")


# Recorded TMA (the backend option moe_compiler.recorded_tma, env MOE_COMPILER_RECORDED_TMA; on by default) keeps
# the TMA loads of a traced sorted-path call whose GEMMs are long enough for TMA to pay (dispatch.traced_tma): its
# kernels build their descriptors on the device (tl.make_tensor_descriptor, from the plain pointer arguments a
# recorded launch can carry; Triton allocates their global scratch through triton.set_allocator, which Inductor's
# launcher sets). Off, such a call stays one opaque op to keep host descriptors and pays the op's host path:
# measured on the H200 (benchmarks/NOTES.md, session 27), Mixtral-8x7B's prompts of 257-4096 tokens went from
# 1.11x / 0.98x plain torch.compile at 512 / 2048 tokens to 1.31x / 1.00x, Kimi-K2's 2048 from 0.97x to 1.21x.
RECORDED_TMA_ENV = "MOE_COMPILER_RECORDED_TMA"
_RECORDED_TMA = OptionSwitch(RECORDED_TMA_ENV, "1", "recorded calls keep TMA where it pays, descriptors built on "
                             "the device, the default", "recorded calls load weights by pointer or stay opaque")
recorded_tma_option = _RECORDED_TMA.option  # the backend's `moe_compiler.recorded_tma`, for the traces of one compile


def recorded_tma() -> bool:
    """The backend option while a compile runs (recorded_tma_option), else the environment."""
    return _RECORDED_TMA()


@contextlib.contextmanager
def traced():
    """Launches inside this block are recorded into the graph being traced instead of run."""
    before = tracing()
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def tracing() -> bool:
    return getattr(_state, "on", False)


def empty(like: torch.Tensor, *size, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized buffer of `size` on like's device, in like's dtype unless given, for kernels to write. By
    torch.empty, never like.new_empty or torch.empty_like: AOTAutograd's CSE merges identical new_empty /
    empty_like calls of a traced graph (it spares aten.empty alone), so two buffers that recorded kernels write
    became one — a training graph's backward took the forward's output buffer as its d hidden's, saved across
    the step and copied per call (tests/ops/test_inline.py, the training step's trace)."""
    return torch.empty(size, dtype=like.dtype if dtype is None else dtype, device=like.device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """empty(t, *t.shape) where t is contiguous (a buffer of its layout; see empty), else torch.empty_like."""
    return empty(t, *t.shape) if t.is_contiguous() else torch.empty_like(t)


def remember_route(weights, ids, routed) -> None:
    """While tracing: note that `weights` and `ids` (the route op's outputs, these very tensor objects) were routed
    as `routed` (triton_route.Routed), so that a decode experts call given exactly them can route again inside its
    first kernel instead (triton_decode.py); the route launch, its outputs then unread, is dropped by Inductor
    as dead code. Called while tracing; a note lives as long as `ids`."""
    if not hasattr(_state, "routes"):
        _state.routes = {}
    routes = _state.routes  # by id(): tensors compare elementwise, so they cannot be dict keys themselves
    routes[id(ids)] = (weakref.ref(ids), weakref.ref(weights), routed)
    weakref.finalize(ids, routes.pop, id(ids), None)


def route_of(weights, ids):
    """The Routed of a traced route call whose outputs are exactly (weights, ids), or None."""
    entry = getattr(_state, "routes", {}).get(id(ids)) if tracing() else None
    if entry is None or entry[0]() is not ids or entry[1]() is not weights:
        return None
    return entry[2]


def upper_bound(n) -> int | None:
    """The largest value a size can take in the graph being traced: n for a plain int; for a symbolic size
    (dynamic shapes) the upper end of its range — triton_config.config_tokens has guarded the token count into a band,
    so sizes derived from it are bounded too — or None where it is unbounded. Host-side choices that shape the
    recorded launches (a constexpr, one launch or three) are made from it, so that they hold for every size the
    graph serves instead of adding guards of their own."""
    if isinstance(n, int):
        return n
    upper = n.node.shape_env.bound_sympy(n.node.expr).upper
    return int(upper) if upper.is_finite else None


def kernel(k):
    """`k`, or while tracing, `k` wrapped so that `kernel(k)[grid](...)` records the launch."""
    return torch.library.wrap_triton(k) if tracing() else k


def asserts() -> dict:
    """Compile options that keep the kernels' device asserts live. Inductor compiles the kernels of a graph
    with its own options (debug on, so the asserts stay live there too) and takes no per-launch ones."""
    return {} if tracing() else LIVE_ASSERTS
