"""Triton experts forward, sorted path (triton_experts.py): against the fp64 reference, every spec."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, DTYPES, SPECS, device_inputs, poisoned_allocations, spec_id  # noqa: E402

from moe_compiler.lowering import triton_config, triton_experts  # noqa: E402
from moe_compiler.lowering.triton_config import Combine, DecodeConfig, KernelConfig, SortedConfig  # noqa: E402
from moe_compiler.spec import GateUpLayout  # noqa: E402
from moe_compiler.testing import experts_reference, rel_err  # noqa: E402

SMALL = KernelConfig(block_n=16, block_k=16, num_warps=4, num_stages=2)
CONFIGS = {
    "one_program_per_tile": SortedConfig(block_m=16, gate_up=SMALL, down=SMALL, group_m=1),
    # 2 programs walk every tile (interpreter: no SM count), grouped raster over 2 row blocks.
    "persistent_grouped": SortedConfig(block_m=16, gate_up=SMALL, down=KernelConfig(32, 16), group_m=2,
                                       programs_per_sm=1),
    # Weight tiles (and the down GEMM's act rows) by TMA on a GPU that has it; pointer loads elsewhere.
    "tma": SortedConfig(block_m=16, gate_up=SMALL, down=SMALL, tma=True),
    # Warp-specialized persistent tile loops (Triton splits producer / consumer warps on a GPU).
    "warp_specialized": SortedConfig(block_m=16, gate_up=KernelConfig(16, 16, 4, 2, warp_specialize=True),
                                     down=KernelConfig(16, 16, 4, 2, warp_specialize=True), programs_per_sm=1,
                                     tma=True),
}


def _run(T, H, I, E, k, dtype, spec, config, seed=0):
    cpu, dev = device_inputs(T, H, I, E, k, dtype, spec, seed)
    with poisoned_allocations():
        out, ids_ok = triton_experts.experts_forward(*dev, spec, config)
    assert out.dtype == dtype and out.shape == (T, H) and int(ids_ok) == 1
    return rel_err(out.cpu(), experts_reference(*cpu, spec=spec))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "T,H,I,E,k",
    [
        (1, 32, 16, 8, 2),  # decode-sized: one row in most blocks
        (9, 40, 24, 5, 2),  # H, I not multiples of the blocks: masked K tails, wrapped columns
        (6, 32, 16, 4, 4),  # k = E
        (20, 16, 16, 3, 1),  # k = 1, segments longer than BLOCK_M
    ],
)
def test_sorted_forward(spec, dtype, tol, T, H, I, E, k):
    assert _run(T, H, I, E, k, dtype, spec, CONFIGS["one_program_per_tile"]) <= tol


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_tma_config(spec, dtype, tol):
    # On a GPU: TMA weight tiles (transposed GPT-OSS weights fall back to pointers); on the CPU: pointers.
    # 9 tokens, H = 40, I = 24: K tails that TMA zero-fills, gate tiles that run past I.
    assert _run(9, 40, 24, 5, 2, dtype, spec, CONFIGS["tma"]) <= tol


@pytest.mark.parametrize("config", ["tma", "warp_specialized"])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_tma_descriptors_built_on_the_device(config, spec, dtype, tol, monkeypatch):
    """The recorded form of a TMA call (launch.recorded_tma()): each program builds its weight (and the down GEMM's
    act) descriptors with tl.make_tensor_descriptor from its pointer arguments, here run eagerly: on a GPU their
    global scratch comes from the allocator Inductor's launcher sets (set here the same way, in a copied context);
    the interpreter emulates the descriptors. Transposed weights keep pointer loads."""
    import contextvars

    import triton

    def device_mode(config, spec, *tensors):
        return triton_experts.TMA_DEVICE if config.tma and not spec.transposed else triton_experts.TMA_OFF

    monkeypatch.setattr(triton_experts, "tma_mode", device_mode)

    def run():
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEVICE))
        return _run(9, 40, 24, 5, 2, dtype, spec, CONFIGS[config])

    assert contextvars.copy_context().run(run) <= tol


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[-1]], ids=spec_id)
def test_persistent_raster_and_odd_sizes(config, spec):
    # 37 tokens over 7 experts: several row blocks per expert and partial last blocks.
    assert _run(37, 48, 40, 7, 2, torch.float32, spec, config) <= 1e-5


def test_atomic_combine_matches():
    config = SortedConfig(block_m=16, gate_up=SMALL, down=SMALL, combine=Combine.ATOMIC)
    assert _run(13, 32, 16, 6, 3, torch.float32, SPECS[0], config) <= 1e-5


def test_deterministic_gather_combine():
    cpu, dev = device_inputs(25, 32, 16, 4, 2, torch.float32, SPECS[0], seed=5)
    config = CONFIGS["one_program_per_tile"]
    first, _ = triton_experts.experts_forward(*dev, SPECS[0], config)
    second, _ = triton_experts.experts_forward(*dev, SPECS[0], config)
    assert torch.equal(first, second)


FOLD_16 = dataclasses.replace(SMALL, tail_m=16)
FOLDED = {
    # every expert's last block folds into the tile before it (tail_m = block_m)
    "tail_16_of_16": SortedConfig(block_m=16, gate_up=FOLD_16, down=FOLD_16),
    # last blocks of <= 16 rows fold, longer ones keep their tile; TMA weight tiles on a GPU
    "tail_16_of_32": SortedConfig(block_m=32, gate_up=FOLD_16, down=KernelConfig(32, 16, tail_m=16), tma=True,
                                  programs_per_sm=1),
    # per GEMM: gate_up folds, the down GEMM keeps its tail tiles and its warp-specialized persistent loop
    "gate_up_only": SortedConfig(block_m=32, gate_up=FOLD_16, down=KernelConfig(16, 16, 4, 2, warp_specialize=True),
                                 programs_per_sm=1),
}


@pytest.mark.parametrize("config", list(FOLDED.values()), ids=list(FOLDED))
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_folded_tails(config, spec):
    """KernelConfig.tail_m: a tile takes its expert's next <= tail_m rows against the weight tiles it holds and the
    tail's own tile returns at once; calls the folded tiles do not cover (biases, interleaved gate / up, scaled
    input) run unfolded. 70 tokens, k = 2 over 3 experts (~47 rows each): whole blocks and tails of every kind."""
    T, H, I, E, k = 70, 40, 24, 3, 2
    cpu, dev = device_inputs(T, H, I, E, k, torch.float32, spec, seed=3)
    counts = torch.bincount(cpu[1].flatten(), minlength=E)
    tails = counts % config.block_m
    assert bool(((tails > 0) & (tails <= config.gate_up.tail_m) & (counts > config.block_m)).any())  # something folds
    b_gate_up = cpu[5]
    folds = triton_experts.folds_gate_up(config, spec, b_gate_up, None)
    assert folds == (0 if spec.transposed or spec.gate_up is not GateUpLayout.CONCAT or spec.scale_input
                     else config.gate_up.tail_m)
    assert triton_experts.folds_down(config, None) == config.down.tail_m
    assert _run(T, H, I, E, k, torch.float32, spec, config, seed=3) <= 1e-5


def test_tail_m_validated():
    with pytest.raises(ValueError, match="tail_m"):
        SortedConfig(block_m=32, gate_up=SMALL, down=KernelConfig(16, 16, tail_m=64))  # past block_m
    with pytest.raises(ValueError, match="warp_specialize"):
        KernelConfig(16, 16, 4, 2, warp_specialize=True, tail_m=16)
    with pytest.raises(ValueError, match="tail_m"):
        KernelConfig(16, 16, tail_m=24)  # not a power of two
    with pytest.raises(ValueError, match="decode path"):
        DecodeConfig(SMALL, FOLD_16)
    # the tables' format: a kernel's tail_m is written only where it folds, and reads back
    config = FOLDED["gate_up_only"]
    d = triton_config.to_dict(config)
    assert d["gate_up"]["tail_m"] == 16 and "tail_m" not in d["down"]
    assert triton_config.from_dict(d) == config

