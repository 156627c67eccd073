"""Numerical check of a proven region: run the original subgraph and the op on the same fresh inputs.

The structural proof (experts_common.py) fixes the spec; this second, independent line of evidence
covers what structure leaves implicit (the sort / unsort plumbing, which slot a weight belongs to).
Inputs: the model's real expert weights (the backend's example inputs, read only), random hidden rows,
random distinct top-k ids and random router weights, at the traced sizes (symbolic sizes at their
hints). Both sides run in the region's own dtype, so the tolerance is that dtype's rounding.
"""

from __future__ import annotations

import torch
import torch.fx as fx

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
        E = _hint(example_value(match.w_gate_up).shape[0])
        ids = torch.rand(T, E, generator=gen, device="cpu").argsort(dim=1)[:, :k]
        return ids.to(device=device, dtype=ev.dtype)
    if ev.is_floating_point():
        scale = 0.5 if node is match.topk_weights else 1.0
        x = torch.rand(shape, generator=gen) * scale if node is match.topk_weights else torch.randn(shape, generator=gen)
        return x.to(device=device, dtype=ev.dtype)
    raise Reject(f"numerical check: cannot synthesize input `{node.name}` ({ev.dtype}, {shape})")


def verify_numerically(gm: fx.GraphModule, region: Region, match: ExpertsMatch, real: dict) -> str:
    """Returns a one-line result; raises Reject if the region and the op disagree."""
    device = example_value(match.hidden).device
    gen = torch.Generator().manual_seed(0)
    sub = region_module(gm, region, outputs=[match.output])
    args = [_synthesize(i, match, real, gen, device) for i in region.inputs]
    rec = _Recorder(sub)
    rec.values = dict(zip((i.name for i in region.inputs), args))
    try:
        with torch.no_grad():
            expected = rec.run(*args)
            v = lambda n: rec.values[n.name]  # noqa: E731
            got = torch.ops.moe_compiler.experts(
                v(match.hidden), v(match.topk_ids), v(match.topk_weights), v(match.w_gate_up), v(match.w_down),
                v(match.b_gate_up) if match.b_gate_up is not None else None,
                v(match.b_down) if match.b_down is not None else None,
                *match.spec.op_args(),
            )
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
