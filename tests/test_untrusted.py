"""Hostile graphs and hostile environments, built here: a fold that would change meaning stays with a
reason, a graph that is not a graph is refused, and every path a user names is read and written
safely. Each case: the exit code, one line, no traceback, nothing written (or an output equivalent
to the input under onnxruntime), the input unchanged."""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import check_fold
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from test_hostile import digest, files, invoke, refused

import bnfold
from models import Builder, calibrate, resnet_bottleneck

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


# -- Concat splits: only along every branch's channel axis ------------------------------------------

K, C_IN = 3, 2  # every branch writes a (K,) * rank value, so that a Concat along any axis is valid
BRANCHES = {  # kind -> the ranks it writes
    "gemm": (2,),
    "matmul": (2, 3, 4, 5),
    "conv": (3, 4, 5),
    "conv_transpose": (3, 4, 5),
    "transposed": (2, 3, 4, 5),  # a MatMul whose output goes through a Transpose first
}
CHANNELS_ON_AXIS_1 = {"gemm", "conv", "conv_transpose"}  # a MatMul's are on its last axis


def _branch(b: Builder, kind: str, rank: int) -> str:
    x = b.input(b.name("x"), [K, C_IN] + [K] * (rank - 2) if kind.startswith("conv") else [K] * (rank - 1) + [C_IN])
    if kind == "gemm":
        return b.gemm(x, C_IN, K)
    if kind == "conv":
        return b.conv(x, C_IN, K, k=1, dims=rank - 2)
    if kind == "conv_transpose":
        return b.conv_transpose(x, C_IN, K, k=1, stride=1, dims=rank - 2)
    y = b.op("MatMul", [x, b.const(b.randn(C_IN, K), "w")])
    if kind == "transposed":
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        y = b.op("Transpose", [y], perm=perm)
    return y


def concat_then_bn(kinds: list[str], rank: int, axis: int) -> onnx.ModelProto:
    b = Builder(seed=31)
    joined = b.op("Concat", [_branch(b, kind, rank) for kind in kinds], axis=axis)
    channels = K * len(kinds) if axis % rank == 1 else K
    return calibrate(b.model(b.relu(b.bn(joined, channels))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_concat_split_folds_only_along_every_branch_channel_axis(data):
    """Concat of two or three branches of any kind, rank 2 to 5, along any axis (negative ones too),
    then BN (which normalizes axis 1): predicted to fold exactly when the Concat joins axis 1 and
    every branch writes its channels there; each fold is checked against onnxruntime, and a BN that
    stays says which branch and why."""
    rank = data.draw(st.integers(2, 5), label="rank")
    kinds = [k for k, ranks in BRANCHES.items() if rank in ranks]
    if data.draw(st.booleans(), label="aimed at a fold"):  # half the cases: the forms that fold, and near them
        kinds = [k for k in kinds if k in CHANNELS_ON_AXIS_1 or (k == "matmul" and rank == 2)] or kinds
    kinds = data.draw(st.lists(st.sampled_from(kinds), min_size=2, max_size=3), label="kinds")
    axis = data.draw(st.sampled_from([1, 1 - rank]) | st.integers(-rank, rank - 1), label="axis")
    folds = axis % rank == 1 and all(k in CHANNELS_ON_AXIS_1 or (k == "matmul" and rank == 2) for k in kinds)
    _, report = check_fold(concat_then_bn(kinds, rank, axis), left=0 if folds else 1)
    for left in report.left:
        assert left.reason == "concat_branch", left
        assert "branch " in left.message, left


@pytest.mark.parametrize(
    "kinds, rank, axis",
    [
        (["matmul", "matmul"], 3, 1),  # the token axis of two rank-3 MatMuls
        (["matmul", "matmul"], 3, -2),
        (["conv", "matmul"], 3, 1),  # a Conv1d beside a MatMul
        (["conv", "conv"], 4, 2),  # a spatial axis
        (["gemm", "gemm"], 2, 0),  # the batch axis
    ],
    ids=["matmul3_axis1", "matmul3_axis-2", "conv1d_matmul3", "conv_spatial", "gemm_batch"],
)
def test_concat_splits_that_would_change_meaning_keep_the_bn(kinds, rank, axis):
    _, report = check_fold(concat_then_bn(kinds, rank, axis), left=1)
    (left,) = report.left
    assert left.reason == "concat_branch" and "the BN normalizes axis 1" in left.message, left


# -- Graphs are checked as graphs before anything is decided ------------------------------------------

F = onnx.TensorProto.FLOAT


def _graph_model(nodes, inputs, outputs, inits, ir_version=10, functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], functions=list(functions))
    model.ir_version = ir_version
    return model


def _conv_bn_nodes(scale_name="scale"):
    """Conv -> BN -> Relu with the BN's parameters named plainly, calibrated."""
    b = Builder(seed=5)
    x = b.input("x", [1, 3, 6, 6])
    y = b.relu(b.bn(b.conv(x, 3, 4, 3), 4))
    model = calibrate(b.model(y))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    old = bn.input[1]
    for t in model.graph.initializer:
        if t.name == old:
            t.name = scale_name
    bn.input[1] = scale_name
    return model


def _with_constant(model: onnx.ModelProto, name: str, value: np.ndarray, first: bool = True) -> onnx.ModelProto:
    node = helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value))
    if first:
        model.graph.node.insert(0, node)
    else:
        model.graph.node.append(node)
    return model


def _cyclic() -> onnx.ModelProto:
    """The Conv reads the BN's output through an Add: x + relu(bn(conv(...)))."""
    model = _conv_bn_nodes()
    g = model.graph
    conv = next(n for n in g.node if n.op_type == "Conv")
    conv.input[0] = "looped"
    g.node.append(helper.make_node("Add", ["x", g.output[0].name], ["looped"]))
    return model


def _undefined() -> onnx.ModelProto:
    model = _conv_bn_nodes()
    next(n for n in model.graph.node if n.op_type == "Relu").input[0] = "nowhere"
    return model


def _input_twice() -> onnx.ModelProto:
    model = _conv_bn_nodes()
    model.graph.input.append(model.graph.input[0])
    return model


def _body(shadow_output: bool) -> onnx.ModelProto:
    """An If whose then-branch is Conv -> BN on an outer value; the branch's Conv writes a name the
    main graph also defines (shadow_output), or the branch only reads outer values."""
    inner = _conv_bn_nodes()
    g = inner.graph
    out = g.output[0].name
    conv_out = next(n for n in g.node if n.op_type == "Conv").output[0]
    then = helper.make_graph(list(g.node), "then", [], [helper.make_tensor_value_info(out, F, None)])
    other = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["other"])], "else", [], [helper.make_tensor_value_info("other", F, None)]
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    if shadow_output:
        nodes.insert(0, helper.make_node("Neg", ["x"], [conv_out]))
    inputs = [g.input[0], helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])]
    outputs = [helper.make_tensor_value_info("y", F, None)]
    if shadow_output:
        outputs.append(helper.make_tensor_value_info(conv_out, F, None))
    return _graph_model(nodes, inputs, outputs, list(g.initializer))


NOT_GRAPHS = {
    # A name defined twice: onnxruntime warns and keeps the later value, the fold took the other.
    "initializer_and_constant": (
        lambda: _with_constant(_conv_bn_nodes(), "scale", np.full(4, 2.0, np.float32)),
        "main graph: value 'scale' is defined twice (an initializer, output of Constant '')",
    ),
    "constant_after_use": (
        lambda: _with_constant(_conv_bn_nodes(), "scale", np.full(4, 2.0, np.float32), first=False),
        "value 'scale' is defined twice",
    ),
    "cycle": (_cyclic, "main graph: the nodes form a cycle ("),
    "undefined": (_undefined, "main graph: value 'nowhere' is read by a node but defined nowhere"),
    "input_twice": (_input_twice, "main graph: value 'x' is listed twice among the graph inputs"),
    "body_redefines_outer_value": (
        lambda: _body(shadow_output=True),
        "main graph > If 'y' body 1: value 'conv0' is defined twice (output of Conv 'conv0', a value of the enclosing graph)",
    ),
}


@pytest.mark.parametrize("case", list(NOT_GRAPHS))
def test_a_graph_that_is_not_a_graph_is_refused(tmp_path, case):
    make, words = NOT_GRAPHS[case]
    path = tmp_path / "m.onnx"
    onnx.save(make(), str(path))
    before = digest(path)
    for args in (("fold", path), ("fold", path, "--dry-run"), ("inspect", path)):
        line = refused(invoke(*args), words)
        assert line.startswith("Error: main graph"), line
    assert files(tmp_path) == ["m.onnx"] and digest(path) == before


def test_the_cycle_is_named_in_the_direction_values_flow(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_cyclic(), str(path))
    line = refused(invoke("fold", path))
    loop = line.split("cycle (")[1].rstrip(")").split(" -> ")
    assert loop[0] == loop[-1] and "looped" in loop and len(loop) == 5, line  # Conv, BN, Relu, Add


def test_a_function_that_is_not_a_graph_is_refused():
    fn = helper.make_function(
        "local",
        "f",
        ["a"],
        ["b"],
        [helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Neg", ["a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    model = _graph_model(
        [helper.make_node("f", ["x"], ["y"], domain="local")],
        [helper.make_tensor_value_info("x", F, [2])],
        [helper.make_tensor_value_info("y", F, [2])],
        [],
        functions=[fn],
    )
    model.opset_import.append(helper.make_opsetid("local", 1))
    with pytest.raises(bnfold.BnfoldError, match=r"^function 'f': value 'b' is defined twice"):
        bnfold.fold(model)


def test_what_onnx_scoping_allows_still_folds():
    """A body that reads outer values and defines its own; the IR 3 form (every initializer also
    listed as an input); an IR 10 initializer that is also an input (an overridable default)."""
    check_fold(_body(shadow_output=False), dims={}, full_check=False, left=0)
    ir3 = _conv_bn_nodes()
    ir3.ir_version = 3
    ir3.opset_import[0].version = 8
    ir3.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in ir3.graph.initializer)
    check_fold(ir3)
    model = _conv_bn_nodes()
    model.graph.input.append(helper.make_tensor_value_info("scale", F, [4]))
    _, report = check_fold(model, left=1)
    assert report.left[0].reason == "overridable_initializer"


def test_a_graph_whose_nodes_are_out_of_order_folds_and_keeps_its_order():
    """Acyclic but listed backwards (onnxruntime sorts it itself): folded; the nodes that stay keep
    the order they were given in."""
    model = _conv_bn_nodes()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    folded, _ = check_fold(model, full_check=False)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]


# -- .npz files given to --inputs: one reader, the directory checked before anything is read --------


@pytest.fixture
def demo_pair(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(DEMO.read_bytes())
    out = tmp_path / "f.onnx"
    assert invoke("fold", model, "-o", out, "-q").exit_code == 0
    return model, out


def _npz_bytes(arrays, compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, array in arrays.items():
            with z.open(name, "w") as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=True)
    return buf.getvalue()


def _patched(data: bytes, signature: bytes, offset: int, value: bytes) -> bytes:
    """``data`` with ``value`` written at ``offset`` into every header that starts with ``signature``
    (local headers PK\\3\\4, central directory entries PK\\1\\2)."""
    out, start = bytearray(data), 0
    while (at := out.find(signature, start)) >= 0:
        out[at + offset : at + offset + len(value)] = value
        start = at + 4
    return bytes(out)


def _demo_inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)


def _good() -> bytes:
    return _npz_bytes({"image.npy": _demo_inputs()})


NPZ_CASES = {
    "npy_then_zip": (lambda: _npy(_demo_inputs()) + _good(), ["not an .npz file"]),
    "member_without_npy": (lambda: _npz_bytes({"image": _demo_inputs()}), ["member 'image' is not a .npy array"]),
    "member_twice": (lambda: _twice(), ["member 'image.npy' appears twice"]),
    "encrypted": (
        lambda: _patched(_patched(_good(), b"PK\x03\x04", 6, b"\x01\x00"), b"PK\x01\x02", 8, b"\x01\x00"),
        ["member 'image.npy' is encrypted"],
    ),
    "unknown_compression": (
        lambda: _patched(_patched(_good(), b"PK\x03\x04", 8, b"\x63\x00"), b"PK\x01\x02", 10, b"\x63\x00"),
        ["member 'image.npy' uses compression method 99"],
    ),
    "corrupt_deflate": (lambda: _corrupt_deflate(), ["member 'image.npy': cannot read"]),
    "pickled_objects": (
        lambda: _npz_bytes({"image.npy": np.array([object()] * 3, dtype=object)}),
        ["member 'image.npy': cannot read", "Python objects"],
    ),
    "huge_member_declared": (lambda: _declared(3 << 30, "X.npy"), ["3,072 MiB, over the 1,024 MiB allowed"]),
    "huge_member_unnamed": (lambda: _declared(3 << 30, "X"), ["member 'X' is not a .npy array"]),
    "header_larger_than_member": (
        lambda: _npz_bytes({"image.npy": _demo_inputs()[..., :16]}).replace(b"(1, 3, 32, 16)", b"(1, 3, 32, 32)"),
        ["member 'image.npy': cannot read", "its header claims 12288 bytes of data"],
    ),
}


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _twice() -> bytes:
    buf = io.BytesIO()
    with pytest.warns(UserWarning), zipfile.ZipFile(buf, "w") as z:
        for _ in range(2):
            z.writestr("image.npy", _npy(_demo_inputs()))
    return buf.getvalue()


def _corrupt_deflate() -> bytes:
    data = bytearray(
        _npz_bytes({"image.npy": np.arange(4096, dtype=np.float32).reshape(1, 4, 32, 32)[:, :3]}, zipfile.ZIP_DEFLATED)
    )
    middle = data.find(b"PK\x03\x04") + 30 + len("image.npy") + 200
    data[middle : middle + 16] = bytes(range(16))
    return bytes(data)


def _declared(size: int, name: str) -> bytes:
    """A small stored member whose directory entry declares ``size`` bytes (a zip bomb's directory)."""
    data = _npz_bytes({name: _demo_inputs()})
    return _patched(data, b"PK\x01\x02", 24, size.to_bytes(4, "little"))


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_a_malformed_npz_is_refused_naming_the_file_and_member(demo_pair, tmp_path, case):
    make, words = NPZ_CASES[case]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(make())
    model, out = demo_pair
    before = files(tmp_path)
    line = refused(invoke("verify", model, out, "--inputs", bad), *words)
    assert str(bad) in line
    assert files(tmp_path) == before


def test_the_reader_takes_what_numpy_writes(demo_pair, tmp_path):
    model, out = demo_pair
    good = tmp_path / "good.npz"
    np.savez_compressed(good, image=np.stack([_demo_inputs()] * 2))  # a leading axis of samples
    result = invoke("verify", model, out, "--inputs", good)
    assert result.exit_code == 0 and "2 sample(s)" in result.output, result.output


# -- --save-inputs / --save-outputs: written like models ---------------------------------------------


def _odd_names_model() -> onnx.ModelProto:
    """Graph inputs named as numpy.savez's own parameters, and a TensorFlow-style name."""
    b = Builder(seed=9)
    x = b.input("file", [1, 3, 6, 6])
    y = b.bn(b.conv(x, 3, 4, 3), 4)
    y = b.op("Add", [y, b.input("allow_pickle", [1, 4, 6, 6])])
    y = b.op("Mul", [y, b.input("serving/x:0", [1, 4, 6, 6])])
    return calibrate(b.model(b.relu(y)))


def test_every_array_is_saved_under_its_graph_name(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_odd_names_model(), str(model))
    out = tmp_path / "f.onnx"
    saved_in, saved_out = tmp_path / "in.npz", tmp_path / "out.npz"
    result = invoke("fold", model, "-o", out, "--verify", "--save-inputs", saved_in, "--save-outputs", saved_out)
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(saved_in) as z:
        assert sorted(z.namelist()) == ["allow_pickle.npy", "file.npy", "serving/x:0.npy"]
    with np.load(saved_out) as data:
        assert sorted(data.files) == ["cpu/relu0", "reference/relu0"]
    again = invoke("verify", model, out, "--inputs", saved_in)  # read back: the same samples
    assert again.exit_code == 0 and "3 sample(s)" in again.output, again.output


def _external(path: Path, model: onnx.ModelProto) -> None:
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def _link(tmp_path: Path, to: Path) -> Path:
    link = tmp_path / "link.npz"
    link.symlink_to(to)
    return link


SAVE_REFUSALS = {
    "the_original": (lambda t, m, c: m, "is an input model or one of its data files"),
    "the_candidate": (lambda t, m, c: c, "is an input model or one of its data files"),
    "the_candidates_data": (lambda t, m, c: c.with_name(c.name + ".data"), "is an input model or one of its data"),
    "a_link_to_the_original": (lambda t, m, c: _link(t, m), "is an input model or one of its data files"),
    "a_folder": (lambda t, m, c: t, "is a folder"),
    "a_fifo": (lambda t, m, c: _fifo(t), "exists and is not a regular file"),
    "a_missing_folder": (lambda t, m, c: t / "no" / "s.npz", "does not exist"),
}


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.npz"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("flag", ["--save-inputs", "--save-outputs"])
@pytest.mark.parametrize("case", list(SAVE_REFUSALS))
def test_a_save_path_that_would_destroy_something_is_refused_before_the_run(tmp_path, case, flag):
    model, candidate = tmp_path / "m.onnx", tmp_path / "c.onnx"
    onnx.save(onnx.load(str(DEMO)), str(model))
    _external(candidate, bnfold.fold(str(model))[0])
    where, words = SAVE_REFUSALS[case]
    target = where(tmp_path, model, candidate)
    before = {p.name: (digest(p) if p.is_file() and not p.is_symlink() else None) for p in tmp_path.iterdir()}
    refused(invoke("verify", model, candidate, flag, target), words)
    assert {p.name: (digest(p) if p.is_file() and not p.is_symlink() else None) for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("target", ["input", "output", "output_data"])
def test_fold_verify_refuses_a_save_path_over_its_models_before_writing(tmp_path, target):
    model = tmp_path / "m.onnx"
    model.write_bytes(DEMO.read_bytes())
    out = tmp_path / "f.onnx"
    path = {"input": model, "output": out, "output_data": tmp_path / "f.onnx.data"}[target]
    refused(invoke("fold", model, "-o", out, "--verify", "--save-inputs", path), "is an input model")
    assert files(tmp_path) == ["m.onnx"] and digest(model) == digest(DEMO)


def test_both_saves_to_one_file_are_refused(demo_pair, tmp_path):
    model, out = demo_pair
    same = tmp_path / "s.npz"
    refused(invoke("verify", model, out, "--save-inputs", same, "--save-outputs", same), "the same file")
    assert not same.exists()


def test_a_link_is_replaced_never_written_through(demo_pair, tmp_path):
    model, out = demo_pair
    elsewhere = tmp_path / "kept.txt"
    elsewhere.write_text("keep me")
    link = _link(tmp_path, elsewhere)
    assert invoke("verify", model, out, "--save-inputs", link).exit_code == 0
    assert elsewhere.read_text() == "keep me"
    assert not link.is_symlink() and zipfile.is_zipfile(link)


# -- A bad environment: one line, exit 2, nothing half-written, the input untouched ------------------


def test_an_output_name_too_long_is_refused(demo_pair, tmp_path):
    model, _ = demo_pair
    before = files(tmp_path)
    refused(invoke("fold", model, "-o", tmp_path / ("x" * 300 + ".onnx")), "File name too long")
    refused(invoke("verify", model, model.with_name("f.onnx"), "--save-inputs", tmp_path / ("x" * 300)), "too long")
    assert files(tmp_path) == before


def _in_small_tmpfs(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a 400 KiB tmpfs mounted at tmp_path/disk, in a mount namespace of
    its own (no privilege needed where user namespaces are allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("no user or mount namespaces here to make a small filesystem in")
    body = f"mount -t tmpfs -o size=400k tmpfs {disk} && cd {disk} && {script}"
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", body],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A real full disk (ENOSPC): the input fits, its folded copy does not."""
    model = resnet_bottleneck(c=40)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    assert 200_000 < src.stat().st_size < 300_000
    py = sys.executable
    script = (
        f"cp {src} m.onnx && "
        f"{py} -m bnfold fold m.onnx -o out.onnx; echo rc=$?; "
        f"{py} -m bnfold fold m.onnx -o out.onnx --external-data; echo rc=$?; "
        f"ls -A; sha256sum m.onnx"
    )
    done = _in_small_tmpfs(tmp_path, script)
    assert done.stdout.count("rc=2") == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line]
    assert len(lines) == 2 and all("not written (No space left on device)" in line for line in lines), done.stderr
    assert "Traceback" not in done.stderr
    listed = [line for line in done.stdout.splitlines() if not line.startswith("rc=") and "  m.onnx" not in line]
    assert listed == ["m.onnx"], done.stdout  # no temporary file, no half pair
    assert digest(src) in done.stdout  # the input unchanged


def test_a_full_disk_while_saving_arrays(tmp_path, demo_pair):
    model, out = demo_pair
    py = sys.executable
    script = (
        f"dd if=/dev/zero of=filler bs=1k count=1000 2>/dev/null; "  # the disk full
        f"{py} -m bnfold verify {model} {out} --save-outputs saved.npz; echo rc=$?; ls -A"
    )
    done = _in_small_tmpfs(tmp_path, script)
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if line] == [
        "Error: saved.npz: not written (No space left on device); nothing was left behind"
    ]
    assert done.stdout.split("rc=2")[1].split() == ["filler"]


def test_a_file_limit_is_one_line(tmp_path, demo_pair):
    """RLIMIT_FSIZE (EFBIG) with SIGXFSZ ignored: the write fails part way."""
    model, _ = demo_pair

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    before = files(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(model), "-o", str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "not written (File too large)" in done.stderr
    assert files(tmp_path) == before


def test_memory_running_out_in_verify_is_one_line_with_a_hint(demo_pair, monkeypatch):
    import bnfold.verification.stages as verification

    def no_memory(*args, **kwargs):
        raise MemoryError()

    model, out = demo_pair
    monkeypatch.setattr(verification, "synthesized", no_memory)
    refused(invoke("verify", model, out), "not enough memory to verify", "--dim")


def test_verify_on_inputs_too_large_for_the_memory_is_one_line(demo_pair):
    """`verify --dim batch=3000` under a 2.5 GB address-space limit: onnxruntime's allocation fails."""
    model, out = demo_pair

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (2500 << 20, 2500 << 20))

    done = subprocess.run(
        [sys.executable, "-m", "bnfold", "verify", str(model), str(out), "--dim", "batch=3000"],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode in (0, 2), done.stderr
    if done.returncode == 2:
        assert done.stderr.strip().count("\n") == 0 and "memory" in done.stderr, done.stderr


# -- Links to models ---------------------------------------------------------------------------------
# External data is looked up in the folder of the path as given, as onnx's loader does: a link to a
# model elsewhere reads the data beside the link (and refuses data files that lead out of that
# folder). The model file itself may be a link to anywhere: the user named it.


def test_a_link_to_a_large_inline_model_folds(tmp_path, monkeypatch):
    """A model with no external data at all, whose large weights stay in the file (the wire scan), in
    a cache folder and linked from a work folder: folded, beside the link."""
    import bnfold.io.load as load

    monkeypatch.setattr(load, "SCAN_BYTES", 10_000)  # as if it were over 64 MB: weights left in the file
    (tmp_path / "cache").mkdir()
    (tmp_path / "work").mkdir()
    target = tmp_path / "cache" / "r.onnx"
    original = resnet_bottleneck(c=24)
    onnx.save(original, str(target))
    link = tmp_path / "work" / "r.onnx"
    link.symlink_to(target)
    before = digest(target)
    result = invoke("fold", link, "-q")
    assert result.exit_code == 0, result.output
    assert files(tmp_path / "work") == ["r.onnx", "r_folded.onnx"] and files(tmp_path / "cache") == ["r.onnx"]
    assert digest(target) == before
    from conftest import assert_same

    assert_same(original, onnx.load(str(tmp_path / "work" / "r_folded.onnx")), dims={"N": 2})


def test_a_link_to_a_model_with_external_data_reads_the_data_beside_the_link(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "work").mkdir()
    target = tmp_path / "cache" / "m.onnx"
    _external(target, resnet_bottleneck())
    link = tmp_path / "work" / "m.onnx"
    link.symlink_to(target)
    refused(invoke("fold", link), f"external data file {tmp_path / 'work' / 'm.onnx.data'}", "is missing")
    (tmp_path / "work" / "m.onnx.data").symlink_to(tmp_path / "cache" / "m.onnx.data")
    refused(invoke("fold", link), "leads out of the model's folder (a link)")
    (tmp_path / "work" / "m.onnx.data").unlink()
    (tmp_path / "work" / "m.onnx.data").write_bytes((tmp_path / "cache" / "m.onnx.data").read_bytes())
    assert invoke("fold", link, "-q").exit_code == 0
    assert "m_folded.onnx" in files(tmp_path / "work")


# -- Files that change while they are read -------------------------------------------------------------


SHRINK = """
import os, sys
import bnfold.api as api
import bnfold.io.load as load
load.SCAN_BYTES = 10_000  # the large-model path: weights left in the file and read when they change
victim, args = sys.argv[1], sys.argv[2:]
real = api.plan_model
def shrinking(*a, **k):
    os.truncate(victim, os.path.getsize(victim) // 2)
    return real(*a, **k)
api.plan_model = shrinking
from bnfold.cli import main
main(args)
"""


@pytest.mark.parametrize("which", ["inline", "external"])
def test_a_file_that_shrinks_while_it_is_read_is_one_line(tmp_path, which):
    """Truncated between opening the model and reading its weights: exit 2, never SIGBUS."""
    model = tmp_path / "m.onnx"
    if which == "inline":
        onnx.save(resnet_bottleneck(c=24), str(model))
        victim = model
    else:
        _external(model, resnet_bottleneck(c=24))
        victim = tmp_path / "m.onnx.data"
    done = subprocess.run(
        [sys.executable, "-c", SHRINK, str(victim), "fold", str(model), "-o", str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and "changed while it was read" in done.stderr, done.stderr
    assert not (tmp_path / "out.onnx").exists()


# -- Signals once the output is complete ---------------------------------------------------------------


LATE_SIGNAL = """
import os, signal, sys
import click
sig = getattr(signal, sys.argv[1])
where, args = sys.argv[2], sys.argv[3:]
if where == "click_close":  # in click's own work after the command returned
    real_close = click.Context.close
    def close(self):
        real_close(self)
        if self.parent is None:
            os.kill(os.getpid(), sig)
    click.Context.close = close
else:  # as the process exits with the command's code
    real_exit = sys.exit
    def exit(code=0):
        os.kill(os.getpid(), sig)
        real_exit(code)
    sys.exit = exit
from bnfold.cli import main
main(args)
"""


@pytest.mark.parametrize(
    "sig, where", [("SIGINT", "click_close"), ("SIGINT", "exit"), ("SIGTERM", "exit")], ids=lambda x: x
)
def test_a_signal_after_the_output_is_complete_does_not_kill_the_process(tmp_path, sig, where):
    model = tmp_path / "m.onnx"
    model.write_bytes(DEMO.read_bytes())
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [sys.executable, "-c", LATE_SIGNAL, sig, where, "fold", str(model), "-o", str(out), "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode in (0, 130, 143), (done.returncode, done.stderr)  # never killed by the signal
    assert "Traceback" not in done.stderr
    from conftest import assert_same

    assert_same(onnx.load(str(model)), onnx.load(str(out)))  # the output is complete


# -- Two runs writing one output --------------------------------------------------------------------


def test_two_runs_writing_one_output_leave_one_runs_pair(tmp_path, monkeypatch):
    """Run A renames its data file into place and stalls before renaming its model; run B writes the
    same output meanwhile. Without the folder lock B took the same data name and A's model ended up
    with B's data. Now B waits for A (A stalls 2 s at most), and the pair left is whole."""
    import threading

    from conftest import assert_same

    import bnfold.io.save as io_save

    models = {"A": tmp_path / "a.onnx", "B": tmp_path / "b.onnx"}  # two models, their data laid out apart
    _external(models["A"], resnet_bottleneck(blocks=2, seed=1))
    _external(models["B"], resnet_bottleneck(blocks=3, seed=2))
    out = tmp_path / "out.onnx"
    a_stalled, b_done = threading.Event(), threading.Event()
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if threading.current_thread().name == "A" and str(dst).endswith(".data"):
            a_stalled.set()
            b_done.wait(2)

    monkeypatch.setattr(io_save.os, "replace", replace)
    errors = []

    def run():
        try:
            bnfold.fold_file(models[threading.current_thread().name], out, external_data=True)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            if threading.current_thread().name == "B":
                b_done.set()

    a = threading.Thread(target=run, name="A")
    a.start()
    assert a_stalled.wait(30)
    b = threading.Thread(target=run, name="B")
    b.start()
    a.join()
    b.join()
    assert not errors, errors
    assert_same(onnx.load(str(models["B"])), onnx.load(str(out)), dims={"N": 2})  # B's model, B's data
    assert [f for f in files(tmp_path) if f.startswith("out")] == ["out.onnx", "out.onnx.1.data"]


@pytest.mark.parametrize("errno_, words", [(13, "Permission denied"), (36, "File name too long")])
def test_a_refused_rename_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, errno_, words):
    """The commit rename refused by the system (a folder that became read-only, say: this suite runs
    as root, for whom no permission bit refuses anything, so the refusal is injected)."""
    import bnfold.io.save as io_save

    model = tmp_path / "m.onnx"
    model.write_bytes(DEMO.read_bytes())

    def refuse(src, dst):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(io_save.os, "replace", refuse)
    for args in (
        ["fold", model, "-o", tmp_path / "o.onnx"],
        ["fold", model, "-o", tmp_path / "e.onnx", "--external-data"],
    ):
        refused(invoke(*args), f"not written ({words}); nothing was left behind")
    assert files(tmp_path) == ["m.onnx"] and digest(model) == digest(DEMO)
