"""The router's linear feeding a route op, at decode sizes, as one fused reduction instead of a cuBLAS call.

    logits = linear(x, W[, b])                    x [T, H], W [E, H], b [E]; x / W may be casts (DeepSeek-V3's
                                                  fp32 router: linear(x.float(), W.float()))
 -> logits = ((x.float()[:, None, :] * W.float()[None]).sum(-1) [+ b.float()]).to(logits' dtype)

The same arithmetic as the GEMM it replaces (fp32 products and sums, rounded once to the logits' dtype: what cuBLAS
computes for a bf16 or an fp32 linear), in another summation order. Why: at decode T the router GEMM is a few
microseconds of GPU and one or two cuBLAS launches (split-K plus its reduce for GPT-OSS and DeepSeek-V3), and
DeepSeek-V3's fp32 router adds two cast kernels per call — its weight cast to fp32 on every step. Written as a
reduction, Inductor compiles it into one Triton kernel with the casts and the bias folded into its loads: in a
default-mode decode step (C++ host code, backend.host_code_choice) the host pays one launch instead of up to four.

Applied by the backend only to graphs it compiles with C++ host code (decode, no CUDA graphs), with every route op's
logits a linear of at most MAX_TOKENS rows; MOE_COMPILER_ROUTER_GEMV / option moe_compiler.router_gemv. Counted
in the report (`router_gemv`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import example_value

# Rows of x up to which the reduction form is used: each row re-reads W (from L2 past the first), so at larger T
# the GEMM's tiles win (to be settled by measurement; B = 32 decode is the largest default-mode decode batch timed).
MAX_TOKENS = 32

def _linear_args(node: fx.Node):
    """(x, W, b or None) of a `linear` node (F.linear is torch._C._nn.linear), or None."""
    if node.op != "call_function" or node.target is not torch._C._nn.linear:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x, w, b = args[0], args[1] if args[1] is not None else node.kwargs.get("weight"), args[2]
    if b is None:
        b = node.kwargs.get("bias")
    return x, w, b


def _fits(logits: fx.Node, x, w, b) -> bool:
    lv, xv, wv, bv = [example_value(n) if isinstance(n, fx.Node) else None for n in (logits, x, w, b)]
    if not all(isinstance(v, torch.Tensor) for v in (lv, xv, wv)):
        return False
    if b is not None and not isinstance(bv, torch.Tensor):
        return False
    sizes = [*xv.shape, *wv.shape, *(bv.shape if bv is not None else ())]
    if not all(isinstance(s, int) for s in sizes):  # symbolic: the bound cannot be read without a guard
        return False
    return (xv.dim() == 2 and wv.dim() == 2 and xv.shape[1] == wv.shape[1] and xv.shape[0] <= MAX_TOKENS
            and (bv is None or tuple(bv.shape) == (wv.shape[0],))
            and xv.dtype.is_floating_point and lv.dtype.is_floating_point)


def _one_fake_mode(values):
    """The fake mode all the example values share (Dynamo's graph's), or None."""
    modes = {id(getattr(v, "fake_mode", None)): getattr(v, "fake_mode", None) for v in values}
    return next(iter(modes.values())) if len(modes) == 1 else None


def rewrite_router_linears(gm: fx.GraphModule) -> int:
    """Rewrite each route op's logits `linear` (module docstring) in place; the number rewritten."""
    graph = gm.graph
    done = 0
    for route in graph.find_nodes(op="call_function", target=torch.ops.moe_compiler.route.default):
        logits = route.kwargs.get("router_logits", route.args[0] if route.args else None)
        parts = _linear_args(logits) if isinstance(logits, fx.Node) else None
        if parts is None or not _fits(logits, *parts):
            continue
        x, w, b = parts
        out_dtype = example_value(logits).dtype
        fake = _one_fake_mode([example_value(n) for n in (x, w, b) if isinstance(n, fx.Node)])

        def add(op, target, *args):
            node = graph.create_node(op, target, args)
            if fake is not None:  # later passes and Inductor's pre-grad passes read example values
                values = [example_value(a) if isinstance(a, fx.Node) else a for a in args]
                with fake:
                    fn = getattr(values[0], target) if op == "call_method" else target
                    node.meta["example_value"] = fn(*values[1:]) if op == "call_method" else fn(*values)
            return node

        with graph.inserting_before(logits):
            xu = add("call_method", "unsqueeze", add("call_method", "to", x, torch.float32), 1)
            wu = add("call_method", "unsqueeze", add("call_method", "to", w, torch.float32), 0)
            total = add("call_method", "sum", add("call_function", operator.mul, xu, wu), -1)
            if b is not None:
                total = add("call_function", operator.add, total, add("call_method", "to", b, torch.float32))
            new = add("call_method", "to", total, out_dtype)
        logits.replace_all_uses_with(new)
        graph.erase_node(logits)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
