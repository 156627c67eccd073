"""Numerical check of a proven region: run the original subgraph and the op on the same fresh inputs.

The structural proof (experts_common.py) fixes the spec; this second, independent line of evidence
covers what structure leaves implicit (the sort / unsort plumbing, which slot a weight belongs to).
Inputs: the model's real expert weights (the backend's example inputs, read only), random hidden rows,
random distinct top-k ids and random router weights, at the traced sizes (symbolic sizes at their
hints). Both sides run in the region's own dtype, so the tolerance is that dtype's rounding.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.fx as fx

from ..routing import RouteOrder
from ..stacked_weights import UNTILED_WARNING
from .experts_common import ExpertsMatch
from .regions import Region, example_value, region_module
from .reject import Reject

# Agreement required between the region and the op. A wrong activation, a swapped gate/up or a
# misrouted row is off by O(1); rounding differences are 2 orders of magnitude below these.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _hint(x) -> int:
    """The concrete value a (possibly symbolic) size had when Dynamo traced; guards on nothing."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return int(x)


class _Recorder(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _synthesize(node: fx.Node, match: ExpertsMatch, real: dict, gen: torch.Generator, device):
    ev = example_value(node)
    if not isinstance(ev, torch.Tensor):
        return _hint(ev)
    if node in real:
        return real[node]
    shape = [_hint(s) for s in ev.shape]
    if node is match.topk_ids:
        T, k = shape
        E = _hint(match.shape["E"])
        ids = torch.rand(T, E, generator=gen, device="cpu").argsort(dim=1)[:, :k]
        return ids.to(device=device, dtype=ev.dtype)
    if ev.is_floating_point():
        scale = 0.5 if node is match.topk_weights else 1.0
        x = torch.rand(shape, generator=gen) * scale if node is match.topk_weights else torch.randn(shape, generator=gen)
        return x.to(device=device, dtype=ev.dtype)
    raise Reject(f"numerical check: cannot synthesize input `{node.name}` ({ev.dtype}, {shape})")


def verify_numerically(gm: fx.GraphModule, region: Region, match: ExpertsMatch, real: dict) -> str:
    """`match` is any match with hidden / topk_ids / topk_weights / output / shape / op / op_args().
    Returns a one-line result; raises Reject if the region and the op disagree."""
    device = example_value(match.hidden).device
    gen = torch.Generator().manual_seed(0)
    sub = region_module(gm, region, outputs=[match.output])
    args = [_synthesize(i, match, real, gen, device) for i in region.inputs]
    rec = _Recorder(sub)
    rec.values = dict(zip((i.name for i in region.inputs), args))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Per-expert weights are re-laid out only after compiling: until then the op concatenates them.
            warnings.filterwarnings("ignore", message=re.escape(UNTILED_WARNING[:60]))
            expected = rec.run(*args)
            v = lambda n: rec.values[n.name]  # noqa: E731
            got = match.op(*fx.node.map_arg(match.op_args(), v))
    except Reject:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to run means "not proven"
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise Reject(f"numerical check could not run: {type(e).__name__}: {first_line}") from e
    expected, got = expected.double(), got.double()
    err = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    tol = TOLERANCE[v(match.hidden).dtype]
    if not err <= tol:  # also catches NaN
        raise Reject(f"numerical check failed: region vs op relative error {err:.2e} > {tol:.0e} on random routing")
    return f"rel err {err:.1e} <= {tol:.0e} (T={expected.shape[0]}, {v(match.hidden).dtype})"


# --- routers ---------------------------------------------------------------------------------------

def _router_logits(shape, dtype, gen, device, near_ties: bool = False) -> torch.Tensor:
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


def verify_router(gm: fx.GraphModule, match, real: dict) -> str:
    """Run the router's own nodes and `moe_compiler.route` on fresh logits (the model's own bias and
    parameters): the same experts must be chosen for every token and get the same weights."""
    from .regions import Region
    from .router import dtype_template_only

    region = Region("router", "router", match.nodes, match.inputs, [match.weights, match.ids])
    sub = region_module(gm, region, outputs=[match.weights, match.ids])
    gen = torch.Generator().manual_seed(0)
    logits_ev = example_value(match.logits)
    device = logits_ev.device
    args = []
    for node in match.inputs:
        ev = example_value(node)
        if node is match.logits:
            near_ties = match.spec.order is RouteOrder.SPARSEMIXER
            args.append(_router_logits([_hint(s) for s in ev.shape], ev.dtype, gen, device, near_ties))
        elif not isinstance(ev, torch.Tensor):
            args.append(_hint(ev))
        elif node in real:
            args.append(real[node])
        elif dtype_template_only(node, match.nodes):
            args.append(torch.empty(0, dtype=ev.dtype, device=ev.device))  # `x.type_as(node)` reads its dtype only
        else:
            raise Reject(f"router numerical check: cannot provide input `{node.name}`")
    rec = _Recorder(sub)
    rec.values = dict(zip((i.name for i in match.inputs), args))
    try:
        with torch.no_grad():
            want_w, want_i = rec.run(*args)
            # The bias may be a parameter or a view of one computed inside the router (Ernie's squeeze).
            bias = rec.values[match.correction_bias.name] if match.correction_bias is not None else None
            got_w, got_i = torch.ops.moe_compiler.route(rec.values[match.logits.name], bias, *match.spec.op_args())
    except Reject:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to run means "not proven"
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise Reject(f"router numerical check could not run: {type(e).__name__}: {first_line}") from e
    # Slot order is free (the experts op sums over slots): compare each token's experts sorted by id.
    want_i, order_w = want_i.long().sort(dim=1)
    got_i, order_g = got_i.long().sort(dim=1)
    if not torch.equal(want_i, got_i):
        rows = int((want_i != got_i).any(dim=1).sum())
        raise Reject(f"router numerical check failed: different experts chosen for {rows} of {want_i.shape[0]} tokens")
    tol = TOLERANCE.get(want_w.dtype, 1e-4)
    want_w, got_w = want_w.double().gather(1, order_w), got_w.double().gather(1, order_g)
    err = float((got_w - want_w).norm() / want_w.norm().clamp_min(1e-30))
    if not err <= tol:
        raise Reject(f"router numerical check failed: weights differ by {err:.2e} > {tol:.0e}")
    return f"same experts for {want_i.shape[0]} tokens, weights rel err {err:.1e}"
