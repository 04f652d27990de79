"""Folds that never distort: extreme BN parameters either fold into a model that computes what the
original computes (NaN/Inf positions included), or the BN stays with the right reason; hazards of
the folds that are made are reported, and --strict refuses them."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import check_fold, feeds_for, run_ort, run_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bnfold
from bnfold.cli import cli
from bnfold.proto import tensor_type, to_array
from models import Builder

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
C = 3


def conv_bn(dtype, gamma, beta, mean, var, epsilon=1e-5, weight=None) -> onnx.ModelProto:
    """x -> Conv(3 -> 3, 1x1) -> BN -> y, everything of ``dtype``."""
    elem = tensor_type(np.dtype(dtype))
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.5, (C, C, 1, 1)) if weight is None else weight
    with np.errstate(all="ignore"):  # extreme values overflow in 16-bit types on purpose
        inits = [
            numpy_helper.from_array(np.asarray(a, dtype=np.float64).astype(dtype), n)
            for n, a in (("w", w), ("g", gamma), ("b", beta), ("m", mean), ("v", var))
        ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn", epsilon=epsilon),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [1, C, 2, 2])],
        [helper.make_tensor_value_info("y", elem, [1, C, 2, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def outputs(model, dtype_name):
    runner = run_reference if dtype_name == "bfloat16" else run_ort
    feeds = feeds_for(model, 0)
    return runner(model, feeds)["y"].astype(np.float64)


def same_including_specials(ref: np.ndarray, got: np.ndarray, tol: float, intermediate: float = 0.0) -> None:
    """NaN/Inf at the same places; finite values within ``tol`` of the larger of the output's magnitude
    and ``intermediate``, the magnitude of the values the unfolded BN computes with: its own rounding
    scales with those (``(x - 1e30) * s + 1e30`` in float32 loses everything below 1e23)."""
    assert np.array_equal(np.isnan(ref), np.isnan(got)), (ref, got)
    assert np.array_equal(np.isinf(ref), np.isinf(got)) and np.array_equal(ref[np.isinf(ref)], got[np.isinf(got)])
    finite = np.isfinite(ref)
    if finite.any():
        scale = max(float(np.abs(ref[finite]).max()), intermediate, 1e-30)
        assert float(np.abs(ref[finite] - got[finite]).max()) / scale <= tol, (ref, got)


special = st.sampled_from([np.nan, np.inf, -np.inf])
gammas = st.one_of(st.sampled_from([0.0, 1e-30, 1e-8, 1e-3, 1e3, 1e8, 1e30, 1e300]), st.floats(-2, 2), special)
variances = st.one_of(
    st.sampled_from([0.0, 1e-30, 1e-12, 1e-6, 1e6, 1e12, 1e30, -1e-5, -1.0]), st.floats(0, 4), special
)
plain = st.one_of(st.floats(-3, 3), special, st.sampled_from([1e30, -1e30]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype_name=st.sampled_from(sorted(DTYPES)),
    channel=st.integers(0, C - 1),
    gamma=gammas,
    beta=plain,
    mean=plain,
    var=variances,
    epsilon=st.sampled_from([0.0, 1e-5]),
)
def test_extreme_parameters_fold_exactly_or_stay_with_the_right_reason(
    dtype_name, channel, gamma, beta, mean, var, epsilon
):
    dtype = DTYPES[dtype_name]
    params = {k: np.array([1.0, 0.0, 0.0, 1.0][i] * np.ones(C)) for i, k in enumerate(("g", "b", "m", "v"))}
    for k, v in zip("gbmv", (gamma, beta, mean, var), strict=False):
        params[k][channel] = v
    model = conv_bn(dtype, params["g"], params["b"], params["m"], params["v"], epsilon)
    folded, report = bnfold.fold(model)
    with np.errstate(all="ignore"):
        stored = {k: np.asarray(params[k]).astype(dtype).astype(np.float64) for k in params}  # as the model holds them
    if report.folded:
        assert not report.left
        weights = [to_array(t).astype(np.float64) for t in folded.graph.initializer]
        assert all(np.isfinite(w).all() for w in weights)  # the original's weights were finite
        with np.errstate(all="ignore"):
            s = stored["g"] / np.sqrt(stored["v"] + float(np.float32(epsilon)))
            intermediate = float(np.max(np.abs(stored["b"]) + np.abs(stored["m"] * s)))
        same_including_specials(outputs(model, dtype_name), outputs(folded, dtype_name), TOL[dtype_name], intermediate)
        return
    (left,) = report.left
    if not all(np.isfinite(v).all() for v in stored.values()):
        assert left.reason == "nonfinite_parameter", left
    elif (stored["v"] + float(np.float32(epsilon)) <= 0).any():  # the attribute is stored as float32
        assert left.reason == "nonpositive_variance", left
    else:
        assert left.reason == "unsafe_fold", left
        assert "channel" in left.message


def test_float16_overflow_is_refused_naming_tensor_channel_and_value():
    model = conv_bn(np.float16, [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1e-7, 1], epsilon=0.0)  # s ~ 3162 on channel 1
    weight = np.full((C, C, 1, 1), 40.0)
    model = conv_bn(np.float16, [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1e-7, 1], epsilon=0.0, weight=weight)
    _, report = bnfold.fold(model)
    (left,) = report.left
    assert left.reason == "unsafe_fold" and "'w' at channel 1" in left.message and "not finite" in left.message


def test_flush_below_the_normal_range_is_refused():
    weight = np.full((C, C, 1, 1), 1e-3)  # normal in float16 (smallest normal 6.1e-5)
    model = conv_bn(np.float16, [1, 1e-3, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1], weight=weight)
    (left,) = bnfold.fold(model)[1].left
    assert left.reason == "unsafe_fold" and "smallest normal" in left.message


def test_a_constant_subgraph_that_overflows_is_a_nonfinite_parameter():
    model = conv_bn(np.float32, [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1])
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.full(C, 1e30, np.float32), "base"))
    g.initializer.append(numpy_helper.from_array(np.array(4.0, np.float32), "four"))
    g.node.insert(0, helper.make_node("Pow", ["base", "four"], ["g_pow"]))
    g.node[-1].input[1] = "g_pow"
    (left,) = bnfold.fold(model)[1].left
    assert left.reason == "nonfinite_parameter" and "inf" in left.message


def assert_same_per_channel(model: onnx.ModelProto, folded: onnx.ModelProto, tol: float = 1e-5) -> None:
    """Each output channel within ``tol`` of that channel's largest magnitude: where one channel is
    scaled to 1e37, an error in another is invisible relative to the whole output."""
    for seed in range(2):
        feeds = feeds_for(model, seed)
        ref, got = run_ort(model, feeds), run_ort(folded, feeds)
        for name in ref:
            r, g = (np.moveaxis(a.astype(np.float64), 1, 0).reshape(a.shape[1], -1) for a in (ref[name], got[name]))
            err = np.abs(r - g).max(axis=1) / np.maximum(np.abs(r).max(axis=1), 1e-30)
            assert err.max() <= tol, f"output {name}: channel {int(err.argmax())} off by {err.max():.3g}"


def conv_pool_bn(dtype, pool: str, beta1: float, spatial=5) -> onnx.ModelProto:
    """x -> Conv -> BN -> AveragePool 2x2 or GlobalAveragePool -> BN(beta = [0, beta1, 0]) -> y."""
    b = Builder(seed=2, dtype=dtype)
    x = b.input("x", [1, C, spatial, spatial])
    y = b.bn(b.conv(x, C, C, 3), C)
    y = b.op(pool, [y], kernel_shape=[2, 2]) if pool == "AveragePool" else b.op(pool, [y])
    params = b.bn_params(C)
    b.inits[-3].CopyFrom(numpy_helper.from_array(np.array([0.0, beta1, 0.0], dtype=dtype), params[1]))
    return b.model(b.bn(y, C, params=params))


@pytest.mark.parametrize(
    "pool, beta1, refused",
    [
        ("GlobalAveragePool", 1e38, True),  # 25 values of 1e38 summed: past float32's 3.4e38
        ("GlobalAveragePool", 1e37, False),  # 2.5e38 fits
        ("AveragePool", 1e38, True),  # 4 values of 1e38
        ("AveragePool", 5e37, False),  # 2e38 fits
    ],
    ids=["global-over", "global-fits", "2x2-over", "2x2-fits"],
)
def test_a_bias_an_average_pool_would_sum_past_the_dtype_is_refused(pool, beta1, refused):
    """Folded forward through an average pool, the BN's shift enters the pool's sum, which float32
    runtimes add up in float32: the BN after the pool stays when that sum would overflow."""
    model = conv_pool_bn(np.float32, pool, beta1)
    folded, report = check_fold(model, left=int(refused), tol=1e-5, full_check=False)
    assert_same_per_channel(model, folded)
    if refused:  # the chain Conv -> BN -> pool -> BN is refused; its first part, Conv -> BN, folds
        assert [f.name for f in report.folded] == ["bn0"]
        assert [(left.name, left.reason) for left in report.left] == [("bn1", "unsafe_fold")]
        assert "average pool after it adds up" in report.left[0].message and "float32" in report.left[0].message
    # Without the check the fold computes inf where the original computes 1e38.
    assert np.isfinite(run_ort(model, feeds_for(model, 0))["bn1"]).all()


def test_a_weight_whose_sums_could_overflow_is_refused():
    """gamma = 2e38: each folded weight (about 2e38) fits float32, but a 1x1 Conv over 3 channels
    adds up 3 such products, which can pass 3.4e38 where the unfolded Conv scales its small sum."""
    model = conv_bn(np.float32, [1, 2e38, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1], weight=np.full((C, C, 1, 1), 0.9))
    _, report = check_fold(model, left=1, full_check=False)
    (left,) = report.left
    assert left.reason == "unsafe_fold" and "'w' at channel 1" in left.message and "adds up 3" in left.message
    ok = conv_bn(np.float32, [1, 1e37, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1], weight=np.full((C, C, 1, 1), 0.9))
    assert not bnfold.fold(ok)[1].left  # 9e36 x 3 fits
    # An ordinary scale (3) on huge weights (4e37): the stacked shortcut must refuse to clear it too.
    huge = conv_bn(np.float32, [1, 3, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1], weight=np.full((C, C, 1, 1), 4e37))
    (left,) = check_fold(huge, left=1, full_check=False)[1].left
    assert left.reason == "unsafe_fold" and "adds up 3" in left.message


def conv_bn_step_bn(step: str, gamma1: float = 1e37, c: int = 32) -> onnx.ModelProto:
    """x -> Conv 3x3 (c -> c) -> BN -> step -> BN whose channel 2 has scale ``gamma1`` -> y. Folded
    as one chain, that scale times the layer's fan-in (c * 9 products) passes float32's range, where
    the unfolded Conv adds up small products and the BN scales their sum (below 1e38: finite)."""
    b = Builder(seed=4, he_init=True)
    x = b.input("x", [1, c, 6, 6])
    params = [b.const(b.rng.uniform(0.8, 1.2, c), "gamma"), b.const(b.rng.uniform(-0.1, 0.1, c), "beta")]
    params += [b.const(b.rng.uniform(-0.1, 0.1, c), "mean"), b.const(b.rng.uniform(0.8, 1.2, c), "var")]
    y = b.bn(b.conv(x, c, c, 3), c, params=params)
    if step == "Mul":
        y = b.op("Mul", [y, b.const(b.rng.uniform(1.0, 1.2, (1, c, 1, 1)))])
    elif step == "MaxPool":
        y = b.op("MaxPool", [y], kernel_shape=[2, 2])
    elif step == "Identity":
        y = b.op("Identity", [y])
    gamma = b.rng.uniform(0.8, 1.2, c)
    gamma[2] = gamma1
    params = [b.const(gamma, "gamma"), b.const(np.zeros(c), "beta"), b.const(np.zeros(c), "mean"), b.const(np.ones(c))]
    return b.model(b.bn(y, c, params=params))


@pytest.mark.parametrize("step", ["none", "Mul", "MaxPool", "Identity"])
def test_a_refused_chain_still_folds_its_first_part(step):
    """Conv -> BN -> (step) -> BN: when the chain as a whole would overflow, the part before the last
    BN folds on its own and the last BN stays, with the reason."""
    model = conv_bn_step_bn(step)
    folded, report = check_fold(model, left=1, full_check=False)
    assert_same_per_channel(model, folded)
    assert [f.name for f in report.folded] == ["bn0"]
    ((name, reason),) = [(left.name, left.reason) for left in report.left]
    assert (name, reason) == ("bn1", "unsafe_fold") and "adds up 288" in report.left[0].message
    assert report.absorbed == {"Mul": ["Mul 'mul0'"], "Identity": ["Identity 'identity0'"]}.get(step, [])
    ops = [n.op_type for n in folded.graph.node]
    assert ops == (["Conv", "MaxPool", "BatchNormalization"] if step == "MaxPool" else ["Conv", "BatchNormalization"])
    assert folded.graph.node[-1].output[0] == model.graph.node[-1].output[0]
    # A scale the chain can take folds whole.
    assert not check_fold(conv_bn_step_bn(step, gamma1=3.0), full_check=False)[1].left


def test_strict_folds_the_part_of_a_chain_without_a_hazard():
    """--strict refuses the chain for its last BN's extreme scale; the first BN has none and folds."""
    model = conv_bn_step_bn("MaxPool", gamma1=5e3)
    folded, report = check_fold(model, left=0, full_check=False)
    assert_same_per_channel(model, folded)
    assert {w["code"] for w in report.warnings} >= {"extreme_scale"}
    assert {w["bn"] for w in report.warnings} == {"bn0, bn1"}  # hazards of the chain's composed scale
    folded, strict = check_fold(model, left=1, full_check=False, strict=True)
    assert_same_per_channel(model, folded)
    assert [f.name for f in strict.folded] == ["bn0"] and not strict.warnings
    assert [(left.name, left.reason) for left in strict.left] == [("bn1", report.warnings[0]["code"])]


def bn_layer_bn(dtype, layer: str = "conv", sb: float = 1.0, sa: float = 1.0, c: int = 4) -> onnx.ModelProto:
    """x -> BN (channel 1's scale times ``sb``) -> 1x1 Conv without padding, or Gemm(alpha, beta) ->
    BN (channel 2's scale times ``sa``) -> y: the first BN folds backward and the second forward, into
    the same layer."""
    b = Builder(seed=5, dtype=dtype)
    x = b.input("x", [1, c, 5, 5] if layer == "conv" else [3, c])

    def bn(y: str, k: int, times: float) -> str:
        gamma = b.rng.uniform(0.5, 1.5, c)
        gamma[k] *= times
        moments = [b.rng.uniform(-0.2, 0.2, c), b.rng.uniform(-0.2, 0.2, c), b.rng.uniform(0.5, 2.0, c)]
        return b.bn(y, c, params=[b.const(gamma, "gamma"), *(b.const(v) for v in moments)])

    y = bn(x, 1, sb)
    y = b.conv(y, c, c, 1, pad=0) if layer == "conv" else b.gemm(y, c, c, alpha=1.5, beta=0.5)
    return b.model(bn(y, 2, sa))


@pytest.mark.parametrize("layer", ["conv", "gemm"])
def test_a_layer_folded_both_ways_is_cast_once(layer):
    """The weight of a layer that takes a BN before it and one after it is computed in float64 with
    both and rounded once (folded one after the other, it was rounded twice)."""
    model = bn_layer_bn(np.float16, layer)
    folded, report = check_fold(model, tol=1e-2)
    assert sorted(f.direction for f in report.folded) == ["backward", "forward"]
    values = {t.name: to_array(t).astype(np.float64) for t in model.graph.initializer}
    first, node, second = model.graph.node
    s_b, _ = bnfold.batchnorm.scale_shift(*(values[n] for n in first.input[1:]))
    s_a, _ = bnfold.batchnorm.scale_shift(*(values[n] for n in second.input[1:]))
    w = values[node.input[1]]
    if layer == "conv":
        expected = (w * s_a[:, None, None, None]) * s_b[None, :, None, None]
    else:
        expected = (w * s_a[None, :]) * s_b[:, None]
    (layer_node,) = folded.graph.node
    got = next(t for t in folded.graph.initializer if t.name == layer_node.input[1])
    assert to_array(got).tobytes() == expected.astype(np.float16).tobytes()


def test_a_concat_branch_folded_both_ways_is_cast_once():
    """x -> BN -> Conv and x -> Relu -> Conv, concatenated -> BN: the first Conv takes the first BN
    (backward) and its part of the second (split over the Concat's branches), rounded once."""
    b = Builder(seed=6, dtype=np.float16)
    x = b.input("x", [1, 16, 5, 5])
    left = b.conv(b.bn(x, 16), 16, 12, 1, pad=0)
    cat = b.op("Concat", [left, b.conv(b.relu(x), 16, 4, 1, pad=0)], axis=1)
    model = b.model(b.bn(cat, 16))
    folded, report = check_fold(model, tol=1e-2)
    assert sorted(f.direction for f in report.folded) == ["backward", "split"]
    values = {t.name: to_array(t).astype(np.float64) for t in model.graph.initializer}
    bn0, conv0 = model.graph.node[:2]
    s_b, _ = bnfold.batchnorm.scale_shift(*(values[n] for n in bn0.input[1:]))
    s_a, _ = bnfold.batchnorm.scale_shift(*(values[n] for n in model.graph.node[-1].input[1:]))
    expected = (values[conv0.input[1]] * s_a[:12, None, None, None]) * s_b[None, :, None, None]
    layer = next(n for n in folded.graph.node if n.name == conv0.name)
    got = next(t for t in folded.graph.initializer if t.name == layer.input[1])
    assert to_array(got).tobytes() == expected.astype(np.float16).tobytes()


def test_a_layer_folded_both_ways_is_checked_with_both():
    """Each fold alone fits float32 (scales of 3e20 on weights near 0.1), both together overflow: the
    backward one is refused, naming the forward one, and no output becomes inf that was finite."""
    model = bn_layer_bn(np.float32, sb=3e20, sa=3e20)
    folded, report = bnfold.fold(model)
    assert [(f.name, f.direction) for f in report.folded] == [("bn1", "forward")]
    (left,) = report.left
    assert left.name == "bn0" and left.reason == "unsafe_fold" and "(with bn1 folded into conv0 too)" in left.message
    assert all(np.isfinite(to_array(t)).all() for t in folded.graph.initializer)
    for seed in range(3):
        feeds = feeds_for(model, seed)
        ref, got = (run_ort(m, feeds)["bn1"].astype(np.float64) for m in (model, folded))
        assert not np.isfinite(ref).all()  # the scales make some outputs inf, and the fold must keep the others
        same_including_specials(ref, got, 1e-5)
    assert not bnfold.fold(bn_layer_bn(np.float32, sb=3e20))[1].left  # the first BN alone folds


def test_float16_average_pools_sum_in_a_wider_type():
    """onnxruntime adds up float16 pools in float32: a shift near float16's top still folds."""
    model = conv_pool_bn(np.float16, "GlobalAveragePool", 3e4)
    folded, _ = check_fold(model, left=0, tol=1e-2, full_check=False)
    assert np.isfinite(run_ort(folded, feeds_for(model, 0))["bn1"].astype(np.float64)).all()


def _warnings(model, **kw):
    _, report = bnfold.fold(model, **kw)
    return report, {w["code"]: w for w in report.warnings}


@pytest.mark.parametrize(
    "code, gamma, weight, dtype",
    [
        ("extreme_scale", [1, 5e3, 1], None, np.float32),
        ("dead_channel", [1, 0, 1], None, np.float32),
        ("range_inflation", [1, 60, 1], None, np.float32),
        ("precision_loss", [1, 0.3, 1], np.full((C, C, 1, 1), 2e-5), np.float16),  # subnormal weights rounded
    ],
)
def test_each_hazard_is_reported_and_strict_refuses_it(tmp_path, code, gamma, weight, dtype):
    model = conv_bn(dtype, gamma, [0, 0, 0], [0, 0, 0], [1, 1, 1], weight=weight)
    report, found = _warnings(model)
    assert report.folded and code in found, report.warnings
    assert found[code]["bn"] == "bn" and found[code]["message"]
    strict_report, _ = _warnings(model, strict=True)
    assert not strict_report.folded and strict_report.left[0].reason in {w["code"] for w in report.warnings}
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    text = CliRunner().invoke(cli, ["fold", str(path), "-o", str(tmp_path / "o.onnx")]).output
    assert f"warnings ({len(report.warnings)})" in text and code in text
    inspected = CliRunner().invoke(cli, ["inspect", str(path)]).output
    assert code in inspected and "folds forward" in inspected
    strict_inspect = CliRunner().invoke(cli, ["inspect", str(path), "--strict"]).output
    assert "stays" in strict_inspect
    doc = CliRunner().invoke(cli, ["fold", str(path), "-o", str(tmp_path / "o.onnx"), "--json"]).output
    assert code in doc and '"warnings"' in doc


def test_a_healthy_fold_has_no_warning():
    model = conv_bn(np.float32, [1.1, 0.9, 1.0], [0.1, 0, -0.1], [0, 0.2, 0], [1, 2, 0.5])
    assert _warnings(model)[0].warnings == []


def test_no_numpy_warning_reaches_the_user(tmp_path):
    weight = np.full((C, C, 1, 1), 40.0)
    model = conv_bn(np.float16, [1, 1e4, 1], [0, 0, 0], [0, 0, 0], [1, 1e-6, 1], epsilon=0.0, weight=weight)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "bnfold", "fold", str(path), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "unsafe_fold" in result.stdout


def test_the_per_channel_shortcut_agrees_with_the_full_check(monkeypatch):
    """Ranges taken without scaling the weight (a factor along the channel axis only) are exactly
    those of the element-by-element check, and refuse the same folds: NaN, Inf, overflow, flush."""
    from bnfold.fold import safety
    from bnfold.report import Reason

    rng = np.random.default_rng(7)
    full = safety._per_channel
    refused = 0
    for _ in range(1000):
        shape = tuple(int(x) for x in rng.integers(1, 6, rng.integers(1, 5)))
        w = (rng.standard_normal(shape) * 10.0 ** rng.integers(-40, 38)).astype(rng.choice([np.float32, np.float64]))
        axis = int(rng.integers(0, len(shape)))
        f = (rng.standard_normal(shape[axis]) * 10.0 ** rng.integers(-45, 45)).reshape(
            [shape[axis] if k == axis else 1 for k in range(len(shape))]
        )
        if rng.random() < 0.1:
            w.reshape(-1)[0] = rng.choice([np.nan, np.inf, -np.inf, 0.0])
        with np.errstate(all="ignore"):
            quick = safety.check_weight("w", w, f, axis)
            monkeypatch.setattr(safety, "_per_channel", lambda *a: None)
            slow = safety.check_weight("w", w, f, axis)
            monkeypatch.setattr(safety, "_per_channel", full)
        if isinstance(quick, Reason) or isinstance(slow, Reason):
            assert isinstance(quick, Reason) and isinstance(slow, Reason) and quick.code == slow.code
            refused += 1
        else:
            assert np.array_equal(quick.before, slow.before) and np.array_equal(quick.after, slow.after)
    assert refused > 50
