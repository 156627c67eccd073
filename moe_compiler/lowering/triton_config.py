"""Kernel configurations of the Triton experts forward: typed, validated, and stored per GPU as data.

    configs/<gpu name>.json     written by `python -m moe_compiler.tune`, committed, schema below
    lookup(gpu, capability, dtype, E, k, H, I, T) -> DecodeConfig | SortedConfig

A tuned file holds entries keyed by (dtype, E, k, H, I, T), T on the tuner's grid T_GRID. Lookup takes the
entries of the exact problem shape and the one whose T is nearest in log scale (configs change with the rows
per expert, T*k/E, and the grid steps T by 2-4x). Where this GPU's file has no entry at the call's grid point
(its T bucket), the caller's `autotune` may supply one (tune/first_use.py: tuned on first use, cached on disk).
Otherwise: the nearest T of this GPU's entries; a GPU without a file of its own borrows the file of a GPU of
the same compute capability (an H200 uses the H100's tiles), with a warning; a shape or dtype without entries
gets the heuristic default below. Each of these gets ONE loud warning per (GPU, dtype, shape) naming the
command that tunes it: a slow config is silent otherwise.

A symbolic token count (prompts of varying length) runs one config for its whole band (T_BANDS): the file's band
entry of the shape where `python -m moe_compiler.tune --bands` measured one faster across the band's lengths
(tune/bands.py), else the entry of the band's grid point, found as above.

Schema (version 1):
    {"schema": 1, "gpu": str, "capability": [major, minor], "triton": str, "torch": str, "written_by": str,
     "earlier": [str, ...] (the commands of the entries a --merge kept; optional),
     "entries": [{"dtype": "bfloat16", "E": int, "k": int, "H": int, "I": int, "T": int,
                  "config": <DecodeConfig or SortedConfig as a dict, with "path">, "us": float}, ...],
     "bands": [{"dtype", "E", "k", "H", "I", "band": [lowest, highest], "config": <as above, run as written>,
                "T": the grid point whose entry it is, "gain": float, "lengths": [int, ...],
                "written_by": str}, ...] (optional)}
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import math
import pathlib
import warnings
from collections.abc import Callable

import torch

from ..switches import OptionSwitch

log = logging.getLogger(__name__)

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
SCHEMA = 1
# The tuner's T points; a call's bucket is the nearest. 2048 since session 27: a static call of 1449-2896 tokens had
# run the 1024 or 4096 entry, tuned for a length 2x away, and measured at 2048 those lose up to 1.36x to the best
# (Kimi-K2 12.2 vs 8.9 ms, DeepSeek-V3 7.6 vs 6.0 ms; benchmarks/NOTES.md, session 26's band tuning).
T_GRID = (1, 4, 16, 64, 128, 512, 1024, 2048, 4096, 16384)

AUTOTUNE_ENV = "MOE_COMPILER_AUTOTUNE"


# On by default: its GPU path ran on an H200 (the tuning at compile time from the fake's shapes, a second process
# reading the cache; tests/tune/test_first_use.py) and found configs within 1.001x of the full search's
# (benchmarks/NOTES.md "H200 tables for every shape"; "session 10").
AUTOTUNE_DEFAULT = "1"


_AUTOTUNE = OptionSwitch(AUTOTUNE_ENV, AUTOTUNE_DEFAULT, "autotune untuned shapes", "do not")
autotune_option = _AUTOTUNE.option  # the backend's `moe_compiler.autotune` option, for the lookups of one compile


def autotune_enabled() -> bool:
    """Autotune on first use: the backend option while a compile runs (autotune_option), else the environment
    (MOE_COMPILER_AUTOTUNE=1 turns it on, =0 off; AUTOTUNE_DEFAULT otherwise)."""
    return _AUTOTUNE()


def bucket(T: int) -> int:
    """The grid point of T: nearest in log scale, ties to the smaller."""
    return min(T_GRID, key=lambda g: (abs(math.log(max(T, 1) / g)), g))


# A traced call whose token count is a symbol (dynamic shapes: one graph for prompts of many lengths) takes the
# config of its band's grid point (T_BAND_POINTS) under a guard that keeps T in the band of its hint (the length
# it was traced at); a T outside the band recompiles. The band's point, not the hint: the graph serves every
# length of the band, whichever of them compiled it (DeepSeek-V3 traced at 480 tokens ran 2048-token prompts
# with the 512 config's 32-row tiles: 0.77x of Inductor, 0.99x with the band's point; benchmarks/NOTES.md,
# session 24). Bands, not the grid's nine buckets: Dynamo compiles a frame at most
# torch._dynamo.config.recompile_limit (8) times and then runs it uncompiled, so the guards may split the lengths
# into a few graphs only. The bounds are the geometric midpoints of the grid points 4, 64, 1024 and 16384: a call
# is at most 4x from its band's point (16384's band: unbounded above), as a static call is at most ~2x from its
# grid point.
T_BANDS = (16, 256, 4096)
T_BAND_POINTS = (4, 64, 1024, 16384)  # the grid point whose config each band's graph takes


def band(T: int) -> tuple[int, int | None]:
    """(lowest, highest or None) token count of T's band (T_BANDS)."""
    lo = 1
    for hi in T_BANDS:
        if T <= hi:
            return lo, hi
        lo = hi + 1
    return lo, None


def band_point(T: int) -> int:
    """The grid point (T_BAND_POINTS) whose config the graph of T's band takes."""
    hi = band(T)[1]
    return T_BAND_POINTS[T_BANDS.index(hi) if hi is not None else -1]


def config_tokens(T) -> tuple[int, int | None]:
    """(the token count a config is looked up for, the highest T the traced call may see, None: unbounded). T
    itself for a plain int. A symbolic T (dynamic shapes) is guarded into its hint's band (T_BANDS) and gives
    that band's grid point (T_BAND_POINTS): the compiled graph then serves only lengths of that band, with one
    config whatever length traced it, and Dynamo recompiles for a length outside it."""
    if isinstance(T, int):
        return T, T
    from torch.fx.experimental.symbolic_shapes import guard_bool

    hint = int(T.node.hint)  # the length being traced
    lo, hi = band(hint)
    # (both hold at the hint; guard_bool records each as a guard of the compiled frame)
    guard_bool(T >= lo)
    if hi is not None:
        guard_bool(T <= hi)
    return band_point(hint), hi


# Launch options of the kernels that check topk_ids: Triton compiles tl.device_assert only in debug mode,
# and debug mode would also add integer-overflow checks to all index math; with them off, the id check is
# the only assert. On the GPU a bad id then fails the launch loudly ("device-side assert triggered", the
# message printed), with no separate assert kernel: torch._assert_async on a flag costs a kernel of its own per
# call, measurable at T = 1 (benchmarks/NOTES.md, decode v5). The interpreter ignores it (tests read the flag).
LIVE_ASSERTS = {"debug": True, "sanitize_overflow": False}


def _pow2(name: str, value, lo: int, hi: int):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two in [{lo}, {hi}], got {value!r}")


class Path(str, enum.Enum):
    DECODE = "decode"  # triton_decode.py: GEMVs per pair, no sort (T*k small next to E)
    SORTED = "sorted"  # triton_align.py + triton_experts.py: aligned grouped GEMMs + combine
    # triton_grouped.py over torch._grouped_mm (a CUTLASS grouped GEMM on sm90, bf16, 16-byte rows): only where
    # the tuner measured it faster than both Triton paths (GroupedMMConfig).
    GROUPED_MM = "grouped_mm"
    # triton_grouped.py over csrc/'s CUTLASS grouped GEMM with one of its configs (lowering/cutlass.py): only where
    # the tuner measured it faster (CutlassConfig).
    CUTLASS = "cutlass"


class Combine(str, enum.Enum):
    GATHER = "gather"  # deterministic gather-and-sum kernel over each token's k rows (the default)
    ATOMIC = "atomic"  # fp32 atomics in the down GEMM's epilogue: run-to-run bit differences; measured, not default


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One GEMM's (or GEMV's) tile: columns per program, reduction step, warps, pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    # Sorted path only: Triton warp specialization (producer / consumer warps) of the persistent tile loop,
    # flattened with the K loop; pays with programs_per_sm >= 1 (a persistent grid).
    warp_specialize: bool = False
    # Decode down GEMV only: its reduction over I split over this many programs per output tile (partials summed
    # in split order by the last to finish), for grids that H / block_n alone leaves short of the GPU (wide tiles
    # over transposed [E, I, H] weights).
    split_k: int = 1
    # Sorted path only: an expert's last block of at most tail_m rows rides on the tile before it (one weight stream
    # for both; its own tile returns at once) instead of costing a whole tile (benchmarks/NOTES.md sessions 37-38).
    # 0: off. Taken where this GEMM's call has no bias, router-weighted input, stored pre-activation, atomic combine
    # or interleaved gate / up (triton_experts.folds_*); other calls run unfolded whatever this says. Per GEMM: the
    # down GEMM's best tile is often warp-specialized, which folding does not combine with.
    tail_m: int = 0

    def __post_init__(self):
        _pow2("block_n", self.block_n, 2, 512)  # sorted-path GEMMs need >= 16 (SortedConfig checks)
        _pow2("block_k", self.block_k, 16, 1024)
        _pow2("num_warps", self.num_warps, 1, 16)
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages: expected an int in [1, 8], got {self.num_stages!r}")
        if not isinstance(self.warp_specialize, bool):
            raise ValueError(f"warp_specialize: expected a bool, got {self.warp_specialize!r}")
        if not isinstance(self.split_k, int) or isinstance(self.split_k, bool) or not 1 <= self.split_k <= 64:
            raise ValueError(f"split_k: expected an int in [1, 64], got {self.split_k!r}")
        if self.tail_m:
            _pow2("tail_m", self.tail_m, 16, 256)  # SortedConfig bounds it by block_m
            if self.warp_specialize:
                raise ValueError("tail_m: folded tails and warp_specialize do not combine (the flattened tile loop "
                                 "has one K loop shape); set one of them")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    gate_up: KernelConfig
    down: KernelConfig
    path: Path = Path.DECODE

    def __post_init__(self):
        if isinstance(self.gate_up, KernelConfig) and self.gate_up.split_k != 1:
            raise ValueError(f"gate_up.split_k: expected 1 (only the down GEMV splits), got {self.gate_up.split_k}")
        for name, kc in (("gate_up", self.gate_up), ("down", self.down)):
            if isinstance(kc, KernelConfig) and kc.tail_m:
                raise ValueError(f"{name}.tail_m: expected 0 on the decode path (no row blocks), got {kc.tail_m}")


@dataclasses.dataclass(frozen=True)
class SortedConfig:
    # Rows per GEMM block; every expert's segment is padded to a multiple of it (shared by both GEMMs).
    block_m: int
    gate_up: KernelConfig
    down: KernelConfig
    # Row blocks per raster group: programs next to each other share weight tiles in L2.
    group_m: int = 8
    # 0: one program per tile; n > 0: a persistent grid of n programs per SM walking the tiles.
    programs_per_sm: int = 0
    # Weight tiles by TMA (host tensor descriptors) where the GPU and layout allow; else pointer loads.
    tma: bool = False
    combine: Combine = Combine.GATHER
    path: Path = Path.SORTED

    def __post_init__(self):
        _pow2("block_m", self.block_m, 16, 256)
        for name, kc in (("gate_up", self.gate_up), ("down", self.down)):
            if isinstance(kc, KernelConfig) and kc.block_n < 16:  # tl.dot's smallest N
                raise ValueError(
                    f"{name}.block_n: expected >= 16 on the sorted path (tensor-core tiles), got {kc.block_n}"
                )
            if isinstance(kc, KernelConfig) and kc.split_k != 1:
                raise ValueError(f"{name}.split_k: expected 1 on the sorted path (decode GEMVs only), got {kc.split_k}")
            if isinstance(kc, KernelConfig) and kc.tail_m > self.block_m:
                raise ValueError(f"{name}.tail_m: expected at most block_m = {self.block_m}, got {kc.tail_m}")
        _pow2("group_m", self.group_m, 1, 64)
        if not isinstance(self.programs_per_sm, int) or not 0 <= self.programs_per_sm <= 8:
            raise ValueError(f"programs_per_sm: expected an int in [0, 8], got {self.programs_per_sm!r}")
        if not isinstance(self.tma, bool):
            raise ValueError(f"tma: expected a bool, got {self.tma!r}")
        object.__setattr__(self, "combine", Combine(self.combine))


@dataclasses.dataclass(frozen=True)
class GroupedMMConfig:
    """No tiles of ours: the permute, torch's grouped GEMMs and the combine of torch_experts.py. Where its operands
    do not suit torch._grouped_mm (dispatch.select), the Triton default runs instead."""

    path: Path = Path.GROUPED_MM


@dataclasses.dataclass(frozen=True)
class CutlassConfig:
    """triton_grouped.py over csrc/'s grouped GEMM with tile / cluster / schedule `config` (an index into
    lowering/cutlass.py's CONFIGS). Where CUTLASS cannot run (not built, not sm90, MOE_COMPILER_CUTLASS=0, operands
    it does not take) the Triton default runs instead."""

    config: int = 0
    # SwiGLU experts (concatenated gate / up, no gate_up bias, inference): the gate_up projection as a gate GEMM and
    # an up GEMM whose epilogue stores silu(gate) * up (cutlass.CutlassMM.gate_up_silu), instead of one [S, 2I] GEMM
    # and the activation pass. Other experts run the pass whatever this says.
    act_epilogue: bool = False
    path: Path = Path.CUTLASS

    def __post_init__(self):
        from .cutlass import CONFIGS

        if not isinstance(self.config, int) or isinstance(self.config, bool) or not 0 <= self.config < len(CONFIGS):
            raise ValueError(f"config: expected an index into {CONFIGS}, got {self.config!r}")
        if not isinstance(self.act_epilogue, bool):
            raise ValueError(f"act_epilogue: expected a bool, got {self.act_epilogue!r}")


Config = DecodeConfig | SortedConfig | GroupedMMConfig | CutlassConfig


def to_dict(config: Config) -> dict:
    d = dataclasses.asdict(config)
    d["path"] = config.path.value
    if isinstance(config, SortedConfig):
        d["combine"] = config.combine.value
    for kernel in ("gate_up", "down"):
        if isinstance(d.get(kernel), dict) and not d[kernel]["tail_m"]:
            del d[kernel]["tail_m"]  # the entries written before the field existed read the same
    if isinstance(config, CutlassConfig) and not config.act_epilogue:
        del d["act_epilogue"]  # the entries written before the field existed read the same
    return d


def from_dict(d: dict) -> Config:
    d = dict(d)
    try:
        path = Path(d.pop("path"))
        if path is Path.GROUPED_MM:
            return GroupedMMConfig(**d)
        if path is Path.CUTLASS:
            return CutlassConfig(**d)
        d["gate_up"], d["down"] = KernelConfig(**d["gate_up"]), KernelConfig(**d["down"])
        return DecodeConfig(**d) if path is Path.DECODE else SortedConfig(**d)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid experts kernel config {d!r}: {e}") from None


# A GEMV program holds slots x block_n x block_k weights per step (the down kernel all k slots of a token):
# past ~16K elements per 4 warps the registers spill. And at T = 1 the grid must still cover the GPU (132
# SMs on an H100): ~256 programs.
_DECODE_TILE_ELEMS, _DECODE_PROGRAMS = 16384, 256


def _decode_tile(rows: int, cols: int, slots: int) -> KernelConfig:
    """A GEMV tile of a grid of rows x (cols / block_n) programs, each holding `slots` weight tiles per step
    (gate_up: gate and up; down: every slot of the token): bounded registers, a full grid."""
    block_k = 256 if slots <= 2 else 128
    block_n = max(8, min(64, _DECODE_TILE_ELEMS // (slots * block_k)))
    while block_n > 8 and rows * -(-cols // block_n) < _DECODE_PROGRAMS:
        block_n //= 2
    return KernelConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=3)


def _transposed_decode(T: int, k: int, H: int, I: int) -> DecodeConfig:
    """GEMV tiles over transposed weights ([E, H, 2I] / [E, I, H], contiguous along the output columns): wide column
    tiles (64-256 unit-stride bytes per weight row), short K steps; the down GEMV's reduction split until the grid
    covers the GPU (H / 128 programs per token are ~23 at GPT-OSS's H). The tuner's picks at both GPT-OSS shapes on
    the H200: gate_up 16-32 x 64, down 128 x 16 split 16 (a 32 x 32 gate_up: 79 µs vs 63 at GPT-OSS-120B, T = 1)."""
    slots = 1 << (k - 1).bit_length()
    down_n = 128 if slots <= 4 else 64
    split = 1
    while split < 16 and T * -(-H // down_n) * split < _DECODE_PROGRAMS and I >= 64 * split:
        split *= 2
    return DecodeConfig(gate_up=KernelConfig(block_n=16, block_k=64, num_warps=4, num_stages=4),
                        down=KernelConfig(block_n=down_n, block_k=16, num_warps=4, num_stages=3, split_k=split))


def decode_suits(T: int, k: int, E: int) -> bool:
    """Few pairs, few of them sharing an expert: the untuned choice of the decode (GEMV) paths, which stream each
    touched expert's weights once."""
    return T * k <= 4096 and (T == 1 or T * k * 8 <= E)


def default_config(dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int, transposed: bool = False) -> Config:
    """Reasonable untuned choices (and the starting point of the tuner's search); `transposed`: the weights'
    layout ([E, H, 2I] / [E, I, H]), which the GEMV tiles follow."""
    if decode_suits(T, k, E):
        if transposed:
            return _transposed_decode(T, k, H, I)
        return DecodeConfig(
            gate_up=_decode_tile(T * k, I, slots=2), down=_decode_tile(T, H, slots=1 << (k - 1).bit_length())
        )
    return default_sorted_config(dtype, E, k, T)


def default_sorted_config(dtype: torch.dtype, E: int, k: int, T: int) -> SortedConfig:
    """The untuned sorted-path tiles: block_m by rows per expert (valid at any T; the backward starts from it)."""
    rows_per_expert = T * k / E
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64 if rows_per_expert <= 96 else 128
    stages = 2 if dtype == torch.float32 else 3 if block_m >= 128 else 4
    warps = 8 if block_m >= 128 else 4
    block_k = 32 if dtype == torch.float32 else 64
    return SortedConfig(
        block_m=block_m,
        gate_up=KernelConfig(block_n=64, block_k=block_k, num_warps=warps, num_stages=stages),
        down=KernelConfig(block_n=128 if block_m >= 64 else 64, block_k=block_k, num_warps=warps, num_stages=stages),
    )


def gpu_file(gpu_name: str) -> pathlib.Path:
    return CONFIG_DIR / (gpu_name.replace(" ", "_") + ".json")


def load_file(path: pathlib.Path) -> list[dict]:
    """Entries of a config file, each with its config parsed; raises ValueError naming what is wrong."""
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f"{path}: schema {data.get('schema')!r}, expected {SCHEMA}; re-run python -m moe_compiler.tune"
        )
    entries = []
    for i, e in enumerate(data.get("entries", [])):
        missing = {"dtype", "E", "k", "H", "I", "T", "config"} - set(e)
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {sorted(missing)}")
        entries.append({**e, "config": from_dict(e["config"])})
    return entries


def load_bands(path: pathlib.Path) -> list[dict]:
    """Band entries of a config file ("bands", optional), each with its config parsed and its band a tuple."""
    bands = []
    for i, e in enumerate(json.loads(path.read_text()).get("bands", [])):
        missing = {"dtype", "E", "k", "H", "I", "band", "config"} - set(e)
        if missing:
            raise ValueError(f"{path}: band entry {i} lacks {sorted(missing)}")
        lo, hi = e["band"]
        if (lo, hi) != band(lo):
            raise ValueError(f"{path}: band entry {i}: {[lo, hi]} is not one of the bands {T_BANDS}; re-run "
                             "python -m moe_compiler.tune --bands")
        bands.append({**e, "band": (lo, hi), "config": from_dict(e["config"])})
    return bands


@functools.cache
def _own_bands(gpu_name: str) -> tuple[dict, ...]:
    own = gpu_file(gpu_name)
    return tuple(load_bands(own)) if own.exists() else ()


def band_entry(gpu_name: str, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int) -> Config | None:
    """The config measured for the band of T (a band's grid point) on this GPU, or None: a band entry is this
    GPU's own measurement across the band's lengths, never borrowed from another GPU."""
    dname = str(dtype).removeprefix("torch.")
    key = (dname, E, k, H, I, band(T))
    found = [e for e in _own_bands(gpu_name) if (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["band"]) == key]
    return found[0]["config"] if found else None


@functools.cache
def _sources(gpu_name: str, capability: tuple[int, int]) -> tuple[tuple[str, tuple[dict, ...]], ...]:
    """(the GPU a file was tuned on, its entries), best first: this GPU's own file, then the files of other
    GPUs of the same compute capability (a shape tuned only there is still better than defaults)."""
    own = gpu_file(gpu_name)
    sources = [(gpu_name, tuple(load_file(own)))] if own.exists() else []
    for other in sorted(CONFIG_DIR.glob("*.json")):
        if other == own:
            continue
        data = json.loads(other.read_text())
        if tuple(data.get("capability", ())) == tuple(capability):
            sources.append((data["gpu"], tuple(load_file(other))))
    return tuple(sources)


_warned: set = set()


def _warn_once(key, message: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
        log.warning(message)


def shape_entries(entries, dtype: torch.dtype, E: int, k: int, H: int, I: int) -> list[dict]:
    """The entries of this problem shape and dtype, at every T."""
    dname = str(dtype).removeprefix("torch.")
    return [e for e in entries if (e["dtype"], e["E"], e["k"], e["H"], e["I"]) == (dname, E, k, H, I)]


def nearest_shape_entry(entries, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int) -> dict | None:
    """This shape's entry with the nearest T (log scale; ties to the smaller T), or None."""
    same = shape_entries(entries, dtype, E, k, H, I)
    return min(same, key=lambda e: (abs(math.log(max(T, 1) / e["T"])), e["T"])) if same else None


def nearest_entry(entries, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int) -> Config | None:
    """The config of nearest_shape_entry, or None."""
    entry = nearest_shape_entry(entries, dtype, E, k, H, I, T)
    return entry["config"] if entry is not None else None


def sharded_entry(entries, dtype: torch.dtype, E: int, k: int, H: int, I: int, T: int) -> dict | None:
    """Expert parallelism: a rank's op holds E = E' / R of a tuned model's experts (same H, I) and, at inference,
    gets the whole batch with the off-rank pairs as sentinels (k slots), in training the rows sent to it (k = 1).
    Either way an expert sees T k / E rows, the same as the unsharded model at T' = T k E' / (E k'): the tiles
    tuned there fit. The entry of a tuned E' = R E (R > 1) whose rows per expert are nearest this call's, within
    a factor of 2 (else None); ties to the same k, then the smaller T."""
    dname = str(dtype).removeprefix("torch.")
    rows = max(T, 1) * k / E

    def distance(e):
        return abs(math.log(e["T"] * e["k"] / e["E"] / rows))

    same = [e for e in entries if (e["dtype"], e["H"], e["I"]) == (dname, H, I) and e["E"] > E and e["E"] % E == 0]
    best = min(same, key=lambda e: (distance(e), e["k"] != k, e["T"]), default=None)
    return best if best is not None and distance(best) <= math.log(2) else None


def lookup(gpu_name: str, capability: tuple[int, int], dtype: torch.dtype, E: int, k: int, H: int, I: int,
           T: int, autotune: Callable[[int], Config | None] | None = None, transposed: bool = False) -> Config:
    """The config of a call. `autotune(bucket)` is asked where this GPU's own file has no entry at the call's
    T bucket; it returns a config or None (declined: tuning off, inside a capture, ...). Entries are tuned in
    their model's layout (tune.shapes.model_spec); `transposed` picks the untuned default's tiles."""
    dname = str(dtype).removeprefix("torch.")
    sources = _sources(gpu_name, tuple(capability))
    own = sources[0][1] if sources and sources[0][0] == gpu_name else ()
    grid_T = bucket(T)
    exact = [e for e in own if (e["dtype"], e["E"], e["k"], e["H"], e["I"], e["T"]) == (dname, E, k, H, I, grid_T)]
    if exact:
        return exact[0]["config"]
    if autotune is not None:
        config = autotune(grid_T)
        if config is not None:
            return config
    config, tuned_on = None, gpu_name
    for tuned_on, entries in sources:
        config = nearest_entry(entries, dtype, E, k, H, I, T)
        if config is not None:
            break
    if config is not None and tuned_on != gpu_name:
        _warn_once(
            (gpu_name, dname, E, k, H, I),
            f"moe_compiler: no Triton configs tuned on {gpu_name} for this shape; using those tuned on {tuned_on} "
            f"(same compute capability {tuple(capability)}). Tune with: python -m moe_compiler.tune "
            f"--shape {E},{k},{H},{I} --dtype {dname} --merge",
        )
    if config is None:
        for tuned_on, entries in sources:
            entry = sharded_entry(entries, dtype, E, k, H, I, T)
            if entry is not None:
                _warn_once(
                    (gpu_name, dname, E, k, H, I),
                    f"moe_compiler: no Triton config tuned for {dname} experts E={E}, k={k}, H={H}, I={I} on "
                    f"{gpu_name}; using the one tuned for E={entry['E']}, k={entry['k']}, T={entry['T']} on "
                    f"{tuned_on} (the same rows per expert: a rank's share under expert parallelism). Tune with: "
                    f"python -m moe_compiler.tune --shape {E},{k},{H},{I} --dtype {dname} --merge",
                )
                return entry["config"]
        _warn_once(
            (gpu_name, dname, E, k, H, I),
            f"moe_compiler: no tuned Triton config for {dname} experts E={E}, k={k}, H={H}, I={I} on {gpu_name}; "
            f"using untuned defaults (can be several times slower). Tune with: python -m moe_compiler.tune "
            f"--shape {E},{k},{H},{I} --dtype {dname}",
        )
        return default_config(dtype, E, k, H, I, T, transposed)
    return config
