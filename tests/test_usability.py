"""inspect, batch folding, quiet/JSON output, version and help: through CliRunner and a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import count_bn

import bnfold
from bnfold.cli import cli
from models import densenet_preact, mlp_bn1d, resnet_bottleneck

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_inspect_text_and_json_match_fold_decisions(tmp_path):
    text = invoke("inspect", DEMO)
    assert text.exit_code == 0 and "BatchNormalization: 8, foldable 6" in text.output
    doc = json.loads(invoke("inspect", DEMO, "--json").output)
    assert doc["ir_version"] and doc["opsets"] and doc["bytes"] == DEMO.stat().st_size
    bns = doc["batchnorms"]
    assert len(bns) == 8 and all({"name", "foldable", "reason"} <= set(b) for b in bns)
    left = {b["name"]: b["reason"] for b in bns if not b["foldable"]}
    folded = json.loads(invoke("fold", DEMO, "--dry-run", "--json").output)
    assert left == {item["name"]: item["reason"] for item in folded["left"]}
    concat_bn = next(b for b in bns if b["reason"] == "concat_branch")
    assert concat_bn["producer"] == "Concat" and concat_bn["consumers"] == ["Relu"]
    assert not any(tmp_path.iterdir())


def test_inspect_api_accepts_a_proto():
    report = bnfold.inspect(densenet_preact())
    assert report.path is None and [b.foldable for b in report.batchnorms] == [False] * 4


@pytest.fixture
def batch(tmp_path):
    paths = []
    for name, make in (("resnet", resnet_bottleneck), ("mlp", mlp_bn1d), ("dense", densenet_preact)):
        p = tmp_path / f"{name}.onnx"
        onnx.save(make(), str(p))
        paths.append(p)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    return paths, broken


@pytest.mark.parametrize("jobs", [1, 2])
def test_batch_with_one_broken_file(batch, tmp_path, jobs):
    good, broken = batch
    out = tmp_path / "out"
    result = invoke("fold", *good[:2], broken, good[2], "-o", out, "--jobs", jobs)
    assert result.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["dense.onnx", "mlp.onnx", "resnet.onnx"]
    assert "3 of 4 model(s) folded" in result.output and "broken.onnx" in result.output
    assert count_bn(onnx.load(str(out / "resnet.onnx"))) == 0


def test_batch_json_and_verify(batch, tmp_path):
    good, _ = batch
    result = invoke("fold", *good, "-o", tmp_path / "o", "--json", "--verify", "--dim", "N=2", "--dim", "batch=2")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["failed"] == 0 and [m["ok"] for m in doc["models"]] == [True] * 3
    assert all(m["verify"]["passed"] for m in doc["models"])


def test_batch_needs_an_output_folder(batch):
    good, _ = batch
    result = invoke("fold", *good)
    assert result.exit_code == 2 and "-o FOLDER" in result.output


def test_single_model_into_existing_folder(batch, tmp_path):
    good, _ = batch
    folder = tmp_path / "dest"
    folder.mkdir()
    assert invoke("fold", good[0], "-o", folder).exit_code == 0
    assert (folder / "resnet.onnx").exists()


def test_quiet(batch, tmp_path):
    good, _ = batch
    result = invoke("fold", good[0], "-o", tmp_path / "q.onnx", "--quiet")
    assert result.exit_code == 0 and result.output == ""
    result = invoke("verify", good[0], tmp_path / "q.onnx", "--quiet", "--dim", "N=2")
    assert result.exit_code == 0 and result.output == ""


def test_no_colour_codes_in_pipes(batch, tmp_path):
    good, _ = batch
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnfold",
            "fold",
            str(good[0]),
            "-o",
            str(tmp_path / "c.onnx"),
            "--verify",
            "--dim",
            "N=2",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "\x1b[" not in done.stdout and done.stderr == ""


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and bnfold.__version__ in result.output


@pytest.mark.parametrize("command", [[], ["fold"], ["verify"], ["inspect"]], ids=["main", "fold", "verify", "inspect"])
def test_help_reads_well(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    text = result.output
    assert "Usage:" in text and len(text.splitlines()) < 80
    if command == ["fold"]:
        for option in (
            "--output",
            "--dry-run",
            "--jobs",
            "--json",
            "--quiet",
            "--verify",
            "--providers",
            "--per-layer",
            "--lower-standalone",
            "--external-data",
            "Exit codes",
        ):
            assert option in text
    if command == []:
        assert all(c in text for c in ("fold", "verify", "inspect"))


def test_progress_bar_only_on_a_terminal_and_after_a_delay(monkeypatch):
    import io

    from bnfold import cli as cli_module

    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(cli_module.sys, "stderr", terminal)
    slow = cli_module._Progress(3, "verifying", delay=0.0)
    with slow:
        slow.update(1)
        slow.update(1)
    assert slow.bar is not None and "verifying" in terminal.getvalue()
    quick = cli_module._Progress(3, "verifying", delay=60.0)
    with quick:
        quick.update(3)
    assert quick.bar is None
    pipe = io.StringIO()
    monkeypatch.setattr(cli_module.sys, "stderr", pipe)
    piped = cli_module._Progress(3, "verifying", delay=0.0)
    with piped:
        piped.update(3)
    assert piped.bar is None and pipe.getvalue() == ""
