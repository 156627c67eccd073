"""tune/backward.py: the backward's dA / dx candidates and its weight-gradient candidates timed on the same operands,
checked against torch's outputs, and a CUTLASS config chosen only where it is right and MARGIN faster (CPU: torch's
grouped GEMM stands in for csrc/'s, a stub clock for the GPU's)."""

from __future__ import annotations

import pytest
import torch

from moe_compiler.lowering import cutlass, triton_backward
from moe_compiler.tune import backward

FAST, WRONG, CLOSE = 0, 1, 2  # cutlass.CONFIGS indices the stubs treat as: 20% faster; wrong outputs; 1% faster


@pytest.fixture
def stub_cutlass(monkeypatch):
    """cutlass.grouped_mm and grouped_mm_wgrad by torch's grouped GEMM on the CPU; WRONG's outputs (by its name, in
    either list) scaled by 1.1. Records each call's rows."""
    rows = []

    def grouped_mm(x, w, offs, b_nk, config):
        rows.append(x.shape[0])
        out = torch._grouped_mm(x, w.transpose(-2, -1) if b_nk else w, offs=offs)
        return out * 1.1 if config == WRONG else out

    def grouped_mm_wgrad(a, b, offs, config):
        rows.append(a.shape[0])
        out = torch._grouped_mm(a.t(), b, offs=offs)
        return out * 1.1 if cutlass.WGRAD_CONFIGS[config] == cutlass.CONFIGS[WRONG] else out

    monkeypatch.setattr(cutlass, "grouped_mm", grouped_mm)
    monkeypatch.setattr(cutlass, "grouped_mm_wgrad", grouped_mm_wgrad)
    return rows


def clock(speed):
    """time_bodies stand-in: each candidate's seconds from `speed` (torch's 1.0); runs every body once."""
    def time_bodies(bodies):
        for body in bodies.values():
            body()
        return {name: speed.get(name, 1.0) for name in bodies}
    return time_bodies


SPEEDS = {cutlass.CONFIGS[FAST]: 0.8, cutlass.CONFIGS[WRONG]: 0.5, cutlass.CONFIGS[CLOSE]: 0.99}


def test_the_fastest_right_config_past_the_margin_wins(stub_cutlass):
    entries = backward.tune([(4, 2, 32, 16)], [64], torch.float32, configs=(FAST, WRONG, CLOSE),
                            time_bodies=clock(SPEEDS), wgrad_configs=())
    (entry,) = entries
    assert "wgrad" not in entry and "wgrad_us" not in entry  # not timed
    assert entry["dgrad"] == cutlass.CONFIGS[FAST]  # WRONG is faster but its outputs are off by 10%
    assert entry["err"][cutlass.CONFIGS[WRONG]] > backward.ERR >= entry["err"][cutlass.CONFIGS[FAST]]
    assert entry["us"]["torch"] == 1e6 and entry["us"][cutlass.CONFIGS[FAST]] == 0.8e6
    assert {k: entry[k] for k in ("dtype", "E", "k", "H", "I", "T", "transposed")} == \
        {"dtype": "float32", "E": 4, "k": 2, "H": 32, "I": 16, "T": 64, "transposed": False}
    assert set(stub_cutlass) == {64 * 2}  # CUTLASS over the T k real rows


def test_within_the_margin_torch_stays(stub_cutlass):
    (entry,) = backward.tune([(4, 2, 32, 16)], [64], torch.float32, configs=(WRONG, CLOSE),
                             time_bodies=clock(SPEEDS), wgrad_configs=())
    assert entry["dgrad"] == "torch"


def test_the_weight_gradients_are_chosen_apart_from_da_and_dx(stub_cutlass):
    """The weight-gradient configs (cutlass.WGRAD_CONFIGS: other indices, names shared with CONFIGS) are timed and
    checked as dA / dx's are, their choice written as the entry's "wgrad" beside its "dgrad"; one expert without
    rows (the stand-in's zeros)."""
    fast, close = (cutlass.WGRAD_CONFIGS.index(n) for n in ("pingpong_64x256", "pingpong_64x128"))
    wrong = cutlass.WGRAD_CONFIGS.index(cutlass.CONFIGS[WRONG])  # coop_128x256_cluster2x1 in both lists
    speeds = {cutlass.WGRAD_CONFIGS[fast]: 0.9, cutlass.WGRAD_CONFIGS[close]: 0.99, cutlass.CONFIGS[WRONG]: 0.5}
    (entry,) = backward.tune([(4, 2, 32, 16)], [64], torch.float32, configs=(CLOSE,), time_bodies=clock(speeds),
                             wgrad_configs=(fast, close, wrong))
    assert entry["dgrad"] == "torch"  # CLOSE: 1% faster, within the margin
    assert entry["wgrad"] == cutlass.WGRAD_CONFIGS[fast]  # wrong is faster, but its outputs are off by 10%
    assert set(entry["wgrad_us"]) == {"torch", *(cutlass.WGRAD_CONFIGS[i] for i in (fast, close, wrong))}
    assert entry["wgrad_err"][cutlass.WGRAD_CONFIGS[wrong]] > backward.ERR >= entry["wgrad_err"][
        cutlass.WGRAD_CONFIGS[fast]]
    assert set(stub_cutlass) == {64 * 2}  # CUTLASS over the T k real rows


def test_an_entry_always_has_its_dgrad_choice(stub_cutlass):
    """No dA / dx config to try: torch's is still timed and written (backward_table.load requires `dgrad`)."""
    (entry,) = backward.tune([(4, 2, 32, 16)], [64], torch.float32, configs=(), time_bodies=clock(SPEEDS),
                             wgrad_configs=(cutlass.WGRAD_CONFIGS.index("pingpong_64x256"),))
    assert entry["dgrad"] == "torch" and set(entry["us"]) == {"torch"}
    assert entry["wgrad"] == "torch" and set(entry["wgrad_us"]) == {"torch", "pingpong_64x256"}  # 1.0 vs 1.0


def test_weight_gradients_error_in_slices_equals_rel_err():
    gen = torch.Generator().manual_seed(0)
    want, got = torch.randn(3, 8, 4, generator=gen), torch.randn(3, 8, 4, generator=gen)
    assert backward._err(got, want) == pytest.approx(backward.rel_err(got, want), rel=1e-5)


def test_torch_is_timed_in_the_default_backwards_buffer(stub_cutlass, monkeypatch):
    """120 rows per expert (the GroupedTile.LARGE band): torch's operands have 129 E rows, as the default
    backward's buffers do, so that its kernel pick is the one the backward gets."""
    E, k, T = 4, 2, 240
    assert triton_backward.large_tile_pays(T * k, E)
    seen, real = [], torch._grouped_mm
    # the rows each call reduces or multiplies: a's first axis (2-D x 3-D), its last (2-D x 2-D: a = G^T, dz^T)
    monkeypatch.setattr(torch, "_grouped_mm",
                        lambda a, b, offs: seen.append(a.shape[3 - b.dim()]) or real(a, b, offs=offs))
    backward.tune([(E, k, 32, 16)], [T], torch.float32, configs=(FAST,), time_bodies=clock(SPEEDS),
                  wgrad_configs=(0,))
    assert set(seen) - {T * k} == {129 * E}  # (the stand-in's own calls take the T k rows)


def test_merged_replaces_the_points_measured_again():
    point = {"dtype": "bfloat16", "E": 4, "k": 2, "H": 32, "I": 16, "T": 64, "transposed": False}
    old = [dict(point, dgrad="torch"), dict(point, T=16, dgrad="torch")]
    new = [dict(point, dgrad=cutlass.CONFIGS[FAST])]
    assert backward.merged(old, new) == [old[1], new[0]]


@pytest.mark.gpu
def test_on_the_gpu_every_config_is_right_and_timed():
    """The real candidates (sm90 with the CUTLASS build): every config's dA / dx equal torch's, every one timed, and the
    entry names torch or one of them."""
    if cutlass.missing() is not None:
        pytest.skip(f"the CUTLASS path cannot be built here: {cutlass.missing()}")
    configs = range(len(cutlass.CONFIGS))
    (entry,) = backward.tune([(8, 2, 256, 128)], [512], torch.bfloat16, configs=configs)
    assert set(entry["us"]) == {"torch", *cutlass.CONFIGS} and all(us > 0 for us in entry["us"].values())
    assert set(entry["wgrad_us"]) == {"torch", *cutlass.WGRAD_CONFIGS}
    assert all(us > 0 for us in entry["wgrad_us"].values())
    assert max(entry["err"].values()) <= backward.ERR and max(entry["wgrad_err"].values()) <= backward.ERR
    assert entry["dgrad"] in entry["us"] and entry["wgrad"] in entry["wgrad_us"]
