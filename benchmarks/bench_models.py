"""Whole models, the way users run them: HF eager, plain torch.compile (Inductor) and backend="fused_moe", in one
process, on real-dimension models with random weights (benchmarks/models.py: released configs, a few layers).

    python -m benchmarks.bench_models [--shapes qwen3_30b_a3b deepseek_v3 ...] [--parts prefill decode generate]
                                      [--out]   # into results/models_<gpu>.json by cell (+ .png with matplotlib)
    python -m benchmarks.bench_models --from-json benchmarks/results/models_NVIDIA_H200.json   # table + plot again
    python -m benchmarks.bench_models --parts decode --extra fused_python fused_static inductor_cpp   # host code A/B
    python -m benchmarks.bench_models --parts prefill decode --extra fused_fp8   # the model with FP8 experts too
    python -m benchmarks.bench_models --shapes kimi_k2 --parts prefill decode --extra fused_int4   # INT4 experts

Parts (bf16, no gradients):
    prefill     1 x 4096 tokens, last-token logits (logits_to_keep=1); compile default mode
    prefill-dynamic   1 x 512 and 1 x 2048 tokens after two other lengths each, compiled with dynamic=None: the
                sequence length symbolic, as prompts of varying length make it (not in the default parts)
    decode      a B x 1 step without a KV cache, B in {1, 32}; default mode and mode="reduce-overhead"
    generate    model.generate, static cache, transformers' own auto-compile through
                CompileConfig(backend=..., mode="reduce-overhead"), 16-token prompt, 128 new tokens,
                B in {1, 8}: tokens/s (eager: transformers' generate without compiling)
    train       a training step (forward with labels, backward; no optimizer) at 1 x 4096 and 4 x 4096 tokens,
                not in the default parts: eager, Inductor, fused_moe as is (a training graph keeps Inductor's
                MoE), fused_moe with moe_compiler.training=True and its default backward on CUDA ("fused_train"),
                and with the torch composite backward ("fused_train_torch", only with --train-variants), or with
                its ops opaque (MOE_COMPILER_INLINE=0: "fused_train_opaque", only with --train-variants; before
                session 43 every training call was); error:
                the loss vs eager, and every expert weight gradient at once vs eager's (one norm: harness.grads_rel_err)
With --bound, every part also runs "free_moe": Inductor with each routed-experts module returning zeros (router,
shared experts and the rest unchanged) — the time of a model whose routed experts cost nothing, so inductor /
free_moe ("bound") is the most any experts implementation can gain over Inductor in that cell.
Times: median wall time per call over repeated calls after warm-up (CUDA events around each call; a call
includes its host time, as a user's step does); the forward points' variants are all compiled first and then
timed interleaved, one call of each per round (the host's drift moved whole runs ±30%: it must not decide a
ratio). Compile time: the first call's wall time. Memory: peak allocated during the variant (forward points:
its warm-up calls after the first, and `first_peak_gib` of the compiling first call, numerical checks included;
train: during the timed steps, and of the first call, each above what the benchmark itself holds besides the
model's parameters). Error: last-token logits vs eager, ||out - ref|| / ||ref||.
Ratios in the table: torch.compile time / fused_moe time (> 1: fused_moe is faster).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time

import torch
from torch._dynamo.utils import counters

from moe_compiler.testing import rel_err

from . import harness
from .models import MODELS, build

BACKENDS = {"eager": None, "inductor": "inductor", "fused_moe": "fused_moe"}
# --extra: more variants of the default-mode points (prefill, decode), timed interleaved with the three above —
# the host's launch path, A/B in one process: name -> (backend, torch.compile options)
EXTRA_VARIANTS = {
    # fused_moe with Python host code (the backend builds C++ host code for decode graphs: config.cpp_wrapper)
    "fused_python": ("fused_moe", {"moe_compiler.cpp_wrapper": False}),
    "fused_static": ("fused_moe", {"moe_compiler.cpp_wrapper": False, "moe_compiler.static_launch": True}),
    "inductor_cpp": ("inductor", {"cpp_wrapper": True}),  # (torch 2.11: no C shim for aten::_grouped_mm, fails)
    # C++ host code as torch 2.11 builds it by itself, -O3 (the backend builds it apart from kernels: -O1;
    # backend.CPP_WRAPPER_BUILD): the compile time of deep models
    "fused_o3": ("fused_moe", {"cpp_wrapper_build_separate": False}),
    # a copy of the model with its routed experts as an FP8 checkpoint loads them (transformers' FP8Experts, 128 x 128
    # block scales; fp8_model()), compiled with fused_moe: against Inductor on the bf16 model — plain torch.compile
    # cannot run the FP8 model offline (transformers' FP8 experts call kernels fetched from the hub). Its err is
    # FP8's rounding against the bf16 eager logits (printed, not checked).
    "fused_fp8": ("fused_moe", None),
    # the same with the routed experts packed INT4 (symmetric groups of 32, bf16 scales: Kimi-K2-Thinking's format,
    # as moe_compiler.from_pretrained keeps it; int4_model()); err: INT4's rounding against the bf16 eager logits
    "fused_int4": ("fused_moe", None),
    # recorded TMA off (config.recorded_tma; NOTES session 27): a sorted-path call whose TMA pays stays one opaque op
    # with host descriptors, against the default's descriptors built on the device
    "fused_opaque_tma": ("fused_moe", {"moe_compiler.recorded_tma": False}),
}
PARTS = ("prefill", "decode", "generate", "train", "prefill-dynamic")
DECODE_MODES = ("default", "reduce-overhead")
DEFAULT_PARTS = ("prefill", "decode", "generate")
# name -> (torch.compile kwargs or None for eager, MOE_COMPILER_BACKWARD)
TRAIN_VARIANTS = {
    "eager": (None, "torch"),
    "inductor": (dict(backend="inductor"), "torch"),
    "fused_moe": (dict(backend="fused_moe"), "torch"),
    "fused_train": (dict(backend="fused_moe", options={"moe_compiler.training": True}), "triton"),
    "fused_train_torch": (dict(backend="fused_moe", options={"moe_compiler.training": True}), "torch"),
    "fused_train_opaque": (dict(backend="fused_moe", options={"moe_compiler.training": True}), "triton"),
    "free_moe": (dict(backend="inductor"), "torch"),  # under free_experts (--bound)
}
DEFAULT_TRAIN_VARIANTS = ("eager", "inductor", "fused_moe", "fused_train")
# variant -> environment switches set while it compiles and runs (the backend's cache salt holds them)
TRAIN_VARIANT_ENV = {"fused_train_opaque": {"MOE_COMPILER_INLINE": "0"}}


@contextlib.contextmanager
def free_experts(model):
    """Every routed-experts module (transformers' `*Experts` classes) returns zeros: the free-MoE bound."""
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    if not experts:
        raise SystemExit("bench_models --bound: no *Experts module in the model")
    for m in experts:
        m.forward = lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states)
    try:
        yield
    finally:
        for m in experts:
            del m.forward


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _compiling_calls(call, warm):
    for ids in warm:
        call(ids=ids)
    return call()


def forward_points(model, backends: dict, mode, ids, reps, warm: tuple = ()) -> dict:
    """{variant: row fields} of model(ids) compiled with each backend in `mode` (eager: backend None), timed
    interleaved (harness.interleaved: one call of each variant per round, the order rotated), so that the host's
    drift — default-mode cells are host time, and the same step moved ±30% between runs — lands on every variant
    alike. Each variant is compiled (its first call: compile_s) and warmed up before any is timed; its peak memory
    is that of its warm-up calls (first_peak_gib: of the compiling call); err: last-token logits vs the eager
    variant's. A backend is a name or (name, torch.compile options[, its own model]) (default mode only). With
    `warm` (other input ids), each variant compiles with torch.compile's default dynamic=None and is first called
    with those: from the second shape on, Dynamo compiles the sequence length as a symbol (automatic dynamic
    shapes), and `ids` runs that graph — what prompts of varying lengths get."""
    torch._dynamo.reset()
    calls, rows, outs = {}, {}, {}
    for variant, backend in backends.items():
        backend, options, *own = backend if isinstance(backend, tuple) else (backend, None)
        module = own[0] if own else model  # (a variant may bring its own copy of the model: fused_fp8, fused_int4)
        fn = module if backend is None else torch.compile(module, backend=backend, mode=mode,
                                                          dynamic=None if warm else False, options=options)
        calls[variant] = lambda fn=fn, ids=ids: fn(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        torch.cuda.reset_peak_memory_stats()
        cpp_before, graphs_before = counters["moe_compiler"]["cpp_wrapper"], counters["stats"]["unique_graphs"]
        with torch.no_grad():
            try:
                compile_s = first_call_s(functools.partial(_compiling_calls, calls[variant], warm))
            except torch._dynamo.exc.BackendCompilerFailed as e:  # an --extra variant torch cannot build: say so
                if variant in BACKENDS:
                    raise
                harness.say_compile_failed(variant, e)
                del calls[variant]
                continue
            if backend is not None and counters["stats"]["unique_graphs"] == graphs_before:
                # (Dynamo hands a compile of the same module with an equal backend and options an earlier trace)
                raise RuntimeError(f"{variant}: traced nothing, it would time another variant's code")
            first_peak = torch.cuda.max_memory_allocated() / 2**30  # the compiling call (numerical checks too)
            torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                outs[variant] = calls[variant]().float()  # (a reduce-overhead output is overwritten by the next
                # replay: copied out here, by .float())
        rows[variant] = {"compile_s": compile_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "first_peak_gib": first_peak,
                         # graphs built with C++ host code: a timing says which host code it measured
                         "cpp_host_graphs": counters["moe_compiler"]["cpp_wrapper"] - cpp_before}
    with torch.no_grad():
        times = harness.interleaved(calls, reps)
    for variant, row in rows.items():
        row["ms"] = times[variant] * 1e3
        if "eager" in outs and variant != "eager":
            row["err"] = rel_err(outs[variant], outs["eager"])
    return rows


def generate_point(model, backend, B, new_tokens=128, prompt=16):
    from transformers import CompileConfig

    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (B, prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(B))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    if backend is None:
        kwargs["disable_compile"] = True
    else:
        kwargs["compile_config"] = CompileConfig(backend=backend, mode="reduce-overhead")

    def call():
        return model.generate(ids, **kwargs)

    with torch.no_grad():
        compile_s = first_call_s(call)
        call()
        ms = harness.events(call, 3) * 1e3
        tokens = call()[:, prompt:]
    return {"tok_s": B * new_tokens / ms * 1e3, "compile_s": compile_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}, tokens


def _expert_grads(model) -> list[torch.Tensor]:
    """Host copies in the gradients' own dtype: device memory is the measured quantity (GPT-OSS-20B's 4x4096 step
    ran out of it beside eager's fp32 copies held on the GPU)."""
    return [p.grad.to("cpu", copy=True) for n, p in model.named_parameters() if ".experts." in n and p.grad is not None]


def train_point(model, how, backward: str, ids, reps=5, snapshot: str | None = None, env: dict | None = None):
    """(row fields, loss, expert weight gradients) of one training step (forward with labels + backward).
    Memory: peaks as if the model's parameters were all this process held (the benchmark's own tensors, e.g. the
    reference gradients, subtracted): of the first call (compiling, then the step) and of the timed steps.
    `snapshot`: a path for the allocator's history of one more step (torch.cuda.memory._dump_snapshot; read it with
    benchmarks/probes/peak_tensors.py or pytorch.org/memory_viz). `env`: more switches, set for this step only."""
    torch._dynamo.reset()
    switches = {"MOE_COMPILER_BACKWARD": backward, **(env or {})}
    before = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    fn = model if how is None else torch.compile(model, dynamic=False, **how)

    def call():
        model.zero_grad(set_to_none=True)
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    def peak_gib(held: int) -> float:
        return (torch.cuda.max_memory_allocated() - held) / 2**30

    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    held = torch.cuda.memory_allocated() - params
    try:
        torch.cuda.reset_peak_memory_stats()
        compile_s = first_call_s(call)
        first_peak = peak_gib(held)
        torch.cuda.reset_peak_memory_stats()
        ms = harness.events(call, reps) * 1e3
        row = {"ms": ms, "compile_s": compile_s, "peak_gib": peak_gib(held), "first_peak_gib": first_peak}
        if snapshot:
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
            call()
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        loss = call().detach().float()
        grads = _expert_grads(model)
    except torch.OutOfMemoryError:
        print(f"out of memory: {how} {backward}", flush=True)
        row, loss, grads = {"ms": float("nan"), "compile_s": float("nan"), "peak_gib": float("nan")}, None, None
    finally:  # the settings this process had (a fixed "torch" here had left every later step on the composite)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return row, loss, grads


def bench_train(model, name, variants=DEFAULT_TRAIN_VARIANTS, batches=(1, 4), snapshots: str | None = None
                ) -> list[dict]:
    """The train part at batches x 4096 tokens; `variants` from TRAIN_VARIANTS, eager (the reference of the errors)
    and inductor (of the ratios) always among them. `snapshots`: a folder for each point's allocator history."""
    variants = dict.fromkeys(("eager", "inductor", *variants))
    model.train()
    rows = []
    V = model.config.vocab_size
    gen = torch.Generator("cuda").manual_seed(1)
    for B in batches:
        ids = torch.randint(0, V, (B, 4096), device="cuda", generator=gen)
        row = {"model": name, "layers": model.config.num_hidden_layers, "part": f"train {B}x4096", "mode": "default"}
        ref_loss = ref_grads = None
        for variant in variants:
            how, backward = TRAIN_VARIANTS[variant]
            with free_experts(model) if variant == "free_moe" else contextlib.nullcontext():
                snapshot = snapshots and os.path.join(snapshots, f"{name}_train_{B}x4096_{variant}.pickle")
                cells, loss, grads = train_point(model, how, backward, ids, snapshot=snapshot,
                                                 env=TRAIN_VARIANT_ENV.get(variant))
            if how is None:
                ref_loss, ref_grads = loss, grads
            elif loss is not None and ref_loss is not None and variant != "free_moe":
                cells["err"] = rel_err(loss, ref_loss)
                cells["grad_err"] = harness.grads_rel_err(grads, ref_grads)
            del grads  # not held while the next variant is measured
            row.update({f"{variant}_{k}": v for k, v in cells.items()})
            print(row["part"], variant, cells, flush=True)
        for variant in variants:
            if variant not in ("eager", "inductor"):
                row[f"speedup_{variant}"] = row["inductor_ms"] / row[f"{variant}_ms"]
        if "free_moe" in variants:
            row["bound"] = row.pop("speedup_free_moe")
        # what a user gets: the guard's (Inductor's MoE) without the switch
        row["speedup"] = row.get("speedup_fused_moe", float("nan"))
        rows.append(row)
    model.eval()
    return rows


def fp8_model(model):
    """A copy of `model` whose routed experts are transformers' FP8Experts (128 x 128 fp32 block scales, quantized
    from its bf16 weights on the GPU) run by the fused_moe experts implementation, as a finegrained-FP8 checkpoint
    loads through moe_compiler.from_pretrained."""
    import copy

    from moe_compiler.integrations import hf_experts
    from moe_compiler.testing.quantized import to_fp8_experts

    hf_experts.register()
    fp8 = copy.deepcopy(model)
    if not to_fp8_experts(fp8):
        raise ValueError(f"{type(model).__name__}: no experts module to quantize")
    fp8.set_experts_implementation(hf_experts.NAME)
    return fp8.eval()


def int4_model(model):
    """A copy of `model` whose routed experts are packed INT4 (PackedInt4Experts, quantized from its bf16 weights on
    the GPU), as a compressed-tensors INT4 checkpoint loads through moe_compiler.from_pretrained."""
    import copy

    from moe_compiler.testing.quantized import to_int4_experts

    int4 = copy.deepcopy(model)
    if not to_int4_experts(int4):
        raise ValueError(f"{type(model).__name__}: no experts module to quantize")
    return int4.eval()


QUANTIZED_MODELS = {"fused_fp8": fp8_model, "fused_int4": int4_model}  # variant -> its own copy of the model


def bench_model(name, parts, layers=None, train_variants=DEFAULT_TRAIN_VARIANTS, bound=False, extra=(),
                decode_modes=DECODE_MODES, train_batches=(1, 4), snapshots=None):
    model = build(name, layers=layers)
    copies = {v: QUANTIZED_MODELS[v](model) for v in extra if v in QUANTIZED_MODELS}
    V = model.config.vocab_size
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    points = []
    if "prefill" in parts:
        points.append(("prefill", "default", torch.randint(0, V, (1, 4096), device="cuda", generator=gen), 10))
    if "decode" in parts:
        for mode in decode_modes:
            for B in (1, 32):
                points.append((f"decode B={B}", mode, torch.randint(0, V, (B, 1), device="cuda", generator=gen), 50))
    if "prefill-dynamic" in parts:
        # prompts of varying length, as an evaluation run sends them: two other lengths first, so the length is a
        # symbol by the timed one (automatic dynamic shapes: ops/inline.py, triton_config.config_tokens)
        for T in (512, 2048):
            lengths = (T - 96, T - 32)
            warm = tuple(torch.randint(0, V, (1, t), device="cuda", generator=gen) for t in lengths)
            points.append((f"prefill {T} dyn", "default", torch.randint(0, V, (1, T), device="cuda", generator=gen),
                           10, warm))
    for part, mode, ids, reps, *warm in points:
        warm = warm[0] if warm else ()
        row = {"model": name, "layers": model.config.num_hidden_layers, "part": part, "mode": mode}
        # eager has no mode: it runs (as the logits' reference) in the default-mode points only
        backends = {v: b for v, b in BACKENDS.items() if b is not None or mode == "default"}
        if mode == "default":
            backends.update({v: EXTRA_VARIANTS[v] + ((copies[v],) if v in copies else ()) for v in extra})
        for variant, cells in forward_points(model, backends, None if mode == "default" else mode, ids, reps,
                                             warm).items():
            row.update({f"{variant}_{k}": v for k, v in cells.items()})
            print(part, mode, variant, cells, flush=True)
        row["speedup"] = row["inductor_ms"] / row["fused_moe_ms"]
        for v in extra if mode == "default" else ():
            if f"{v}_ms" in row:
                row[f"{v}_speedup"] = row["inductor_ms"] / row[f"{v}_ms"]
        if bound:
            with free_experts(model):
                cells = forward_points(model, {"free_moe": "inductor"}, None if mode == "default" else mode, ids,
                                       reps, warm)["free_moe"]
            row.update({f"free_moe_{k}": v for k, v in cells.items()})
            row["bound"] = row["inductor_ms"] / row["free_moe_ms"]
            print(part, mode, "free_moe", cells, flush=True)
        rows.append(row)
    if "generate" in parts:
        for B in (1, 8):
            row = {"model": name, "layers": model.config.num_hidden_layers, "part": f"generate B={B}",
                   "mode": "reduce-overhead"}
            tokens = {}
            for variant, backend in BACKENDS.items():
                cells, tokens[variant] = generate_point(model, backend, B)
                row.update({f"{variant}_{k}": v for k, v in cells.items()})
                print(row["part"], variant, cells, flush=True)
            row["fused_moe_same_tokens_as_eager"] = float((tokens["fused_moe"] == tokens["eager"]).float().mean())
            row["speedup"] = row["fused_moe_tok_s"] / row["inductor_tok_s"]
            if bound:
                with free_experts(model):
                    cells, _ = generate_point(model, "inductor", B)
                row.update({f"free_moe_{k}": v for k, v in cells.items()})
                row["bound"] = row["free_moe_tok_s"] / row["inductor_tok_s"]
                print(row["part"], "free_moe", cells, flush=True)
            rows.append(row)
    if "train" in parts:
        rows += bench_train(model, name, (*train_variants, "free_moe") if bound else train_variants, train_batches,
                            snapshots)
    del model
    torch.cuda.empty_cache()
    return rows


def print_table(rows):
    print(f"\n{'model':>16} {'part':>12} {'mode':>15} {'unit':>6} {'eager':>9} {'inductor':>9} {'fused':>9} "
          f"{'ratio':>6} {'bound':>6} {'err ind/fused':>15} {'compile s ind/fused':>20} "
          f"{'peak GiB ind/fused (compiling call)':>36}")
    for r in rows:
        if r["part"].startswith("train"):
            continue
        unit = "tok_s" if r["part"].startswith("generate") else "ms"
        cells = [r.get(f"{v}_{unit}") for v in BACKENDS]
        err = f"{r.get('inductor_err', float('nan')):.1e}/{r.get('fused_moe_err', float('nan')):.1e}"
        comp = f"{r['inductor_compile_s']:.0f}/{r['fused_moe_compile_s']:.0f}"
        nan = float("nan")
        mem = (f"{r.get('inductor_peak_gib', nan):.1f}/{r.get('fused_moe_peak_gib', nan):.1f} "
               f"({r.get('inductor_first_peak_gib', nan):.1f}/{r.get('fused_moe_first_peak_gib', nan):.1f})")
        print(f"{r['model']:>16} {r['part']:>12} {r['mode']:>15} {'tok/s' if unit == 'tok_s' else 'ms':>6} "
              + " ".join(f"{c:>9.2f}" if c is not None else f"{'-':>9}" for c in cells)
              + f" {r['speedup']:>6.2f} {r.get('bound', float('nan')):>6.2f} {err:>15} {comp:>20} {mem:>36}")
    extra = [(r, v) for r in rows for v in EXTRA_VARIANTS if f"{v}_speedup" in r]
    if extra:
        print("\nextra variants (default mode): inductor time / variant time, same interleaved rounds")
        for r, v in extra:
            print(f"{r['model']:>16} {r['part']:>12} {v:>14} {r[f'{v}_ms']:9.2f} ms {r[f'{v}_speedup']:6.2f}x "
                  f"(fused_moe {r['speedup']:.2f}x)")
    train = [r for r in rows if r["part"].startswith("train")]
    if train:
        variants = [v for v in TRAIN_VARIANTS if any(f"{v}_ms" in r for r in train)]
        print("\ntraining step: ms, inductor / variant, peak GiB of the timed steps; then loss and expert-gradient rel "
              "err vs eager")
        print(f"{'model':>16} {'part':>12} " + " ".join(f"{v:>24}" for v in variants))
        for r in train:
            cells = [f"{r.get(f'{v}_ms', float('nan')):8.1f} {r['inductor_ms'] / r.get(f'{v}_ms', float('nan')):5.2f}x "
                     f"{r.get(f'{v}_peak_gib', float('nan')):5.1f}G" for v in variants]
            print(f"{r['model']:>16} {r['part']:>12} " + " ".join(f"{c:>24}" for c in cells))
            print(f"{'':>16} {'err':>12} " + " ".join(
                f"{r.get(f'{v}_err', 0):11.1e} {r.get(f'{v}_grad_err', 0):11.1e}" for v in variants))


def label(row) -> str:
    mode = "" if row["mode"] == "default" or row["part"].startswith("generate") else ", r-o"
    return row["part"].replace("decode ", "decode\n") + mode


def plot(rows, path):
    """One group of bars per model: fused_moe's speedup over plain torch.compile in each part."""
    plt = harness.pyplot(path)
    if plt is None:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(labels) * len(models) + 2), 4.2))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        by = {label(r): r["speedup"] for r in rows if r["model"] == model}
        xs = [j + (i - (len(models) - 1) / 2) * width for j, lab in enumerate(labels) if lab in by]
        ax.bar(xs, [by[lab] for lab in labels if lab in by], width, label=model)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("torch.compile time / fused_moe time")
    ax.set_title("whole models, bf16, random weights (benchmarks/bench_models.py)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = harness.parser(__doc__, shapes=MODELS, out="models")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's entry in models.py)")
    ap.add_argument("--train-variants", nargs="+", choices=list(TRAIN_VARIANTS), default=list(DEFAULT_TRAIN_VARIANTS),
                    help="the train part's variants (eager and inductor always run)")
    ap.add_argument("--train-batches", nargs="+", type=int, default=[1, 4], help="the train part's B (B x 4096 tokens)")
    ap.add_argument("--memory-snapshots", metavar="DIR",
                    help="the train part: the allocator's history of one more step per point, as DIR/<model>_train_"
                         "<B>x4096_<variant>.pickle (benchmarks/probes/peak_tensors.py names the tensors at the peak)")
    ap.add_argument("--bound", action="store_true",
                    help="also time each cell with the routed experts free (free_moe): the most any experts "
                         "implementation can gain there")
    ap.add_argument("--decode-modes", nargs="+", choices=DECODE_MODES, default=list(DECODE_MODES),
                    help="the decode part's modes (default: both)")
    ap.add_argument("--extra", nargs="+", choices=list(EXTRA_VARIANTS), default=[],
                    help="more variants of the default-mode points, timed interleaved with the others (rows: "
                         "<variant>_ms, <variant>_speedup = inductor time / its time)")
    ap.add_argument("--from-json", help="print the table and draw the plot of an earlier run's results file")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["rows"]
        print_table(rows)
        return plot(rows, args.from_json.removesuffix(".json") + ".png")
    gpu = harness.gpu_name()
    harness.compile_per_shape()
    rows = []
    for name in args.shapes:
        rows += bench_model(name, args.parts, args.layers, args.train_variants, args.bound, args.extra,
                            args.decode_modes, tuple(args.train_batches), args.memory_snapshots)
        if os.environ.get("OUT"):
            harness.write_json(os.path.join(os.environ["OUT"], "models.json"), rows)
    print_table(rows)
    # merged into the file by cell: a run of some parts of some models keeps the other rows (and the file's note)
    saved = harness.save_rows(args.out, "models", rows, gpu, merge_on=("model", "layers", "part", "mode"))
    if saved is not None:  # the plot of the whole (merged) file
        path, all_rows = saved
        plot(all_rows, path.removesuffix(".json") + ".png")


if __name__ == "__main__":
    main()
