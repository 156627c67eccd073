import contextlib
import os

import pytest
import torch

# The suite's tiny shapes are in no tuned table: autotuning each on first use (the default) would add minutes of
# tuning to the GPU run. The autotune tests (tests/tune/test_first_use.py) switch it on.
os.environ.setdefault("MOE_COMPILER_AUTOTUNE", "0")
# Likewise Inductor's C++ host code, which the backend builds for CUDA decode graphs (+15-70 s of g++ per compiled
# graph): the suite's GPU compiles keep Python host code; the cpp_wrapper tests of tests/test_backend.py switch
# it on. The launches, kernels and results are the same either way.
os.environ.setdefault("MOE_COMPILER_CPP_WRAPPER", "0")

# Triton kernels run under the interpreter on a machine without CUDA (tiny fp32/fp16 shapes). It must be set
# before Triton is first imported (it reads the switch once; torch._dynamo imports Triton, and test modules of any
# directory may import Dynamo at collection), hence here, before any test module.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # Inductor's CPU kernels as scalar C++ (no SIMD intrinsics): g++ compiles them ~1.3-1.6x faster (three of the
    # slowest compiled-model tests: 61-74 s -> 46-48 s, session 39), and the suite's CPU compiles test the rewrite and
    # the logits against eager, not Inductor's vectorizer. The environment carries it to the example scripts and the
    # two-rank tests' subprocesses; TORCHINDUCTOR_VEC_ISA_OK=1 keeps the vectorized kernels.
    if os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0") == "0":
        import torch._inductor.config

        torch._inductor.config.cpp.vec_isa_ok = False


# Each pytest-xdist worker gets about twice its share of the cores for torch's CPU ops (the fp64 references): by
# default every worker runs one thread per core, and 8 workers on the device's 16 cores made test_triton_backward's
# T=300 references crawl (no test_default_tiles case finished in 6 minutes, session 39; the "hang" of session 31).
# Twice the share, not the share: workers often wait on a compiler subprocess, and the CI machine (2 workers on 2
# cores) keeps the 2 threads a worker had.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(cores, 2 * cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def runs_on_device(module) -> bool:
    """A module whose DEVICE is "cuda" (tests/lowering/triton_cases.py's, for instance) runs its kernels on the GPU
    where there is one, with cases only CUDA has (bf16): its tests belong to a GPU run (tools/gpu_suite.py) though
    they carry no gpu marker, since without CUDA they run too (the interpreter)."""
    return getattr(module, "DEVICE", None) == "cuda"


# Files of a few long tests each (subprocesses that compile a model: 20-60 s a test on the CI machine's cores),
# run first: collected last, they were the run's tail, one worker busy with them while the other had finished.
LONG_FIRST = {"test_examples.py", "test_multi_gpu.py"}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: the order within each group kept
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False on this machine)")
    skip_multi = pytest.mark.skip(reason=f"needs two CUDA GPUs, this machine has {gpus}")
    for item in items:
        if runs_on_device(getattr(item, "module", None)):
            item.add_marker(pytest.mark.on_device)
        if "gpu" in item.keywords and not gpus:
            item.add_marker(skip)
        elif "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def no_compile_caches():
    """Inductor's FX graph cache and AOTAutograd's cache off for the test: where a test patches something neither
    cache keys on (a config, a rule, the code), a graph compiled earlier would be loaded instead of traced. By the
    config modules' own patch: monkeypatch's undo deletes a setting of theirs on torch 2.13 (it is then missing
    for every later test of the process)."""
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


# Cached blocks a worker keeps between GPU tests under xdist: above this it hands them back after each test, so that a
# big_gpu test taking the GPU next finds the memory free (a model-shape test had kept 17 GB, session 42).
KEEP_CACHED = 1 << 30


@pytest.fixture(autouse=True)
def _one_big_gpu_test_at_a_time(request, tmp_path_factory):
    """Tests marked big_gpu hold tens of GB of real-model weights: under pytest-xdist, workers sharing one GPU would
    run out of memory together (8 workers: 22 of them failed so, session 15). A big_gpu test holds the GPU alone,
    every other test shares it (gpu_lock.py, over files in the run's shared temporary directory), and each hands
    its cached blocks back to the driver before letting go, so that the next big test finds the memory free.
    Without xdist nothing runs beside a test: a big one only hands its memory back."""
    if not torch.cuda.is_available():
        yield
        return
    big = "big_gpu" in request.node.keywords
    xdist = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    if xdist:
        from gpu_lock import gpu_share

        root = tmp_path_factory.getbasetemp().parent  # each worker's basetemp is popen-gwN under the run's directory
    with gpu_share(root, exclusive=big) if xdist else contextlib.nullcontext():
        try:
            yield
        finally:
            if big or xdist:
                _release_a_failure_s_tensors()
            if big or (xdist and torch.cuda.memory_reserved() > KEEP_CACHED):
                _hand_back_memory()


def _hand_back_memory():
    import gc

    gc.collect()  # tensors in reference cycles too
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _release_a_failure_s_tensors():
    """pytest keeps a failed test's exception in sys.last_value / last_traceback (for post-mortem debugging), and
    with it the frames of the test, whose locals hold its GPU tensors: tens of GB in a big_gpu test. pytest drops
    them when the worker's next test starts its call, but a next big_gpu test first waits here for the lock, still
    holding them, and the big test running meanwhile ran out of memory: one failure became four with -n 4
    (session 24). By teardown the report has been written, so the frames' locals can go."""
    import gc
    import sys
    import traceback

    if not any(hasattr(sys, name) for name in ("last_type", "last_value", "last_traceback", "last_exc")):
        return  # no failure kept (the common case: no gc pass per test)
    for name in ("last_value", "last_exc"):
        exc = getattr(sys, name, None)
        if exc is not None and exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    gc.collect()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
