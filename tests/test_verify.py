"""bnfold verify: API and CLI, every option, and the ways a candidate can be wrong."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import HAS_CUDA, requires_cuda
from onnx import helper, numpy_helper

import bnfold
from bnfold.cli import cli
from bnfold.errors import BnfoldError
from bnfold.verification import verify
from bnfold.verification.compare import accumulate, judge_layers, judge_outputs, new_stats
from models import Builder, resnet_bottleneck


def save(model, path):
    onnx.save(model, str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def pair(tmp_path):
    model = resnet_bottleneck()
    folded, _ = bnfold.fold(model)
    return save(model, tmp_path / "orig.onnx"), save(folded, tmp_path / "folded.onnx"), model, folded


def scaled_channel(folded, conv_index=2, channel=1, factor=1.01):
    """The folded model with one output channel of one Conv weight scaled: a deliberately wrong fold."""
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    conv = [n for n in bad.graph.node if n.op_type == "Conv"][conv_index]
    tensor = next(t for t in bad.graph.initializer if t.name == conv.input[1])
    arr = numpy_helper.to_array(tensor).copy()
    arr[channel] *= factor
    tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))
    return bad, conv.output[0]


def test_correct_fold_verifies(pair):
    orig, folded, *_ = pair
    report = verify(orig, folded, samples=2, dims={"N": 2})
    assert report and report.passed and report.samples == 2
    assert report.outputs[0].max_abs < 1e-5 and report.outputs[0].mismatches == 0
    result = invoke("verify", orig, folded, "--dim", "N=2")
    assert result.exit_code == 0 and "PASSED" in result.output


def test_wrong_channel_fails_and_per_layer_names_it(pair, tmp_path):
    orig, _, _model, folded = pair
    bad, layer = scaled_channel(folded)
    bad_path = save(bad, tmp_path / "bad.onnx")
    result = invoke("verify", orig, bad_path, "--per-layer", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert doc["passed"] is False and doc["first_divergent_layer"] == layer
    names = [entry["name"] for entry in doc["layers"]]
    assert names.index(layer) > 0  # earlier layers are compared too, and pass
    assert all(entry["passed"] for entry in doc["layers"][: names.index(layer)])


def test_wrong_epsilon_fails(tmp_path):
    model = resnet_bottleneck()
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bn = next(n for n in bad.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("epsilon", 1e-1))
    assert not verify(model, bad)
    assert invoke("verify", save(model, tmp_path / "a.onnx"), save(bad, tmp_path / "b.onnx")).exit_code == 1


def test_tolerance_options_and_what_would_pass(pair, tmp_path):
    orig, _, _, folded = pair
    bad, _ = scaled_channel(folded, factor=1.001)
    report = verify(orig, bad, rtol=1e-4, atol=1e-5)  # elementwise, as asked
    assert not report and report.to_dict()["criterion"] == "elementwise"
    out = report.outputs[0]
    assert out.criterion == "elementwise" and out.atol_needed > out.atol and out.rtol_needed > out.rtol
    assert "outside rtol/atol" in report.render_text()
    assert verify(orig, bad, rtol=1e-4, atol=out.atol_needed * 1.01)
    assert verify(orig, bad, rtol=out.rtol_needed * 1.01, atol=1e-5)
    result = invoke("verify", orig, save(bad, tmp_path / "b.onnx"), "--rtol", "0.5", "--atol", "0.5", "--json")
    doc = json.loads(result.output)
    assert result.exit_code == 0 and doc["rtol"] == 0.5 and doc["outputs"][0]["rtol"] == 0.5


def test_json_has_every_number(pair):
    orig, folded, *_ = pair
    doc = json.loads(invoke("verify", orig, folded, "--json", "--per-layer", "--samples", "2").output)
    assert doc["passed"] is True and doc["providers"] == ["CPUExecutionProvider"] and doc["samples"] == 2
    for entry in doc["outputs"] + doc["layers"]:
        for key in (
            "error",
            "bound",
            "threshold",
            "decided_by",
            "baseline_error",
            "ref_max",
            "ref_mean",
            "max_abs",
            "max_index",
            "percentiles",
            "criterion",
            "nonfinite_mismatches",
        ):
            assert key in entry
        # the elementwise criterion's numbers are absent in the scaled mode, not a false 0
        assert not {"rtol", "atol", "mismatches", "atol_needed", "rtol_needed"} & set(entry)
    assert len(doc["layers"]) == 7 and doc["first_divergent_layer"] is None
    elementwise = json.loads(invoke("verify", orig, folded, "--json", "--rtol", "1e-3", "--samples", "1").output)
    for entry in elementwise["outputs"]:
        assert {"rtol", "atol", "mismatches", "atol_needed", "rtol_needed"} <= set(entry)
        assert not {"bound", "threshold", "decided_by", "baseline_error"} & set(entry)


def test_seed_and_samples(pair):
    orig, _, _, folded = pair
    bad, _ = scaled_channel(folded)
    a, b = verify(orig, bad, seed=1), verify(orig, bad, seed=1)
    c = verify(orig, bad, seed=2)
    assert a.outputs[0].max_abs == b.outputs[0].max_abs != c.outputs[0].max_abs
    calls = []
    verify(orig, folded, samples=4, progress=calls.append)
    assert calls == [1, 2, 3, 4]


def multi_input_model():
    b = Builder(seed=3)
    x = b.input("x", ["batch", 3, 6, 6])
    idx = b.input("idx", ["batch"], elem=onnx.TensorProto.INT64)
    flag = b.input("flag", ["batch", 4, 6, 6], elem=onnx.TensorProto.BOOL)
    y = b.bn(b.conv(x, 3, 4), 4)
    y = b.op("Where", [flag, y, b.relu(y)])
    picked = b.op("Gather", [y, idx], axis=0)
    count = b.op("ReduceSum", [b.op("Cast", [flag], to=onnx.TensorProto.INT64)], keepdims=0)
    return b.model(picked, count, elem=None)


def test_multi_input_int64_bool_dynamic_batch_and_output_order(tmp_path):
    model = multi_input_model()
    model.graph.output[1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    folded, _ = bnfold.fold(model)
    folded.graph.output.reverse()  # the candidate lists its outputs in another order
    report = verify(model, folded, dims={"batch": 3}, samples=2)
    assert report, report.render_text()
    assert [o.name for o in report.outputs] == [o.name for o in model.graph.output]
    assert report.notes == ["the candidate lists its outputs in another order (compared by name)"]
    assert report.outputs[1].rtol == 0 and report.outputs[1].atol == 0  # integers compare exactly
    o, c = save(model, tmp_path / "m.onnx"), save(folded, tmp_path / "f.onnx")
    assert invoke("verify", o, c, "--dim", "batch=5").exit_code == 0
    assert (
        invoke(
            "verify", o, c, "--input-shape", "x=2,3,6,6", "--input-shape", "idx=2", "--input-shape", "flag=2,4,6,6"
        ).exit_code
        == 0
    )


def test_npz_inputs(pair, tmp_path):
    orig, folded, *_ = pair
    rng = np.random.default_rng(0)
    path = tmp_path / "in.npz"
    np.savez(path, input=rng.standard_normal((4, 3, 16, 16)).astype(np.float32))
    doc = json.loads(invoke("verify", orig, folded, "--inputs", path, "--json").output)
    assert doc["passed"] and doc["outputs"][0]["elements"] == 40
    np.savez(tmp_path / "wrong.npz", other=np.zeros(1))
    result = invoke("verify", orig, folded, "--inputs", tmp_path / "wrong.npz")
    assert result.exit_code == 2 and "lacks graph input" in result.output


def test_missing_output_fails(pair, tmp_path):
    _orig, _, _, _folded = pair
    b = Builder(seed=0)
    x = b.input("x", [1, 3, 4, 4])
    one = b.model(b.relu(x))
    two = Builder(seed=0)
    y = two.input("x", [1, 3, 4, 4])
    both = two.model(two.relu(y), two.op("Sigmoid", [y]))
    report = verify(both, one)
    assert not report and report.outputs[1].missing


def test_extra_candidate_outputs_are_named_in_a_note(pair):
    _orig, _, model, folded = pair
    folded.graph.output.append(helper.make_tensor_value_info(folded.graph.node[0].output[0], 1, None))
    report = verify(model, folded)
    assert report, report.render_text()  # what the original computes is the same
    assert report.notes == [
        f"the candidate has outputs the original has not, not compared: {folded.graph.output[1].name}"
    ]
    assert "note: the candidate has outputs" in report.render_text()


def test_per_layer_does_not_pass_a_candidate_that_does_not_load(pair, tmp_path):
    """Declaring BN outputs as graph outputs (what --per-layer does) can make a candidate load
    whose stale value_info onnxruntime refuses as written: it is refused either way."""
    orig, _, _, folded = pair
    layer = next(n.output[0] for n in folded.graph.node if n.output[0].startswith("bn"))
    folded.graph.value_info.append(helper.make_tensor_value_info(layer, onnx.TensorProto.FLOAT16, None))
    bad = save(folded, tmp_path / "stale.onnx")
    for extra in ([], ["--per-layer"]):
        result = CliRunner().invoke(cli, ["verify", str(orig), str(bad), *extra])
        assert result.exit_code == 2 and "cannot load" in result.output, (extra, result.output)


def test_graph_optimization_level_for_candidate(pair):
    orig, folded, *_ = pair
    report = verify(orig, folded, graph_optimization="all")
    assert report and report.graph_optimization == "all"
    with pytest.raises(BnfoldError):
        verify(orig, folded, graph_optimization="fast")


F32 = np.dtype(np.float32)


def test_nan_and_inf_compare_by_place():
    s = new_stats("y", F32, "cpu", None, None)
    accumulate(s, np.array([np.nan, np.inf, 1.0]), np.array([np.nan, np.inf, 1.0]))
    judge_outputs([s], [None])
    assert s.passed
    accumulate(s, np.array([np.nan, 1.0]), np.array([1.0, np.nan]))
    judge_outputs([s], [None])
    assert s.nonfinite_mismatches == 2 and s.error == 0 and not s.passed
    assert "NaN/Inf differ at 2" in s.verdict()[0] and "passes with" not in s.verdict()[0]
    t = new_stats("y", F32, "cpu", None, None)
    accumulate(t, np.array([np.inf]), np.array([-np.inf]))
    assert not t.passed


def test_element_fails_only_outside_both_tolerances():
    s = new_stats("y", np.dtype(np.float64), "cpu", rtol=0.1, atol=0.01)
    accumulate(s, np.array([100.0, 0.0]), np.array([105.0, 0.005]))  # within rtol; within atol
    assert s.passed
    accumulate(s, np.array([0.05]), np.array([0.1]))  # outside both
    assert s.mismatches == 1 and not s.passed


def test_scaled_error_does_not_depend_on_the_scale():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 8, 4, 4))
    errors = []
    for scale in (1e-6, 1.0, 1e6):
        s = new_stats("y", F32, "cpu", None, None)
        accumulate(s, ref * scale, ref * scale * (1 + 1e-3))
        judge_outputs([s], [None])
        errors.append(s.error)
        assert not s.passed  # 1e-3 relative is over float32's threshold at every scale
    assert max(errors) / min(errors) < 1 + 1e-9


def test_the_bound_follows_the_noise_floor():
    ref = np.linspace(-1, 1, 100)
    s = new_stats("y", F32, "cpu", None, None)
    accumulate(s, ref, ref + 5e-4)  # 5e-4: over the 1e-4 threshold
    judge_outputs([s], [2e-4])  # but onnxruntime's own fusion is at 2e-4 on this model
    assert s.passed and s.bound == pytest.approx(8e-4) and s.decided_by == "baseline"
    judge_outputs([s], [1e-5])
    assert not s.passed and s.bound == pytest.approx(4e-5) and s.decided_by == "baseline"
    judge_outputs([s], [None])  # no baseline: the threshold
    assert not s.passed and s.bound == 1e-4 and s.decided_by == "threshold"


def test_a_small_floor_holds_a_candidate_to_a_few_times_it():
    """HRNet-W18-small's wrong epsilon: 1.2e-5 against a floor of 2e-6 passed under the fixed 1e-4;
    the correct fold's 1.9e-6 still passes. A floor of exactly 0 (a baseline that fused nothing) says
    nothing of rounding: the threshold applies; a tiny floor gives at least a hundredth of it."""
    ref = np.linspace(-1, 1, 100)
    for error, floor, passes, bound in (
        (1.2e-5, 2e-6, False, 8e-6),
        (1.9e-6, 2e-6, True, 8e-6),
        (5e-5, 0.0, True, 1e-4),
        (5e-7, 1e-9, True, 1e-6),
    ):
        s = new_stats("y", F32, "cpu", None, None)
        accumulate(s, ref, ref + error)
        judge_outputs([s], [floor])
        assert s.passed == passes and s.bound == pytest.approx(bound), (error, floor, s.bound)


def _layer(error_by_channel):
    s = new_stats("l", F32, "cpu", None, None)
    ref = np.ones((1, len(error_by_channel), 2, 2))
    accumulate(s, ref, ref * (1 + np.asarray(error_by_channel)).reshape(1, -1, 1, 1), channels=True)
    return s


def test_one_wrong_channel_among_a_thousand_shows():
    errors = np.zeros(1000)
    errors[417] = 1e-2
    s = _layer(errors)
    judge_layers([s])
    assert not s.passed and s.worst_channel == 417 and s.error == pytest.approx(1e-2)


def test_layers_diverge_on_a_jump_not_on_growing_noise():
    noise = [_layer([e, e / 2]) for e in (1e-6, 1e-5, 1e-4, 5e-4, 2e-3)]  # grows, never jumps 10x
    judge_layers(noise)
    assert all(s.passed for s in noise)
    jump = [_layer([e, 0]) for e in (1e-6, 2e-6, 1e-2, 2e-2)]
    judge_layers(jump)
    assert [s.passed for s in jump] == [True, True, False, True]


@pytest.mark.skipif(HAS_CUDA, reason="checks the path taken when CUDA is absent")
def test_cuda_not_available_is_one_line_exit_2(pair):
    orig, folded, *_ = pair
    result = invoke("verify", orig, folded, "--providers", "cpu,cuda")
    assert result.exit_code == 2
    assert result.output.startswith("Error: CUDA is not available") and result.output.count("\n") == 1
    assert "onnxruntime-gpu" in result.output
    result = invoke("fold", orig, "-o", orig.with_name("x.onnx"), "--verify", "--providers", "cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_unknown_provider_exits_2(pair):
    orig, folded, *_ = pair
    assert invoke("verify", orig, folded, "--providers", "tpu").exit_code == 2


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["tf32_off", "tf32_on"])
def test_cuda_verifies_a_fold_and_catches_a_wrong_one(pair, tf32):
    orig, folded, _, folded_model = pair
    report = verify(orig, folded, providers=["cpu", "cuda"], allow_tf32=tf32, samples=2)
    assert report, report.render_text()
    assert report.providers == ["CPUExecutionProvider", "CUDAExecutionProvider"] and report.tf32 is tf32
    assert any("TF32" in n for n in report.notes)
    bad, layer = scaled_channel(folded_model)
    bad_report = verify(orig, bad, providers=["cuda"], per_layer=True, allow_tf32=tf32)
    assert not bad_report and bad_report.first_divergent_layer == layer


def test_fold_verify_flag(pair, tmp_path):
    orig, *_ = pair
    result = invoke("fold", orig, "-o", tmp_path / "o.onnx", "--verify", "--samples", "2", "--json")
    doc = json.loads(result.output)
    assert result.exit_code == 0 and doc["verify"]["passed"] and doc["after"]["batchnorms"] == 0


def test_unrelated_models_are_a_user_error(pair, tmp_path):
    orig, *_ = pair
    b = Builder(seed=9)
    other = save(b.model(b.relu(b.input("input", ["N", 3, 16, 16]))), tmp_path / "other.onnx")
    other_model = onnx.load(str(other))
    other_model.graph.output[0].name = "renamed"
    other_model.graph.node[-1].output[0] = "renamed"
    save(other_model, other)
    result = CliRunner().invoke(cli, ["verify", str(orig), str(other)])
    assert result.exit_code == 2 and "no output name in common" in result.output


def test_inputs_saved_and_replayed_with_a_sample_axis(pair, tmp_path):
    orig, folded, *_ = pair
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    first = verify(orig, folded, samples=3, dims={"N": 2}, save_inputs=inputs, save_outputs=outputs)
    with np.load(inputs) as z:
        assert z["input"].shape == (3, 2, 3, 16, 16)
    with np.load(outputs) as z:
        assert {"reference/gemm0", "cpu/gemm0"} <= set(z.files) and z["cpu/gemm0"].shape[0] == 3
    again = verify(orig, folded, inputs=inputs)  # three samples, from the leading axis
    assert again.samples == 3 and again.outputs[0].max_abs == first.outputs[0].max_abs
    two_files = verify(orig, folded, inputs=[inputs, inputs])
    assert two_files.samples == 6


def test_zero_elements_compared_is_an_error(tmp_path):
    b = Builder(seed=2)
    x = b.input("x", ["N", 4])
    model = b.model(b.relu(b.bn(b.gemm(x, 4, 4), 4)))
    folded, _ = bnfold.fold(model)
    a, c = save(model, tmp_path / "a.onnx"), save(folded, tmp_path / "c.onnx")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32))
    result = CliRunner().invoke(cli, ["verify", str(a), str(c), "--inputs", str(tmp_path / "empty.npz")])
    assert result.exit_code == 2 and "no elements" in result.output


def test_outputs_that_are_nan_in_both_models_are_an_error_that_says_so(tmp_path):
    """A network whose outputs are all NaN (1000 uncalibrated blocks do that) compares nothing:
    exit 2, and the line says why, not to check the input shapes."""
    b = Builder(seed=2)
    x = b.input("x", [2, 4])
    y = b.bn(b.gemm(x, 4, 4), 4)
    graph = helper.make_graph(
        [
            *b.nodes,
            helper.make_node("Abs", [y], ["magnitude"]),
            helper.make_node("Sub", ["minus_one", "magnitude"], ["negative"]),
            helper.make_node("Sqrt", ["negative"], ["nan"]),
        ],
        "nan",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("nan", onnx.TensorProto.FLOAT, [2, 4])],
        [*b.inits, numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the oldest onnxruntime this project allows reads
    folded, report = bnfold.fold(model)
    assert report.folded
    a, c = save(model, tmp_path / "a.onnx"), save(folded, tmp_path / "c.onnx")
    result = CliRunner().invoke(cli, ["verify", str(a), str(c)])
    assert result.exit_code == 2 and "every value is inf or NaN in both models" in result.output, result.output
    assert "no elements" not in result.output and len(result.output.strip().splitlines()) == 1


def test_verification_options_need_verify(tmp_path):
    result = CliRunner().invoke(cli, ["fold", "models/demo.onnx", "-o", str(tmp_path / "o.onnx"), "--samples", "5"])
    assert result.exit_code == 2 and "--samples only applies with --verify" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_text_fits_80_columns_and_honours_no_color(pair, tmp_path, monkeypatch):
    orig, _, _, folded = pair
    bad, _ = scaled_channel(folded)
    bad_path = save(bad, tmp_path / "bad.onnx")
    result = CliRunner().invoke(cli, ["verify", str(orig), str(bad_path), "--per-layer"], color=True)
    assert "\x1b[" in result.output  # coloured on a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    result = CliRunner().invoke(cli, ["verify", str(orig), str(bad_path), "--per-layer"], color=True)
    assert "\x1b[" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80, result.output


def test_long_names_are_shortened_in_text_and_whole_in_json(tmp_path):
    b = Builder(seed=4)
    x = b.input("x", [1, 3, 4, 4])
    y = b.relu(b.bn(b.conv(x, 3, 4), 4))
    name = "encoder.layers.17.attention.output.dense.batchnorm_output_tensor"
    model = b.model(y)
    for n in model.graph.node:
        n.output[:] = [name if o == y else o for o in n.output]
    model.graph.output[0].name = name
    folded, _ = bnfold.fold(model)
    report = verify(model, folded)
    assert report.outputs[0].name == name and name not in report.render_text()
    assert "\u2026" in report.render_text() and report.to_dict()["outputs"][0]["name"] == name
