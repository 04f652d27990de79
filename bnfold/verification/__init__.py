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
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from ..errors import BnfoldError, model_text
from ..io.load import load
from ..proto import is_batchnorm
from ..report import ErrorStats, VerifyReport
from .compare import accumulate, tolerance
from .inputs import given_samples, input_specs, load_inputs, random_input, resolve_shape, synthesized
from .options import PROVIDERS, InputsLike, VerifyOptions
from .sessions import check_providers, make_session, session_source

__all__ = [
    "ErrorStats",
    "VerifyOptions",
    "VerifyReport",
    "check_providers",
    "input_specs",
    "random_input",
    "resolve_shape",
    "verify",
]

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]


def _proto_and_path(model: ModelLike) -> Tuple[onnx.ModelProto, Optional[Path]]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    return load(model), Path(model)


def _bn_outputs(model: onnx.ModelProto) -> List[str]:
    return [n.output[0] for n in model.graph.node if is_batchnorm(n)]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], types: Mapping[str, int]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 0), None))
    return out


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference only names the dtypes of extra outputs; onnxruntime fills them in
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.output) + list(g.input)}


def _short(provider: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


def _feeds(model: onnx.ModelProto, o: VerifyOptions) -> Iterator[Dict[str, np.ndarray]]:
    if o.inputs is None:
        return synthesized(model, o.samples, o.seed, o.dims, o.input_shapes, o.max_input_bytes)
    if isinstance(o.inputs, Mapping):
        return given_samples(model, [{k: np.asarray(v) for k, v in o.inputs.items()}])
    return given_samples(model, load_inputs(o.inputs, o.max_input_bytes))


def _run(sess: Any, feeds: Dict[str, np.ndarray], which: str) -> List[np.ndarray]:
    """One run; onnxruntime's refusal of these inputs is the user's to fix, not a bug here."""
    names = {i.name for i in sess.get_inputs()}
    try:
        return list(sess.run(None, {k: v for k, v in feeds.items() if k in names}))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BnfoldError(f"onnxruntime cannot run {which} on these inputs: {first}") from None


@model_text()
def verify(
    original: ModelLike,
    candidate: ModelLike,
    options: Optional[VerifyOptions] = None,
    *,
    providers: Optional[Sequence[str]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    samples: Optional[int] = None,
    seed: Optional[int] = None,
    dims: Optional[Mapping[str, int]] = None,
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    inputs: InputsLike = None,
    per_layer: Optional[bool] = None,
    graph_optimization: Optional[str] = None,
    allow_tf32: Optional[bool] = None,
    max_input_bytes: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> VerifyReport:
    """Run ``original`` (CPU, optimizations off) and ``candidate`` (each provider) on the same inputs
    and compare every output by name. Returns a :class:`VerifyReport`, true when equivalent.

    Options come from ``options`` (default :class:`VerifyOptions`), overridden by the keyword
    arguments given. ``per_layer`` also compares every BatchNormalization output of the original
    (names survive folding) and names the first that diverges. ``progress`` is called with the
    number of samples done after each one. User errors raise :class:`bnfold.BnfoldError`.
    """
    o = VerifyOptions.of(
        options,
        providers=None if providers is None else tuple(providers),
        rtol=rtol,
        atol=atol,
        samples=samples,
        seed=seed,
        dims=dims,
        input_shapes=input_shapes,
        inputs=inputs,
        per_layer=per_layer,
        graph_optimization=graph_optimization,
        allow_tf32=allow_tf32,
        max_input_bytes=max_input_bytes,
    )
    provider_names = check_providers(o.providers)
    ref_model, ref_path = _proto_and_path(original)
    cand_model, cand_path = _proto_and_path(candidate)
    output_names = [out.name for out in ref_model.graph.output]
    layer_names: List[str] = []
    if o.per_layer:
        # A BN folded backward or lowered leaves no tensor of its own name: only names both have count.
        produced = {name for n in cand_model.graph.node for name in n.output}
        layer_names = [n for n in _bn_outputs(ref_model) if n in produced and n not in set(output_names)]
        types = _elem_types(ref_model)
        ref_model = _with_outputs(ref_model, layer_names, types)
        cand_model = _with_outputs(cand_model, layer_names, types)
    uses_cuda = "CUDAExecutionProvider" in provider_names
    report = VerifyReport(
        passed=False,
        providers=provider_names,
        samples=0,
        seed=o.seed,
        rtol=o.rtol,
        atol=o.atol,
        graph_optimization=o.graph_optimization,
        tf32=o.allow_tf32 if uses_cuda else None,
    )
    if uses_cuda:
        report.notes.append(
            "TF32 is allowed on CUDA: float32 tolerances widened to match"
            if o.allow_tf32
            else "TF32 is off on CUDA, so differences are the fold's, not the math mode's"
        )
    stats: Dict[Tuple[str, str], ErrorStats] = {}
    with ExitStack() as stack:
        ref = make_session(session_source(ref_model, ref_path, o.per_layer, stack))
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
        feeds_iter = _feeds(ref_model, o)
        for k, feeds in enumerate(feeds_iter):
            ref_vals = dict(zip(ref_outputs, _run(ref, feeds, "the original")))
            for provider, sess in cands:
                got_names = [out.name for out in sess.get_outputs()]
                got = dict(zip(got_names, _run(sess, feeds, "the candidate")))
                for name, value in ref_vals.items():
                    key = (name, provider)
                    if key not in stats:
                        r, a = tolerance(
                            value.dtype, o.rtol, o.atol, o.allow_tf32 and provider == "CUDAExecutionProvider"
                        )
                        stats[key] = ErrorStats(name, r, a, provider=_short(provider))
                    if name not in got:
                        stats[key].missing = True
                    else:
                        accumulate(stats[key], value, got[name])
            report.samples = k + 1
            if progress:
                progress(k + 1)
    report.outputs = [stats[(n, p)] for n in output_names for p in provider_names]
    report.layers = [stats[(n, p)] for n in layer_names for p in provider_names if (n, p) in stats]
    bad_layers = [s.name for s in report.layers if not s.passed]
    report.first_divergent_layer = bad_layers[0] if bad_layers else None
    report.passed = all(s.passed for s in report.outputs)
    return report
