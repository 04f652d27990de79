"""The command line as an adopter meets it: versions, a broken environment, completion, batches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import bnfold.runtime as runtime
from bnfold.cli import cli
from models import resnet_bottleneck

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version


@pytest.fixture
def both_runtimes(monkeypatch):
    fake = [FakeDist("onnxruntime", "1.32.0"), FakeDist("onnxruntime_gpu", "1.32.0"), FakeDist("numpy", "2.0")]
    monkeypatch.setattr(runtime.metadata, "distributions", lambda: iter(fake))


def test_both_runtimes_are_detected(both_runtimes, tmp_path):
    problem = runtime.conflict()
    assert problem and "onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0" in problem and "pip uninstall" in problem
    assert "\n" not in problem
    version = CliRunner().invoke(cli, ["--version"])
    assert version.exit_code == 0 and "installed together" in version.stderr
    for args in (
        ["verify", str(DEMO), str(DEMO)],
        ["verify", str(DEMO), str(DEMO), "--providers", "cuda"],
        ["fold", str(DEMO), "-o", str(tmp_path / "o.onnx"), "--verify"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "installed together" in result.output and "Fix:" in result.output, args
    assert not (tmp_path / "o.onnx").exists()


def test_one_runtime_is_no_conflict(monkeypatch):
    monkeypatch.setattr(runtime.metadata, "distributions", lambda: iter([FakeDist("onnxruntime-gpu", "1.20.0")]))
    assert runtime.conflict() is None


def test_version_names_what_bnfold_runs_on():
    out = CliRunner().invoke(cli, ["--version"]).output
    import onnx as onnx_module

    assert out.startswith("bnfold, version") and f"onnx {onnx_module.__version__}" in out
    assert "numpy" in out and "onnxruntime" in out and "CPUExecutionProvider" in out


def test_missing_onnxruntime_writes_nothing(monkeypatch, tmp_path):
    from bnfold import BnfoldError
    from bnfold.verification import sessions

    def absent():
        raise BnfoldError("onnxruntime is not installed: pip install 'bnfold[cpu]'")

    monkeypatch.setattr(sessions, "ort", absent)
    result = CliRunner().invoke(cli, ["fold", str(DEMO), "-o", str(tmp_path / "o.onnx"), "--verify"])
    assert result.exit_code == 2 and "not installed" in result.output
    assert list(tmp_path.iterdir()) == []


def test_completion_offers_providers_without_importing_onnx():
    env = dict(
        os.environ, COMP_WORDS="bnfold verify --providers cpu,c", COMP_CWORD="3", _BNFOLD_COMPLETE="bash_complete"
    )
    code = "import sys; from bnfold.cli import main\ntry:\n    main(prog_name='bnfold')\nfinally:\n    print('onnx' in sys.modules, file=sys.stderr)"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    assert "cpu,cuda" in done.stdout and done.stderr.strip().endswith("False"), (done.stdout, done.stderr)
    assert elapsed < 5


def _models(tmp_path, names):
    paths = []
    for n in names:
        p = tmp_path / n
        onnx.save(resnet_bottleneck(), str(p))
        paths.append(p)
    return paths


def test_batch_summary_counts_folded_verified_and_failed(tmp_path, monkeypatch):
    import bnfold.api as api

    real = api.fold_file

    def corrupt(model, output, *args, **kw):  # the second model's fold comes out wrong
        report = real(model, output, *args, **kw)
        if "second" in str(model):
            m = onnx.load(str(output))
            w = next(t for t in m.graph.initializer if len(t.dims) == 4)
            w.raw_data = bytes(len(w.raw_data))
            onnx.save(m, str(output))
        return report

    monkeypatch.setattr(api, "fold_file", corrupt)
    long_name = "a_model_with_a_name_much_longer_than_thirty_characters.onnx"
    paths = _models(tmp_path, ["first.onnx", "second.onnx", long_name])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["fold", *map(str, paths), "-o", str(out), "--verify", "--remove-failed"])
    assert result.exit_code == 1, result.output
    assert "3 of 3 model(s) folded, 2 verified, 1 failed verification" in result.output
    assert "verification failed (output removed)" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([long_name, "first.onnx"])
    rows = [line for line in result.output.splitlines() if line.startswith(long_name)]
    assert rows and rows[0].split()[1:4] == ["7", "0", "7"]  # the columns stay aligned to the name
    kept = CliRunner().invoke(cli, ["fold", *map(str, paths[:2]), "-o", str(tmp_path / "kept"), "--verify"])
    assert kept.exit_code == 1 and (tmp_path / "kept" / "second.onnx").exists()


def test_a_broken_input_is_named_once(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00garbage")
    good = _models(tmp_path, ["good.onnx"])[0]
    result = CliRunner().invoke(cli, ["fold", str(good), str(bad), "-o", str(tmp_path / "out")])
    errors = [line for line in result.stderr.splitlines() if "broken.onnx" in line]
    assert len(errors) == 1 and errors[0].count("broken.onnx") == 1


def test_progress_bar_names_the_model(monkeypatch):
    import io

    import bnfold.cli as cli_module

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(cli_module.sys, "stderr", term)
    bar = cli_module._Progress(2, "folding", delay=0.0)
    with bar:
        bar.update(1, "resnet.onnx")
        bar.update(1, "mobilenet.onnx")
    assert "resnet.onnx" in term.getvalue() or "mobilenet.onnx" in term.getvalue()


def test_api_takes_providers_as_a_string_or_a_list(tmp_path):
    import bnfold

    folded = tmp_path / "f.onnx"
    bnfold.fold_file(DEMO, folded)
    assert bnfold.verify(DEMO, folded, providers="cpu").providers == ["CPUExecutionProvider"]
    assert bnfold.verify(DEMO, folded, providers=["cpu"], samples=1).samples == 1
    with pytest.raises(bnfold.BnfoldError, match="unknown provider 'gpu'"):
        bnfold.verify(DEMO, folded, providers="cpu,gpu")
