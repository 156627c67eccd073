"""Graph passes: find MoE regions in a Dynamo graph, prove what they compute, rewrite them to our ops.

Entry point: `fuse_moe_regions(gm, example_inputs, config) -> GraphReport`. See README.md beside this
file for the invariants every pass keeps.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .. import lowering
from ..config import MoECompilerConfig
from ..debug import GraphReport, RegionReport, region_dot
from . import experts_batched_mm, experts_dense_bmm, experts_grouped_mm
from .eager_experts import find_eager_experts_fragments
from .experts_common import EAGER_FIX, recognize_experts
from .regions import find_experts_regions, region_module
from .reject import Reject
from .rewrite import replacement_args, rewrite_experts, rewrite_router
from .router import recognize_router
from .shared_experts import recognize_shared_experts
from .verify import verify_numerically, verify_router

log = logging.getLogger(__name__)

ROUTER_ON_CUDA = (
    "with MOE_COMPILER_KERNELS=torch the route op runs on CUDA as several separate torch kernels, more "
    "launches than Inductor's compiled router: the router stays with Inductor (unset it for the one-launch "
    "Triton route kernel)"
)

def _internal_error(what: str, e: Exception) -> str:
    """A matcher bug's report line: the first line of the error (the traceback is in the debug log)."""
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    return f"internal error in the {what}: {type(e).__name__}: {first_line}"


# One recognizer per source form, tried in this order.
EXPERTS_FORMS = (experts_grouped_mm, experts_batched_mm)


def _real_inputs(gm: fx.GraphModule, example_inputs) -> dict:
    """Placeholder / get_attr node -> the real tensor the compiled graph will receive (read only)."""
    real = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            real[node] = value
    for node in gm.graph.find_nodes(op="get_attr"):
        value = getattr(gm, node.target, None)
        if isinstance(value, torch.Tensor):
            real[node] = value
    return real


def _after_code(gm: fx.GraphModule, match) -> str:
    graph = fx.Graph()
    env = {}
    for a in replacement_args(match):
        if isinstance(a, fx.Node) and a not in env:
            env[a] = graph.placeholder(a.name)
    args = tuple(env.get(a, a) if isinstance(a, fx.Node) else a for a in replacement_args(match))
    graph.output(graph.call_function(torch.ops.moe_compiler.experts.default, args))
    return fx.GraphModule(gm, graph, class_name="Fused").code


def _recognize(region):
    """The experts match of a region: the routed forms first, then Llama-4's every-expert form."""
    try:
        return recognize_experts(region, EXPERTS_FORMS)
    except Reject as routed:
        if not str(routed).startswith("no expert GEMM found"):
            raise
        try:
            return experts_dense_bmm.recognize(region)
        except Reject as dense:
            raise Reject(f"{routed}; and not the dense form: {dense}") from None


def _fuse_router(gm: fx.GraphModule, experts_call: fx.Node, rr: RegionReport, real: dict, config: MoECompilerConfig):
    """Replace the router feeding a fused experts call by one route call; a router that cannot be proven
    stays with Inductor (the experts fusion stands either way)."""
    hidden = experts_call.args[0].meta.get("example_value")
    if hidden is not None and hidden.device.type == "cuda" and not lowering.uses_triton(hidden):
        # Without Triton the route op runs as 5-12 separate torch kernels (softmax, top-k, gather, group
        # masks, ...) where Inductor fuses the router into a few: keep Inductor's. (Counted, and reported.)
        rr.router_status, rr.router_reason = "rejected", ROUTER_ON_CUDA
        counters["moe_compiler"]["router_left_on_cuda"] += 1
        return
    try:
        match = recognize_router(experts_call)
        rr.router_form, rr.router_spec = match.form, match.spec.describe()
        rr.router_check = verify_router(gm, match, real) if config.verify else "skipped (verify=False)"
        rewrite_router(gm, match, experts_call)
        rr.router_status = "fused"
        counters["moe_compiler"][f"fused_router_{match.form}"] += 1
    except Reject as r:
        rr.router_status, rr.router_reason = "rejected", str(r)
        counters["moe_compiler"]["rejected_router"] += 1
    except Exception as e:  # noqa: BLE001 - as for experts: a bug costs speed, never correctness
        rr.router_status = "rejected"
        log.debug("internal error while matching the router of %s", rr.name, exc_info=True)
        rr.router_reason = _internal_error("router matcher (router left alone)", e)
        counters["moe_compiler"]["rejected_router"] += 1


def _match_shared_experts(experts_call: fx.Node, rr: RegionReport):
    """Account for the block's shared-experts branch (reported; Inductor computes it, see shared_experts.py)."""
    try:
        match = recognize_shared_experts(experts_call)
    except Reject as r:
        rr.shared_status, rr.shared_reason = "rejected", str(r)
        counters["moe_compiler"]["rejected_shared_experts"] += 1
        return
    except Exception as e:  # noqa: BLE001 - nothing is rewritten: a bug here only costs the report line
        log.debug("internal error while matching the shared experts of %s", rr.name, exc_info=True)
        rr.shared_status, rr.shared_reason = "rejected", _internal_error("shared-experts matcher", e)
        counters["moe_compiler"]["rejected_shared_experts"] += 1
        return
    if match is None:
        rr.shared_status = "none"
        return
    rr.shared_status, rr.shared = "matched", match.describe()
    counters["moe_compiler"][f"shared_experts_{match.form}"] += 1


def fuse_moe_regions(gm: fx.GraphModule, example_inputs, config: MoECompilerConfig) -> GraphReport:
    report = GraphReport(num_nodes=len(gm.graph.nodes))
    counters["moe_compiler"]["graphs"] += 1
    regions = find_experts_regions(gm)
    real = _real_inputs(gm, example_inputs) if regions else {}
    for region in regions:
        rr = RegionReport(region.name, region.cls, len(region.nodes))
        report.regions.append(rr)
        try:
            if config.dump_dir:  # the code and picture only serve the dump: skip them otherwise
                rr.before = region_module(gm, region).code
                rr.dot = region_dot(region.nodes)
            match = _recognize(region)
            dense = match.form == experts_dense_bmm.FORM
            rr.form, rr.spec, rr.shape = match.form, match.spec.describe(), {k: str(v) for k, v in match.shape.items()}
            if not config.enabled:
                raise Reject("fusion disabled (MOE_COMPILER_DISABLE=1 or option moe_compiler.enabled=False)")
            if config.verify:
                rr.check = experts_dense_bmm.verify(gm, match, real) if dense else verify_numerically(gm, region, match, real)
            else:
                rr.check = "skipped (verify=False)"
            if config.dump_dir:
                rr.after = experts_dense_bmm.after_code(gm, match) if dense else _after_code(gm, match)
            call = experts_dense_bmm.rewrite(gm, match) if dense else rewrite_experts(gm, region, match)
            rr.status = "fused"
            counters["moe_compiler"][f"fused_experts_{match.form}"] += 1
            _fuse_router(gm, call, rr, real, config)
            _match_shared_experts(call, rr)
        except Reject as r:
            rr.reason = str(r)
            counters["moe_compiler"]["rejected_experts"] += 1
        except Exception as e:  # noqa: BLE001 - a recognizer bug must cost speed, never correctness
            log.debug("internal error while matching %s", region.name, exc_info=True)
            rr.reason = _internal_error("matcher (region left alone)", e)
            counters["moe_compiler"]["rejected_experts"] += 1
    if not regions and (fragments := find_eager_experts_fragments(gm)):
        rr = RegionReport("<eager experts loop, graph break>", "(no module stack in fragments)", len(fragments), reason=EAGER_FIX)
        rr.before = "\n".join(f"{n.format_node()}\n    # {(n.meta.get('stack_trace') or '').strip().splitlines()[-1:]}" for n in fragments)
        report.regions.append(rr)
        counters["moe_compiler"]["eager_experts_fragments"] += 1
    if report.fused:
        gm.graph.lint()
        gm.recompile()
    return report
