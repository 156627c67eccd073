"""generate() with the backend, the three ways that compile what generate runs (README, Use: "generate()").

`torch.compile(model, backend="fused_moe")` compiles `forward` only: its `generate` is the original
module's and runs uncompiled. These do compile generate's forward calls: transformers' own auto-compile
(`compile_config=CompileConfig(backend="fused_moe")` with a static cache), `model.forward = torch.compile(
model.forward, ...)`, and `model.compile(backend="fused_moe")` (in place).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")

from moe_compiler.testing.hf_models import MOE_LAYERS, tiny_model  # noqa: E402

NEW = 4


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             cache_implementation="static", pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def _setup(arch="qwen3_moe", device="cpu", dtype=torch.float32):
    model = tiny_model(arch, dtype=dtype).to(device)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    return model, ids, _generate(model, ids, disable_compile=True)


def _compile_config(**kwargs):
    from transformers import CompileConfig

    return CompileConfig(backend="fused_moe", **kwargs)


def _assert_fused_and_same(tokens, ref, arch="qwen3_moe"):
    # each MoE layer fused, in one graph or more (the counter names the source form transformers traced)
    fused = sum(v for k, v in counters["moe_compiler"].items() if k.startswith("fused_experts"))
    assert fused >= MOE_LAYERS[arch], dict(counters["moe_compiler"])
    assert torch.equal(tokens, ref)


def test_forward_compiled_in_place_of_the_attribute():
    model, ids, ref = _setup()
    model.forward = torch.compile(model.forward, backend="fused_moe")
    _assert_fused_and_same(_generate(model, ids, disable_compile=True), ref)


def test_module_compile_in_place():
    model, ids, ref = _setup()
    model.compile(backend="fused_moe")
    _assert_fused_and_same(_generate(model, ids, disable_compile=True), ref)


def test_transformers_auto_compile_through_compile_config():
    model, ids, ref = _setup()
    config = _compile_config(mode="default")
    if not hasattr(config, "_compile_all_devices"):
        pytest.fail("this transformers has no CompileConfig._compile_all_devices: auto-compile cannot run on CPU")
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only; the CPU run opts in
    _assert_fused_and_same(_generate(model, ids, compile_config=config), ref)


def test_compiled_wrapper_generate_runs_uncompiled():
    """What the README warns about: the wrapper's generate is the model's own; nothing is compiled."""
    model, ids, ref = _setup()
    compiled = torch.compile(model, backend="fused_moe")
    assert torch.equal(_generate(compiled, ids, disable_compile=True), ref)
    assert not any(k.startswith("fused_experts") for k in counters["moe_compiler"])


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_auto_compile_reduce_overhead_on_gpu(arch):
    """As users call it on a GPU: CompileConfig's default mode (reduce-overhead), bf16; the greedy tokens
    equal eager's (routers are well separated, so bf16 noise does not flip a choice over 4 tokens)."""
    model, ids, ref = _setup(arch, "cuda", torch.bfloat16)
    _assert_fused_and_same(_generate(model, ids, compile_config=_compile_config()), ref, arch)
