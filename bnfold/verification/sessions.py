"""onnxruntime sessions: imported only here, and only when a command verifies."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import onnx

from ..errors import BnfoldError
from ..io.tensors import Source
from ..options import PROVIDERS
from ..proto import external_location

LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BnfoldError(
            "onnxruntime is not installed: pip install 'bnfold[cpu]' (or 'bnfold[gpu]' for CUDA; never both)"
        ) from None
    return onnxruntime


def check_providers(names: Sequence[str]) -> list[str]:
    """Map 'cpu'/'cuda' to onnxruntime providers; fail clearly when one is not available."""
    from ..runtime import conflict

    problem = conflict()
    if problem:
        raise BnfoldError(problem)
    available = ort().get_available_providers()
    out = []
    for name in names:
        key = name.strip().lower()
        if key not in PROVIDERS:
            raise BnfoldError(f"unknown provider '{name}': choose from {', '.join(PROVIDERS)}")
        if PROVIDERS[key] not in available:
            if key == "cuda":
                raise BnfoldError(
                    "CUDA is not available: this onnxruntime has no CUDAExecutionProvider "
                    f"(available: {', '.join(available)}). Install onnxruntime-gpu instead of onnxruntime "
                    "(pip install 'bnfold[gpu]') on a machine with an NVIDIA driver and CUDA/cuDNN."
                )
            raise BnfoldError(f"provider {PROVIDERS[key]} is not available (available: {', '.join(available)})")
        out.append(PROVIDERS[key])
    return out


def make_session(
    source: str | bytes, provider: str = "CPUExecutionProvider", level: str = "disable", tf32: bool = False
) -> Any:
    rt = ort()
    opts = rt.SessionOptions()
    opts.graph_optimization_level = getattr(rt.GraphOptimizationLevel, LEVELS[level])
    # Fatal messages only: a run or load that fails raises, and bnfold says so in one line; at the
    # error level onnxruntime would also print its own lines of the same failure to stderr.
    opts.log_severity_level = 4
    providers: list[Any] = [provider]
    if provider == "CUDAExecutionProvider":
        providers = [(provider, {"use_tf32": int(tf32)}), "CPUExecutionProvider"]
    try:
        sess = rt.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnfoldError(f"onnxruntime cannot load the model: {first}") from None
    if sess.get_providers()[0] != provider:
        raise BnfoldError(
            f"CUDA is not available: onnxruntime fell back to {sess.get_providers()[0]} "
            "(check the NVIDIA driver and the CUDA/cuDNN libraries onnxruntime-gpu needs)"
        )
    return sess


def _has_external(model: onnx.ModelProto) -> bool:
    return any(external_location(t) is not None for t in model.graph.initializer)


def session_source(model: onnx.ModelProto, source: Source | None, changed: bool, stack: ExitStack) -> str | bytes:
    """What onnxruntime loads of a model opened from ``source`` (None: a proto in memory). Where
    large weights were left in the model file when it was read, a temporary graph whose data file is
    a hard link to that file: onnxruntime maps the weights instead of parsing them into its heap (on
    ResNet-50, 197 against 212 MiB unoptimized and 231 against 320 MiB at its BASIC level, where its
    fusion keeps both the parsed weights and the fused ones). Where the graph changed and its
    weights lie in files, the same with every data file linked, or copied where no link can be made
    (another filesystem). Else the file itself when untouched, or the bytes. Each data file is where
    ``source`` validated it when the model was opened (inside the model's folder; the model file
    itself wherever a link to it leads) and is linked under a name of our own, so nothing is created
    outside the temporary folder whatever the model names."""
    path = source.model_file if source is not None else None
    if source is not None and path is not None and _has_external(model):
        linked = _linked(model, source, path, stack, changed)
        if linked is not None:
            return linked
    if path is not None and not changed:
        return str(path)
    data: bytes = model.SerializeToString()
    return data


def _linked(model: onnx.ModelProto, source: Source, path: Path, stack: ExitStack, changed: bool) -> str | None:
    """The temporary copy of :func:`session_source`. Of an unchanged graph only where its weights
    lie in the model file itself, and only where a link and the temporary folder can be made (else
    None: the file as written does): onnxruntime maps separate data files from the model's path
    already, and a link would give such a file a second name while verify runs, which a check of it
    by another process refuses."""
    places = [source.location(t).path for t in model.graph.initializer if external_location(t) is not None]
    if not changed and any(real != path.resolve() for real in places):
        return None
    try:
        return _write_linked(model, places, stack, copy=changed)
    except OSError:
        if changed:
            raise
        return None  # no temporary folder, link or room (a full disk, say): the file as written


def _write_linked(model: onnx.ModelProto, places: list[Path], stack: ExitStack, copy: bool) -> str:
    """The temporary folder of :func:`_linked`: each data file linked (or copied, with ``copy``)
    under a name of our own, and the graph pointing at them."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-")))
    names: dict[Path, str] = {}
    for real in places:
        if real in names:
            continue
        name = names[real] = f"data{len(names)}.bin"
        # onnxruntime refuses data paths that resolve outside the model's folder (symlinks too):
        # a hard link where the filesystem allows, else a copy.
        try:
            os.link(real, tmp / name)
        except OSError:
            if not copy:
                raise
            shutil.copyfile(real, tmp / name)
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    for t, real in zip([t for t in copied.graph.initializer if external_location(t) is not None], places, strict=True):
        for e in t.external_data:
            if e.key == "location":
                e.value = names[real]
    (tmp / "model.onnx").write_bytes(copied.SerializeToString())
    return str(tmp / "model.onnx")
