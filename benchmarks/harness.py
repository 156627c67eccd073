"""What the benchmark scripts share: their common flags, timing, result files (JSON rows merged by key, JSONL
streams), the roofline floor and geometric mean, GPU-named result paths, transformers' experts module, and
plotting (optional).

Scripts run from the repository root as modules: `python -m benchmarks.<name> --help`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import torch

from moe_compiler.spec import Activation, ExpertsSpec, GateUpLayout
from moe_compiler.tune.shapes import model_spec
from moe_compiler.tune.timing import Timer, events, interleaved, median, wall_clock  # noqa: F401 - the scripts' timing

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Ceilings measured on our GPUs (bf16 matmul FLOP/s, device copy bytes/s; NOTES.md): the roofline floor of every
# benchmark, for the GPU it runs on. A GPU not listed gets the H100's, and floor_s says so once.
PEAKS = {"H100": (785e12, 3.02e12), "H200": (729e12, 4.26e12)}


@functools.cache
def peaks() -> tuple[float, float]:
    """(FLOP/s, bytes/s) of this machine's GPU (the H100's without a GPU or for an unlisted one)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for key, value in PEAKS.items():
        if key in name:
            return value
    if name:
        print(f"harness: no measured peaks for {name}; roofline floors use the H100's {PEAKS['H100']}")
    return PEAKS["H100"]

# Decode runs captured in CUDA graphs (mode="reduce-overhead"), prefill eager: each T is timed as it runs.
GRAPH_MAX_T = 128

AUTO = "auto"  # `--out` without a path: the GPU-named file under results/


# --- flags -------------------------------------------------------------------------------------------

def parser(doc: str, *, shapes=None, tokens=None, dtypes=None, out: str | None = None) -> argparse.ArgumentParser:
    """A parser whose --help prints the script's docstring (its commands) as written, with the flags the
    scripts share, each added when its argument is given:

        shapes  the names --shapes NAME ... takes (default: all of them)
        tokens  the default of --tokens T ...
        dtypes  the names --dtype takes (default: the first)
        out     the result kind of --out PATH; a bare --out writes results/<out>_<gpu>.json (save_rows())
    """
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # run with -m: usage names the module
    prog = f"python -m {spec.name}" if spec is not None else None
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if shapes is not None:
        p.add_argument("--shapes", nargs="+", choices=list(shapes), default=list(shapes), metavar="NAME",
                       help=f"of {list(shapes)}")
    if tokens is not None:
        p.add_argument("--tokens", type=int, nargs="+", default=list(tokens), metavar="T")
    if dtypes is not None:
        p.add_argument("--dtype", choices=list(dtypes), default=dtypes[0])
    if out is not None:
        p.add_argument("--out", nargs="?", const=AUTO, metavar="PATH",
                       help=f"write the rows as JSON (bare --out: benchmarks/results/{out}_<gpu>.json)")
    return p


# --- the machine and its result files ---------------------------------------------------------------

def gpu_name() -> str:
    """This machine's GPU; exits with a message where there is none (the GPU benchmarks' first call)."""
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch.cuda.get_device_name()


def device_label(device: str) -> str:
    """The GPU's name with _ for spaces, as result files and tuned configs are named, or "cpu"."""
    return gpu_name().replace(" ", "_") if device == "cuda" else "cpu"


def result_path(kind: str, suffix: str = ".json", directory: str = RESULTS, device: str = "cuda") -> str:
    """<directory>/<kind>_<gpu><suffix> (<gpu><suffix> where kind is empty)."""
    label = device_label(device)
    return os.path.join(directory, f"{kind}_{label}{suffix}" if kind else label + suffix)


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def save_rows(out: str | None, kind: str, rows: list[dict], gpu: str, key: str | None = None, replaced=(),
              merge_on: tuple[str, ...] = (), merge_defaults: dict | None = None) -> tuple[str, list[dict]] | None:
    """{"gpu", "torch", "rows"} to the file a parsed --out names: none where it was not given, results/<kind>_<gpu>.json
    for a bare --out. With `key`, an existing file's rows whose row[key] is not in `replaced` stay ahead of the
    new ones: a run of some shapes (routers) updates only their rows of the full table. With `merge_on`, the rows
    that no new row matches on those fields stay: a run of some parts of some models updates only those cells
    (`merge_defaults`: the value of a field that older rows lack). Either way the file's other keys (a note on how
    its rows ran) stay. Returns (path, the rows written), None where nothing was."""
    if out is None:
        return None
    path = result_path(kind) if out == AUTO else out
    kept: dict = {}
    if (key is not None or merge_on) and os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        ident = lambda r: tuple(r.get(f, (merge_defaults or {}).get(f)) for f in merge_on)  # noqa: E731
        new = {ident(r) for r in rows}
        rows = [r for r in kept["rows"] if (key is None or r[key] not in replaced)
                and not (merge_on and ident(r) in new)] + rows
    write_json(path, {**kept, "gpu": gpu, "torch": torch.__version__, "rows": rows})
    return path, rows


def append_jsonl(path: str, row: dict) -> None:
    """One row appended as it is measured: a run that times out keeps what it measured."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- arithmetic and timing ----------------------------------------------------------------------------

def floor_s(flops: float, nbytes: float) -> float:
    """The roofline floor in seconds on this GPU: the FLOPs or the bytes at its peak (peaks()), whichever is
    longer."""
    peak_flops, peak_bytes = peaks()
    return max(flops / peak_flops, nbytes / peak_bytes)


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(map(math.log, xs)) / len(xs))


def as_run(timer: Timer, T: int):
    """The timing of a call at T as a model runs it: under a CUDA graph for decode, eager otherwise."""
    return timer.graph if T <= GRAPH_MAX_T else timer.eager


GRAD_SLICE = 1 << 28  # elements of a gradient compared at once: 1 GiB in fp32


def grads_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over the tensors at once, computed in slices. bench_models passes every expert
    weight gradient together, not the worst tensor's: in bf16 a few tokens' top-k flips between eager and a compiled
    run (near-tied router scores rounded differently), and an expert that gained or lost its only tokens has a
    gradient of another size altogether (a per-tensor max of ~1.2 measured for Inductor itself)."""
    num = den = 0.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for g, w in zip(got, want):  # on the GPU in flat slices (fp32 there; the norms summed in double)
        # Slices, not whole tensors: DeepSeek-V3's stacked gate_up gradient is 28 GiB in fp32 (session 48: out of
        # memory on the H100 beside a one-layer train step).
        for gs, ws in zip(g.reshape(-1).split(GRAD_SLICE), w.reshape(-1).split(GRAD_SLICE)):
            ws = ws.to(device, torch.float32)
            num += float((gs.to(device, torch.float32) - ws).double().square().sum())
            den += float(ws.double().square().sum())
    return (num / den) ** 0.5


def kernel_times(fn, calls: int = 20, top: int = 8) -> list[tuple[float, int, str]]:
    """Where one call's device time goes: (µs per call, launches per call, kernel name) of its `top` kernels by
    CUDA time (torch.profiler, mean over `calls` calls after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by_time = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return [(e.device_time_total / calls, e.count // calls, e.key) for e in by_time]


def compile_per_shape() -> None:
    """One compiled graph per (shape, T), as a model with static shapes has: lift Dynamo's recompile limit."""
    torch._dynamo.config.recompile_limit = 1000


def say_compile_failed(variant: str, e: Exception) -> None:
    """One line for an A/B variant torch cannot build (the run goes on without it)."""
    print(f"{variant}: failed to compile: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


# --- transformers' experts -------------------------------------------------------------------------

def hf_experts(E: int, k: int, H: int, I: int, dtype, device, own_layout: bool = False):
    """(config, module) of transformers' own experts, weights drawn with fan-in scaling so outputs are O(1):
    Qwen3MoeExperts (the standard SwiGLU experts) for every shape, or with `own_layout` the module of the model
    the shape comes from where its layout differs (GptOssExperts: [E, H, 2I] interleaved / [E, I, H], biases,
    clamped SwiGLU; tune.shapes.model_spec)."""
    from transformers import AutoConfig

    gpt_oss = own_layout and model_spec(H, I).activation is Activation.GPT_OSS_SWIGLU
    if gpt_oss:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

        cfg = AutoConfig.for_model("gpt_oss", hidden_size=H, intermediate_size=I, num_local_experts=E,
                                   num_experts_per_tok=k)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        cfg = AutoConfig.for_model("qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                   num_experts_per_tok=k)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            experts = Experts(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, H**-0.5)
        experts.down_proj.normal_(0, I**-0.5)
        for bias in (getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)):
            if bias is not None:
                bias.normal_(0, 0.1)
    return cfg, experts


def op_operands(experts) -> tuple[tuple, ExpertsSpec]:
    """((w_gate_up, w_down, b_gate_up, b_down), spec) of our experts op for transformers' experts module."""
    w1, w2 = experts.gate_up_proj, experts.down_proj
    b1, b2 = getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)
    if b1 is None:
        return (w1, w2, None, None), ExpertsSpec()
    spec = ExpertsSpec(Activation.GPT_OSS_SWIGLU, GateUpLayout.INTERLEAVED, transposed=True,
                       swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit))
    return (w1, w2, b1, b2), spec


def hf_forward(cfg, experts, impl: str):
    """experts(x, ids, w) under transformers' experts implementation `impl` (eager, grouped_mm, batched_mm)."""
    def run(x, ids, w):
        cfg._experts_implementation = impl
        return experts(x, ids, w)
    return run


# --- plots -------------------------------------------------------------------------------------------

def pyplot(path: str):
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed (plots are
    optional: the JSON holds every number), saying that `path` is not written."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written ({path}); `pip install matplotlib` for it")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
