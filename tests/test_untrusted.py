"""Hostile graphs and hostile environments, built here: a fold that would change meaning stays with a
reason, a graph that is not a graph is refused, and every path a user names is read and written
safely. Each case: the exit code, one line, no traceback, nothing written (or an output equivalent
to the input under onnxruntime), the input unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import check_fold
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import bnfold
from bnfold.cli import cli
from models import Builder, calibrate

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


def invoke(*args) -> CliRunner.invoke:
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> List[str]:
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


def concat_then_bn(kinds: List[str], rank: int, axis: int) -> onnx.ModelProto:
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
