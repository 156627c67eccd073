"""torch.ops.moe_compiler.experts_unstacked (per-expert weight parts) and stacked_weights.py: the same
function as the stacked op, in place once the parts tile one storage, correct (and loud) when not."""

from __future__ import annotations

import warnings

import pytest
import torch

import moe_compiler  # noqa: F401  (registers the ops)
from moe_compiler import ExpertsSpec, restack_experts
from moe_compiler.stacked_weights import stacked, tiles
from reference import experts_reference, rel_err

E, H, I = 5, 24, 12
OP = torch.ops.moe_compiler.experts_unstacked.default


def _parts(per_expert: int, dtype=torch.float32, seed=0):
    """Stacked reference weights and the same values as separate per-expert tensors (nn.Linear layout)."""
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    rows = 2 * I // per_expert
    gate_up = [w1[e, i * rows:(i + 1) * rows].clone() for e in range(E) for i in range(per_expert)]
    down = [w2[e].clone() for e in range(E)]
    return w1, w2, gate_up, down


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


def test_restack_keeps_the_objects_and_values_and_reads_in_place():
    _, _, gate_up, down = _parts(2)
    params = [torch.nn.Parameter(p.clone()) for p in gate_up]
    values = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    assert restack_experts(params) and not restack_experts(params)  # once
    assert [id(p) for p in params] == ids and all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(p.is_leaf and p.requires_grad for p in params)
    view = stacked(params, E)
    with torch.no_grad():
        params[3].add_(1.0)  # an in-place update lands in the stacked tensor the op reads
    assert torch.equal(view[1, I:], params[3])


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
    for got, want in ((x.grad, ref_leaves[0].grad), (w.grad, ref_leaves[1].grad), (d_w1, ref_leaves[2].grad), (d_w2, ref_leaves[3].grad)):
        assert rel_err(got, want) <= 1e-5


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


def test_restack_refuses_mixed_or_repeated_parts():
    _, _, gate_up, _ = _parts(2)
    with pytest.raises(ValueError, match="appears twice"):
        restack_experts([gate_up[0], gate_up[0]])
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        restack_experts([gate_up[0], gate_up[1].double()])


def test_save_pretrained_round_trips_restacked_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_models import tiny_model

    model = tiny_model("qwen3_moe")
    assert restack_experts([layer.mlp.gate.weight for layer in model.model.layers])  # views of one storage
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
