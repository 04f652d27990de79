"""Every Python example of the README runs as written, as a plain script in a folder of models."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("k", range(len(BLOCKS)), ids=lambda k: f"block{k + 1}")
def test_a_readme_example_runs_as_a_plain_script(tmp_path, k):
    for name in ("model.onnx", "big.onnx", "a.onnx", "b.onnx"):
        shutil.copy(ROOT / "models" / "demo.onnx", tmp_path / name)
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[k])
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
