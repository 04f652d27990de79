"""Measure the default verification criterion on calibrated networks and print a table: the error
of correct folds (bnfold's, onnxruntime's own fusion) and of wrong ones (one channel of the first,
the middle or the last folded layer scaled by 1.01; every BN folded with 100 times its epsilon),
against the bound, whether ``--per-layer`` names the layer of each wrong fold (the perturbed one for
a scaled channel; any layer for the wrong epsilon, which is in every layer), and whether the correct
fold passes with ``--per-layer`` too.

    python scripts/verify_criterion.py                    # the suite's calibrated networks
    python scripts/verify_criterion.py --zoo all          # timm/torchvision networks (scripts/zoo.py)
    python scripts/verify_criterion.py --zoo all --images # ... on images like the calibration's
    python scripts/verify_criterion.py --zoo hrnet_w18_small,cspdarknet53 --size 160
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from bench import work_folder  # noqa: E402
from test_calibrated import NETWORKS, onnxruntime_fusion  # noqa: E402

import bnfold  # noqa: E402
from tests.models import calibrate, perturb_channel, with_epsilon  # noqa: E402

CHANNELS = {"first x1.01": 0.0, "middle x1.01": 0.5, "last x1.01": 1.0}
EPSILON = "epsilon x100"


Network = tuple[str, onnx.ModelProto, Path | None]  # name, model, and the inputs to verify on (None: synthesized)


def suite_networks(work: Path) -> Iterator[Network]:
    for name, make in sorted(NETWORKS.items()):
        yield name, calibrate(make(), {"N": 2}), None


def zoo_networks(names: str, size: int, work: Path, images: bool) -> Iterator[Network]:
    from zoo import SIZES, ZOO, export
    from zoo import images as make_images

    for name in sorted(ZOO) if names == "all" else names.split(","):
        model = onnx.load(str(export(name, work / f"{name}_export.onnx", size)))
        inputs = make_images(work / f"{name}_images.npz", SIZES.get(name, size)) if images else None
        yield name, model, inputs


def row(name: str, model: onnx.ModelProto, inputs: Path | None, work: Path, tally: dict[str, list[bool]]) -> str:
    folded, _ = bnfold.fold(model)
    candidates: dict[str, onnx.ModelProto] = {"fold": folded}
    layers: dict[str, str | None] = {}
    for label, at in CHANNELS.items():
        candidates[label], layers[label] = perturb_channel(folded, model, 1.01, at=at)
    candidates[EPSILON], layers[EPSILON] = bnfold.fold(with_epsilon(model, 100, times=True))[0], None
    original = work / f"{name}.onnx"
    onnx.save(model, str(original))
    paths = {k: work / f"{name}_{k.replace(' ', '_')}.onnx" for k in candidates}
    for k, m in candidates.items():
        onnx.save(m, str(paths[k]))
    paths["ort"] = onnxruntime_fusion(model, work / f"{name}_ort.onnx")
    given = {"inputs": inputs} if inputs else {}
    reports = {k: bnfold.verify(original, p, **given) for k, p in paths.items()}
    cells = {k: f"{r.outputs[0].error:.1e} {'pass' if r else 'FAIL'}" for k, r in reports.items()}
    tally["correct folds pass"] += [bool(reports["fold"]), bool(reports["ort"])]
    tally["correct folds pass with --per-layer"].append(
        bool(bnfold.verify(original, paths["fold"], per_layer=True, **given))
    )
    named = []
    for label, layer in layers.items():
        tally["wrong folds fail"].append(not reports[label])
        found = bnfold.verify(original, paths[label], per_layer=True, **given).first_divergent_layer
        ok = found is not None and (layer is None or found == layer)
        tally["--per-layer names the layer"].append(ok)
        named.append("yes" if ok else f"no ({found})")
    out = reports["fold"].outputs[0]
    bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    wrong = " | ".join(cells[k] for k in layers)
    return (
        f"| {name} | {bns} | {out.baseline_error:.1e} | {out.bound:.1e} | {cells['fold']} | {cells['ort']} "
        f"| {wrong} | {', '.join(named)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="timm/torchvision networks (scripts/zoo.py): names, or 'all'")
    ap.add_argument("--size", type=int, default=160, help="--zoo: input height and width")
    ap.add_argument("--images", action="store_true", help="--zoo: verify on images like the calibration's")
    args = ap.parse_args()
    work = work_folder(None, "bnfold-criterion-")
    networks = zoo_networks(args.zoo, args.size, work, args.images) if args.zoo else suite_networks(work)
    print(
        f"| model | BNs | floor | bound | bnfold fold | onnxruntime fusion | {' | '.join(CHANNELS)} | {EPSILON} "
        "| --per-layer names |"
    )
    print("|---" * 11 + "|")
    tally: dict[str, list[bool]] = {
        "correct folds pass": [],
        "correct folds pass with --per-layer": [],
        "wrong folds fail": [],
        "--per-layer names the layer": [],
    }
    for name, model, inputs in networks:
        print(row(name, model, inputs, work, tally), flush=True)
    print("; ".join(f"{what}: {sum(v)} of {len(v)}" for what, v in tally.items()))


if __name__ == "__main__":
    main()
