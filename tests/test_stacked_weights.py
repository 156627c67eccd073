"""stacked_weights.py: per-expert parameters re-laid out once as views of one stacked tensor (the same objects,
read in place), refused when they cannot be, and saved / loaded like any model."""

from __future__ import annotations

import pytest
import torch

from moe_compiler import restack_experts
from moe_compiler.stacked_weights import stacked
from moe_compiler.testing import expert_parts
from moe_compiler.testing.hf_models import tiny_model

E, H, I = 5, 24, 12


def _parts(per_expert: int):
    return expert_parts(E, H, I, per_expert)


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


def test_restack_refuses_mixed_or_repeated_parts():
    _, _, gate_up, _ = _parts(2)
    with pytest.raises(ValueError, match="appears twice"):
        restack_experts([gate_up[0], gate_up[0]])
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        restack_experts([gate_up[0], gate_up[1].double()])


def test_save_pretrained_round_trips_restacked_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3_moe")
    assert restack_experts([layer.mlp.gate.weight for layer in model.model.layers])  # views of one storage
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
