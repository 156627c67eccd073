"""torch.ops.moe_compiler.experts_unstacked (ops/experts_unstacked.py): the experts op on per-expert weight parts,
the same function as the stacked op, in place once the parts tile one storage, correct (and loud) when not."""

from __future__ import annotations

import warnings

import pytest
import torch

from moe_compiler import ExpertsSpec, restack_experts
from moe_compiler.stacked_weights import tiles
from moe_compiler.testing import expert_parts, experts_reference, rel_err

E, H, I = 5, 24, 12
OP = torch.ops.moe_compiler.experts_unstacked.default


def _parts(per_expert: int, dtype=torch.float32, seed=0):
    return expert_parts(E, H, I, per_expert, dtype, seed)


def _routing(T, k, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    weights = torch.rand(T, k, generator=g).to(dtype)
    return hidden, ids, weights


@pytest.mark.parametrize("per_expert", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_matches_the_reference_tiled_or_not(per_expert, dtype, tol):
    w1, w2, gate_up, down = _parts(per_expert, dtype)
    hidden, ids, weights = _routing(13, 2, dtype)
    ref = experts_reference(hidden, ids, weights, w1, w2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loose = OP(hidden, ids, weights, gate_up, down, **ExpertsSpec().op_kwargs())
    assert any("no longer tile" in str(w.message) for w in caught)  # separate tensors: concatenated, and said so
    assert restack_experts(gate_up) and restack_experts(down)
    assert tiles(gate_up) and tiles(down)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tiled: no copy, no warning
        tight = OP(hidden, ids, weights, gate_up, down, **ExpertsSpec().op_kwargs())
    assert rel_err(loose, ref) <= tol and rel_err(tight, ref) <= tol
    assert torch.equal(loose, tight)


def test_backward_gives_each_part_its_gradient():
    w1, w2, gate_up, down = _parts(2, torch.float64)
    hidden, ids, weights = _routing(9, 2, torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weights, w1, w2)]
    experts_reference(ref_leaves[0], ids, ref_leaves[1], ref_leaves[2], ref_leaves[3]).square().sum().backward()
    parts = [torch.nn.Parameter(p.float()) for p in gate_up + down]
    restack_experts(parts[: 2 * E]), restack_experts(parts[2 * E:])
    x, w = hidden.float().requires_grad_(), weights.float().requires_grad_()
    OP(x, ids, w, parts[: 2 * E], parts[2 * E:], **ExpertsSpec().op_kwargs()).square().sum().backward()
    d_w1 = torch.stack([torch.cat([parts[2 * e].grad, parts[2 * e + 1].grad]) for e in range(E)])
    d_w2 = torch.stack([p.grad for p in parts[2 * E:]])
    for got, want in zip((x.grad, w.grad, d_w1, d_w2), (leaf.grad for leaf in ref_leaves)):
        assert rel_err(got, want) <= 1e-5


def test_frozen_parts_get_no_gradient_and_the_input_one_is_unchanged():
    _, _, gate_up, down = _parts(2)
    hidden, ids, weights = _routing(9, 2)
    x = hidden.clone().requires_grad_()
    OP(x, ids, weights, gate_up, down, **ExpertsSpec().op_kwargs()).square().sum().backward()
    frozen = x.grad.clone()
    parts = [torch.nn.Parameter(p.clone()) for p in gate_up + down]
    x.grad = None
    OP(x, ids, weights, parts[: 2 * E], parts[2 * E:], **ExpertsSpec().op_kwargs()).square().sum().backward()
    assert torch.equal(x.grad, frozen) and all(p.grad is not None for p in parts)


def test_opcheck():
    _, _, gate_up, down = _parts(2)
    restack_experts(gate_up), restack_experts(down)
    hidden, ids, weights = _routing(7, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opcheck clones the parts one by one: they no longer tile
        torch.library.opcheck(OP, (hidden, ids, weights, gate_up, down), ExpertsSpec().op_kwargs())


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(gate_up=a["gate_up"][:-1]), "E down parts and E or 2E gate_up parts"),
        (lambda a: a.update(down=[d[:, :-1] for d in a["down"]]), r"w_down part shape: expected \[H=24, I=12\]"),
        (lambda a: a.update(gate_up=a["gate_up"][:-1] + [a["gate_up"][0][:-2]]), "2-D .out, in. tensors of one shape"),
        (lambda a: a.update(spec=ExpertsSpec(transposed=True)), "transposed=False and scale_input=False"),
    ],
)
def test_bad_parts_raise_clear_errors(mutate, match):
    _, _, gate_up, down = _parts(2)
    hidden, ids, weights = _routing(4, 2)
    a = {"gate_up": gate_up, "down": down, "spec": ExpertsSpec()}
    mutate(a)
    with pytest.raises(ValueError, match=match):
        OP(hidden, ids, weights, a["gate_up"], a["down"], **a["spec"].op_kwargs())
