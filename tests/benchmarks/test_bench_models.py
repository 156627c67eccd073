"""benchmarks/bench_models.py's gradient error: one norm over every expert gradient, computed slice by slice."""

import torch

from benchmarks import bench_models


def test_grads_rel_err_in_slices_equals_the_whole_norm_in_fp64(monkeypatch):
    # A slice far smaller than the tensors: session 48's DeepSeek-V3 gradient (28 GiB in fp32) did not fit whole.
    monkeypatch.setattr(bench_models, "GRAD_SLICE", 7)
    gen = torch.Generator().manual_seed(0)
    want = [torch.randn(4, 5, 3, generator=gen), torch.randn(6, 2, generator=gen).t(), torch.randn(1, generator=gen)]
    got = [(w + 0.05 * torch.randn(w.shape, generator=gen)).to(torch.bfloat16) for w in want]
    num = sum(float((g.double() - w.double()).square().sum()) for g, w in zip(got, want))
    den = sum(float(w.double().square().sum()) for w in want)
    assert abs(bench_models.grads_rel_err(got, want) - (num / den) ** 0.5) < 1e-6 * (num / den) ** 0.5
