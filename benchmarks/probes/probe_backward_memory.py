"""How much memory does each half of the experts backward hold at its peak (issue 17's memory target)? The
library backward (the default: DGrad / WGrad.GROUPED_MM) from a saved z, split where ops/experts.py splits it:
backward_down (reads z: dz, d weights, dW_down), then backward_gate_up_rows (from dz: dW_gate_up, then d hidden's
rows) and backward_combine (d hidden; dz dropped before it). A compiled backward frees z after the first and dz after
the second; eager autograd holds z to the end. Per shape and T, with the first half whole and
in row chunks (triton_backward_library.first_half_chunks): each half's peak, and the backward's peak compiled
(z freed) and eager, in GiB and in units of z.

    python -m benchmarks.probes.probe_backward_memory --shapes mixtral_8x7b qwen3_30b_a3b --tokens 4096 32768

On a CUDA GPU the real shape in bf16, peaks from the caching allocator, and each half timed (the chunks' cost). On
the CPU (no GPU needed; Triton's interpreter, fp32) a live-bytes count of the tensors each half allocates, at the
shape scaled down by --scale (H, I and T divided by it, E and k kept: every [rows, H or I] buffer and every weight
gradient shrinks by scale^2, so the ratios between them hold), reported scaled back to bf16 at the real size. The
padding rows (E x block_m, block_m 16 as the library backward's) do not scale so: measured on the H200, the CPU
figures were 2-6% above the GPU's at Mixtral-8x7B (8 experts) and 10-22% above at Qwen3-30B-A3B (128 experts;
NOTES.md "session 32").
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_compiler.tune.shapes import ALL_SHAPES


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode and still referenced (a storage's weakref finalizer drops
    it), and the most there were at once since `reset`. Launches of the Triton interpreter are not counted (its
    host copies) and garbage is collected before each count (its launches leave reference cycles)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        self.paused = False

    def reset(self):
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and not func.__name__.startswith("set_"):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self._add(t.untyped_storage())
        return out

    def _add(self, storage):
        key = id(storage)
        if key in self.live or not storage.nbytes():
            return
        gc.collect()
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key):
        self.now -= self.live.pop(key, 0)


def _interpreter_uncounted(mode: LiveBytes):
    import triton.runtime.interpreter as interpreter

    call = interpreter.GridExecutor.__call__

    def paused(self, *args, **kwargs):
        mode.paused = True
        try:
            return call(self, *args, **kwargs)
        finally:
            mode.paused = False

    interpreter.GridExecutor.__call__ = paused


def halves(E, k, H, I, T, chunks: int, device: str) -> dict:
    """Bytes: z, the first half's peak above z, the second's above where z was allocated (z freed by then)."""
    from moe_compiler.lowering import triton_backward, triton_backward_library
    from moe_compiler.spec import ExpertsSpec

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(T)
    hidden = torch.randn(T, H, device=device, generator=gen).to(dtype)
    ids = torch.rand(T, E, device=device, generator=gen).argsort(dim=1)[:, :k]
    weights = torch.rand(T, k, device=device, generator=gen).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, H, device=device, generator=gen) * H**-0.5).to(dtype)
    w_down = (torch.randn(E, H, I, device=device, generator=gen) * I**-0.5).to(dtype)
    grad_out = torch.randn(T, H, device=device, generator=gen).to(dtype)
    spec = ExpertsSpec()
    config = triton_backward.default_config(torch.bfloat16, E, k, H, I, T, library=True)
    real = triton_backward_library.first_half_chunks
    triton_backward_library.first_half_chunks = lambda *a: chunks
    try:
        if device == "cuda":
            return _on_gpu(hidden, ids, weights, w_gate_up, w_down, grad_out, spec, config)
        return _on_cpu(hidden, ids, weights, w_gate_up, w_down, grad_out, spec, config)
    finally:
        triton_backward_library.first_half_chunks = real


def _on_cpu(hidden, ids, weights, w_gate_up, w_down, grad_out, spec, config) -> dict:
    from moe_compiler.lowering import triton_backward

    T, k, I = hidden.shape[0], ids.shape[1], w_down.shape[2]
    with LiveBytes() as mode:
        _interpreter_uncounted(mode)
        z = torch.randn(T * k, 2 * I, dtype=hidden.dtype)
        base = mode.now
        down = triton_backward.backward_down(grad_out, hidden, ids, weights, w_gate_up, w_down, None, None, spec,
                                             config, True, z)
        first = mode.peak - base
        held, _kept = [down.dz], down[1:]  # the first half's gradients stay (outputs); dz goes to the second
        del z, down
        gc.collect()
        mode.reset()
        _second_half(held, hidden, ids, weights, w_gate_up, w_down, spec, config)
        z_bytes = T * k * 2 * I * hidden.element_size()
        second = mode.peak - base + z_bytes  # above where z was not yet allocated (it is freed by now)
    return {"z": z_bytes, "first": first, "second": second}


def _second_half(held: list, hidden, ids, weights, w_gate_up, w_down, spec, config):
    """The second and third ops' work as a compiled backward runs it: dz (held[0], taken out of the list, which must
    hold the only other reference) dropped once dx_rows exists, before d hidden is made."""
    from moe_compiler.lowering import triton_backward

    dz = held.pop()
    dx_rows, _, _ = triton_backward.backward_gate_up_rows(dz, hidden, ids, weights, w_gate_up, w_down, None, spec,
                                                          config, True)
    del dz
    return triton_backward.backward_combine(dx_rows, hidden, ids, weights, w_gate_up, w_down, spec, config)


def _ms(fn) -> float:
    """Median ms of 5 CUDA-event-timed calls of `fn` after one warm-up call."""
    from moe_compiler.tune.timing import events

    fn()
    return events(fn, 5) * 1e3


def _on_gpu(hidden, ids, weights, w_gate_up, w_down, grad_out, spec, config) -> dict:
    """As _on_cpu, from the caching allocator's peaks; each half also timed (before its memory is measured, so
    that the timing's allocations are not in the peak): what the row chunks cost."""
    from moe_compiler.lowering import triton_backward

    T, k, I = hidden.shape[0], ids.shape[1], w_down.shape[2]
    z = torch.randn(T * k, 2 * I, device="cuda", dtype=hidden.dtype)
    run_down = functools.partial(triton_backward.backward_down, grad_out, hidden, ids, weights, w_gate_up, w_down,
                                 None, None, spec, config, True, z)
    first_ms = _ms(run_down)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    down = run_down()
    torch.cuda.synchronize()
    first = torch.cuda.max_memory_allocated() - base
    z_bytes = z.untyped_storage().nbytes()
    del z, run_down
    held, _kept = [down.dz], down[1:]  # the first half's gradients stay (outputs); dz goes to the second
    del down
    run_up = functools.partial(_second_half, hidden=hidden, ids=ids, weights=weights, w_gate_up=w_gate_up,
                               w_down=w_down, spec=spec, config=config)
    second_ms = _ms(lambda: run_up([held[0]]))  # `held` keeps dz through the timing's calls
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run_up(held)
    torch.cuda.synchronize()
    second = torch.cuda.max_memory_allocated() - base + z_bytes
    return {"z": z_bytes, "first": first, "second": second, "first_ms": first_ms, "second_ms": second_ms}


def _chunks(E, k, H, I, T) -> int:
    """first_half_chunks at the real shape (its default config's row block)."""
    from moe_compiler.lowering import triton_backward, triton_backward_library
    from moe_compiler.lowering.triton_align import max_blocks

    block_m = triton_backward.default_config(torch.bfloat16, E, k, H, I, T, library=True).rows.block_m
    return triton_backward_library.first_half_chunks(max_blocks(T * k, E, block_m) * block_m, T * k, H, I, E, True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["mixtral_8x7b", "qwen3_30b_a3b"], choices=sorted(ALL_SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 32768])
    parser.add_argument("--scale", type=int, default=32, help="CPU only: H, I and T divided by this")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"{'shape':16s} {'T':>6s} {'chunks':>6s} {'z GiB':>6s} | first half | second half (z freed) | "
          f"backward compiled | eager (z held) | ms first, second half (GPU)")
    for name in args.shapes:
        E, k, H, I = ALL_SHAPES[name]
        for T in args.tokens:
            f = args.scale if device == "cpu" else 1
            dims = (E, k, H // f, max(8, I // f // 8 * 8), max(1, T // f))
            # bytes back to the real size in bf16: rows and dims each scaled by f, fp32 on the CPU
            unit = f * f * (2 / 4 if device == "cpu" else 1)
            for chunks in sorted({1, _chunks(E, k, H, I, T)}):  # the real shape's rule, also where scaled down
                r = halves(*dims, chunks, device)
                z, first, second = r["z"], r["first"] + r["z"], r["second"]
                gib = lambda b: b * unit / 2**30  # noqa: E731
                label = str(chunks)
                print(f"{name:16s} {T:6d} {label:>6s} {gib(z):6.2f} | {gib(first):5.2f} ({first / z:4.2f} z) | "
                      f"{gib(second):5.2f} ({second / z:4.2f} z) | {gib(max(first, second)):5.2f} | "
                      f"{gib(max(first, second + z)):5.2f}"
                      + (f" | {r['first_ms']:7.2f} {r['second_ms']:7.2f}" if "first_ms" in r else ""), flush=True)


if __name__ == "__main__":
    main()
