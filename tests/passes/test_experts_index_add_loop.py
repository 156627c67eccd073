"""Static expert loops ending in index_add_ (passes/experts_index_add_loop.py): transformers-v4 and
hand-written blocks with nn.ModuleList or stacked experts, under capture_dynamic_output_shape_ops."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import moe_compiler
from moe_compiler.stacked_weights import tiles
from moe_compiler.testing import rel_err
from moe_compiler.testing.legacy_models import (
    FORMS,
    LoopForm,
    LoopMoeBlock,
    TinyLoopLM,
    expert_parts,
)

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _capture_where():
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


def _model(form: LoopForm, dtype=torch.float32, seed: int = 0) -> TinyLoopLM:
    torch.manual_seed(seed)
    return TinyLoopLM(form).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_loop_forms_fuse_and_match_eager(name, dtype):
    model = _model(FORMS[name], dtype)
    with torch.no_grad():
        ref = model(IDS)
        out = torch.compile(model, backend="fused_moe", fullgraph=True)(IDS)
    assert counters["moe_compiler"]["fused_experts_index_add_loop"] == 2
    assert counters["moe_compiler"]["rejected_experts"] == 0
    assert counters["moe_compiler"]["fused_router_softmax_topk"] == 2
    assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 2e-2)
    if FORMS[name].shared:
        assert counters["moe_compiler"]["shared_experts_sigmoid_gated"] == 2


def test_no_nonzero_survives_in_the_compiled_code():
    # Dynamo's runtime asserts on each `where` size would keep the nonzero (a host sync) alive.
    from torch._inductor.utils import run_and_get_code

    model = _model(FORMS["mixtral_v4"])
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(model, backend="fused_moe"), IDS)
    code = "\n".join(codes)
    assert "moe_compiler.experts_unstacked" in code
    assert "nonzero" not in code and "_assert_scalar" not in code


def test_module_list_weights_are_read_in_place_and_memory_does_not_grow():
    model = _model(FORMS["mixtral_v4"])
    parts = expert_parts(model.blocks[0])
    ids_before = [id(p) for p in parts]
    bytes_before = sum(p.untyped_storage().nbytes() for p in parts)
    with torch.no_grad():
        torch.compile(model, backend="fused_moe")(IDS)
    assert [id(p) for p in parts] == ids_before  # the same Parameter objects
    experts = model.blocks[0].experts
    gate_up = [p for e in range(4) for p in (experts[e].w1.weight, experts[e].w3.weight)]
    down = [model.blocks[0].experts[e].w2.weight for e in range(4)]
    assert tiles(gate_up) and tiles(down)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parts}
    assert sum(storages.values()) == bytes_before  # one stacked storage per projection group, nothing kept beside
    assert counters["moe_compiler"]["restacked_weight_groups"] == 4  # 2 layers x (gate_up, down)


def test_in_place_weight_updates_reach_the_compiled_model():
    model = _model(FORMS["qwen2_moe_v4"])
    compiled = torch.compile(model, backend="fused_moe")
    with torch.no_grad():
        compiled(IDS)
        for p in expert_parts(model.blocks[1]):
            p.mul_(-1.5)  # what optimizer.step() / load_state_dict do: write into the parameters
        ref = model(IDS)
        out = compiled(IDS)
    assert rel_err(out, ref) <= 1e-5


def test_training_gradients_match_eager():
    model = _model(FORMS["mixtral_v4"])
    twin = _model(FORMS["mixtral_v4"])
    compiled = torch.compile(model, backend="fused_moe", options={"moe_compiler.training": True})
    compiled(IDS).square().mean().backward()
    twin(IDS).square().mean().backward()
    assert counters["moe_compiler"]["fused_experts_index_add_loop"] == 2
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, grads[name].grad) <= 1e-4, name
    # An optimizer step writes through the views; the next compiled call sees it.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert rel_err(compiled(IDS), twin(IDS)) <= 1e-5


def test_reassigned_weight_is_still_correct_and_warns():
    model = _model(FORMS["mixtral_v4"])
    compiled = torch.compile(model, backend="fused_moe")
    with torch.no_grad():
        compiled(IDS)
        w1 = model.blocks[0].experts[2].w1.weight
        w1.data = torch.randn_like(w1)  # no longer a view of the stacked tensor
        ref = model(IDS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(IDS)
    assert rel_err(out, ref) <= 1e-5
    assert any("no longer tile one stacked tensor" in str(w.message) for w in caught)
    experts = model.blocks[0].experts
    moe_compiler.restack_experts([p for e in range(4) for p in (experts[e].w1.weight, experts[e].w3.weight)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(compiled(IDS), ref) <= 1e-5


def _reasons(tmp_path) -> list[str]:
    return [p.read_text().strip() for p in sorted(tmp_path.glob("graph_*/region_*_rejected_*/reason.txt"))]


@pytest.mark.parametrize(
    "form, reason",
    [
        (LoopForm(experts_run=3), "the loop covers experts [0, 1, 2] of E=4 (missing [3]"),
        (LoopForm(expert_bias=True), "Linear has a bias"),
    ],
)
def test_unprovable_loops_are_left_alone_with_a_reason(form, reason, tmp_path):
    model = _model(form)
    with torch.no_grad():
        ref = model(IDS)
        out = torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(IDS)
    assert rel_err(out, ref) <= 1e-5
    assert counters["moe_compiler"]["fused_experts_index_add_loop"] == 0
    reasons = _reasons(tmp_path)
    assert len(reasons) == 2 and all(reason in r for r in reasons), reasons


class _PeekingBlock(LoopMoeBlock):
    """Reads the accumulator inside the loop (a partial sum): not the experts op's function."""

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        w, sel = torch.topk(F_softmax(self.gate(x)), self.top_k, dim=-1)
        final = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
        peek = None
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            final.index_add_(0, top_x, self.experts[e](x[top_x]) * w[top_x, idx, None])
            if e == 1:
                peek = final * 1.0
        return (final + peek).reshape(b, s, h), None


def F_softmax(logits):
    return torch.softmax(logits, dim=-1)


def test_partial_sum_read_is_rejected(tmp_path):
    torch.manual_seed(0)
    block = _PeekingBlock(form=LoopForm())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = block(x)[0]
        out = torch.compile(block, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(x)[0]
    assert rel_err(out, ref) <= 1e-5
    (reason,) = _reasons(tmp_path)
    assert "reads the accumulator before the last index_add_" in reason


def test_shared_weight_between_experts_is_rejected(tmp_path):
    model = _model(FORMS["mixtral_v4"])
    for blk in model.blocks:
        blk.experts[3] = blk.experts[0]  # tied experts: no stacked layout can hold both slots
    with torch.no_grad():
        ref = model(IDS)
        out = torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(IDS)
    assert rel_err(out, ref) <= 1e-5
    reasons = _reasons(tmp_path)
    assert len(reasons) == 2 and all("shared between experts" in r for r in reasons), reasons


def test_dump_names_the_loop_and_the_weight_layout(tmp_path):
    model = _model(FORMS["mixtral_v4"])
    with torch.no_grad():
        torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(IDS)
    specs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("graph_*/region_*_fused_*/spec.json"))]
    assert [s["form"] for s in specs] == ["index_add_loop", "index_add_loop"]
    assert "re-laid out once" in specs[0]["weights"]
    after = next(tmp_path.glob("graph_*/region_*_fused_*/after.py")).read_text()
    assert "moe_compiler.experts_unstacked.default" in after
    summary = (tmp_path / "summary.txt").read_text()
    assert "[fused] blocks.0 (LoopMoeBlock" in summary


def test_without_capture_dynamic_output_shape_ops_the_model_runs_unfused(tmp_path):
    # torch.where breaks the graph inside the loop, so Dynamo skips the block's frame (no graph of it
    # reaches the backend, only the expert MLPs): correct, unfused; README says to set the flag.
    model = _model(FORMS["mixtral_v4"])
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False), torch.no_grad():
        ref = model(IDS)
        out = torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(IDS)
    assert rel_err(out, ref) <= 1e-5
    assert counters["moe_compiler"]["fused_experts_index_add_loop"] == 0
    assert counters["moe_compiler"]["graphs"] > 0


def test_other_scatter_adds_are_not_candidates():
    def scatter_add(x, index):  # a GNN-style aggregation: index_add_ by a given index, no expert mask
        return torch.zeros_like(x).index_add_(0, index, x * 2)

    x, index = torch.randn(6, 4), torch.tensor([0, 0, 1, 2, 2, 5])
    out = torch.compile(scatter_add, backend="fused_moe")(x, index)
    assert torch.equal(out, scatter_add(x, index))
    assert counters["moe_compiler"]["graphs"] == 1
    assert (
        counters["moe_compiler"]["rejected_experts"] == 0
        and counters["moe_compiler"]["fused_experts_index_add_loop"] == 0
    )


# --- on the GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_expert_loops_bf16_on_gpu(name, mode):
    """The loop fuses (both layers), the nonzero-based loop is gone so cudagraph trees capture the whole
    graph, and the logits follow eager through several calls (record, then replays) and an in-place
    weight update."""
    torch.manual_seed(0)
    model = TinyLoopLM(FORMS[name]).to("cuda", torch.bfloat16)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, backend="fused_moe", mode=mode)
        for seed in range(4):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            ids = torch.randint(0, 64, (2, 9), device="cuda", generator=gen)
            with torch.no_grad():
                if seed == 3:
                    for p in model.parameters():
                        p.mul_(1.25)
                torch.compiler.cudagraph_mark_step_begin()
                out = compiled(ids).clone()
                ref = model(ids)
            assert rel_err(out, ref) <= 2e-2, seed
    assert counters["moe_compiler"]["fused_experts_index_add_loop"] == 2
    assert counters["inductor"].get("cudagraph_skips", 0) == 0
    if FORMS[name].mlp != "stacked":
        parts = expert_parts(model.blocks[0])
        assert len({p.untyped_storage().data_ptr() for p in parts}) == 2 and not any(tiles([p]) is False for p in parts)


@pytest.mark.gpu
def test_expert_loop_training_on_gpu_matches_eager():
    torch.manual_seed(0)
    fused = TinyLoopLM(FORMS["mixtral_v4"]).cuda()
    torch.manual_seed(0)
    eager = TinyLoopLM(FORMS["mixtral_v4"]).cuda()
    ids = torch.randint(0, 64, (2, 9), device="cuda")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(fused, backend="fused_moe", options={"moe_compiler.training": True})
        compiled(ids).square().mean().backward()
    eager(ids).square().mean().backward()
    assert counters["moe_compiler"]["fused_experts_index_add_loop"] == 2
    ref = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        assert rel_err(p.grad, ref[name].grad) <= 1e-4, name
