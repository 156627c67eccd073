"""The `fused_moe` backend: entry point, mode/options translation, cache salt, use without an import."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from moe_compiler import backend
from moe_compiler.testing import rel_err
from moe_compiler.testing.hf_models import tiny_model


def test_entry_point_names_the_backend():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert eps["fused_moe"].value == "moe_compiler.backend:fused_moe"
    assert eps["fused_moe"].load() is backend.fused_moe


def test_compile_without_importing_the_package(tmp_path):
    """A user's script never imports moe_compiler; the entry point and TORCH_LOGS do the rest."""
    tiny_model("qwen3_moe", "grouped_mm").save_pretrained(tmp_path)
    script = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(%r).eval()
        ids = torch.randint(0, 128, (2, 5))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            out = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
        print("MAXDIFF", float((out - ref).abs().max()))
        """
        % str(tmp_path)
    )
    env = dict(os.environ, TORCH_LOGS="+moe_compiler")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 experts regions, 2 fused (grouped_mm), 0 rejected" in proc.stderr
    assert "[fused] model.layers.0.mlp.experts: silu, gate_up=concat" in proc.stderr  # debug-level line
    assert float(proc.stdout.split("MAXDIFF")[1]) < 1e-5


def test_importing_the_package_imports_no_triton():
    """The ops register on import; Triton loads only when a CUDA call needs a kernel."""
    script = "import sys, moe_compiler; print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "mode,key,value",
    [
        ("reduce-overhead", "triton.cudagraphs", True),
        ("max-autotune", "max_autotune", True),
        (None, "epilogue_fusion", False),
    ],
)
def test_mode_and_options_reach_inductor(mode, key, value):
    options = {"epilogue_fusion": False} if mode is None else {}
    patches = backend._inductor_patches(mode, options)
    assert patches[key] == value
    assert isinstance(patches["post_grad_custom_post_pass"], backend._SourceHashPass)


def test_cache_salt_is_our_source_hash_and_keeps_a_user_pass():
    calls = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            calls.append(graph)

        def uuid(self):
            return "user-pass-v1"

    salted = backend._inductor_patches(None, {"post_grad_custom_post_pass": UserPass()})["post_grad_custom_post_pass"]
    assert salted.uuid() == ("moe_compiler", backend.source_hash(), backend.trace_settings(), "user-pass-v1")
    salted(torch.fx.Graph())
    assert len(calls) == 1
    assert len(backend.source_hash()) == 64


def test_whether_cutlass_can_be_built_is_part_of_the_cache_salt(monkeypatch):
    """A cache filled where the CUTLASS extension could not be built (no headers, no nvcc) traced the Triton
    defaults in place of every CUTLASS entry: it is not handed to a process that can build it."""
    from moe_compiler.lowering import cutlass

    monkeypatch.setattr(cutlass, "missing", lambda: "no CUTLASS headers")
    without = backend.trace_settings()
    monkeypatch.setattr(cutlass, "missing", lambda: None)
    assert backend.trace_settings() != without


def test_recorded_tma_is_an_option_on_by_default_and_part_of_the_cache_salt(monkeypatch):
    """moe_compiler.recorded_tma (env MOE_COMPILER_RECORDED_TMA) reaches the traces of a compile, and a cache filled
    under one setting is not handed to the other (the recorded kernels differ)."""
    from moe_compiler.config import MoECompilerConfig
    from moe_compiler.lowering import launch

    monkeypatch.delenv(launch.RECORDED_TMA_ENV, raising=False)
    assert MoECompilerConfig.from_options({}).recorded_tma is True and launch.recorded_tma()
    assert MoECompilerConfig.from_options({"moe_compiler.recorded_tma": False}).recorded_tma is False
    on = backend.trace_settings()
    with launch.recorded_tma_option(False):
        assert not launch.recorded_tma() and backend.trace_settings() != on
    monkeypatch.setenv(launch.RECORDED_TMA_ENV, "0")
    assert MoECompilerConfig.from_options({}).recorded_tma is False
    with launch.recorded_tma_option(True):
        assert backend.trace_settings() == on
    monkeypatch.setenv(launch.RECORDED_TMA_ENV, "yes")
    with pytest.raises(ValueError, match="MOE_COMPILER_RECORDED_TMA='yes'"):
        launch.recorded_tma()


@pytest.mark.parametrize("env, values, option", [
    ("MOE_COMPILER_INLINE", ("0", "1"), None), ("MOE_COMPILER_AUTOTUNE", ("0", "1"), None),
    ("MOE_COMPILER_ROUTE_IN_GEMV", ("0", "1"), None), ("MOE_COMPILER_CUTLASS", ("auto", "0"), None),
    ("MOE_COMPILER_KERNELS", ("triton", "torch"), None), ("MOE_COMPILER_BACKWARD", ("triton", "torch"), None),
    (None, None, True)])
def test_cache_salt_changes_with_what_the_trace_records(env, values, option, monkeypatch):
    """A setting that changes what AOTAutograd records for our ops (launches or opaque op, looked-up or
    autotuned configs, the route in the GEMV, CUTLASS, the composite, the backward) changes the cache key: a warm
    cache must not hand back the other setting's artifact."""
    from moe_compiler.lowering import triton_config

    salt = backend._SourceHashPass()
    if env is not None:
        monkeypatch.setenv(env, values[0])
        off = salt.uuid()
        monkeypatch.setenv(env, values[1])
        assert salt.uuid() != off
    else:
        monkeypatch.setenv("MOE_COMPILER_AUTOTUNE", "0")
        off = salt.uuid()
        with triton_config.autotune_option(option):
            assert salt.uuid() != off


def test_reduce_overhead_mode_compiles_and_fuses():
    model = tiny_model("qwen3_moe", "grouped_mm")
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        out = torch.compile(model, backend="fused_moe", mode="reduce-overhead")(input_ids=ids).logits
        ref = model(input_ids=ids).logits
    assert counters["moe_compiler"]["fused_experts_grouped_mm"] == 2
    assert rel_err(out, ref) <= 1e-5


def test_unknown_option_is_a_clear_error():
    model = tiny_model("qwen3_moe", "grouped_mm")
    compiled = torch.compile(model, backend="fused_moe", options={"moe_compiler.dumpdir": "x"})
    with pytest.raises(Exception, match="unknown option 'moe_compiler.dumpdir': expected one of"):
        with torch.no_grad():
            compiled(input_ids=torch.randint(0, 128, (1, 4)))


def test_option_type_is_checked():
    with pytest.raises(ValueError, match="option 'moe_compiler.verify': expected"):
        backend.MoECompilerConfig.from_options({"moe_compiler.verify": "no"})


@pytest.mark.parametrize("how", ["option", "env"])
def test_without_inductor_the_rewritten_graph_runs_as_traced(how, monkeypatch):
    """moe_compiler.inductor=False / MOE_COMPILER_INDUCTOR=0: the MoE blocks are fused all the same, Inductor
    never compiles the graph, the logits equal eager."""
    def no_inductor(*args, **kwargs):
        raise AssertionError("Inductor was asked to compile")

    monkeypatch.setattr(backend, "compile_fx", no_inductor)
    options = {"moe_compiler.inductor": False} if how == "option" else None
    if how == "env":
        monkeypatch.setenv("MOE_COMPILER_INDUCTOR", "0")
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("qwen3_moe", "grouped_mm")
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        out = torch.compile(model, backend="fused_moe", options=options)(input_ids=ids).logits
    assert sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_experts")) == 2
    assert rel_err(out, eager) <= 1e-5


def test_static_launch_option_reaches_inductor_and_a_user_setting_wins():
    key = backend.STATIC_LAUNCH
    assert hasattr(torch._inductor.config, key)  # the torch switch the option sets (torch 2.11+)
    assert key not in backend._inductor_patches(None, {})
    assert backend._inductor_patches(None, {}, static_launch=True)[key] is True
    assert backend._inductor_patches(None, {key: False}, static_launch=True)[key] is False
    from moe_compiler.config import MoECompilerConfig

    assert MoECompilerConfig.from_options({"moe_compiler.static_launch": True}).static_launch


# --- host code in C++ (config.cpp_wrapper) ---------------------------------------------------------------------

def _graph_with_route(tokens: int | None, all_reduce: bool = False):
    """A graph calling the route op over `tokens` rows of router logits (None: no MoE op), the logits all-reduced
    first if asked (an expert-parallel graph)."""
    g = torch.fx.Graph()
    x = g.placeholder("logits")
    x.meta["example_value"] = torch.empty(tokens or 4, 8)
    if all_reduce:
        x = g.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
        x.meta["example_value"] = torch.empty(tokens or 4, 8)
    out = x
    if tokens is not None:
        op = torch.ops.moe_compiler.route.default  # called by keyword, as the passes call our ops
        out = g.call_function(op, (), {op._schema.arguments[0].name: x, "top_k": 2})
    g.output(out)
    return torch.fx.GraphModule({}, g)


def _inputs(device: str, requires_grad: bool = False):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a CUDA tensor's stand-in on a machine without CUDA
        return [torch.empty(4, 8, device=device, requires_grad=requires_grad)]


@pytest.mark.parametrize("tokens,device,patches,grad,reason", [
    (1, "cuda", {}, False, None),
    (256, "cuda", {}, False, None),
    (257, "cuda", {}, False, "more than 256 tokens"),
    (1, "cpu", {}, False, "no CUDA inputs"),
    (1, "cuda", {"triton.cudagraphs": True}, False, "CUDA graphs"),
    (1, "cuda", {"cpp_wrapper": False}, False, "option cpp_wrapper is given"),
    (1, "cuda", {}, True, "gradients"),
    (None, "cuda", {}, False, "no MoE op"),
])
def test_cpp_wrapper_only_for_host_bound_cuda_inference_graphs(tokens, device, patches, grad, reason):
    gm = _graph_with_route(tokens)
    with torch.set_grad_enabled(grad):
        got = backend.cpp_wrapper_skip_reason(gm, _inputs(device, requires_grad=True), patches)
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize("tokens,reason", [(2, None), (300, "more than 256 tokens")])
def test_cpp_wrapper_reads_the_token_count_of_the_rewritten_graph(tokens, reason, monkeypatch):
    """The graph the passes wrote (ops called by keyword), taken as a CUDA graph: its MoE ops' token count decides."""
    reasons = []

    def compile_(gm, example_inputs, patches, python_host_reason):
        reasons.append(backend.cpp_wrapper_skip_reason(gm, _inputs("cuda"), patches))
        return gm.forward

    monkeypatch.setattr(backend, "_compile", compile_)
    torch._dynamo.reset()
    with torch.no_grad():
        ids = torch.ones(1, tokens, dtype=torch.long)
        torch.compile(tiny_model("qwen3_moe", "grouped_mm"), backend="fused_moe")(input_ids=ids)
    assert len(reasons) == 1 and (reasons[0] == reason if reason is None else reason in reasons[0])


@pytest.mark.parametrize("env,cpp", [("1", True), ("0", False)])
def test_the_report_says_which_host_code_a_graph_gets(env, cpp, monkeypatch, tmp_path, decode_graph_compiles):
    """The log line and the dump name the host code Inductor is asked for (a C++ build the user did not see
    happen, or did not see skipped, costs minutes or a 2x slower decode step)."""
    monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", env)
    with torch.no_grad():
        torch.compile(tiny_model("qwen3_moe", "grouped_mm"), backend="fused_moe",
                      options={"moe_compiler.dump_dir": str(tmp_path)})(input_ids=torch.randint(0, 128, (1, 3)))
    want = "C++ (cpp_wrapper)" if cpp else "Python: off (moe_compiler.cpp_wrapper)"
    (graph,) = tmp_path.glob("graph_*")
    assert json.loads((graph / "report.json").read_text())["host_code"] == want
    assert f"; host code: {want}" in (graph / "summary.txt").read_text()


def test_a_graph_run_without_inductor_reports_python_host_code(tmp_path):
    with torch.no_grad():
        torch.compile(tiny_model("qwen3_moe", "grouped_mm"), backend="fused_moe",
                      options={"moe_compiler.dump_dir": str(tmp_path), "moe_compiler.inductor": False})(
            input_ids=torch.randint(0, 128, (1, 3)))
    (graph,) = tmp_path.glob("graph_*")
    assert json.loads((graph / "report.json").read_text())["host_code"] == (
        "Python: no Inductor (moe_compiler.inductor=False)")


def _graph_with_experts_weights(weight_shape):
    """A decode graph (T = 1) whose experts op reads a CUDA expert weight of `weight_shape` (fake: no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    E, two_i, H = weight_shape
    with FakeTensorMode():
        values = dict(hidden=torch.empty(1, H, device="cuda", dtype=torch.bfloat16),
                      topk_ids=torch.empty(1, 2, device="cuda", dtype=torch.long),
                      topk_weights=torch.empty(1, 2, device="cuda"),
                      w_gate_up=torch.empty(E, two_i, H, device="cuda", dtype=torch.bfloat16),
                      w_down=torch.empty(E, H, two_i // 2, device="cuda", dtype=torch.bfloat16))
    g = torch.fx.Graph()
    nodes = {}
    for name, value in values.items():
        nodes[name] = g.placeholder(name)
        nodes[name].meta["example_value"] = value
    g.output(g.call_function(torch.ops.moe_compiler.experts.default, (), nodes))
    return torch.fx.GraphModule({}, g), list(values.values())


@pytest.mark.parametrize("free_gib,reason", [
    (None, None),  # no CUDA device to ask (this machine): the build is tried, its failure falls back
    (30.0, None),
    (10.0, "14.0 GiB for the largest MoE op input (256, 4096, 7168) — and cuda:0 has 10.0 GiB free"),
])
def test_cpp_wrapper_skipped_where_its_example_run_cannot_fit(free_gib, reason, monkeypatch):
    """Inductor's C++ build runs every kernel once on freshly allocated arguments: DeepSeek-V3's gate_up weight (14
    GiB) again. Where that cannot fit, the graph keeps Python host code at once, saying so, instead of a build that
    runs out of memory and falls back."""
    seen = []
    monkeypatch.setattr(backend, "gpu_free_bytes",
                        lambda device: seen.append(device) or (None if free_gib is None else int(free_gib * 2**30)))
    gm, inputs = _graph_with_experts_weights((256, 4096, 7168))
    with torch.no_grad():
        got = backend.cpp_wrapper_skip_reason(gm, inputs, {})
    assert seen and seen[0].type == "cuda"
    assert got == reason if reason is None else got.endswith(reason) and "example run" in got


def test_gpu_free_bytes_without_cuda_is_none():
    if torch.cuda.is_available():
        assert backend.gpu_free_bytes(torch.device("cuda")) > 0
    else:
        assert backend.gpu_free_bytes(torch.device("cuda")) is None


def test_cpp_wrapper_not_tried_with_collectives():
    assert "collectives" in backend.cpp_wrapper_skip_reason(_graph_with_route(1, all_reduce=True), _inputs("cuda"), {})


def test_cpp_wrapper_mode_options_of_reduce_overhead_skip_it():
    assert "CUDA graphs" in backend.cpp_wrapper_skip_reason(
        _graph_with_route(1), _inputs("cuda"), backend._inductor_patches("reduce-overhead", {}))


@pytest.fixture
def decode_graph_compiles(monkeypatch):
    """Every graph taken for a CUDA decode graph (cpp_wrapper_skip_reason: None) and Inductor replaced by a stand-in
    that records each compile's config patches (and `recorded_tma`: launch.recorded_tma() while it traces) and runs
    the graph as is; `fail_cpp` makes a C++ build raise."""
    from moe_compiler.lowering import launch

    class Compiles(list):
        fail_cpp = False
        recorded_tma: list = []

    compiles = Compiles()

    def fake_compile_fx(gm, example_inputs, config_patches):
        compiles.append(config_patches)
        compiles.recorded_tma.append(launch.recorded_tma())
        if config_patches.get("cpp_wrapper") and compiles.fail_cpp:
            raise RuntimeError("C++ compile error\nerror: 'aoti_torch_cuda__grouped_mm' was not declared")
        return gm.forward

    monkeypatch.setattr(backend, "compile_fx", fake_compile_fx)
    monkeypatch.setattr(backend, "cpp_wrapper_skip_reason", lambda *a: None)
    return compiles


@pytest.mark.parametrize("env", ["1", "0"])
def test_failed_cpp_build_falls_back_to_python_host_code(env, monkeypatch, caplog, decode_graph_compiles):
    """A graph that qualifies is compiled with cpp_wrapper first; a build that fails (an InductorError, a
    RuntimeError) is compiled again with Python host code, logged and counted. MOE_COMPILER_CPP_WRAPPER=0: no
    attempt."""
    decode_graph_compiles.fail_cpp = True
    monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", env)
    model = tiny_model("qwen3_moe", "grouped_mm")
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level("WARNING", logger="moe_compiler"):
        eager = model(input_ids=ids).logits
        out = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
    assert rel_err(out, eager) <= 1e-5
    calls = [patches.get("cpp_wrapper", False) for patches in decode_graph_compiles]
    if env == "1":
        assert calls == [True, False]
        assert counters["moe_compiler"]["cpp_wrapper_failed"] == 1
        assert "cpp_wrapper) failed to build: C++ compile error; compiling this graph with Python host code" in (
            caplog.text)
    else:
        assert calls == [False] and not counters["moe_compiler"]["cpp_wrapper_failed"]


def test_cpp_host_code_is_traced_without_device_built_tma_descriptors(monkeypatch, decode_graph_compiles):
    """Inductor's C++ launches of kernels with global scratch are untried: a graph built with C++ host code is traced
    with recorded TMA off (its decode-sized GEMMs load by pointer anyway), and the Python fallback with it on."""
    monkeypatch.delenv("MOE_COMPILER_RECORDED_TMA", raising=False)
    monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", "1")
    decode_graph_compiles.fail_cpp = True
    model = tiny_model("qwen3_moe", "grouped_mm")
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.compile(model, backend="fused_moe")(input_ids=ids)
    assert [patches.get("cpp_wrapper", False) for patches in decode_graph_compiles] == [True, False]
    assert decode_graph_compiles.recorded_tma == [False, True]


@pytest.mark.parametrize("failing", ["recorded", "always"])
def test_a_graph_whose_recorded_launches_fail_to_compile_is_compiled_with_the_ops_opaque(failing, monkeypatch,
                                                                                           caplog):
    """Inductor failing on a graph with our launches recorded (ops/inline.py: a symbolic size it cannot take, say):
    the backend compiles the graph once more with every MoE call one opaque op, logged and counted; a failure that
    is not the recording's fails that attempt too, and the compile fails with it."""
    from moe_compiler.ops import inline

    attempts = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        attempts.append(inline.enabled())
        if failing == "always" or inline.enabled():
            raise RuntimeError("InductorError: a recorded kernel's grid\n(details)")
        return gm.forward

    monkeypatch.setattr(backend, "compile_fx", fake_compile_fx)
    monkeypatch.setattr(backend, "cpp_wrapper_skip_reason", lambda *a: "off")
    model = tiny_model("qwen3_moe", "grouped_mm")
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level("WARNING", logger="moe_compiler"):
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="fused_moe")
        if failing == "always":
            with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="a recorded kernel's grid"):
                compiled(input_ids=ids)
        else:
            assert rel_err(compiled(input_ids=ids).logits, eager) <= 1e-5
    assert attempts == [True, False] and counters["moe_compiler"]["recorded_compile_failed"] == 1
    assert ("compiling this graph with the MoE launches recorded failed (RuntimeError: InductorError: a recorded "
            "kernel's grid); compiling it again with each MoE call one opaque op") in caplog.text
    assert inline.enabled()  # (the second attempt's switch does not outlive it)


@pytest.mark.parametrize("user_option", [None, False])
def test_cpp_host_code_is_built_apart_from_kernels_unless_the_user_says(user_option, monkeypatch,
                                                                         decode_graph_compiles):
    """The C++ attempt builds the host code apart from any C++ kernels (torch 2.11 would build a CUDA graph's host
    code -O3, whose build time grows faster than the graph: backend.CPP_WRAPPER_BUILD); an Inductor option the
    user gives wins; the Python-host compile gets neither option of ours."""
    def seen():
        return [{k: patches.get(k) for k in ("cpp_wrapper", "cpp_wrapper_build_separate")}
                for patches in decode_graph_compiles]

    monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", "1")
    options = {} if user_option is None else {"cpp_wrapper_build_separate": user_option}
    with torch.no_grad():
        torch.compile(tiny_model("qwen3_moe", "grouped_mm"), backend="fused_moe", options=options)(
            input_ids=torch.randint(0, 128, (1, 3)))
    want = True if user_option is None else user_option
    assert seen() == [{"cpp_wrapper": True, "cpp_wrapper_build_separate": want}]
    monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", "0")
    decode_graph_compiles.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_model("qwen3_moe", "grouped_mm"), backend="fused_moe")(
            input_ids=torch.randint(0, 128, (1, 3)))
    assert seen() == [{"cpp_wrapper": None, "cpp_wrapper_build_separate": None}]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_cpp_wrapper_decode_equals_python_host_code_on_gpu(arch, monkeypatch):
    """The backend's default for a CUDA decode graph: the C++ host code is built (counted) and its logits equal
    those of the same graph with Python host code (the same kernels, launched from C++)."""
    model = tiny_model(arch, "grouped_mm").cuda()
    ids = torch.randint(0, 128, (2, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    outs = {}
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        for env in ("0", "1"):
            monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", env)
            torch._dynamo.reset()
            outs[env] = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
    assert counters["moe_compiler"]["cpp_wrapper"] >= 1 and not counters["moe_compiler"]["cpp_wrapper_failed"]
    assert rel_err(outs["1"], outs["0"]) <= 1e-6
    assert rel_err(outs["1"], eager) <= 1e-5


@pytest.mark.gpu
def test_cpp_wrapper_build_failing_inside_inductor_falls_back_on_gpu(monkeypatch, no_compile_caches):
    """A C++ host-code build that fails inside Inductor (its code generation raising, as torch 2.11's missing C
    shim for aten::_grouped_mm does): the same graph is compiled again with Python host code and runs right."""
    from torch._inductor.codegen import cpp_wrapper_gpu

    def broken(self, *args, **kwargs):
        raise NotImplementedError("no C shim for this op (test)")

    monkeypatch.setenv("MOE_COMPILER_CPP_WRAPPER", "1")
    monkeypatch.setattr(cpp_wrapper_gpu.CppWrapperGpu, "generate", broken)
    # an earlier test's build of this same graph, cached, would be loaded without generating code (seen on the H200):
    # the no_compile_caches fixture
    torch._dynamo.reset()
    model = tiny_model("qwen3_moe", "grouped_mm").cuda()
    ids = torch.randint(0, 128, (2, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        out = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
    assert counters["moe_compiler"]["cpp_wrapper_failed"] >= 1 and not counters["moe_compiler"]["cpp_wrapper"]
    assert rel_err(out, eager) <= 1e-5
