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


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False on this machine)")
    skip_multi = pytest.mark.skip(reason=f"needs two CUDA GPUs, this machine has {gpus}")
    for item in items:
        if "gpu" in item.keywords and not gpus:
            item.add_marker(skip)
        elif "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
