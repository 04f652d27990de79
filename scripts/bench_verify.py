"""bnfold verify's peak memory and time beside the bare onnxruntime work it needs.

For each model (built by scripts/bench.py's builders, folded by bnfold), three kinds of process run,
interleaved, each as a whole process timed from outside, with its peak resident memory from wait4():

* ``verify``: ``bnfold verify ORIGINAL FOLDED`` at its defaults (3 samples, the baseline on);
* ``one session``: a process that loads the original in one onnxruntime session (optimizations off)
  by its path, as a user's script would, and runs it on the same 3 samples (verify hands onnxruntime
  inline weights to map instead: the README says what that changes);
* ``basic session``: the same at onnxruntime's BASIC level, the baseline's session: its own Conv+BN
  fusion makes new weights, so it is the largest session verify needs;
* ``bare runs``: a process doing the onnxruntime work verify needs, one session after another: the
  original unoptimized, the original at BASIC (the baseline), the folded model unoptimized, each on
  the 3 samples: the time floor.

Each round runs the four, in an order that turns round every other round; the time is read both
from the medians and round by round (verify against the bare runs of the same round).

    python scripts/bench_verify.py --models resnet50,external2.5g --runs 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench import resnet50, run_once, work_folder, write_external  # noqa: E402

BARE = """
import sys, numpy as np, onnx, onnxruntime as ort
from bnfold.verification import input_specs, random_input, resolve_shape
original, folded, which = sys.argv[1], sys.argv[2], sys.argv[3]
specs = input_specs(onnx.load(original, load_external_data=False))
rng = np.random.default_rng(0)
samples = [{n: random_input(rng, dt, resolve_shape(n, d, {}, {})) for n, dt, d in specs} for _ in range(3)]
levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
runs = {"one": [(original, "disable")], "basic": [(original, "basic")]}.get(
    which, [(original, "disable"), (original, "basic"), (folded, "disable")]
)
for path, level in runs:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for feeds in samples:
        sess.run(None, feeds)
    del sess
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of a whole process, measured by bench.py's small timer
    process (a fork of this one would count this process's own memory as the child's)."""
    wall, rss, ok = run_once(cmd, 3600)
    if not ok:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed")
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--external-gb", type=float, default=2.5)
    ap.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    args = ap.parse_args()
    work = work_folder(args.work, "bnfold-bench-verify-")
    py = sys.executable
    print(f"{args.runs} runs each, interleaved; peak RSS of each whole process")
    print(f"| {'model':12} | {'process':13} | {'median s':>9} | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 14}|{'-' * 15}|{'-' * 11}|{'-' * 14}|")
    for name in args.models.split(","):
        original, folded = work / f"{name}.onnx", work / f"{name}_folded.onnx"
        if not original.exists():
            if name == "resnet50":
                onnx.save(resnet50(), str(original))
            else:
                write_external(original, args.external_gb)
        if not folded.exists():
            subprocess.run(
                [py, "-m", "bnfold", "fold", str(original), "-o", str(folded), "-q"],
                check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        kinds = {
            "verify": [py, "-m", "bnfold", "verify", str(original), str(folded), "-q"],
            "one session": [py, "-c", BARE, str(original), str(folded), "one"],
            "basic session": [py, "-c", BARE, str(original), str(folded), "basic"],
            "bare runs": [py, "-c", BARE, str(original), str(folded), "all"],
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for r in range(args.runs):
            # The order turns round every other round, so that a drift in the machine's speed
            # within a round (it moves by 2x within minutes) does not favour the process run first.
            for kind in list(kinds)[:: 1 if r % 2 == 0 else -1]:
                results[kind].append(run(kinds[kind]))
        med = {k: (statistics.median(w for w, _ in v), max(r for _, r in v)) for k, v in results.items()}
        for kind, (wall, rss) in med.items():
            print(f"| {name:12} | {kind:13} | {wall:9.2f} | {rss:12.0f} |")
        ratios = [v / b - 1 for (v, _), (b, _) in zip(results["verify"], results["bare runs"], strict=True)]
        print(
            f"  {name}: verify's peak {med['verify'][1] / med['one session'][1]:.2f}x one session's, "
            f"{med['verify'][1] / med['basic session'][1]:.2f}x the basic session's; "
            f"time {(med['verify'][0] / med['bare runs'][0] - 1) * 100:+.1f}% against the bare runs (medians); "
            f"round by round {statistics.median(ratios) * 100:+.1f}% median, "
            f"{min(ratios) * 100:+.1f}% to {max(ratios) * 100:+.1f}%"
        )


if __name__ == "__main__":
    main()
