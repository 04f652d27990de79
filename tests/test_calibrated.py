"""Verification at its defaults on networks with realistic statistics: every BN's mean and var come
from the activations that reach it (tests/models.py: calibrate). On each network the correct fold
and onnxruntime's own fusion pass; a candidate with one channel of a middle layer scaled by 1.01,
and a fold with the wrong epsilon, fail; --per-layer names the wrong layer and exits 1."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import cli
from models import ARCHITECTURES, calibrate, perturb_channel, resnet50_layout, with_epsilon

# densenet_preact is left out: none of its BNs folds forward, so no folded layer can be perturbed.
NETWORKS = {name: make for name, make in ARCHITECTURES.items() if name != "densenet_preact"}
NETWORKS["resnet50"] = lambda: resnet50_layout(64)  # 53 BNs: float32 rounding is amplified in depth


def onnxruntime_fusion(model: onnx.ModelProto, path: Path) -> Path:
    """onnxruntime's own BASIC-level rewrite of the model (its Conv+BN fusion), as a file."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return path


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def network(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = calibrate(NETWORKS[request.param](), {"N": 2})
    folded, _ = bnfold.fold(model)
    paths = {"original": folder / "original.onnx", "folded": folder / "folded.onnx"}
    onnx.save(model, str(paths["original"]))
    onnx.save(folded, str(paths["folded"]))
    wrong, layer = perturb_channel(folded, model, 1.01)
    paths["wrong_channel"] = folder / "wrong_channel.onnx"
    onnx.save(wrong, str(paths["wrong_channel"]))
    paths["wrong_epsilon"] = folder / "wrong_epsilon.onnx"
    onnx.save(bnfold.fold(with_epsilon(model, 1e-3))[0], str(paths["wrong_epsilon"]))
    paths["onnxruntime"] = onnxruntime_fusion(model, folder / "onnxruntime.onnx")
    return paths, layer


@pytest.mark.parametrize("candidate", ["folded", "onnxruntime"])
def test_correct_folds_pass_at_the_defaults(network, candidate):
    paths, _ = network
    report = bnfold.verify(paths["original"], paths[candidate])
    assert report, report.render_text()


@pytest.mark.parametrize("candidate", ["wrong_channel", "wrong_epsilon"])
def test_wrong_folds_fail_at_the_defaults(network, candidate):
    paths, _ = network
    report = bnfold.verify(paths["original"], paths[candidate])
    assert not report, report.render_text()


def test_per_layer_names_the_wrong_layer_and_exits_1(network):
    paths, layer = network
    result = CliRunner().invoke(cli, ["verify", str(paths["original"]), str(paths["wrong_channel"]), "--per-layer"])
    assert result.exit_code == 1, result.output
    assert f"first layer to diverge: {layer}" in result.output


def test_per_layer_passes_a_correct_fold(network):
    paths, _ = network
    report = bnfold.verify(paths["original"], paths["folded"], per_layer=True)
    assert report and report.first_divergent_layer is None, report.render_text()
