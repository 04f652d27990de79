"""The Python API: what the CLI calls, usable on its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import onnx

from . import io
from .errors import BnfoldError
from .fold import fold_model, stats
from .report import FoldReport

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


def _open(model: ModelLike) -> Tuple[onnx.ModelProto, Optional[Path]]:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, None
    path = Path(model)
    return io.load(path), path


def default_output(path: Path) -> Path:
    return path.with_name(f"{path.stem}_folded{path.suffix or '.onnx'}")


def fold(
    model: ModelLike,
    output: Optional[Union[str, os.PathLike]] = None,
    *,
    dry_run: bool = False,
) -> Tuple[onnx.ModelProto, FoldReport]:
    """Fold every inference BatchNormalization of ``model`` that can fold without changing meaning.

    ``model`` is a path or an ``onnx.ModelProto`` (never modified: the fold works on a copy). With
    ``output``, the folded model is also written there atomically. Returns the folded model and a
    :class:`FoldReport` that names each folded BN and gives a reason for each BN left alone.
    """
    proto, path = _open(model)
    if output is not None and path is not None and Path(output).resolve() == path.resolve():
        raise BnfoldError(f"{output}: the output would overwrite the input; choose another path")
    base_dir = path.parent if path is not None else None
    before = stats(proto)
    outcome = fold_model(proto, io.TensorLoader(base_dir), dry_run=dry_run)
    report = FoldReport(
        before=before,
        after=stats(proto),
        folded=outcome.folded,
        left=outcome.left,
        absorbed=outcome.absorbed,
        input=str(path) if path is not None else None,
        dry_run=dry_run,
    )
    if output is not None and not dry_run:
        report.after.bytes = io.save(proto, output)
        report.output = str(output)
    return proto, report
