"""Hostile graphs and hostile environments, built here: a fold that would change meaning stays with a
reason, a graph that is not a graph is refused, and every path a user names is read and written
safely. Each case: the exit code, one line, no traceback, nothing written (or an output equivalent
to the input under onnxruntime), the input unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import check_fold
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from bnfold.cli import cli
from models import Builder, calibrate

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


def invoke(*args) -> CliRunner.invoke:
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


def refused(result, *words: str) -> str:
    """Exit 2, one line on stderr naming the problem, no traceback. Returns the line."""
    err = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == 2, result.output
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# -- Concat splits: only along every branch's channel axis ------------------------------------------

K, C_IN = 3, 2  # every branch writes a (K,) * rank value, so that a Concat along any axis is valid
BRANCHES = {  # kind -> the ranks it writes
    "gemm": (2,),
    "matmul": (2, 3, 4, 5),
    "conv": (3, 4, 5),
    "conv_transpose": (3, 4, 5),
    "transposed": (2, 3, 4, 5),  # a MatMul whose output goes through a Transpose first
}
CHANNELS_ON_AXIS_1 = {"gemm", "conv", "conv_transpose"}  # a MatMul's are on its last axis


def _branch(b: Builder, kind: str, rank: int) -> str:
    x = b.input(b.name("x"), [K, C_IN] + [K] * (rank - 2) if kind.startswith("conv") else [K] * (rank - 1) + [C_IN])
    if kind == "gemm":
        return b.gemm(x, C_IN, K)
    if kind == "conv":
        return b.conv(x, C_IN, K, k=1, dims=rank - 2)
    if kind == "conv_transpose":
        return b.conv_transpose(x, C_IN, K, k=1, stride=1, dims=rank - 2)
    y = b.op("MatMul", [x, b.const(b.randn(C_IN, K), "w")])
    if kind == "transposed":
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        y = b.op("Transpose", [y], perm=perm)
    return y


def concat_then_bn(kinds: List[str], rank: int, axis: int) -> onnx.ModelProto:
    b = Builder(seed=31)
    joined = b.op("Concat", [_branch(b, kind, rank) for kind in kinds], axis=axis)
    channels = K * len(kinds) if axis % rank == 1 else K
    return calibrate(b.model(b.relu(b.bn(joined, channels))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_concat_split_folds_only_along_every_branch_channel_axis(data):
    """Concat of two or three branches of any kind, rank 2 to 5, along any axis (negative ones too),
    then BN (which normalizes axis 1): predicted to fold exactly when the Concat joins axis 1 and
    every branch writes its channels there; each fold is checked against onnxruntime, and a BN that
    stays says which branch and why."""
    rank = data.draw(st.integers(2, 5), label="rank")
    kinds = [k for k, ranks in BRANCHES.items() if rank in ranks]
    if data.draw(st.booleans(), label="aimed at a fold"):  # half the cases: the forms that fold, and near them
        kinds = [k for k in kinds if k in CHANNELS_ON_AXIS_1 or (k == "matmul" and rank == 2)] or kinds
    kinds = data.draw(st.lists(st.sampled_from(kinds), min_size=2, max_size=3), label="kinds")
    axis = data.draw(st.sampled_from([1, 1 - rank]) | st.integers(-rank, rank - 1), label="axis")
    folds = axis % rank == 1 and all(k in CHANNELS_ON_AXIS_1 or (k == "matmul" and rank == 2) for k in kinds)
    _, report = check_fold(concat_then_bn(kinds, rank, axis), left=0 if folds else 1)
    for left in report.left:
        assert left.reason == "concat_branch", left
        assert "branch " in left.message, left


@pytest.mark.parametrize(
    "kinds, rank, axis",
    [
        (["matmul", "matmul"], 3, 1),  # the token axis of two rank-3 MatMuls
        (["matmul", "matmul"], 3, -2),
        (["conv", "matmul"], 3, 1),  # a Conv1d beside a MatMul
        (["conv", "conv"], 4, 2),  # a spatial axis
        (["gemm", "gemm"], 2, 0),  # the batch axis
    ],
    ids=["matmul3_axis1", "matmul3_axis-2", "conv1d_matmul3", "conv_spatial", "gemm_batch"],
)
def test_concat_splits_that_would_change_meaning_keep_the_bn(kinds, rank, axis):
    _, report = check_fold(concat_then_bn(kinds, rank, axis), left=1)
    (left,) = report.left
    assert left.reason == "concat_branch" and "the BN normalizes axis 1" in left.message, left
