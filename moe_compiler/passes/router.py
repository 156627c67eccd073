"""The router recognizer: proves that the nodes between a router's logits and a fused experts call's
(top-k ids, top-k weights) compute `moe_compiler.route`, and extracts its RouterSpec.

Mirrors the routers of transformers 5.17-5.25 (`*TopKRouter` / `*TopkRouter` / `*Gate` modules), which
come in these op sequences (X = logits, possibly cast to fp32 first):

    softmax(X) -> topk -> values [-> / sum] [-> * c]              Qwen2/3/3.5/Next, Mixtral, OLMoE, FlexOlmo,
                                                                   Jamba, MiniMax, Hunyuan, DeepSeek-V2 (greedy)
    softmax(X) (+ bias) -> topk -> gather(softmax) [/ sum]        Ernie-4.5 (bias from its `Statics` module)
    sigmoid(X) + bias -> group-limited topk -> gather(sigmoid)    DeepSeek-V3, Kimi-K2(.5), GLM4-MoE, dots1
        [/ (sum + 1e-20)] [* routed_scaling_factor]                 (/ sum: MiniMax-M2, Laguna, Step-3.7)
    sqrt(softplus(X)) + bias -> topk -> gather / (sum + 1e-20) * c  DeepSeek-V4 (its top-k layers)
    topk(X) -> softmax over the k values                          GPT-OSS (router bias inside X), Granite-MoE
    topk(X) -> sigmoid of each value                              Llama-4 (after the dense_bmm experts rewrite)
    k rounds of max(untaken X) -> softmax of the round's near-ties PhiMoE (sparsemixer, eval mode), ids and
        -> gather at the round's id; concatenated               weights concatenated over the rounds

Facts established from the graph, each with a reason when it fails:
  1. the ids are output 1 of a top-k (largest, last dim) whose input (the "choice") is the logits, the
     scores, scores + a per-expert bias, or that choice with all but the best groups masked;
  2. the scores are softmax / sigmoid / sqrt(softplus) of the logits, computed in fp32, or in bf16 / fp16 with
     every op of the router in that dtype (DeepSeek-V4 and Mistral-4 do not upcast): the op then rounds after
     each op as eager does (RouterSpec.score_dtype), so top-k near-ties break on eager's values; an upcast
     midway is refused - except after a top-k of the logits, where only the weights' rounding is at stake;
  3. the weights are the same top-k's values (when the choice is the scores), or the scores gathered at
     the ids, or softmax of the top-k values of the logits; then optionally divided by their sum over k
     (plus an epsilon, RouterSpec.renorm_eps; a clamp only where it never bites), then optionally multiplied
     by a constant;
  4. group-limited selection: the choice viewed as [T, n_group, E / n_group], group scores = sum of the
     top-2 or max per group, top-topk_group groups kept, the rest filled with a constant;
  5. the router reads nothing but the logits, parameters and sizes, and its ids / weights feed only the
     experts call.
How the group mask is built (zeros / scatter / expand / invert) is left to the numerical check
(verify.py), as the sort plumbing of the experts region is.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from ..ops.signature import OpCall, RouteTensors
from ..spec import GroupScore, RouteOrder, RouterSpec, Scoring, WeightsDtype
from . import verify
from .fx_utils import (
    arg,
    backward_slice,
    cast_like,
    dims,
    dtype_of,
    ep_remap,
    example_value,
    in_graph_order,
    is_in_place,
    node_meta,
    op_call_code,
    op_name,
    strip_casts,
)
from .match import Edit, Match, Reject, RouterForm
from .rewrite import erase_unused


@dataclasses.dataclass
class RouterMatch(Match):
    form: RouterForm
    spec: RouterSpec
    logits: fx.Node  # [T, E] router logits (before any cast to fp32)
    correction_bias: fx.Node | None  # [E]
    ids: fx.Node  # the experts call's top-k ids argument
    weights: fx.Node  # the experts call's top-k weights argument
    experts_call: fx.Node  # the fused experts call the router feeds
    # what reads ids / weights: the experts call, or expert parallelism's remap in front of it (_ep_remap)
    readers: tuple[fx.Node, ...] = ()
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)  # between the logits and (ids, weights)
    inputs: list[fx.Node] = dataclasses.field(default_factory=list)  # what those read: logits, parameters, sizes

    def call(self) -> OpCall:
        return OpCall(torch.ops.moe_compiler.route.default, RouteTensors(self.logits, self.correction_bias), self.spec)

    def describe(self) -> str:
        return self.spec.describe()

    def verify(self, gm: fx.GraphModule, real: dict) -> str:
        return verify.router(gm, self, real, lambda node: dtype_template_only(node, self.nodes))

    def rewrite(self, gm: fx.GraphModule) -> Edit:
        return _rewrite(gm, self)

    def after_code(self, gm: fx.GraphModule) -> str:
        return op_call_code(gm, self.call())



def _last_dim(node: fx.Node, dim) -> bool:
    rank = len(dims(node.args[0]) or ())
    return dim in (-1, rank - 1)


def _parse_topk(node: fx.Node, what: str) -> tuple[fx.Node, int]:
    """(input, k) of a largest-k top-k over the last dim."""
    if op_name(node) != "topk":
        raise Reject(f"{what} comes from `{node.name}` ({op_name(node)}), expected a top-k")
    k = arg(node, 1, "k")
    if not isinstance(k, int):
        raise Reject(f"`{node.name}`: top-k with a non-constant k ({k})")
    if not _last_dim(node, arg(node, 2, "dim", -1)) or not arg(node, 3, "largest", True):
        raise Reject(f"`{node.name}`: expected a largest-k top-k over the expert dim")
    return node.args[0], k


def _scores(node: fx.Node) -> tuple[Scoring, fx.Node, WeightsDtype]:
    """(scoring, logits, the dtype the router computes in) of a softmax / sigmoid / sqrt(softplus) over the expert
    dim. fp32 (the routers that upcast): the logits before their casts. A lower precision: only where every op
    from the logits on runs in it (no cast between), the logits as they are; the route op rounds each op's result
    as eager does (RouterSpec.score_dtype), so the selection is made on eager's values."""
    name = op_name(node)
    first = node  # the op reading the logits
    if name == "softmax":
        if not _last_dim(node, arg(node, 1, "dim")):
            raise Reject(f"`{node.name}`: softmax over dim {arg(node, 1, 'dim')}, expected the expert dim")
        scoring = Scoring.SOFTMAX
    elif name == "sigmoid":
        scoring = Scoring.SIGMOID
    elif name == "sqrt" and op_name(node.args[0]) == "softplus":  # DeepSeek-V4's sqrtsoftplus
        first = node.args[0]
        beta, threshold = arg(first, 1, "beta", 1.0), arg(first, 2, "threshold", 20.0)
        if (beta, threshold) != (1.0, 20.0):
            raise Reject(f"`{first.name}`: softplus with beta {beta}, threshold {threshold}; expected 1 and 20")
        scoring = Scoring.SQRTSOFTPLUS
    else:
        raise Reject(f"the router scores come from `{node.name}` ({name}), expected softmax, sigmoid or "
                     "sqrt(softplus) of the logits")
    dtype = example_value(node).dtype
    if dtype == torch.float32:
        return scoring, strip_casts(first.args[0]), WeightsDtype.FLOAT32
    low = [d for d in WeightsDtype if d.torch == dtype]
    if not low or example_value(first).dtype != dtype or dtype_of(first.args[0]) != dtype:
        raise Reject(f"the router scores `{node.name}` are computed in {dtype} from `{first.args[0].name}` "
                     f"({dtype_of(first.args[0])}): NYI")
    return scoring, first.args[0], low[0]


def _check_low_precision(spec: RouterSpec, weights: fx.Node, stop: set, choice: fx.Node, bias) -> None:
    """A router computing in spec.score_dtype: the route op rounds after every op as that dtype's ops do, so every
    float value on the way to the weights must be in it (an upcast in between is math the op would not round),
    and the choice must be in the dtype torch's promotion gives it (RouterSpec.choice_dtype: fp32 once an fp32
    correction bias is added, the router's own with a bias in it): the op rounds the choice and group sums to it."""
    dtype = spec.score_dtype.torch
    todo, seen = [strip_casts(weights)], set()
    while todo:
        n = todo.pop()
        if n in seen or n in stop or n.op not in ("call_function", "call_method"):
            continue
        seen.add(n)
        d = dtype_of(n)
        if d is not None and d.is_floating_point and d != dtype:
            raise Reject(f"the router computes its scores in {dtype} but `{n.name}` ({op_name(n)}) in {d}: NYI")
        todo.extend(n.all_input_nodes)
    want = spec.choice_dtype(None if bias is None else dtype_of(bias)).torch
    if dtype_of(choice) != want:
        with_bias = f"with a {dtype_of(bias)} correction bias" if bias is not None else "without a correction bias"
        raise Reject(f"the top-k chooses from `{choice.name}` in {dtype_of(choice)}, expected {want} for a "
                     f"{dtype} router {with_bias}: NYI")


def _constant_mul(node: fx.Node):
    """(other operand, constant) if node multiplies by a Python number."""
    if op_name(node) != "mul":
        return None
    a, b = node.args[0], node.args[1]
    if isinstance(b, (int, float)) and isinstance(a, fx.Node):
        return a, float(b)
    if isinstance(a, (int, float)) and isinstance(b, fx.Node):
        return b, float(a)
    return None


@dataclasses.dataclass(frozen=True)
class _Norm:
    """x / (x.sum(-1, keepdim=True) + eps), or with `clamped`, x / x.sum(-1, keepdim=True).clamp(min=eps)."""

    numerator: fx.Node
    eps: float = 0.0
    clamped: bool = False


def _normalized(node: fx.Node) -> _Norm | None:
    if op_name(node) not in ("truediv", "div", "itruediv"):
        return None
    num, den = node.args[0], strip_casts(node.args[1])
    eps, clamped = 0.0, False
    if op_name(den) == "add" and isinstance(den.args[1], (int, float)):
        den, eps = strip_casts(den.args[0]), float(den.args[1])
    elif op_name(den) == "clamp" and arg(den, 1, "min") is not None and arg(den, 2, "max") is None:
        den, eps, clamped = strip_casts(den.args[0]), float(arg(den, 1, "min")), True
    if op_name(den) != "sum" or strip_casts(den.args[0]) is not strip_casts(num) or not arg(den, 2, "keepdim", False):
        return None
    if not _last_dim(den, arg(den, 1, "dim")):
        return None
    return _Norm(num, eps, clamped)


def _renorm_eps(norm: _Norm, scoring: Scoring, k: int, E: int) -> float:
    """The route op's renorm_eps for the router's renormalization, or Reject. The op adds its epsilon; a clamp
    is the same division only where it never bites: a softmax top-k sum is >= k / E, a sum of scores >= 0."""
    if not (math.isfinite(norm.eps) and norm.eps >= 0.0):
        raise Reject(f"the renormalization's epsilon is {norm.eps}: expected a finite value >= 0")
    if not norm.clamped:
        return norm.eps
    if norm.eps == 0.0 or (scoring is Scoring.SOFTMAX and norm.eps < k / E):
        return 0.0
    raise Reject(f"the renormalization clamps the top-k sum at {norm.eps}, which can bite on {scoring.value} scores "
                 "(the route op adds its epsilon instead): NYI")


def _groups(choice: fx.Node, E) -> tuple[fx.Node, int, int, GroupScore, float]:
    """(ungrouped choice, n_group, topk_group, group_score, masked_score) of a group-masked choice."""
    base, mask, fill = choice.args[0], choice.args[1], choice.args[2]
    if not isinstance(fill, (int, float)):
        raise Reject(f"`{choice.name}`: the group mask fills a non-constant value")
    # The kept groups: the indices of a top-k over group scores, reaching the mask through the in-place
    # scatter into a zeros mask (a mutation, so not a use-def edge: followed explicitly).
    group_idx = {n for n in _ancestry(mask, stop=base) if op_name(n) == "getitem" and n.args[1] == 1
                 and op_name(n.args[0]) == "topk"}
    if len(group_idx) != 1:
        raise Reject(
            f"`{choice.name}` masks the choice with {len(group_idx)} top-k index sets, expected one (group-limited "
            "routing)"
        )
    group_topk = next(iter(group_idx)).args[0]
    group_scores, topk_group = _parse_topk(group_topk, "the kept groups")
    grouped, group_score = None, None
    gs = strip_casts(group_scores)
    if op_name(gs) == "sum" and _last_dim(gs, arg(gs, 1, "dim")) and op_name(strip_casts(gs.args[0])) == "getitem":
        inner = strip_casts(gs.args[0])
        if (
            inner.args[1] == 0 and op_name(inner.args[0]) == "topk"
            and _parse_topk(inner.args[0], "group scores")[1] == 2
        ):
            grouped, group_score = inner.args[0].args[0], GroupScore.TOP2_SUM
    elif op_name(gs) == "amax" or (op_name(gs) == "getitem" and op_name(gs.args[0]) == "max"):
        grouped, group_score = (gs.args[0] if op_name(gs) == "amax" else gs.args[0].args[0]), GroupScore.MAX
    if grouped is None:
        raise Reject(f"group scores `{gs.name}` ({op_name(gs)}): expected the sum of each group's top-2 or its max")
    if op_name(grouped) not in ("view", "reshape") or strip_casts(grouped.args[0]) is not strip_casts(base):
        raise Reject(f"the group scores read `{grouped.name}`, expected a [T, n_group, E / n_group] view of the choice")
    shape = dims(grouped)
    if shape is None or len(shape) != 3 or not isinstance(shape[1], int) or shape[1] * shape[2] != E:
        raise Reject(f"`{grouped.name}` has shape {shape}, expected [T, n_group, E / n_group] with E = {E}")
    return base, shape[1], topk_group, group_score, float(fill)


def _is_neg_inf(value) -> bool:
    return isinstance(value, float) and value == -math.inf


def _is(node, name: str) -> bool:
    return isinstance(node, fx.Node) and op_name(node) == name


def _desc(node) -> str:
    return f"`{node.name}` ({op_name(node)})" if isinstance(node, fx.Node) else repr(node)


def _sparsemixer(ids_cat: fx.Node, weights_cat: fx.Node) -> tuple[fx.Node, RouterSpec]:
    """(logits, spec) of PhiMoE's eval-mode sparse mixer, round by round (modeling_phimoe.sparsemixer):

        m, i = untaken.max(-1, keepdim=True)                      untaken = X, then X with the picks at -inf
        drop = ((m - X) / X.abs().clamp(min=m)) > 2 * jitter_eps
        w = untaken.masked_fill(drop, -inf).softmax(-1).gather(-1, i)
        untaken = torch.scatter(untaken, -1, i, -inf)
    and ids / weights = the rounds' i / w concatenated in round order. Training mode samples each round's
    expert (Gumbel noise) instead of taking the max: that is not a route op and fails fact 1 below."""
    w_cat = strip_casts(weights_cat)
    rounds_i = ids_cat.args[0] if ids_cat.args else None
    is_cat = isinstance(w_cat, fx.Node) and op_name(w_cat) in ("cat", "concat") and w_cat.args
    rounds_w = w_cat.args[0] if is_cat else None
    if (
        not isinstance(rounds_i, (list, tuple))
        or not isinstance(rounds_w, (list, tuple))
        or len(rounds_w) != len(rounds_i)
        or not all(isinstance(n, fx.Node) for n in (*rounds_i, *rounds_w))
    ):
        raise Reject(f"the top-k ids are concatenated (`{ids_cat.name}`) but the weights `{weights_cat.name}` are not "
                     "concatenated round by round: not a sparse-mixer router")
    for cat in (ids_cat, w_cat):
        if arg(cat, 1, "dim", 0) not in (-1, len(dims(cat) or ()) - 1):
            raise Reject(f"`{cat.name}` concatenates over dim {arg(cat, 1, 'dim', 0)}, expected the last (k) dim")
    untaken, logits, threshold = None, None, None
    for r, (i, w) in enumerate(zip(rounds_i, rounds_w)):
        # 1. the round's id is the argmax of the untaken logits.
        mx = i.args[0] if _is(i, "getitem") and i.args[1] == 1 else None
        if not _is(mx, "max") or not _last_dim(mx, arg(mx, 1, "dim")) or not arg(mx, 2, "keepdim", False):
            raise Reject(f"sparse mixer round {r}: the id {_desc(i)} is not the argmax (keepdim) of the "
                         "untaken logits (training-mode routing samples it: only eval mode is a route op)")
        if r == 0:
            untaken = logits = mx.args[0]
        elif mx.args[0] is not untaken:
            raise Reject(
                f"sparse mixer round {r}: `{mx.name}` takes the max of `{mx.args[0].name}`, expected the logits "
                "with the earlier rounds' experts scattered to -inf"
            )
        best = [u for u in mx.users if _is(u, "getitem") and u.args[1] == 0]
        # 3. the weight: the round's id gathered from a softmax of the untaken logits with the far ones dropped.
        sm = w.args[0] if _is(w, "gather") else None
        if sm is None or not _last_dim(w, arg(w, 1, "dim")) or arg(w, 2, "index") is not i:
            raise Reject(f"sparse mixer round {r}: the weight {_desc(w)} is not a gather at the round's id")
        if not _is(sm, "softmax") or not _last_dim(sm, arg(sm, 1, "dim")) or arg(sm, 2, "dtype") is not None:
            raise Reject(f"sparse mixer round {r}: {_desc(sm)} is not a softmax over the experts")
        fill = sm.args[0]
        if not _is(fill, "masked_fill") or fill.args[0] is not untaken or not _is_neg_inf(fill.args[2]):
            raise Reject(f"sparse mixer round {r}: {_desc(fill)} is not the untaken logits masked to -inf")
        # 4. the mask: ((m - X) / X.abs().clamp(min=m)) > constant, m the round's max value.
        gt = fill.args[1]
        div = gt.args[0] if _is(gt, "gt") else None
        if not (_is(div, "truediv") or _is(div, "div")) or not isinstance(gt.args[1], (int, float)):
            raise Reject(f"sparse mixer round {r}: the mask {_desc(gt)} is not `quotient > constant`")
        sub, clamp = div.args
        m = sub.args[0] if _is(sub, "sub") else None
        if m not in best or sub.args[1] is not logits:
            raise Reject(f"sparse mixer round {r}: {_desc(sub)} is not the round's max minus the logits")
        if not _is(clamp, "clamp") or arg(clamp, 1, "min") is not m or arg(clamp, 2, "max") is not None \
                or not _is(clamp.args[0], "abs") or clamp.args[0].args[0] is not logits:
            raise Reject(f"sparse mixer round {r}: {_desc(clamp)} is not |logits| clamped below by the round's max")
        if threshold is not None and float(gt.args[1]) != threshold:
            raise Reject(f"sparse mixer: rounds compare with different thresholds ({threshold}, {gt.args[1]})")
        threshold = float(gt.args[1])
        # the next round's untaken logits: this round's expert scattered to -inf.
        if r + 1 < len(rounds_i):
            nxt = [u for u in untaken.users if _is(u, "scatter") and arg(u, 2, "index") is i]
            if (
                len(nxt) != 1 or not _last_dim(nxt[0], arg(nxt[0], 1, "dim"))
                or not _is_neg_inf(arg(nxt[0], 3, "value"))
            ):
                raise Reject(f"sparse mixer round {r}: its expert is not scattered to -inf for the next round")
            untaken = nxt[0]
    if threshold < 0:
        raise Reject(f"sparse mixer: a negative near-tie threshold ({threshold}) drops every expert")
    return logits, RouterSpec(top_k=len(rounds_i), order=RouteOrder.SPARSEMIXER, jitter_eps=threshold / 2)


def _mutations(node: fx.Node) -> list[fx.Node]:
    """In-place ops writing into node (e.g. `mask.scatter_(...)`): they feed node's later readers."""
    return [u for u in node.users if is_in_place(u) and u.args[0] is node]


def dtype_template_only(node: fx.Node, nodes) -> bool:
    """node is read by the router only as `x.type_as(node)`: for its dtype, not its values."""
    readers = [n for n in nodes if node in n.all_input_nodes]
    return bool(readers) and all(
        op_name(n) == "type_as" and n.args[1] is node and n.args[0] is not node for n in readers
    )


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """What node reads for its values: not type_as's template (dtype only), not sizes (SymInt nodes)."""
    args = node.all_input_nodes
    if op_name(node) == "type_as":
        args = [node.args[0]]
    return [a for a in args if isinstance(example_value(a), (torch.Tensor, tuple, list))]


def _ancestry(start: fx.Node, stop: fx.Node | None = None) -> set[fx.Node]:
    """Compute nodes start depends on (mutations included), not crossing `stop`, placeholders or sizes."""
    stops = [stop] if stop is not None else []
    return backward_slice([start], stop=stops, inputs=lambda n: _tensor_inputs(n) + _mutations(n))


def _router_nodes(ids: fx.Node, weights: fx.Node, logits: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(nodes between the logits and ids / weights, the nodes they read from outside) - graph order."""
    return in_graph_order(_ancestry(ids, logits) | _ancestry(weights, logits), logits.graph)


def _off_rank(mask, g, E) -> bool:
    """mask is `g // E != rank` (rank a Python int): the pairs whose expert another rank holds."""
    if op_name(mask) != "ne" or len(mask.args) != 2 or not isinstance(mask.args[1], int):
        return False
    div = mask.args[0]
    return op_name(div) == "floordiv" and div.args[0] is g and div.args[1] == E


def _fill(node, value) -> tuple[fx.Node, fx.Node] | None:
    """(input, mask) of `input.masked_fill(mask, value)` with that constant value, else None."""
    if op_name(node) != "masked_fill" or len(node.args) != 3 or isinstance(node.args[2], fx.Node):
        return None
    return (node.args[0], node.args[1]) if node.args[2] == value else None


def _compares(node, name, a, value) -> bool:
    return op_name(node) == name and len(node.args) == 2 and node.args[0] is a and node.args[1] == value


def _remap_by_fills(ids, E) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(off-rank mask, global ids g, the fill reading g) of transformers 5.17's router-output remap (RouterParallel),
    which computes the same values as 5.24's `where` form for g >= 0 (top-k indices):
        a = g.masked_fill(off, -1)
        b = fmod(a, E)                                               (E > 1; fmod keeps a's sign: -1 stays -1)
            a.masked_fill(a > 0, 0).masked_fill(a < 0, -1)           (E == 1)
        ids = b.masked_fill(b == -1, E)"""
    last = _fill(strip_casts(ids), E)
    if last is None or not _compares(last[1], "eq", last[0], -1):
        return None
    b = last[0]
    if op_name(b) == "fmod" and len(b.args) == 2 and b.args[1] == E and E > 1:
        a = b.args[0]
    elif E == 1 and (outer := _fill(b, -1)) is not None and (inner := _fill(outer[0], 0)) is not None:
        a = inner[0]
        if not (_compares(inner[1], "gt", a, 0) and _compares(outer[1], "lt", a, 0)):
            return None
    else:
        return None
    first = _fill(a, -1)
    if first is None or not _off_rank(first[1], first[0], E):
        return None
    return first[1], first[0], a


def _ep_remap(ids: fx.Node, weights: fx.Node, E) -> tuple[fx.Node, fx.Node, tuple[fx.Node, ...]] | None:
    """transformers' all-reduce expert parallelism between router and experts call: ids = where(g // E != rank, E,
    g % E) (the experts module's own remap, 5.24) or the same values by a chain of fills (the router's output hook,
    5.17: _remap_by_fills), weights = global_weights.masked_fill(that mask, 0), E the local expert count. Returns
    (global ids, global weights, the remap nodes that read them) or None for any other form."""
    if (parts := ep_remap(ids, E)) is not None:
        off, mod = parts
        g, reads_g = mod.args[0], mod
    elif (parts := _remap_by_fills(ids, E)) is not None:
        off, g, reads_g = parts
    else:
        return None
    fill = strip_casts(weights)
    masked = _fill(fill, 0)
    if masked is None or masked[1] is not off or not _off_rank(off, g, E):
        return None
    return g, masked[0], (off.args[0], reads_g, fill)


def recognize_router(experts_call: fx.Node) -> RouterMatch:
    experts = OpCall.of(experts_call).tensors
    ids, weights = experts.topk_ids, experts.topk_weights
    w_down = experts.w_down  # a stacked [E, ...] weight, or one part per expert (experts_unstacked)
    E = len(w_down) if isinstance(w_down, (list, tuple)) else dims(w_down)[0]
    readers: tuple[fx.Node, ...] = (experts_call,)
    if (remap := _ep_remap(ids, weights, E)) is not None:
        # The router chooses among all ranks' experts: E is what the top-k chooses from (checked a multiple of the
        # local count below); the remap stays and reads the route op's results.
        ids, weights, readers = remap
    remapped = remap is not None

    # 1. the ids: output 1 of a top-k.
    sel = strip_casts(ids)
    if op_name(sel) in ("cat", "concat") and remapped:
        raise Reject("a sparse-mixer router under expert parallelism: NYI")
    if op_name(sel) in ("cat", "concat"):
        logits, spec = _sparsemixer(sel, weights)
        return _closed(RouterMatch(RouterForm.SPARSEMIXER, spec, logits, None, ids, weights, experts_call, readers), E)
    if op_name(sel) != "getitem" or sel.args[1] != 1:
        raise Reject(f"the top-k ids come from `{sel.name}` ({op_name(sel)}), expected the indices of a top-k")
    topk = sel.args[0]
    choice, k = _parse_topk(topk, "the top-k ids")
    if remapped:
        E_local, E = E, (dims(choice) or (None, None))[-1]
        if not isinstance(E, int) or E % E_local:
            raise Reject(f"the top-k under expert parallelism chooses among {E} experts, not a multiple of this rank's "
                         f"{E_local}")

    # 3. the weights: strip casts, the constant scale, the renormalization.
    w = strip_casts(weights)
    scale = 1.0
    while (m := _constant_mul(w)) is not None:
        w, c = m
        scale *= c
        w = strip_casts(w)
    norm = _normalized(w)
    if norm is not None:
        w = strip_casts(norm.numerator)

    src = strip_casts(w.args[0]) if op_name(w) in ("softmax", "sigmoid") else None
    picked_values = op_name(src) == "getitem" and src.args[0] is topk
    picked_logits = (op_name(w) == "sigmoid" and op_name(src) == "gather" and strip_casts(arg(src, 2, "index")) is sel
                     and _last_dim(src, arg(src, 1, "dim")))
    if picked_values or picked_logits:
        # top-k of the logits, then softmax over the k values (GPT-OSS, Granite-MoE) or sigmoid of each (Llama-4);
        # or top-k of logits + bias, then sigmoid of the logits gathered at the ids, renormalized (Kolibri-1).
        scoring = Scoring.SOFTMAX if op_name(w) == "softmax" else Scoring.SIGMOID
        if (norm is not None or scale != 1.0) and scoring is Scoring.SOFTMAX:
            raise Reject(f"top-k-then-{scoring.value} weights are renormalized or scaled afterwards: NYI")
        if (norm is not None or scale != 1.0) and dtype_of(w) != torch.float32:
            raise Reject(f"top-k-then-sigmoid weights renormalized or scaled in {dtype_of(w)} (the op in fp32): NYI")
        # The choice is made on the logits (exactly as eager, whatever their dtype); a bf16 / fp16 softmax of
        # the k values differs from the op's fp32 one, rounded back to that dtype by the rewrite, only as
        # Inductor's own upcast bf16 softmax does.
        bias = None
        if picked_values:
            if src.args[1] != 0:
                raise Reject(f"`{w.name}`: expected a {scoring.value} of the top-k values")
            logits = strip_casts(choice)
        else:
            logits, c = strip_casts(src.args[0]), strip_casts(choice)
            if op_name(c) == "add" and strip_casts(c.args[0]) is logits and isinstance(c.args[1], fx.Node):
                bias = c.args[1]
                if dims(bias) != (E,) or dtype_of(c) != torch.float32:
                    raise Reject(f"the top-k chooses from `{c.name}` = logits + `{bias.name}` {dims(bias)} in "
                                 f"{dtype_of(c)}: expected an [E={E}] bias added in fp32")
            elif c is not logits:
                raise Reject(f"the top-k chooses from `{c.name}` ({op_name(c)}), and the weights are a sigmoid of "
                             f"`{logits.name}` gathered at its ids: expected those logits or logits + a bias")
        if scoring is Scoring.SOFTMAX and not _last_dim(w, arg(w, 1, "dim")):
            raise Reject(f"`{w.name}`: softmax over dim {arg(w, 1, 'dim')}, expected the k values")
        renorm = {} if norm is None else {"renorm_eps": _renorm_eps(norm, scoring, k, E)}
        spec = RouterSpec(top_k=k, scoring=scoring, order=RouteOrder.TOPK_THEN_SCORE, norm_topk_prob=norm is not None,
                          **renorm, routed_scaling_factor=scale)
        form = RouterForm(f"topk_{scoring.value}")
    else:
        # 3. scores at the ids: the top-k values, or a gather of the scores.
        if op_name(w) == "getitem" and w.args[0] is topk and w.args[1] == 0:
            scores_node, gathered = strip_casts(choice), False
        elif op_name(w) == "gather" and strip_casts(arg(w, 2, "index")) is sel and _last_dim(w, arg(w, 1, "dim")):
            scores_node, gathered = strip_casts(w.args[0]), True
        else:
            raise Reject(
                f"the top-k weights come from `{w.name}` ({op_name(w)}), expected the top-k values, a gather of the "
                "scores at the ids, or a softmax of the top-k logits"
            )
        scoring, logits, score_dtype = _scores(scores_node)
        # 1./4. what the top-k chose from: scores [+ bias], optionally group-masked.
        n_group, topk_group, group_score, masked = 1, 1, GroupScore.TOP2_SUM, -math.inf
        c = strip_casts(choice)
        if op_name(c) == "masked_fill":
            c, n_group, topk_group, group_score, masked = _groups(c, E)
            c = strip_casts(c)
        bias = None
        if op_name(c) == "add" and c.args[0] is scores_node and isinstance(c.args[1], fx.Node):
            bias = c.args[1]
            if dims(bias) != (E,):
                raise Reject(f"the correction bias `{bias.name}` has shape {dims(bias)}, expected [E={E}]")
            if dtype_of(bias) not in (torch.float32, torch.bfloat16, torch.float16):
                raise Reject(f"the correction bias `{bias.name}` is {dtype_of(bias)}, expected fp32, bf16 or fp16 "
                             "(the route op chooses in fp32 at most): NYI")
            c = scores_node
        if c is not scores_node:
            raise Reject(
                f"the top-k chooses from `{c.name}` ({op_name(c)}), expected the scores, scores + a bias, or their "
                "group-masked form"
            )
        if (bias is not None or n_group > 1) and not gathered:
            raise Reject("the weights are the top-k values of a biased / masked choice, not the scores: NYI")
        renorm = {} if norm is None else {"renorm_eps": _renorm_eps(norm, scoring, k, E)}
        spec = RouterSpec(top_k=k, scoring=scoring, norm_topk_prob=norm is not None, **renorm,
                          routed_scaling_factor=scale, n_group=n_group, topk_group=topk_group,
                          group_score=group_score, masked_score=masked, score_dtype=score_dtype)
        if score_dtype is not WeightsDtype.FLOAT32:
            _check_low_precision(spec, weights, {scores_node, topk, sel}, strip_casts(choice), bias)
        form = RouterForm(f"{scoring.value}{'_group' if n_group > 1 else ''}_topk")
    return _closed(RouterMatch(form, spec, logits, bias, ids, weights, experts_call, readers), E)


def _closed(match: RouterMatch, E) -> RouterMatch:
    """Fact 5 for a recognized router: its nodes and inputs filled in, or a Reject."""
    logits, bias, ids, weights = match.logits, match.correction_bias, match.ids, match.weights
    if dims(logits) is None or len(dims(logits)) != 2 or dims(logits)[1] != E:
        raise Reject(f"the router logits `{logits.name}` have shape {dims(logits)}, expected [T, E={E}]")

    # 5. a closed router whose results only the experts call reads.
    nodes, inputs = _router_nodes(ids, weights, logits)
    for i in inputs:
        if i is logits or i is bias or dtype_template_only(i, nodes):
            continue
        ev = example_value(i)
        if i.op not in ("placeholder", "get_attr") and isinstance(ev, torch.Tensor):
            raise Reject(f"the router reads `{i.name}` ({op_name(i)}) besides its logits: NYI")
    inside = set(nodes)
    for out in (ids, weights):
        others = [u for u in out.users if u not in match.readers and u not in inside]
        if others:
            raise Reject(
                f"the top-k {'ids' if out is ids else 'weights'} `{out.name}` are also read by "
                f"{[u.name for u in others]}: NYI"
            )
    match.nodes, match.inputs = nodes, inputs
    # Weights the block hands over in its own dtype (fp32 math, then `.to(hidden.dtype)`): the route op stores
    # them in that dtype, rounded as the cast rounds, instead of a cast launch of its own after it.
    stored = [d for d in WeightsDtype if d.torch == example_value(weights).dtype]
    if stored:
        match.spec = dataclasses.replace(match.spec, weights_dtype=stored[0])
    return match


def _rewrite(gm: fx.GraphModule, match: RouterMatch) -> Edit:
    """Feed the experts call from one `moe_compiler.route` call on the router logits; erase the router's
    now-unused nodes (last user first: in-place mask fills go before the masks they fill)."""
    call = match.call()
    want_w, want_i = example_value(match.weights), example_value(match.ids)
    with example_value(match.logits).fake_mode:  # every new node's value first: a failure leaves the graph untouched
        value = call.op(**fx.node.map_arg(call.kwargs(), example_value))
        w_value, i_value = value[0].to(want_w.dtype), value[1].to(want_i.dtype)

    def edit() -> fx.Node:
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        with graph.inserting_before(min(match.readers, key=order.__getitem__)):
            new = graph.call_function(call.op, (), call.kwargs())
            new.meta = node_meta(match.weights, value)
            weights = graph.call_function(operator.getitem, (new, 0))
            weights.meta = node_meta(match.weights, value[0])
            ids = graph.call_function(operator.getitem, (new, 1))
            ids.meta = node_meta(match.ids, value[1])
            # The experts call keeps the dtypes the router handed it (e.g. bf16 weights in a bf16 model).
            weights = cast_like(graph, weights, w_value, match.weights)
            ids = cast_like(graph, ids, i_value, match.ids)
        for reader in match.readers:
            reader.replace_input_with(match.ids, ids)
            reader.replace_input_with(match.weights, weights)
        erase_unused(graph, match.nodes)
        return new

    return edit
