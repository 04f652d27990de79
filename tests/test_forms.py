"""What real exporters write: legacy opsets, IR 3, constant subgraphs, bodies, functions, mixed
precision, backward folds, lowering. Each checked numerically with every fold invariant."""

import numpy as np
import onnx
import pytest
from conftest import check_fold, ort_runs, rel_error, run_ort, run_reference
from onnx import TensorProto, helper, numpy_helper

import bnfold
from models import Builder, densenet_preact

F = TensorProto.FLOAT


def conv_bn_net(opset, ir_version=None):
    b = Builder(seed=opset, opset=opset, ir_version=ir_version)
    x = b.input("x", [2, 3, 6, 6])
    bn_attrs = {"is_test": 1} if opset < 7 else {}
    y = b.relu(b.bn(b.conv(x, 3, 4, bias=opset % 2 == 0), 4, **bn_attrs))
    y = b.bn(b.conv(y, 4, 5, 1, pad=0, bias=False), 5, **bn_attrs)
    if opset >= 7:
        y = b.gemm(b.op("Flatten", [y], axis=1), 5 * 36, 3, trans_b=1)
    return b.model(y)


@pytest.mark.parametrize("opset", list(range(6, 24)), ids=lambda v: f"opset{v}")
def test_every_opset(opset):
    if opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"the installed onnx {onnx.__version__} does not know opset {opset}")
    model = conv_bn_net(opset)
    # onnxruntime has no BatchNormalization-6 kernel, and older releases refuse the newest opsets:
    # the ONNX reference evaluator checks those.
    check_fold(model, runner=run_reference if opset < 7 or not ort_runs(model) else run_ort)


@pytest.mark.parametrize("opset", [7, 8, 9], ids=lambda v: f"opset{v}")
def test_ir3_legacy_models(opset):
    model = conv_bn_net(opset, ir_version=3)
    folded, _ = check_fold(model)
    assert folded.ir_version == 3
    assert {i.name for i in folded.graph.input} == {t.name for t in folded.graph.initializer} | {"x"}


def test_spatial0_with_uniform_parameters_folds_and_varying_stays():
    b = Builder(seed=1, opset=7)
    x = b.input("x", [1, 3, 4, 4])
    c = b.conv(x, 3, 2, 3)
    params = [
        b.const(np.broadcast_to(v[:, None, None], (2, 4, 4)).copy(), "p")
        for v in (np.array([1.5, 0.5]), np.array([0.1, -0.2]), np.array([0.0, 0.3]), np.array([1.0, 2.0]))
    ]
    y = b.bn(c, 2, params=params, spatial=0)
    c2 = b.conv(x, 3, 2, 3)
    varying = b.bn(c2, 2, params=b.bn_params(2, (2, 4, 4)), spatial=0)
    _, report = check_fold(b.model(y, varying), left=1)
    assert report.left[0].reason == "per_activation_parameters"


def test_custom_domain_nodes_untouched():
    b = Builder(seed=2)
    x = b.input("x", [1, 3, 5, 5])
    c = b.conv(x, 3, 4)
    b.nodes.append(helper.make_node("Mystery", [c], ["m"], domain="com.example", name="mystery"))
    b.nodes.append(
        helper.make_node("BatchNormalization", ["m"] + b.bn_params(4), ["y"], domain="com.example", name="custom_bn")
    )
    y = b.bn("y", 4)
    model = b.model(y, shape=[1, 4, 5, 5], domains=["com.example"])
    folded, report = bnfold.fold(model)
    assert report.before.batchnorms == 1 and report.left[0].reason == "unsupported_producer"
    custom = [n for n in folded.graph.node if n.domain == "com.example"]
    assert [n.SerializeToString() for n in custom] == [
        n.SerializeToString() for n in model.graph.node if n.domain == "com.example"
    ]


# -- constant subgraphs -------------------------------------------------------------------------


def test_caffe2_constant_of_shape_weights():
    b = Builder(seed=3, opset=11)
    x = b.input("x", [1, 3, 5, 5])

    def filled(shape, value):
        return b.op(
            "ConstantOfShape",
            [b.const(np.array(shape, np.int64), "shape", dtype=np.int64)],
            value=numpy_helper.from_array(np.array([value], np.float32)),
        )

    w = filled([4, 3, 3, 3], 0.1)
    params = [filled([4], 1.5), filled([4], 0.2), filled([4], -0.1), filled([4], 0.8)]
    y = b.bn(b.op("Conv", [x, w, filled([4], 0.05)], pads=[1] * 4), 4, params=params)
    folded, _ = check_fold(b.model(y))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_dynamo_missing_bias_pattern():
    # Expand(CastLike(Constant 0, x), Expand(Shape(W)[0:1], [1])): only the dtype of x matters.
    b = Builder(seed=4, opset=18)
    x = b.input("x", ["batch", 3, 6, 6])
    w = b.const(b.randn(4, 3, 3, 3), "w")
    zero = b.op("Constant", [], value=numpy_helper.from_array(np.array(0.0, np.float32)))
    like = b.op("CastLike", [zero, x])
    n = b.op("Shape", [w], start=0, end=1)
    shape = b.op("Expand", [n, b.const(np.array([1], np.int64), "one", dtype=np.int64)])
    bias = b.op("Expand", [like, shape])
    y = b.bn(b.op("Conv", [x, w, bias], pads=[1] * 4), 4)
    folded, _ = check_fold(b.model(y), dims={"batch": 2})
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_weights_through_reshape_transpose_slice_gather_cast():
    b = Builder(seed=5, opset=13)
    x = b.input("x", [1, 3, 5, 5])
    raw = b.const(b.randn(3, 3, 3, 4).astype(np.float64), "raw", dtype=np.float64)
    w = b.op("Cast", [b.op("Transpose", [raw], perm=[3, 2, 0, 1])], to=F)
    w = b.op("Reshape", [w, b.const(np.array([4, 3, 3, 3], np.int64), "s", dtype=np.int64)])
    big = b.const(b.rng.uniform(0.5, 1.5, (2, 6)), "big")
    scale = b.op(
        "Slice",
        [
            b.op("Gather", [big, b.const(np.array(1, np.int64), "i", dtype=np.int64)], axis=0),
            *(b.const(np.array([v], np.int64), "sl", dtype=np.int64) for v in (1, 5)),
        ],
    )
    mean = b.op(
        "Squeeze",
        [
            b.op("Unsqueeze", [b.const(b.randn(4), "m"), b.const(np.array([0], np.int64), "ax", dtype=np.int64)]),
            b.const(np.array([0], np.int64), "ax", dtype=np.int64),
        ],
    )
    var = b.op("Add", [b.op("Mul", [b.const(np.ones(4), "v"), b.const(2.0, "two")]), b.const(0.5, "half")])
    params = [scale, b.const(b.randn(4), "beta"), mean, b.op("Identity", [var])]
    folded, _ = check_fold(b.model(b.bn(b.op("Conv", [x, w], pads=[1] * 4), 4, params=params)))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_weight_depending_on_an_input_value_is_not_constant():
    b = Builder(seed=6)
    x, gain = b.input("x", [1, 3, 5, 5]), b.input("gain", [1])
    w = b.op("Mul", [b.const(b.randn(4, 3, 3, 3), "w"), gain])
    _, report = check_fold(b.model(b.bn(b.op("Conv", [x, w], pads=[1] * 4), 4)), left=1)
    assert report.left[0].reason == "producer_weight_not_constant"


def test_constant_subgraph_stays_while_others_use_it():
    b = Builder(seed=7)
    x = b.input("x", [1, 3, 5, 5])
    w = b.op("Identity", [b.const(b.randn(4, 3, 3, 3), "w")])
    folded_out = b.bn(b.op("Conv", [x, w], pads=[1] * 4), 4)
    plain = b.op("Conv", [x, w], pads=[1] * 4)
    folded, _ = check_fold(b.model(folded_out, plain))
    assert "Identity" in [n.op_type for n in folded.graph.node]


# -- bodies and functions -----------------------------------------------------------------------


def branch(b: Builder, name: str, w: str, params, out: str) -> onnx.GraphProto:
    nodes = [
        helper.make_node("Conv", ["x", w], [f"{name}_c"], name=f"{name}_conv", pads=[1] * 4),
        helper.make_node("BatchNormalization", [f"{name}_c"] + params, [out], name=f"{name}_bn"),
    ]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F, [1, 4, 5, 5])])


def test_if_branches_with_outer_scope_weights():
    b = Builder(seed=8)
    b.input("x", [1, 3, 5, 5])
    cond = b.input("cond", [], elem=TensorProto.BOOL)
    w = b.const(b.randn(4, 3, 3, 3), "w")  # outer-scope initializer read by both branches
    then_g = branch(b, "then", w, b.bn_params(4), "t_out")
    else_g = branch(b, "else", w, b.bn_params(4), "e_out")
    b.nodes.append(helper.make_node("If", [cond], ["y"], name="if", then_branch=then_g, else_branch=else_g))
    model = b.model("y", shape=[1, 4, 5, 5])
    folded, report = check_fold(model)
    assert report.before.batchnorms == 2 and len(report.folded) == 2
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype(np.float32)
    for flag in (True, False):  # both branches, whatever the random inputs drew
        feeds = {"x": x, "cond": np.array(flag)}
        assert rel_error(run_ort(model, feeds)["y"], run_ort(folded, feeds)["y"]) <= 1e-5
    assert w not in {t.name for t in folded.graph.initializer}  # no longer read by anything


def test_loop_body():
    b = Builder(seed=9)
    x = b.input("x", [1, 3, 5, 5])
    trip = b.const(np.array(2, np.int64), "trip", dtype=np.int64)
    w = b.const(b.randn(3, 3, 3, 3), "w")
    params = b.bn_params(3)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["v_in", w], ["c"], name="body_conv", pads=[1] * 4),
            helper.make_node("BatchNormalization", ["c"] + params, ["bn_out"], name="body_bn"),
            helper.make_node("Relu", ["bn_out"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", F, [1, 3, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", F, [1, 3, 5, 5]),
        ],
    )
    b.nodes.append(helper.make_node("Loop", [trip, "", x], ["y"], name="loop", body=body))
    _folded, report = check_fold(b.model("y", shape=[1, 3, 5, 5]))
    assert report.folded[0].name == "body_bn"


def test_model_local_function():
    rng = np.random.default_rng(10)
    consts = [
        helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v.astype(np.float32), n))
        for n, v in (
            ("w", rng.standard_normal((4, 3, 3, 3)) * 0.2),
            ("g", rng.uniform(0.5, 1.5, 4)),
            ("be", rng.standard_normal(4)),
            ("mu", rng.standard_normal(4)),
            ("va", rng.uniform(0.5, 2, 4)),
        )
    ]
    fn = helper.make_function(
        "local",
        "ConvBn",
        ["x"],
        ["y"],
        consts
        + [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
            helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "va"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("ConvBn", ["input"], ["out"], domain="local", name="call")],
        "g",
        [helper.make_tensor_value_info("input", F, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("out", F, [1, 4, 5, 5])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn]
    )
    model.ir_version = 10
    _folded, report = check_fold(model)
    assert report.before.batchnorms == 1 and report.after.batchnorms == 0


# -- precision ----------------------------------------------------------------------------------


def test_bfloat16_weights_fold_in_float64():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    b = Builder(seed=11, dtype=ml_dtypes.bfloat16, opset=15)
    x = b.input("x", [3, 8])
    y = b.gemm(x, 8, 6, trans_b=1)  # Conv has no bfloat16 in the ONNX schema; Gemm has
    model = b.model(b.bn(y, 6))
    # onnxruntime has no bfloat16 Gemm on the CPU: the reference evaluator computes both models.
    folded, _ = check_fold(model, tol=3e-2, runner=run_reference)
    w = next(t for t in folded.graph.initializer if t.name.startswith("fc_w"))
    assert w.data_type == TensorProto.BFLOAT16


# -- backward folds and lowering ------------------------------------------------------------------


def test_input_normalization_folds_backward_into_unpadded_conv():
    b = Builder(seed=12)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(b.bn(x, 3), 3, 6, 3, pad=0, stride=2))
    folded, report = check_fold(b.model(y))
    assert report.folded[0].direction == "backward" and [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]


@pytest.mark.parametrize("group", [1, 2, 6], ids=["dense", "grouped", "depthwise"])
def test_backward_into_grouped_conv(group):
    b = Builder(seed=13)
    x = b.input("x", [1, 6, 5, 5])
    y = b.conv(b.relu(b.bn(b.relu(x), 6)), 6, 6, 1, group=group, pad=0)
    y = b.conv(b.bn(b.op("Sigmoid", [y]), 6), 6, 12, 3, group=group, pad=0, bias=group != 2)
    _, report = check_fold(b.model(y), left=1)
    assert [f.direction for f in report.folded] == ["backward"] and report.left[0].reason == "unsupported_producer"


def test_padded_consumer_is_left_with_reason():
    b = Builder(seed=14)
    x = b.input("x", [1, 3, 6, 6])
    _, report = check_fold(b.model(b.conv(b.bn(x, 3), 3, 4, 3, pad=1)), left=1)
    assert report.left[0].reason == "padded_consumer" and "pads" in report.left[0].message


@pytest.mark.parametrize("consumer", ["gemm", "gemm_transB_alpha_beta", "matmul"])
def test_batchnorm1d_before_classifier(consumer):
    b = Builder(seed=15)
    x = b.input("x", ["batch", 10])
    h = b.bn(b.relu(x), 10)
    if consumer == "matmul":
        y = b.op("MatMul", [h, b.const(b.randn(10, 4), "w")])
    elif consumer == "gemm":
        y = b.gemm(h, 10, 4)
    else:
        y = b.gemm(h, 10, 4, trans_b=1, alpha=0.5, beta=2.0)
    folded, report = check_fold(b.model(y), dims={"batch": 3})
    assert report.folded[0].direction == "backward" and [n.op_type for n in folded.graph.node] == ["Relu", "Gemm"]


def test_backward_and_forward_into_the_same_layer():
    b = Builder(seed=16)
    x = b.input("x", [1, 4, 5, 5])
    cat = b.op("Concat", [x, b.relu(x)], axis=1)
    y = b.bn(b.conv(b.bn(cat, 8), 8, 6, 1, pad=0), 6)
    h = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    h = b.bn(b.gemm(b.bn(b.relu(h), 6), 6, 5, alpha=1.5, beta=0.5), 5)
    _folded, report = check_fold(b.model(h))
    assert sorted(f.direction for f in report.folded) == ["backward", "backward", "forward", "forward"]


def test_lower_standalone():
    model = densenet_preact()
    folded, report = check_fold(model, left=0, lower_standalone=True)
    assert {f.direction for f in report.folded} == {"lowered"}
    bn_outputs = [n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"]
    produced = {o for n in folded.graph.node for o in n.output}
    assert set(bn_outputs) <= produced
    assert check_fold(model, left=4)[1].left  # without the flag they stay, with reasons


def test_function_values_do_not_borrow_main_graph_types():
    # Inside the function, "x" is rank 3: (1, 4, 6) @ (6, 4) -> (1, 4, 4), and the BN normalizes axis 1,
    # not the MatMul's columns, so it must stay. The main graph also has an "x", of rank 2: were its rank
    # used, the fold would go through (4 channels either way) and compute something else.
    rng = np.random.default_rng(17)
    consts = [
        helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v.astype(np.float32), n))
        for n, v in (
            ("w", rng.standard_normal((6, 4))),
            ("g", rng.uniform(0.5, 1.5, 4)),
            ("be", rng.standard_normal(4)),
            ("mu", rng.standard_normal(4)),
            ("va", rng.uniform(0.5, 2, 4)),
        )
    ]
    fn = helper.make_function(
        "local",
        "Head",
        ["x"],
        ["y"],
        consts
        + [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "va"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Head", ["inp"], ["fo"], domain="local", name="call"),
            helper.make_node("Relu", ["m"], ["x"]),
        ],
        "g",
        [helper.make_tensor_value_info("inp", F, [1, 4, 6]), helper.make_tensor_value_info("m", F, [3, 4])],
        [helper.make_tensor_value_info("fo", F, [1, 4, 4]), helper.make_tensor_value_info("x", F, [3, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn]
    )
    model.ir_version = 10
    _, report = check_fold(model, left=1)
    assert report.left[0].reason in ("axis_mismatch", "unknown_rank")


def test_scan_body():
    b = Builder(seed=18)
    seq = b.input("seq", [3, 1, 4, 5])  # scanned along axis 0: three (1, 4, 5) slices
    w = b.const(b.randn(6, 4, 1), "w")  # outer-scope weight of a 1-D Conv inside the body
    params = b.bn_params(6)
    body = helper.make_graph(
        [
            helper.make_node("Conv", ["s_in", w], ["c"], name="scan_conv"),
            helper.make_node("BatchNormalization", ["c"] + params, ["bn_out"], name="scan_bn"),
            helper.make_node("Relu", ["bn_out"], ["s_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("s_in", F, [1, 4, 5])],
        [helper.make_tensor_value_info("s_out", F, [1, 6, 5])],
    )
    b.nodes.append(helper.make_node("Scan", [seq], ["y"], name="scan", body=body, num_scan_inputs=1))
    _folded, report = check_fold(b.model("y", shape=[3, 1, 6, 5]))
    assert [f.name for f in report.folded] == ["scan_bn"] and report.after.batchnorms == 0


@pytest.mark.parametrize("written", ["sorted", "unsorted", "ai.onnx"])
@pytest.mark.parametrize("lower", [False, True], ids=["matmul", "lowered"])
def test_stale_value_info_does_not_decide_a_fold(lower, written):
    """A graph edited after export may keep value_info of the values it had before. onnxruntime runs
    on the shapes the nodes give. Here "t" is declared (2, 6) but is (2, 5, 6): folded on the
    declared rank, the MatMul would become a Gemm (rank 2 only), and a BN lowered to Mul+Add would
    get constants of rank 2 beside a stale declaration. Where declaration and inference disagree the
    rank is unknown, and the BN stays. Also when the nodes are not in topological order or name the
    default domain "ai.onnx" (onnxruntime runs both; shape inference is given them sorted, as "")."""
    b = Builder(seed=21)
    x = b.input("x", [2, 5, 6])
    t = b.op("Identity", [x], "t")
    h = b.op("MatMul", [t, b.const(b.randn(6, 5))])
    if lower:
        h = b.op("Relu", [h])
    model = b.model(b.bn(h, 5))
    model.graph.value_info.append(helper.make_tensor_value_info(t, F, [2, 6]))
    model.graph.value_info.append(helper.make_tensor_value_info(h, F, [2, 5]))
    if written == "unsorted":
        nodes = list(model.graph.node)[::-1]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    elif written == "ai.onnx":
        for node in model.graph.node:
            node.domain = "ai.onnx"
    _, report = check_fold(model, left=1, full_check=False, lower_standalone=lower)
    # Lowered: not lowered, with the reason it had (a Relu cannot take it).
    assert report.left[0].reason == ("unsupported_producer" if lower else "unknown_rank"), report.left
