"""The router's linear as a fused reduction (passes/router_linear.py): the route op's logits come from
(x W^T [+ b]) written as mul + sum in fp32, rounded once to the logits' dtype — the same logits as the linear it
replaces — for every router form that feeds a route op, and only at decode sizes. The backend applies it to
graphs with C++ host code (moe_compiler.router_gemv, on by default)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_compiler import backend as backend_module
from moe_compiler.config import MoECompilerConfig
from moe_compiler.passes import fuse_moe_regions
from moe_compiler.passes.router_linear import MAX_TOKENS, rewrite_router_linears
from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_models import tiny_model

ARCHS = ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral"]  # plain, fp32 casts, bias, plain


def _rewritten(model, ids) -> tuple[fx.GraphModule, int, torch.Tensor]:
    """(the Dynamo graph after our passes and the router rewrite, run as is, rewrites, its logits)."""
    graphs = []

    def backend(gm, example_inputs):
        fuse_moe_regions(gm, example_inputs, MoECompilerConfig(inductor=False))
        graphs.append((gm, rewrite_router_linears(gm)))
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(input_ids=ids).logits
    torch._dynamo.reset()
    (gm, n), = graphs
    return gm, n, out


def _route_inputs(gm):
    return [r.kwargs["router_logits"] for r in gm.graph.find_nodes(op="call_function",
                                                                    target=torch.ops.moe_compiler.route.default)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_router_linear_becomes_a_reduction_with_the_same_logits(arch, dtype, tol):
    model = tiny_model(arch, dtype=dtype)
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    gm, n, out = _rewritten(model, ids)
    assert n == len(_route_inputs(gm)) >= 2  # every MoE layer (DeepSeek-V3: its first layer is dense)
    # each route op now reads the reduction's cast, not a linear
    assert all(node.op == "call_method" and node.target == "to" for node in _route_inputs(gm))
    assert not any(node.target is torch._C._nn.linear for node in _route_inputs(gm))
    assert rel_err(out.float(), ref) <= tol


def test_router_logits_are_the_linear_s_own_values():
    """Below the model: the rewritten logits against the linear's in fp64, fp32 and bf16 inputs (products and sums
    in fp32, one rounding to the input's dtype), with a bias (GPT-OSS's router)."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 4e-3)):
        x, w, b = (torch.randn(5, 64, generator=g).to(dtype), torch.randn(16, 64, generator=g).to(dtype),
                   torch.randn(16, generator=g).to(dtype))

        def router(x, w, b):
            # (as our rewrite emits the op: the overload, by keyword)
            return torch.ops.moe_compiler.route.default(router_logits=torch._C._nn.linear(x, w, b), top_k=2)

        gm = fx.symbolic_trace(router)
        values = {"x": x, "w": w, "b": b}
        for node in gm.graph.nodes:  # the example values Dynamo's graphs carry
            if node.op == "placeholder":
                node.meta["example_value"] = values[node.name]
            elif node.target is torch._C._nn.linear:
                node.meta["example_value"] = torch._C._nn.linear(x, w, b)
        assert rewrite_router_linears(gm) == 1
        (route,) = gm.graph.find_nodes(op="call_function", target=torch.ops.moe_compiler.route.default)
        gm.graph.output_node().args = (route.kwargs["router_logits"],)  # return the route's input: the logits
        gm.graph.erase_node(route)
        gm.recompile()
        got = gm(x, w, b)
        want = x.double() @ w.double().T + b.double()
        assert got.dtype == dtype and rel_err(got.double(), want) <= tol


def test_more_rows_than_decode_keep_the_linear():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 128, (1, MAX_TOKENS + 1), generator=torch.Generator().manual_seed(2))
    gm, n, _ = _rewritten(model, ids)
    assert n == 0
    assert all(node.target is torch._C._nn.linear for node in _route_inputs(gm))


def test_backend_rewrites_only_when_asked_and_only_with_cpp_host_code(monkeypatch):
    """The backend's switch: on by default, applied to graphs the backend builds with C++ host code (stubbed here: no
    CUDA on CPU) and reported; off, the linear stays; Inductor itself is skipped (moe_compiler.inductor=False)."""
    model = tiny_model("gpt_oss")
    ids = torch.randint(0, 128, (1, 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    monkeypatch.setattr(backend_module, "host_code_choice", lambda *a: None)
    for options, want in (({}, 2), ({"moe_compiler.router_gemv": False}, 0)):
        counters.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="fused_moe", dynamic=False,
                                options={"moe_compiler.inductor": False, **options})(input_ids=ids).logits
        assert counters["moe_compiler"]["router_gemv"] == want
        assert rel_err(out, ref) <= 1e-5
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_router_gemv_decode_step_equals_eager_on_gpu(arch, tmp_path, monkeypatch):
    """moe_compiler.router_gemv on a default-mode decode step (C++ host code): Inductor compiles the reduction (the
    casts and bias folded in) and the logits equal eager's as closely as with the cuBLAS linear (bf16)."""
    monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", "1")  # the backend's default (conftest turns it off for speed)
    model = tiny_model(arch, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    errs = {}
    for on in (True, False):
        counters.clear()
        torch._dynamo.reset()
        dump = tmp_path / str(on)
        with torch.no_grad():
            out = torch.compile(model, backend="fused_moe", dynamic=False,
                                options={"moe_compiler.router_gemv": on, "moe_compiler.dump_dir": str(dump)}
                                )(input_ids=ids).logits.float()
        host = [json.loads((g / "report.json").read_text())["host_code"] for g in sorted(dump.glob("graph_*"))]
        assert counters["moe_compiler"]["cpp_wrapper"] == 1, (host, dict(counters["moe_compiler"]))
        assert counters["moe_compiler"]["router_gemv"] == (2 if on else 0), dict(counters["moe_compiler"])
        errs[on] = rel_err(out, ref)
    assert errs[True] <= max(3e-2, 1.5 * errs[False]), errs
    torch._dynamo.reset()
