"""Shared checks: every fold test runs both models through onnxruntime with optimizations off."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bnfold
from bnfold.fold import stats
from bnfold.verification import input_specs, random_input, resolve_shape

# CI runs the property tests on a fixed sequence of examples (a verdict that can be reproduced);
# elsewhere hypothesis explores new ones each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def run_ort(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], provider="CPUExecutionProvider"
) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    # From the BASIC level on onnxruntime fuses Conv+BN itself: the reference must run unoptimized.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, dict(feeds)), strict=False))


def ort_runs(model: onnx.ModelProto) -> bool:
    """Whether the installed onnxruntime accepts the model's opset."""
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types
        if "opset" in str(exc).lower():
            return False
        raise
    return True


def run_reference(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ONNX reference evaluator, for forms onnxruntime has no kernel for (BN-6, bfloat16)."""
    from onnx.reference import ReferenceEvaluator

    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model).run(None, dict(feeds)), strict=False))


def feeds_for(model: onnx.ModelProto, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: random_input(rng, dt, resolve_shape(n, d, dims or {}, {})) for n, dt, d in input_specs(model)}


def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """Largest absolute difference relative to the output's largest magnitude."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    return float(np.max(np.abs(ref64 - got64)) / max(float(np.max(np.abs(ref64))), 1e-30))


def assert_same(
    original: onnx.ModelProto, folded: onnx.ModelProto, tol: float = 1e-5, dims=None, samples: int = 2, runner=run_ort
) -> None:
    for seed in range(samples):
        feeds = feeds_for(original, seed, dims)
        ref, got = runner(original, feeds), runner(folded, feeds)
        assert list(ref) == list(got)
        for name in ref:
            assert ref[name].shape == got[name].shape, name
            assert ref[name].dtype == got[name].dtype, name
            err = rel_error(ref[name], got[name])
            assert err <= tol, f"output {name}: relative error {err:.3g} > {tol:g}"


def count_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes anywhere in the model: main graph, bodies and functions."""
    return stats(model).batchnorms


def check_fold(
    model: onnx.ModelProto,
    left: int = 0,
    tol: float = 1e-5,
    dims=None,
    full_check: bool = True,
    runner=run_ort,
    **options,
):
    """Fold, then check every invariant: numerics, BN count, names, checker, input untouched, determinism."""
    original_bytes = model.SerializeToString()
    folded, report = bnfold.fold(model, **options)
    assert model.SerializeToString() == original_bytes, "the input model was modified"
    assert count_bn(folded) == left, report.render_text()
    assert report.after.batchnorms == left and len(report.left) == left
    assert [i.name for i in folded.graph.input if i.name not in {t.name for t in folded.graph.initializer}] == [
        i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert len({t.name for t in folded.graph.initializer}) == len(folded.graph.initializer)
    if full_check:
        onnx.checker.check_model(folded, full_check=True)
    assert bnfold.fold(model, **options)[0].SerializeToString() == folded.SerializeToString(), "not deterministic"
    assert_same(model, folded, tol, dims, runner=runner)
    return folded, report


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider is not available")
