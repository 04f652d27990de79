"""Numeric verification through onnxruntime.

The reference is always the original model on the CPU provider with every graph optimization off
(from the BASIC level on, onnxruntime fuses Conv+BN itself, so anything else would compare a fold
with a fold). Samples are generated, run and compared one at a time, so memory holds at most one
sample's activations per model.

* :mod:`.options`: :class:`VerifyOptions`, the one home of the defaults.
* :mod:`.inputs`: what both models are fed.  * :mod:`.sessions`: onnxruntime.
* :mod:`.compare`: the criteria.  The result types live in :mod:`bnfold.report`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import BnfoldError, enough_memory, model_text
from ..io.arrays import write_npz
from ..io.load import ModelLike, open_model
from ..io.save import check_destination
from ..options import PROVIDERS, VerifyOptions
from ..proto import is_batchnorm
from ..report import ErrorStats, VerifyReport
from ..shapes import inconsistency
from . import compare
from .compare import accumulate, judge_layers, judge_outputs, new_stats
from .inputs import given_samples, input_specs, load_inputs, random_input, resolve_shape, synthesized
from .sessions import check_providers, make_session, session_source

__all__ = [
    "ErrorStats",
    "VerifyOptions",
    "VerifyReport",
    "check_providers",
    "check_save_paths",
    "input_specs",
    "random_input",
    "resolve_shape",
    "verify",
]

MEMORY_HINT = "use smaller dynamic dimensions (dims, input_shapes: --dim, --input-shape) or fewer samples"


def _proto_and_path(model: ModelLike) -> tuple[onnx.ModelProto, Path | None, set[Path]]:
    """The model, its path, and the resolved paths of its file and data files (never overwritten)."""
    if isinstance(model, onnx.ModelProto):
        return model, None, set()
    proto, source = open_model(model)
    path = Path(model)
    return proto, path, {path.resolve()} | source.files()


def check_save_paths(options: VerifyOptions, protected: Iterable[Path]) -> None:
    """Refuse, before anything runs, --save-inputs/--save-outputs paths that would overwrite a model
    or its data (``protected``), each other, a folder or something that is not a regular file."""
    protected = set(protected)
    paths = [
        (flag, Path(p))
        for flag, p in (("save_inputs", options.save_inputs), ("save_outputs", options.save_outputs))
        if p
    ]
    for flag, path in paths:
        check_destination(path, protected, flag)
    if len(paths) == 2 and paths[0][1].resolve() == paths[1][1].resolve():
        raise BnfoldError(f"{paths[0][1]}: save_inputs and save_outputs name the same file")


def _bn_outputs(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node if is_batchnorm(n)]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], types: Mapping[str, int]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 0), None))
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference only names the dtypes of extra outputs; onnxruntime fills them in
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.output) + list(g.input)}


def _short(provider: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


def _feeds(model: onnx.ModelProto, o: VerifyOptions) -> Iterator[dict[str, np.ndarray]]:
    if o.inputs is None:
        return synthesized(model, o.samples, o.seed, o.dims, o.input_shapes, o.max_input_bytes)
    if isinstance(o.inputs, Mapping):
        return given_samples(model, [{k: np.asarray(v) for k, v in o.inputs.items()}])
    return given_samples(model, load_inputs(o.inputs, o.max_input_bytes))


def _save_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Arrays with a leading axis of samples, as --inputs reads them back (checked before the run:
    :func:`check_save_paths`), written atomically."""
    write_npz(path, arrays)


def _run(sess: Any, feeds: dict[str, np.ndarray], which: str) -> list[np.ndarray]:
    """One run; onnxruntime's refusal of these inputs is the user's to fix, not a bug here."""
    names = {i.name for i in sess.get_inputs()}
    try:
        return list(sess.run(None, {k: v for k, v in feeds.items() if k in names}))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "Failed to allocate memory" in first:
            first += f"; not enough memory: {MEMORY_HINT}"
        raise BnfoldError(f"onnxruntime cannot run {which} on these inputs: {first}") from None


@model_text()
@enough_memory("to verify", MEMORY_HINT)
def verify(
    original: ModelLike,
    candidate: ModelLike,
    options: VerifyOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    **overrides: Any,
) -> VerifyReport:
    """Run ``original`` (CPU, optimizations off) and ``candidate`` (each provider) on the same inputs
    and compare every output by name. Returns a :class:`VerifyReport`, true when equivalent.

    Options come from ``options`` (default :class:`VerifyOptions`), overridden by keyword arguments
    named as its fields (``samples=5``, ``per_layer=True``, ...). ``per_layer`` also compares every
    BatchNormalization output of the original (names survive folding) and names the first that
    diverges. ``progress`` is called with the number of samples done after each one. User errors
    raise :class:`bnfold.BnfoldError` (:class:`bnfold.errors.OptionError` for an option's value,
    naming the option).
    """
    o = VerifyOptions.of(options, **overrides)
    provider_names = check_providers(o.providers)
    ref_model, ref_path, ref_files = _proto_and_path(original)
    cand_model, cand_path, cand_files = _proto_and_path(candidate)
    check_save_paths(o, ref_files | cand_files)
    for which, model in (("the original", ref_model), ("the candidate", cand_model)):
        problem = inconsistency(model)  # before onnxruntime sees it: some releases crash on such graphs
        if problem:
            raise BnfoldError(f"{which} is not a consistent graph: {problem}")
    output_names = [out.name for out in ref_model.graph.output]
    output_set = set(output_names)
    candidate_outputs = [out.name for out in cand_model.graph.output]
    layer_names: list[str] = []
    orig_model = ref_model
    if o.per_layer:
        # The candidate with more outputs declared may load where the candidate as written does not
        # (an output's declared type replaces a stale value_info entry): it must load as written.
        with ExitStack() as stack:
            make_session(session_source(cand_model, cand_path, False, stack))
        # A BN folded backward or lowered leaves no tensor of its own name: only names both have count.
        produced = {name for n in cand_model.graph.node for name in n.output}
        layer_names = [n for n in _bn_outputs(ref_model) if n in produced and n not in output_set]
        types = _elem_types(ref_model)
        ref_model = _with_outputs(ref_model, layer_names, types)
        cand_model = _with_outputs(cand_model, layer_names, types)
    uses_cuda = "CUDAExecutionProvider" in provider_names
    scaled = o.rtol is None and o.atol is None
    report = VerifyReport(
        passed=False,
        providers=provider_names,
        samples=0,
        seed=o.seed,
        rtol=o.rtol,
        atol=o.atol,
        graph_optimization=o.graph_optimization,
        tf32=o.allow_tf32 if uses_cuda else None,
        baseline=o.baseline and scaled,
    )
    if uses_cuda:
        report.notes.append(
            "TF32 is allowed on CUDA: float32 thresholds widened to match"
            if o.allow_tf32
            else "TF32 is off on CUDA, so differences are the fold's, not the math mode's"
        )
    extra = [name for name in candidate_outputs if name not in output_set]
    if extra:
        report.notes.append(f"the candidate has outputs the original has not, not compared: {', '.join(extra)}")
    elif candidate_outputs != output_names and set(candidate_outputs) == output_set:
        report.notes.append("the candidate lists its outputs in another order (compared by name)")
    stats: dict[tuple[str, str], ErrorStats] = {}
    floors: dict[str, ErrorStats] = {}
    layer_set = set(layer_names)
    saved_inputs: list[dict[str, np.ndarray]] = []
    saved_outputs: dict[str, list[np.ndarray]] = {}
    held: set[str] = set()  # outputs whose reference held values, finite or not
    with ExitStack() as stack:
        ref = make_session(session_source(ref_model, ref_path, o.per_layer, stack))
        base = (
            make_session(session_source(orig_model, ref_path, False, stack), level="basic") if report.baseline else None
        )
        cands = [
            (
                p,
                make_session(
                    session_source(cand_model, cand_path, o.per_layer, stack), p, o.graph_optimization, o.allow_tf32
                ),
            )
            for p in provider_names
        ]
        ref_outputs = [out.name for out in ref.get_outputs()]
        common = set(ref_outputs) & {out.name for out in cands[0][1].get_outputs()}
        if not common & output_set:
            raise BnfoldError("the two models have no output name in common: they are not two versions of one model")
        for k, feeds in enumerate(_feeds(ref_model, o)):
            ref_vals = dict(zip(ref_outputs, _run(ref, feeds, "the original"), strict=False))
            held.update(name for name, value in ref_vals.items() if value.size)
            if o.save_inputs:
                saved_inputs.append(feeds)
            if o.save_outputs:
                for name, value in ref_vals.items():
                    saved_outputs.setdefault(f"reference/{name}", []).append(value)
            if base is not None:
                for name, value in zip(
                    [x.name for x in base.get_outputs()], _run(base, feeds, "the original"), strict=False
                ):
                    if name in ref_vals:
                        floor = floors.setdefault(name, new_stats(name, ref_vals[name].dtype, "floor", None, None))
                        accumulate(floor, ref_vals[name], value, k)
            for provider, sess in cands:
                tf32 = o.allow_tf32 and provider == "CUDAExecutionProvider"
                got = dict(zip([x.name for x in sess.get_outputs()], _run(sess, feeds, "the candidate"), strict=False))
                for name, value in ref_vals.items():
                    key = (name, provider)
                    if key not in stats:
                        stats[key] = new_stats(name, value.dtype, _short(provider), o.rtol, o.atol, tf32)
                    if name not in got:
                        stats[key].missing = True
                        continue
                    accumulate(stats[key], value, got[name], k, channels=name in layer_set)
                    if o.save_outputs:
                        saved_outputs.setdefault(f"{_short(provider)}/{name}", []).append(got[name])
            report.samples = k + 1
            if progress:
                progress(k + 1)
    report.outputs = [stats[(n, p)] for n in output_names for p in provider_names if (n, p) in stats]
    report.layers = [stats[(n, p)] for n in layer_names for p in provider_names if (n, p) in stats]
    empty = [
        s.name
        for s in report.outputs + report.layers
        if not s.elements and not (s.missing or s.shape_mismatch) and not s.nonfinite_mismatches
    ]
    if empty:
        names = ", ".join(sorted(set(empty)))
        if all(name in held for name in empty):  # values, all inf or NaN, at the same places in both
            raise BnfoldError(
                f"nothing was compared for {names}: every value is inf or NaN in both models "
                "(an uncalibrated network, or inputs outside its range?)"
            )
        raise BnfoldError(f"nothing was compared for {names} (no elements): check the input shapes and dims (--dim)")
    judge_outputs(
        report.outputs, [compare.scaled_error(floors[s.name]) if s.name in floors else None for s in report.outputs]
    )
    for provider in provider_names:
        judge_layers([s for s in report.layers if s.provider == _short(provider)])
    bad_layers = [s.name for s in report.layers if not s.passed]
    report.first_divergent_layer = bad_layers[0] if bad_layers else None
    report.passed = all(s.passed for s in report.outputs + report.layers)
    if o.save_inputs and saved_inputs:
        _save_npz(o.save_inputs, {n: np.stack([f[n] for f in saved_inputs]) for n in saved_inputs[0]})
    if o.save_outputs and saved_outputs:
        _save_npz(o.save_outputs, {n: np.stack(v) for n, v in saved_outputs.items()})
    return report
