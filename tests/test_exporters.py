"""Forms other exporters write, built the way they write them: each folds and matches onnxruntime
(optimizations off), and a variant where the fold would be wrong stays with the right reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import check_fold
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    branches = [b.conv(name, 4, 4, k, group=4, bias=False) for name, k in zip(names, (3, 5, 7), strict=False)]
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


def resnetv2_stem(gamma_sign: float = 1.0, shared_pool: bool = False, pad_node: bool = False) -> onnx.ModelProto:
    """timm's ResNetV2 (pre-activation): Conv -> MaxPool(3, stride 2, pads 1) -> BN -> Relu."""
    b = Builder(seed=12)
    x = b.input("x", ["N", 3, 16, 16])
    c = b.conv(x, 3, 8, 7, stride=2, pad=3, bias=False)
    if pad_node:  # a Pad of zeros before the pool: the map would change the padded value
        c = b.op("Pad", [c, b.const([0, 0, 1, 1, 0, 0, 1, 1], "pads", dtype="int64")], mode="constant")
    pooled = b.op("MaxPool", [c], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0] if pad_node else [1] * 4)
    gamma = b.rng.uniform(0.5, 1.5, 8)
    gamma[3] *= gamma_sign
    params = [
        b.const(gamma, "gamma"),
        b.const(b.randn(8), "beta"),
        b.const(np.zeros(8), "mean"),
        b.const(np.ones(8), "var"),
    ]
    y = b.relu(b.bn(pooled, 8, params=params))
    outputs = [y, b.op("Sigmoid", [pooled])] if shared_pool else [y]
    return calibrate(b.model(*outputs), {"N": 2})


def test_resnetv2_maxpool_bn_folds_into_the_conv_through_the_pool():
    folded, report = check_fold(resnetv2_stem(), dims={"N": 2})
    (f,) = report.folded
    assert f.into_op == "Conv" and "through MaxPool" in f.into and not report.absorbed
    assert [n.op_type for n in folded.graph.node] == ["Conv", "MaxPool", "Relu"]


@pytest.mark.parametrize(
    "variant, reason",
    [
        ({"gamma_sign": -1.0}, "nonpositive_scale_after_pool"),
        ({"gamma_sign": 0.0}, "nonpositive_scale_after_pool"),
        ({"shared_pool": True}, "shared_producer_output"),
        ({"pad_node": True}, "unsupported_producer"),
    ],
    ids=["negative_scale", "zero_scale", "shared_pool", "zero_pad_node"],
)
def test_a_maxpool_the_map_does_not_commute_with_keeps_the_bn(variant, reason):
    _, report = check_fold(resnetv2_stem(**variant), left=1, dims={"N": 2})
    (left,) = report.left
    assert left.reason == reason, left.message
    if reason == "nonpositive_scale_after_pool":
        assert "channel 3" in left.message and "MaxPool" in left.message
    if reason == "shared_producer_output":
        assert "MaxPool" in left.message
    if reason == "unsupported_producer":
        assert "Pad" in left.message and "through MaxPool" in left.message


def test_a_wrong_fold_through_a_maxpool_would_be_caught():
    """The exact condition matters: with a negative scale, the fold computed anyway differs."""
    from conftest import assert_same

    from bnfold.fold import forward

    model = resnetv2_stem(gamma_sign=-1.0)
    real = forward._extend

    def permissive(scope, chains, i, x, step, kept=False, bn=False):
        found = real(scope, chains, i, x, step, kept, bn)
        if getattr(found, "code", None) is not None and found.code.value == "nonpositive_scale_after_pool":
            chain = chains[x]
            composed = chain.compose(i, step(chain), scope.index.node(i).output[0], bn=bn)
            chains.pop(x)
            chains[composed.end] = composed
            return composed
        return found

    import unittest.mock

    with unittest.mock.patch.object(forward, "_extend", permissive):
        wrong, report = bnfold.fold(model)
    assert not report.left
    with pytest.raises(AssertionError, match="relative error"):
        assert_same(model, wrong, dims={"N": 2})


def timm_head(flatten: str = "Flatten") -> onnx.ModelProto:
    """A classifier head: Conv -> GlobalAveragePool -> Flatten (or Reshape [N, C]) -> BN1d -> Gemm."""
    b = Builder(seed=13)
    x = b.input("x", ["N", 4, 8, 8])
    gap = b.op("GlobalAveragePool", [b.conv(x, 4, 12, 3)])
    if flatten == "Flatten":
        flat = b.op("Flatten", [gap], axis=1)
    else:
        flat = b.op("Reshape", [gap, b.const([0, 12] if flatten == "Reshape" else [0, 3, 4], "shape", dtype="int64")])
    y = b.bn(flat, 12) if flatten != "Reshape3" else b.op("Flatten", [b.bn(flat, 3)], axis=1)
    return calibrate(b.model(b.gemm(b.relu(y), 12, 5)), {"N": 3})


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_a_bn1d_after_a_global_pool_and_flatten_folds_into_the_conv(flatten):
    folded, report = check_fold(timm_head(flatten), dims={"N": 3})
    (f,) = report.folded
    assert f.into_op == "Conv" and "GlobalAveragePool" in f.into and flatten in f.into
    assert [n.op_type for n in folded.graph.node][:3] == ["Conv", "GlobalAveragePool", flatten]


def test_a_reshape_that_moves_channels_keeps_the_bn():
    _, report = check_fold(timm_head("Reshape3"), left=1, dims={"N": 3})
    assert report.left[0].reason == "axis_mismatch" and "Reshape" in report.left[0].message


def levit_linear_norm(
    reshape: str = "Reshape", bias: bool = False, moves_channels: bool = False, shared: bool = False
) -> onnx.ModelProto:
    """timm's LeViT LinearNorm: MatMul (rank 3) -> Reshape [B*N, C] (or Flatten) -> BN1d -> Reshape
    back to [B, N, C]."""
    b = Builder(seed=14)
    x = b.input("x", ["B", 10, 16])
    y = b.op("MatMul", [x, b.const(b.randn(16, 24), "w")])
    if bias:
        y = b.op("Add", [y, b.const(b.randn(24), "bias")])
    if reshape == "Flatten":
        flat = b.op("Flatten", [y], axis=2)
    else:
        flat = b.op("Reshape", [y, b.const([-1, 10 * 24] if moves_channels else [-1, 24], "flat", dtype="int64")])
    channels = 240 if moves_channels else 24
    z = b.op("Reshape", [b.bn(flat, channels), b.op("Shape", [y] if not shared else [flat])])
    outputs = [b.relu(z)] + ([b.op("Sigmoid", [flat])] if shared else [])
    return calibrate(b.model(*outputs), {"B": 2})


@pytest.mark.parametrize("reshape, bias", [("Reshape", False), ("Flatten", False), ("Reshape", True)])
def test_levit_matmul_reshape_bn1d_folds_into_the_matmul(reshape, bias):
    folded, report = check_fold(levit_linear_norm(reshape, bias), dims={"B": 2})
    (f,) = report.folded
    assert f.into_op == "MatMul" and reshape in f.into
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("BatchNormalization") == 0 and ops[:3] == ["MatMul", "Add", reshape]
    assert report.absorbed == (["Add 'add0'"] if bias else [])


@pytest.mark.parametrize("variant", ["moves_channels", "shared"])
def test_levit_forms_that_would_change_meaning_keep_the_bn(variant):
    _, report = check_fold(levit_linear_norm(**{variant: True}), left=1, dims={"B": 2})
    reason = report.left[0].reason
    assert reason == ("axis_mismatch" if variant == "moves_channels" else "shared_producer_output"), report.left


def sequence_bn1d(bias: bool = False, conv1d: bool = False, shared: bool = False) -> onnx.ModelProto:
    """PyTorch's BatchNorm1d over a sequence after a Linear: ``bn(fc(x).transpose(1, 2)).transpose(1,
    2)``, exported as MatMul (rank 3) -> Transpose [0, 2, 1] -> BN -> Transpose [0, 2, 1]. With
    ``conv1d``, a Conv1d's output transposed to [N, L, C] meets a BN over L: not its channels."""
    b = Builder(seed=21)
    if conv1d:
        y, channels = b.conv(b.input("x", ["B", 16, 10]), 16, 24, 3, dims=1), 10
    else:
        y, channels = b.op("MatMul", [b.input("x", ["B", 10, 16]), b.const(b.randn(16, 24), "w")]), 24
    if bias:
        y = b.op("Add", [y, b.const(b.randn(24), "bias")])
    t = b.op("Transpose", [y], perm=[0, 2, 1])
    z = b.relu(b.op("Transpose", [b.bn(t, channels)], perm=[0, 2, 1]))
    return calibrate(b.model(z, *([b.op("Sigmoid", [y])] if shared else [])), {"B": 2})


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
def test_a_bn1d_between_transposes_folds_into_the_linear(bias):
    folded, report = check_fold(sequence_bn1d(bias), dims={"B": 2})
    (f,) = report.folded
    assert f.into_op == "MatMul" and "Transpose" in f.into
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Transpose", "Transpose", "Relu"]
    assert report.absorbed == (["Add 'add0'"] if bias else [])


def tf_nhwc_affine(perm_back=(0, 3, 1, 2), bn_after: bool = False) -> onnx.ModelProto:
    """tf2onnx's NHWC islands: Conv -> Transpose to NHWC -> Mul, Add by (C,) constants (a Keras BN
    as Keras 3 writes it) -> Transpose back (-> a BN in NCHW)."""
    b = Builder(seed=22)
    t = b.op("Transpose", [b.conv(b.input("x", ["N", 3, 8, 8]), 3, 8, 3)], perm=[0, 2, 3, 1])
    y = b.op("Add", [b.op("Mul", [t, b.const(b.rng.uniform(0.5, 2.0, 8), "scale")]), b.const(b.randn(8), "shift")])
    y = b.op("Transpose", [y], perm=list(perm_back))
    y = b.bn(y, 8) if bn_after else y
    return calibrate(b.model(b.relu(y)), {"N": 2}) if bn_after else b.model(b.relu(y))


@pytest.mark.parametrize("bn_after", [False, True], ids=["affine", "affine_and_bn"])
def test_nhwc_affine_ops_between_transposes_fold_into_the_conv(bn_after):
    folded, report = check_fold(tf_nhwc_affine(bn_after=bn_after), dims={"N": 2})
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Transpose", "Transpose", "Relu"]
    assert report.absorbed == ["Mul 'mul0'", "Add 'add0'"]
    assert [f.into_op for f in report.folded] == (["Conv"] if bn_after else [])
    assert report.affine == ([] if bn_after else ["Mul + Add -> Conv conv0"])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: sequence_bn1d(conv1d=True), "it normalizes axis 1 of a rank-3 value whose channels"),
        (lambda: sequence_bn1d(shared=True), "is read by 2 nodes (the BN reaches it through Transpose"),
        (lambda: tf_nhwc_affine(perm_back=(0, 1, 3, 2), bn_after=True), "moves the channels to axis 2"),
    ],
    ids=["bn_over_the_sequence", "shared", "channels_to_axis_2"],
)
def test_transposes_that_would_change_meaning_keep_the_bn(make, reason):
    _, report = check_fold(make(), left=1, dims={"B": 2, "N": 2})
    (left,) = report.left
    assert reason in left.message, left


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.permutations(range(4)),
    second=st.one_of(st.none(), st.permutations(range(4))),
    const_axis=st.one_of(st.none(), st.integers(0, 3)),  # None: the axis the channels are on then
    matmul=st.booleans(),
)
def test_any_transposes_fold_exactly_or_keep_the_bn(first, second, const_axis, matmul):
    """Conv (or a rank-4 MatMul) -> Transpose -> Mul by a constant along one axis -> (Transpose) ->
    BN, for any permutations: the folded model computes what the original does, and whatever stays
    says why (the channels are not where the constant or the BN reads them)."""
    b = Builder(seed=23)
    shape = [2, 3, 4, 5]
    if matmul:  # output columns (5) on the last axis
        y = b.op("MatMul", [b.input("x", [2, 3, 4, 6]), b.const(b.randn(6, 5), "w")])
    else:  # output channels (3) on axis 1
        y = b.conv(b.input("x", [2, 2, 4, 5]), 2, 3, 3)
    y = b.op("Transpose", [y], perm=list(first))
    shape = [shape[k] for k in first]
    axis = first.index(3 if matmul else 1)  # where the channels are after each Transpose
    const_axis = axis if const_axis is None else const_axis
    const = np.ones(4, dtype=int)
    const[const_axis] = shape[const_axis]
    y = b.op("Mul", [y, b.const(b.rng.uniform(0.5, 2.0, tuple(const)), "scale")])
    if second is not None:
        y = b.op("Transpose", [y], perm=list(second))
        shape = [shape[k] for k in second]
    model = b.model(b.relu(b.bn(y, shape[1])))
    # The map folds when the constant varies along the channels' axis and the BN finds them on axis
    # 1, each Transpose leaving them on axis 1 or the last axis.
    folds = axis in (1, 3) and const_axis == first.index(3 if matmul else 1)
    if second is not None:
        axis = second.index(axis)
        folds = folds and axis in (1, 3)
    folds = folds and axis == 1
    _, report = check_fold(model, left=0 if folds else 1)
    for left in report.left:
        assert left.reason in ("axis_mismatch", "unsupported_producer"), left


@pytest.mark.parametrize("pads, folds", [([0, 0, 0, 0], True), ([1, 1, 1, 1], False)], ids=["unpadded", "padded"])
def test_an_average_pool_passes_the_map_only_without_padding(pads, folds):
    """avg(s * y + t) = s * avg(y) + t, but zeros counted into a padded window are not mapped."""
    b = Builder(seed=15)
    x = b.input("x", ["N", 3, 8, 8])
    pooled = b.op("AveragePool", [b.conv(x, 3, 6, 3)], kernel_shape=[2, 2], pads=pads, count_include_pad=1)
    model = calibrate(b.model(b.relu(b.bn(pooled, 6))), {"N": 2})
    _, report = check_fold(model, left=0 if folds else 1, dims={"N": 2})
    if not folds:
        assert report.left[0].reason == "padded_pool"


def repvgg_block(
    variant: str = "", c: int = 8, group: int = 1, mobileone: bool = False, size: int = 8
) -> onnx.ModelProto:
    """timm's RepVGG block in eval mode, exported: Relu -> (Conv3x3 -> BN) + (Conv1x1 -> BN) + BN -> Relu.
    MobileOne sums its branches one Add at a time, identity (BN) first."""
    b = Builder(seed=16)
    if variant == "stride2":  # 2x2 in, 1x1 out: the strided branches broadcast against the identity
        size = 2
    x = b.relu(b.input("x", ["N", c, size, size]))
    stride = 2 if variant == "stride2" else 1
    kxk_in = x
    if variant == "pad_node":  # TF-style: an explicit reflect Pad before a pads=0 Conv
        kxk_in = b.op("Pad", [x, b.const([0, 0, 1, 1, 0, 0, 1, 1], "pads", dtype="int64")], mode="reflect")
    kxk = b.bn(
        b.conv(kxk_in, c, c, 3, group=group, bias=False, stride=stride, pad=0 if variant == "pad_node" else 1), c
    )
    one = b.bn(b.conv(x, c, c, 1, group=group, bias=False, stride=stride, pad=0), c)
    identity = b.bn(x, c)
    if mobileone:
        y = b.op("Add", [b.op("Add", [identity, one]), kxk])
    else:
        y = b.op("Add", [b.op("Add", [one, kxk]), identity])
    outputs = [b.relu(y)]
    if variant == "shared":  # both branch outputs are read elsewhere too
        outputs += [b.op("Sigmoid", [one]), b.op("Sigmoid", [kxk])]
    return calibrate(b.model(*outputs), {"N": 2})


@pytest.mark.parametrize("mobileone", [False, True], ids=["repvgg", "mobileone"])
@pytest.mark.parametrize("group", [1, 4], ids=["dense", "grouped"])
def test_repvgg_identity_branch_folds_into_a_sibling_conv(mobileone, group):
    folded, report = check_fold(repvgg_block(group=group, mobileone=mobileone), dims={"N": 2})
    directions = sorted(f.direction for f in report.folded)
    assert directions == ["forward", "forward", "identity"]
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Add") == 1 and "Identity" not in ops and ops.count("Conv") == 2
    # No name of the original carries another value: every BN output left is compared per layer.
    result = bnfold.verify(repvgg_block(group=group, mobileone=mobileone), folded, per_layer=True, dims={"N": 2})
    assert result.passed, result.render_text()
    _, off = bnfold.fold(repvgg_block(group=group, mobileone=mobileone), reparameterize=False)
    assert [x.reason for x in off.left] == ["unsupported_producer"]


@pytest.mark.parametrize(
    "variant, reason",
    [("stride2", "identity_branch"), ("pad_node", None), ("shared", "unsupported_producer")],
    ids=["stride2", "padded_by_a_pad_node", "shared_branches"],
)
def test_identity_branches_that_would_change_meaning_stay(variant, reason):
    """stride 2: the Conv's output is not aligned with its input; a reflect Pad node: the sibling
    reads another tensor (the 1x1 Conv takes the identity instead); shared: no Conv can change."""
    _, report = check_fold(repvgg_block(variant), left=0 if reason is None else 1, dims={"N": 2})
    if reason is None:
        (ident,) = [f for f in report.folded if f.direction == "identity"]
        assert ident.into == "conv1"
    else:
        (left,) = report.left
        assert left.reason == reason, left.message
        if reason == "identity_branch":
            assert "stride" in left.message


def test_a_wrong_identity_kernel_would_be_caught():
    """An identity put at a corner tap instead of the centre makes verification fail."""
    from conftest import assert_same

    from bnfold.fold import reparam

    model = repvgg_block()
    real = reparam.identity_tap

    def corner(node, w):
        tap = real(node, w)
        return tuple(0 for _ in tap) if isinstance(tap, tuple) else tap

    import unittest.mock

    with unittest.mock.patch.object(reparam, "identity_tap", corner):
        wrong, report = bnfold.fold(model)
    assert any(f.direction == "identity" and f.into == "conv0" for f in report.folded)
    with pytest.raises(AssertionError, match="relative error"):
        assert_same(model, wrong, dims={"N": 2})


def jax2onnx_stale_value_info() -> onnx.ModelProto:
    """jax2onnx declares some values in NHWC though the graph computes NCHW: the input itself fails
    onnx.checker (full_check), while onnxruntime runs it (lenient merge)."""
    b = Builder(seed=17)
    x = b.input("x", [1, 3, 8, 8])
    r = b.relu(b.bn(b.conv(x, 3, 4, 3), 4))
    model = calibrate(b.model(b.op("Sigmoid", [r])), {})
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, [1, 8, 8, 4]))
    return model


def test_an_input_that_fails_the_checker_is_reported_and_no_claim_is_made():
    from conftest import assert_same

    model = jax2onnx_stale_value_info()
    folded, report = bnfold.fold(model, check=True)
    assert report.checker["input"] and "ShapeInferenceError" in report.checker["input"]
    assert report.checker["output"] is not None and not report.checker_regressed
    text = report.render_text()
    assert "the input FAILS" in text and "no claim is made for the output" in text
    assert report.to_dict()["checker"] == report.checker
    assert_same(model, folded)


def test_a_checked_fold_of_a_sound_model_says_both_pass(tmp_path):
    import json

    from click.testing import CliRunner

    from bnfold.cli import cli

    src = tmp_path / "m.onnx"
    onnx.save(resnetv2_stem(), str(src))
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "o.onnx"), "--check", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["checker"] == {"input": None, "output": None}
    _, report = bnfold.fold(resnetv2_stem())
    assert report.checker is None  # not asked: nothing claimed


def test_a_checked_batch_says_each_models_checker_verdict(tmp_path):
    from click.testing import CliRunner

    from bnfold.cli import cli

    onnx.save(resnetv2_stem(), str(tmp_path / "sound.onnx"))
    onnx.save(jax2onnx_stale_value_info(), str(tmp_path / "stale.onnx"))
    out = tmp_path / "out"
    args = ["fold", str(tmp_path / "sound.onnx"), str(tmp_path / "stale.onnx"), "-o", str(out)]
    result = CliRunner().invoke(cli, [*args, "--check"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.endswith((".onnx", "passes", "fails"))}
    assert rows["sound.onnx"].endswith("folded; checker passes"), result.output
    assert rows["stale.onnx"].endswith("folded; checker: the input fails"), result.output
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 0 and "checker" not in plain.output


def test_an_output_failing_the_checker_where_the_input_passed_is_a_bug(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import bnfold.api
    from bnfold.cli import cli

    src = tmp_path / "m.onnx"
    onnx.save(resnetv2_stem(), str(src))
    monkeypatch.setattr(bnfold.api, "checker_problem", lambda m: "broken" if str(m).endswith("o.onnx") else None)
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "o.onnx"), "--check", "-q"])
    assert result.exit_code == 3 and "fails onnx.checker where the input passed" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("op", ["Add", "MaxPool"])
def test_a_shared_output_behind_an_add_or_a_pool_is_named_as_the_obstacle(op):
    """Conv (also read elsewhere) -> Add(bias) or MaxPool -> BN: the reason is the sharing."""
    b = Builder(seed=18)
    x = b.input("x", [1, 3, 8, 8])
    c = b.conv(x, 3, 4, 3, bias=False)
    if op == "Add":
        mid = b.op("Add", [c, b.const(b.randn(1, 4, 1, 1), "bias")])
    else:
        mid = b.op("MaxPool", [c], kernel_shape=[2, 2])
    model = calibrate(b.model(b.relu(b.bn(mid, 4)), b.op("Sigmoid", [c])), {})
    _, report = check_fold(model, left=1)
    (left,) = report.left
    assert left.reason == "shared_producer_output" and "conv0" in left.message and op in left.message, left.message


INTS = [-3, -2, -1, 0, 1, 2, 3, 5]


def _mutated(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    """The model with one or two attributes, shape constants, op types or parameters changed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for _ in range(rng.choice([1, 1, 2])):
        node, kind = rng.choice(list(g.node)), rng.randrange(4)
        if kind == 0:
            name = rng.choice(
                ["pads", "strides", "dilations", "axis", "group", "kernel_shape", "ceil_mode", "auto_pad"]
            )
            if name == "auto_pad":
                value = rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"])
            elif name in ("axis", "group", "ceil_mode"):
                value = rng.choice(INTS)
            else:
                value = [rng.choice(INTS) for _ in range(rng.choice([2, 4]))]
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])
        elif kind == 1:
            t = rng.choice([t for t in g.initializer if t.data_type == onnx.TensorProto.INT64] or list(g.initializer))
            v = onnx.numpy_helper.to_array(t).copy()
            if v.size:
                v.reshape(-1)[rng.randrange(v.size)] = rng.choice(INTS + [8, 12, 24, 240])
            t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
        elif kind == 2 and node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Add"):
            node.op_type = rng.choice(
                ["MaxPool", "AveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Identity", "Add"]
            )
        else:
            t = rng.choice([t for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT])
            v = onnx.numpy_helper.to_array(t).copy()
            v.reshape(-1)[rng.randrange(v.size)] = rng.choice([-1.0, 0.0, -0.5, 1e30, np.inf])
            t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
    return m


def test_mutated_exporter_forms_never_crash_nor_change_meaning():
    """A seeded fuzz of the pass-through, LeViT and RepVGG forms: changed strides, pads, axes,
    groups, shape constants, op types and parameters. bnfold folds or refuses (BnfoldError), never
    crashes; wherever onnxruntime runs the mutated original, the fold computes the same."""
    import random

    from conftest import feeds_for, rel_error, run_ort

    from bnfold.errors import BnfoldError

    models = [
        resnetv2_stem(),
        timm_head("Reshape"),
        levit_linear_norm("Flatten", True),
        repvgg_block(),
        repvgg_block(group=4, mobileone=True),
    ]
    rng, compared = random.Random(2026), 0
    for k in range(150):
        model = _mutated(rng.choice(models), rng)
        try:
            folded, _ = bnfold.fold(model)
        except BnfoldError:
            continue
        feeds = feeds_for(model, dims={"N": 2, "B": 2})
        try:
            ref = run_ort(model, feeds)
        except Exception:  # the mutation made a model onnxruntime refuses: nothing to compare
            continue
        got = run_ort(folded, feeds)
        compared += 1
        for name, r in ref.items():
            finite = np.isfinite(r)
            assert np.array_equal(finite, np.isfinite(got[name])), (k, name)
            if finite.any():
                assert rel_error(r[finite], got[name][finite]) <= 1e-4, (k, name)
    assert compared > 50


def test_names_before_a_kept_step_do_not_carry_another_value():
    """Conv -> BN -> MaxPool -> BN, and LeViT: the values before the pool or the reshape carry the
    folded map, so they are renamed; every BN output left is still the original's (per layer)."""
    b = Builder(seed=19)
    x = b.input("x", ["N", 3, 8, 8])
    first = b.bn(b.conv(x, 3, 6, 3), 6)
    pooled = b.op("MaxPool", [first], kernel_shape=[2, 2], strides=[2, 2])
    gamma = b.rng.uniform(0.5, 1.5, 6)
    params = [b.const(gamma, "g"), b.const(b.randn(6), "b"), b.const(np.zeros(6), "m"), b.const(np.ones(6), "v")]
    model = calibrate(b.model(b.relu(b.bn(pooled, 6, params=params))), {"N": 2})
    for m, dims in ((model, {"N": 2}), (levit_linear_norm(bias=True), {"B": 2})):
        folded, report = check_fold(m, dims=dims)
        assert not report.left
        result = bnfold.verify(m, folded, per_layer=True, dims=dims)
        assert result.passed, result.render_text()


def test_a_model_too_large_for_the_checker_in_memory_is_not_called_failing(monkeypatch):
    import bnfold.io.load

    monkeypatch.setattr(bnfold.io.load, "CHECKER_LIMIT", 0)  # as if the proto were over 2 GB
    _, report = bnfold.fold(resnetv2_stem(), check=True)
    assert all(v.startswith("not checked: ") for v in report.checker.values())
    assert not report.checker_regressed and "was not checked" in report.render_text()


@pytest.mark.parametrize("cycle", ["identity", "add"])
def test_cycles_in_a_malformed_graph_are_refused(cycle):
    """A cycle of Identity nodes before a BN, or of Adds after an identity-branch BN: not a graph, so
    nothing is decided on it (onnxruntime refuses it too); the error names the values around the cycle."""
    F = onnx.TensorProto.FLOAT
    h = onnx.helper
    if cycle == "identity":
        nodes = [h.make_node("Identity", ["b"], ["a"]), h.make_node("Identity", ["a"], ["b"])]
        x, out, loop = "a", "y", "main graph: the nodes form a cycle (a -> b -> a)"
    else:
        nodes = [h.make_node("Add", ["a2", "y"], ["a1"]), h.make_node("Add", ["a1", "r"], ["a2"])]
        x, out, loop = "r", "r", "main graph: the nodes form a cycle (a1 -> a2 -> a1)"
    nodes = [
        h.make_node("Relu", ["x"], ["r"]),
        *nodes,
        h.make_node("BatchNormalization", [x, "gamma", "beta", "m", "v"], ["y"]),
    ]
    inits = [onnx.numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("gamma", "beta", "m", "v")]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", F, [1, 2, 2, 2])], [h.make_tensor_value_info(out, F, None)], inits
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 10
    with pytest.raises(bnfold.BnfoldError) as caught:
        bnfold.fold(model)
    assert str(caught.value) == loop


def test_an_input_that_could_not_be_checked_is_not_said_to_fail(monkeypatch):
    import bnfold.io.load

    monkeypatch.setattr(bnfold.io.load, "CHECKER_LIMIT", 0)
    _, report = bnfold.fold(resnetv2_stem(), check=True)
    assert "input failed the checker" not in report.render_text()
