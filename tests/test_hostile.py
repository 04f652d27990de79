"""Hostile and malformed models, built here: each is refused with exit 2 and one line (nothing
written, the input unchanged), or folded into a model that means the same. Never exit 3."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import assert_same, check_fold, feeds_for, run_ort
from onnx import helper, numpy_helper

import bnfold
from bnfold import BnfoldError
from bnfold.cli import cli
from bnfold.io import save as io_save
from models import Builder, resnet_bottleneck

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


def invoke(*args) -> CliRunner.invoke:
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refused(result, *words: str) -> str:
    """Exit 2, one line on stderr naming the problem, no traceback. Returns the line."""
    err = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == 2, result.output
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def conv_bn(elem_weights=None) -> onnx.ModelProto:
    b = Builder(seed=1)
    x = b.input("x", [1, 3, 8, 8])
    return b.model(b.relu(b.bn(b.conv(x, 3, 8, 3, bias=False), 8)))


# -- external data that leaves the model's folder -------------------------------------------------


def external_model(folder: Path, location: str, offset: int = 0, length=None) -> Path:
    """A Conv+BN model whose Conv weight is external data at ``location``."""
    model = conv_bn()
    w = next(t for t in model.graph.initializer if t.name.startswith("w"))
    data = numpy_helper.to_array(w).tobytes()
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (
        ("location", location),
        ("offset", str(offset)),
        ("length", str(len(data) if length is None else length)),
    ):
        e = w.external_data.add()
        e.key, e.value = k, v
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path, data


@pytest.fixture
def secret(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    s = outside / "secret.bin"
    s.write_bytes(b"S3CRET" * 200)
    return s


def _escape(kind: str, tmp_path: Path, secret: Path) -> Path:
    folder = tmp_path / "model"
    if kind == "absolute":
        return external_model(folder, str(secret))[0]
    if kind == "dotdot":
        return external_model(folder, "../outside/secret.bin")[0]
    if kind == "nested-dotdot":
        return external_model(folder, "sub/../../outside/secret.bin")[0]
    path, _data = external_model(folder, "link.bin")
    if kind == "symlink":
        (folder / "link.bin").symlink_to(secret)
    elif kind == "hardlink":
        os.link(secret, folder / "link.bin")
    elif kind == "folder":
        (folder / "link.bin").mkdir()
    elif kind == "fifo":
        os.mkfifo(folder / "link.bin")
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("absolute", ["absolute"]),
        ("dotdot", ["climbs out"]),
        ("nested-dotdot", ["climbs out"]),
        ("symlink", ["leads out"]),
        ("hardlink", ["hard links"]),
        ("folder", ["is a folder"]),
        ("fifo", ["not a regular file"]),
        ("missing", ["missing"]),
    ],
)
@pytest.mark.parametrize("command", ["fold", "inspect", "verify"])
def test_external_data_never_leaves_the_folder(tmp_path, secret, kind, words, command):
    path = _escape(kind, tmp_path, secret)
    before_model, before_dir = digest(path), files(path.parent)
    if command == "fold":
        result = invoke("fold", path, "--verify", "--per-layer")
    elif command == "inspect":
        result = invoke("inspect", path)
    else:
        result = invoke("verify", path, path, "--per-layer")
    refused(result, *words)
    assert digest(path) == before_model and files(path.parent) == before_dir  # nothing written
    assert files(secret.parent) == ["secret.bin"]
    assert b"S3CRET" not in result.output.encode()


@pytest.mark.parametrize(
    "offset, length, words",
    [
        (0, 10**9, ["disagrees"]),
        (10**9, None, ["too short"]),
        (-4, None, ["negative"]),
        ("x", None, ["not an integer"]),
    ],
    ids=["length", "offset-past-end", "negative", "not-a-number"],
)
def test_external_ranges_must_lie_in_the_file(tmp_path, offset, length, words):
    path, data = external_model(tmp_path / "m", "w.bin", offset, length)
    (path.parent / "w.bin").write_bytes(data)
    before = files(path.parent)
    refused(invoke("fold", path), *words)
    assert files(path.parent) == before


def test_per_layer_creates_nothing_outside_its_temporary_folder(tmp_path, monkeypatch):
    """A location naming a sub-folder is legal; verification links data under names of its own."""
    path, data = external_model(tmp_path / "m", "sub/w.bin")
    (path.parent / "sub").mkdir()
    (path.parent / "sub" / "w.bin").write_bytes(data)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    result = invoke("fold", path, "--verify", "--per-layer")
    assert result.exit_code == 0, result.output
    assert files(tmp) == []  # the temporary folder is gone, and nothing else was made


# -- malformed graphs ------------------------------------------------------------------------------


def _graph(nodes, inits, inputs=None, outputs=("y",), opset=17) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 4, 4])]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", inputs, outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _bn_params(c=4, prefix="") -> list:
    rng = np.random.default_rng(0)
    return [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), prefix + "g"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), prefix + "b"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), prefix + "m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), prefix + "v"),
    ]


def _conv_bn(
    weight: np.ndarray, conv_inputs=("x", "w"), bn_inputs=("c", "g", "b", "m", "v"), bn_outputs=("y",), **attrs
):
    nodes = [
        helper.make_node("Conv", list(conv_inputs), ["c"], name="conv", **attrs),
        helper.make_node("BatchNormalization", list(bn_inputs), list(bn_outputs), name="bn"),
    ]
    return _graph(nodes, [numpy_helper.from_array(weight, "w"), *_bn_params()])


def _tensor_model(mutate) -> onnx.ModelProto:
    model = _conv_bn(np.ones((4, 4, 1, 1), np.float32))
    mutate(next(t for t in model.graph.initializer if t.name == "w"))
    return model


def _gemm_bn(c_shape) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["x2", "B", "C"], ["c"], name="gemm"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    inits = [
        numpy_helper.from_array(np.ones((3, 4), np.float32), "B"),
        numpy_helper.from_array(np.ones(c_shape, np.float32), "C"),
    ]
    return _graph(nodes, inits + _bn_params(), inputs=[helper.make_tensor_value_info("x2", 1, [2, 3])])


def _backward_group() -> onnx.ModelProto:
    """BN on a graph input, then a Conv with group=2 and 3 output channels (3 % 2 != 0)."""
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Conv", ["n", "w"], ["y"], name="conv", group=2),
    ]
    return _graph(nodes, [numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w"), *_bn_params()])


MALFORMED = {
    "conv-weight-rank-1": lambda: _conv_bn(np.ones(4, np.float32)),
    "conv-weight-rank-0": lambda: _conv_bn(np.ones((), np.float32)),
    "conv-group-0": lambda: _conv_bn(np.ones((4, 4, 1, 1), np.float32), group=0),
    "convtranspose-group-0": lambda: _graph(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=0),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        ],
        [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w"), *_bn_params()],
    ),
    "backward-group-mismatch": _backward_group,
    "bn-3-inputs": lambda: _conv_bn(np.ones((4, 4, 1, 1), np.float32), bn_inputs=("c", "g", "b")),
    "bn-no-output": lambda: _conv_bn(np.ones((4, 4, 1, 1), np.float32), bn_outputs=()),
    "conv-no-weight": lambda: _conv_bn(np.ones((4, 4, 1, 1), np.float32), conv_inputs=("x",)),
    "conv-bias-wrong-shape": lambda: _conv_bn(np.ones((4, 4, 1, 1), np.float32), conv_inputs=("x", "w", "g2")),
    "data-type-999": lambda: _tensor_model(lambda t: setattr(t, "data_type", 999)),
    "data-type-undefined": lambda: _tensor_model(lambda t: setattr(t, "data_type", 0)),
    "dims-disagree-with-raw-data": lambda: _tensor_model(lambda t: t.dims.__setitem__(0, 5)),
    "negative-dim": lambda: _tensor_model(lambda t: t.dims.__setitem__(0, -4)),
    "gemm-c-cannot-broadcast": lambda: _gemm_bn((2, 3)),
    "bn-params-of-two-lengths": lambda: _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v5"], ["y"]),
        ],
        [
            numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w"),
            *_bn_params(),
            numpy_helper.from_array(np.ones(5, np.float32), "v5"),
        ],
    ),
    "cast-weight-without-to": lambda: _graph(
        [
            helper.make_node("Cast", ["w64"], ["w"]),  # no "to": the weight cannot be computed
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        ],
        [numpy_helper.from_array(np.ones((4, 4, 1, 1)), "w64"), *_bn_params()],
    ),
    "concat-weight-without-axis": lambda: _graph(
        [
            helper.make_node("Concat", ["w0", "w1"], ["w"]),  # no axis: numpy would flatten
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        ],
        [numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), f"w{k}") for k in range(2)] + _bn_params(),
    ),
    "integer-bn-params": lambda: _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "gi", "b", "m", "v"], ["y"]),
        ],
        [
            numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w"),
            *_bn_params(),
            numpy_helper.from_array(np.ones(4, np.int64), "gi"),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_graphs_are_refused_or_left_alone(tmp_path, name):
    model = MALFORMED[name]()
    if name == "conv-bias-wrong-shape":
        model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "g2"))
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    before = digest(path)
    out = tmp_path / "out.onnx"
    result = invoke("fold", path, "-o", out, "--json")
    assert digest(path) == before
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        refused(result)
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    report = bnfold.fold(model)[1]
    assert report.left and not report.folded, report.render_text()
    allowed = {"invalid_node", "channel_mismatch", "no_producer", "producer_weight_not_constant"}
    assert {x.reason for x in report.left} <= allowed, report.left
    assert "invalid_node" in {x.reason for x in report.left} or name in (
        "bn-params-of-two-lengths",
        "cast-weight-without-to",
        "concat-weight-without-axis",
    )
    folded = onnx.load(str(out))
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]  # untouched


@pytest.mark.parametrize("where", ["main", "body"])
def test_an_initializer_defined_twice_is_refused(tmp_path, where):
    """Two initializers of one name: onnxruntime takes one of them (which one has differed between
    its code paths), so no fold can know what it rewrites. A body may reuse an outer name."""
    model = _conv_bn(np.ones((4, 4, 1, 1), np.float32))
    twice = numpy_helper.from_array(np.full((4, 4, 1, 1), 2.0, np.float32), "w")
    if where == "main":
        model.graph.initializer.append(twice)
    else:
        body = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["o"])], "body", [], [helper.make_tensor_value_info("o", 1, None)]
        )
        body.initializer.extend([twice, twice])
        cond = numpy_helper.from_array(np.array(True), "cond")
        model.graph.initializer.append(cond)
        model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=body, else_branch=body))
        model.graph.output.append(helper.make_tensor_value_info("z", 1, None))
    path = tmp_path / "twice.onnx"
    path.write_bytes(model.SerializeToString())
    for command in ("fold", "inspect"):
        refused(
            invoke(command, path, "-o", tmp_path / "o.onnx") if command == "fold" else invoke(command, path),
            "'w'",
            "twice",
        )
    assert files(tmp_path) == ["twice.onnx"]


def test_a_layer_reading_its_weight_twice_keeps_the_other_read():
    """Gemm(W, W): B is scaled by the fold, A must keep W's values (a new initializer, not W changed
    in place)."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gemm", ["W", "W"], ["c"], name="gemm", transB=1),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Add", ["n", "x2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"), *_bn_params()]
    model = _graph(nodes, inits, inputs=[helper.make_tensor_value_info("x2", 1, [4, 4])])
    folded, report = check_fold(model, full_check=False)  # _graph declares outputs without a shape
    assert [f.name for f in report.folded] == ["bn"]
    gemm = next(n for n in folded.graph.node if n.op_type == "Gemm")
    assert gemm.input[0] == "W" and gemm.input[1] != "W"


@pytest.mark.parametrize("after", [False, True], ids=["backward", "backward_and_forward"])
def test_a_bn_of_the_layers_own_weight_folds_without_changing_it(after):
    """BN(W) -> Gemm(., W) (-> BN): folded backward, the Gemm reads W itself as its input, so the
    scaled weight must be a new initializer, not W changed in place (it was: the BN, which also read
    W, was removed before the weight was written)."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("BatchNormalization", ["W", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Gemm", ["n", "W"], ["y" if not after else "c"], name="gemm"),
    ]
    if after:
        nodes.append(helper.make_node("BatchNormalization", ["c", "pg", "pb", "pm", "pv"], ["y"], name="bn2"))
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"), *_bn_params()]
    model = _graph(nodes, inits + _bn_params(prefix="p"), inputs=[])
    folded, report = check_fold(model, full_check=False)
    assert sorted(f.direction for f in report.folded) == (["backward", "forward"] if after else ["backward"])
    (gemm,) = folded.graph.node
    assert gemm.input[0] == "W" and gemm.input[1] != "W"


def test_a_constant_subgraph_that_would_be_huge_is_not_evaluated(tmp_path):
    a = numpy_helper.from_array(np.ones((50000, 1), np.float32), "a")
    b = numpy_helper.from_array(np.ones((1, 50000), np.float32), "b2")
    nodes = [
        helper.make_node("Add", ["a", "b2"], ["big"]),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "big", "b", "m", "v"], ["y"]),
    ]
    model = _graph(nodes, [a, b, numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w"), *_bn_params()])
    start = time.monotonic()
    _, report = bnfold.fold(model)
    assert time.monotonic() - start < 5
    (left,) = report.left
    assert left.reason == "non_constant_parameter"  # the reason says which, and why
    assert "scale 'big' is computed from constants, but through a result of 2,500,000,000 elements" in left.message


@pytest.mark.parametrize("through", ["Expand", "Expand+Reshape", "runtime"])
def test_a_weight_over_the_evaluation_budget_is_named_as_such(through):
    """A Conv weight computed from constants through a result over the budget (16,777,216 elements)
    is not evaluated, and the BN's reason says so; one computed from an input is at run time."""
    nodes = [helper.make_node("Expand", ["w0", "shape"], ["wide"])]  # (4, 4, 1, 1) -> (4, 4, 2048, 2048)
    inits = [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w0")]
    inits.append(numpy_helper.from_array(np.array([4, 4, 2048, 2048], np.int64), "shape"))
    weight = "wide"
    if through == "Expand+Reshape":
        nodes.append(helper.make_node("Reshape", ["wide", "same"], ["w"]))
        inits.append(numpy_helper.from_array(np.array([4, 4, 2048, 2048], np.int64), "same"))
        weight = "w"
    elif through == "runtime":
        nodes = [helper.make_node("Mul", ["w0", "k"], ["w"])]
        weight = "w"
    nodes += [
        helper.make_node("Conv", ["x", weight], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 4, 4])]
    inputs += [helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [1])] if through == "runtime" else []
    (left,) = bnfold.fold(_graph(nodes, inits + _bn_params(), inputs=inputs))[1].left
    assert left.reason == "producer_weight_not_constant"
    if through == "runtime":
        assert left.message.endswith(f"weight '{weight}' of Conv 'conv' is computed at run time")
    else:
        assert f"weight '{weight}' of Conv 'conv' is computed from constants, but through a result of" in left.message
        assert "67,108,864 elements, over the 16,777,216 that bnfold evaluates" in left.message


# -- files that are not models ---------------------------------------------------------------------


def test_a_large_file_of_zeros_is_refused_quickly(tmp_path, monkeypatch):
    from bnfold.io import load as io_load

    monkeypatch.setattr(io_load, "SCAN_BYTES", 0)  # the scan, the path large files take
    path = tmp_path / "zeros.onnx"
    with open(path, "wb") as f:
        f.truncate(100 << 20)
    start = time.monotonic()
    refused(invoke("fold", path), "not a readable ONNX model")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("where", ["model", "inputs"])
def test_a_fifo_is_refused_without_blocking(tmp_path, where):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    if where == "model":
        refused(invoke("fold", fifo), "not a regular file")
    else:
        model = tmp_path / "m.onnx"
        onnx.save(conv_bn(), str(model))
        refused(invoke("verify", model, model, "--inputs", fifo), "not a regular file")


@pytest.mark.parametrize("command", ["fold", "inspect", "verify original", "verify candidate"])
def test_a_folder_given_as_the_model_is_one_line(tmp_path, command):
    folder = tmp_path / "looks_like.onnx"
    folder.mkdir()
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(model))
    args = {
        "fold": ["fold", folder],
        "inspect": ["inspect", folder],
        "verify original": ["verify", folder, model],
        "verify candidate": ["verify", model, folder],
    }[command]
    refused(invoke(*args), "is a folder")
    assert files(tmp_path) == ["looks_like.onnx", "m.onnx"] and not any(folder.iterdir())


def test_a_folder_among_the_models_of_a_batch_is_that_models_error(tmp_path):
    folder = tmp_path / "looks_like.onnx"
    folder.mkdir()
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(model))
    result = invoke("fold", folder, model, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is a folder" in result.output and files(tmp_path / "out") == ["m.onnx"]


def test_invalid_utf8_in_a_name_the_fold_writes_is_a_bad_model(tmp_path):
    buf = conv_bn().SerializeToString().replace(b"bn0", b"\xffn0")  # the BN's output name
    path = tmp_path / "utf.onnx"
    path.write_bytes(buf)
    refused(invoke("fold", path), "UTF-8")
    assert files(tmp_path) == ["utf.onnx"]


def test_invalid_utf8_in_a_node_name_is_carried_over(tmp_path):
    model = conv_bn()
    path = tmp_path / "utf.onnx"
    path.write_bytes(model.SerializeToString().replace(b"conv0", b"\xffonv0"))
    result = invoke("fold", path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0 and "\\xffonv0" in result.output  # shown escaped
    assert_same(model, onnx.load(str(tmp_path / "o.onnx")))


def test_mutations_of_the_demo_never_crash(tmp_path):
    """A seeded fuzz: single and few-byte mutations of models/demo.onnx give exit 0 or 2, never 3."""
    data = DEMO.read_bytes()
    rng = random.Random(1234)
    seen = set()
    for k in range(300):
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4])):
            b[rng.randrange(len(b))] = rng.randrange(256)
        path = tmp_path / "m.onnx"
        path.write_bytes(bytes(b))
        result = invoke("fold", path, "-o", tmp_path / "o.onnx", "-q")
        seen.add(result.exit_code)
        assert result.exit_code in (0, 2), (k, result.output)
        assert "Traceback" not in result.output, (k, result.output)
    assert seen == {0, 2}


# -- verification that cannot be talked into passing ---------------------------------------------


@pytest.fixture
def pair(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(resnet_bottleneck(), str(model))
    out = tmp_path / "f.onnx"
    assert invoke("fold", model, "-o", out, "-q").exit_code == 0
    return model, out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--providers", ""], ["no provider"]),
        (["--providers", ","], ["no provider"]),
        (["--rtol", "nan"], ["finite"]),
        (["--atol", "inf"], ["finite"]),
        (["--rtol", "-1"], [">= 0"]),
        (["--dim", "N=0"], ["at least 1"]),
        (["--dim", f"N={2**40}"], ["MiB", "--max-input-bytes"]),
        (["--input-shape", "input=1,3,16"], ["rank"]),
        (["--dim", "batch=2"], ["not a dynamic dimension"]),
    ],
    ids=["empty-providers", "comma", "rtol-nan", "atol-inf", "negative", "dim-0", "dim-huge", "shape-rank", "dim-name"],
)
def test_verify_refuses_what_would_compare_nothing(pair, args, words):
    refused(invoke("verify", *pair, *args), *words)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"input": np.zeros((1, 3, 16, 16), np.float64)}, ["float64"]),
        ({"input": np.zeros((1, 3, 16), np.float32)}, ["rank"]),
        ({"input": np.zeros((1, 4, 16, 16), np.float32)}, ["shape"]),
        ({"other": np.zeros((1, 3, 16, 16), np.float32)}, ["lacks"]),
    ],
    ids=["dtype", "rank", "shape", "name"],
)
def test_verify_inputs_must_fit_the_model(pair, tmp_path, arrays, words):
    refused(invoke("verify", *pair, "--inputs", _npz(tmp_path / "in.npz", **arrays)), *words)


def test_a_compressed_npz_bomb_is_refused_from_its_header(pair, tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("input.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 16, 3, 64, 64)}
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(1 << 20)
            for _ in range(64):
                f.write(chunk)
    assert path.stat().st_size < 1 << 20
    refused(invoke("verify", *pair, "--inputs", path), "--max-input-bytes")


def test_verify_refuses_an_inconsistent_graph_before_onnxruntime_sees_it(pair, tmp_path):
    """A ConvTranspose whose weight has rank 1: onnxruntime 1.20 to 1.26 crash loading it (a
    segmentation fault), later releases refuse it. verify refuses it first, with any of them."""
    model, _ = pair
    bad = onnx.load(str(model))
    conv = next(n for n in bad.graph.node if n.op_type == "Conv")
    conv.op_type = "ConvTranspose"
    conv.input[1] = next(t.name for t in bad.graph.initializer if len(t.dims) == 1)
    path = tmp_path / "bad.onnx"
    onnx.save(bad, str(path))
    for args in ([path, model], [model, path]):
        which = "original" if args[0] == path else "candidate"
        refused(invoke("verify", *args), f"the {which} is not a consistent graph", "ConvTranspose")


def test_a_wrong_candidate_fails_with_exit_1_not_2(pair, tmp_path):
    model, out = pair
    bad = onnx.load(str(out))
    w = next(t for t in bad.graph.initializer if len(t.dims) == 4)
    arr = numpy_helper.to_array(w).copy()
    arr[0] *= 14
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    assert invoke("verify", model, tmp_path / "bad.onnx").exit_code == 1


# -- saves that cannot half-happen ----------------------------------------------------------------


def _external_pair(tmp_path) -> Path:
    model = resnet_bottleneck()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


def _loads_and_means(path: Path, reference: onnx.ModelProto) -> None:
    model = onnx.load(str(path))
    assert_same(reference, model, tol=1e-5, dims={"N": 2})


@pytest.mark.parametrize("fail_at", [1, 2], ids=["data-rename", "model-rename"])
def test_a_save_killed_between_its_renames_leaves_the_old_pair(tmp_path, monkeypatch, fail_at):
    path = _external_pair(tmp_path)
    out = tmp_path / "out.onnx"
    assert invoke("fold", path, "-o", out, "-q").exit_code == 0  # the old pair at out
    old = onnx.load(str(out))
    before = files(tmp_path)
    calls = []
    real = os.replace

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io_save.os, "replace", dying_replace)
    with pytest.raises(BnfoldError, match=r"out.onnx: not written \(No space left on device\)"):
        bnfold.fold_file(path, out, lower_standalone=True)
    assert files(tmp_path) == before  # no temporary file, no half pair
    _loads_and_means(out, old)


def test_a_save_completed_replaces_the_pair(tmp_path):
    path = _external_pair(tmp_path)
    out = tmp_path / "out.onnx"
    for _ in range(3):  # the data file alternates between two names; the old one is removed
        assert invoke("fold", path, "-o", out, "-q").exit_code == 0
        _loads_and_means(out, onnx.load(str(path)))
        assert len([f for f in files(tmp_path) if f.startswith("out.onnx")]) == 2


def test_in_place_returns_what_it_wrote(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(resnet_bottleneck(), str(path))
    original = onnx.load(str(path))
    folded, _ = bnfold.fold(path, path, in_place=True)
    on_disk = onnx.load(str(path))
    feeds = feeds_for(original, 0, {"N": 2})
    for a, b in zip(run_ort(folded, feeds).values(), run_ort(on_disk, feeds).values(), strict=False):
        np.testing.assert_array_equal(a, b)
    assert_same(original, folded, dims={"N": 2})


def test_in_place_with_external_data_keeps_a_loadable_pair(tmp_path):
    path = _external_pair(tmp_path)
    original = onnx.load(str(path))
    assert invoke("fold", path, "--in-place", "-q").exit_code == 0
    _loads_and_means(path, original)


def test_sigterm_removes_temporary_files(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(resnet_bottleneck(), str(src))
    code = (
        "import time, sys\nimport bnfold.io.save as s\n"
        "s.os.fsync = lambda fd: time.sleep(60)\n"
        "from bnfold.cli import main\nsys.argv = ['bnfold', 'fold', sys.argv[1], '-o', sys.argv[2]]\nmain()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(src), str(tmp_path / "o.onnx")],
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    deadline = time.monotonic() + 30
    while not any(f.endswith(".tmp") for f in files(tmp_path)):
        assert time.monotonic() < deadline and proc.poll() is None, (
            proc.stderr.read() if proc.poll() is not None else ""
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert files(tmp_path) == ["m.onnx"]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch):
    import bnfold.cli as cli_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "fold_file", interrupted)
    result = invoke("fold", DEMO, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 130 and "Interrupted" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["fold", "verify"])
def test_a_closed_output_pipe_exits_141_without_a_traceback(tmp_path, command):
    """`bnfold ... | head`: the reader is gone before bnfold writes (here, from the start)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    args = [DEMO, "-o", tmp_path / "o.onnx"] if command == "fold" else [DEMO, DEMO]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bnfold", command, *map(str, args)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    if command == "fold":
        assert onnx.load(str(tmp_path / "o.onnx")).graph.node  # written before the report was printed


# -- batch mode -------------------------------------------------------------------------------------


def test_a_bad_file_in_a_batch_is_that_files_error(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(resnet_bottleneck(), str(good))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = invoke("fold", good, bad, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert (tmp_path / "out" / "good.onnx").exists() and not (tmp_path / "out" / "bad.onnx").exists()
    errors = [line for line in result.stderr.splitlines() if line]
    assert len(errors) == 1 and "bad.onnx" in errors[0] and "Traceback" not in result.output


def test_o_naming_a_file_in_batch_mode_is_a_usage_error(tmp_path):
    taken = tmp_path / "file"
    taken.write_text("x")
    refused(invoke("fold", DEMO, DEMO, "-o", taken), "folder")
    assert taken.read_text() == "x"


DYING_WORKER = """
import os
import bnfold.api as api

real = api._fold_one


def fold_or_die(model, *args):
    if "victim" in model:
        os._exit(9)  # as the OOM killer would
    return real(model, *args)


api._fold_one = fold_or_die
"""


def test_a_dead_worker_is_that_models_failure(tmp_path, monkeypatch):
    """Workers are spawned: a sitecustomize on their path makes the one folding 'victim' die."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DYING_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    models = []
    for name in ("a", "victim", "b", "c", "d"):
        p = tmp_path / f"{name}.onnx"
        onnx.save(resnet_bottleneck(), str(p))
        models.append(p)
    result = invoke("fold", *models, "-o", tmp_path / "out", "--jobs", "2")
    assert result.exit_code == 2, result.output
    assert files(tmp_path / "out") == ["a.onnx", "b.onnx", "c.onnx", "d.onnx"]
    errors = [line for line in result.stderr.splitlines() if line]
    assert len(errors) == 1 and "victim" in errors[0] and "died" in errors[0]
    assert "BrokenProcessPool" not in result.output


SLOW_SAVE = """
import time
import bnfold.io.save as s

s.os.fsync = lambda fd: time.sleep(60)
"""


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_batch_stops_its_workers_and_leaves_no_temporary_file(tmp_path, how):
    """Workers stuck in a save (fsync never returns): Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it) or SIGTERM to bnfold stops them all, removes their temporary files, one line."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SAVE)
    models = []
    for name in ("a", "b", "c"):
        p = tmp_path / f"{name}.onnx"
        onnx.save(resnet_bottleneck(), str(p))
        models.append(str(p))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnfold", "fold", *models, "-o", str(out), "--jobs", "2"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while sum(f.endswith(".tmp") for f in (files(out) if out.exists() else [])) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if how == "ctrl-c" else 143), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert files(out) == []
    deadline = time.monotonic() + 10
    while True:  # every worker is gone with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a worker outlived the batch"
        time.sleep(0.05)


def test_api_errors_are_bnfold_errors(tmp_path):
    with pytest.raises(BnfoldError):
        bnfold.fold(tmp_path / "missing.onnx")
    with pytest.raises(BnfoldError):
        bnfold.verify(DEMO, DEMO, providers=[])
