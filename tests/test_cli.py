"""The bnfold command, through Click's CliRunner and through a real subprocess."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import assert_same, count_bn

from bnfold.cli import cli
from models import resnet_bottleneck

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(resnet_bottleneck(), str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fold_default_output_and_report(model_path):
    before = digest(model_path)
    result = invoke("fold", model_path)
    assert result.exit_code == 0, result.output
    out = model_path.with_name("net_folded.onnx")
    assert out.exists() and digest(model_path) == before
    assert "BatchNorm" in result.output and "folded (7)" in result.output
    folded = onnx.load(str(out))
    assert count_bn(folded) == 0
    assert_same(onnx.load(str(model_path)), folded, dims={"N": 2})
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["net.onnx", "net_folded.onnx"]  # no temp files


def test_fold_is_byte_deterministic(model_path, tmp_path):
    assert invoke("fold", model_path, "-o", tmp_path / "a.onnx").exit_code == 0
    assert invoke("fold", model_path, "-o", tmp_path / "b.onnx").exit_code == 0
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")


def test_fold_json(model_path, tmp_path):
    result = invoke("fold", model_path, "-o", tmp_path / "o.onnx", "--json")
    doc = json.loads(result.output)
    assert doc["before"]["batchnorms"] == 7 and doc["after"]["batchnorms"] == 0
    assert len(doc["folded"]) == 7 and doc["left"] == [] and doc["output"].endswith("o.onnx")


def test_fold_dry_run_writes_nothing(model_path):
    result = invoke("fold", model_path, "--dry-run", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["dry_run"] is True
    assert not model_path.with_name("net_folded.onnx").exists()


def test_fold_json_lists_left_alone_with_reasons(tmp_path):
    result = invoke("fold", DEMO, "-o", tmp_path / "d.onnx", "--json")
    doc = json.loads(result.output)
    assert {item["reason"] for item in doc["left"]} == {"concat_branch", "shared_producer_output"}
    assert all(item["message"] for item in doc["left"])


@pytest.mark.parametrize("case", ["missing", "not_onnx", "truncated", "same_output"])
def test_bad_input_exits_2_with_one_line(case, model_path, tmp_path):
    out = ["-o", tmp_path / "out.onnx"]
    if case == "missing":
        target = tmp_path / "nope.onnx"
    elif case == "not_onnx":
        target = tmp_path / "text.onnx"
        target.write_text("hello, this is not a model\n")
    elif case == "truncated":
        target = tmp_path / "cut.onnx"
        target.write_bytes(model_path.read_bytes()[:5000])
    else:
        target, out = model_path, ["-o", model_path]
    before = target.read_bytes() if target.exists() else None
    result = invoke("fold", target, *out)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()
    assert (target.read_bytes() if target.exists() else None) == before


def test_usage_error_exits_2():
    assert invoke("fold").exit_code == 2
    assert invoke("nonsense").exit_code == 2


def test_subprocess_console_script_and_module(model_path):
    for cmd in ([sys.executable, "-m", "bnfold"], [str(Path(sys.executable).with_name("bnfold"))]):
        if not Path(cmd[0]).exists():
            continue
        done = subprocess.run(cmd + ["fold", str(model_path), "--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["after"]["batchnorms"] == 0
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(model_path.with_name("x.onnx"))], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_fold_does_not_import_onnxruntime(model_path):
    code = (
        "import sys; from bnfold.cli import main; sys.argv=['bnfold','fold',sys.argv[1],'--dry-run'];\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'onnxruntime' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_internal_error_exits_3(model_path, monkeypatch):
    import bnfold.cli as cli_module

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_module, "fold_file", boom)
    result = CliRunner().invoke(cli, ["fold", str(model_path)])
    assert result.exit_code == 3 and "internal error in bnfold" in result.output


def test_output_folder_missing_is_a_user_error(model_path, tmp_path):
    result = invoke("fold", model_path, "-o", tmp_path / "no" / "such" / "out.onnx")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_help_does_not_import_onnxruntime():
    code = (
        "import sys; from bnfold.cli import main\n"
        "try:\n    main(['fold', '--help'])\nexcept SystemExit:\n    pass\nassert 'onnxruntime' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_command_as_a_subprocess(model_path, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True)

    out = tmp_path / "sub.onnx"
    assert run("fold", model_path, "-o", out, "--quiet").returncode == 0
    verified = run(
        "verify",
        model_path,
        out,
        "--json",
        "--graph-optimization",
        "basic",
        "--allow-tf32",
        "--samples",
        "2",
        "--seed",
        "3",
        "--dim",
        "N=2",
        "--per-layer",
    )
    doc = json.loads(verified.stdout)
    assert verified.returncode == 0 and doc["graph_optimization"] == "basic" and doc["tf32"] is None
    assert doc["samples"] == 2 and doc["seed"] == 3 and len(doc["layers"]) == 7
    inspected = run("inspect", model_path, "--json")
    assert inspected.returncode == 0 and len(json.loads(inspected.stdout)["batchnorms"]) == 7
    batch = run("fold", model_path, out, "-o", tmp_path / "many", "--jobs", "2", "--json")
    assert batch.returncode == 0 and json.loads(batch.stdout)["failed"] == 0
    assert run("--version").stdout.startswith("bnfold, version")
