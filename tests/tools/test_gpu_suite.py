"""tools/gpu_suite.py's summary: which tests passed, failed or have no result, read from a streamed pytest -v log."""

import importlib.util
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(ROOT, "tools", "gpu_suite.py"))
gpu_suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_suite)

SPACED = "tests/a.py::test_x[bfloat16-0.02-(9, 40, 24, 5, 2)-silu-concat-n]"  # a parametrized id with spaces
IDS = [SPACED, "tests/a.py::test_y[1]", "tests/b.py::test_z", "tests/b.py::test_w[(1, 2)]"]
LOG = "".join(line + "\n" for line in [
    f"[gw3] [ 25%] PASSED {SPACED} ",  # xdist's lines end in a space
    "tests/a.py::test_y[1] FAILED                          [ 50%]",
    "[gw0] [ 75%] SKIPPED tests/b.py::test_z ",
    "=========================== short test summary info ============================",
    "FAILED tests/a.py::test_y[1] - AssertionError: d_hidden 3.1e-02 > 2.0e-02",
])


def test_summary_reads_spaced_ids_and_lists_those_without_a_result(tmp_path):
    log = tmp_path / "gpu_part.txt"
    log.write_text(LOG)
    text = gpu_suite.summary(str(log), IDS)
    assert text.splitlines()[0] == "4 tests: 1 passed, 1 failed, 1 skipped, 1 without a result"
    assert "FAILED tests/a.py::test_y[1]" in text
    assert (tmp_path / "gpu_part_left.txt").read_text() == "tests/b.py::test_w[(1, 2)]\n"


def test_a_module_running_its_kernels_on_the_gpu_is_part_of_a_gpu_run():
    spec = importlib.util.spec_from_file_location("suite_conftest", os.path.join(ROOT, "tests", "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    on_gpu, on_cpu, plain = (type("module", (), {"DEVICE": d}) for d in ("cuda", "cpu", None))
    assert conftest.runs_on_device(on_gpu) and not conftest.runs_on_device(on_cpu)
    assert not conftest.runs_on_device(plain) and not conftest.runs_on_device(None)
