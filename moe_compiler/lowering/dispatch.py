"""Which implementation runs each op, per call, from static facts only (device, dtype, shapes, alignment).

    experts forward   CUDA + Triton -> triton_decode.py (T*k small next to E: GEMVs, no sort) or
                                       triton_align.py + triton_experts.py (sorted grouped GEMMs), or, where
                                       the tuned table says so, triton_grouped.py: torch._grouped_mm's GEMMs
                                       (or csrc/'s CUTLASS, cutlass.py; MOE_COMPILER_CUTLASS=1 forces it) with
                                       Triton glue; the
                                       config from triton_config.py; a small shared MLP rides in the decode
                                       kernels
                      otherwise     -> torch_experts.py over a segment-matmul implementation (`select`),
                                       the shared MLP by torch_shared.py (cuBLAS)
    experts_quantized CUDA + Triton -> triton_quantized.py (block-scaled FP8 grouped GEMMs); otherwise
                                       torch_quantized.py (dequantize per call, then torch_experts.py)
    experts backward  CUDA + Triton -> triton_backward.py (reading experts_train's saved Z, or recomputing
                                       it), unless MOE_COMPILER_BACKWARD=torch; the shared MLP's by torch_shared.py
                      otherwise     -> torch_experts.py / torch_shared.py
    (inside torch.compile the Triton launches of a call are recorded into the graph where `experts_inlinable`
    holds: launch.py, ops/inline.py)
    route forward     CUDA + Triton -> triton_route.py (one launch); otherwise torch_route.py
    route backward    CUDA + Triton -> triton_route.py's one launch (every order but the sparse mixer's), unless
                                       MOE_COMPILER_BACKWARD=torch; otherwise torch_route.py

The Triton modules are imported on first CUDA use only: importing the package never imports Triton.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..ops import checks
from ..spec import ExpertsSpec, RouteOrder, RouterSpec, SharedMLP
from . import cutlass, device, launch, torch_experts, torch_quantized, torch_route, torch_shared, triton_config
from .torch_segment_mm import GatherBmm, GroupedMM, LoopMM


def _grouped_mm_takes(hidden, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    # The GEMMs' rows: H, I and 2I elements, in whichever layout.
    widths = (*w_gate_up.shape[1:], *w_down.shape[1:])
    return GroupedMM.takes(w_gate_up, widths, (w_gate_up, w_down, hidden))


def select(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """The segment-matmul implementation for these operands (a class with mm / mm_nn / wgrad)."""
    if hidden.device.type == "cpu":
        # torch's grouped GEMM loops over groups in C++ (faster than our Python loop for many experts);
        # the Python loop remains for rows that are not 16-byte aligned.
        return GroupedMM if _grouped_mm_takes(hidden, w_gate_up, w_down) else LoopMM
    if hidden.device.type != "cuda":
        return LoopMM
    if cutlass.forced(hidden, w_gate_up, w_down):
        return cutlass.CutlassMM
    if hidden.dtype == torch.bfloat16 and _grouped_mm_takes(hidden, w_gate_up, w_down):
        return GroupedMM
    return GatherBmm


# --- experts ---------------------------------------------------------------------------------------------

def triton_config_for(hidden, topk_ids, w_gate_up, I: int, transposed: bool = False):
    """The tuned (autotuned on first use, or default, with a warning) Triton config of this problem on
    hidden's GPU (`transposed`: the weights' layout, for the untuned default). A symbolic T takes its band's
    config under a band guard (triton_config.config_tokens)."""
    (T, H), E, k = hidden.shape, w_gate_up.shape[0], topk_ids.shape[1]
    hint, highest = triton_config.config_tokens(T)
    banded = not isinstance(T, int)
    key = (device.index(hidden), hidden.dtype, E, k, H, I, hint, transposed, triton_config.autotune_enabled())
    config = _CONFIGS.get((key, highest, banded))  # per call it is host time on the critical path of small T
    if config is None:
        config = decode_within(_config_for(*key, banded), hidden.dtype, E, k, hint, highest)
        if not (key[-1] and device.capturing()):  # autotuning declines inside a capture: ask again outside
            _CONFIGS[key, highest, banded] = config
    return config


def decode_within(config, dtype: torch.dtype, E: int, k: int, T: int, highest: int | None):
    """`config`, or the sorted default in place of a decode config where the traced call may see more tokens
    (`highest`; None: unbounded) than the decode kernels take: a symbolic T whose band reaches past them."""
    if config.path is triton_config.Path.DECODE and (highest is None or highest * k > _decode_max_pairs()):
        return triton_config.default_sorted_config(dtype, E, k, T)
    return config


def _band_config(gpu: str, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int):
    """The band entry of T's band (T: its grid point) where this GPU's table has one that can run here, else None.
    A CUTLASS entry needs the extension: without it the band keeps its point's entry, a tuned Triton config, rather
    than the untuned default that stands in for a library entry the library cannot take."""
    config = triton_config.band_entry(gpu, dtype, E, k, H, I, T)
    if config is not None and config.path is triton_config.Path.CUTLASS:
        if cutlass.mode() == "0" or not cutlass.buildable():  # (buildable logs why not, once)
            return None
    return config


def _decode_max_pairs() -> int:
    from .triton_decode import MAX_PAIRS

    return MAX_PAIRS


_CONFIGS: dict = {}


def _config_for(index: int, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int, transposed: bool,
                autotune: bool, banded: bool = False):
    """`banded`: T is a symbolic count's band point, and the band's own entry comes first (_band_config)."""
    from . import triton_decode

    gpu, capability = device.gpu_name(index), device.capability(index)
    if banded:
        config = _band_config(gpu, dtype, E, k, H, I, T)
        if config is not None:
            return config

    def tuned(grid_T: int):
        # The search lives with the tuner (tune/ imports lowering at module level, never the reverse).
        from ..tune import first_use

        return first_use.config_for(gpu, capability, dtype, E, k, H, I, grid_T)

    config = triton_config.lookup(gpu, capability, dtype, E, k, H, I, T, autotune=tuned if autotune else None,
                                  transposed=transposed)
    if config.path is triton_config.Path.DECODE and T * k > triton_decode.MAX_PAIRS:
        config = triton_config.default_config(dtype, E, k, H, I, max(T, triton_decode.MAX_PAIRS), transposed)
    return config


# The decode kernels take the shared MLP in only when its weights are small: fusing saves its own launches
# and ramps under a CUDA graph but adds its tiles to grids whose programs each stream ~1-2 MB at decode, so a
# large shared MLP lengthens the last wave by more than it saves (benchmarks/NOTES.md "shared experts v2":
# Qwen3-Next's 6 MB faster fused, DeepSeek-V3's 88 MB and larger ones slower).
SHARED_IN_KERNEL_MAX_BYTES = 16 << 20


def _shared_in_kernel(mlp: SharedMLP) -> bool:
    return 3 * mlp.down.numel() * mlp.down.element_size() <= SHARED_IN_KERNEL_MAX_BYTES


def experts_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec,
                    shared: SharedMLP | None = None, config=None) -> torch.Tensor:
    """The experts op's forward (+ the block's shared MLP) on whichever implementation fits. On the Triton
    decode path a small shared MLP is one more pair per token inside the experts kernels (its weights stream
    beside the routed ones, no launches of its own); otherwise it runs as cuBLAS GEMMs after the experts."""
    T, k = topk_ids.shape
    if T == 0 or k == 0:
        routed = hidden.new_zeros(hidden.shape)
    elif not device.uses_triton(hidden):
        impl = select(hidden, w_gate_up, w_down)
        args = (hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
        routed = torch_experts.experts_forward(impl, *args)
    else:
        if config is None:
            config = triton_config_for(hidden, topk_ids, w_gate_up, spec.intermediate(w_down), spec.transposed)
        in_kernel = shared is not None and _shared_in_kernel(shared) and config.path is triton_config.Path.DECODE
        routed = triton_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config,
                                shared if in_kernel else None)
        if in_kernel:
            return routed
    if shared is None:
        return routed
    return torch_shared.forward(routed, hidden, shared, spec, _gated_rows(hidden))


def experts_quantized_forward(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                              spec, shared: SharedMLP | None = None, config=None) -> torch.Tensor:
    """The experts_quantized op's forward (+ the shared MLP, by cuBLAS / torch after the experts): the Triton
    FP8 kernels on CUDA, the dequantize-then-torch reference elsewhere."""
    T, k = topk_ids.shape
    args = (hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale, spec)
    if T == 0 or k == 0:
        routed = hidden.new_zeros(hidden.shape)
    elif device.uses_triton(hidden):
        from . import triton_quantized

        routed = triton_quantized.experts_forward(*args, config)
    else:
        checks.check_ids_in_range(topk_ids, w_gate_up.shape[0])
        routed = torch_quantized.experts_forward(select, *args)
    if shared is None:
        return routed
    return torch_shared.forward(routed, hidden, shared, spec, _gated_rows(hidden))


# A call traced by torch.compile records its launches (launch.py) where the op's Python per call would cost
# more than it saves. Host TMA descriptors cannot be recorded outside Dynamo (torch 2.11: "TMA descriptor
# capturing not yet supported in non-dynamo tracing"), so a recorded sorted-path call whose config uses TMA either
# loads its weight tiles by pointer or builds its descriptors on the device (launch.recorded_tma, on by default).
# Measured on an H200 (benchmarks/NOTES.md, sessions 25 and 27): up to this many GEMM FLOPs (6*T*k*H*I) TMA is
# worth <= 43 us a call and device-built descriptors cost 1-6% more GPU time than pointer loads (Qwen3-30B-A3B at
# 1024-2048 tokens), so such a call loads by pointer; above it TMA is worth up to 12% (Mixtral from T = 1024) and
# device descriptors keep it (Mixtral: 0.95x the pointer loads' time, 1.01-1.03x host descriptors'). With recorded
# TMA off, a call above it stays one opaque op to keep host TMA, and pays the op's host path (~0.5 ms a call).
INLINE_TMA_MAX_FLOP = 4e11


def gemm_flop(T, k: int, H: int, I: int) -> int:
    """The experts GEMMs' FLOPs at T tokens (a symbolic T: its band's grid point, the point whose config runs)."""
    return 6 * triton_config.config_tokens(T)[0] * k * H * I


def traced_tma(T, k: int, H: int, I: int) -> bool:
    """Whether a traced sorted-path call whose config loads by TMA keeps TMA (descriptors built on the device)."""
    return launch.recorded_tma() and gemm_flop(T, k, H, I) > INLINE_TMA_MAX_FLOP


def experts_inlinable(hidden, topk_ids, w_gate_up, w_down, spec: ExpertsSpec) -> bool:
    """Whether a traced experts call of these shapes (static, or a symbolic token count: inline.hinted) runs
    Triton kernels that can be recorded."""
    if not device.uses_triton(hidden):
        return False
    T, k = topk_ids.shape
    if T == 0 or k == 0:
        return True
    I = spec.intermediate(w_down)
    config = triton_config_for(hidden, topk_ids, w_gate_up, I, spec.transposed)
    impl = _library_mm(hidden, w_gate_up, w_down, config)
    if impl is not None:  # csrc/'s GEMMs are recorded as calls of their op (cutlass.py) beside the glue's launches;
        return issubclass(impl, cutlass.CutlassMM)  # torch._grouped_mm's path stays one opaque call
    if config.path in (triton_config.Path.GROUPED_MM, triton_config.Path.CUTLASS):
        return False  # a library entry the library cannot take: the sorted default stands in, kept opaque
    return (config.path is triton_config.Path.DECODE or not config.tma
            or gemm_flop(T, k, hidden.shape[1], I) <= INLINE_TMA_MAX_FLOP or launch.recorded_tma())


def _library_mm(hidden, w_gate_up, w_down, config):
    """The library segment-matmul class triton_grouped.py runs instead of the Triton GEMMs for this config, or None:
    a tuned CUTLASS entry where CUTLASS runs, MOE_COMPILER_CUTLASS=1 off the decode path, a tuned grouped_mm
    entry where torch._grouped_mm takes the operands."""
    if config.path is triton_config.Path.CUTLASS:
        return (cutlass.with_config(config.config, config.act_epilogue) if cutlass.runs(hidden, w_gate_up, w_down)
                else None)
    forced = config.path is not triton_config.Path.DECODE and cutlass.forced(hidden, w_gate_up, w_down)
    if config.path is triton_config.Path.GROUPED_MM or forced:
        impl = select(hidden, w_gate_up, w_down)
        return impl if impl in (GroupedMM, cutlass.CutlassMM) else None
    return None


def triton_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config=None, mlp=None,
                   z=None):
    """The Triton forward with a given config (None: looked up); returns out [T, H]. T > 0. A shared MLP
    `mlp` is taken by the decode kernels only (experts_forward sends it here on that path). With `z` [T*k, 2I]
    (a training forward) each pair's pre-activation row is stored there for the backward, by the sorted gate_up
    kernel's epilogue or triton_grouped's act pass: a decode entry runs the sorted default instead."""
    from . import triton_decode, triton_experts

    if config is None:
        config = triton_config_for(hidden, topk_ids, w_gate_up, spec.intermediate(w_down), spec.transposed)
    impl = None if mlp is not None else _library_mm(hidden, w_gate_up, w_down, config)
    if impl is not None:  # the library's GEMMs, Triton glue around them (ids checked by align's assert)
        from . import triton_grouped

        args = (hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
        return triton_grouped.experts_forward(impl, *args, z=z)
    # The sorted default for a library entry whose operands do not suit the library, and for a decode entry when
    # z is wanted (the decode kernels keep no pre-activation rows).
    runs_as_is = config.path is triton_config.Path.SORTED or (config.path is triton_config.Path.DECODE and z is None)
    if not runs_as_is:
        config = triton_config.default_sorted_config(hidden.dtype, w_gate_up.shape[0], topk_ids.shape[1],
                                                     hidden.shape[0])
    if launch.tracing() and config.path is triton_config.Path.SORTED and config.tma:
        T, k = topk_ids.shape
        if not traced_tma(T, k, hidden.shape[1], spec.intermediate(w_down)):
            config = dataclasses.replace(config, tma=False)  # see INLINE_TMA_MAX_FLOP
    # Out-of-range ids: the kernels clamp them (no stray memory access) and the kernel that checks them fails
    # the launch with a device-side assert (triton_config.LIVE_ASSERTS): loud, no host sync, capture-safe.
    args = (hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, config)
    if config.path is triton_config.Path.DECODE:
        out, _ = triton_decode.experts_forward(*args, mlp)
    else:
        if mlp is not None:
            raise ValueError(
                "moe_compiler: the sorted Triton path does not take a shared MLP; pass it to experts_forward"
            )
        out, _ = triton_experts.experts_forward(*args, z=z)
    return out


# Which backward the experts op runs on CUDA + Triton: the Triton one (triton_backward.py) by default — faster
# than the torch composite at every measured shape with a fraction of its memory (benchmarks/NOTES.md, issue 17);
# MOE_COMPILER_BACKWARD=torch selects the composite (a comparison, or a way around a kernel problem).
BACKWARD_ENV = "MOE_COMPILER_BACKWARD"


def triton_backward_requested() -> bool:
    value = os.environ.get(BACKWARD_ENV, "triton")
    if value not in ("torch", "triton"):
        raise ValueError(f"{BACKWARD_ENV}={value!r}: expected 'triton' (the default) or 'torch'")
    return value == "triton"


def _triton_backward_runs(hidden, spec: ExpertsSpec) -> bool:
    return not spec.scale_input and device.uses_triton(hidden) and triton_backward_requested()


def backward_inlinable(hidden, topk_ids, spec: ExpertsSpec) -> bool:
    """Whether a traced call of the split backward's ops (static sizes, or a symbolic T: ops/experts.py _sized)
    runs the Triton backward, whose kernels and torch ops (the library's grouped GEMMs among them) can be
    recorded."""
    T, k = topk_ids.shape
    return bool(T and k) and _triton_backward_runs(hidden, spec)


def backward_splits(hidden, w_gate_up, w_down, spec: ExpertsSpec) -> bool:
    """Whether the backward of a call whose z was saved runs as the three split ops (ops/experts.py): dz, passed
    between them, has rows padded per expert (dz_shape), which the fake and every real call must size alike. With
    a static T they do. With a symbolic T the fake takes the band's config, and only the library backward's rows
    (unpadded: triton_backward.BackwardConfig) are aligned alike for every length: where the ops stay opaque
    (MOE_COMPILER_INLINE=0, torch.export), a real call sizes dz from its own length. Elsewhere the one
    experts_backward op runs."""
    if isinstance(hidden.shape[0], int):
        return True
    from . import triton_backward

    return triton_backward.library_rows(hidden, spec.intermediate(w_down), (w_gate_up, w_down))


def saved_z_shape(hidden, topk_ids, w_down, spec: ExpertsSpec) -> tuple[int, int]:
    """The shape of experts_train's z: [T*k, 2I] where the Triton backward will read it, else [0, 2I] (the torch
    backward recomputes what it needs). From device, env and sizes only: the fake and the real op agree."""
    T, k = topk_ids.shape
    return T * k if _triton_backward_runs(hidden, spec) else 0, 2 * spec.intermediate(w_down)


def experts_forward_saving_z(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                             spec: ExpertsSpec, shared: SharedMLP | None = None):
    """(out, z [T*k, 2I]): experts_forward (the shared MLP by cuBLAS after the experts) with each pair's
    pre-activation row also stored for the backward (triton_forward's z). T*k > 0."""
    z = launch.empty(hidden, topk_ids.numel(), 2 * spec.intermediate(w_down))
    routed = triton_forward(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec, z=z)
    if shared is not None:
        routed = torch_shared.forward(routed, hidden, shared, spec, _gated_rows(hidden))
    return routed, z


def experts_backward(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec,
                     weight_grads: bool = True, z=None):
    """(d_hidden, d_topk_weights, d_w_gate_up, d_w_down, d_b_gate_up, d_b_down); absent biases -> None, and
    every weight's and bias's gradient None without weight_grads (frozen experts). `z`: experts_train's saved
    pre-activation rows, or None."""
    T, k = topk_ids.shape
    if T and k and _triton_backward_runs(hidden, spec):
        from . import triton_backward

        return triton_backward.experts_backward(
            grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec,
            weight_grads=weight_grads, z=z,
        )
    impl = select(hidden, w_gate_up, w_down)
    args = (grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec)
    return torch_experts.experts_backward(impl, *args, weight_grads=weight_grads)


def experts_backward_down(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                          spec: ExpertsSpec, weight_grads: bool, z):
    """The Triton backward's first half (triton_backward.backward_down) from experts_train's saved z: (dz in padded
    sorted order, d_topk_weights, d_w_down or None, d_b_down or None). Only where z was saved (saved_z_shape)."""
    from . import triton_backward

    return triton_backward.backward_down(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up,
                                         b_down, spec, weight_grads=weight_grads, z=z)


def experts_backward_gate_up(dz, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, spec: ExpertsSpec,
                             weight_grads: bool):
    """Its second part from experts_backward_down's dz: (dx_rows [S_pad, H], d_w_gate_up or None, d_b_gate_up or
    None); dz is not read after it returns."""
    from . import triton_backward

    return triton_backward.backward_gate_up_rows(dz, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up,
                                                 spec, weight_grads=weight_grads)


def experts_backward_combine(dx_rows, hidden, topk_ids, topk_weights, w_gate_up, w_down, spec: ExpertsSpec):
    """Its last part: d hidden [T, H] from experts_backward_gate_up's dx_rows."""
    from . import triton_backward

    return triton_backward.backward_combine(dx_rows, hidden, topk_ids, topk_weights, w_gate_up, w_down, spec)


def dz_shape(hidden, topk_ids, w_gate_up, w_down, spec: ExpertsSpec) -> tuple[int, int]:
    """The shape of experts_backward_down's dz, [S_pad, 2I], from sizes only (the fake's)."""
    from . import triton_backward

    return triton_backward.dz_shape(hidden, topk_ids, w_gate_up, w_down, spec)


def _gated_rows(t: torch.Tensor):
    """act(g) * u for the shared MLP: one Triton pass on CUDA, torch ops elsewhere."""
    if device.uses_triton(t):
        from .triton_act import gated_rows

        return gated_rows
    return torch_shared.torch_gated_rows


def shared_backward(grad_out, hidden, shared: SharedMLP, spec: ExpertsSpec, weight_grads: bool = True):
    """Gradients of the shared term w.r.t. (hidden, gate, up, down, expert_gate or None); the weights' are None
    without weight_grads."""
    return torch_shared.backward(grad_out, hidden, shared, spec, _gated_rows(hidden), weight_grads=weight_grads)


# --- route -----------------------------------------------------------------------------------------------

def route_inlinable(router_logits) -> bool:
    """Whether a traced route call runs the (one-launch) Triton kernel, which can be recorded."""
    return device.uses_triton(router_logits)


def route_forward(router_logits, correction_bias, spec: RouterSpec):
    if device.uses_triton(router_logits):
        from . import triton_route

        return triton_route.route_forward(router_logits, correction_bias, spec)
    return torch_route.route_forward(router_logits, correction_bias, spec)


def route_backward_inlinable(router_logits, spec: RouterSpec) -> bool:
    """Whether a traced route backward runs the (one-launch) Triton kernel, which can be recorded."""
    return (spec.order is not RouteOrder.SPARSEMIXER and device.uses_triton(router_logits)
            and triton_backward_requested())


def route_backward(grad_weights, router_logits, ids, spec: RouterSpec):
    if route_backward_inlinable(router_logits, spec):
        from . import triton_route

        return triton_route.route_backward(grad_weights, router_logits, ids, spec)
    return torch_route.route_backward(grad_weights, router_logits, ids, spec)
