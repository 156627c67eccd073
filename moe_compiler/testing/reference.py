"""fp64 references, written as plainly as possible (one (token, slot) pair at a time), and random inputs."""

from __future__ import annotations

import dataclasses

import torch

from ..lowering.torch_activations import gated_forward
from ..spec import ExpertsSpec, GateUpLayout


def experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up=None, b_down=None,
                      spec=ExpertsSpec(), z_dtype=None):
    """out[t] = sum_j w[t, j] * down_e(act(gate_up_e(x_t))) in float64 (spec.scale_input: the weight scales
    x_t instead), returned in float64. A pair routed to e = E (the expert-parallel sentinel) adds nothing.
    z_dtype: the activation reads the pre-activation rounded to it, as a backward reading the z stored in the
    input dtype does (gradients pass straight through the rounding). A clamp's mask then flips where the backward's
    does: against fp64 z, bf16 z flips ~0.5% of them, each a whole element's gradient (up to 8% of d w_gate_up)."""
    x = hidden.double()
    out = torch.zeros_like(x)
    T, k = topk_ids.shape
    for t in range(T):
        for j in range(k):
            e = int(topk_ids[t, j])
            if e == w_gate_up.shape[0]:
                continue
            w1, w2 = w_gate_up[e].double(), w_down[e].double()
            xin = x[t] * topk_weights[t, j].double() if spec.scale_input else x[t]
            h = xin @ w1 if spec.transposed else w1 @ xin
            if b_gate_up is not None:
                h = h + b_gate_up[e].double()
            if z_dtype is not None:
                h = h + (h.to(z_dtype).double() - h).detach()
            a = gated_forward(h, spec)
            y = a @ w2 if spec.transposed else w2 @ a
            if b_down is not None:
                y = y + b_down[e].double()
            out[t] += y if spec.scale_input else topk_weights[t, j].double() * y
    return out


def pre_activations(hidden, topk_ids, w_gate_up, b_gate_up=None, spec=ExpertsSpec()):
    """z [T*k, 2I] in float64: each pair's gate_up output (bias added) at row t*k + j, in w_gate_up's row order;
    a sentinel pair's row (e = E) is NaN. What experts_train saves for the backward."""
    T, k = topk_ids.shape
    E = w_gate_up.shape[0]
    ids = topk_ids.reshape(-1).long()
    w = w_gate_up.double()[ids.clamp(max=E - 1)]  # [S, 2I, H] (or [S, H, 2I] transposed)
    x = hidden.double().repeat_interleave(k, dim=0)
    z = torch.einsum("sh,shn->sn", x, w) if spec.transposed else torch.einsum("sh,snh->sn", x, w)
    if b_gate_up is not None:
        z = z + b_gate_up.double()[ids.clamp(max=E - 1)]
    return torch.where((ids < E)[:, None], z, float("nan"))


def experts_inputs(T, H, I, E, k, dtype, spec=ExpertsSpec(), bias=False, seed=0):
    """Random (hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down) on the CPU: distinct experts
    per token, weights scaled by fan_in^-1/2 so outputs are O(1), biases only if asked."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    hidden = rnd(T, H)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]  # distinct experts per token
    weights = torch.rand(T, k, generator=g).to(dtype)
    if spec.transposed:
        w1, w2 = rnd(E, H, 2 * I, scale=H**-0.5), rnd(E, I, H, scale=I**-0.5)
    else:
        w1, w2 = rnd(E, 2 * I, H, scale=H**-0.5), rnd(E, H, I, scale=I**-0.5)
    b1, b2 = (rnd(E, 2 * I, scale=0.1), rnd(E, H, scale=0.1)) if bias else (None, None)
    return hidden, ids, weights, w1, w2, b1, b2


def expert_parts(E, H, I, per_expert: int, dtype=torch.float32, seed=0):
    """(w_gate_up [E, 2I, H], w_down [E, H, I], gate_up parts, down parts): stacked reference weights and the same
    values as separate per-expert tensors in nn.Linear layout (per_expert gate_up parts per expert: 2 = gate, up)."""
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    rows = 2 * I // per_expert
    gate_up = [w1[e, i * rows:(i + 1) * rows].clone() for e in range(E) for i in range(per_expert)]
    down = [w2[e].clone() for e in range(E)]
    return w1, w2, gate_up, down


def shared_inputs(H, Is, dtype, fused, gated, seed=1):
    """Random shared-experts weights ([gate, up] or [gate_up], down, expert gate or None), nn.Linear layout."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(dtype)  # noqa: E731
    gate_up = [rnd(2 * Is, H)] if fused else [rnd(Is, H), rnd(Is, H)]
    return gate_up, rnd(H, Is), rnd(1, H) if gated else None


def cuda_experts_inputs(T, E, k, H, I, dtype=torch.bfloat16, seed=0):
    """Random (hidden, topk_ids, topk_weights, w_gate_up, w_down) drawn on the GPU (real model shapes are too big
    to draw on the host quickly)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    ids = torch.rand(T, E, device="cuda", generator=g).argsort(dim=1)[:, :k]
    weights = torch.rand(T, k, device="cuda", generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).to(dtype)
    return hidden, ids, weights, w1, w2


def poisoned_run(fn):
    """fn() on a caching allocator whose free blocks hold NaN, so an output element never written shows."""
    torch.cuda.synchronize()
    # One large block (the large pool) and 32 small ones (the 2 MB segments of the small pool).
    junk = [torch.empty(1 << 28, dtype=torch.uint8, device="cuda")]
    junk += [torch.empty(1 << 20, dtype=torch.uint8, device="cuda") for _ in range(32)]
    for j in junk:
        j.view(torch.bfloat16).fill_(float("nan"))
    del junk
    return fn()


def spec_id(spec: ExpertsSpec) -> str:
    """A short test id: activation-layout-(t)ransposed or (n)ot[-scale_input]."""
    layout = "t" if spec.transposed else "n"
    return f"{spec.activation.value}-{spec.gate_up.value}-{layout}{'-scale_input' if spec.scale_input else ''}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def experts_reference_by_expert(hidden, topk_ids, topk_weights, w_gate_up, w_down, spec=ExpertsSpec(),
                                dtype=torch.float64, b_gate_up=None, b_down=None):
    """Same math, one expert at a time on the inputs' device: fast enough for real model shapes (biases
    [E, 2I] / [E, H] optional)."""
    x = hidden.to(dtype)
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        if e == w_gate_up.shape[0]:  # the expert-parallel sentinel: adds nothing
            continue
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        w1, w2 = w_gate_up[e].to(dtype), w_down[e].to(dtype)
        scale = topk_weights[tok, slot].to(dtype).unsqueeze(-1)
        xin = x[tok] * scale if spec.scale_input else x[tok]
        h = xin @ w1 if spec.transposed else xin @ w1.t()
        if b_gate_up is not None:
            h = h + b_gate_up[e].to(dtype)
        a = gated_forward(h, spec)
        y = a @ w2 if spec.transposed else a @ w2.t()
        if b_down is not None:
            y = y + b_down[e].to(dtype)
        out.index_add_(0, tok, y if spec.scale_input else y * scale)
    return out


def shared_reference(hidden, shared_gate_up, shared_down, shared_gate=None, spec=ExpertsSpec()):
    """The shared-experts term [sigmoid(x wg^T)] * down(act(gate(x)) * up(x)) in float64 (gate_up given as
    [gate, up] or one [2Is, H] with gate rows first; the shared MLP's gate/up are always concatenated)."""
    x = hidden.double()
    gu = torch.cat([w.double() for w in shared_gate_up])
    h = x @ gu.t()
    a = gated_forward(h, dataclasses.replace(spec, gate_up=GateUpLayout.CONCAT))
    y = a @ shared_down.double().t()
    return y if shared_gate is None else torch.sigmoid(x @ shared_gate.double().t()) * y


# (best, runner-up) logit pairs whose sparse-mixer test `(m - x) / m > 0.02` (PhiMoE's 2 * jitter_eps) comes out
# differently when each op rounds to the dtype (eager) than when computed in fp32: found by exhaustive search
# over the dtype's values in [0.25, 4).
SPARSEMIXER_EDGE_PAIRS = {
    torch.bfloat16: [(0.486328125, 0.4765625), (0.97265625, 0.953125), (1.9453125, 1.90625), (3.890625, 3.8125)],
    torch.float16: [(0.414794921875, 0.406494140625), (0.427001953125, 0.41845703125),
                    (0.439208984375, 0.430419921875), (0.451416015625, 0.4423828125)],
}


def sparsemixer_edge_logits(T: int, E: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """[T, E] logits in `dtype` whose best two experts are an edge pair (random columns), the rest far below."""
    pairs = torch.tensor(SPARSEMIXER_EDGE_PAIRS[dtype], dtype=torch.float64)
    best = pairs[torch.randint(0, len(pairs), (T,), generator=gen)]
    rest = best[:, :1] * (0.5 + 0.4 * torch.rand(T, E - 2, generator=gen, dtype=torch.float64))
    rows = torch.cat([best, rest], dim=1)
    cols = torch.rand(T, E, generator=gen).argsort(dim=1)
    return rows.gather(1, cols).to(dtype)
