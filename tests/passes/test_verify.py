"""passes/verify.py's Recorder: the numerical check keeps only what the op reads, so its memory is the region's own
eager run (it once held every intermediate of a MoE layer while the op ran beside them)."""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from moe_compiler.passes.verify import Recorder, read_by


def test_the_recorder_keeps_what_the_op_reads_and_frees_the_rest():
    def region(x):
        a = x * 2
        b = a + 1
        return (b * b).sum()

    gm = fx.symbolic_trace(region)
    alive = {}

    class Watched(Recorder):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                alive[n.name] = weakref.ref(out)
            return out

    x = torch.randn(64, 64)
    rec = Watched(gm, [("x", x)], keep={"add"})
    want = rec.run(x)
    assert set(rec.values) == {"add"} and torch.equal(rec.values["add"], x * 2 + 1)
    assert alive["mul"]() is None and alive["mul_1"]() is None  # freed after their last use during the run
    assert torch.allclose(want, ((x * 2 + 1) ** 2).sum())


def test_read_by_names_every_node_in_nested_arguments():
    graph = fx.Graph()
    a, b, c = (graph.placeholder(name) for name in "abc")
    assert read_by({"hidden": a, "weights": [b, None], "spec": 3, "pair": (c,)}) == {"a", "b", "c"}
