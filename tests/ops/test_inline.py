"""ops/inline.py: inside torch.compile, a call whose Triton kernels can be recorded becomes those launches
(`triton_kernel_wrapper_functional` nodes Inductor compiles and launches); every other call stays the op.

On CPU the recording is checked by tracing with real (not interpreted: wrap_triton passes an interpreted
kernel through untouched) Triton kernels and CUDA's device facts stubbed, in a fresh process; Triton's active
driver is stubbed to name an sm90 target, so that torch's mutation analysis of each kernel (its TTIR) runs as on a
GPU — without it the analysis fails and assumes every argument written, which would copy the weights per call.
The GPU tests run the recorded launches through Inductor against eager.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

TRACE = """
import os, sys, torch
from torch._dynamo.backends.common import aot_autograd
import moe_compiler
from moe_compiler.lowering import device, dispatch
from moe_compiler.lowering.triton_config import DecodeConfig, KernelConfig, SortedConfig
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout, RouterSpec
from moe_compiler.testing import experts_inputs

device.uses_triton = lambda t: True          # CPU tensors stand in for CUDA ones: only traced, never run
from moe_compiler.lowering import triton_experts
triton_experts.tma_ok = lambda *t: True      # ... and for TMA-aligned ones on an sm90 GPU
{sm90_driver}
if {export}:  # what torch.export sets while it traces: custom ops stay whole
    import torch.export._trace as export_trace
    export_trace.custom_triton_ops_decomposition_disabled = lambda: True
device.num_sms = lambda index: 132
configs = {{
    "decode": DecodeConfig(gate_up=KernelConfig(block_n=16, block_k=16), down=KernelConfig(block_n=8, block_k=32)),
    "sorted": SortedConfig(block_m=16, gate_up=KernelConfig(16, 16), down=KernelConfig(16, 16), tma=True),
    # the down GEMV's reduction over I = 64 in two programs per tile (partials, tickets)
    "split": DecodeConfig(gate_up=KernelConfig(16, 16), down=KernelConfig(block_n=32, block_k=16, split_k=2)),
}}
configs["routed"] = configs["decode"]
from moe_compiler.lowering import cutlass
from moe_compiler.lowering.triton_config import CutlassConfig
configs["cutlass"] = CutlassConfig(0)
configs["cutlass_act"] = CutlassConfig(0, act_epilogue=True)
if "{path}".startswith("cutlass"):  # csrc/'s GEMMs taken (nothing built: traced only)
    cutlass.runs = lambda *a: True
    cutlass.load = lambda: None
dispatch._config_for = lambda *key: configs["{path}"]  # (beneath triton_config_for's rules for symbolic T)
dispatch.INLINE_TMA_MAX_FLOP = {tma_flop_max}  # (these GEMMs are tiny: 0 makes them long enough to keep TMA)
device.index = lambda t: 0
graphs = []
def fw(gm, example_inputs):
    graphs.append(gm)
    return lambda *args: (_ for _ in ()).throw(SystemExit(0))  # traced only
# split: GPT-OSS's layout (transposed, interleaved, biases), whose GEMVs take the paired and split forms
gpt_oss = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True)
spec = gpt_oss if "{path}" == "split" else ExpertsSpec()
I = 64 if "{path}" == "split" else 16
dtype = torch.bfloat16 if "{path}" == "cutlass_act" else torch.float32  # (the fused activation is bf16's)
h, ids, w, wgu, wd, bgu, bd = experts_inputs(3, 32, I, 8, 2, dtype, spec, bias=spec.transposed, seed=0)[:7]
logits = torch.randn(3, 8)
if {train}:  # a training graph: AOTAutograd traces the joint forward + backward, then partitions it
    for t in (h, w, wgu, wd, logits):
        t.requires_grad_(True)
def f(h, ids, w, wgu, wd, logits):
    weights, chosen = torch.ops.moe_compiler.route(logits, top_k=2, norm_topk_prob=True)
    if "{path}" == "routed":  # the experts call takes the route's own outputs: the route runs in its gate_up GEMV
        return moe_compiler.moe_experts(h, chosen, weights, wgu, wd, bgu, bd, spec=spec)
    return moe_compiler.moe_experts(h, ids, w, wgu, wd, bgu, bd, spec=spec) + weights.sum() + chosen.sum()
if "{dynamic}" == "tokens":  # only the token count symbolic, as in a model whose prompts vary in length
    for t in (h, ids, w, logits):
        torch._dynamo.mark_dynamic(t, 0)
dynamic = {dynamic} if "{dynamic}" != "tokens" else None
compiled = torch.compile(f, backend=aot_autograd(fw_compiler=fw), dynamic=dynamic)
try:
    compiled(h, ids, w, wgu, wd, logits)
except SystemExit:
    pass
for T in {lengths}:  # more calls, each of T tokens: how many graphs the lengths take
    h, ids, w = experts_inputs(T, 32, I, 8, 2, torch.float32, spec, bias=spec.transposed, seed=T)[:3]
    logits = torch.randn(T, 8)
    for t in (h, ids, w, logits):
        torch._dynamo.mark_dynamic(t, 0)
    try:
        compiled(h, ids, w, wgu, wd, logits)
    except SystemExit:
        pass
    print("GRAPHS", T, len(graphs))
code = graphs[0].code
print("KERNELS", code.count("triton_kernel_wrapper_functional("))
print("OPS", code.count("moe_compiler.experts"), code.count("moe_compiler.route"))
print("TMA", "'W_TMA': 2" in code)  # (triton_experts.TMA_DEVICE: descriptors built by the kernels)
print("CUTLASS", code.count("moe_compiler.cutlass_grouped_mm.default("),
      code.count("moe_compiler.cutlass_grouped_mm_silu_mul.default("))
print("SAVED", len(graphs[0].graph.find_nodes(op="output")[0].args[0]) - 1)  # outputs beyond f's own
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
for name, graph in (("LAUNCHES", graphs[0]), ("LAST_LAUNCHES", graphs[-1])):
    launches = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    # per launch: the kernel and whether it routes (its ROUTE constexpr, '-' where it has none)
    print(name, *([f"{{kernel_side_table.get_kernel(n.kwargs['kernel_idx']).fn.__name__}}:"
                   f"{{n.kwargs['kwargs'].get('ROUTE', '-')}}" for n in launches] or ["."]))
{cloned}
"""

# Triton's driver as on an H100 / H200, for torch's mutation analysis of the recorded kernels (module docstring).
SM90_DRIVER = """
import triton
from triton.backends.compiler import GPUTarget
class Sm90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
triton.runtime.driver.set_active(Sm90Driver())
"""

# The recorded kernels' written arguments (tensors_to_clone) that Inductor must copy on every call: those that are
# the traced function's own inputs (weights, hidden, routing), and every written argument but one bound to the same
# buffer (Inductor writes one in place and a copy of it for the other: a dummy passed for two written pointers,
# say, costs a copy kernel per call). None may be.
CLONED = """
def base(node):  # through views and copies to the buffer they are of: a written view or copy of an input is a
    # copy of that input per call (torch's functionalization clones what a kernel may write)
    while node.op == "call_function" and ("view" in str(node.target) or "clone" in str(node.target)):
        node = node.args[0]
    return node
cloned = []
for n in graphs[0].graph.nodes:
    if "triton_kernel_wrapper" in str(n.target):
        written = {}
        for name in n.kwargs["tensors_to_clone"]:
            node = base(n.kwargs["kwargs"][name])
            buf = str(node)
            if node.op == "placeholder" or buf in written:
                cloned.append(name)
            written[buf] = name
print("CLONED", len(cloned), *cloned)
# a float scalar that is not finite: Inductor's cpp_wrapper writes the recorded kernels' scalars into Python source,
# where `inf` / `nan` are no literals (the build fails)
import math
nonfinite = [f"{n.kwargs['kernel_idx']}.{k}" for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)
             for k, v in n.kwargs["kwargs"].items() if isinstance(v, float) and not math.isfinite(v)]
print("NONFINITE", len(nonfinite), *nonfinite)
"""


def _trace(path: str, inline: str = "1", dynamic: bool | str = False, train: bool = False, export: bool = False,
           route_in_gemv: str = "0", lengths: tuple = (), recorded_tma: str | None = None,
           tma_flop_max: str = "dispatch.INLINE_TMA_MAX_FLOP") -> dict:
    """`recorded_tma`: MOE_COMPILER_RECORDED_TMA (None: the package's default); `tma_flop_max`: the GEMM FLOPs
    above which a traced call keeps TMA (dispatch.INLINE_TMA_MAX_FLOP, an expression)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MOE_COMPILER_ROUTE_IN_GEMV", "MOE_COMPILER_RECORDED_TMA")}
    env["MOE_COMPILER_INLINE"] = inline
    if recorded_tma is not None:
        env["MOE_COMPILER_RECORDED_TMA"] = recorded_tma
    if route_in_gemv != "0":
        env["MOE_COMPILER_ROUTE_IN_GEMV"] = route_in_gemv
    code = textwrap.dedent(TRACE).format(path=path, dynamic=dynamic, train=train, export=export,
                                         sm90_driver=SM90_DRIVER, cloned=CLONED, lengths=lengths,
                                         tma_flop_max=tma_flop_max)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-9000:] + proc.stdout[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line[:1].isupper())
    graphs = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("GRAPHS ")]
    if "NONFINITE" in lines:  # every traced graph with recorded kernels: their float scalars must be finite
        assert lines["NONFINITE"] == "0", f"recorded kernels with non-finite float scalars: {lines['NONFINITE']}"
    ops = tuple(map(int, lines["OPS"].split()))
    out = {"kernels": int(lines["KERNELS"]), "ops": ops, "tma": lines["TMA"] == "True", "cloned": lines["CLONED"]}
    if path.startswith("cutlass"):
        out["cutlass"] = tuple(map(int, lines["CUTLASS"].split()))
    if path == "routed" or lengths:
        out["launches"] = lines.get("LAUNCHES", "")
    if lengths:  # the number of graphs compiled once each length has run, and the last graph's launches
        out["graphs"] = {int(T): int(n) for T, n in graphs}
        out["last_launches"] = lines["LAST_LAUNCHES"]
    return {**out, "saved": int(lines["SAVED"])} if train else out


def test_decode_call_becomes_its_launches():
    # route (1 kernel) + decode experts (gate_up GEMV, down GEMV + combine); neither op is left in the graph
    assert _trace("decode") == {"kernels": 3, "ops": (0, 0), "tma": False, "cloned": "0"}


def test_decode_call_given_the_route_s_outputs_routes_in_its_gate_up_gemv():
    # the gate_up GEMV routes (ROUTE=True) and writes ids / weights for the down GEMV; the route launch, its
    # outputs read by nothing, is dead code (gone from the traced graph already); no argument copied per call
    traced = _trace("routed", route_in_gemv="1")
    assert traced.pop("launches") == "_gate_up_gemv_kernel:True _down_gemv_combine_kernel:-"
    assert traced == {"kernels": 2, "ops": (0, 0), "tma": False, "cloned": "0"}


def test_decode_call_routes_apart_by_default():
    traced = _trace("routed")
    assert traced.pop("launches") == "_route_kernel:- _gate_up_gemv_kernel:False _down_gemv_combine_kernel:-"
    assert traced == {"kernels": 3, "ops": (0, 0), "tma": False, "cloned": "0"}


def test_split_decode_call_records_its_tickets_and_partials_as_written_not_its_inputs():
    # (GPT-OSS's layout: the paired gate_up tile and the 3-D down accumulator besides the split)
    # the split down GEMV writes its partials and tickets (atomics) besides out: mutation analysis must see those
    # writes (a missed one would let Inductor reuse the buffer) and no write to an input (a copy per call)
    assert _trace("split") == {"kernels": 3, "ops": (0, 0), "tma": False, "cloned": "0"}


def test_sorted_call_becomes_its_launches_without_host_tma():
    # route + align (6 pairs: one chunk, one launch) + gate_up + down + combine; the host TMA descriptors the
    # config asks for cannot be recorded, and GEMMs this short load by pointer (dispatch.INLINE_TMA_MAX_FLOP)
    assert _trace("sorted") == {"kernels": 5, "ops": (0, 0), "tma": False, "cloned": "0"}


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_sorted_call_keeps_tma_where_its_kernels_build_the_descriptors(train):
    # GEMMs long enough for TMA to pay: the same launches, the GEMMs' TMA kept (descriptors built on the device from
    # the recorded pointer arguments), a training forward's too
    traced = _trace("sorted", train=train, tma_flop_max="0")
    assert {k: traced[k] for k in ("kernels", "ops", "tma", "cloned")} == {"kernels": 5, "ops": (0, 0), "tma": True,
                                                                           "cloned": "0"}


def test_sorted_call_stays_opaque_to_keep_host_tma_with_recorded_tma_off():
    # MOE_COMPILER_RECORDED_TMA=0 and GEMMs long enough for TMA to pay: one opaque experts op, no GEMM recorded
    traced = _trace("sorted", recorded_tma="0", tma_flop_max="0")
    assert traced["ops"][0] == 1 and traced["tma"] is False, traced


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_call_on_cutlass_becomes_its_launches_and_two_gemm_calls(train):
    # route + align (one launch) + gather + act + combine, and csrc/'s two GEMMs as calls of their own op
    # (cutlass.py): Inductor's code makes them without the experts op's layer. A training forward records the same
    # (its act pass also writing the pre-activation rows the backward reads).
    traced = _trace("cutlass", train=train)
    traced.pop("saved", None)
    assert traced == {"kernels": 5, "ops": (0, 0), "tma": False, "cloned": "0", "cutlass": (2, 0)}


def test_call_on_cutlass_with_the_activation_in_an_epilogue_records_three_gemm_calls_and_no_act_pass():
    # CutlassConfig.act_epilogue, bf16 SwiGLU: route + align + gather + combine; the gate and down GEMMs as calls of
    # grouped_mm, the up GEMM (activation in its epilogue) as a call of grouped_mm_silu_mul
    traced = _trace("cutlass_act")
    assert traced == {"kernels": 4, "ops": (0, 0), "tma": False, "cloned": "0", "cutlass": (2, 1)}


def test_training_forward_records_its_launches_and_keeps_the_backward_op():
    # the op's autograd formula runs above the rule: the forward's launches are recorded, and the forward graph
    # saves the op's inputs for the backward (the experts_backward / route_backward ops, compiled lazily)
    traced = _trace("decode", train=True)
    saved = traced.pop("saved")
    assert traced == {"kernels": 3, "ops": (0, 0), "tma": False, "cloned": "0"} and saved >= 5


# A compiled training step's experts as the backend emits them (experts_train, passes/training.py): AOTAutograd's
# partitioner hands over the forward and backward graphs, whose launches and remaining op calls are counted.
TRAIN_TRACE = """
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
import moe_compiler
from moe_compiler.lowering import device, triton_backward
from moe_compiler.testing import experts_inputs
device.uses_triton = lambda t: True          # CPU tensors stand in for CUDA ones: only traced, never run
device.index = lambda t: 0
device.num_sms = lambda index: 132
device.gpu_name = lambda index: "NVIDIA H100 80GB HBM3"
from moe_compiler.lowering import dispatch
from moe_compiler.lowering.triton_config import KernelConfig, SortedConfig
dispatch._config_for = lambda *key: SortedConfig(block_m=16, gate_up=KernelConfig(16, 16), down=KernelConfig(16, 16))
{sm90_driver}
# the library backward (torch's grouped GEMMs over gathered rows) as bf16 takes it on sm90, or the Triton one
triton_backward.library_rows = lambda *a: {library}
dtype = torch.bfloat16 if {library} else torch.float32
if {wgrad}:  # the weight gradients on csrc/'s grouped_mm_wgrad (BackwardConfig.wgrad_cutlass; nothing built: traced)
    import dataclasses
    from moe_compiler.lowering import cutlass
    cutlass.load = lambda: None
    default = triton_backward.default_config
    triton_backward.default_config = lambda *a: dataclasses.replace(default(*a), wgrad_cutlass=1)
from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout
# gpt_oss: the transposed, interleaved layout with biases (their gradients too)
spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True) if {gpt_oss} else ExpertsSpec()
h, ids, w, wgu, wd, bgu, bd = experts_inputs({tokens}, 32, 16, 8, 2, dtype, spec, bias={gpt_oss})[:7]
logits = torch.randn({tokens}, 8, dtype=dtype)  # the route's backward too
from moe_compiler.testing.reference import shared_inputs
# shared: a gated shared MLP in the op (its gradients summed into hidden's by the last backward op)
(sgate, sup), sdown, segate = shared_inputs(32, 24, dtype, fused=False, gated=True) if {shared} else ((None,) * 2,
                                                                                                       None, None)
# frozen: the experts' weights take no gradient (a LoRA on attention): no weight-gradient GEMM is recorded
for t in (h, logits) if {frozen} else (h, wgu, wd, bgu, bd, logits, sgate, sup, sdown, segate):
    if t is not None:
        t.requires_grad_(True)
if {dynamic}:  # the token count symbolic (lengths that vary: automatic dynamic shapes)
    torch._dynamo.mark_dynamic(h, 0)
    torch._dynamo.mark_dynamic(logits, 0)
graphs = {{}}
def partition(joint, inputs, **kw):
    fw, bw = min_cut_rematerialization_partition(joint, inputs, **kw)
    graphs.update(fw=fw, bw=bw)
    raise SystemExit(0)  # traced only
def f(h, logits, wgu, wd, bgu, bd, sgate, sup, sdown, segate):
    w, ids = torch.ops.moe_compiler.route(logits, top_k=2, norm_topk_prob=True)
    return torch.ops.moe_compiler.experts_train(h, ids, w.to(h.dtype), wgu, wd, bgu, bd, sgate, sup, sdown, segate,
                                                **spec.op_kwargs())[0]
compiled = torch.compile(f, backend=aot_autograd(fw_compiler=lambda gm, _: gm, partition_fn=partition))
try:
    compiled(h, logits, wgu, wd, bgu, bd, sgate, sup, sdown, segate)
except SystemExit:
    pass
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
for name, gm in graphs.items():
    launches = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in gm.graph.nodes
                if "triton_kernel_wrapper" in str(n.target)]
    ops = [str(n.target) for n in gm.graph.nodes if "moe_compiler" in str(n.target)]
    grouped = sum("_grouped_mm" in str(n.target) for n in gm.graph.nodes)
    # a written kernel argument that is the graph's input (through views): Inductor copies it per call
    cloned = 0
    for n in gm.graph.nodes:
        if "triton_kernel_wrapper" in str(n.target):
            for arg in n.kwargs["tensors_to_clone"]:
                node = n.kwargs["kwargs"][arg]
                while node.op == "call_function" and "view" in str(node.target):
                    node = node.args[0]
                cloned += node.op == "placeholder"
    print(name.upper(), " ".join(launches) or ".", "|", " ".join(ops) or ".", "|", grouped, "|", cloned)
# the elements the forward saves for the backward (its outputs after f's own), tensors only
saved = graphs["fw"].graph.find_nodes(op="output")[0].args[0][1:]
numels = [n.meta["val"].numel() for n in saved if isinstance(n.meta.get("val"), torch.Tensor)]
print("SAVED", sum(x if isinstance(x, int) else x.node.hint for x in numels))  # (symbolic: at the traced length)
"""


@functools.cache  # a trace is a subprocess compiling a training step (~15 s); several tests compare the same one
def _train_trace(inline: str, library: bool, gpt_oss: bool, frozen: bool, shared: bool, dynamic: bool = False,
                 tokens: int = 40, wgrad: bool = False) -> tuple[dict, int]:
    """TRAIN_TRACE's graphs ({"FW"/"BW": [launches, op calls, grouped GEMMs, cloned inputs]}) and saved elements
    (read, not changed, by the tests that share them)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MOE_COMPILER_INLINE"] = inline
    code = textwrap.dedent(TRAIN_TRACE).format(sm90_driver=SM90_DRIVER, library=library, gpt_oss=gpt_oss,
                                               frozen=frozen, shared=shared, dynamic=dynamic, tokens=tokens,
                                               wgrad=wgrad)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-9000:] + proc.stdout[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("FW ", "BW ", "SAVED ")))
    return {g: [part.split() for part in lines[g].split("|")] for g in ("FW", "BW")}, int(lines["SAVED"])


@pytest.mark.parametrize("library, gpt_oss, frozen, shared", [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (True, False, True, False), (True, False, False, True)],
    ids=["triton", "library", "gpt_oss_biases", "library_frozen_experts", "library_shared_experts"])
def test_training_step_records_the_forward_and_the_split_backward(library, gpt_oss, frozen, shared):
    # the route, experts_train's forward, the three backward ops and the route's backward become their launches (the
    # library path's GEMMs calls of torch._grouped_mm) instead of six opaque calls, each paying the op layer and
    # Python launches per step
    graphs, saved = _train_trace("1", library, gpt_oss, frozen, shared)
    (fw_launches, fw_ops, _, fw_cloned), (bw_launches, bw_ops, bw_grouped, bw_cloned) = graphs["FW"], graphs["BW"]
    assert fw_ops == ["."] and bw_ops == ["."] and fw_cloned == bw_cloned == ["0"], graphs
    align = ["_align_one_chunk_kernel"]  # 80 pairs: one chunk, one launch
    shared_act = ["_gated_rows_kernel"] if shared else []  # the shared MLP's act(gate) * up, after the experts
    assert fw_launches == ["_route_kernel", *align, "_gate_up_kernel", "_down_kernel", "_combine_kernel",
                           *shared_act], graphs
    # the backward aligns its rows once per op (at its own row block), as the opaque ops do; the router weights'
    # gradient then reaches the logits
    assert bw_launches.count("_align_one_chunk_kernel") == 3 and "_combine_kernel" in bw_launches, graphs
    assert bw_launches[-1] == "_route_backward_kernel", graphs
    if library:  # dA, dz @ W_gate_up and the two weight gradients: four grouped GEMMs (frozen: two)
        assert "_act_backward_rows_kernel" in bw_launches and int(bw_grouped[0]) == (2 if frozen else 4), graphs
    else:
        assert {"_dz_kernel", "_wgrad_kernel", "_down_kernel"} <= set(bw_launches) and bw_grouped == ["0"], graphs
    # The opaque ops: one call each. The forward saves no more than theirs saves (the inputs and z; recorded, the
    # gate_up bias is not read again, z holds it): a recorded backward's steps that read forward tensors only stay
    # in the backward (no gathered rows saved), and no buffer is shared between the two graphs (launch.empty).
    # Where a shared MLP is in the op, AOTAutograd's CSE finds the backward's recomputed projections (gate, up,
    # expert gate: T x (2 Is + 1)) equal to the forward's and saves those instead of recomputing two GEMMs, as
    # autograd does for any MLP; the opaque op recomputed them.
    opaque, opaque_saved = _train_trace("0", library, gpt_oss, frozen, shared)
    assert opaque["FW"][:2] == [["."], ["moe_compiler.route.default", "moe_compiler.experts_train.default"]], opaque
    assert [op.split(".")[1] for op in opaque["BW"][1]] == [
        "experts_backward_down", "experts_backward_gate_up", "experts_backward_combine", "route_backward"], opaque
    assert saved <= opaque_saved + (40 * (2 * 24 + 1) if shared else 0), (saved, opaque_saved)


def test_training_step_records_the_weight_gradients_on_cutlass():
    """BackwardConfig.wgrad_cutlass: the recorded backward calls csrc/'s weight-gradient GEMM twice (dW_down,
    dW_gate_up) through its Python op, in place of two of torch's grouped GEMMs; nothing else changes."""
    graphs, _ = _train_trace("1", True, False, False, False, wgrad=True)
    bw_launches, bw_ops, bw_grouped, bw_cloned = graphs["BW"]
    assert bw_ops == ["moe_compiler.cutlass_grouped_mm_wgrad.default"] * 2, graphs
    # (the count of "_grouped_mm" targets: dA and dx by torch's, and the two calls of ours)
    assert int(bw_grouped[0]) == 4 and bw_cloned == ["0"], graphs
    assert bw_launches == _train_trace("1", True, False, False, False)[0]["BW"][0], graphs


@pytest.mark.parametrize("frozen, tokens", [(False, 40), (False, 8192), (True, 8192)],
                         ids=["library", "library_row_chunks", "library_frozen_row_chunks"])
def test_training_step_with_a_symbolic_token_count_records_the_split_backward(frozen, tokens):
    # lengths that vary (automatic dynamic shapes) trace T as a symbol: the library backward still splits in three
    # and records the launches and GEMMs of the static trace, its buffers expressions of T (the first half in row
    # chunks where S_pad passes 8192: frozen experts always, trained ones where z + dA is the peak)
    graphs, saved = _train_trace("1", True, False, frozen, False, dynamic=True, tokens=tokens)
    static, static_saved = _train_trace("1", True, False, frozen, False, tokens=tokens)
    assert graphs["FW"][1] == graphs["BW"][1] == ["."] and graphs == static, (graphs, static)
    assert saved == static_saved
    if tokens == 8192:  # a row pass per chunk of dA (four: 16384+ rows), and one for act_s with weight gradients
        assert graphs["BW"][0].count("_act_backward_rows_kernel") == 4 + (not frozen), graphs


def test_training_step_with_a_symbolic_token_count_keeps_the_triton_backward_one_op():
    # the Triton backward's dz rows are padded to a block chosen from T: under a symbolic T the fake would size dz
    # from the band's length and an opaque op's real call from its own (dispatch.backward_splits), so the backward
    # stays the one experts_backward op; the forward and the route's backward are still recorded
    graphs, _ = _train_trace("1", False, False, False, False, dynamic=True)
    assert graphs["FW"][1] == ["."] and graphs["BW"][1] == ["moe_compiler.experts_backward.default"], graphs
    assert graphs["BW"][0] == ["_route_backward_kernel"], graphs


def test_switch_keeps_the_ops_opaque():
    assert _trace("decode", inline="0") == {"kernels": 0, "ops": (1, 1), "tma": False, "cloned": "0"}


def test_export_keeps_the_ops_whole():
    assert _trace("decode", export=True) == {"kernels": 0, "ops": (1, 1), "tma": False, "cloned": "0"}


def test_symbolic_sizes_other_than_the_token_count_keep_the_ops_opaque():
    # dynamic=True makes every size symbolic, the experts' and the weights' too: the config and the kernels'
    # constexprs would have to guard each one; the ops stay one node each
    assert _trace("decode", dynamic=True) == {"kernels": 0, "ops": (1, 1), "tma": False, "cloned": "0"}


@pytest.mark.parametrize("path, kernels, train", [("decode", 3, False), ("sorted", 5, False), ("cutlass", 5, False),
                                                  ("cutlass_act", 4, False), ("sorted", 5, True)])
def test_symbolic_token_count_records_the_launches(path, kernels, train):
    # prompts of varying length: Dynamo compiles T as a symbol (marked dynamic here; automatic dynamic shapes do it
    # from the second length on); the calls still become their launches, grids and buffers expressions of T (a
    # training forward too)
    traced = _trace(path, dynamic="tokens", train=train)
    assert traced.pop("cutlass", None) in (None, (2, 0) if path == "cutlass" else (2, 1))
    traced.pop("saved", None)
    assert traced == {"kernels": kernels, "ops": (0, 0), "tma": False, "cloned": "0"}


def test_symbolic_token_count_compiles_once_per_band_and_leaves_decode_where_the_band_outgrows_it():
    # the first graph (T = 3, a decode config) serves the lengths of its band [1, 16] and no other; each later band
    # compiles once (triton_config.T_BANDS), whatever the lengths within it; the unbounded band past 4096 cannot
    # take the decode kernels (at most MAX_PAIRS pairs): that graph runs the sorted path (align, two GEMMs, combine)
    traced = _trace("decode", dynamic="tokens", lengths=(5, 16, 17, 250, 256, 257, 4096, 4097, 9000))
    assert traced["graphs"] == {5: 1, 16: 1, 17: 2, 250: 2, 256: 2, 257: 3, 4096: 3, 4097: 4, 9000: 4}
    assert traced["launches"] == "_route_kernel:- _gate_up_gemv_kernel:False _down_gemv_combine_kernel:-"
    assert traced["last_launches"].split() == [
        "_route_kernel:-", "_count_kernel:-", "_offsets_kernel:-", "_scatter_kernel:-",
        "_gate_up_kernel:-", "_down_kernel:-", "_combine_kernel:-",
    ]


def test_bad_switch_value_is_a_clear_error(monkeypatch):
    from moe_compiler.ops import inline

    monkeypatch.setenv(inline.INLINE_ENV, "yes")
    with pytest.raises(ValueError, match="MOE_COMPILER_INLINE='yes': expected '1'"):
        inline.enabled()


QUANTIZED = """
import torch
from torch._dynamo.backends.common import aot_autograd
import moe_compiler
from moe_compiler.lowering import device
from moe_compiler.spec import QuantizedExpertsSpec
from moe_compiler.testing.quantized import quantized_experts_inputs

device.uses_triton = lambda t: True          # CPU tensors stand in for CUDA ones: only traced, never run
from moe_compiler.lowering import triton_experts
triton_experts.tma_ok = lambda *t: True      # ... and for TMA-aligned ones on an sm90 GPU
{sm90_driver}
if {cutlass}:  # the GEMMs on csrc/'s FP8 grouped GEMM (MOE_COMPILER_CUTLASS=1): the operands taken, nothing built
    from moe_compiler.lowering import cutlass
    cutlass.fp8_runs = lambda *a, **kw: True
    cutlass.load = lambda: None
graphs = []
def fw(gm, example_inputs):
    graphs.append(gm)
    return lambda *a: (_ for _ in ()).throw(SystemExit(0))
def f(*a):
    return torch.ops.moe_compiler.experts_quantized(*a, scale_block_n=16, scale_block_k=16)
compiled = torch.compile(f, backend=aot_autograd(fw_compiler=fw))
for T in ({T}, *{lengths}):  # with lengths: the token count symbolic (hidden, ids, weights marked dynamic)
    args, _ = quantized_experts_inputs(T, 32, 16, 8, 2, torch.float32, 16, 16, torch.float8_e8m0fnu)
    if {lengths}:
        for t in args[:3]:
            torch._dynamo.mark_dynamic(t, 0)
    try:
        compiled(*args)
    except SystemExit:
        pass
    print("GRAPHS", T, len(graphs))
code = graphs[0].code
print("KERNELS", code.count("triton_kernel_wrapper_functional("), "OPS", code.count("moe_compiler.experts_quantized"))
print("CUTLASS", code.count("moe_compiler.cutlass_grouped_mm_fp8.default("))
{cloned}
"""  # (fed through str.format: no braces besides these)


@pytest.mark.parametrize("inline,T,cutlass,expected", [
    ("1", 3, False, "KERNELS 4 OPS 0\nCUTLASS 0\nCLONED 0\nNONFINITE 0"),
    ("1", 1, False, "KERNELS 2 OPS 0\nCUTLASS 0\nCLONED 0\nNONFINITE 0"),
    ("0", 3, False, "KERNELS 0 OPS 1\nCUTLASS 0\nCLONED 0"),
    ("1", 3, True, "KERNELS 6 OPS 0\nCUTLASS 2\nCLONED 0\nNONFINITE 0"),
    ("0", 3, True, "KERNELS 0 OPS 1\nCUTLASS 0\nCLONED 0")])
def test_quantized_call_becomes_its_launches(inline, T, cutlass, expected):
    # T = 3 (sorted): align (one chunk: one launch) + FP8 gate_up + FP8 down + combine; T = 1: the two decode
    # GEMVs (the down GEMV per pair, its slots summed by the last to arrive: its tickets and fp32 rows written, no
    # input). The e8m0 scales are read as bytes through a view. On CUTLASS (cutlass_fp8.py): align (one launch),
    # the row quantizer, the sorted copy of rows and of scales, act + quantize, combine — and the two GEMMs as
    # calls of their op (cutlass.py), none of the experts op.
    out = _trace_quantized(inline, T, cutlass)
    assert expected in out, out


@pytest.mark.parametrize("cutlass,expected", [(False, "KERNELS 4 OPS 0\nCUTLASS 0"),
                                              (True, "KERNELS 6 OPS 0\nCUTLASS 2")])
def test_quantized_call_with_a_symbolic_token_count_records_its_launches_once_per_band(cutlass, expected):
    # as the bf16 op (test_symbolic_token_count_compiles_once_per_band...): the same launches as at a static T = 3,
    # one graph per band (2-16, 17-256, 257-4096) whatever the lengths within it
    out = _trace_quantized("1", 3, cutlass, lengths=(5, 16, 17, 300))
    assert expected in out, out
    graphs = [line.split()[1:] for line in out.splitlines() if line.startswith("GRAPHS ")]
    assert graphs == [["3", "1"], ["5", "1"], ["16", "1"], ["17", "2"], ["300", "3"]]


def _trace_quantized(inline: str, T: int, cutlass: bool, lengths: tuple = ()) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOE_COMPILER_CUTLASS")}
    env["MOE_COMPILER_INLINE"] = inline
    if cutlass:
        env["MOE_COMPILER_CUTLASS"] = "1"
    code = QUANTIZED.format(T=T, sm90_driver=SM90_DRIVER, cloned=CLONED, cutlass=cutlass, lengths=lengths)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-9000:] + proc.stdout[-2000:]
    return proc.stdout


LINEAR = """
import torch
from torch._dynamo.backends.common import aot_autograd
import moe_compiler
from moe_compiler.lowering import device
from moe_compiler.testing.quantized import quantize_fp8_blocks

device.uses_triton = lambda t: True          # CPU tensors stand in for CUDA ones: only traced, never run
from moe_compiler.lowering import triton_experts
triton_experts.tma_ok = lambda *t: True      # ... and for TMA-aligned ones on an sm90 GPU
{sm90_driver}
q, s = quantize_fp8_blocks(torch.randn(40, 64), 16, 32)
graphs = []
def fw(gm, example_inputs):
    graphs.append(gm)
    return lambda *a: (_ for _ in ()).throw(SystemExit(0))
def f(x):
    return torch.ops.moe_compiler.linear_quantized(x, q, s, None, scale_block_n=16, scale_block_k=32)
compiled = torch.compile(f, backend=aot_autograd(fw_compiler=fw))
for S in (3, 5, 16, 17, 300):  # the sequence length symbolic (marked dynamic) in [1, S, K] activations
    x = torch.randn(1, S, 64)
    torch._dynamo.mark_dynamic(x, 1)
    try:
        compiled(x)
    except SystemExit:
        pass
    print("GRAPHS", S, len(graphs))
print("KERNELS", graphs[0].code.count("triton_kernel_wrapper_functional("), "OPS",
      graphs[0].code.count("moe_compiler.linear_quantized"))
"""


def test_quantized_linear_with_a_symbolic_length_records_its_launch():
    # FP8 linears of a prompt of varying length: one recorded GEMM launch, the row tiles split at 16 rows by a guard
    # (two graphs: up to 16 rows, and above), the op's own choice
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = LINEAR.format(sm90_driver=SM90_DRIVER)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-9000:] + proc.stdout[-2000:]
    graphs = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("GRAPHS ")]
    assert graphs == [["3", "1"], ["5", "1"], ["16", "1"], ["17", "2"], ["300", "2"]]
    assert "KERNELS 1 OPS 0" in proc.stdout, proc.stdout


# --- GPU: the recorded launches through Inductor ------------------------------------------------------------

def _peak_call_bytes(compiled, ids) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    compiled(input_ids=ids)
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@pytest.mark.parametrize("library, lengths", [(True, (300,)), (False, (300,)), (True, (300, 260)),
                                              (False, (300, 260)), (True, (4500, 4200))],
                         ids=["library", "triton", "library_symbolic", "triton_symbolic", "library_symbolic_chunks"])
def test_compiled_training_step_records_its_launches_and_equals_fp64(library, lengths, monkeypatch,
                                                                     no_compile_caches):
    """On CUDA, through Inductor: a training step's route and experts calls, forward and backward, are Inductor's
    own launches (no call of our ops in its code), and the gradients of hidden, the router logits and both weights
    equal fp64 autograd's (bf16: 1e-2). `library`: the backward's GEMMs by torch's grouped GEMM (the bf16 default
    on sm90) or by the Triton kernels. Several lengths: the token count symbolic (marked dynamic), one graph for
    the lengths of a band; past 8192 pairs the library backward takes dA in row chunks (first_half_chunks); the
    Triton backward stays one experts_backward op there (dispatch.backward_splits)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from moe_compiler.lowering import triton_backward
    from moe_compiler.testing import experts_reference, rel_err

    if not library:
        monkeypatch.setattr(triton_backward, "library_rows", lambda *a: False)
    E, k, H, I = 8, 2, 256, 128
    g = torch.Generator("cuda").manual_seed(3)
    w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16().requires_grad_(True)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).bfloat16().requires_grad_(True)

    def f(hidden, logits, w1, w2):
        weights, ids = torch.ops.moe_compiler.route(logits, top_k=k, norm_topk_prob=True)
        return torch.ops.moe_compiler.experts_train(hidden, ids, weights.to(hidden.dtype), w1, w2)[0]

    compiled = torch.compile(f, dynamic=False if len(lengths) == 1 else None)
    for n, T in enumerate(lengths):
        hidden = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
        logits = torch.randn(T, E, device="cuda", generator=g).bfloat16().requires_grad_(True)
        grad_out = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        leaves = (hidden, logits, w1, w2)
        if len(lengths) > 1:
            torch._dynamo.mark_dynamic(hidden, 0)
            torch._dynamo.mark_dynamic(logits, 0)

        def step():
            return torch.autograd.grad(compiled(*leaves), leaves, grad_out)

        if n:  # the first length's graphs serve it (run_and_get_code would reset Dynamo: compiles counted instead)
            frames = counters["stats"]["unique_graphs"]
            step()
            assert counters["stats"]["unique_graphs"] == frames, T
        else:
            _, codes = run_and_get_code(step)  # compiles the forward and the backward
            code = "\n".join(codes)
            assert "_gate_up_kernel" in code and "_route_backward_kernel" in code
            if library or len(lengths) == 1:
                assert "torch.ops.moe_compiler" not in code
                assert ("_act_backward_rows_kernel" in code) == library and ("_dz_kernel" in code) != library
            else:
                assert "torch.ops.moe_compiler.experts_backward.default" in code
        got = step()  # a second step through the compiled graphs
        # fp64 autograd, the selection held fixed (the route's ids from the same logits)
        ref = [t.detach().double().requires_grad_(True) for t in leaves]
        weights, ids = torch.ops.moe_compiler.route(logits.detach(), top_k=k, norm_topk_prob=True)
        probs = torch.softmax(ref[1], dim=-1).gather(1, ids)
        out = experts_reference(ref[0], ids, probs / probs.sum(-1, keepdim=True), ref[2], ref[3])
        want = torch.autograd.grad(out, ref, grad_out.double())
        for name, a, b in zip(("hidden", "logits", "w_gate_up", "w_down"), got, want):
            assert rel_err(a, b) <= 1e-2, (T, name, rel_err(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 5, 64, 300])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_compiled_block_with_recorded_launches_equals_eager(arch, T, monkeypatch):
    """A tiny HF model compiled with fused_moe: logits equal eager at decode (T = 1), small sorted and larger T;
    Inductor's code launches our kernels itself (no call of the op) and copies no weight: a call allocates no
    more than with the op opaque (a copy of the weights, from a wrong mutation analysis, would show)."""
    from torch._inductor.utils import run_and_get_code

    from moe_compiler.ops import inline
    from moe_compiler.testing import rel_err
    from moe_compiler.testing.hf_models import tiny_model

    # DeepSeek-V3 in fp32: its grouped sigmoid routing puts near-tied experts a bf16 rounding apart, and a tie broken
    # the other way moves the logits more than a kernel error would (session 28: 0.048 at T = 1 in bf16, the
    # other 11 cases passed; since session 26's redraw its routers give distinct scores, hence close ones). In
    # fp32 a kernel error still shows, at 1e-4.
    dtype, tol = (torch.float32, 1e-4) if arch == "deepseek_v3" else (torch.bfloat16, 3e-2)
    model = tiny_model(arch, dtype=dtype).cuda()
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(T)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        compiled = torch.compile(model, backend="fused_moe", dynamic=False)
        out, codes = run_and_get_code(compiled, input_ids=ids)
        recorded = _peak_call_bytes(compiled, ids)
        torch._dynamo.reset()
        monkeypatch.setenv(inline.INLINE_ENV, "0")
        opaque = torch.compile(model, backend="fused_moe", dynamic=False)
        opaque(input_ids=ids)
        opaque_bytes = _peak_call_bytes(opaque, ids)
    code = "\n".join(codes)
    assert rel_err(out.logits.float(), ref) <= tol
    assert "torch.ops.moe_compiler" not in code  # (the kernels' own source, embedded, names the op in an assert)
    assert "_gate_up" in code  # our kernels, named in Inductor's code
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n)
    assert recorded < opaque_bytes + experts / 2, (recorded, opaque_bytes, experts)


def _lengths_through(model, lengths) -> dict[int, str]:
    """Prompts of each length through one torch.compile of `model` (Dynamo's automatic dynamic shapes: from the
    second length on the length is a symbol), each length's logits checked against the model run eagerly; returns
    Inductor's code of the compiles each length caused ('' where it reused a graph)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    from moe_compiler.testing import rel_err

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fused_moe")
    codes: dict[int, list] = {}
    # (run_and_get_code would reset Dynamo, and with it the automatic dynamic shapes under test; the FX graph cache
    # would skip the code generation)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            mock.patch.object(GraphLowering, "save_output_code", lambda code: codes[T].append(code)):
        for T in lengths:
            codes[T] = []
            ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(T)).cuda()
            ref = model(input_ids=ids).logits.float()
            out = compiled(input_ids=ids).logits.float()
            assert rel_err(out, ref) <= 1e-4, (T, rel_err(out, ref))
    return {T: "\n".join(code) for T, code in codes.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_prompts_of_varying_length_record_their_launches_and_equal_eager(arch):
    """Prompts of many lengths through one compiled model: each length's logits equal eager, the graphs launch our
    kernels with the length symbolic (no call of the op), and lengths of one band share a graph
    (triton_config.T_BANDS)."""
    from moe_compiler.testing.hf_models import tiny_model

    # fp32: bf16 logits put near-tied experts a rounding apart, and a tie broken the other way (DeepSeek-V3's
    # grouped sigmoid routing at T = 7, say) moves the logits by more than any kernel error would
    codes = _lengths_through(tiny_model(arch, dtype=torch.float32).cuda(), (7, 40, 90, 200, 300, 1000))
    # 7: static; 40: the first symbolic graph (band 17-256), serving 90 and 200 too; 300: band 257-4096, and 1000.
    # GPT-OSS's own sliding-window cache (window 128: `full_key_states[:, :, -window + 1:]`) guards the length to
    # <= 126 in the graph of 40, so 200 compiles again there with plain torch.compile as well
    want = [7, 40, 200, 300] if arch == "gpt_oss" else [7, 40, 300]
    assert [T for T, code in codes.items() if code] == want
    for T in want[1:]:
        assert "torch.ops.moe_compiler.experts" not in codes[T] and "_gate_up" in codes[T], T


@pytest.mark.gpu
def test_fp8_experts_with_prompts_of_varying_length_record_their_launches_and_equal_eager():
    """The same for transformers' FP8Experts (experts_quantized): the compiled model's logits equal the eager
    model's (the op called eagerly), one graph per band, no call of the op in the symbolic graphs."""
    from moe_compiler.testing.quantized import fp8_experts_model

    model, _ = fp8_experts_model("qwen3_moe", (32, 32))  # fp32 activations (no near-tied routes), FP8 weights
    codes = _lengths_through(model.cuda(), (7, 40, 90, 300))
    assert [T for T, code in codes.items() if code] == [7, 40, 300]
    for T in (40, 300):
        assert "torch.ops.moe_compiler.experts" not in codes[T] and "_gate_up" in codes[T], T


@pytest.mark.gpu
@pytest.mark.parametrize("T", [64, 300])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_recorded_tma_compiled_equals_eager(arch, T, monkeypatch, no_compile_caches):
    """moe_compiler.recorded_tma: a sorted-path call whose config loads by TMA keeps TMA in Inductor's code, its
    kernels building the descriptors on the device (global scratch from the allocator Inductor's launcher sets);
    the logits equal eager, as they do with the default's pointer loads."""
    from torch._dynamo.utils import counters

    from moe_compiler.lowering import dispatch, triton_config, triton_experts
    from moe_compiler.testing import rel_err
    from moe_compiler.testing.hf_models import tiny_model

    tile = triton_config.KernelConfig(32, 32, num_warps=4, num_stages=3)
    config = triton_config.SortedConfig(block_m=16, gate_up=tile, down=tile, tma=True)
    monkeypatch.setattr(dispatch, "triton_config_for", lambda *a: config)
    monkeypatch.setattr(dispatch, "INLINE_TMA_MAX_FLOP", 0)  # (tiny GEMMs: as if long enough for TMA to pay)
    modes = []

    def spy(*a, real=triton_experts.tma_mode):
        modes.append(real(*a))
        return modes[-1]

    monkeypatch.setattr(triton_experts, "tma_mode", spy)
    inlinable = []  # (the failure's message: whether the call was found inlinable, or never traced)

    def spy_inlinable(*a, real=dispatch.experts_inlinable):
        inlinable.append(real(*a))
        return inlinable[-1]

    monkeypatch.setattr(dispatch, "experts_inlinable", spy_inlinable)
    # The config and the FLOP rule are patched here, and neither is in the caches' keys: without the
    # no_compile_caches fixture, an earlier test's compile of the same graph (test_compiled_block_with_recorded_
    # launches_equals_eager's: the default config, pointer loads) is loaded instead of traced. Session 28's full
    # suite failed all four cases so (the calls never traced); session 27 ran them without that test and they passed.
    model = tiny_model(arch, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(T)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        for recorded in (False, True):
            torch._dynamo.reset()
            modes.clear()
            inlinable.clear()
            compiled = torch.compile(model, backend="fused_moe", dynamic=False,
                                     options={"moe_compiler.recorded_tma": recorded})
            out = compiled(input_ids=ids).logits.float()
            assert rel_err(out, ref) <= 3e-2, (recorded, rel_err(out, ref))
            # recorded TMA off: the call stays opaque and runs host descriptors, as the compile's eager check does
            want = {triton_experts.TMA_DEVICE} if recorded else set()
            caches = {k: v for k, v in {**counters["aot_autograd"], **counters["inductor"]}.items() if "cache" in k}
            assert modes and set(modes) - {triton_experts.TMA_HOST} == want, (modes, inlinable, caches,
                                                                              dict(counters["moe_compiler"]))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_static_launch_of_recorded_kernels_equals_the_python_launcher(arch, T):
    """moe_compiler.static_launch: Inductor launches our recorded kernels by its static C++ launcher (a kernel it
    cannot take keeps Triton's launcher); the same kernels, so the same logits bit for bit."""
    from moe_compiler.testing.hf_models import tiny_model

    model = tiny_model(arch, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(T)).cuda()
    outs = []
    with torch.no_grad():
        for static in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="fused_moe", dynamic=False,
                                     options={"moe_compiler.static_launch": static})
            compiled(input_ids=ids)
            outs.append(compiled(input_ids=ids).logits)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_route_in_the_gate_up_gemv_equals_the_route_launch_in_a_compiled_model(arch, T, monkeypatch):
    """MOE_COMPILER_ROUTE_IN_GEMV=1: a decode step whose route runs inside the gate_up GEMV gives the logits of the
    same model compiled with the route's own launch (the same route math), and Inductor's code has no route kernel
    left to launch. fp32: two bf16 compiles of one model were seen a bf16 rounding apart (3-5e-3) under pytest-xdist
    and equal run alone (NOTES session 24; why is not established), while a wrong route moves fp32 logits by far
    more than 1e-4."""
    from torch._inductor.utils import run_and_get_code

    from moe_compiler.lowering import dispatch, launch, triton_config
    from moe_compiler.testing import rel_err
    from moe_compiler.testing.hf_models import tiny_model

    real_config_for = dispatch.triton_config_for

    def decode_config_for(hidden, topk_ids, w_gate_up, I, transposed=False):
        # The route runs in the decode GEMV only: the tiny models' 8 experts take the sorted path at T = 5 by
        # default (decode_suits), so every call gets the decode path's untuned tiles here.
        config = real_config_for(hidden, topk_ids, w_gate_up, I, transposed)
        if config.path is not triton_config.Path.DECODE:
            T, H = hidden.shape
            config = triton_config.default_config(hidden.dtype, 1 << 20, topk_ids.shape[1], H, I, T, transposed)
        assert config.path is triton_config.Path.DECODE
        return config

    monkeypatch.setattr(dispatch, "triton_config_for", decode_config_for)
    model = tiny_model(arch, dtype=torch.float32).cuda()
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(T)).cuda()
    outs, codes = {}, {}
    with torch.no_grad():
        eager = model(input_ids=ids).logits.float()
        for on in ("0", "1"):
            monkeypatch.setenv(launch.ROUTE_IN_GEMV_ENV, on)
            torch._dynamo.reset()
            out, code = run_and_get_code(torch.compile(model, backend="fused_moe", dynamic=False), input_ids=ids)
            outs[on], codes[on] = out.logits.float(), "\n".join(code)
    # (each against eager in the message: which of the two moved, when they differ)
    assert rel_err(outs["1"], outs["0"]) <= 1e-4, {on: rel_err(out, eager) for on, out in outs.items()}
    # (the name also shows where a kernel's source is embedded: fewer mentions, not none)
    assert codes["0"].count("_route_kernel") > codes["1"].count("_route_kernel")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the CUTLASS kernels are sm90a")
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_call_on_cutlass_compiled_equals_eager_with_the_gemms_recorded(fmt, monkeypatch):
    """The experts ops forced onto csrc/'s GEMMs (MOE_COMPILER_CUTLASS=1) inside torch.compile: Inductor's code
    calls the two GEMM ops and launches the glue itself (no experts op left), and every call — new routing and
    activations each time — equals the eager op."""
    from torch._inductor.utils import run_and_get_code

    from moe_compiler.lowering import cutlass
    from moe_compiler.spec import ExpertsSpec, QuantizedExpertsSpec
    from moe_compiler.testing import experts_inputs, rel_err
    from moe_compiler.testing.quantized import quantized_experts_inputs

    monkeypatch.setenv(cutlass.ENV, "1")
    T, H, I, E, k = 384, 256, 128, 16, 4
    if fmt == "fp8":
        op, kwargs, name = torch.ops.moe_compiler.experts_quantized, QuantizedExpertsSpec().op_kwargs(), "_fp8"
        make = lambda seed: quantized_experts_inputs(T, H, I, E, k, torch.bfloat16, seed=seed)[0]  # noqa: E731
    else:
        op, kwargs, name = torch.ops.moe_compiler.experts, ExpertsSpec().op_kwargs(), ""
        make = lambda seed: experts_inputs(T, H, I, E, k, torch.bfloat16, ExpertsSpec(), seed=seed)[:5]  # noqa: E731
    dev = [a.cuda() for a in make(0)]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a, **kwargs), dynamic=False)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, *dev)
        code = "\n".join(codes)
        assert code.count(f"torch.ops.moe_compiler.cutlass_grouped_mm{name}.default(") == 2, code[-3000:]
        assert f"torch.ops.moe_compiler.experts{'_quantized' if fmt == 'fp8' else ''}.default(" not in code
        for seed in range(1, 4):
            new = make(seed)
            for i in range(3):  # hidden, ids, weights: the compiled code reads them again
                dev[i].copy_(new[i])
            assert rel_err(compiled(*dev).float(), op(*dev, **kwargs).float()) <= 1e-3
