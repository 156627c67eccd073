"""Triton FP8 experts forward (triton_quantized.py): w8a16 against fp64 on the dequantized weights, w8a8 against
fp64 with the kernels' activation rounding simulated; scale formats, K tails, wrapped columns, poisoned buffers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, fails_with_ids_assert, poisoned_allocations  # noqa: E402

from moe_compiler.lowering import triton_quantized  # noqa: E402
from moe_compiler.lowering.triton_quantized_config import QuantizedConfig  # noqa: E402
from moe_compiler.spec import QuantizedExpertsSpec  # noqa: E402
from moe_compiler.testing import experts_reference, rel_err  # noqa: E402
from moe_compiler.testing.quantized import quantized_experts_inputs, w8a8_reference  # noqa: E402

# bf16 stores are unreliable in the CPU interpreter: bf16 on the GPU only (tests/ops/test_experts_quantized.py).
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]


def _run(T, H, I, E, k, dtype, bn, bk, scale_dtype, config):
    args, (w1, w2) = quantized_experts_inputs(T, H, I, E, k, dtype, bn, bk, scale_dtype, seed=T + H)
    spec = QuantizedExpertsSpec(scale_block_n=bn, scale_block_k=bk)
    with poisoned_allocations():
        out = triton_quantized.experts_forward(*[a.to(DEVICE) for a in args], spec, config).cpu()
    assert out.dtype == dtype and out.shape == (T, H) and not out.isnan().any()
    return out, args, w1, w2


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "T,H,I,E,k,bn,bk,scale_dtype",
    [
        (5, 64, 32, 4, 2, 32, 32, torch.float32),  # even blocks
        (9, 40, 24, 5, 2, 16, 16, torch.float8_e8m0fnu),  # K tails (H, I not multiples of BLOCK_K), e8m0 scales
        (3, 48, 48, 3, 3, 32, 16, torch.bfloat16),  # k = E, bf16 scales, block_n > BLOCK_N
        (20, 32, 16, 3, 1, 8, 32, torch.float32),  # segments longer than BLOCK_M, a scale row per 8 output rows
    ],
)
def test_w8a16_matches_fp64_on_the_dequantized_weights(dtype, tol, T, H, I, E, k, bn, bk, scale_dtype):
    config = QuantizedConfig(block_m=16, block_n=16, block_k=16, act="w8a16", group_m=2)
    out, args, w1, w2 = _run(T, H, I, E, k, dtype, bn, bk, scale_dtype, config)
    assert rel_err(out, experts_reference(*args[:3], w1, w2)) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("act,block_n,group", [("w8a8_tile", 16, 32), ("w8a8_rows", 128, 128)])
def test_w8a8_rounds_activations_per_row_and_group(dtype, act, block_n, group):
    """tile: groups of block_k (32, the FP8 tensor cores' K; H = 80: a K tail); rows: groups of 128 (here I = 64:
    one partial group, the 128-wide gate_up tile wrapping modulo I)."""
    config = QuantizedConfig(block_m=16, block_n=block_n, block_k=32, act=act)
    out, args, w1, w2 = _run(9, 80, 64, 4, 2, dtype, 32, 32, torch.float32, config)
    # The rounding is real (e4m3 keeps 3 mantissa bits): plain fp64 differs by a few percent.
    assert 1e-2 < rel_err(out, experts_reference(*args[:3], w1, w2)) < 0.1
    if DEVICE == "cuda":
        # The same math with the activation rounding simulated agrees closely. Not on the CPU: triton 3.9's
        # interpreter rounds fp32 -> e4m3 wrongly where rounding up crosses a power of two (7.83 -> 4, not 8).
        assert rel_err(out, w8a8_reference(*args[:3], w1, w2, group=group)) <= 5e-3


def test_w8a8_rows_and_tile_are_the_same_numbers():
    """At block_k = 128 both quantize every row per 128 columns: once (rows) or in each K step (tile)."""
    configs = [QuantizedConfig(block_m=16, block_n=128, block_k=128, act=act) for act in ("w8a8_tile", "w8a8_rows")]
    tile, rows = (_run(5, 256, 160, 4, 2, torch.float32, 128, 128, torch.float32, c)[0] for c in configs)
    assert rel_err(rows, tile) <= 1e-6


@pytest.mark.parametrize("fmt,act,I", [("fp8_e4m3", "w8a16", 80), ("fp8_e4m3", "w8a8_tile", 80),
                                       ("fp8_e4m3", "w8a8_rows", 80), ("fp8_e4m3", "w8a8_rows", 128 * 17 + 16),
                                       ("int4_packed", "w8a16", 96)])  # INT4: exact activations, whole groups of 32
def test_unfused_gate_up_is_the_same_numbers(fmt, act, I):
    """fused_act=False: one GEMM over the 2I columns into z, then the activation (and w8a8_rows' quantization) by
    a row kernel. In fp32 z is stored exactly, so the result equals the fused epilogue's (odd I: the last 128-wide
    group is partial; 2I = 160 is not a multiple of block_n: wrapped columns; I = 2192: the row pass's second
    program of a row holds 2 of its 16 groups, the last partial)."""
    int4 = fmt == "int4_packed"
    bn, bk = (1, 32) if int4 else (128, 128)
    args, (w1, w2) = quantized_experts_inputs(7, 256, I, 4, 2, torch.float32, bn, bk, seed=3, weight_format=fmt)
    spec = QuantizedExpertsSpec(weight_format=fmt, scale_block_n=bn, scale_block_k=bk)
    outs = []
    for fused in (True, False):
        config = QuantizedConfig(block_m=16, block_n=128 if fused else 64, block_k=128, act=act, fused_act=fused,
                                 int4_planes=False)
        with poisoned_allocations():
            outs.append(triton_quantized.experts_forward(*[a.to(DEVICE) for a in args], spec, config).cpu())
    assert rel_err(outs[1], outs[0]) <= 1e-6
    if act == "w8a16":
        assert rel_err(outs[1], experts_reference(*args[:3], w1, w2)) <= 1e-5


def test_w8a8_rows_needs_one_activation_group_per_gate_up_tile():
    args, _ = quantized_experts_inputs(4, 256, 128, 4, 2, torch.float32, 128, 128, seed=0)
    with pytest.raises(ValueError, match="w8a8_rows takes block_n = 128"):
        triton_quantized.experts_forward(*[a.to(DEVICE) for a in args], QuantizedExpertsSpec(),
                                         QuantizedConfig(block_m=16, block_n=64, block_k=128, act="w8a8_rows"))


def test_tensor_core_k_limits_say_what_to_do():
    if DEVICE != "cuda":
        pytest.skip("the limits are the GPU tensor cores'; the interpreter takes any K")
    args, _ = quantized_experts_inputs(4, 256, 128, 4, 2, torch.bfloat16, 1, 32, seed=0, weight_format="int4_packed")
    spec = QuantizedExpertsSpec(weight_format="int4_packed", scale_block_n=1, scale_block_k=32)
    with pytest.raises(ValueError, match="INT4 planes take block_k >= 128"):
        triton_quantized.experts_forward(*[a.cuda() for a in args], spec,
                                         QuantizedConfig(block_m=16, block_n=16, block_k=64, act="w8a16"))
    args, _ = quantized_experts_inputs(4, 256, 128, 4, 2, torch.bfloat16, 16, 16, seed=0)
    with pytest.raises(ValueError, match="w8a8 takes block_k >= 32"):
        triton_quantized.experts_forward(*[a.cuda() for a in args], QuantizedExpertsSpec(scale_block_n=16,
                                         scale_block_k=16),
                                         QuantizedConfig(block_m=16, block_n=16, block_k=16, act="w8a8_tile"))


def test_block_k_must_divide_the_scale_block():
    args, _ = quantized_experts_inputs(2, 32, 16, 2, 1, torch.float32, 16, 24)
    spec = QuantizedExpertsSpec(scale_block_n=16, scale_block_k=24)
    with pytest.raises(ValueError, match="must divide scale_block_k=24"):
        triton_quantized.experts_forward(*[a.to(DEVICE) for a in args], spec, QuantizedConfig(16, 16, 16, "w8a16"))


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("planes", [False, True], ids=["reshaped", "planes"])
@pytest.mark.parametrize(
    "T,H,I,E,k,block_k,scale_dtype",
    [
        (5, 64, 32, 4, 2, 32, torch.bfloat16),  # one group per K step (Kimi-K2-Thinking's group of 32)
        (9, 96, 64, 5, 2, 64, torch.float32),  # two groups per K step: scales vary inside the dequantized tile
        (3, 40, 24, 3, 3, 16, torch.bfloat16),  # K tails (H = 40, I = 24 of 16-wide steps), groups of 8
    ],
)
def test_int4_matches_fp64_on_the_dequantized_weights(dtype, tol, planes, T, H, I, E, k, block_k, scale_dtype):
    group = 8 if H % 32 or I % 32 else 32
    block_k = 128 if planes else block_k  # a plane's dot spans block_k / 8 values: 16, the tensor cores' K
    args, (w1, w2) = quantized_experts_inputs(T, H, I, E, k, dtype, 1, group, scale_dtype, seed=T,
                                              weight_format="int4_packed")
    spec = QuantizedExpertsSpec(weight_format="int4_packed", scale_block_n=1, scale_block_k=group)
    config = QuantizedConfig(block_m=16, block_n=16, block_k=block_k, act="w8a16", group_m=2, int4_planes=planes)
    with poisoned_allocations():
        out = triton_quantized.experts_forward(*[a.to(DEVICE) for a in args], spec, config).cpu()
    assert out.dtype == dtype and rel_err(out, experts_reference(*args[:3], w1, w2)) <= tol


DECODE_GEMV_CASES = [
    ("fp8_e4m3", 16, 32, torch.float8_e8m0fnu, 3, 64, 48, 16),  # two K steps per scale block, e8m0
    ("fp8_e4m3", 32, 32, torch.float32, 1, 40, 24, 16),  # K tails; one token (k experts, each read once)
    ("fp8_e4m3", 16, 16, torch.float32, 2, 80, 40, 64),  # a step over 4 scale blocks; K tails past the last
    ("fp8_e4m3", 16, 32, torch.float8_e8m0fnu, 3, 128, 64, 64),  # two blocks per step, e8m0
    ("int4_packed", 1, 32, torch.bfloat16, 2, 96, 64, 32),  # Kimi-K2-Thinking's groups of 32
    ("int4_packed", 1, 8, torch.float32, 3, 40, 24, 32),  # four groups per step, K tails
    ("int4_packed", 1, 16, torch.bfloat16, 2, 128, 64, 64),  # planes: 2-word groups summed before the scale
    ("int4_packed", 1, 128, torch.float32, 1, 384, 128, 64),  # a group over two steps
    ("int4_packed", 1, 24, torch.float32, 2, 96, 48, 32),  # groups across steps: a scale per word
]
# The kernels are the same code in both dtypes: the interpreter (5-15 s a case) takes fp16 at the first case of
# each format only, fp32 at every case; the GPU takes both everywhere.
FIRST_OF_EACH_FORMAT = {next(c for c in DECODE_GEMV_CASES if c[0] == fmt) for fmt in ("fp8_e4m3", "int4_packed")}


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("fmt,bn,bk,scale_dtype,T,H,I,block_k", DECODE_GEMV_CASES)
def test_decode_gemvs_match_fp64(dtype, tol, fmt, bn, bk, scale_dtype, T, H, I, block_k):
    if DEVICE != "cuda" and dtype == torch.float16 and \
            (fmt, bn, bk, scale_dtype, T, H, I, block_k) not in FIRST_OF_EACH_FORMAT:
        pytest.skip("fp16 at the first case of each format in the interpreter")
    args, (w1, w2) = quantized_experts_inputs(T, H, I, 8, 2, dtype, bn, bk, scale_dtype, seed=T, weight_format=fmt)
    spec = QuantizedExpertsSpec(weight_format=fmt, scale_block_n=bn, scale_block_k=bk)
    # INT4: the 3-D tile, the nibble planes; the down GEMV per pair (slot_split, the slots summed by the last pair
    # program of a tile to arrive) and per token; down programs of other heights than gate_up's (down_block_n)
    variants = [dict(int4_planes=p, slot_split=p) for p in (False, True)] if fmt == "int4_packed" else \
        [dict(slot_split=p) for p in (False, True)]
    variants += [dict(down_block_n=32), dict(down_block_n=8, slot_split=False)]
    for variant in variants:
        config = QuantizedConfig(block_m=16, block_n=16, block_k=block_k, act="w8a16", decode=True, **variant)
        with poisoned_allocations():
            out = triton_quantized.experts_forward(*[a.to(DEVICE) for a in args], spec, config).cpu()
        assert out.dtype == dtype and rel_err(out, experts_reference(*args[:3], w1, w2)) <= tol, variant


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4_packed"])
def test_down_gemv_per_pair_sums_the_slots_as_the_per_token_form_does(fmt):
    """slot_split: each pair's program stores its fp32 row and the last of a token's k programs to arrive sums the
    k rows in slot order — the per-token form's additions in the same order, so the same bits, whoever arrives
    last (on a GPU: any row read before it is visible would differ). Twice: the tickets are reset by their last
    user, then zeroed again by the gate_up launch. 5 tokens, k = 4, with a sentinel slot (id E: a zero row)."""
    bn, bk = (1, 32) if fmt == "int4_packed" else (16, 16)
    args, _ = quantized_experts_inputs(5, 96, 64, 8, 4, torch.float32, bn, bk, torch.float32, seed=3, weight_format=fmt)
    args = [a.to(DEVICE) for a in args]
    args[1][2, 1] = 8  # the expert-parallel sentinel
    spec = QuantizedExpertsSpec(weight_format=fmt, scale_block_n=bn, scale_block_k=bk)
    outs = []
    for split in (True, True, False):
        config = QuantizedConfig(block_m=16, block_n=16, block_k=32, act="w8a16", decode=True, slot_split=split,
                                 int4_planes=False)
        with poisoned_allocations():
            outs.append(triton_quantized.experts_forward(*args, spec, config).cpu())
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs no device asserts")
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "sorted"])
def test_out_of_range_id_fails_the_launch(decode):
    fails_with_ids_assert(
        f"""
        from moe_compiler.lowering import triton_quantized, triton_quantized_config
        from moe_compiler.spec import QuantizedExpertsSpec
        from moe_compiler.testing.quantized import quantized_experts_inputs
        args, _ = quantized_experts_inputs(2, 64, 32, 4, 2, torch.bfloat16, 32, 32)
        args = [a.cuda() for a in args]
        args[1][0, 1] = 7
        config = triton_quantized_config.QuantizedConfig(16, 16, 32, "w8a16", decode={decode})
        triton_quantized.experts_forward(*args, QuantizedExpertsSpec(scale_block_n=32, scale_block_k=32), config)
        """
    )


@pytest.mark.parametrize("fused_act,ws,programs,copy", [
    (True, False, 0, True), (False, False, 0, True), (False, True, 0, True), (False, True, 1, True),
    (True, False, 0, False), (False, False, 0, False)],
    ids=["fused", "unfused", "unfused-ws", "unfused-ws-persistent", "fused-gathered", "unfused-gathered"])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_w8a8_rows_by_tma_equals_the_pointer_path(fused_act, ws, programs, copy, T, monkeypatch):
    """x quantized into sorted order (or per token, its rows gathered: copy=False) and the operands by TMA
    (warp-specialized or not, persistent or not): the same quantization as the pointer path, so the same numbers
    up to the accumulation order (H = 320, I = 208: K tails and a partial last row block, zero-filled by the
    descriptors). The interpreter loads host descriptors of CPU tensors too (fp16 there: its bf16 stores are
    wrong)."""
    if DEVICE != "cuda":  # (warp specialization is no code of its own in the interpreter)
        form = (fused_act, ws, programs, copy)
        if T == 300 or form not in {(True, False, 0, True), (False, True, 1, True), (False, False, 0, False)} or \
                (T == 37 and form != (True, False, 0, True)):
            pytest.skip("the interpreter takes the fused, the unfused persistent and the unfused gathered forms at "
                        "T = 1, the fused one at T = 37 too (15-30 s each there)")
        monkeypatch.setattr(triton_quantized, "tma_ok", lambda *tensors: True)  # CUDA + sm90 + alignment, else
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    args, (w1, w2) = quantized_experts_inputs(T, 320, 208, 16, 4, dtype, 128, 128, seed=T)
    args = [a.to(DEVICE) for a in args]
    spec = QuantizedExpertsSpec()
    base = QuantizedConfig(block_m=64, block_n=128, block_k=128, act="w8a8_rows", fused_act=fused_act)
    tma = QuantizedConfig(block_m=64, block_n=128, block_k=128, act="w8a8_rows", fused_act=fused_act, tma=True,
                          warp_specialize=ws, programs_per_sm=programs, sorted_copy=copy)
    assert triton_quantized.use_tma(tma, spec, args[3], args[5])
    with poisoned_allocations():
        want, out = (triton_quantized.experts_forward(*args, spec, c).float().cpu() for c in (base, tma))
    assert rel_err(out, want) <= 2e-3
    if DEVICE == "cuda":  # (the interpreter's fp32 -> e4m3 rounding is wrong at powers of two: see above)
        assert rel_err(out, w8a8_reference(*[a.cpu() for a in args[:3]], w1, w2, group=128)) <= 2e-2


def test_quantize_rows_scales_every_group_of_a_long_row():
    """w8a8_rows' hidden pass takes up to 16 groups of a row per program (K = 19 groups + 40 columns: two programs
    a row, the second partial): each group's scale is its amax / 448 and its values the reference rounding."""
    K = 128 * 19 + 40
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, K, generator=gen) * torch.rand(3, K // 8 + 1, generator=gen).repeat_interleave(8, 1)[:, :K]
    with poisoned_allocations():
        q, s = triton_quantized.quantize_rows(x.to(DEVICE))
    groups = torch.nn.functional.pad(x, (0, (-K) % 128)).unflatten(1, (-1, 128))
    assert torch.equal(s.cpu(), groups.abs().amax(-1).clamp(min=1e-12) / 448.0)
    got = q.cpu().float()
    want = (groups / s.cpu().unsqueeze(-1)).to(torch.float8_e4m3fn).float().flatten(1)[:, :K]  # e4m3 values
    # (the interpreter rounds fp32 -> e4m3 wrongly onto powers of two: those values are checked on the GPU only)
    exact = (want == 0) | (want.abs().log2() % 1 != 0) if DEVICE != "cuda" else torch.ones_like(want, dtype=torch.bool)
    assert exact.float().mean() > 0.75 and torch.equal(got[exact], want[exact])


def test_quantize_sorted_rows_puts_each_pairs_token_row_at_its_slot():
    """The TMA path's A: row pos[p] of the sorted copy is quantize_rows' row of pair p's token (values and
    scales); the copy is what the GEMM's descriptor reads in block order."""
    from moe_compiler.lowering.triton_align import align_rows

    T, H, E, k = 7, 200, 4, 2
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    rows = align_rows(ids, E, 16)
    with poisoned_allocations():
        q, s = triton_quantized.quantize_sorted_rows(hidden, rows, k, 16)
        q_tok, s_tok = triton_quantized.quantize_rows(hidden)
    pos = rows.pos.long().cpu()
    tok = torch.arange(T * k) // k
    assert torch.equal(q.cpu()[pos].float(), q_tok.cpu()[tok].float())
    assert torch.equal(s.cpu()[pos], s_tok.cpu()[tok])
