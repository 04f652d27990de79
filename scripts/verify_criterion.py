"""Measure the default verification criterion on calibrated networks and print a table: the error
of correct folds (bnfold's, onnxruntime's own fusion) and of wrong ones (one channel of a middle
layer scaled by 1.01; every BN folded with epsilon 1e-3 instead of its own), against the bound.

    python scripts/verify_criterion.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_calibrated import NETWORKS, onnxruntime_fusion  # noqa: E402

import bnfold  # noqa: E402
from tests.models import calibrate, perturb_channel, with_epsilon  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bnfold-criterion-"))
    print(
        "| model | BNs | floor | bound | bnfold fold | onnxruntime fusion | channel x1.01 | epsilon 1e-3 | --per-layer names |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, make in sorted(NETWORKS.items()):
        model = calibrate(make(), {"N": 2})
        folded, _ = bnfold.fold(model)
        wrong, layer = perturb_channel(folded, model, 1.01)
        candidates = {"fold": folded, "wrong": wrong, "eps": bnfold.fold(with_epsilon(model, 1e-3))[0]}
        paths = {k: work / f"{name}_{k}.onnx" for k in candidates}
        for k, m in candidates.items():
            onnx.save(m, str(paths[k]))
        original = work / f"{name}.onnx"
        onnx.save(model, str(original))
        paths["ort"] = onnxruntime_fusion(model, work / f"{name}_ort.onnx")
        reports = {k: bnfold.verify(original, p) for k, p in paths.items()}
        layered = bnfold.verify(original, paths["wrong"], per_layer=True)
        out = reports["fold"].outputs[0]

        cells = {k: f"{r.outputs[0].error:.1e} {'pass' if r else 'FAIL'}" for k, r in reports.items()}

        bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        named = "yes" if layered.first_divergent_layer == layer else f"no ({layered.first_divergent_layer})"
        print(
            f"| {name} | {bns} | {out.baseline_error:.1e} | {out.bound:.1e} | {cells['fold']} | {cells['ort']} "
            f"| {cells['wrong']} | {cells['eps']} | {named} |"
        )


if __name__ == "__main__":
    main()
