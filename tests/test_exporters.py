"""Forms other exporters write, built the way they write them: each folds and matches onnxruntime
(optimizations off), and a variant where the fold would be wrong stays with the right reason."""

from __future__ import annotations

import onnx
import pytest
from conftest import check_fold

import bnfold
from models import Builder, calibrate


def paddle_conv(shared: bool = False, noop: str = "Identity") -> onnx.ModelProto:
    """paddle2onnx (Paddle 3): Conv -> Add(bias [1,C,1,1]) -> Identity -> BatchNormalization."""
    b = Builder(seed=5)
    x = b.input("x", ["N", 3, 8, 8])
    conv = b.conv(x, 3, 8, 3, bias=False)
    biased = b.op("Add", [conv, b.const(b.randn(1, 8, 1, 1), "bias")])
    if noop == "Dropout":
        passed = b.op("Dropout", [biased], outputs=2)  # inference: the mask output is not read
    elif noop == "Cast":
        passed = b.op("Cast", [biased], to=onnx.TensorProto.FLOAT)
    else:
        passed = b.op(noop, [biased])
    y = b.relu(b.bn(passed, 8))
    outputs = [y, b.op("Sigmoid", [passed])] if shared else [y]
    return calibrate(b.model(*outputs), {"N": 2})


def paddle_linear() -> onnx.ModelProto:
    """paddle2onnx: MatMul -> Add(bias) -> Identity -> BatchNormalization (BatchNorm1D)."""
    b = Builder(seed=6)
    x = b.input("x", ["N", 16])
    mm = b.op("MatMul", [x, b.const(b.randn(16, 12), "w")])
    y = b.bn(b.op("Identity", [b.op("Add", [mm, b.const(b.randn(12), "bias")])]), 12)
    return calibrate(b.model(b.relu(y)), {"N": 4})


@pytest.mark.parametrize("noop", ["Identity", "Dropout", "Cast"])
def test_paddle_conv_bias_identity_bn_folds(noop):
    folded, report = check_fold(paddle_conv(noop=noop), dims={"N": 2})
    assert [f.into_op for f in report.folded] == ["Conv"] and len(report.absorbed) == 2
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]


def test_paddle_linear_folds():
    folded, _ = check_fold(paddle_linear(), dims={"N": 4})
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Relu"]


def test_a_shared_no_op_stays_and_the_reason_says_so():
    _, report = check_fold(paddle_conv(shared=True), left=1, dims={"N": 2})
    (left,) = report.left
    assert left.reason == "shared_producer_output" and "Identity" not in left.message.split("'")[0]


def test_identity_is_never_the_obstacle():
    b = Builder(seed=7)
    x = b.input("x", [1, 4, 4, 4])
    y = b.bn(b.op("Identity", [b.relu(x)]), 4)
    _, report = bnfold.fold(b.model(y))
    (left,) = report.left
    assert (
        left.reason == "unsupported_producer"
        and "comes from Relu" in left.message
        and "through Identity" in left.message
    )


def test_a_training_dropout_is_not_a_no_op():
    b = Builder(seed=8)
    x = b.input("x", [1, 3, 4, 4])
    c = b.conv(x, 3, 4)
    drop = b.op("Dropout", [c, b.const(0.5, "ratio"), b.const(True, "train", dtype=bool)])
    _, report = bnfold.fold(b.model(b.bn(drop, 4)))
    assert report.left and report.left[0].reason == "unsupported_producer"


def keras_depthwise(spatial_scale: bool = False, shared: bool = False) -> onnx.ModelProto:
    """Keras 3 through tf2onnx: no BatchNormalization; Conv(group=C) -> Mul[1,C,1,1] -> Add[1,C,1,1]."""
    b = Builder(seed=9)
    x = b.input("x", ["N", 6, 8, 8])
    dw = b.conv(x, 6, 6, 3, group=6, bias=False)
    scale = b.rng.uniform(0.5, 1.5, (1, 6, 8, 8) if spatial_scale else (1, 6, 1, 1))
    y = b.op("Add", [b.op("Mul", [dw, b.const(scale, "scale")]), b.const(b.randn(1, 6, 1, 1), "shift")])
    outputs = [b.relu(y), b.op("Sigmoid", [dw])] if shared else [b.relu(y)]
    return b.model(*outputs)


def keras_dense() -> onnx.ModelProto:
    """Keras 3 Dense + BatchNormalization: MatMul -> Mul -> Add."""
    b = Builder(seed=10)
    x = b.input("x", ["N", 16])
    mm = b.op("MatMul", [x, b.const(b.randn(16, 8), "w")])
    y = b.op("Add", [b.op("Mul", [mm, b.const(b.rng.uniform(0.5, 1.5, 8), "scale")]), b.const(b.randn(8), "shift")])
    return b.model(b.relu(y))


@pytest.mark.parametrize(
    "make, dims", [(keras_depthwise, {"N": 2}), (keras_dense, {"N": 3})], ids=["depthwise", "dense"]
)
def test_keras_affine_pairs_fold_without_a_bn(make, dims):
    folded, report = check_fold(make(), dims=dims)
    assert not report.folded and len(report.affine) == 1 and "Mul + Add" in report.affine[0]
    assert [n.op_type for n in folded.graph.node][-1] == "Relu" and len(folded.graph.node) == 2
    assert "affine ops folded without a BN (1)" in report.render_text()
    unchanged, off = bnfold.fold(make(), affine=False)
    assert not off.affine and len(unchanged.graph.node) == 4


@pytest.mark.parametrize("variant", ["spatial_scale", "shared"])
def test_keras_affine_pairs_that_would_change_meaning_stay(variant):
    model = keras_depthwise(**{variant: True})
    folded, report = check_fold(model, dims={"N": 2})
    assert not report.affine
    assert sum(n.op_type in ("Mul", "Add") for n in folded.graph.node) == 2


def mixnet_block(shared_branch: bool = False, relu_branch: bool = False) -> onnx.ModelProto:
    """timm's MixNet: Split -> depthwise Convs of several kernel sizes -> Concat -> BN."""
    b = Builder(seed=11)
    x = b.input("x", ["N", 12, 8, 8])
    parts = b.op("Split", [x, b.const([4, 4, 4], "split", dtype="int64")], outputs=3, axis=1)
    names = [parts, f"{parts}_out1", f"{parts}_out2"]
    branches = [b.conv(name, 4, 4, k, group=4, bias=False) for name, k in zip(names, (3, 5, 7))]
    if relu_branch:
        branches[1] = b.relu(branches[1])
    cat = b.op("Concat", branches, axis=1)
    y = b.relu(b.bn(cat, 12))
    outputs = [y, b.op("Sigmoid", [branches[2]])] if shared_branch else [y]
    return calibrate(b.model(*outputs), {"N": 2})


def test_mixnet_concat_bn_splits_into_every_branch():
    folded, report = check_fold(mixnet_block(), dims={"N": 2})
    (f,) = report.folded
    assert f.direction == "split" and f.into_op == "Concat" and "conv0" in f.into and "conv2" in f.into
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0


@pytest.mark.parametrize("variant", ["shared_branch", "relu_branch"])
def test_a_branch_that_cannot_take_its_part_keeps_the_bn(variant):
    _, report = check_fold(mixnet_block(**{variant: True}), left=1, dims={"N": 2})
    (left,) = report.left
    assert left.reason == "concat_branch" and "branch" in left.message


def test_densenet_concat_of_a_shared_tensor_stays():
    from models import densenet_preact

    _, report = check_fold(calibrate(densenet_preact(), {}), left=4)
    assert {x.reason for x in report.left} <= {
        "concat_branch",
        "no_producer",
        "unsupported_producer",
        "shared_producer_output",
    }
    assert "concat_branch" in {x.reason for x in report.left}
