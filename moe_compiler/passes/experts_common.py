"""The experts recognizer: proves that a region computes `moe_compiler.experts` and extracts its spec.

Facts established structurally, each with a stated reason when it fails (see passes/README.md):
  1. the region reads exactly: hidden [T, H], topk_ids [T, k] (int), topk_weights [T, k] (float), and two
     3-D weights that are graph inputs (parameters read in place) - plus symbolic sizes;
  2. it has exactly two expert GEMMs of one form (experts_grouped_mm.py / experts_batched_mm.py): the first
     reads rows of hidden and the gate_up weight, the second reads the gated activation and the down weight;
     the storage layout ([E, out, in] or transposed) is read off how each weight enters its GEMM;
  3. the down GEMM's input is act(gate) * up of the first GEMM's output (gated_activation.py);
  4. the router weight multiplies the down GEMM's output (not its input: Llama4-style input scaling is a
     different function), and the result is summed over the k slots of each token;
  5. nothing outside the region is mutated, and the region has one tensor output.
What the structure does not pin down (the exact permutation plumbing) is then checked numerically by
verify.py before the rewrite.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..ops.signature import ExpertsTensors, OpCall
from ..spec import ExpertsSpec
from . import verify
from .fx_utils import (
    VALUE_PRESERVING,
    derives_from,
    dims,
    ep_remap,
    example_value,
    follow,
    is_in_place,
    is_param,
    is_param_read,
    is_tensor_node,
    op_call_code,
    op_name,
    param_input,
    strip_casts,
)
from .gated_activation import recognize_gated_activation
from .match import EagerExpertsLoop, Edit, ExpertsForm, Match, NoExpertGemm, Reject
from .regions import Region
from .rewrite import replace_with_call

EAGER_FIX = (
    "experts_implementation='eager' loops over experts found by `nonzero()`, which breaks the graph "
    "(data-dependent shapes), so no whole MoE region exists to fuse. Fix: load the model with the default "
    "experts_implementation ('grouped_mm') or 'batched_mm', e.g. "
    "AutoModelForCausalLM.from_pretrained(..., experts_implementation='grouped_mm'). Models whose experts have no "
    "such switch in transformers 5.x (DBRX, LongCat-Flash) always loop: their Python loop runs over the tensor "
    "`nonzero()` returns (LongCat-Flash also calls .item() per expert), which Dynamo cannot trace into one graph "
    "even with capture_dynamic_output_shape_ops=True, so their experts cannot be fused yet. A static loop "
    "`for e in range(E): torch.where(mask[e]) ... index_add_` (transformers v4, hand-written) traces as one graph "
    "and fuses with `torch._dynamo.config.capture_dynamic_output_shape_ops = True`."
)


@dataclasses.dataclass
class GemmUse:
    node: fx.Node  # the matmul call
    x: fx.Node  # its activation operand (rows)
    weight: fx.Node  # the 3-D expert weight it reads
    transposed_storage: bool  # weight stored [E, in, out] rather than nn.Linear's [E, out, in]
    out: fx.Node  # its [S, out] result (after squeezing a bmm's unit dim)


class RegionMatch(Match):
    """A proven experts computation: the region it replaces, the op call that replaces it, its sizes."""

    form: ExpertsForm
    spec: ExpertsSpec
    region: Region  # the nodes the op call replaces (and what they read)
    output: fx.Node  # the value the op call takes over
    shape: dict  # T, H, I, E, k (ints or symbolic)

    def call(self) -> OpCall:
        """The replacing op call, its tensor arguments graph nodes."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.spec.describe()

    def verify(self, gm: fx.GraphModule, real: dict) -> str:
        return verify.experts_region(gm, self.region, self.call(), self.output, self.shape, real)

    def rewrite(self, gm: fx.GraphModule) -> Edit:
        return replace_with_call(gm, self.call(), self.output, self.region.nodes)

    def after_code(self, gm: fx.GraphModule) -> str:
        return op_call_code(gm, self.call())


@dataclasses.dataclass
class ExpertsMatch(RegionMatch):
    """The grouped_mm / batched_mm forms: one `experts` call replaces the `*Experts` module's region."""

    form: ExpertsForm
    spec: ExpertsSpec
    region: Region
    output: fx.Node
    shape: dict
    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    w_gate_up: fx.Node
    w_down: fx.Node
    b_gate_up: fx.Node | None = None
    b_down: fx.Node | None = None
    sentinels: bool = False  # the region drops sentinel-id pairs itself: verify.py routes some pairs to id E

    def verify(self, gm: fx.GraphModule, real: dict) -> str:
        return verify.experts_region(gm, self.region, self.call(), self.output, self.shape, real, self.sentinels)

    def call(self) -> OpCall:
        tensors = ExpertsTensors(self.hidden, self.topk_ids, self.topk_weights, self.w_gate_up, self.w_down,
                                 self.b_gate_up, self.b_down)
        return OpCall(torch.ops.moe_compiler.experts.default, tensors, self.spec)


# The router weights reach the multiply through reshapes, the sort permutation and unsqueeze.
_WEIGHT_PATH = VALUE_PRESERVING | {"reshape", "view", "flatten"}


def _sums_over_k(node: fx.Node) -> bool:
    if op_name(node) != "sum":
        return False
    shape = dims(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return shape is not None and len(shape) == 3 and dim in (1, -2, (1,), [1])


def _gemm_bias(use: GemmUse, region: Region, num_experts) -> fx.Node | None:
    """The [E, N] bias parameter added to a GEMM's rows, if any.

    transformers adds it in place, `out.add_(bias[expert_ids_g])` (`_grouped_linear` / `_batched_linear`),
    so every later reader of `out` sees out + bias: accepted only when the add_ comes before any other
    reader of `out` in graph order. Which bias row each GEMM row gets is the sort plumbing that verify.py
    checks numerically."""
    adds = [u for u in use.out.users if op_name(u) == "add_" and u.args[0] is use.out]
    if not adds:
        return None
    if len(adds) > 1:
        raise Reject(f"{len(adds)} in-place adds on the GEMM output `{use.out.name}`, expected one bias add")
    add = adds[0]
    order = {n: i for i, n in enumerate(region.nodes)}
    if any(order.get(u, -1) < order[add] for u in use.out.users if u is not add):
        raise Reject(f"`{use.out.name}` is read before its bias add `{add.name}`")
    bias = follow(add.args[1], gathers=True, within=region.contains)
    shape = dims(bias)
    if not is_param(bias, 2) or shape[0] != num_experts:
        raise Reject(
            f"the bias added to `{use.out.name}` comes from `{bias.name}` {shape}, expected an [E, N] parameter"
        )
    return bias


def _sentinel_fills(region: Region, num_experts) -> frozenset:
    """`x.masked_fill((ids >= c).unsqueeze(-1), 0)` with c >= E: transformers 5.17 zeroes the rows of
    expert-parallel sentinel ids (id >= E) after each grouped GEMM. With every id in [0, E) - which the
    op checks - the mask is all False and the fill is the identity."""
    fills = set()
    for n in region.nodes:
        if op_name(n) != "masked_fill" or len(n.args) < 3 or n.args[2] != 0:
            continue
        cmp = follow(n.args[1], through={"unsqueeze"})
        if op_name(cmp) == "ge" and isinstance(cmp.args[1], int) and cmp.args[1] >= num_experts:
            fills.add(n)
    return frozenset(fills)


def _op_ids(region: Region, ids: fx.Node, first_gemm: fx.Node, E) -> fx.Node:
    """The [T, k] ids the op takes: the region's id input, or the last [T, k] integer value computed from it that
    the grouping reads. transformers' all-reduce expert parallelism (5.24) remaps the global ids to this rank's
    inside the experts module, `where(id // E != rank, E, id % E)` with E the local expert count and E itself the
    off-rank sentinel (the weight masked to 0 beside it): the op takes the remapped ids and the masked weights, the
    remap stays in the graph. That form, and only it, is accepted: it puts every id in [0, E] by construction
    (the op's range). A cast of the input is the input. verify.py checks the op from those values on, sentinels
    included."""
    shape = dims(ids)
    for n in reversed(region.nodes):
        v = example_value(n)
        if (
            isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool
            and dims(n) == shape and not is_in_place(n) and strip_casts(n) is not ids
            and derives_from(n, ids, region.contains) and derives_from(first_gemm, n, region.contains)
        ):
            if ep_remap(n, E) is None:
                raise Reject(
                    f"the expert ids the GEMMs group by are computed inside the region (`{n.name}`, "
                    f"{op_name(strip_casts(n))}) in a form other than expert parallelism's "
                    f"`where(off_rank, {E}, ids % {E})`: their range is not proven to be [0, E]"
                )
            return n
    return ids


def _find_gemms(region: Region, forms) -> tuple[ExpertsForm, list[GemmUse]]:
    for form in forms:
        uses = [u for n in region.nodes if (u := form.match_gemm(n)) is not None]
        if uses:
            return form.FORM, uses
    ops = sorted({op_name(n) for n in region.nodes})
    raise NoExpertGemm(
        "no expert GEMM found (grouped_mm / _grouped_mm / grouped_mm_fallback, or bmm over gathered weights); "
        f"region ops: {ops}"
    )


def recognize_experts(region: Region, forms) -> ExpertsMatch:
    names = {op_name(n) for n in region.nodes}
    if names & {"nonzero", "one_hot"}:
        raise EagerExpertsLoop(EAGER_FIX)

    # 5. one output, no mutation escaping the region.
    outs = [o for o in region.outputs if is_tensor_node(o)]
    if len(outs) != 1:
        raise Reject(f"expected one tensor output of the experts region, found {len(outs)}: {[o.name for o in outs]}")
    output = outs[0]
    for n in region.nodes:
        mutating = op_name(n) == "setitem" or is_in_place(n)
        if mutating and isinstance(n.args[0], fx.Node) and not region.contains(n.args[0]):
            raise Reject(f"`{n.name}` ({op_name(n)}) mutates `{n.args[0].name}`, which lives outside the region")

    # 2. two GEMMs of one form, weights read in place.
    form, uses = _find_gemms(region, forms)
    if len(uses) != 2:
        raise Reject(
            f"expected 2 expert GEMMs (gate_up, down) in the {form} form, found {len(uses)}: "
            f"{[u.node.name for u in uses]}"
        )
    up, down = uses
    for use, role in ((up, "gate_up"), (down, "down")):
        if not is_param_read(use.weight, 3):
            raise Reject(
                f"the {role} GEMM's weight `{use.weight.name}` is not a 3-D graph input (a parameter read in place, "
                "or a DTensor parameter's local shard)"
            )
    if up.weight is down.weight:
        raise Reject("both GEMMs read the same weight")
    if up.transposed_storage != down.transposed_storage:
        raise Reject("gate_up and down weights are stored in different layouts")
    if not derives_from(down.x, up.node, region.contains):
        raise Reject(f"the second GEMM `{down.node.name}` does not consume the first `{up.node.name}`")

    # 1. hidden rows feed the first GEMM.
    hidden = follow(up.x, gathers=True, within=region.contains)
    h_dims = dims(hidden)
    if h_dims is None or len(h_dims) != 2 or not example_value(hidden).is_floating_point():
        raise Reject(
            f"the gate_up GEMM's rows come from `{hidden.name}` of shape {h_dims}, expected a 2-D [T, H] float tensor"
        )

    # 3. the gated activation (through transformers 5.17's expert-parallel sentinel fills, identities here),
    #    after each GEMM's optional per-expert bias.
    E = dims(up.weight)[0]
    transparent = _sentinel_fills(region, E)
    b_gate_up, b_down = _gemm_bias(up, region, E), _gemm_bias(down, region, E)
    gated = recognize_gated_activation(down.x, follow(up.out, transparent=transparent), transparent)

    # 4. router weights multiply the down output; the products are summed over k.
    inputs = [i for i in region.inputs if is_tensor_node(i)]
    id_inputs = [i for i in inputs if not example_value(i).is_floating_point() and example_value(i).dim() == 2]
    if len(id_inputs) != 1:
        raise Reject(f"expected one integer [T, k] routing input (top-k ids), found {[i.name for i in id_inputs]}")
    topk_ids = _op_ids(region, id_inputs[0], up.node, E)
    weighted = None
    for n in region.nodes:
        if op_name(n) != "mul" or not derives_from(n, down.node, region.contains):
            continue
        for y, w in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if (
                isinstance(w, fx.Node) and derives_from(y, down.node, region.contains)
                and not derives_from(w, down.node, region.contains)
            ):
                src = follow(w, through=_WEIGHT_PATH, gathers=True, within=region.contains)
                computed = region.contains(src) and example_value(src).is_floating_point()  # EP's masked weights
                if (src in inputs or computed) and src is not hidden and dims(src) == dims(topk_ids):
                    weighted = (n, src)
    if weighted is None:
        raise Reject(
            "no multiply of the down GEMM's output by a [T, k] router-weight input (input-side scaling is not this op)"
        )
    mul, topk_weights = weighted
    if not derives_from(output, mul, region.contains):
        raise Reject("the region output does not derive from the router-weighted expert outputs")
    inside = region.contains
    sums = [n for n in region.nodes if _sums_over_k(n)]
    if not any(derives_from(n, mul, inside) and derives_from(output, n, inside) for n in sums):
        raise Reject("the weighted expert outputs are not summed over the k slots ([T, k, H].sum(1))")
    if not derives_from(up.node, topk_ids, region.contains):
        raise Reject("the expert GEMM's grouping / weight gather does not depend on the top-k ids")

    routing = [i for i in inputs if dims(i) == dims(topk_ids) and derives_from(topk_weights, i, inside)]
    known = {hidden, id_inputs[0], *routing, param_input(up.weight), param_input(down.weight), b_gate_up, b_down}
    extra = [i for i in inputs if i not in known]
    if extra:
        raise Reject(f"unexpected tensor inputs {[(i.name, dims(i)) for i in extra]} (e.g. a post-expert norm: NYI)")

    w1 = dims(up.weight)
    I2 = w1[2] if up.transposed_storage else w1[1]
    shape = {"T": h_dims[0], "H": h_dims[1], "E": E, "I": I2 // 2, "k": dims(topk_ids)[1]}
    spec = ExpertsSpec(gated.activation, gated.layout, up.transposed_storage, gated.swiglu_alpha, gated.swiglu_limit)
    # Expert parallelism: the region remaps ids itself (5.24), or zeroes the rows of ids >= E (5.17's grouped_mm).
    sentinels = topk_ids is not id_inputs[0] or bool(transparent)
    return ExpertsMatch(form, spec, region, output, shape, hidden, topk_ids, topk_weights, up.weight, down.weight,
                        b_gate_up, b_down, sentinels)
