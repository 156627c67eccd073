"""Recognizer for Llama-4's experts: every expert on every token, the input scaled by the router score.

Mirrors Llama4TextMoe / Llama4TextExperts / Llama4Router (models/llama4/modeling_llama4.py, transformers
5.17-5.23):

    vals, ids  = topk(logits, k, dim=1)
    scores     = sigmoid(full_like(logits, -inf).scatter_(1, ids, vals).float()).to(dtype)   # [T, E], 0 off top-k
    routed_in  = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)                        # [E*T, H]
    h          = bmm(routed_in.view(E, -1, H), W_gate_up)        # W_gate_up [E, H, 2I]  (the Experts module)
    y          = bmm(act(gate) * up, W_down).view(-1, H)         # W_down [E, I, H]
    out        = y.reshape(E, -1, H).sum(dim=0)                  # [T, H]

An expert whose score is 0 gets a zero input, and a gated MLP without biases maps 0 to 0, so only the k
chosen experts contribute: out[t] = sum_j expert_{ids[t,j]}(sigmoid(vals[t,j]) * x[t]), which is
`moe_compiler.experts` with scale_input=True on [E, H, 2I] weights: k/E of the dense block's GEMM work
(1/16 on Llama-4 Scout, 1/128 on Maverick). The region found by module boundary is the Experts module;
the facts the op needs live around it in the MoE block, so this recognizer proves those too, then the
numerical check runs the whole block (router scores to the sum) against the op.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from ..ops.signature import ExpertsTensors, OpCall
from ..spec import ExpertsSpec
from . import verify
from .experts_common import RegionMatch
from .fx_utils import (
    arg,
    backward_slice,
    call_code,
    cast_like,
    dims,
    example_value,
    follow,
    in_graph_order,
    is_param,
    node_meta,
    op_name,
    strip_casts,
    subgraph_module,
)
from .gated_activation import recognize_gated_activation
from .match import Edit, ExpertsForm, Reject
from .regions import Region
from .rewrite import erase_unused

FORM = ExpertsForm.DENSE_BMM


@dataclasses.dataclass
class DenseMatch(RegionMatch):
    form: ExpertsForm
    spec: ExpertsSpec
    region: Region  # the block's nodes from the scores to the sum (what the op replaces) and their inputs
    output: fx.Node  # the sum over experts, [T, H]
    shape: dict
    hidden: fx.Node  # x [T, H], before the repeat
    logits: fx.Node  # router logits [T, E]
    topk_ids: fx.Node  # getitem(topk, 1)
    topk_vals: fx.Node  # getitem(topk, 0)
    weight_dtype: torch.dtype  # the dtype of the scores the block multiplied with
    w_gate_up: fx.Node
    w_down: fx.Node

    def call(self, weights: fx.Node | None = None) -> OpCall:
        """The replacing call; its router weights `weights` = sigmoid(top-k values), written by the rewrite."""
        tensors = ExpertsTensors(self.hidden, self.topk_ids, weights, self.w_gate_up, self.w_down)
        return OpCall(torch.ops.moe_compiler.experts.default, tensors, self.spec)

    def verify(self, gm: fx.GraphModule, real: dict) -> str:
        return _verify(gm, self, real)

    def rewrite(self, gm: fx.GraphModule) -> Edit:
        return _rewrite(gm, self)

    def after_code(self, gm: fx.GraphModule) -> str:
        def build(graph, ph):
            w = graph.call_function(torch.sigmoid, (graph.call_method("float", (ph(self.topk_vals),)),))
            return graph.call_function(self.call().op, (), fx.node.map_arg(self.call(w).kwargs(), ph))

        return call_code(gm, build, "FusedDense")


def recognize(region: Region) -> DenseMatch:
    # 1. inside the Experts module: bmm(view(x, E, -1, H), W1) -> act(gate) * up -> bmm(., W2) -> view(-1, H).
    bmms = [n for n in region.nodes if op_name(n) == "bmm"]
    if len(bmms) != 2:
        raise Reject(f"dense experts: expected 2 bmm calls, found {len(bmms)}")
    up_mm, down_mm = bmms
    w1, w2 = up_mm.args[1], down_mm.args[1]
    if not (is_param(w1, 3) and is_param(w2, 3)):
        raise Reject("dense experts: the bmm weights are not 3-D parameters read in place")
    E, H, two_i = dims(w1)
    if dims(w2) != (E, two_i // 2, H):
        raise Reject(f"dense experts: weights {dims(w1)} and {dims(w2)}, expected [E, H, 2I] and [E, I, H]")
    view_in = up_mm.args[0]
    if op_name(view_in) not in ("view", "reshape") or dims(view_in)[0] != E or dims(view_in)[2] != H:
        raise Reject(
            f"dense experts: the first bmm reads `{view_in.name}` {dims(view_in)}, expected an [E, T, H] view of the "
            "input rows"
        )
    gated = recognize_gated_activation(down_mm.args[0], up_mm)
    outs = [o for o in region.outputs if isinstance(example_value(o), torch.Tensor)]
    if len(outs) != 1 or follow(outs[0], through={"view", "reshape"}) is not down_mm:
        raise Reject("dense experts: the region's output is not the second bmm's rows")
    for n in region.nodes:
        if op_name(n) in ("add", "add_") and any(a in (up_mm, down_mm) for a in n.args):
            raise Reject("dense experts: a bias is added to an expert GEMM (f(0) != 0: every expert would count)")

    # 2. the block sums the E expert outputs of each token.
    (reshape,) = outs[0].users if len(outs[0].users) == 1 else (None,)
    total = next(iter(reshape.users)) if reshape is not None and len(reshape.users) == 1 else None
    if (
        op_name(reshape) not in ("view", "reshape") or dims(reshape)[0] != E or op_name(total) != "sum"
        or arg(total, 1, "dim") not in (0, (0,), [0])
    ):
        raise Reject("dense experts: the expert outputs are not summed over the experts (reshape(E, -1, H).sum(0))")

    # 3. routed rows = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1).
    routed_in = view_in.args[0]
    if op_name(routed_in) != "mul":
        raise Reject(f"dense experts: the input rows `{routed_in.name}` are not scaled rows (x.repeat(E, 1) * scores)")
    rep, col = routed_in.args
    if op_name(rep) != "repeat":
        rep, col = col, rep
    if op_name(rep) != "repeat" or list(rep.args[1:]) != [E, 1]:
        raise Reject("dense experts: the input rows are not x.repeat(E, 1)")
    hidden = rep.args[0]
    T = dims(hidden)[0]
    col_t = col
    if (
        op_name(col_t) not in ("reshape", "view") or op_name(col_t.args[0]) != "transpose"
        or sorted(col_t.args[0].args[1:]) != [0, 1]
    ):
        raise Reject("dense experts: the row scales are not scores.transpose(0, 1).reshape(-1, 1)")
    scores = col_t.args[0].args[0]

    # 4. scores = sigmoid(full(-inf).scatter_(1, ids, vals)): sigmoid of the top-k values, 0 elsewhere.
    sig = strip_casts(scores)
    if op_name(sig) != "sigmoid":
        raise Reject(f"dense experts: the scores come from `{sig.name}` ({op_name(sig)}), expected a sigmoid")
    scat = strip_casts(sig.args[0])
    if op_name(scat) not in ("scatter_", "scatter") or arg(scat, 1, "dim") not in (1, -1):
        raise Reject("dense experts: the scores are not a scatter of the top-k values")
    base, ids, vals = scat.args[0], arg(scat, 2, "index"), arg(scat, 3, "src")
    if op_name(base) != "full_like" or not (isinstance(base.args[1], float) and base.args[1] == -math.inf):
        raise Reject("dense experts: the scattered scores do not start from -inf (unchosen experts must score 0)")
    logits = base.args[0]
    ids, vals = strip_casts(ids), strip_casts(vals)
    same_topk = op_name(ids) == op_name(vals) == "getitem" and ids.args[0] is vals.args[0]
    if not (same_topk and (ids.args[1], vals.args[1]) == (1, 0)):
        raise Reject("dense experts: the scattered values and ids are not the two outputs of one top-k")
    topk = ids.args[0]
    if (
        op_name(topk) != "topk" or strip_casts(topk.args[0]) is not strip_casts(logits)
        or arg(topk, 2, "dim", -1) not in (1, -1) or not arg(topk, 3, "largest", True)
    ):
        raise Reject("dense experts: the ids do not come from a top-k of the router logits over the experts")
    if dims(logits) != (T, E):
        raise Reject(f"dense experts: router logits {dims(logits)}, expected [T={T}, E={E}]")

    nodes, inputs = in_graph_order(backward_slice([total], stop={hidden, logits, ids, vals}), total.graph)
    block = Region(region.path, region.cls, nodes, inputs, [total], region.found_by)
    spec = ExpertsSpec(gated.activation, gated.layout, True, gated.swiglu_alpha, gated.swiglu_limit, scale_input=True)
    shape = {"T": T, "H": H, "E": E, "I": two_i // 2, "k": dims(ids)[1]}
    return DenseMatch(FORM, spec, block, total, shape, hidden, logits, ids, vals, example_value(scores).dtype, w1, w2)


def _verify(gm: fx.GraphModule, match: DenseMatch, real: dict) -> str:
    """Run the block (scores to the sum) and the op on fresh x and tie-free logits, the model's weights."""
    region = match.region
    if verify.on_meta(region.inputs):
        return verify.META_SKIP
    sub = subgraph_module(gm, region.nodes, region.inputs, [match.output], "DenseBlock")
    gen = torch.Generator().manual_seed(0)
    values = {}
    for node in region.inputs:
        ev = example_value(node)
        if node is match.logits:
            values[node] = verify.router_logits([verify.hint(s) for s in ev.shape], ev.dtype, gen, ev.device)
        elif not isinstance(ev, torch.Tensor):
            values[node] = verify.hint(ev)
        elif node in real:
            values[node] = real[node]
        elif node is match.hidden:
            values[node] = torch.randn([verify.hint(s) for s in ev.shape], generator=gen).to(ev.device, ev.dtype)
        elif node not in (match.topk_ids, match.topk_vals):
            raise Reject(f"numerical check: cannot synthesize block input `{node.name}`")
    logits = values.get(match.logits)
    if logits is None:
        raise Reject("numerical check: the block does not read the router logits")
    k = match.shape["k"]
    vals, ids = torch.topk(logits, k, dim=-1)
    values[match.topk_ids], values[match.topk_vals] = ids, vals

    def both():
        want = sub(*[values[i] for i in region.inputs])
        w = torch.sigmoid(vals.float()).to(match.weight_dtype)
        call = match.call(w)
        return want, call.op(**fx.node.map_arg(call.kwargs(), values.__getitem__))

    want, got = verify.run("numerical check", both)
    err, tol = verify.rel_err(got, want), verify.TOLERANCE[values[match.hidden].dtype]
    if not err <= tol:
        raise Reject(f"numerical check failed: dense block vs op relative error {err:.2e} > {tol:.0e}")
    return (f"rel err {err:.1e} <= {tol:.0e} (T={want.shape[0]}, only the top-{k} of {match.shape['E']} experts "
            "computed)")


def _rewrite(gm: fx.GraphModule, match: DenseMatch) -> Edit:
    """weights = sigmoid(top-k values); out = experts(x, ids, weights, ..., scale_input=True) replaces the sum."""
    vals, output = match.topk_vals, match.output
    with example_value(output).fake_mode:  # every new node's value first: a failure leaves the graph untouched
        float_value = example_value(vals).float()
        w_value = torch.sigmoid(float_value)
        w_cast = w_value.to(match.weight_dtype)
        fake = fx.node.map_arg(match.call(vals).kwargs(), example_value)
        value = match.call().op(**{**fake, "topk_weights": w_cast})
        out_value = value.to(example_value(output).dtype)

    def edit() -> fx.Node:
        graph = gm.graph
        with graph.inserting_before(output):
            f = graph.call_method("float", (vals,))
            f.meta = node_meta(vals, float_value)
            w = graph.call_function(torch.sigmoid, (f,))
            w.meta = node_meta(vals, w_value)
            w = cast_like(graph, w, w_cast, vals)
            call = match.call(w)
            new = graph.call_function(call.op, (), call.kwargs())
            new.meta = node_meta(output, value)
            result = cast_like(graph, new, out_value, output)
        output.replace_all_uses_with(result)
        erase_unused(graph, match.region.nodes)
        return new

    return edit
