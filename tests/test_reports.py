"""What the reports say: numbers that are the result's, words that match the numbers, and no run that
looks like it did something it did not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_safety import _warnings, conv_bn

import bnfold
from bnfold.cli import cli
from models import densenet_preact, resnet_bottleneck

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


@pytest.mark.parametrize("lower", [False, True], ids=["default", "lower_standalone"])
@pytest.mark.parametrize("make", [resnet_bottleneck, densenet_preact], ids=["resnet", "densenet"])
def test_a_dry_run_reports_the_numbers_the_fold_gives(make, lower):
    model = make()
    untouched, dry = bnfold.fold(model, dry_run=True, lower_standalone=lower)
    _, real = bnfold.fold(model, lower_standalone=lower)
    assert untouched.SerializeToString() == model.SerializeToString()  # a dry run changes nothing
    assert dry.after == real.after
    assert dry.after.batchnorms < dry.before.batchnorms or (make is densenet_preact and not lower)  # all pre-activation


def test_the_demo_dry_run_table_is_the_folds():
    """The README's first command prints 8 -> 2 BNs, 32 -> 23 nodes, 47 -> 26 initializers."""
    dry = CliRunner().invoke(cli, ["fold", str(DEMO), "--dry-run"]).output.splitlines()
    assert dry[2].split() == ["BatchNorm", "8", "2"] and dry[3].split() == ["nodes", "32", "23"]
    assert dry[4].split() == ["initializers", "47", "26"]


def test_verify_with_a_dry_run_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["fold", str(DEMO), "--dry-run", "--verify"])
    assert result.exit_code == 2 and "--dry-run writes none" in result.output


@pytest.mark.parametrize("gamma, words", [([1, 60, 1], "grows"), ([1, 1e-3, 1e-3], "shrinks to")])
def test_the_range_hazard_says_grows_or_shrinks_as_its_number_does(gamma, words):
    model = conv_bn(np.float32, gamma, [0, 0, 0], [0, 0, 0], [1, 1, 1])
    _, found = _warnings(model)
    hazard = found["range_inflation"]
    assert words in hazard["message"], hazard
    assert (hazard["max_ratio"] > 1) == (words == "grows")


def test_lowered_bns_are_listed_as_lowered_not_folded():
    text = CliRunner().invoke(cli, ["fold", str(DEMO), "--dry-run", "--lower-standalone"]).output
    assert "folded (6):" in text and "lowered to Mul + Add by per-channel constants (2):" in text
    assert "Mul+Add Mul+Add" not in text
