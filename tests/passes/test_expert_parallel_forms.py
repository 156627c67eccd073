"""The experts of one expert-parallel rank, in one process: transformers' all-reduce EP (5.24) replaces the experts'
forward by one that remaps the global ids to this rank's (`where(id // E != rank, E, id % E)`, E the local count
and the sentinel) and masks the off-rank weights, on the local shards, with `_is_expert_parallel` set (the
grouped_mm forward then zeroes sentinel rows). The op must take the remapped ids and masked weights, and the
numerical check must route pairs to the sentinel. The all-reduce itself is left out here (the two-rank test,
tests/integrations/test_expert_parallel.py, has it)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_models import tiny_model


def compiled_and_eager(model, tmp_path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(compiled logits, eager logits, the dump's summary) on one fixed batch."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="fused_moe", options={"moe_compiler.dump_dir": str(tmp_path)})(
            input_ids=ids).logits
    return compiled, eager, (tmp_path / "summary.txt").read_text()


def local_experts(model, rank: int, ranks: int, mask_rows: bool = True):
    """(layer, experts module, local count n) per MoE layer, each experts module cut to rank `rank`'s n shards."""
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        n = experts.num_experts // ranks
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(experts, name)
                setattr(experts, name, torch.nn.Parameter(p[rank * n:(rank + 1) * n].clone()))
        experts.num_experts, experts._is_expert_parallel = n, mask_rows
        yield layer, experts, n


def one_rank(model, rank: int, ranks: int = 2, mask_rows: bool = True):
    """`model` turned into rank `rank` of `ranks`: local expert shards, transformers' remapping forward."""
    for _, experts, n in local_experts(model, rank, ranks, mask_rows):
        forward = experts.forward

        def ep_forward(hidden, ids, weights, forward=forward, n=n):
            off_rank = (ids // n) != rank
            local = torch.where(off_rank, n, ids % n)
            return forward(hidden, local, weights.masked_fill(off_rank, 0.0))

        experts.forward = ep_forward
    return model


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_a_rank_fuses_with_its_local_ids(arch, rank, tmp_path):
    model = one_rank(tiny_model(arch), rank)
    compiled, eager, summary = compiled_and_eager(model, tmp_path)
    assert sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_experts")) == 2
    # the router too, through the remap (which stays, reading the route op's global ids and weights)
    assert sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_router")) == 2
    assert rel_err(compiled, eager) <= 1e-5
    assert summary.count("sentinel ids") == 2, summary


def router_remap_rank(model, rank: int, ranks: int, sentinel_fill=None):
    """`model` turned into rank `rank` of `ranks` the way transformers 5.17 does it: the remap runs on the router's
    output (RouterParallel's hook), a chain of fills, and the experts module's own forward takes the local ids.
    sentinel_fill: another value for the last fill (a form whose range is not [0, E])."""
    for layer, _, n in local_experts(model, rank, ranks):
        gate = layer.mlp.gate.forward

        def remapped(hidden, gate=gate, n=n):
            logits, scores, ids = gate(hidden)
            off_rank = (ids // n) != rank
            scores = scores.masked_fill(off_rank, 0.0)
            ids = ids.masked_fill(off_rank, -1)
            if n > 1:
                ids = torch.fmod(ids, n)
            else:
                ids = ids.masked_fill(ids > 0, 0).masked_fill(ids < 0, -1)
            return logits, scores, ids.masked_fill(ids == -1, n if sentinel_fill is None else sentinel_fill)

        layer.mlp.gate.forward = remapped
    return model


@pytest.mark.parametrize("rank,ranks", [(0, 2), (1, 2), (3, 4)], ids=["fmod-0", "fmod-1", "one_expert_per_rank"])
def test_the_router_fuses_through_the_remap_on_its_output(rank, ranks, tmp_path):
    """transformers 5.17's expert parallelism remaps on the router's output with masked fills and fmod (with one
    expert per rank: two more fills): the same values as 5.24's `where` form, so the router fuses through it; the
    remap stays, reading the route op's global ids and weights. One expert per rank is also a rank holding fewer
    experts than the top-k (E = 1 < k = 2): the op takes the extra sentinel slots."""
    model = router_remap_rank(tiny_model("qwen3_moe", num_experts=4), rank, ranks)
    compiled, eager, summary = compiled_and_eager(model, tmp_path)
    assert sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_experts")) == 2
    assert sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_router")) == 2, summary
    assert rel_err(compiled, eager) <= 1e-5


def test_a_remap_chain_in_another_form_keeps_the_router_with_inductor(tmp_path):
    """The same chain sending off-rank pairs to expert 0 (their weight 0) instead of the sentinel E: not the remap's
    form, the router is not fused (the dump says why), the logits stay right."""
    model = router_remap_rank(tiny_model("qwen3_moe", num_experts=4), 0, 2, sentinel_fill=0)
    compiled, eager, summary = compiled_and_eager(model, tmp_path)
    assert not any(k.startswith("fused_router") for k in counters["moe_compiler"]), summary
    assert "masked_fill" in summary
    assert rel_err(compiled, eager) <= 1e-5


def _remap_graph(E: int, rank: int, change: str = ""):
    """An FX graph of transformers 5.17's remap on global ids g and weights w (E local experts), or of a near miss."""
    import torch.fx as fx

    def remap(g, w):
        off = (g // E) != rank
        w = w.masked_fill(off, 0.0)
        a = g.masked_fill(off, -1)
        if E > 1:
            b = torch.fmod(a, E) if change != "remainder" else torch.remainder(a, E)
        else:
            b = a.masked_fill(a > 0, 0).masked_fill((a < 0) if change != "le" else (a <= 0), -1)
        return b.masked_fill(b == -1, E), w

    return fx.symbolic_trace(remap).graph


@pytest.mark.parametrize("E,change", [(4, ""), (1, ""), (4, "remainder"), (1, "le")])
def test_the_fill_chain_is_recognized_exactly(E, change):
    """Both branches of 5.17's chain (fmod for E > 1, two fills for E == 1) give the global ids and weights and the
    three remap nodes that read them; a near miss (remainder, which maps the -1 of an off-rank pair to E - 1; or a
    fill mask `a <= 0`, which sends expert 0 to the sentinel) is not recognized."""
    from moe_compiler.passes.router import _ep_remap

    graph = _remap_graph(E, 1, change)
    g, w = [n for n in graph.nodes if n.op == "placeholder"]
    ids, weights = next(n for n in graph.nodes if n.op == "output").args[0]
    found = _ep_remap(ids, weights, E)
    if change:
        assert found is None
        return
    assert found is not None and found[:2] == (g, w)
    assert {n for n in found[2]} == set(g.users) | set(w.users)
    assert _ep_remap(ids, weights, E + 1) is None  # another local count: not this remap


@pytest.mark.parametrize("remap", ["past_the_sentinel", "shifted"])
def test_ids_remapped_in_another_form_are_not_fused(remap, tmp_path):
    """Ids computed inside the experts region in any form but transformers' `where(off, E, ids % E)`: their range
    is not proven to be [0, E] (here: off-rank pairs sent to E + 1, which the module's forward masks and the op
    would refuse; a plain shift): the region stays with Inductor, the dump says why, the logits stay right."""
    model = one_rank(tiny_model("qwen3_moe"), 0)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        n = experts.num_experts
        forward = experts.forward.__defaults__[0]  # transformers' own forward under one_rank's

        def other(hidden, ids, weights, forward=forward, n=n):
            off_rank = ids >= n
            local = torch.where(off_rank, n + 1, ids % n) if remap == "past_the_sentinel" else (ids - 1).clamp(0)
            return forward(hidden, local, weights.masked_fill(off_rank, 0.0))

        experts.forward = other
    compiled, eager, summary = compiled_and_eager(model, tmp_path)
    assert rel_err(compiled, eager) <= 1e-5
    assert counters["moe_compiler"]["rejected_experts"] == 2, summary
    assert "not proven to be [0, E]" in summary


def test_experts_after_a_graph_break_in_their_module_still_fuse(tmp_path):
    """A graph break inside the experts module's forward before transformers' experts forward (all-to-all EP reads
    its split sizes back there): Dynamo's resumed frame has no module stack; the region is found by the experts
    forward in the nodes' stack trace, proven and fused like any other."""
    model = tiny_model("qwen3_moe")
    for layer in model.model.layers:
        forward = layer.mlp.experts.forward

        def broken(hidden, ids, weights, forward=forward):
            torch._dynamo.graph_break()
            return forward(hidden, ids, weights)

        layer.mlp.experts.forward = broken
    compiled, eager, summary = compiled_and_eager(model, tmp_path)
    assert rel_err(compiled, eager) <= 1e-5
    # the second layer's resumed frame is the first's code: Dynamo reuses its compiled (fused) graph
    assert counters["moe_compiler"]["fused_experts_grouped_mm"] >= 1 and not counters["moe_compiler"][
        "rejected_experts"], summary
    assert "[fused] <grouped_mm_experts_forward #0>" in summary


@pytest.mark.parametrize("spelling", ["method", "prim_to_local"])
def test_a_dtensor_shards_read_is_a_parameter_read_in_either_spelling(spelling):
    """torch 2.13 traces `param.to_local()` as a method call; torch 2.11 as a call of a function Dynamo writes,
    `prim_to_local`: both are the local shard read in place. A 2-D read, or to_local of a computed tensor, is not."""
    import torch.fx as fx

    from moe_compiler.passes.fx_utils import is_param_read, param_input

    def prim_to_local(x):
        return x

    g = fx.Graph()
    w = g.placeholder("w")
    w.meta["example_value"] = torch.empty(4, 6, 8)
    computed = g.call_function(torch.neg, (w,))
    computed.meta["example_value"] = torch.empty(4, 6, 8)
    reads = []
    for source in (w, computed):
        node = (g.call_method("to_local", (source,)) if spelling == "method"
                else g.call_function(prim_to_local, (source,)))
        node.meta["example_value"] = torch.empty(2, 6, 8)
        reads.append(node)
    assert is_param_read(reads[0], 3) and param_input(reads[0]) is w
    assert not is_param_read(reads[0], 2)
    assert not is_param_read(reads[1], 3)
