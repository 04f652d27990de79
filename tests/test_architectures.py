"""Realistic architectures built without torch: each folds completely where folding is possible."""

import pytest
from conftest import check_fold

from models import ARCHITECTURES

# BNs that must stay, and why (DenseNet's pre-activation BNs follow a Concat or share their input).
EXPECTED_LEFT = {"densenet_preact": ["shared_producer_output"] * 3 + ["concat_branch"]}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_folds_and_matches(name):
    model = ARCHITECTURES[name]()
    expected = EXPECTED_LEFT.get(name, [])
    _, report = check_fold(model, left=len(expected), dims={"N": 2, "batch": 3})
    assert [item.reason for item in report.left] == expected
    assert len(report.folded) == report.before.batchnorms - len(expected) > 0 or name in EXPECTED_LEFT
