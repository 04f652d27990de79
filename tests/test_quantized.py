"""BatchNormalization folded through DequantizeLinear weights, as quantization toolkits export them
(pytorch-quantization, NVIDIA Model Optimizer, onnxruntime's quantizer): the integers kept (but for
the complements of channels scaled by a negative factor), only the scales changed, the weight still
behind a DequantizeLinear; every fold checked against onnxruntime with optimizations off, and the
forms that must stay checked to stay, with their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import check_fold, feeds_for, run_ort
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.quantization import complement, dequantize, quantize
from models import Builder, calibrate

INT8, UINT8 = np.int8, np.uint8


class Q:
    """Builds Q/DQ networks with a Builder: weights quantized per channel or per tensor."""

    def __init__(self, opset: int = 17, seed: int = 0) -> None:
        self.b = Builder(opset=opset, seed=seed)
        self.rng = self.b.rng

    def scale(self, value, how: str = "initializer") -> str:
        """A float32 scale (or zero point) as an initializer, a Constant node, or Cast(Constant float64)."""
        value = np.asarray(value)
        if how == "initializer":
            return self.b.const(value, "scale", dtype=value.dtype)
        if how == "constant":
            return self.b.op("Constant", [], "scale_const", value=numpy_helper.from_array(value))
        wide = value.astype(np.float64 if value.dtype.kind == "f" else np.int32)
        made = self.b.op("Constant", [], "scale_wide", value=numpy_helper.from_array(wide))
        return self.b.op("Cast", [made], "scale_cast", to=helper.np_dtype_to_tensor_dtype(value.dtype))

    def activation(self, x: str, scale: float = 0.05) -> str:
        s, z = self.scale(np.float32(scale)), self.b.const(np.int8(0), "azp", dtype=np.int8)
        return self.b.op("DequantizeLinear", [self.b.op("QuantizeLinear", [x, s, z]), s, z])

    def weight(self, w: np.ndarray, form: str, axis: int = 0, how: str = "initializer") -> tuple[str, np.ndarray]:
        """``w`` behind a DequantizeLinear: 'float' (float weight -> QuantizeLinear -> DQ, per
        channel), 'per_tensor' (the same with one scale), 'int8' (integers in an initializer),
        'uint8' (unsigned, zero point 128 +- a little). Returns the DQ output and its scale."""
        channels = w.shape[axis]
        other = tuple(k for k in range(w.ndim) if k != axis)
        top = np.abs(w).max(axis=other)
        scale = (np.maximum(top, 1e-3) / 127).astype(np.float32)
        if form == "per_tensor":
            scale = np.float32(np.abs(w).max() / 127)
        kind = UINT8 if form == "uint8" else INT8
        zp = np.zeros(np.shape(scale), kind)
        if form == "uint8":
            zp = (128 + self.rng.integers(-3, 4, channels)).astype(UINT8)
            scale = (scale * 1.05).astype(np.float32)
        s_name, z_name = self.scale(scale, how), self.scale(zp, how)
        q_axis = {"axis": axis} if np.ndim(scale) else {}
        if form in ("float", "per_tensor"):
            ints = self.b.op("QuantizeLinear", [self.b.const(w, "w"), s_name, z_name], **q_axis)
        else:
            ints = self.b.const(quantize(w, scale, zp, axis), "wq", dtype=kind)
        return self.b.op("DequantizeLinear", [ints, s_name, z_name], "dq", **q_axis), scale

    def conv(self, x: str, cin: int, cout: int, form: str, bias: str = "float", k: int = 3, group: int = 1, **kw):
        w = self.b.randn(cout, cin // group, k, k, scale=0.3)
        wq, w_scale = self.weight(w, form, **kw)
        inputs = [x, wq]
        if bias == "float":
            inputs.append(self.b.const(self.b.randn(cout), "b"))
        elif bias == "int32":  # onnxruntime's quantizer: bias_scale = x_scale * w_scale, zero point 0
            b_scale = (np.float32(0.05) * np.broadcast_to(w_scale, (cout,))).astype(np.float32)
            ints = np.rint(self.b.randn(cout) / b_scale).astype(np.int32)
            inputs.append(
                self.b.op(
                    "DequantizeLinear", [self.b.const(ints, "bq", dtype=np.int32), self.b.const(b_scale, "bs")], axis=0
                )
            )
        return self.b.op("Conv", inputs, "conv", pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int, negative: tuple[int, ...] = (1,)) -> str:
        """A BN whose scale is negative on the channels ``negative`` (their integers get complemented)."""
        gamma = self.rng.uniform(0.5, 1.5, c)
        gamma[list(negative)] *= -1
        params = [
            self.b.const(gamma, "gamma"),
            self.b.const(self.b.randn(c), "beta"),
            self.b.const(np.zeros(c), "m"),
            self.b.const(np.ones(c), "v"),
        ]
        return self.b.bn(x, c, params=params)

    def model(self, y: str) -> onnx.ModelProto:
        return calibrate(self.b.model(y), {"N": 2})


def conv_net(
    form: str = "float", bias: str = "float", how: str = "initializer", quantized_output: bool = False, opset: int = 17
):
    """P1/P2/P5: x -> Q/DQ -> Conv(DQ weight) -> BN -> Relu (-> Q/DQ with P4) -> Conv -> BN."""
    q = Q(opset=opset)
    x = q.activation(q.b.input("x", ["N", 3, 8, 8]))
    y = q.b.relu(q.bn(q.conv(x, 3, 8, form, bias, how=how), 8, negative=(1, 5)))
    if quantized_output:
        y = q.activation(y, 0.1)
    y = q.bn(q.conv(y, 8, 6, form, bias, how=how), 6, negative=(0,))
    return q.model(y)


def _dequantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}


def _weights_behind_dq(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    dqs = _dequantizers(model)
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    return [(layer, dqs.get(layer.input[1])) for layer in layers]


def _value(model: onnx.ModelProto, name: str) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    raise KeyError(name)


FORMS = {
    "P1_float_per_channel": {"form": "float"},
    "P1_constant_scales": {"form": "float", "how": "constant"},
    "P1_cast_constant_scales": {"form": "float", "how": "cast"},
    "P2_per_tensor": {"form": "per_tensor"},
    "P5_int8_initializer": {"form": "int8"},
    "P5_uint8_zero_point": {"form": "uint8"},
    "P5_int32_bias": {"form": "int8", "bias": "int32"},
    "P1_no_bias": {"form": "float", "bias": "none"},
}


@pytest.mark.parametrize("case", list(FORMS))
def test_every_bn_folds_through_the_dequantizelinear(case):
    model = conv_net(**FORMS[case])
    # An int32 bias is re-quantized at its new scale: up to half a step of x_scale * w_scale * |s|.
    rounding = FORMS[case].get("bias") == "int32"
    folded, report = check_fold(model, dims={"N": 2}, tol=5e-4 if rounding else 1e-5)
    assert not report.left, report.render_text()
    hazards = [h for h in report.warnings if h["code"] == "quantized_bias_rounding"]
    assert len(hazards) == (2 if rounding else 0), report.warnings
    assert all(0 <= h["rounding_steps"] <= 0.5 for h in hazards)
    for layer, dq in _weights_behind_dq(folded):
        assert dq is not None, f"{layer.name}: the weight no longer comes through a DequantizeLinear"
        assert _value(folded, dq.input[0]).dtype.kind in "iu"  # integers, not a float weight


def test_the_integers_are_kept_but_for_the_complements_of_negative_channels():
    """P5 int8 and P1 (quantized here as QuantizeLinear does): each channel's integers are the
    original's, or their complements where the BN's scale is negative; the zero points likewise."""
    for form in ("int8", "float", "uint8"):
        model = conv_net(form)
        folded, _ = bnfold.fold(model)
        originals = _layer_integers(model, TensorProto.UINT8 if form == "uint8" else TensorProto.INT8)
        for k, (_, dq) in enumerate(_weights_behind_dq(folded)):
            ints = _value(folded, dq.input[0])
            old = originals[k]
            negative = [c for c in range(ints.shape[0]) if not np.array_equal(ints[c], old[c])]
            assert negative == ([1, 5] if k == 0 else [0]), (form, k, negative)
            for c in negative:
                np.testing.assert_array_equal(ints[c], complement(old[c]))


def _layer_integers(model: onnx.ModelProto, elem: int) -> list[np.ndarray]:
    """The integers each Conv's weight DequantizeLinear reads, as onnxruntime computes them."""
    dqs = _dequantizers(model)
    names = [dqs[n.input[1]].input[0] for n in model.graph.node if n.op_type == "Conv"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, elem, None) for n in names)
    values = run_ort(probe, feeds_for(model, 0, {"N": 2}))
    return [values[n] for n in names]


def test_quantizing_here_matches_onnxruntimes_quantizelinear_bit_for_bit():
    """Ties included: values exactly halfway between two steps round to even, as onnxruntime's."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    scale = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    w[0, 0, 0, :] = np.array([0.5, 1.5, -2.5], np.float32) * scale[0]  # ties
    for zp_type in (INT8, UINT8):
        zp = np.full(16, 0 if zp_type is INT8 else 128, zp_type)
        node = helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=0)
        g = helper.make_graph(
            [node],
            "q",
            [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
            [helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(np.dtype(zp_type)), w.shape)],
            [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        np.testing.assert_array_equal(run_ort(m, {"w": w})["q"], quantize(w, scale, zp, 0))
        np.testing.assert_array_equal(dequantize(quantize(w, scale, zp, 0), scale, zp, 0).dtype, np.float32)


def test_p4_the_quantized_output_moves_by_a_step_at_most():
    """Conv -> BN -> Relu -> QuantizeLinear: the folded BN's output differs by float rounding, which a
    quantizer can turn into a step where a value lies on a rounding boundary; no more."""
    model = conv_net("float", quantized_output=True)
    folded, report = bnfold.fold(model)
    assert not report.left
    for seed in range(3):
        feeds = feeds_for(model, seed, {"N": 2})
        ref, got = run_ort(model, feeds), run_ort(folded, feeds)
        for name in ref:
            d = np.abs(ref[name].astype(np.float64) - got[name])
            assert d.max() <= 0.1 * np.abs(ref[name]).max() + 1e-6, name  # a step of 0.1 through the second conv
            assert np.mean(d > 1e-4 * np.abs(ref[name]).max()) < 0.05, name


def gemm_net(kind: str, form: str = "float"):
    """P3: Gemm(transB=1) or MatMul with a DequantizeLinear weight, then BatchNorm1d."""
    q = Q()
    x = q.activation(q.b.input("x", ["N", 16]))
    if kind == "gemm":
        w = q.b.randn(12, 16, scale=0.3)
        wq, _ = q.weight(w, form, axis=0)
        y = q.b.op("Gemm", [x, wq, q.b.const(q.b.randn(12), "fc_b")], "gemm", transB=1)
    else:
        w = q.b.randn(16, 12, scale=0.3)
        wq, _ = q.weight(w, form, axis=1)
        y = q.b.op("MatMul", [x, wq])
    return q.model(q.b.relu(q.bn(y, 12, negative=(2, 7))))


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
@pytest.mark.parametrize("form", ["float", "int8", "per_tensor"])
def test_p3_linear_layers_fold(kind, form):
    folded, report = check_fold(gemm_net(kind, form), dims={"N": 2})
    assert not report.left
    assert all(dq is not None for _, dq in _weights_behind_dq(folded))


def test_conv_transpose_quantized_on_axis_1_folds():
    q = Q()
    x = q.activation(q.b.input("x", ["N", 4, 6, 6]))
    w = q.b.randn(4, 8, 2, 2, scale=0.3)
    wq, _ = q.weight(w, "float", axis=1)
    y = q.b.op("ConvTranspose", [x, wq, q.b.const(q.b.randn(8), "b")], "deconv", strides=[2, 2])
    folded, report = check_fold(q.model(q.b.relu(q.bn(y, 8, negative=(3,)))), dims={"N": 2})
    assert not report.left and all(dq is not None for _, dq in _weights_behind_dq(folded))


@pytest.mark.parametrize("group", [2, 8], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_convs_fold(group):
    q = Q()
    x = q.activation(q.b.input("x", ["N", 8, 6, 6]))
    y = q.b.relu(q.bn(q.conv(x, 8, 8, "float", group=group), 8, negative=(0, 7)))
    check_fold(q.model(y), dims={"N": 2})


def test_through_a_maxpool_and_into_a_concat_split():
    q = Q()
    x = q.activation(q.b.input("x", ["N", 3, 8, 8]))
    pooled = q.b.op("MaxPool", [q.conv(x, 3, 6, "int8")], kernel_shape=[2, 2], strides=[2, 2])
    a = q.bn(pooled, 6, negative=())  # a positive scale: max commutes with it
    joined = q.b.op("Concat", [q.conv(x, 3, 4, "float"), q.conv(x, 3, 5, "int8")], axis=1)
    b = q.bn(joined, 9, negative=(2, 6))
    out = q.b.op("Add", [q.b.op("ReduceMean", [a], keepdims=1), q.b.op("ReduceMean", [b], keepdims=1)])
    _, report = check_fold(q.model(out), dims={"N": 2})
    assert not report.left


# -- what stays, and why ----------------------------------------------------------------------------


def test_a_weight_quantized_along_the_input_channels_stays():
    q = Q()
    x = q.activation(q.b.input("x", ["N", 4, 6, 6]))
    w = q.b.randn(6, 4, 3, 3, scale=0.3)
    wq, _ = q.weight(w, "float", axis=1)
    model = q.model(q.b.relu(q.bn(q.b.op("Conv", [x, wq], "conv", pads=[1] * 4), 6)))
    _, report = check_fold(model, left=1, dims={"N": 2})
    assert report.left[0].reason == "quantized_weight_axis" and "quantized along axis 1" in report.left[0].message


def test_a_zero_scale_channel_stays():
    q = Q()
    x = q.activation(q.b.input("x", ["N", 3, 6, 6]))
    y = q.conv(x, 3, 4, "int8")
    gamma = np.array([1.0, 0.0, 0.5, -1.0])
    params = [
        q.b.const(gamma, "g"),
        q.b.const(np.zeros(4), "b"),
        q.b.const(np.zeros(4), "m"),
        q.b.const(np.ones(4), "v"),
    ]
    _, report = check_fold(q.model(q.b.bn(y, 4, params=params)), left=1, dims={"N": 2})
    assert report.left[0].reason == "quantized_weight_zero_scale" and "channel 1" in report.left[0].message


def test_a_backward_fold_into_a_quantized_weight_stays():
    q = Q()
    x = q.b.input("x", ["N", 3, 6, 6])
    y = q.conv(q.bn(x, 3, negative=()), 3, 4, "int8", k=1)  # BN -> Conv: nothing before it to fold into
    _, report = check_fold(q.model(y), left=1, dims={"N": 2})
    assert "quantized per output channel" in report.left[0].message


def test_quantized_weights_of_another_integer_type_or_before_opset_13_stay():
    model = conv_net("per_tensor", opset=12)
    _, report = check_fold(model, left=2, dims={"N": 2})
    assert {item.reason for item in report.left} == {"quantized_weight_form"}
    assert "opset 12 has no per-channel DequantizeLinear" in report.left[0].message


def test_a_wrong_fold_is_caught_by_verify():
    """One channel's new scale 1% off: verify with per-layer comparison names the layer."""
    model = conv_net("int8")
    folded, _ = bnfold.fold(model)
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    first = _weights_behind_dq(bad)[0][1]
    scale = next(t for t in bad.graph.initializer if t.name == first.input[1])
    values = numpy_helper.to_array(scale).copy()
    values[2] *= 1.01
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    assert bnfold.verify(model, folded, dims={"N": 2})
    result = bnfold.verify(model, bad, dims={"N": 2}, per_layer=True)
    assert not result and result.first_divergent_layer is not None, result.render_text()


# -- verification of quantized networks -------------------------------------------------------------


def deep_qdq(layers: int = 5, size: int = 16) -> onnx.ModelProto:
    """Conv (int8 weight, int32 bias) -> BN -> Relu -> uint8 QuantizeLinear -> DequantizeLinear, repeated:
    deep enough that a correct fold flips quantizer steps that then travel to the output."""
    q = Q(seed=11)
    y = q.activation(q.b.input("x", [2, 3, size, size]), 0.05)
    cin = 3
    for k in range(layers):
        cout = 8 + 4 * k
        y = q.conv(y, cin, cout, "int8", bias="int32" if k % 2 else "float")
        y = q.b.relu(q.bn(y, cout, negative=(1,)))
        s, z = q.b.const(np.float32(0.05), "as"), q.b.const(np.uint8(0), "az", dtype=np.uint8)
        y = q.b.op("DequantizeLinear", [q.b.op("QuantizeLinear", [y, s, z]), s, z])
        cin = cout
    return calibrate(q.b.model(q.b.op("GlobalAveragePool", [y])), batch=2)


def _altered(folded: onnx.ModelProto, layer: int, how: str) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    dq = _weights_behind_dq(bad)[layer][1]
    t = next(t for t in bad.graph.initializer if t.name == dq.input[0 if how == "sign" else 1])
    v = numpy_helper.to_array(t).copy()
    if how == "sign":
        v[3] = complement(v[3])  # one channel's integers complemented without its zero point: a sign error
    else:
        v[3] *= 1.01  # one channel's scale 1% off
    t.CopyFrom(numpy_helper.from_array(v, t.name))
    return bad


def test_a_correct_fold_of_a_deep_quantized_network_passes_at_the_defaults():
    """The quantizers' integers travel from the original to the candidate: a rounding boundary
    flips nothing, and every segment is compared on its own."""
    model = deep_qdq()
    folded, report = bnfold.fold(model)
    assert not report.left
    plain = [run_ort(model, feeds_for(model, s))["globalaveragepool0"] for s in range(3)]
    moved = [run_ort(folded, feeds_for(model, s))["globalaveragepool0"] for s in range(3)]
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, moved, strict=True)) > 1e-3  # steps do flip
    result = bnfold.verify(model, folded)
    assert result, result.render_text()
    assert any("QuantizeLinear output(s) from the original" in n for n in result.notes)
    assert len(result.layers) == 6  # the input's quantizer and each layer's


@pytest.mark.parametrize("how", ["sign", "scale"])
@pytest.mark.parametrize("layer", [1, 3])
def test_a_wrong_channel_of_a_deep_quantized_network_fails_at_the_defaults(layer, how):
    model = deep_qdq()
    folded, _ = bnfold.fold(model)
    result = bnfold.verify(model, _altered(folded, layer, how))
    assert not result, result.render_text()
    assert result.first_divergent_layer == f"relu{layer}", result.render_text()
    bad = next(s for s in result.layers if s.name == result.first_divergent_layer)
    assert bad.worst_channel == 3, bad  # the channel that was changed


def test_a_wrong_epsilon_fails_at_the_defaults():
    from models import with_epsilon

    model = deep_qdq()
    wrong, _ = bnfold.fold(with_epsilon(model, 1e-1))
    assert not bnfold.verify(model, wrong)


def test_fold_verify_passes_a_deep_quantized_network(tmp_path):
    from click.testing import CliRunner

    from bnfold.cli import cli

    path = tmp_path / "q.onnx"
    onnx.save(deep_qdq(), str(path))
    result = CliRunner().invoke(cli, ["fold", str(path), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verification PASSED" in result.output and "QuantizeLinear output(s)" in result.output


def test_through_a_transpose_a_quantized_matmul_takes_batchnorm1d():
    """PyTorch's bn(fc(x).transpose(1, 2)) with a quantized Linear: MatMul -> Transpose -> BN1d."""
    q = Q()
    x = q.activation(q.b.input("x", ["N", 5, 16]))
    wq, _ = q.weight(q.b.randn(16, 12, scale=0.3), "int8", axis=1)
    y = q.b.op("Transpose", [q.b.op("MatMul", [x, wq])], perm=[0, 2, 1])
    folded, report = check_fold(q.model(q.b.relu(q.bn(y, 12, negative=(4,)))), dims={"N": 2})
    assert not report.left and all(dq is not None for _, dq in _weights_behind_dq(folded))


def test_an_identity_branch_beside_quantized_convs_stays_and_the_branches_fold():
    """RepVGG with quantized Convs: the branch BNs fold into their Convs; the identity BN would have to
    be added to the quantized kernel, so it stays (quantized_weight_form), and says so."""
    q = Q()
    x = q.b.relu(q.activation(q.b.input("x", ["N", 4, 6, 6])))
    kxk = q.bn(q.conv(x, 4, 4, "int8", bias="none", k=3), 4, negative=(1,))
    one = q.bn(q.conv(x, 4, 4, "int8", bias="none", k=1), 4, negative=())
    identity = q.bn(x, 4, negative=())
    y = q.b.relu(q.b.op("Add", [q.b.op("Add", [one, kxk]), identity]))
    folded, report = check_fold(q.model(y), left=1, dims={"N": 2})
    assert report.left[0].reason == "quantized_weight_form", report.render_text()
    assert "an identity branch cannot be added" in report.left[0].message
    assert all(dq is not None for _, dq in _weights_behind_dq(folded))


@pytest.mark.parametrize("case", [*FORMS, "P4_quantized_output", "P3_gemm", "P3_matmul"])
def test_verify_passes_every_correct_fold_at_the_defaults(case):
    if case == "P4_quantized_output":
        model = conv_net("float", quantized_output=True)
    elif case.startswith("P3"):
        model = gemm_net(case[3:], "int8")
    else:
        model = conv_net(**FORMS[case])
    folded, _ = bnfold.fold(model)
    result = bnfold.verify(model, folded, dims={"N": 2})
    assert result, result.render_text()
