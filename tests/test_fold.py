"""Forward folds, checked numerically against onnxruntime (optimizations off) with every invariant."""

import numpy as np
import onnx
import pytest
from conftest import assert_same, check_fold, count_bn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bnfold
from models import Builder

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- Conv / ConvTranspose / Gemm over their attributes ------------------------------------------


@SETTINGS
@given(
    dims=st.integers(1, 3),
    groups=st.sampled_from([1, 2, "depthwise"]),
    per_group=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from(["zero", "one", "asym", "SAME_UPPER", "SAME_LOWER", "VALID"]),
    bias=st.booleans(),
    seed=st.integers(0, 99),
)
def test_conv(dims, groups, per_group, k, stride, dilation, padding, bias, seed):
    cin = 4
    group = cin if groups == "depthwise" else groups
    cout = group * per_group
    b = Builder(seed=seed)
    x = b.input("x", [2, cin] + [7] * dims)
    w = b.const(b.randn(cout, cin // group, *[k] * dims), "w")
    if padding.startswith("SAME"):
        dilation = 1  # onnxruntime has no kernel for dilation with SAME auto-padding
    attrs = {"group": group, "strides": [stride] * dims, "dilations": [dilation] * dims}
    if padding in ("zero", "one", "asym"):
        attrs["pads"] = {"zero": [0] * 2 * dims, "one": [1] * 2 * dims, "asym": [0] * dims + [1] * dims}[padding]
    else:
        attrs["auto_pad"] = padding
    y = b.op("Conv", [x, w] + ([b.const(b.randn(cout), "b")] if bias else []), **attrs)
    _folded, report = check_fold(b.model(b.bn(y, cout)))
    assert [f.into_op for f in report.folded] == ["Conv"]


@SETTINGS
@given(
    group=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    out_pad=st.integers(0, 1),
    dims=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 99),
)
def test_conv_transpose(group, per_group, k, stride, out_pad, dims, bias, seed):
    cin, cout = 4, group * per_group
    b = Builder(seed=seed)
    x = b.input("x", [1, cin] + [4] * dims)
    attrs = {"output_padding": [min(out_pad, stride - 1)] * dims}
    y = b.conv_transpose(x, cin, cout, k, group=group, bias=bias, stride=stride, dims=dims, **attrs)
    check_fold(b.model(b.bn(y, cout)))


@SETTINGS
@given(
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.25, 3.0]),
    c_shape=st.sampled_from(["absent", "scalar", "N", "1N", "MN", "M1"]),
    seed=st.integers(0, 99),
)
def test_gemm(trans_a, trans_b, alpha, beta, c_shape, seed):
    m, k, n = 3, 5, 6
    b = Builder(seed=seed)
    a = b.input("a", [k, m] if trans_a else [m, k])
    w = b.const(b.randn(n, k) if trans_b else b.randn(k, n), "w")
    shapes = {"scalar": (), "N": (n,), "1N": (1, n), "MN": (m, n), "M1": (m, 1)}
    ins = [a, w] + ([] if c_shape == "absent" else [b.const(b.randn(*shapes[c_shape]), "c")])
    y = b.op("Gemm", ins, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    folded, _ = check_fold(b.model(b.bn(y, n)))
    gemm = next(n for n in folded.graph.node if n.op_type == "Gemm")
    assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "alpha")) == alpha


# -- MatMul -------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_add", [False, True], ids=["matmul", "matmul_add"])
@pytest.mark.parametrize("bias_side", ["left", "right"])
def test_matmul_rank2(with_add, bias_side):
    b = Builder(seed=3)
    x = b.input("x", ["batch", 8])
    y = b.op("MatMul", [x, b.const(b.randn(8, 5), "w")])
    if with_add:
        bias = b.const(b.randn(1, 5), "b")
        y = b.op("Add", [y, bias] if bias_side == "right" else [bias, y])
    folded, report = check_fold(b.model(b.bn(y, 5)), dims={"batch": 4})
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert report.absorbed == (["Add 'add0'"] if with_add else [])


def test_matmul_rank3_other_axis_is_left():
    b = Builder(seed=4)
    x = b.input("x", [2, 6, 8])  # BN normalizes axis 1 (6), the MatMul's columns are axis 2
    y = b.op("MatMul", [x, b.const(b.randn(8, 6), "w")])
    _, report = check_fold(b.model(b.bn(y, 6)), left=1)
    assert report.left[0].reason == "axis_mismatch"


def test_matmul_unknown_rank_is_left():
    b = Builder(seed=4)
    x = b.op("Relu", [b.input("x", None)])
    model = b.model(b.bn(b.op("MatMul", [x, b.const(b.randn(8, 6), "w")]), 6), elem=onnx.TensorProto.FLOAT)
    _, report = bnfold.fold(model, dry_run=True)
    assert report.left[0].reason == "unknown_rank"


# -- chains, affine steps, shared weights, constants ----------------------------------------------


def test_conv_bn_bn_chain():
    b = Builder(seed=5)
    y = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4)
    folded, report = check_fold(b.model(b.bn(b.bn(y, 4), 4)))
    assert len(report.folded) == 2 and len(folded.graph.node) == 1


def test_bn_mul_add_scale_layer():
    b = Builder(seed=6)
    y = b.bn(b.conv(b.input("x", [1, 3, 6, 6]), 3, 4), 4)
    y = b.op("Mul", [y, b.const(b.rng.uniform(0.5, 2, (4, 1, 1)), "scale")])
    y = b.op("Add", [b.const(b.randn(1, 4, 1, 1), "shift"), y])
    y = b.op("Div", [b.op("Sub", [y, b.const(b.randn(4, 1, 1), "m")]), b.const(2.0, "d")])
    folded, report = check_fold(b.model(y))
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and len(report.absorbed) == 4


def test_affine_without_bn_folds_unless_turned_off():
    b = Builder(seed=6)
    y = b.op("Add", [b.conv(b.input("x", [1, 3, 6, 6]), 3, 4), b.const(b.randn(4, 1, 1), "c")])
    model = b.model(b.relu(y))
    folded, report = check_fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"] and report.affine == ["Add -> Conv conv0"]
    folded, _ = check_fold(model, affine=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add", "Relu"]


def test_non_channel_add_stops_the_chain():
    b = Builder(seed=6)
    y = b.op("Add", [b.conv(b.input("x", [1, 3, 6, 6]), 3, 4), b.const(b.randn(6, 6), "c")])
    _, report = check_fold(b.model(b.bn(y, 4)), left=1)
    assert report.left[0].reason == "unsupported_producer"


def test_shared_weight_is_cloned():
    b = Builder(seed=7)
    x = b.input("x", [1, 3, 6, 6])
    w = b.const(b.randn(4, 3, 3, 3), "w")
    folded_branch = b.bn(b.op("Conv", [x, w], pads=[1] * 4), 4)
    plain_branch = b.op("Conv", [x, w], pads=[1] * 4)
    model = b.model(folded_branch, plain_branch)
    folded, _ = check_fold(model)
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(inits[w], numpy_helper.to_array(model.graph.initializer[0]))
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != w and convs[1].input[1] == w


def test_same_tensor_for_two_bn_inputs_and_two_bns():
    b = Builder(seed=8)
    x = b.input("x", [1, 3, 5, 5])
    ones = b.const(np.ones(4), "ones")
    zeros = b.const(np.zeros(4), "zeros")
    params = [ones, zeros, zeros, ones]
    y1 = b.bn(b.conv(x, 3, 4), 4, params=params)
    y2 = b.bn(b.conv(x, 3, 4), 4, params=params)
    check_fold(b.model(y1, y2))


def test_weights_from_constant_nodes():
    b = Builder(seed=9)
    x = b.input("x", [1, 2, 5, 5])
    w = b.op("Constant", [], value=numpy_helper.from_array(b.randn(3, 2, 3, 3), "w"))
    params = [
        b.op("Constant", [], value=numpy_helper.from_array(p.astype(np.float32), f"p{i}"))
        for i, p in enumerate([np.ones(3) * 2, np.ones(3), np.zeros(3), np.ones(3) * 3])
    ]
    folded, _ = check_fold(b.model(b.bn(b.op("Conv", [x, w]), 3, params=params)))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


@pytest.mark.parametrize("mixed", [False, True], ids=["fp16", "fp16_act_fp32_params"])
def test_float16(mixed):
    b = Builder(seed=10, dtype=np.float16, opset=15)
    x = b.input("x", [1, 4, 6, 6])
    y = b.conv(x, 4, 8, 3)
    params = None
    if mixed:
        p = b.bn_params(8)
        params = [
            b.const(numpy_helper.to_array(next(t for t in b.inits if t.name == n)), n + "_f32", dtype=np.float32)
            for n in p
        ]
    folded, _ = check_fold(b.model(b.bn(y, 8, params=params)), tol=5e-3)
    w = next(t for t in folded.graph.initializer if t.name.startswith("w"))
    assert w.data_type == onnx.TensorProto.FLOAT16


# -- names ---------------------------------------------------------------------------------------


def test_names_kept_and_new_names_never_collide():
    # Tensors named "0", "1", ... as legacy exporters write them, and a name the fold would like.
    nodes = [
        helper.make_node("Conv", ["0", "1"], ["7"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["7", "2", "3", "4", "5"], ["8"], name="bn"),
        helper.make_node("Relu", ["8"], ["conv_bias"], name="relu"),
    ]
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in [
            (rng.standard_normal((4, 3, 3, 3)), "1"),
            (rng.uniform(0.5, 1.5, 4), "2"),
            (rng.standard_normal(4), "3"),
            (rng.standard_normal(4), "4"),
            (rng.uniform(0.5, 2, 4), "5"),
        ]
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("0", 1, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("conv_bias", 1, [1, 4, 5, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folded, _ = check_fold(model)
    conv = folded.graph.node[0]
    assert conv.name == "conv" and conv.output[0] == "8" and conv.input[2] not in {"conv_bias", "0", "1", "7", "8"}


def test_ir3_initializers_listed_as_inputs():
    b = Builder(seed=11, opset=8, ir_version=3)
    x = b.input("x", [1, 3, 5, 5])
    model = b.model(b.bn(b.conv(x, 3, 4, bias=False), 4))
    assert len(model.graph.input) == 1 + len(model.graph.initializer)
    folded, _ = check_fold(model)
    init_names = {t.name for t in folded.graph.initializer}
    assert {i.name for i in folded.graph.input} == init_names | {"x"}
    assert folded.graph.input[0].name == "x"


def test_stale_value_info_removed():
    b = Builder(seed=12)
    c = b.conv(b.input("x", [1, 3, 5, 5]), 3, 4)
    model = b.model(b.relu(b.bn(c, 4)))
    model = onnx.shape_inference.infer_shapes(model)
    assert any(v.name == c for v in model.graph.value_info)
    folded, _ = check_fold(model)
    assert not any(v.name == c for v in folded.graph.value_info)


# -- left alone, each with its reason -----------------------------------------------------------


def _conv_bn(seed=0, **bn_kwargs):
    b = Builder(seed=seed, opset=bn_kwargs.pop("opset", 17))
    x = b.input("x", [1, 3, 5, 5])
    return b, b.conv(x, 3, 4)


def test_training_mode_left():
    b, y = _conv_bn()
    _, report = check_fold(b.model(b.bn(y, 4, training_mode=1, outputs=3), shape=[1, 4, 5, 5]), left=1)
    assert report.left[0].reason == "training_mode"


def test_legacy_is_test_0_left():
    b = Builder(seed=1, opset=6)
    y = b.bn(b.conv(b.input("x", [1, 3, 5, 5]), 3, 4), 4, is_test=0)
    _, report = bnfold.fold(b.model(y), dry_run=True)
    assert report.left[0].reason == "training_mode"


def test_statistics_outputs_left():
    b = Builder(seed=1, opset=9)
    y = b.bn(b.conv(b.input("x", [1, 3, 5, 5]), 3, 4), 4, outputs=5)
    _, report = bnfold.fold(b.model(y), dry_run=True)
    assert report.left[0].reason == "statistics_outputs"


def test_non_constant_parameter_left():
    b, y = _conv_bn()
    params = b.bn_params(4)
    params[0] = b.input("gamma_in", [4])
    _, report = check_fold(b.model(b.bn(y, 4, params=params)), left=1)
    assert report.left[0].reason == "non_constant_parameter"


@pytest.mark.parametrize("what", ["bn_param", "conv_weight"])
def test_overridable_initializer_left(what):
    b, y = _conv_bn()
    model = b.model(b.bn(y, 4))
    name = model.graph.node[1].input[3] if what == "bn_param" else model.graph.node[0].input[1]
    t = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    _, report = check_fold(model, left=1)
    assert report.left[0].reason == "overridable_initializer"


def test_shared_producer_output_left():
    b, y = _conv_bn()
    _, report = check_fold(b.model(b.bn(y, 4), b.relu(y)), left=1)
    assert report.left[0].reason == "shared_producer_output"


def test_producer_output_is_graph_output_left():
    b, y = _conv_bn()
    _, report = check_fold(b.model(b.bn(y, 4), y), left=1)
    assert report.left[0].reason == "producer_output_is_graph_output"


def test_unsupported_producer_and_no_producer_left():
    b, y = _conv_bn()
    x2 = b.input("x2", [1, 4, 5, 5])
    _, report = check_fold(b.model(b.bn(b.relu(y), 4), b.bn(x2, 4)), left=2)
    assert [r.reason for r in report.left] == ["unsupported_producer", "no_producer"]


def test_weight_not_constant_left():
    b = Builder(seed=2)
    x, w = b.input("x", [1, 3, 5, 5]), b.input("w", [4, 3, 3, 3])
    _, report = check_fold(b.model(b.bn(b.op("Conv", [x, w], pads=[1] * 4), 4)), left=1)
    assert report.left[0].reason == "producer_weight_not_constant"


def test_channel_mismatch_left():
    b, y = _conv_bn()
    model = b.model(b.bn(y, 5))  # an invalid model: decided on, never run
    _, report = bnfold.fold(model, dry_run=True)
    assert report.left[0].reason == "channel_mismatch"


def test_every_reason_has_a_sentence():
    assert all(isinstance(v, str) and len(v) > 20 for v in bnfold.REASONS.values())


# -- the checks can fail -----------------------------------------------------------------------


def test_a_wrong_fold_is_caught():
    b, y = _conv_bn()
    model = b.model(b.bn(y, 4))
    folded, _ = bnfold.fold(model)
    w = folded.graph.initializer[0]
    arr = numpy_helper.to_array(w).copy()
    arr[1] *= 1.01
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    with pytest.raises(AssertionError, match="relative error"):
        assert_same(model, folded)


def test_dry_run_changes_nothing():
    b, y = _conv_bn()
    model = b.model(b.bn(y, 4))
    out, report = bnfold.fold(model, dry_run=True)
    assert out.SerializeToString() == model.SerializeToString()
    assert report.dry_run and len(report.folded) == 1 and count_bn(out) == 1
