"""The CUTLASS path (csrc/): sm90a grouped GEMMs over rows sorted by expert, built on first use.

    x [S, K] sorted by expert, w [E, N, K] (or [E, K, N]), offs [E] int32 on the device
        -> torch.ops.moe_compiler_cutlass.grouped_mm(x, w, offs, b_nk, config) -> [S, N]
    (grouped_mm() below: that C++ op in an eager call; inside torch.compile, torch.ops.moe_compiler.cutlass_grouped_mm
    over it, recorded into the graph with the glue's launches — "the GEMM calls" below says why)

`CutlassMM` is a segment-matmul implementation (the interface of torch_segment_mm's classes): triton_grouped.py
(and the torch composite, torch_experts.py) run over it exactly as over torch._grouped_mm, with our choice of tile,
cluster and schedule (`CONFIGS`, the same order as csrc/configs.h) instead of torch's. Its weight gradients stay
with torch._grouped_mm; `CutlassWgrad` runs them on csrc/'s grouped_mm_wgrad (`WGRAD_CONFIGS`) where the training
backward's config names one (backward_mm).

Build: `torch.utils.cpp_extension.load` compiles csrc/ (ninja; nvcc from the CUDA toolkit; CUTLASS headers from
the `nvidia-cutlass` wheel: `pip install moe_compiler[cutlass]`) into torch's extensions directory on first use,
with one log line; a second process loads the cached library. Importing the package never builds or needs nvcc.

Switch `MOE_COMPILER_CUTLASS`: `auto` (default) runs CUTLASS only where the tuned table selects it
(triton_config.CutlassConfig, written by the tuner where it measured faster: on the H200, 64x256 ping-pong tiles at
DeepSeek-V3 T = 4096 and Kimi-K2 T = 16384, 128x256 tiles in 1x2 clusters at Qwen3-235B-A22B T = 4096), `0` never,
`1` wherever it can run (an error, with the reason, where it cannot be built). `missing()` says why the path is off.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import shutil

import torch
from torch import Tensor

from . import device, launch
from .torch_segment_mm import GroupedMM, Segments

log = logging.getLogger("moe_compiler")

ENV = "MOE_COMPILER_CUTLASS"
CONFIGS = ("coop_128x128", "coop_128x256_cluster2x1", "pingpong_64x128", "coop_128x128_cluster2x1",
           "coop_128x256_cluster1x2", "coop_256x128_cluster2x1", "pingpong_128x128_cluster2x1", "pingpong_64x256",
           "pingpong_64x256_cluster1x2")
# The block-scaled FP8 configs (csrc/configs.h's MOE_CUTLASS_FP8_CONFIGS, the same order): K tiles one scale block
# (128) deep; the FP8 experts' sorted path runs on them where QuantizedConfig.cutlass names one (cutlass_fp8.py).
FP8_CONFIGS = ("coop_128x128", "coop_128x128_cluster1x2", "coop_128x128_cluster2x1", "pingpong_64x128")
# The weight-gradient configs (csrc/configs.h's MOE_CUTLASS_WGRAD_CONFIGS, the same order): per expert
# out[e] = a_e^T @ b_e over its rows (grouped_mm_wgrad), bf16; the training backward's dW GEMMs run on one where
# BackwardConfig.wgrad_cutlass names it.
WGRAD_CONFIGS = ("pingpong_64x128", "pingpong_64x256", "pingpong_128x128_cluster2x1", "coop_128x128",
                 "coop_128x256_cluster2x1")
# The C++ sources: csrc/ of a source checkout (or an editable install), else the copy a wheel carries as
# moe_compiler/_csrc (pyproject.toml).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCES = (os.path.join(_PACKAGE, "..", "csrc"), os.path.join(_PACKAGE, "_csrc"))
CSRC = next((d for d in _SOURCES if os.path.isfile(os.path.join(d, "ops.cpp"))), _SOURCES[0])
DTYPES = (torch.bfloat16, torch.float16)


def mode() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 'auto' (the default), '0' (never) or '1' (wherever it can run)")
    return value


def cutlass_include() -> str | None:
    """CUTLASS's C++ headers from the nvidia-cutlass wheel (cutlass_library/source/include), or None."""
    try:
        import cutlass_library
    except ImportError:
        return None
    root = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    return root if os.path.isfile(os.path.join(root, "include", "cutlass", "cutlass.h")) else None


def nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.isfile(path) else shutil.which("nvcc")


@functools.cache
def missing() -> str | None:
    """Why the CUTLASS path cannot be built here (None: it can be). Asked once per process (per call it would
    be host time on every layer)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    if not any(torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count())):
        return "no sm90 GPU (the kernels are sm90a: H100 / H200)"
    if not os.path.isfile(os.path.join(CSRC, "ops.cpp")):
        return (f"the C++ sources are not at {os.path.normpath(CSRC)} (reinstall the package: its wheel carries "
                "them as moe_compiler/_csrc)")
    if cutlass_include() is None:
        return "no CUTLASS headers (pip install 'moe_compiler[cutlass]', i.e. nvidia-cutlass)"
    if nvcc() is None:
        return "no nvcc (install the CUDA toolkit or set CUDA_HOME)"
    return None


@functools.cache
def load():
    """torch.ops.moe_compiler_cutlass, built on first use (minutes) and cached by torch for later processes."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"moe_compiler: the CUTLASS path cannot be built: {reason} ({ENV}=0 turns it off)")
    from torch.utils import cpp_extension

    root = cutlass_include()
    sources = [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "grouped_gemm_*.cu")))
    try:  # torch's private helper: where load() builds; a torch without it gets the line every time
        built = os.path.join(cpp_extension._get_build_directory("moe_compiler_cutlass", verbose=False),
                             "moe_compiler_cutlass.so")
    except AttributeError:
        built = ""
    if not os.path.isfile(built):  # (a stale library is rebuilt too: ninja decides, without this line)
        log.warning("moe_compiler: building the CUTLASS kernels (csrc/, first use: minutes; then cached in torch's "
                    "extensions directory, TORCH_EXTENSIONS_DIR, for later processes)")
    cpp_extension.load(
        name="moe_compiler_cutlass",
        sources=sources,
        extra_include_paths=[os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")],
        extra_cuda_cflags=["-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-O3", "-DNDEBUG"],
        is_python_module=False,
    )
    return torch.ops.moe_compiler_cutlass


@functools.cache
def _say_off(reason: str) -> None:
    log.warning("moe_compiler: the CUTLASS kernels are off here (%s): the Triton kernels (in the training "
                "backward, torch's grouped GEMM) run instead where CUTLASS was picked (%s=0 silences this)",
                reason, ENV)


def buildable() -> bool:
    """missing() is None; otherwise the reason is logged once per process. Asked only where a selection wanted
    CUTLASS for operands it takes (a tuned entry, the FP8 rule): the user learns why that path does not run."""
    reason = missing()
    if reason is not None:
        _say_off(reason)
    return reason is None


def runs(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a tuned CUTLASS config runs on these operands (else the Triton default stands in): the switch
    not off, the operands taken, the extension buildable here."""
    return mode() != "0" and usable(x, *weights) and buildable()


def forced(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """MOE_COMPILER_CUTLASS=1 and these operands can run on it: the sorted path goes to CUTLASS."""
    return mode() == "1" and usable(x, *weights)


def loaded() -> bool:
    """Whether load() has run in this process (the extension built or taken from torch's cache)."""
    return load.cache_info().currsize > 0


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Static facts only: CUDA sm90, bf16/fp16, packed 16-byte rows (what csrc/ops.cpp checks)."""
    if not (x.is_cuda and x.dtype in DTYPES and all(w.dtype == x.dtype for w in weights)):
        return False
    if device.capability(device.index(x)) != (9, 0):  # cached: this runs on every call it may take
        return False
    return all(w.dim() == 3 and w.stride(2) == 1 and w.stride(1) == w.shape[2] and w.shape[2] % 8 == 0
               and w.shape[1] % 8 == 0 and w.stride(0) % 8 == 0 and device.aligned16(w) for w in weights)


def fp8_usable(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_gate_up_scale: torch.Tensor, w_down: torch.Tensor,
               w_down_scale: torch.Tensor, scale_block_n: int, scale_block_k: int) -> bool:
    """Static facts only (asked at trace time too, of fake tensors): what csrc/ops.cpp's grouped_mm_fp8 takes —
    sm90, bf16 activations, e4m3 weights as packed [E, N, K] rows 16-byte aligned, 128 x 128 scale blocks."""
    if not (hidden.is_cuda and hidden.dtype == torch.bfloat16 and scale_block_n == 128 and scale_block_k == 128):
        return False
    if device.capability(device.index(hidden)) != (9, 0):
        return False
    for w, s in ((w_gate_up, w_gate_up_scale), (w_down, w_down_scale)):
        E, N, K = w.shape
        if not (w.dtype == torch.float8_e4m3fn and w.stride(2) == 1 and w.stride(1) == K and K % 16 == 0
                and N % 8 == 0 and w.stride(0) % 16 == 0 and w.storage_offset() % 16 == 0):
            return False
        if tuple(s.shape) != (E, -(-N // 128), -(-K // 128)):
            return False
    return True


def fp8_runs(*operands, forced: bool = False) -> bool:
    """Whether the FP8 experts' GEMMs may run on CUTLASS here: the switch not off (with `forced`: set to 1), the
    operands taken (fp8_usable's arguments), the extension buildable."""
    return (mode() == "1" if forced else mode() != "0") and fp8_usable(*operands) and buildable()


# --- the GEMM calls, eager or recorded ---------------------------------------------------------------------------
# Inside torch.compile the experts ops' CUTLASS paths are recorded like their Triton launches (ops/inline.py): the
# glue becomes launches Inductor makes itself and each GEMM a call of one of these two ops in Inductor's code, so a
# call pays no experts-op layer, input checks or Python launches (~1 ms of host per FP8 call at T = 4096 on the H200
# machine, more than the GPU work at Qwen3-30B-A3B's shape). They are Python ops over the C++ ones because the C++
# library registers its ops only when load() runs: a graph Inductor loads from its cache in a new process must name
# ops that exist before that. Eager calls go straight to the C++ ops (one layer less).


@torch.library.custom_op("moe_compiler::cutlass_grouped_mm", mutates_args=(), device_types="cuda")
def _recorded_grouped_mm(x: Tensor, w: Tensor, offs: Tensor, b_nk: bool, config: int) -> Tensor:
    return load().grouped_mm(x, w, offs, b_nk, config)


@_recorded_grouped_mm.register_fake
def _(x, w, offs, b_nk, config):
    return x.new_empty(x.shape[0], w.shape[1] if b_nk else w.shape[2])


@torch.library.custom_op("moe_compiler::cutlass_grouped_mm_silu_mul", mutates_args=(), device_types="cuda")
def _recorded_grouped_mm_silu_mul(x: Tensor, w: Tensor, gate: Tensor, offs: Tensor, config: int) -> Tensor:
    return load().grouped_mm_silu_mul(x, w, gate, offs, config)


@_recorded_grouped_mm_silu_mul.register_fake
def _(x, w, gate, offs, config):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("moe_compiler::cutlass_grouped_mm_fp8", mutates_args=(), device_types="cuda")
def _recorded_grouped_mm_fp8(x: Tensor, xs: Tensor, w: Tensor, ws: Tensor, offs: Tensor, config: int) -> Tensor:
    return load().grouped_mm_fp8(x, xs, w, ws, offs, config)


@_recorded_grouped_mm_fp8.register_fake
def _(x, xs, w, ws, offs, config):
    return x.new_empty(x.shape[0], w.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("moe_compiler::cutlass_grouped_mm_wgrad", mutates_args=(), device_types="cuda")
def _recorded_grouped_mm_wgrad(a: Tensor, b: Tensor, offs: Tensor, config: int) -> Tensor:
    return load().grouped_mm_wgrad(a, b, offs, config)


@_recorded_grouped_mm_wgrad.register_fake
def _(a, b, offs, config):
    return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor, b_nk: bool, config: int) -> Tensor:
    """[S, N] = each segment of x's rows times its expert's w (csrc/ops.cpp); built on first use, at trace time
    for a recorded call."""
    ops = load()
    if launch.tracing():
        return torch.ops.moe_compiler.cutlass_grouped_mm(x, w, offs, b_nk, config)
    return ops.grouped_mm(x, w, offs, b_nk, config)


def grouped_mm_silu_mul(x: Tensor, w: Tensor, gate: Tensor, offs: Tensor, config: int) -> Tensor:
    """[S, N] = silu(gate) * (each segment of x's rows times its expert's w^T), w [E, N, K] (csrc/ops.cpp: the
    activation in the GEMM's epilogue, gate [S, N] its source); eager or recorded as grouped_mm."""
    ops = load()
    if launch.tracing():
        return torch.ops.moe_compiler.cutlass_grouped_mm_silu_mul(x, w, gate, offs, config)
    return ops.grouped_mm_silu_mul(x, w, gate, offs, config)


def grouped_mm_wgrad(a: Tensor, b: Tensor, offs: Tensor, config: int) -> Tensor:
    """[E, M, N] = per expert a_e^T @ b_e over its rows, a [S, M] and b [S, N] sorted by expert (csrc/ops.cpp:
    grouped_mm_wgrad, WGRAD_CONFIGS[config]); zeros for an expert without rows; eager or recorded as grouped_mm."""
    ops = load()
    if launch.tracing():
        return torch.ops.moe_compiler.cutlass_grouped_mm_wgrad(a, b, offs, config)
    return ops.grouped_mm_wgrad(a, b, offs, config)


def silu_epilogue_suits(spec, w_gate_up: Tensor, b_gate_up, z, dtypes) -> bool:
    """Whether a gate_up_silu computes these experts' activation rows: SwiGLU (plain silu) in one of `dtypes` (the
    class's act_epilogue_dtypes) with gate and up concatenated along the rows of [E, 2I, H] weights (I a multiple of
    8: 16-byte rows for each half's GEMM), no gate_up bias, and no pre-activation rows wanted (z: a training forward
    keeps them, which the fused epilogue never writes)."""
    from ..spec import Activation, GateUpLayout

    return (spec.activation is Activation.SILU and spec.gate_up is GateUpLayout.CONCAT and not spec.transposed
            and b_gate_up is None and z is None and w_gate_up.dtype in dtypes and w_gate_up.shape[1] % 16 == 0)


def grouped_mm_fp8(x: Tensor, xs: Tensor, w: Tensor, ws: Tensor, offs: Tensor, config: int) -> Tensor:
    """The block-scaled FP8 form (csrc/ops.cpp: grouped_mm_fp8), bf16 [S, N]; eager or recorded as grouped_mm."""
    ops = load()
    if launch.tracing():
        return torch.ops.moe_compiler.cutlass_grouped_mm_fp8(x, xs, w, ws, offs, config)
    return ops.grouped_mm_fp8(x, xs, w, ws, offs, config)


class CutlassMM:
    """Segment matmuls by csrc/'s grouped GEMM (forward), torch._grouped_mm for the weight gradients (CutlassWgrad
    and backward_mm put them on csrc/'s too)."""

    name = "cutlass"
    config = 0  # index into CONFIGS
    act_epilogue = False  # gate_up_silu where silu_epilogue_suits (triton_config.CutlassConfig.act_epilogue)
    act_epilogue_dtypes = (torch.bfloat16,)  # csrc/ builds the fused epilogue for bf16 only

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    @classmethod
    def mm(cls, x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        if x.dtype != w.dtype:  # the backward's fp32 rows: torch's grouped GEMM
            return GroupedMM.mm(x.to(w.dtype), w, seg)
        return grouped_mm(x.contiguous(), w, seg.offs, True, cls.config)

    @classmethod
    def mm_nn(cls, x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
        if x.dtype != w.dtype:
            return GroupedMM.mm_nn(x.to(w.dtype), w, seg)
        return grouped_mm(x.contiguous(), w, seg.offs, False, cls.config)

    @classmethod
    def gate_up_silu(cls, x: torch.Tensor, w_gate_up: torch.Tensor, seg: Segments) -> torch.Tensor:
        """a [S, I] = silu(x @ W_gate^T) * (x @ W_up^T) per segment, W_gate / W_up the two row halves of
        w_gate_up [E, 2I, H] (views: read in place): the gate GEMM, then the up GEMM with the activation in its
        epilogue, reading the gate rows as its source (silu_epilogue_suits says where this applies)."""
        I = w_gate_up.shape[1] // 2
        x = x.contiguous()
        gate = grouped_mm(x, w_gate_up[:, :I], seg.offs, True, cls.config)
        return grouped_mm_silu_mul(x, w_gate_up[:, I:], gate, seg.offs, cls.config)

    wgrad = staticmethod(GroupedMM.wgrad)


class CutlassWgrad:
    """The weight gradients (the `wgrad` of torch_segment_mm's interface) by csrc/'s grouped_mm_wgrad with tile,
    cluster and schedule WGRAD_CONFIGS[config]; operands it does not take (not bf16, rows not 16-byte aligned) go
    to torch's grouped GEMM."""

    name = "cutlass_wgrad"
    config = 0  # index into WGRAD_CONFIGS

    @classmethod
    def wgrad(cls, a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
        if not (a.dtype == b.dtype == torch.bfloat16 and GroupedMM.takes(a, (a.shape[1], b.shape[1]), (a, b))):
            return GroupedMM.wgrad(a, b, seg)
        return grouped_mm_wgrad(a.contiguous(), b.contiguous(), seg.offs, cls.config)


@functools.cache
def with_wgrad_config(config: int) -> type:
    """CutlassWgrad running WGRAD_CONFIGS[config] (the probe and the backward's tuner compare them with torch's)."""
    if not 0 <= config < len(WGRAD_CONFIGS):
        raise ValueError(f"CUTLASS weight-gradient config {config} not in [0, {len(WGRAD_CONFIGS) - 1}] "
                         f"({', '.join(WGRAD_CONFIGS)})")
    name = WGRAD_CONFIGS[config]
    return type(f"CutlassWgrad_{name}", (CutlassWgrad,), {"config": config, "name": f"cutlass_wgrad_{name}"})


def backward_mm(dgrad: int, wgrad: int) -> type:
    """The library backward's segment matmuls: mm / mm_nn (dA, dx_rows) on CONFIGS[dgrad], wgrad on
    WGRAD_CONFIGS[wgrad]; -1 for torch's grouped GEMM (both -1: GroupedMM itself)."""
    base = GroupedMM if dgrad < 0 else with_config(dgrad)
    return base if wgrad < 0 else _with_wgrad(base, with_wgrad_config(wgrad))


@functools.cache
def _with_wgrad(base: type, w: type) -> type:
    return type(f"{base.__name__}_{w.__name__}", (base,), {"wgrad": staticmethod(w.wgrad),
                                                           "name": f"{base.name}+{w.name}"})


@functools.cache
def with_config(config: int, act_epilogue: bool = False) -> type:
    """CutlassMM running tile / cluster / schedule CONFIGS[config] (the probe and the tuner compare them), with the
    SwiGLU activation in the up GEMM's epilogue where it applies (act_epilogue)."""
    if not 0 <= config < len(CONFIGS):
        raise ValueError(f"CUTLASS config {config} not in [0, {len(CONFIGS) - 1}] ({', '.join(CONFIGS)})")
    name = CONFIGS[config] + ("_act" if act_epilogue else "")
    return type(f"CutlassMM_{name}", (CutlassMM,),
                {"config": config, "act_epilogue": act_epilogue, "name": f"cutlass_{name}"})
