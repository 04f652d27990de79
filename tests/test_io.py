"""Large models with external data, and files bnfold cannot read."""

import hashlib
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import assert_same, count_bn, feeds_for, rel_error

import bnfold
from bnfold.cli import cli
from bnfold.io import load as io_load
from bnfold.io import save as io_save
from bnfold.io import tensors as io_tensors
from models import resnet_bottleneck


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_path(path: Path, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.fixture(autouse=True)
def scan_every_file(monkeypatch):
    """Files this small are parsed whole; here every file goes through the wire-format scan, the
    path large models take."""
    monkeypatch.setattr(io_load, "SCAN_BYTES", 0)


@pytest.fixture
def external_model(tmp_path):
    model = resnet_bottleneck()
    path = tmp_path / "src" / "net.onnx"
    path.parent.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save rewrites the model it is given to point at the data file
    onnx.save(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path, model


def test_external_model_folds_with_external_output(external_model, tmp_path):
    path, model = external_model
    data = path.with_name("weights.bin")
    before = (digest(path), digest(data))
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = invoke("fold", path, "-o", out)
    assert result.exit_code == 0, result.output
    assert (digest(path), digest(data)) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    folded = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in folded.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"folded.onnx.data"} and count_bn(folded) == 0
    feeds = feeds_for(model, 0, {"N": 2})
    assert rel_error(run_path(path, feeds), run_path(out, feeds)) <= 1e-5
    onnx.checker.check_model(str(out), full_check=True)


def test_unchanged_external_tensors_are_never_loaded(external_model, tmp_path, monkeypatch):
    path, model = external_model
    loaded = []
    real = io_tensors.Source.read

    def spy(self, tensor):
        loaded.append(tensor.name)
        return real(self, tensor)

    monkeypatch.setattr(io_tensors.Source, "read", spy)
    bnfold.fold(path, tmp_path / "o.onnx")
    gemm_weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    assert loaded and not gemm_weights & set(loaded)  # the classifier has no BN: its weight is streamed


def test_no_external_data_and_forced_external(external_model, tmp_path):
    path, model = external_model
    inline = tmp_path / "inline.onnx"
    assert invoke("fold", path, "-o", inline, "--no-external-data").exit_code == 0
    assert not inline.with_name("inline.onnx.data").exists()
    folded = onnx.load(str(inline))
    assert_same(model, folded, dims={"N": 2})
    forced = tmp_path / "forced.onnx"
    assert invoke("fold", inline, "-o", forced, "--external-data").exit_code == 0
    assert forced.with_name("forced.onnx.data").stat().st_size > 0
    assert_same(model, onnx.load(str(forced)), dims={"N": 2})


@pytest.mark.parametrize("target", ["input", "input_data", "data_clash"])
def test_refuses_to_overwrite_input_or_its_data(external_model, target):
    path, _ = external_model
    data = path.with_name("weights.bin")
    if target == "data_clash":  # an output whose own data file would be the input's data file
        path2 = path.with_name("m.onnx")
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "o.onnx.data"
        data.rename(path.with_name("o.onnx.data"))
        onnx.save(model, str(path2))
        path, data, out = path2, path.with_name("o.onnx.data"), path.with_name("o.onnx")
    else:
        out = path if target == "input" else data
    before = digest(data)
    result = invoke("fold", path, "-o", out)
    assert result.exit_code == 2 and "overwrite" in result.output
    assert digest(data) == before


def test_in_place(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(resnet_bottleneck(), str(path))
    mode = path.stat().st_mode & 0o777
    assert invoke("fold", path, "--in-place").exit_code == 0
    assert path.stat().st_mode & 0o777 == mode  # written like any new file, not 0600
    assert count_bn(onnx.load(str(path))) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_missing_external_data_file(external_model, tmp_path):
    path, _ = external_model
    path.with_name("weights.bin").unlink()
    result = invoke("fold", path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "external data file" in result.output and "missing" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "o.onnx").exists()


def test_opset_newer_than_onnx(tmp_path):
    model = resnet_bottleneck()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    result = invoke("fold", path)
    assert result.exit_code == 2 and "newer than the installed onnx" in result.output


def test_over_2gb_inline_is_refused_without_external(monkeypatch, tmp_path):
    monkeypatch.setattr(io_save, "TWO_GB", 1000)  # pretend: the small model is "over 2 GB"
    path = tmp_path / "m.onnx"
    onnx.save(resnet_bottleneck(), str(path))
    assert invoke("fold", path, "-o", tmp_path / "a.onnx").exit_code == 0
    assert (tmp_path / "a.onnx.data").exists()  # chosen automatically
    result = invoke("fold", path, "-o", tmp_path / "b.onnx", "--no-external-data")
    assert result.exit_code == 2 and not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_file_and_in_memory_folds_agree(tmp_path, external):
    """Folding from a file (weights left in the file, computed at write time, spliced on save) gives
    the same model as folding the in-memory proto."""
    model = resnet_bottleneck()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "o.onnx"
    bnfold.fold_file(path, out, external_data=external)
    from_file = onnx.load(str(out))
    in_memory, _ = bnfold.fold(model)
    returned, _ = bnfold.fold(path)
    for m in (from_file, in_memory, returned):  # onnx.load marks loaded external data DEFAULT explicitly
        for t in m.graph.initializer:
            t.ClearField("data_location")
    assert from_file.graph == in_memory.graph
    assert returned.graph == in_memory.graph  # the API's model stands on its own
    assert not any(t.external_data for t in returned.graph.initializer)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_copies_without_kernel_copy_give_the_same_files(external_model, tmp_path, monkeypatch, external):
    path, _ = external_model
    bnfold.fold_file(path, tmp_path / "kernel.onnx", external_data=external)

    def unavailable(*args):
        raise OSError(38, "copy_file_range not available")

    monkeypatch.setattr(io_tensors.os, "copy_file_range", unavailable, raising=False)
    bnfold.fold_file(path, tmp_path / "python.onnx", external_data=external)
    assert (tmp_path / "kernel.onnx").read_bytes() == (tmp_path / "python.onnx").read_bytes().replace(
        b"python.onnx", b"kernel.onnx"
    )
    if external:
        assert digest(tmp_path / "kernel.onnx.data") == digest(tmp_path / "python.onnx.data")
