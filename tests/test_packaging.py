"""The sdist can run its own tests; the wheel carries the package, its types and its license."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    code = (
        "import sys; from setuptools import build_meta as b; "
        "out = sys.argv[1]; s = b.build_sdist(out); w = b.build_wheel(out); print('BUILT', s, w)"
    )
    pytest.importorskip("setuptools")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    sdist, wheel = next(line for line in done.stdout.splitlines() if line.startswith("BUILT")).split()[1:]
    return out / sdist, out / wheel


def test_sdist_runs_its_own_tests(dists):
    names = {n.split("/", 1)[1] for n in tarfile.open(dists[0]).getnames() if "/" in n}
    for needed in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "models/demo.onnx",
        "tests/conftest.py",
        "tests/models.py",
        "scripts/make_demo_models.py",
        "scripts/bench.py",
        "bnfold/py.typed",
        "bnfold/fold/plan.py",
        "bnfold/io/wire.py",
    ):
        assert needed in names, needed
    assert not any("__pycache__" in n for n in names)


def test_wheel_contents_and_metadata(dists):
    with zipfile.ZipFile(dists[1]) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "bnfold/py.typed" in names and "bnfold/verification/compare.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    assert "License-Expression: Apache-2.0" in meta and "Classifier: Typing :: Typed" in meta
    from bnfold import __version__

    assert f"Version: {__version__}" in meta
    assert "Provides-Extra: cpu" in meta and "Provides-Extra: gpu" in meta


def test_unpacked_sdist_runs_its_tests(dists, tmp_path):
    with tarfile.open(dists[0]) as tar:
        tar.extractall(tmp_path, filter="data") if sys.version_info >= (3, 12) else tar.extractall(tmp_path)
    root = next(tmp_path.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_batchnorm.py"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert (
        str(root)
        in subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import bnfold; print(bnfold.__file__)"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout
    )
