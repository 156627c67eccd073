"""The pass pipeline: graph -> candidate regions -> proof -> numerical check -> rewrite, per MoE layer.

    for each candidate (an index_add_ loop, a `*Experts` module, a module found from routing data flow):
        match  = recognize(candidate)        experts_*.py: every fact the op needs, or Reject with the reason
        check  = match.verify(gm, real)      verify.py: the region and the op agree on fresh inputs
        edit   = match.rewrite(gm)           all checks and new values first; the edit only edits
        call   = edit()                      one `moe_compiler.experts` (or `experts_unstacked`) call
        then the router feeding the call (router.py) and the shared experts added to it (shared_experts.py),
        each the same steps; a router or shared branch that cannot be proven stays with Inductor.
    last, calls in a graph that needs gradients become `experts_train` (training.py: Z saved for the backward).

Everything goes into the GraphReport (debug.py): log line, dump, tlparse artifact, counters. A recognizer
bug costs speed, never correctness: it is reported as an internal error and the region is left alone; an
edit that fails half-way restores the whole graph as Dynamo gave it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import re
from collections.abc import Callable

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..config import MoECompilerConfig
from ..debug import GraphReport, RegionReport, region_dot
from ..lowering import device
from ..ops.signature import OpCall
from ..stacked_weights import restack_experts, tiles
from . import (
    experts_batched_mm,
    experts_dense_bmm,
    experts_grouped_mm,
    experts_index_add_loop,
)
from .eager_experts import find_eager_experts_fragments
from .experts_common import EAGER_FIX, RegionMatch, recognize_experts
from .fx_utils import backward_slice, example_value, subgraph_module
from .match import EagerExpertsLoop, ExpertsForm, NoExpertGemm, Reject
from .regions import Region, display_name, find_experts_regions, find_routed_regions, module_stack
from .router import recognize_router
from .shared_experts import recognize_shared_experts, why_not_fused
from .training import experts_call_for_training

log = logging.getLogger(__name__)

# One recognizer per GEMM form of a routed-experts region, tried in this order.
EXPERTS_FORMS = (experts_grouped_mm, experts_batched_mm)

ROUTER_ON_CUDA = (
    "with MOE_COMPILER_KERNELS=torch the route op runs on CUDA as several separate torch kernels, more "
    "launches than Inductor's compiled router: the router stays with Inductor (unset it for the one-launch "
    "Triton route kernel)"
)
DISABLED = "fusion disabled (MOE_COMPILER_DISABLE=1 or option moe_compiler.enabled=False)"
SHARED_DISABLED = (
    "shared-experts fusion disabled (MOE_COMPILER_SHARED_EXPERTS=0 or option moe_compiler.shared_experts=False)"
)
SKIPPED = "skipped (verify=False)"
NEEDS_GRAD = (
    "the region's output needs gradients (a training forward, or inference without torch.no_grad()): a train step "
    "through the op is at most slightly faster than Inductor's so far (1.02-1.07x, one H200 run, its peak memory "
    "not yet measured right), so training graphs keep Inductor's MoE (MOE_COMPILER_TRAINING=1 or option "
    "moe_compiler.training=True fuses them; for inference, run under torch.no_grad() / inference_mode)"
)


class InternalError(Reject):
    """A recognizer or rewrite raised something other than Reject: a bug of ours, reported as the reason."""

    def __init__(self, what: str, e: Exception):
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        super().__init__(f"internal error in the {what}: {type(e).__name__}: {first_line}")


class EditFailed(Exception):
    """An edit raised after it began changing the graph: the graph is restored as a whole."""


def _attempt(what: str, fn: Callable):
    """(fn(), None), or (None, the Reject saying why not); a bug becomes an InternalError, logged at debug."""
    try:
        return fn(), None
    except Reject as r:
        return None, r
    except Exception as e:  # noqa: BLE001 - a recognizer bug must cost speed, never correctness
        log.debug("internal error in the %s", what, exc_info=True)
        return None, InternalError(what, e)


def _apply(edit: Callable[[], fx.Node]) -> fx.Node:
    try:
        return edit()
    except Exception as e:
        raise EditFailed(f"{type(e).__name__}: {e}") from e


@dataclasses.dataclass
class Candidate:
    name: str
    cls: str
    size: int  # nodes (or loop steps), for the report
    found_by: str
    recognize: Callable[[], RegionMatch]
    region: Region | None = None  # known before recognizing (not for loops): the dump's before.py


def _recognize_region(region: Region) -> RegionMatch:
    """The routed forms first, then Llama-4's every-expert form."""
    try:
        return recognize_experts(region, EXPERTS_FORMS)
    except NoExpertGemm as routed:
        try:
            return experts_dense_bmm.recognize(region)
        except Reject as dense:
            raise Reject(f"{routed}; and not the dense form: {dense}") from None


# Ops a model's forward calls itself: transformers' quantized experts modules run the experts_quantized op through
# the "fused_moe" experts implementation (integrations/hf_experts.py), so Dynamo hands us the call ready-made.
PLACED_OPS = (torch.ops.moe_compiler.experts_quantized.default,)
PLACED = "experts implementation"


def placed_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The model's own calls of PLACED_OPS, each made to name its overload (Dynamo records the packet)."""
    calls = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if isinstance(n.target, torch._ops.OpOverloadPacket) and getattr(n.target, "default", None) in PLACED_OPS:
            n.target = n.target.default
        if n.target in PLACED_OPS:
            calls.append(n)
    return calls


def find_candidates(gm: fx.GraphModule, report: GraphReport, placed: list[fx.Node] = ()) -> list[Candidate]:
    """Loops first; then `*Experts` modules (a module holding a loop is reported once, as the loop; one whose
    forward called one of our ops is not a candidate); then modules found from routing data flow. Top-k
    feeding expert computations no region holds are reported."""
    loops = experts_index_add_loop.find_index_add_loops(gm)
    looped = [a for c in loops for a in c.adds]
    named = [r for r in find_experts_regions(gm) if not any(r.contains(a) for a in (*looped, *placed))]
    claimed = {n for r in named for n in r.nodes} | backward_slice(looped) | set(placed)
    routed, unplaced = find_routed_regions(gm, claimed)
    candidates = [
        Candidate(c.name, c.cls, len(c.adds), "index_add_ loop", functools.partial(experts_index_add_loop.recognize, c))
        for c in loops
    ]
    for r in (*named, *routed):
        recognize = functools.partial(_recognize_region, r)
        candidates.append(Candidate(r.name, r.cls, len(r.nodes), r.found_by, recognize, r))
    for u in unplaced:
        rr = RegionReport(u.name, "(no region)", len(u.nodes), reason=u.reason, found_by="data flow")
        report.regions.append(rr)
        counters["moe_compiler"]["rejected_experts"] += 1
    return candidates


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


def _fuse_experts(gm, cand: Candidate, rr: RegionReport, real: dict, config: MoECompilerConfig):
    """(the experts call, its match), or None with the reason in the report."""
    if config.dump_dir and cand.region is not None:  # the code and picture only serve the dump
        rr.before, rr.dot = _region_code(gm, cand.region), region_dot(cand.region.nodes)
    match, why = _attempt("matcher (region left alone)", cand.recognize)
    if match is not None:
        region = match.region
        rr.num_nodes = len(region.nodes)
        if config.dump_dir and not rr.before:
            rr.before, rr.dot = _region_code(gm, region), region_dot(region.nodes)
        rr.form, rr.spec, rr.shape = match.form.value, match.describe(), {k: str(v) for k, v in match.shape.items()}

        def check_and_plan():
            if config.dump_dir:
                rr.after = match.after_code(gm)
            if not config.enabled:
                raise Reject(DISABLED)
            if not config.training and _needs_grad(match.output):
                counters["moe_compiler"]["left_for_training"] += 1
                raise Reject(NEEDS_GRAD)
            rr.check = match.verify(gm, real) if config.verify else SKIPPED
            return match.rewrite(gm)

        edit, why = _attempt("matcher (region left alone)", check_and_plan)
    if why is not None:
        rr.reason, rr.eager = str(why), isinstance(why, EagerExpertsLoop)
        counters["moe_compiler"]["rejected_experts"] += 1
        return None
    call = _apply(edit)
    rr.status = "fused"
    counters["moe_compiler"][f"fused_experts_{match.form.value}"] += 1
    return call, match


def _needs_grad(output: fx.Node) -> bool:
    """Whether the region's value takes part in autograd (Dynamo records requires_grad on example values:
    true when grad mode is on and a parameter or input the region reads requires grad)."""
    value = example_value(output)
    return isinstance(value, torch.Tensor) and value.requires_grad


def _fuse_router(gm, call: fx.Node, rr: RegionReport, real: dict, config: MoECompilerConfig) -> None:
    """Replace the router feeding a fused experts call by one route call; a router that cannot be proven
    stays with Inductor (the experts fusion stands either way)."""
    hidden = example_value(OpCall.of(call).tensors.hidden)
    if hidden is not None and hidden.device.type == "cuda" and not device.uses_triton(hidden):
        # Without Triton the route op runs as 5-12 separate torch kernels (softmax, top-k, gather, group
        # masks, ...) where Inductor fuses the router into a few: keep Inductor's. (Counted, and reported.)
        rr.router_status, rr.router_reason = "rejected", ROUTER_ON_CUDA
        counters["moe_compiler"]["router_left_on_cuda"] += 1
        return

    def recognize_check_plan():
        match = recognize_router(call)
        rr.router_form, rr.router_spec = match.form.value, match.describe()
        rr.router_check = match.verify(gm, real) if config.verify else SKIPPED
        return match, match.rewrite(gm)

    result, why = _attempt("router matcher (router left alone)", recognize_check_plan)
    if why is not None:
        rr.router_status, rr.router_reason = "rejected", str(why)
        counters["moe_compiler"]["rejected_router"] += 1
        return
    match, edit = result
    _apply(edit)
    rr.router_status = "fused"
    counters["moe_compiler"][f"fused_router_{match.form.value}"] += 1


def _fuse_shared(gm, call: fx.Node, rr: RegionReport, config: MoECompilerConfig) -> fx.Node:
    """Fold the block's proven shared-experts branch into the experts call (shared_experts.py); a branch that
    cannot be proven or fused stays with Inductor, reported with the reason. Returns the experts call."""
    match, why = _attempt("shared-experts matcher", lambda: recognize_shared_experts(call))
    if why is not None:
        rr.shared_status, rr.shared_reason = "rejected", str(why)
        counters["moe_compiler"]["rejected_shared_experts"] += 1
        return call
    if match is None:
        rr.shared_status = "none"
        return call
    rr.shared_status, rr.shared = "matched", match.describe()
    counters["moe_compiler"][f"shared_experts_{match.form.value}"] += 1

    def check_and_plan():
        reason = why_not_fused(match) if config.shared_experts else SHARED_DISABLED
        if reason is not None:
            raise Reject(reason)
        rr.shared_check = match.verify(gm, {}) if config.verify else SKIPPED
        return match.rewrite(gm)

    edit, why = _attempt("shared-experts rewrite (left to Inductor)", check_and_plan)
    if why is not None:
        rr.shared_reason = str(why)
        return call
    call = _apply(edit)
    rr.shared_status = "fused"
    counters["moe_compiler"][f"fused_shared_experts_{match.form.value}"] += 1
    return call


def _region_code(gm: fx.GraphModule, region: Region) -> str:
    outputs = [o for o in region.outputs if isinstance(example_value(o), torch.Tensor)]
    return subgraph_module(gm, region.nodes, region.inputs, outputs, f"Region_{region.cls}").code


def _replacement_code(gm: fx.GraphModule, before: set[fx.Node], call: fx.Node) -> str:
    """The nodes the edits added (route call, experts call, casts) as code: what after.py shows, with graph
    inputs named after their module path and the routing values after the experts op's arguments."""
    new = [n for n in gm.graph.nodes if n not in before]
    inside = set(new)
    inputs = list(dict.fromkeys(a for n in new for a in n.all_input_nodes if a not in inside))
    module = subgraph_module(gm, new, inputs, [call], "Fused")
    for n in module.graph.nodes:
        if n.op == "placeholder":
            n._rename(re.sub(r"(?:^|(?<=_))(?:l_self_|modules_|parameters_|buffers_)", "", n.name).strip("_") or n.name)
            n.target = n.name
        elif n.target in (torch.ops.moe_compiler.experts.default, torch.ops.moe_compiler.experts_unstacked.default,
                          *PLACED_OPS):
            for key in ("topk_ids", "topk_weights"):
                value = n.kwargs.get(key)
                if isinstance(value, fx.Node) and value.op != "placeholder":
                    value._rename(key)
    module.recompile()
    return module.code


def _plan_restack(match: experts_index_add_loop.LoopMatch, real: dict, report: GraphReport) -> str:
    """Per-expert weights of a fused loop are re-laid out once as views of one stacked tensor (see
    stacked_weights.py) so the op reads them in place. Only planned here: the move happens after
    compile_fx (`restack_planned`), because AOTAutograd fakifies the graph inputs with the metadata
    Dynamo recorded for them (a new storage offset now would contradict it). Returns the report line."""
    if not match.per_expert:
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


def _fuse_placed(gm, placed: list[fx.Node], report: GraphReport, real: dict, config: MoECompilerConfig):
    """Experts calls the model placed itself: reported as fused, then the router and the shared experts around
    each are fused as around a call of ours."""
    for call in placed:
        stack = [(path, cls) for path, cls in module_stack(call) if path]
        path, cls = stack[-1] if stack else (call.name, "(no module)")
        rr = RegionReport(display_name(path), cls, 1, status="fused", found_by=PLACED)
        opcall = OpCall.of(call)
        rr.form, rr.spec = PLACED, opcall.spec.describe()
        rr.check = "the model's experts module called the op itself (experts_implementation='fused_moe')"
        report.regions.append(rr)
        counters["moe_compiler"]["fused_experts_implementation"] += 1
        before = set(gm.graph.nodes) - {call}
        if config.enabled:
            _fuse_router(gm, call, rr, real, config)
            call = _fuse_shared(gm, call, rr, config)
        if config.dump_dir:
            rr.after = _replacement_code(gm, before, call)


def _fuse_all(gm, candidates: list[Candidate], report: GraphReport, real: dict, config: MoECompilerConfig):
    for cand in candidates:
        rr = RegionReport(cand.name, cand.cls, cand.size, found_by=cand.found_by)
        report.regions.append(rr)
        before = set(gm.graph.nodes)
        fused = _fuse_experts(gm, cand, rr, real, config)
        if fused is None:
            continue
        call, match = fused
        if match.form is ExpertsForm.INDEX_ADD_LOOP:
            rr.weights = _plan_restack(match, real, report)
        _fuse_router(gm, call, rr, real, config)
        call = _fuse_shared(gm, call, rr, config)
        if call.target is torch.ops.moe_compiler.experts.default and _needs_grad(match.output):
            call = _apply(functools.partial(experts_call_for_training, gm, call))
        if config.dump_dir:
            rr.after = _replacement_code(gm, before, call)


def _snapshot(graph: fx.Graph) -> fx.Graph:
    """A copy to restore if an edit fails half-way. Nodes carry attributes besides `meta` that later stages
    read (Dynamo's `_dynamo_source` on placeholders): copied over too."""
    snapshot = copy.deepcopy(graph)
    for old, new in zip(graph.nodes, snapshot.nodes):
        for key, value in vars(old).items():
            vars(new).setdefault(key, value)
    return snapshot


# Dynamo traces a checkpointed layer (model.gradient_checkpointing_enable(), torch.utils.checkpoint without
# reentrancy) into a subgraph module called through this higher-order op; its MoE blocks live in that subgraph.
CHECKPOINT_HOPS = (torch.ops.higher_order.tag_activation_checkpoint,)


def checkpoint_bodies(gm: fx.GraphModule) -> list[tuple[fx.GraphModule, dict]]:
    """(body, {body placeholder: the parent graph's argument node}) of each checkpointed subgraph, once per body
    module (Dynamo may call one body for several identical layers: rewriting it once serves every call)."""
    bodies, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CHECKPOINT_HOPS or not node.args:
            continue
        fn = node.args[0]
        body = getattr(gm, fn.target, None) if isinstance(fn, fx.Node) and fn.op == "get_attr" else None
        if isinstance(body, fx.GraphModule) and id(body) not in seen:
            seen.add(id(body))
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            bodies.append((body, dict(zip(placeholders, node.args[1:]))))
    return bodies


def _fuse_graph(gm: fx.GraphModule, real: dict, report: GraphReport, config: MoECompilerConfig) -> None:
    """Match and rewrite the MoE regions of one graph (the top-level one or a checkpointed body), adding them to
    the report; an edit that fails half-way leaves this graph as it was."""
    first = len(report.regions)
    placed = placed_calls(gm)
    candidates = find_candidates(gm, report, placed)
    snapshot = _snapshot(gm.graph) if (candidates or placed) and config.enabled else None
    try:
        _fuse_placed(gm, placed, report, real, config)
        _fuse_all(gm, candidates, report, real, config)
    except EditFailed as e:
        gm.graph = snapshot
        report.restack.clear()
        log.warning("moe_compiler: a graph edit failed half-way (%s): the whole graph is left unfused", e)
        mine = report.regions[first:]
        reported = {rr.name for rr in mine}
        mine += [RegionReport(c.name, c.cls, c.size, found_by=c.found_by) for c in candidates if c.name not in reported]
        for rr in mine:
            rr.status, rr.reason = "rejected", f"internal error while editing the graph (whole graph left unfused): {e}"
        report.regions[first:] = mine
        counters["moe_compiler"]["edit_failed"] += 1
    if any(rr.status == "fused" for rr in report.regions[first:]):
        gm.graph.lint()
        gm.recompile()


def fuse_moe_regions(gm: fx.GraphModule, example_inputs, config: MoECompilerConfig) -> GraphReport:
    report = GraphReport(num_nodes=len(gm.graph.nodes))
    counters["moe_compiler"]["graphs"] += 1
    real = _real_inputs(gm, example_inputs)
    _fuse_graph(gm, real, report, config)
    for body, args in checkpoint_bodies(gm):
        body_real = {ph: real[a] for ph, a in args.items() if isinstance(a, fx.Node) and a in real}
        _fuse_graph(body, body_real, report, config)
        counters["moe_compiler"]["checkpointed_graphs"] += 1
    if not report.regions and (fragments := find_eager_experts_fragments(gm)):
        rr = RegionReport("<eager experts loop, graph break>", "(no module stack in fragments)", len(fragments),
                          reason=EAGER_FIX, eager=True)
        rr.before = "\n".join(
            f"{n.format_node()}\n    # {(n.meta.get('stack_trace') or '').strip().splitlines()[-1:]}" for n in fragments
        )
        report.regions.append(rr)
        counters["moe_compiler"]["eager_experts_fragments"] += 1
    return report
