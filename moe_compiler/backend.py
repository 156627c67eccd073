"""The `fused_moe` torch.compile backend.

    torch.compile(model, backend="fused_moe")                        # registered by the entry point
    torch.compile(model, backend="fused_moe", mode="reduce-overhead")  # Inductor modes are honoured
    torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": "dump", "max_autotune": True})

Dynamo graph -> passes (rewrite MoE regions into moe_compiler ops, report) -> Inductor (compile_fx) for
everything, our ops staying opaque. The rewrite happens before AOTAutograd so training uses the op's own
backward. CUDA graphs, if asked for, are Inductor's (cudagraph trees), never our own wrapper.
"""

from __future__ import annotations

import functools
import hashlib
import math
import pathlib

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .config import PREFIX, MoECompilerConfig
from .debug import emit, log
from .lowering import cutlass, device, dispatch, launch, triton_config
from .ops import inline
from .passes import fuse_moe_regions, restack_planned
from .passes.fx_utils import example_value
from .passes.router_linear import rewrite_router_linears


@functools.cache
def source_hash() -> str:
    """sha256 of this package's sources and config tables: part of Inductor's cache key, so a cached artifact
    compiled against an older version of our op (a different backward, other recorded kernels or configs) is
    never reused."""
    h = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def trace_settings() -> tuple:
    """The settings that change what AOTAutograd's trace of our ops records (ops/inline.py: launches recorded
    or the op kept opaque; configs autotuned or looked up) but not the Dynamo graph: without them in the cache
    key, a warm cache hands back an artifact traced under the other setting (seen: MOE_COMPILER_INLINE=0
    compiled first, then every later compile of the same model ran the opaque op; MOE_COMPILER_ROUTE_IN_GEMV=1
    after =0 kept the route launch). Every environment switch that picks kernels at trace time is here, and
    whether the CUTLASS extension can be built (headers, nvcc): a cache filled before `pip install
    moe_compiler[cutlass]` would otherwise keep the Triton defaults that stand in for every CUTLASS entry (the
    likely cause of a DeepSeek-V3 forward + backward at 230 TF/s instead of 288 on an H100: NOTES session 50)."""
    return (("inline", inline.enabled()), ("autotune", triton_config.autotune_enabled()),
            ("route_in_gemv", launch.route_in_gemv()), ("cutlass", cutlass.mode(), cutlass.missing() is None),
            ("kernels", device.kernels()), ("triton_backward", dispatch.triton_backward_requested()),
            ("recorded_tma", launch.recorded_tma()))


class _SourceHashPass(CustomGraphPass):
    """A post-grad pass that changes nothing; its uuid salts Inductor's FX graph and AOTAutograd caches."""

    def __init__(self, inner=None):
        self.inner = inner  # a user's own post-grad pass, kept working

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        inner = self.inner.uuid() if self.inner is not None and hasattr(self.inner, "uuid") else None
        return ("moe_compiler", source_hash(), trace_settings(), inner)


# torch's switch for launching user-defined Triton kernels (ours, recorded) by Inductor's static launcher
STATIC_LAUNCH = "static_launch_user_defined_triton_kernels"


def _inductor_patches(mode: str | None, options: dict, static_launch: bool = False) -> dict:
    patches = dict(list_mode_options(mode)) if mode else {}
    if static_launch and hasattr(inductor_config, STATIC_LAUNCH):
        patches[STATIC_LAUNCH] = True  # (a user's own Inductor option below still wins)
    patches.update(options)
    # torch 2.11 accepts exactly one pass in this slot (2.13 also lists): wrap any user pass.
    user_pass = patches.get("post_grad_custom_post_pass")
    if isinstance(user_pass, (list, tuple)):
        patches["post_grad_custom_post_pass"] = [*user_pass, _SourceHashPass()]
    else:
        patches["post_grad_custom_post_pass"] = _SourceHashPass(user_pass)
    return patches


# Tokens per MoE op up to which a graph is taken as host-bound (decode, small batches): its host code is built in C++.
# Past it the GPU time dominates a step and the C++ build would only cost compile time.
CPP_WRAPPER_MAX_TOKENS = 256

# Inductor options of our C++ host code build. torch 2.11 builds the host code -O3 (2.12 on: -O1 for GPU graphs, "the
# C++ wrapper is just glue"), unless the kernels are built apart: then a CUDA graph's file is all glue, built -O1.
# -O3's time grows much faster than the file: a tiny Qwen3-MoE's host code (CPU proxy, torch 2.13, g++) built in
# 6.0 / 36 / 630 s at 4 / 16 / 48 layers with -O3, 1.6 / 6.2 / 28 s with -O1 (benchmarks/NOTES.md, session 13).
CPP_WRAPPER_BUILD = {"cpp_wrapper_build_separate": True}  # (an Inductor option the user gives wins)


def first_input(node: torch.fx.Node):
    """The op call's first schema argument: our passes call the ops by keyword (`op(**call.kwargs())`), so
    `node.args` is empty there."""
    if node.args:
        return node.args[0]
    return node.kwargs.get(node.target._schema.arguments[0].name)


def cpp_wrapper_skip_reason(gm: torch.fx.GraphModule, example_inputs, patches: dict) -> str | None:
    """Why the rewritten graph keeps Python host code, or None: it gets Inductor's C++ host code (config.py,
    `cpp_wrapper`: CUDA, no gradients, no CUDA graphs, no collectives, every MoE op at most CPP_WRAPPER_MAX_TOKENS
    tokens)."""
    if "cpp_wrapper" in patches:
        return "the Inductor option cpp_wrapper is given"
    if patches.get("triton.cudagraphs"):
        return "CUDA graphs replay the host code's launches"
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if not any(t.is_cuda for t in tensors):
        return "no CUDA inputs"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "a graph with gradients (training)"
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    if any(getattr(n.target, "namespace", None) in ("_c10d_functional", "c10d") for n in calls):
        return "collectives (expert / tensor parallel): C++ host code not tried there"
    moe_calls = [n for n in calls if getattr(n.target, "namespace", None) == "moe_compiler"]
    # rows of each op's first tensor: hidden [T, H], router logits [T, E], an FP8 linear's input [..., K]
    firsts = [example_value(first_input(n)) for n in moe_calls]
    shapes = [tuple(v.shape) for v in firsts if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not shapes:
        return "no MoE op in the graph"
    if not all(isinstance(d, int) for shape in shapes for d in shape):  # (read, never compared: no new guard)
        return "a MoE op over a symbolic token count"
    if max(math.prod(shape[:-1]) for shape in shapes) > CPP_WRAPPER_MAX_TOKENS:
        return f"a MoE op over more than {CPP_WRAPPER_MAX_TOKENS} tokens"
    return _example_run_memory_shortfall(moe_calls)


def gpu_free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can take: the driver's free memory plus the caching allocator's reserved,
    unused blocks; None without a CUDA device to ask (a CPU machine)."""
    try:
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except (RuntimeError, AssertionError):  # torch without CUDA raises AssertionError
        return None


def _example_run_memory_shortfall(moe_calls) -> str | None:
    """Why a C++ build would surely run out of memory, or None. Its compile-time example run (Inductor's
    generate_example_arg_value) allocates every kernel argument anew, so the largest tensor a MoE op reads (an
    expert weight: DeepSeek-V3's gate_up is 14 GiB; measured first-call peaks ran 2-23 GiB above Python host code's)
    must fit beside the model. Skipping then saves the build's minute and its out-of-memory fallback; a build that
    fits this bound and still runs out falls back as any failed build does (_compile)."""
    tensors = [v for n in moe_calls for v in map(example_value, n.all_input_nodes)
               if isinstance(v, torch.Tensor) and v.is_cuda]
    if not tensors:
        return None
    largest = max(tensors, key=lambda t: t.numel() * t.element_size())
    need = largest.numel() * largest.element_size()
    free = gpu_free_bytes(largest.device)
    if free is None or need <= free:
        return None
    return (f"the C++ build's example run allocates each kernel's tensors anew — {need / 2**30:.1f} GiB for the "
            f"largest MoE op input {tuple(largest.shape)} — and {largest.device} has {free / 2**30:.1f} GiB free")


def host_code_choice(gm: torch.fx.GraphModule, example_inputs, patches: dict, config) -> str | None:
    """None: build this graph's host code in C++; else why it keeps Python host code (the report says which)."""
    if not config.inductor:
        return "no Inductor (moe_compiler.inductor=False)"
    if not config.cpp_wrapper:
        return "off (moe_compiler.cpp_wrapper)"
    return cpp_wrapper_skip_reason(gm, example_inputs, patches)


def _compile(gm: torch.fx.GraphModule, example_inputs, patches: dict, python_host_reason: str | None):
    """compile_fx, with C++ host code unless `python_host_reason` (host_code_choice); a C++ build that fails
    (torch 2.11 has no C shim for an unfused `aten::_grouped_mm`, say) falls back to Python host code."""
    if python_host_reason is None:
        log.info("moe_compiler: building this decode graph's host code in C++ (Inductor's cpp_wrapper: a g++ build, "
                 "~10-50 s; moe_compiler.cpp_wrapper=False keeps Python host code)")
        try:
            cpp_patches = {**CPP_WRAPPER_BUILD, **patches, "cpp_wrapper": True}
            # (Inductor's C++ launches of kernels with global scratch are untried: no device-built TMA descriptors.
            # Its graphs are decode-sized, CPP_WRAPPER_MAX_TOKENS, far below where they pay: dispatch.traced_tma.)
            with launch.recorded_tma_option(False):
                compiled = compile_fx(gm, example_inputs, config_patches=cpp_patches)
            counters["moe_compiler"]["cpp_wrapper"] += 1
            return compiled
        except RuntimeError as e:  # Inductor's errors (InductorError), the build's included
            counters["moe_compiler"]["cpp_wrapper_failed"] += 1
            log.warning("moe_compiler: Inductor's C++ host code (cpp_wrapper) failed to build: %s; compiling this "
                        "graph with Python host code (set moe_compiler.cpp_wrapper=False to skip the attempt)",
                        str(e).strip().splitlines()[0][:300])
    return compile_fx(gm, example_inputs, config_patches=patches)


def fused_moe(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """torch.compile backend: fuse MoE blocks into moe_compiler ops, compile the rest with Inductor."""
    options = dict(options or {})
    ours = {k: options.pop(k) for k in list(options) if k.startswith(PREFIX)}
    config = MoECompilerConfig.from_options(ours)
    patches = _inductor_patches(mode, options, config.static_launch)

    # Configs are looked up (and untuned shapes autotuned) by the numerical check and while Inductor traces.
    with triton_config.autotune_option(config.autotune), launch.recorded_tma_option(config.recorded_tma):
        report = fuse_moe_regions(gm, example_inputs, config)
        python_host = host_code_choice(gm, example_inputs, patches, config)
        report.host_code = "C++ (cpp_wrapper)" if python_host is None else f"Python: {python_host}"
        if python_host is None and config.router_gemv:
            report.router_gemv = rewrite_router_linears(gm)
            counters["moe_compiler"]["router_gemv"] += report.router_gemv
        emit(report, config.dump_dir)
        compiled = _compile_recorded(gm, example_inputs, patches, python_host) if config.inductor else gm.forward
    restack_planned(report)
    return compiled


def _compile_recorded(gm: torch.fx.GraphModule, example_inputs, patches: dict, python_host_reason: str | None):
    """_compile; where that fails with our ops' launches recorded into the graph (ops/inline.py), once more with each
    call kept one opaque op, logged: a recording problem costs host time, never the compile."""
    try:
        return _compile(gm, example_inputs, patches, python_host_reason)
    except Exception as e:
        if not inline.enabled():
            raise
        counters["moe_compiler"]["recorded_compile_failed"] += 1
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        log.warning("moe_compiler: compiling this graph with the MoE launches recorded failed (%s: %s); compiling "
                    "it again with each MoE call one opaque op (slower host path; %s=0 skips the attempt)",
                    type(e).__name__, first_line, inline.INLINE_ENV)
        with inline.kept_opaque():
            return _compile(gm, example_inputs, patches, python_host_reason)
