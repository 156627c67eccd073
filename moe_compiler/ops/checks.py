"""Input checks of the ops: shapes, dtypes, devices, named with expected vs got and the fix.

They read sizes only (symbolic sizes welcome), so the fakes run them at compile time and a bad call fails
when the graph is built, not on the GPU; the real implementations run them again on every call. Expert id
values are data: checked on the host on the CPU, by the Triton kernels on CUDA (a device-side assert).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import ExpertsSpec, RouterSpec, WeightFormat

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)


def fail(op: str, what: str, expected: str, got, fix: str):
    raise ValueError(f"moe_compiler.{op}: {what}: expected {expected}, got {got}. {fix}")


def _experts(what, expected, got, fix):
    fail("experts", what, expected, got, fix)


def _routing(bad, hidden, topk_ids, topk_weights) -> None:
    """hidden [T, H] float, topk_ids [T, k] int, topk_weights [T, k] float: checked for any experts op (`bad`
    raises in that op's name)."""
    if hidden.dim() != 2:
        bad("hidden rank", "a 2-D [T, H] tensor", f"shape {tuple(hidden.shape)}", "Flatten batch and sequence first.")
    if hidden.dtype not in _FLOATS:
        bad("hidden dtype", "float32, bfloat16 or float16", hidden.dtype, "Cast the activations.")
    if topk_ids.dim() != 2 or topk_ids.dtype not in _INTS:
        got = f"{tuple(topk_ids.shape)} {topk_ids.dtype}"
        bad("topk_ids", "a 2-D [T, k] int32/int64 tensor", got, "Pass the router's top-k indices.")
    if topk_weights.dim() != 2 or topk_weights.dtype not in _FLOATS:
        got = f"{tuple(topk_weights.shape)} {topk_weights.dtype}"
        bad("topk_weights", "a 2-D [T, k] float tensor", got, "Pass the router's top-k weights.")
    T = hidden.shape[0]
    if topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        got = f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        bad("routing shapes", f"topk_ids and topk_weights of shape [T={T}, k]", got,
            "Route the same tokens that are passed as hidden.")


def _one_device(bad, *tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        bad("devices", "all tensors on one device", sorted(map(str, devices)),
            "Move the model and inputs to one device.")


def check_experts(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, spec: ExpertsSpec) -> None:
    _routing(_experts, hidden, topk_ids, topk_weights)
    H = hidden.shape[1]
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dim() != 3:
            _experts(f"{name} rank", "a 3-D [E, out, in] tensor", f"shape {tuple(w.shape)}",
                     "Stack the experts' weights along dim 0.")
        if w.dtype != hidden.dtype:
            _experts(f"{name} dtype", f"hidden's dtype {hidden.dtype}", w.dtype,
                     "Cast the activations or the model to one dtype.")
    E = w_gate_up.shape[0]
    if spec.transposed:
        two_i, I = w_gate_up.shape[2], w_down.shape[1]
        want_gu, want_down = "[E, H, 2I]", "[E, I, H]"
        ok = w_gate_up.shape[1] == H and w_down.shape[2] == H
    else:
        two_i, I = w_gate_up.shape[1], w_down.shape[2]
        want_gu, want_down = "[E, 2I, H]", "[E, H, I]"
        ok = w_gate_up.shape[2] == H and w_down.shape[1] == H
    if not ok or w_down.shape[0] != E or two_i != 2 * I:
        _experts("weight shapes", f"w_gate_up {want_gu} and w_down {want_down} with H={H}",
                 f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}",
                 "Check the weight layout (spec.transposed) and the hidden size.")
    # k > E is allowed: an expert-parallel rank may hold fewer experts than the top-k (the extra slots carry the
    # sentinel E), and every pair is computed on its own, so repeated ids are no error either.
    for name, b, size in (("b_gate_up", b_gate_up, 2 * I), ("b_down", b_down, H)):
        if b is not None and (b.dim() != 2 or b.shape[0] != E or b.shape[1] != size):
            _experts(f"{name} shape", f"[E={E}, {size}]", tuple(b.shape), "Pass one bias row per expert, or None.")
    _one_device(_experts, hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down)


def check_ids_in_range(topk_ids: Tensor, num_experts: int) -> None:
    """Ids in [0, E]: E is the sentinel of transformers' expert parallelism (a route to another rank's expert,
    which contributes nothing). On the CPU a host check; on CUDA a device-side assert (no host sync: the op stays
    capture-safe)."""
    if topk_ids.numel() == 0:
        return
    if topk_ids.device.type == "cpu":
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi > num_experts:
            _experts("topk_ids values", f"expert ids in [0, {num_experts}] ({num_experts}: the sentinel of expert "
                     "parallelism, a route to another rank's expert)", f"min {lo}, max {hi}",
                     "Check the router's top-k.")
    else:
        in_range = ((topk_ids >= 0) & (topk_ids <= num_experts)).all()
        torch._assert_async(in_range, "moe_compiler.experts: topk_ids out of [0, E]")


def check_shared(hidden, gate_proj, up_proj, down_proj, expert_gate) -> None:
    """The shared MLP's weights (spec.SharedMLP) against hidden [T, H]."""
    H = hidden.shape[1]
    if gate_proj is None or down_proj is None:
        _experts("shared experts", "shared_gate_proj and shared_down_proj together",
                 f"shared_gate_proj {'absent' if gate_proj is None else 'given'}, "
                 f"shared_down_proj {'absent' if down_proj is None else 'given'}",
                 "Pass the shared MLP's gate (or fused gate_up) and down Linear weights, or neither.")
    if down_proj.dim() != 2 or down_proj.shape[0] != H:
        _experts("shared_down_proj shape", f"[H={H}, Is]", tuple(down_proj.shape),
                 "Pass the shared MLP's down Linear weight ([out, in]).")
    Is = down_proj.shape[1]
    gate_up = (gate_proj,) if up_proj is None else (gate_proj, up_proj)
    want = [(2 * Is, H)] if up_proj is None else [(Is, H)] * 2
    got = [tuple(w.shape) for w in gate_up]
    if got != want:
        _experts("shared gate/up shapes", str(want), got,
                 "Gate and up are [Is, H] Linear weights (or one [2Is, H] as shared_gate_proj), down is [H, Is].")
    if expert_gate is not None and tuple(expert_gate.shape) != (1, H):
        _experts("shared_expert_gate shape", f"(1, {H})", tuple(expert_gate.shape),
                 "Pass the shared expert gate Linear's weight, or None.")
    for w in (*gate_up, down_proj, *(() if expert_gate is None else (expert_gate,))):
        if w.dtype != hidden.dtype:
            _experts("shared weight dtype", f"hidden's dtype {hidden.dtype}", w.dtype,
                     "Cast the activations or the model to one dtype.")
        if w.device != hidden.device:
            _experts("devices", "all tensors on one device", sorted({str(w.device), str(hidden.device)}),
                     "Move the model and inputs to one device.")


def check_shared_absent(*parts) -> None:
    if any(p is not None for p in parts):
        _experts("shared experts", "shared_gate_proj and shared_down_proj together",
                 "shared_up_proj or shared_expert_gate without them",
                 "Pass the shared MLP's gate (or fused gate_up) and down Linear weights too.")


def unstacked_geometry(w_gate_up: list[Tensor], w_down: list[Tensor], spec: ExpertsSpec) -> tuple[int, int]:
    """(E, P) of per-expert weight parts, P gate_up parts per expert, after checking them."""
    E = len(w_down)
    if E == 0 or len(w_gate_up) not in (E, 2 * E):
        _experts("weight parts", "E down parts and E or 2E gate_up parts (gate_e, up_e per expert)",
                 f"{len(w_gate_up)} gate_up and {E} down parts", "Pass every expert's Linear weights, in expert order.")
    if spec.transposed or spec.scale_input:
        _experts("spec", "transposed=False and scale_input=False for per-expert nn.Linear weights",
                 f"transposed={spec.transposed}, scale_input={spec.scale_input}",
                 "Use torch.ops.moe_compiler.experts for stacked weights.")
    P = len(w_gate_up) // E
    for name, parts in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        first = parts[0].shape
        if len(first) != 2 or any(p.shape != first for p in parts):
            _experts(f"{name} parts", "2-D [out, in] tensors of one shape", [tuple(p.shape) for p in parts],
                     "Every expert must have the same sizes.")
    rows, H = w_gate_up[0].shape
    if P == 1 and rows % 2:
        _experts("gate_up part rows", "an even number (gate rows then up rows)", rows,
                 "Pass gate and up as separate parts.")
    if tuple(w_down[0].shape) != (H, rows * P // 2):
        _experts("w_down part shape", f"[H={H}, I={rows * P // 2}]", tuple(w_down[0].shape),
                 "Check which Linear is the down projection.")
    return E, P


def _route(what, expected, got, fix):
    fail("route", what, expected, got, fix)


def check_route(router_logits: Tensor, correction_bias: Tensor | None, spec: RouterSpec) -> None:
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        got = f"{tuple(router_logits.shape)} {router_logits.dtype}"
        _route("router_logits", "a 2-D [T, E] float tensor", got, "Pass the router's logits.")
    E = router_logits.shape[1]
    if spec.top_k > E:
        _route("top_k", f"<= E={E}", spec.top_k, "Each token picks distinct experts.")
    if E % spec.n_group != 0:
        _route("n_group", f"a divisor of E={E}", spec.n_group, "Check the model config.")
    if spec.n_group > 1 and spec.top_k > spec.topk_group * (E // spec.n_group):
        _route("topk_group", f"enough groups for top_k={spec.top_k}", spec.topk_group, "Check the model config.")
    if correction_bias is not None and (correction_bias.dim() != 1 or correction_bias.shape[0] != E):
        _route("correction_bias", f"a [E={E}] tensor", tuple(correction_bias.shape),
               "Pass e_score_correction_bias or None.")
    if correction_bias is not None and correction_bias.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        _route("correction_bias dtype", "float32, bfloat16 or float16", correction_bias.dtype,
               "Cast it to float32 (the route op chooses in fp32 at most).")


_SCALE_DTYPES = (torch.float32, torch.bfloat16) + ((torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())


def check_quantized_experts(hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                            spec) -> None:
    """experts_quantized's routed tensors (spec.QuantizedExpertsSpec): the routing as for experts, quantized
    [E, 2I, H] / [E, H, I] weights (INT4: [E, 2I, H/8] / [E, H, I/8] int32 words) and one scale per
    (scale_block_n x scale_block_k) block."""
    def bad(what, expected, got, fix):
        fail("experts_quantized", what, expected, got, fix)

    _routing(bad, hidden, topk_ids, topk_weights)
    H = hidden.shape[1]
    packed = spec.weight_format is WeightFormat.INT4_PACKED
    dtype, per_word = (torch.int32, 8) if packed else (torch.float8_e4m3fn, 1)
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dim() != 3 or w.dtype != dtype:
            bad(name, f"a 3-D {str(dtype).replace('torch.', '')} tensor ({spec.weight_format.value})",
                f"{tuple(w.shape)} {w.dtype}", "Pass the checkpoint's quantized expert weights as stored.")
    E, two_i, I = w_gate_up.shape[0], w_gate_up.shape[1], w_down.shape[2] * per_word
    if w_gate_up.shape[2] * per_word != H or tuple(w_down.shape[:2]) != (E, H) or two_i != 2 * I:
        in_h = f"H/8={H / 8}" if packed else f"H={H}"  # INT4: 8 values per int32 word along the input dimension
        bad("weight shapes", f"w_gate_up [E, 2I, {in_h}] and w_down [E, H, I{'/8' if packed else ''}]",
            f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}", "Check the hidden size and the weight layout.")
    bn, bk = spec.scale_block_n, spec.scale_block_k
    for name, s, (N, K), min_rows in (("w_gate_up_scale", w_gate_up_scale, (2 * I, H), 2),
                                       ("w_down_scale", w_down_scale, (H, I), 1)):
        rows, cols = -(-N // bn), -(-K // bk)
        # transformers allocates at least 2 gate_up scale rows (one per half) even when 2I < scale_block_n.
        ok_rows = (rows, max(rows, min_rows))
        if s.dim() != 3 or s.shape[0] != E or s.shape[1] not in ok_rows or s.shape[2] != cols:
            bad(f"{name} shape", f"[E={E}, ceil({N}/{bn})={rows}, ceil({K}/{bk})={cols}]", tuple(s.shape),
                "Pass the weight's block scales (scale_inv) and the checkpoint's weight_block_size as "
                "scale_block_n / scale_block_k.")
        if s.dtype not in _SCALE_DTYPES:
            bad(f"{name} dtype", "float32, bfloat16 or float8_e8m0fnu", s.dtype, "Pass the scales as stored.")
    _one_device(bad, hidden, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale)


def check_quantized_linear(x, weight, weight_scale, bias, spec) -> None:
    """linear_quantized's tensors: x [..., K] float, weight [N, K] float8_e4m3fn, one scale per block."""
    def bad(what, expected, got, fix):
        fail("linear_quantized", what, expected, got, fix)

    if x.dim() < 1 or x.dtype not in _FLOATS:
        bad("x", "a [..., K] float32 / bfloat16 / float16 tensor", f"{tuple(x.shape)} {x.dtype}",
            "Cast the activations.")
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn or weight.shape[1] != x.shape[-1]:
        bad("weight", f"a [N, K={x.shape[-1]}] float8_e4m3fn tensor", f"{tuple(weight.shape)} {weight.dtype}",
            "Pass the layer's quantized weight as stored.")
    N, K = weight.shape
    bn, bk = spec.scale_block_n, spec.scale_block_k
    want = (-(-N // bn), -(-K // bk))
    if tuple(weight_scale.shape) != want or weight_scale.dtype not in _SCALE_DTYPES:
        bad("weight_scale", f"[ceil({N}/{bn}), ceil({K}/{bk})] = {list(want)} float32 / bfloat16 / float8_e8m0fnu",
            f"{tuple(weight_scale.shape)} {weight_scale.dtype}",
            "Pass weight_scale_inv and the checkpoint's weight_block_size (a per-tensor scale as [1, 1] with "
            "scale_block_n = N, scale_block_k = K).")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        bad("bias", f"a [N={N}] tensor or None", tuple(bias.shape), "Pass the layer's bias.")
    _one_device(bad, x, weight, weight_scale, bias)
