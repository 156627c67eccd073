"""Graph passes: find MoE regions in a Dynamo graph, prove what they compute, rewrite them to our ops.

Entry point: `fuse_moe_regions(gm, example_inputs, config) -> GraphReport`. See README.md beside this
file for the invariants every pass keeps.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .. import lowering
from ..config import MoECompilerConfig
from ..debug import GraphReport, RegionReport, region_dot
from ..stacked_weights import restack_experts, tiles
from . import experts_batched_mm, experts_dense_bmm, experts_grouped_mm, experts_index_add_loop, shared_experts
from .eager_experts import find_eager_experts_fragments
from .experts_common import EAGER_FIX, recognize_experts
from .experts_index_add_loop import find_index_add_loops
from .regions import Region, find_experts_regions, region_module
from .reject import Reject
from .rewrite import rewrite_experts, rewrite_router
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


def _after_code(gm: fx.GraphModule, op, args) -> str:
    """The replacement `op(*args)` as code: one placeholder per graph value the call reads."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def placeholder(n: fx.Node) -> fx.Node:
        if n not in env:
            env[n] = graph.placeholder(n.name)
        return env[n]

    graph.output(graph.call_function(op, fx.node.map_arg(args, placeholder)))
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


def _fuse_shared_experts(gm: fx.GraphModule, experts_call: fx.Node, rr: RegionReport, config: MoECompilerConfig) -> fx.Node:
    """Fold the block's proven shared-experts branch into the experts call (shared_experts.py); a branch
    that cannot be proven or fused stays with Inductor, reported with the reason. Returns the call."""
    try:
        match = recognize_shared_experts(experts_call)
    except Reject as r:
        rr.shared_status, rr.shared_reason = "rejected", str(r)
        counters["moe_compiler"]["rejected_shared_experts"] += 1
        return experts_call
    except Exception as e:  # noqa: BLE001 - nothing is rewritten: a bug here only costs the report line
        log.debug("internal error while matching the shared experts of %s", rr.name, exc_info=True)
        rr.shared_status, rr.shared_reason = "rejected", _internal_error("shared-experts matcher", e)
        counters["moe_compiler"]["rejected_shared_experts"] += 1
        return experts_call
    if match is None:
        rr.shared_status = "none"
        return experts_call
    rr.shared_status, rr.shared = "matched", match.describe()
    counters["moe_compiler"][f"shared_experts_{match.form}"] += 1
    try:
        reason = shared_experts.why_not_fused(experts_call, match) if config.shared_experts else (
            "shared-experts fusion disabled (MOE_COMPILER_SHARED_EXPERTS=0 or option moe_compiler.shared_experts=False)")
        if reason is not None:
            rr.shared_reason = reason
            return experts_call
        call = shared_experts.rewrite(gm, experts_call, match)
    except Exception as e:  # noqa: BLE001 - the fake call runs before any edit: a failure leaves the graph as it was
        log.debug("internal error while fusing the shared experts of %s", rr.name, exc_info=True)
        rr.shared_reason = _internal_error("shared-experts rewrite (left to Inductor)", e)
        return experts_call
    rr.shared_status = "fused"
    counters["moe_compiler"][f"fused_shared_experts_{match.form}"] += 1
    return call


def _plan_restack(match, real: dict, report: GraphReport) -> str:
    """Per-expert weights of a fused loop are re-laid out once as views of one stacked tensor (see
    stacked_weights.py) so the op reads them in place. Only planned here: the move happens after
    compile_fx (`restack_planned`), because AOTAutograd fakifies the graph inputs with the metadata
    Dynamo recorded for them (a new storage offset now would contradict it). Returns the report line."""
    if not getattr(match, "per_expert", False):
        return "stacked parameters, read in place"
    parts = match.weight_parts()
    if not all(n in real for group in parts for n in group):
        return "per-expert parameters (not real tensors at compile time): each call concatenates them"
    groups = [[real[n] for n in group] for group in parts]
    report.restack.extend(g for g in groups if not tiles(g))
    E, I, H = match.shape["E"], match.shape["I"], match.shape["H"]
    return (
        f"per-expert parameters, re-laid out once (after compiling) as views of one [E={E}, 2I={2 * I}, H={H}] "
        f"and one [E, H, I] tensor: the same Parameter objects, no copy kept; read in place"
    )


def restack_planned(report: GraphReport) -> None:
    """Carry out the re-layouts `fuse_moe_regions` planned (call after compile_fx)."""
    for group in report.restack:
        if restack_experts(group):
            counters["moe_compiler"]["restacked_weight_groups"] += 1
    report.restack.clear()


def _fuse_one(gm: fx.GraphModule, rr: RegionReport, region, recognize, real: dict, config: MoECompilerConfig, report: GraphReport) -> None:
    """Prove, check and rewrite one candidate; `region` is None for a loop (known once recognized)."""
    try:
        if config.dump_dir and region is not None:  # the code and picture only serve the dump
            rr.before, rr.dot = region_module(gm, region).code, region_dot(region.nodes)
        region, match = recognize()
        if config.dump_dir and not rr.before:
            rr.before, rr.dot = region_module(gm, region).code, region_dot(region.nodes)
        rr.num_nodes = len(region.nodes)
        form = match.form
        rr.form, rr.spec, rr.shape = form, match.spec.describe(), {k: str(v) for k, v in match.shape.items()}
        if not config.enabled:
            raise Reject("fusion disabled (MOE_COMPILER_DISABLE=1 or option moe_compiler.enabled=False)")
        if not config.verify:
            rr.check = "skipped (verify=False)"
        elif form == experts_dense_bmm.FORM:
            rr.check = experts_dense_bmm.verify(gm, match, real)
        else:
            rr.check = verify_numerically(gm, region, match, real)
        if config.dump_dir:
            rr.after = experts_dense_bmm.after_code(gm, match) if form == experts_dense_bmm.FORM else _after_code(gm, match.op, match.op_args())
        if form == experts_dense_bmm.FORM:
            call = experts_dense_bmm.rewrite(gm, match)
        elif form == experts_index_add_loop.FORM:
            call = experts_index_add_loop.rewrite(gm, match)
            rr.weights = _plan_restack(match, real, report)
        else:
            call = rewrite_experts(gm, region, match)
        rr.status = "fused"
        counters["moe_compiler"][f"fused_experts_{form}"] += 1
        _fuse_router(gm, call, rr, real, config)
        call = _fuse_shared_experts(gm, call, rr, config)
        if config.dump_dir and rr.shared_status == "fused":
            rr.after = _after_code(gm, call.target, call.args)
    except Reject as r:
        rr.reason = str(r)
        counters["moe_compiler"]["rejected_experts"] += 1
    except Exception as e:  # noqa: BLE001 - a recognizer bug must cost speed, never correctness
        log.debug("internal error while matching %s", rr.name, exc_info=True)
        rr.reason = _internal_error("matcher (region left alone)", e)
        counters["moe_compiler"]["rejected_experts"] += 1


def _loop_region(candidate):
    match = experts_index_add_loop.recognize(candidate)
    return Region(candidate.name, candidate.cls, match.nodes, match.inputs, [match.output]), match


def fuse_moe_regions(gm: fx.GraphModule, example_inputs, config: MoECompilerConfig) -> GraphReport:
    report = GraphReport(num_nodes=len(gm.graph.nodes))
    counters["moe_compiler"]["graphs"] += 1
    loops = find_index_add_loops(gm)
    looped = [a for c in loops for a in c.adds]
    # A hand-written `*Experts` module holding the loop is reported once, as the loop.
    regions = [r for r in find_experts_regions(gm) if not any(r.contains(a) for a in looped)]
    real = _real_inputs(gm, example_inputs) if regions or loops else {}
    for candidate in loops:
        rr = RegionReport(candidate.name, candidate.cls, len(candidate.adds))
        report.regions.append(rr)
        _fuse_one(gm, rr, None, functools.partial(_loop_region, candidate), real, config, report)
    for region in regions:
        rr = RegionReport(region.name, region.cls, len(region.nodes))
        report.regions.append(rr)
        _fuse_one(gm, rr, region, functools.partial(lambda r: (r, _recognize(r)), region), real, config, report)
    if not regions and not loops and (fragments := find_eager_experts_fragments(gm)):
        rr = RegionReport("<eager experts loop, graph break>", "(no module stack in fragments)", len(fragments), reason=EAGER_FIX)
        rr.before = "\n".join(f"{n.format_node()}\n    # {(n.meta.get('stack_trace') or '').strip().splitlines()[-1:]}" for n in fragments)
        report.regions.append(rr)
        counters["moe_compiler"]["eager_experts_fragments"] += 1
    if report.fused:
        gm.graph.lint()
        gm.recompile()
    return report
