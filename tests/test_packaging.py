"""What an install from a wheel gets: every package of the source tree, the tuned tables and csrc/'s C++ sources
(the CUTLASS path builds them on first use), found where lowering/cutlass.py looks for them."""

import os
import sys
import zipfile

import pytest

from moe_compiler.lowering import cutlass

ROOT = os.path.join(os.path.dirname(__file__), "..")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _setuptools():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_the_package_list_names_every_package_of_the_source_tree():
    listed = set(_setuptools()["packages"])
    tree = os.walk(os.path.join(ROOT, "moe_compiler"))
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in tree if "__init__.py" in files}
    assert listed == found | {"moe_compiler._csrc"}, "pyproject.toml's [tool.setuptools] packages: add the new one"


@pytest.mark.slow
def test_the_wheel_carries_the_sources_and_the_build_finds_them(tmp_path):
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), ROOT], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith((".cpp", ".cu", ".cuh", ".h"))}
    assert {f"moe_compiler/_csrc/{f}" for f in sources} <= names
    assert any(n.startswith("moe_compiler/lowering/configs/") and n.endswith(".json") for n in names)
    # the source checkout's csrc/ comes first; installed from the wheel, cutlass.CSRC is its _csrc
    assert os.path.samefile(cutlass.CSRC, os.path.join(ROOT, "csrc"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from moe_compiler.lowering import cutlass; "
             "print(cutlass.CSRC)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")], check=True, capture_output=True,
                         text=True, cwd=tmp_path).stdout.strip()
    assert os.path.samefile(out, tmp_path / "site" / "moe_compiler" / "_csrc")
