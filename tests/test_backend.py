"""The `fused_moe` backend: entry point, mode/options translation, cache salt, use without an import."""

from __future__ import annotations

import importlib.metadata
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


@pytest.mark.parametrize("env, option", [("MOE_COMPILER_INLINE", None), ("MOE_COMPILER_AUTOTUNE", None),
                                         (None, True)])
def test_cache_salt_changes_with_what_the_trace_records(env, option, monkeypatch):
    """A setting that changes what AOTAutograd records for our ops (launches or opaque op, looked-up or
    autotuned configs) changes the cache key: a warm cache must not hand back the other setting's artifact."""
    from moe_compiler.lowering import triton_config

    salt = backend._SourceHashPass()
    if env is not None:
        monkeypatch.setenv(env, "0")
        off = salt.uuid()
        monkeypatch.setenv(env, "1")
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
