"""Look for wrong answers the zoo's fixed configs cannot show: every MoE architecture of moe_compiler/testing/hf_zoo.py
rebuilt with each routing / experts knob its config has changed (norm_topk_prob flipped, routed_scaling_factor,
hidden_act, top-k 1 and 3, group routing, topk_method, scoring_func, mlp_bias, ERNIE's moe_norm_min), compiled with
backend="fused_moe" on the CPU (fp32, Inductor off: what is tested is the rewrite) and its logits compared with
eager's.

    python tools/knob_sweep.py [--archs mixtral qwen3_moe ...] [--train] [--out sweep.jsonl]

--train: a training step instead (moe_compiler.training=True, the models in training mode): the logits and every
parameter's gradient against eager's, each gradient's error relative to its own norm or, where that is under
GRAD_FLOOR of the largest gradient's, to GRAD_FLOOR of it (a gradient that is 0 in exact arithmetic is rounding
noise on both sides: DeepSeek-V4's hash router built from its config, whose ids all point at one expert).

Each case ends as one of:
    ok     every experts region fused, or left with the reason logged, and the logits within TOL of eager's
    WRONG  logits off by more than TOL where the backend rewrote something: a wrong answer (exit status 1)
    error  the model cannot be built with that config (transformers refuses it) or the call raised
A knob that makes a form no matcher proves (a non-SiLU activation around DeepSeek-V4's clamps, ERNIE's clamped
renormalization) must end "ok" with the region left, not fused. Session 54 swept transformers 5.25's 49
architectures (426 cases): no WRONG (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import sys

TOL = 1e-4  # fp32 logits and gradients: the backend's own differences are ~1e-6
GRAD_FLOOR = 1e-2  # of the largest gradient norm: the scale a near-zero gradient's error is measured at
# Architectures whose training forward draws random numbers (eager and compiled draw differently)
RANDOM_IN_TRAINING = {"phimoe": "its sparsemixer router samples the experts in training mode"}
# The config fields that choose top-k (the first one a config has is varied).
TOP_K = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k")


def variants(cfg) -> list[dict]:
    """The config overrides to try on one architecture: only the knobs its config has."""
    def has(name):
        return getattr(cfg, name, None) is not None

    out = []
    if has("norm_topk_prob"):
        out.append({"norm_topk_prob": not cfg.norm_topk_prob})
    if has("routed_scaling_factor"):
        out.append({"routed_scaling_factor": 1.7})
    if has("hidden_act"):
        out += [{"hidden_act": a} for a in ("gelu", "relu", "gelu_pytorch_tanh", "silu") if a != cfg.hidden_act]
    k_name = next((n for n in TOP_K if isinstance(getattr(cfg, n, None), int)), None)
    if k_name is not None:
        out += [{k_name: k} for k in (1, 3) if k != getattr(cfg, k_name)]
    if has("n_group") and has("topk_group"):
        out += [{"n_group": 1, "topk_group": 1}, {"n_group": 2, "topk_group": 1}]
    if has("topk_method"):
        out += [{"topk_method": m} for m in ("greedy", "group_limited_greedy", "noaux_tc") if m != cfg.topk_method]
    if has("scoring_func"):
        out += [{"scoring_func": f} for f in ("softmax", "sigmoid") if f != cfg.scoring_func]
    if has("mlp_bias"):
        out.append({"mlp_bias": not cfg.mlp_bias})
    if has("moe_norm_min"):
        out.append({"moe_norm_min": 0.5})
    return out


def grad_err(got: dict, want: dict) -> tuple[float, str | None]:
    """(worst error, its parameter) of gradients {name: tensor or None} against eager's: each relative to its own
    norm, floored at GRAD_FLOOR of the largest; a gradient present on one side only is an error of 1."""
    scale = GRAD_FLOOR * max((float(w.norm()) for w in want.values() if w is not None), default=0.0)
    worst, where = 0.0, None
    for name, w in want.items():
        g = got.get(name)
        if (g is None) != (w is None):
            err = 1.0
        elif w is None:
            continue
        else:
            err = float((g.double() - w.double()).norm()) / max(float(w.norm()), scale, 1e-30)
        if not err <= worst:
            worst, where = err, name
    return worst, where


def run(arch: str, overrides: dict, train: bool = False) -> dict:
    """One case: the logits' rel err against eager (with `train`, the worst gradient's too), the backend's counters,
    the reasons it logged."""
    import io
    import logging

    import torch
    from torch._dynamo.utils import counters

    import moe_compiler  # noqa: F401 - the backend
    from moe_compiler.testing import rel_err
    from moe_compiler.testing.hf_zoo import zoo_model

    record = {"arch": arch, "overrides": overrides}
    try:
        model = zoo_model(arch, **overrides)
        twin = zoo_model(arch, **overrides) if train else None
    except Exception as e:  # noqa: BLE001 - transformers refusing a combination is a result, not a crash
        return {**record, "verdict": "error", "error": f"build: {type(e).__name__}: {e}"[:300]}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 7), generator=gen)
    counters.clear()
    torch._dynamo.reset()
    log = io.StringIO()
    logger = logging.getLogger("moe_compiler")
    handler = logging.StreamHandler(log)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    options = {"moe_compiler.inductor": False, "moe_compiler.training": train}
    try:
        if train:
            twin.load_state_dict(model.state_dict())
            model.train(), twin.train()
            ref = model(input_ids=ids)[0]
            weights = torch.randn(ref.shape, generator=gen)  # a loss that reaches every logit differently
            (ref * weights).sum().backward()
            out = torch.compile(twin, backend="fused_moe", options=options)(input_ids=ids)[0]
            (out * weights).sum().backward()
        else:
            with torch.no_grad():
                ref = model(input_ids=ids)[0]
                out = torch.compile(model, backend="fused_moe", options=options)(input_ids=ids)[0]
    except Exception as e:  # noqa: BLE001
        return {**record, "verdict": "error", "error": f"call: {type(e).__name__}: {e}"[:300]}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    found = dict(counters["moe_compiler"])
    err = rel_err(out, ref)
    if train:
        g_err, g_where = grad_err({n: p.grad for n, p in twin.named_parameters()},
                                  {n: p.grad for n, p in model.named_parameters()})
        record.update(grad_err=g_err, grad_worst=g_where)
        err = max(err, g_err)
    rewrote = any(k.startswith(("fused_", "shared_experts_")) and v for k, v in found.items())
    reasons = [line[line.index(key):] for line in log.getvalue().splitlines()
               for key in ("rejected because", "left to") if key in line]
    return {**record, "verdict": verdict(err, rewrote), "err": err, "counters": found, "reasons": reasons[:3]}


def verdict(err: float, rewrote: bool) -> str:
    """ok, or WRONG: logits off by more than TOL where the backend rewrote part of the graph."""
    return "WRONG" if rewrote and not err <= TOL else "ok"


def main() -> int:
    from transformers import AutoConfig

    from moe_compiler.testing.hf_zoo import MODEL_TYPE, TINY, model_type_known

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=sorted(TINY))
    ap.add_argument("--train", action="store_true", help="a training step: logits and every gradient")
    ap.add_argument("--out", metavar="PATH", help="one JSON line per case")
    args = ap.parse_args()
    records = []
    for arch in args.archs:
        if not model_type_known(arch):
            print(f"{arch}: not in this transformers", flush=True)
            continue
        if args.train and arch in RANDOM_IN_TRAINING:
            print(f"{arch}: skipped ({RANDOM_IN_TRAINING[arch]})", flush=True)
            continue
        for overrides in variants(AutoConfig.for_model(MODEL_TYPE[arch], **TINY[arch])):
            r = run(arch, overrides, args.train)
            records.append(r)
            detail = r.get("error") or f"err {r['err']:.1e}" + (f"; {r['reasons'][0][:150]}" if r["reasons"] else "")
            print(f"{r['verdict']:>5} {arch:<18} {json.dumps(overrides):<44} {detail}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    wrong = [r for r in records if r["verdict"] == "WRONG"]
    print(f"\n{len(records)} cases: {len(wrong)} WRONG, {sum(r['verdict'] == 'error' for r in records)} error")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
