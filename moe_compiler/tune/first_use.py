"""Autotune on first use: a shape this GPU's committed table lacks is tuned the first time a config is looked
up for it, within a time budget, and the winner is cached on disk for every later process.

    lookup (lowering/triton_config.py) -- no entry at (GPU, dtype, E, k, H, I, T bucket) -->
        config_for: the disk cache? -> else, outside a CUDA graph capture: tune -> cache -> one log line

When: where the config is first needed. For a compiled model that is compile time (the op's launches are
recorded while tracing, lowering/launch.py; and the backend's numerical check runs the op once per layer),
with the graph's fixed shapes, outside any capture, while the user already waits for the compile. An eager
call tunes at its first call; a call inside a CUDA graph capture never tunes (kernels launched there would
be captured, not timed): it gets the nearest entry or the defaults, and the next call outside a capture tunes.

What: a pruned search, as Inductor's max-autotune prunes. The candidates are the untuned default and every
distinct config that won an entry of the committed tables (this GPU's, then other GPUs'), of the paths that
suit T (decode only where T*k <= E), nearest T first; each is timed as a whole forward under a CUDA graph on
random inputs of the call's shape (tune.search.Bench) under uniform and skewed routing (tune.shapes.ROUTINGS),
scored by the geometric mean of the two as the full search's final is, until the budget runs out. The winner is checked
against the fp32 reference; a wrong or failing candidate is skipped.

Cache: <cache dir>/autotune/<gpu>_triton-<version>_<hash of the kernel sources>.json, entries as in the
committed tables. Cache dir: MOE_COMPILER_CACHE_DIR, else $XDG_CACHE_HOME/moe_compiler, else
~/.cache/moe_compiler. A kernel change (new hash) or a new Triton starts a new file.
On by default (lowering/triton_config.AUTOTUNE_DEFAULT); off: MOE_COMPILER_AUTOTUNE=0 or the backend option
moe_compiler.autotune=False.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import statistics
import time
from collections.abc import Callable

import torch

from moe_compiler.lowering import cutlass, device, triton_config
from moe_compiler.lowering.triton_config import Config, Path
from moe_compiler.tune.shapes import model_spec

log = logging.getLogger("moe_compiler.autotune")

BUDGET_S = 60.0  # per (shape, T bucket)
MAX_CANDIDATES = 24
CACHE_ENV = "MOE_COMPILER_CACHE_DIR"
# Tuning draws its own weights: decline where they would take more than this share of the free GPU memory.
MAX_MEMORY_SHARE = 0.5


# --- the search ------------------------------------------------------------------------------------------

def candidates(gpu_name: str, capability, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int) -> list[Config]:
    """The default first, then the distinct configs that won committed entries, of the paths suiting T,
    entries of the nearest T (log scale) and of this GPU first; at most MAX_CANDIDATES."""
    from .search import block_m_candidates, fits_smem, uses_decode

    itemsize = torch.finfo(dtype).bits // 8
    block_ms = set(block_m_candidates(T, k, E))
    scored = []
    for path in sorted(triton_config.CONFIG_DIR.glob("*.json")):
        own = path == triton_config.gpu_file(gpu_name)
        for e in triton_config.load_file(path):
            cfg = e["config"]
            if cfg.path is Path.DECODE:
                ok = uses_decode(T, k, E)
            elif cfg.path in (Path.GROUPED_MM, Path.CUTLASS):
                ok = False  # added below, wherever it applies
            else:
                gu, dn = cfg.gate_up, cfg.down
                ok = (cfg.block_m in block_ms
                      and fits_smem(cfg.block_m, 2 * gu.block_n, gu.block_k, gu.num_stages, itemsize)
                      and fits_smem(cfg.block_m, dn.block_n, dn.block_k, dn.num_stages, itemsize))
            if ok:
                scored.append(((abs(math.log(max(T, 1) / e["T"])), not own), cfg))
    ranked = [cfg for _, cfg in sorted(scored, key=lambda s: s[0])]
    out = [triton_config.default_config(dtype, E, k, H, I, T, model_spec(H, I).transposed)]
    if grouped_mm_applies(capability, dtype, H, I):
        out.append(triton_config.GroupedMMConfig())  # torch's grouped GEMM: one candidate, cheap to time
    # The nearest committed Triton winner before CUTLASS's configs: a budget spent on those still times it.
    out += ranked[:1]
    if cutlass_applies(capability, dtype, H, I) and not uses_decode(T, k, E):
        out += [triton_config.CutlassConfig(i) for i in range(len(cutlass.CONFIGS))]
    for cfg in ranked:
        if cfg not in out:
            out.append(cfg)
    return out[:MAX_CANDIDATES]


def cutlass_applies(capability, dtype: torch.dtype, H: int, I: int) -> bool:
    """Whether csrc/'s grouped GEMM can take this problem here (sm90, bf16/fp16, 16-byte rows, not switched off)
    and is already loaded in this process: a first-use tuning never starts its build (minutes, past the budget)."""
    return (tuple(capability) == (9, 0) and dtype in cutlass.DTYPES and H % 8 == 0 and I % 8 == 0
            and cutlass.mode() != "0" and cutlass.loaded())


def grouped_mm_applies(capability, dtype: torch.dtype, H: int, I: int) -> bool:
    """Whether torch._grouped_mm takes this problem (dispatch.select: bf16 on sm90+, 16-byte rows)."""
    return dtype == torch.bfloat16 and tuple(capability) >= (9, 0) and H % 8 == 0 and I % 8 == 0


def choose(configs: list[Config], measure: Callable[[Config], float], budget_s: float,
           clock: Callable[[], float] = time.monotonic) -> tuple[Config, dict]:
    """(the fastest config, {config: seconds}) timing configs in order until the budget is spent (the first is
    always timed). A config whose launch fails is skipped."""
    start = clock()
    times = {}
    for cfg in configs:
        if times and clock() - start > budget_s:
            break
        try:
            times[cfg] = measure(cfg)
        except Exception as e:  # noqa: BLE001 - a candidate that fails on this shape is a lost candidate only
            log.debug("autotune: %s failed: %s: %s", cfg, type(e).__name__, e)
    if not times:
        raise RuntimeError("moe_compiler autotune: every candidate failed")
    return min(times, key=times.get), times


def _measure_on_gpu(dtype, E, k, H, I, T) -> tuple[Callable[[Config], float], Callable[[Config], float]] | None:
    """(seconds of a whole forward with a config — the geometric mean over shapes.ROUTINGS, as the full search
    scores — and its rel err vs fp32), on random inputs; None where the problem's buffers would not fit next to
    what the process holds."""
    from .search import Bench, check, graph_calls, problem
    from .timing import Timer

    need = (3 * E * H * I + 4 * T * k * max(H, I)) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info()
    if need > MAX_MEMORY_SHARE * free:
        log.warning("moe_compiler: not autotuning E=%d k=%d H=%d I=%d T=%d: its buffers (%.1f GiB) would take more "
                    "than half the free GPU memory (%.1f GiB); using the nearest tuned entry or defaults",
                    E, k, H, I, T, need / 2**30, free / 2**30)
        return None
    b = Bench(*problem(T, E, k, H, I, dtype))
    routed = b.routed(seed=T)  # the full search's score
    timer = Timer("cuda")
    calls = graph_calls(T, k, H, I)

    def seconds(cfg):
        return statistics.geometric_mean([timer.graph(r.forward(cfg), calls=calls) for r in routed])

    return seconds, (lambda cfg: check(b, cfg))


# --- the cache -------------------------------------------------------------------------------------------

def cache_dir() -> pathlib.Path:
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "moe_compiler"


@functools.cache
def source_hash() -> str:
    """A hash of the Triton kernels' sources (lowering/triton_*.py): a kernel change invalidates the cache."""
    h = hashlib.sha256()
    for path in sorted(pathlib.Path(triton_config.__file__).parent.glob("triton_*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_file(gpu_name: str) -> pathlib.Path:
    import triton

    return cache_dir() / "autotune" / f"{gpu_name.replace(' ', '_')}_triton-{triton.__version__}_{source_hash()}.json"


def _entry_key(dtype, E, k, H, I, T) -> tuple:
    return (str(dtype).removeprefix("torch."), E, k, H, I, T)


def cached(gpu_name: str, dtype, E, k, H, I, T) -> Config | None:
    path = cache_file(gpu_name)
    if not path.exists():
        return None
    try:
        entries = triton_config.load_file(path)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("moe_compiler: ignoring the autotune cache %s (%s); delete it to re-tune", path, e)
        return None
    key = _entry_key(dtype, E, k, H, I, T)
    for e in entries:
        if (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"]) == key:
            return e["config"]
    return None


def store(gpu_name: str, capability, dtype, E, k, H, I, T, config: Config, us: float) -> pathlib.Path:
    """Add (or replace) the entry; written to a temporary file and renamed, so a reader never sees half."""
    import triton

    path = cache_file(gpu_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"schema": triton_config.SCHEMA, "gpu": gpu_name, "capability": list(capability),
            "triton": triton.__version__, "torch": torch.__version__, "written_by": "moe_compiler autotune",
            "entries": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    key = _entry_key(dtype, E, k, H, I, T)
    entries = [e for e in data.get("entries", []) if (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"]) != key]
    entries.append({"dtype": key[0], "E": E, "k": k, "H": H, "I": I, "T": T,
                    "config": triton_config.to_dict(config), "us": round(us, 2)})
    data["entries"] = entries
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


# --- first use -------------------------------------------------------------------------------------------

def tune_point(gpu_name: str, capability, dtype, E: int, k: int, H: int, I: int, T: int,
               measure_factory=_measure_on_gpu, budget_s: float = BUDGET_S) -> tuple[Config, float, float] | None:
    """(the fastest correct config, its seconds, the untuned default's seconds) of the pruned search, or None
    where the problem does not fit in memory or no candidate is correct. Real tensors and launches: call it
    outside any tracing mode (config_for does)."""
    measures = measure_factory(dtype, E, k, H, I, T)
    if measures is None:
        return None
    measure, error = measures
    configs = candidates(gpu_name, capability, dtype, E, k, H, I, T)
    _, times = choose(configs, measure, budget_s)
    for cfg in sorted(times, key=times.get):  # the fastest correct one (a config file must never hold a wrong one)
        err = error(cfg)
        if err <= 1e-2:
            return cfg, times[cfg], times[configs[0]] if configs[0] in times else float("nan")
        log.warning("moe_compiler autotune: %s gives rel err %.1e on E=%d k=%d H=%d I=%d T=%d; skipped",
                    cfg, err, E, k, H, I, T)
    return None


def config_for(gpu_name: str, capability, dtype, E: int, k: int, H: int, I: int, T: int,
               measure_factory=_measure_on_gpu, budget_s: float = BUDGET_S) -> Config | None:
    """The cached or freshly tuned config of (dtype, E, k, H, I) at grid point T; None where tuning is
    declined (inside a capture, not enough memory) or fails (the caller falls back, with its warning)."""
    hit = cached(gpu_name, dtype, E, k, H, I, T)
    if hit is not None:
        return hit
    if device.capturing():
        return None
    from torch.utils._python_dispatch import _disable_current_modes

    shape = f"{str(dtype).removeprefix('torch.')} experts E={E} k={k} H={H} I={I} T={T}"
    t0 = time.monotonic()
    try:
        # Real tensors and real launches, also when the lookup happens while a graph is being traced.
        with _disable_current_modes(), torch.no_grad():
            found = tune_point(gpu_name, capability, dtype, E, k, H, I, T, measure_factory, budget_s)
    except Exception as e:  # noqa: BLE001 - tuning is an optimization: a failure falls back, loudly
        log.warning("moe_compiler: autotuning %s failed (%s: %s); using the nearest tuned entry or defaults",
                    shape, type(e).__name__, e)
        return None
    if found is None:
        return None
    best, best_s, default_s = found
    path = store(gpu_name, capability, dtype, E, k, H, I, T, best, best_s * 1e6)
    log.warning("moe_compiler: autotuned %s on %s in %.0f s: %.1f us (untuned default %.1f us); cached in %s",
                shape, gpu_name, time.monotonic() - t0, best_s * 1e6, default_s * 1e6, path)
    return best
