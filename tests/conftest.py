import os

import pytest
import torch

# The suite's tiny shapes are in no tuned table: autotuning each on first use would add minutes of tuning to
# the GPU run (should the default be on). The autotune tests (tests/tune/test_first_use.py) switch it on.
os.environ.setdefault("MOE_COMPILER_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
