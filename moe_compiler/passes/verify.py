"""Numerical checks of proven matches: run the original nodes and the replacing op on the same fresh inputs.

The structural proof fixes the spec; this second, independent line of evidence covers what structure leaves
implicit (the sort / unsort plumbing, which slot a weight belongs to, how a group mask is built). Inputs: the
model's real weights (the backend's example inputs, read only), random hidden rows, random distinct top-k ids,
random router weights or tie-free router logits, at the traced sizes (symbolic sizes at their hints). Both
sides run in the graph's own dtype, so the tolerance is that dtype's rounding. A model whose weights are on
the meta device has no values to compute with: the check is skipped and says so (the structural proof stands).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.fx as fx

from ..ops.signature import OpCall
from ..spec import RouteOrder
from ..stacked_weights import UntiledWeightsWarning
from .fx_utils import backward_slice, example_value, in_graph_order, subgraph_module
from .match import Reject

# Agreement required between the original nodes and the op. A wrong activation, a swapped gate/up or a
# misrouted row is off by O(1); rounding differences are 2 orders of magnitude below these.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
META_SKIP = "skipped: the model's weights are on the meta device (no values to check); the structural proof stands"


def hint(x) -> int:
    """The concrete value a (possibly symbolic) size had when Dynamo traced; guards on nothing."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return int(x)


def on_meta(nodes) -> bool:
    """The graph computes on the meta device (a model built or moved there): there are no values to check."""
    return any(isinstance(v := example_value(n), torch.Tensor) and v.device.type == "meta" for n in nodes)


class Recorder(fx.Interpreter):
    """Runs a subgraph and keeps the values of the nodes named in `keep` (what the op then reads); every other value
    is freed after its last use, as fx.Interpreter does, so the check holds no more than the region's own eager run.
    (Keeping every node's value held a whole MoE layer's intermediates while the op ran beside them: at prefill
    sizes several GiB above Inductor's peak on the compiling call — DeepSeek-V3 at 4096 tokens, NOTES session 20.)"""

    def __init__(self, module: fx.GraphModule, inputs, keep: set[str]):
        super().__init__(module)
        self.keep = keep
        self.values = {name: v for name, v in inputs if name in keep}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out
        return out


def read_by(kwargs: dict) -> set[str]:
    """The names of the graph nodes an op call's keyword arguments read."""
    names = set()
    fx.node.map_arg(kwargs, lambda n: names.add(n.name))
    return names


def run(what: str, fn: Callable):
    """fn() with any failure to run reported as "not proven"."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Per-expert weights are re-laid out only after compiling: until then the op concatenates them.
            warnings.simplefilter("ignore", UntiledWeightsWarning)
            return fn()
    except Reject:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to run means "not proven"
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise Reject(f"{what} could not run: {type(e).__name__}: {first_line}") from e


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def random_ids(T: int, E: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[T, k] distinct experts per token; with more slots than experts (k > E: an expert-parallel rank holding
    fewer experts than the top-k) the slots past the E-th hold E, the off-rank sentinel."""
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    return torch.cat([ids, ids.new_full((T, k - E), E)], dim=1) if k > E else ids


def with_sentinels(ids: torch.Tensor, E: int) -> torch.Tensor:
    """Every third pair routed off this rank (id E, expert parallelism's sentinel)."""
    ids = ids.clone()
    ids.view(-1)[::3] = E
    return ids


def from_op_inputs(region, cut: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(nodes, inputs) of the region from `cut` on: the nodes only `cut` needed (expert parallelism's id remap)
    left out, `cut` turned into inputs."""
    ancestors = backward_slice(cut, within=region.contains)
    rest = [n for n in region.nodes if n not in ancestors]
    return in_graph_order(backward_slice(rest, stop=cut, within=region.contains), region.nodes[0].graph)


def experts_region(gm: fx.GraphModule, region, call: OpCall, output: fx.Node, shape: dict, real: dict,
                   sentinels: bool = False) -> str:
    """The region's nodes vs `call` on random hidden rows, ids and weights and the model's own weights. Where the
    op's ids and weights are computed inside the region (expert parallelism's global -> local remap) the check
    starts from them. `sentinels` (a region that drops expert parallelism's sentinel pairs itself): every third
    random pair routed to id E. Returns a one-line result; raises Reject if they disagree."""
    t = call.tensors
    if on_meta(region.inputs):
        return META_SKIP
    ev = example_value(t.hidden)
    device, gen = ev.device, torch.Generator().manual_seed(0)
    cut = [n for n in (t.topk_ids, t.topk_weights) if region.contains(n)]
    nodes, inputs = from_op_inputs(region, cut) if cut else (region.nodes, region.inputs)

    def synthesize(node: fx.Node):
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            return hint(value)
        if node in real:
            return real[node]
        size = [hint(s) for s in value.shape]
        if node is t.topk_ids:
            T, k = size
            if k > hint(shape["E"]) and not sentinels:  # a top-k over E experts has k <= E
                raise Reject(f"numerical check: top-k of {k} over {hint(shape['E'])} experts without expert "
                             "parallelism's sentinel ids: NYI")
            ids = random_ids(T, hint(shape["E"]), k, gen)
            return (with_sentinels(ids, hint(shape["E"])) if sentinels else ids).to(device=device, dtype=value.dtype)
        if node is t.topk_weights:
            return (torch.rand(size, generator=gen) * 0.5).to(device=device, dtype=value.dtype)
        if value.is_floating_point():
            return torch.randn(size, generator=gen).to(device=device, dtype=value.dtype)
        raise Reject(f"numerical check: cannot synthesize input `{node.name}` ({value.dtype}, {size})")

    sub = subgraph_module(gm, nodes, inputs, [output], f"Region_{region.cls}")
    args = [synthesize(i) for i in inputs]
    rec = Recorder(sub, zip((i.name for i in inputs), args), keep=read_by(call.kwargs()))

    def both():
        want = rec.run(*args)
        got = call.op(**fx.node.map_arg(call.kwargs(), lambda n: rec.values[n.name]))
        return want, got

    want, got = run("numerical check", both)
    err, tol = rel_err(got, want), TOLERANCE[ev.dtype]
    if not err <= tol:  # also catches NaN
        raise Reject(f"numerical check failed: region vs op relative error {err:.2e} > {tol:.0e} on random routing"
                     + (" with sentinel ids" if sentinels else ""))
    return f"rel err {err:.1e} <= {tol:.0e} (T={want.shape[0]}, {ev.dtype}{', sentinel ids' if sentinels else ''})"


def router_logits(shape, dtype, gen, device, near_ties: bool = False) -> torch.Tensor:
    """Random logits without ties in any row, even after rounding to a 16-bit dtype: a random
    permutation of a grid of multiples of 1/8 (exact in bf16 / fp16 for E <= 256), plus fp32 noise
    smaller than the grid step in fp32. `near_ties` (the sparse mixer's relative near-tie test): rows
    of 4 + multiples of 1/32 (exact in bf16 for E <= 128), every other row negated, so each round's best
    has a few experts within a few percent."""
    T, E = shape
    if near_ties and E <= 128:
        grid = torch.rand(T, E, generator=gen).argsort(dim=1).float().div_(32).add_(4)
        grid[1::2] *= -1
        return grid.to(device=device, dtype=dtype)
    grid = torch.rand(T, E, generator=gen).argsort(dim=1).float().sub_(E / 2).div_(8)
    if dtype == torch.float32:
        grid += torch.rand(T, E, generator=gen) * 0.1
    return grid.to(device=device, dtype=dtype)


def router(gm: fx.GraphModule, match, real: dict, dtype_template_only: Callable[[fx.Node], bool]) -> str:
    """Run the router's own nodes and `moe_compiler.route` on fresh logits (the model's own bias and
    parameters): the same experts must be chosen for every token and get the same weights."""
    if on_meta(match.inputs):
        return META_SKIP
    sub = subgraph_module(gm, match.nodes, match.inputs, [match.weights, match.ids], "Router")
    gen = torch.Generator().manual_seed(0)
    args = []
    for node in match.inputs:
        ev = example_value(node)
        if node is match.logits:
            near_ties = match.spec.order is RouteOrder.SPARSEMIXER
            args.append(router_logits([hint(s) for s in ev.shape], ev.dtype, gen, ev.device, near_ties))
        elif not isinstance(ev, torch.Tensor):
            args.append(hint(ev))
        elif node in real:
            args.append(real[node])
        elif dtype_template_only(node):
            args.append(torch.empty(0, dtype=ev.dtype, device=ev.device))  # `x.type_as(node)` reads its dtype only
        else:
            raise Reject(f"router numerical check: cannot provide input `{node.name}`")
    keep = {n.name for n in (match.logits, match.correction_bias) if n is not None}
    rec = Recorder(sub, zip((i.name for i in match.inputs), args), keep)

    def both():
        want_w, want_i = rec.run(*args)
        # The bias may be a parameter or a view of one computed inside the router (Ernie's squeeze).
        bias = rec.values[match.correction_bias.name] if match.correction_bias is not None else None
        got_w, got_i = torch.ops.moe_compiler.route(rec.values[match.logits.name], bias, **match.spec.op_kwargs())
        return want_w, want_i, got_w, got_i

    want_w, want_i, got_w, got_i = run("router numerical check", both)
    # Slot order is free (the experts op sums over slots): compare each token's experts sorted by id.
    want_i, order_w = want_i.long().sort(dim=1)
    got_i, order_g = got_i.long().sort(dim=1)
    if not torch.equal(want_i, got_i):
        rows = int((want_i != got_i).any(dim=1).sum())
        raise Reject(f"router numerical check failed: different experts chosen for {rows} of {want_i.shape[0]} tokens")
    tol = TOLERANCE.get(want_w.dtype, 1e-4)
    err = rel_err(got_w.gather(1, order_g), want_w.gather(1, order_w))
    if not err <= tol:
        raise Reject(f"router numerical check failed: weights differ by {err:.2e} > {tol:.0e}")
    return f"same experts for {want_i.shape[0]} tokens, weights rel err {err:.1e}"
