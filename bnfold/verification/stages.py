"""verify as stages, each a function of its own: :func:`prepare` (load, screen, decide what is
compared and how), :func:`run` (the sessions, sample by sample), :func:`judge` (the criteria), and
:func:`save` (the arrays asked for)."""

from __future__ import annotations

import ctypes
import functools
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import BnfoldError
from ..io.arrays import write_npz
from ..io.load import ModelLike, open_model
from ..io.save import check_destination
from ..io.tensors import Source
from ..options import PROVIDERS, VerifyOptions
from ..proto import is_batchnorm
from ..report import ErrorStats, VerifyReport
from ..shapes import inconsistency
from . import compare
from .compare import accumulate, judge_layers, judge_outputs, new_stats
from .inputs import given_samples, input_specs, load_inputs, synthesized
from .quantizers import fed_from_reference, fed_quantizers
from .sessions import check_providers, make_session, session_source

SPILL_BYTES = 256 << 20  # inputs and reference values kept in memory up to this, then in a temporary folder
MEMORY_HINT = "use smaller dynamic dimensions (dims, input_shapes: --dim, --input-shape) or fewer samples"


@dataclass
class Prepared:
    """What is compared and how, decided before anything runs."""

    options: VerifyOptions
    providers: list[str]  # onnxruntime's names
    reference: onnx.ModelProto  # the original, with the BN outputs compared per layer declared as outputs
    original: onnx.ModelProto  # the original as written (onnxruntime's own fusion of it is the floor)
    original_source: Source | None  # where its weights are read from (None: a proto in memory)
    candidate: onnx.ModelProto
    candidate_source: Source | None
    outputs: list[str]  # the original's outputs, compared by name
    layers: list[str]  # BN outputs compared with per_layer, and the inputs of fed quantizers
    report: VerifyReport
    fed: list[str] = field(default_factory=list)  # quantizer outputs the candidate takes from the reference


@dataclass
class Tally:
    """What the runs gathered."""

    stats: dict[tuple[str, str], ErrorStats] = field(default_factory=dict)  # (output, provider)
    floors: dict[str, ErrorStats] = field(default_factory=dict)  # onnxruntime's fusion against the reference
    held: set[str] = field(default_factory=set)  # outputs whose reference held values, finite or not
    spans: dict[str, tuple[float, float, bool]] = field(default_factory=dict)  # finite min, max; any inf/NaN
    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # kept for save_inputs
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # kept for save_outputs


# -- prepare -------------------------------------------------------------------------------------


def _proto_and_source(model: ModelLike) -> tuple[onnx.ModelProto, Source | None, set[Path]]:
    """The model, the source of its weights (None for a proto), and the resolved paths of its file
    and data files (never overwritten)."""
    if isinstance(model, onnx.ModelProto):
        return model, None, set()
    proto, source = open_model(model)
    return proto, source, {Path(model).resolve()} | source.files()


def check_save_paths(options: VerifyOptions, protected: Iterable[Path]) -> None:
    """Refuse, before anything runs, save_inputs/save_outputs paths that would overwrite a model or
    its data (``protected``), each other, a folder or something that is not a regular file."""
    protected = set(protected)
    saved = (("the saved inputs", options.save_inputs), ("the saved outputs", options.save_outputs))
    paths = [(what, Path(p)) for what, p in saved if p]
    for what, path in paths:
        check_destination(path, protected, what)
    if len(paths) == 2 and paths[0][1].resolve() == paths[1][1].resolve():
        raise BnfoldError(f"{paths[0][1]}: the saved inputs and the saved outputs would go to the same file")


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


def _layers(ref: onnx.ModelProto, cand: onnx.ModelProto, cand_source: Source | None, outputs: set[str]) -> list[str]:
    """The BN outputs compared per layer: those both models compute and that are not outputs already.
    The candidate must load as written first (with more outputs declared it may load where it does
    not: an output's declared type replaces a stale value_info entry)."""
    with ExitStack() as stack:
        make_session(session_source(cand, cand_source, False, stack))
    # A BN folded backward or lowered leaves no tensor of its own name: only names both have count.
    produced = {name for n in cand.graph.node for name in n.output}
    return [n for n in _bn_outputs(ref) if n in produced and n not in outputs]


def _new_report(o: VerifyOptions, providers: list[str]) -> VerifyReport:
    uses_cuda = "CUDAExecutionProvider" in providers
    report = VerifyReport(
        passed=False,
        providers=providers,
        samples=0,
        seed=o.seed,
        rtol=o.rtol,
        atol=o.atol,
        graph_optimization=o.graph_optimization,
        tf32=o.allow_tf32 if uses_cuda else None,
        baseline=o.baseline and o.rtol is None and o.atol is None,
    )
    if uses_cuda:
        report.notes.append(
            "TF32 is allowed on CUDA: float32 thresholds widened to match"
            if o.allow_tf32
            else "TF32 is off on CUDA, so differences are the fold's, not the math mode's"
        )
    return report


def _note_outputs(report: VerifyReport, outputs: list[str], candidate_outputs: list[str]) -> None:
    extra = [name for name in candidate_outputs if name not in set(outputs)]
    if extra:
        report.notes.append(f"the candidate has outputs the original has not, not compared: {', '.join(extra)}")
    elif candidate_outputs != outputs and set(candidate_outputs) == set(outputs):
        report.notes.append("the candidate lists its outputs in another order (compared by name)")


def prepare(original: ModelLike, candidate: ModelLike, o: VerifyOptions) -> Prepared:
    """Load both models, refuse what onnxruntime must not see, and decide what is compared."""
    providers = check_providers(o.providers)
    ref_model, ref_source, ref_files = _proto_and_source(original)
    cand_model, cand_source, cand_files = _proto_and_source(candidate)
    check_save_paths(o, ref_files | cand_files)
    for which, model in (("the original", ref_model), ("the candidate", cand_model)):
        problem = inconsistency(model)  # before onnxruntime sees it: some releases crash on such graphs
        if problem:
            raise BnfoldError(f"{which} is not a consistent graph: {problem}")
    outputs = [out.name for out in ref_model.graph.output]
    layers = _layers(ref_model, cand_model, cand_source, set(outputs)) if o.per_layer else []
    fed = fed_quantizers(ref_model, cand_model) if o.rtol is None and o.atol is None else []
    layers += [x for x, _ in fed if x not in layers and x not in outputs]
    fed_outputs = [q for _, q in fed]
    reference, compared = ref_model, cand_model
    if layers:
        types = _elem_types(ref_model)
        reference = _with_outputs(ref_model, layers + fed_outputs, types)
        compared = fed_from_reference(_with_outputs(cand_model, layers, types), fed_outputs, types)
    report = _new_report(o, providers)
    _note_outputs(report, outputs, [out.name for out in cand_model.graph.output])
    if fed:
        report.notes.append(
            f"quantized activations: the candidate takes the integers of {len(fed)} QuantizeLinear output(s) from the "
            "original, so that each segment between quantizers is compared on its own; their inputs are compared per channel"
        )
    return Prepared(
        o, providers, reference, ref_model, ref_source, compared, cand_source, outputs, layers, report, fed_outputs
    )


# -- run -----------------------------------------------------------------------------------------


def _short(provider: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


def _feeds(model: onnx.ModelProto, o: VerifyOptions) -> Iterator[dict[str, np.ndarray]]:
    if o.inputs is None:
        return synthesized(model, o.samples, o.seed, o.dims, o.input_shapes, o.max_input_bytes)
    if isinstance(o.inputs, Mapping):
        return given_samples(model, [{k: np.asarray(v) for k, v in o.inputs.items()}])
    return given_samples(model, load_inputs(o.inputs, o.max_input_bytes))


def _run(sess: Any, feeds: dict[str, np.ndarray], which: str, used: Callable[[], str] = str) -> dict[str, np.ndarray]:
    """One run, by output name; onnxruntime's refusal of these inputs is the user's to fix, not a bug
    here: the error says what was fed and the options that set it (``used()``, asked only then)."""
    names = {i.name for i in sess.get_inputs()}
    try:
        values = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "Failed to allocate memory" in first:
            first += f"; not enough memory: {MEMORY_HINT}"
        raise BnfoldError(f"onnxruntime cannot run {which} on these inputs: {first}{used()}") from None
    return dict(zip([x.name for x in sess.get_outputs()], values, strict=False))


class _Kept:
    """Each sample's inputs and the reference's values, kept while the other models run: in memory
    up to SPILL_BYTES in all, then written to a temporary folder and read back one sample at a time."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.memory: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self.folder: Path | None = None
        self.count, self.nbytes = 0, 0

    def put(self, feeds: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
        self.nbytes += sum(v.nbytes for v in feeds.values()) + sum(v.nbytes for v in values.values())
        if self.folder is None and self.nbytes > SPILL_BYTES:
            self.folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-")))
            for k, kept in enumerate(self.memory):
                self._write(k, *kept)
            self.memory.clear()
        if self.folder is None:
            self.memory.append((feeds, values))
        else:
            self._write(self.count, feeds, values)
        self.count += 1

    def _write(self, k: int, feeds: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
        assert self.folder is not None
        for part, arrays in (("in", feeds), ("ref", values)):
            for j, value in enumerate(arrays.values()):
                np.save(self.folder / f"{k}.{part}.{j}.npy", value, allow_pickle=False)
            (self.folder / f"{k}.{part}.names").write_text(json.dumps(list(arrays)), encoding="utf-8")

    def get(self, k: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if self.folder is None:
            return self.memory[k]
        parts = []
        for part in ("in", "ref"):
            names = json.loads((self.folder / f"{k}.{part}.names").read_text(encoding="utf-8"))
            parts.append({n: np.load(self.folder / f"{k}.{part}.{j}.npy") for j, n in enumerate(names)})
        return parts[0], parts[1]


def _spans(tally: Tally, values: Mapping[str, np.ndarray]) -> None:
    """The range of each reference value's finite elements over the samples, and whether any is not finite."""
    for name, value in values.items():
        if value.dtype.kind not in "fiu" or not value.size:
            continue
        finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
        lo, hi, bad = tally.spans.get(name, (np.inf, -np.inf, False))
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        tally.spans[name] = (lo, hi, bad or finite.size < value.size)


def _reference_phase(p: Prepared, tally: Tally, kept: _Kept, stack: ExitStack) -> list[str]:
    """Run the reference on every sample, keeping its values; returns its output names."""
    ref = make_session(session_source(p.reference, p.original_source, bool(p.layers), stack))
    names = [out.name for out in ref.get_outputs()]
    for feeds in _feeds(p.reference, p.options):
        values = _run(ref, feeds, "the original", functools.partial(_inputs_used, p, feeds))
        tally.held.update(name for name, value in values.items() if value.size)
        _spans(tally, values)
        if p.options.save_inputs:
            tally.inputs.append(feeds)
        if p.options.save_outputs:
            for name, value in values.items():
                tally.outputs.setdefault(f"reference/{name}", []).append(value)
        kept.put(feeds, values)
    return names


def _baseline_phase(p: Prepared, tally: Tally, kept: _Kept, stack: ExitStack) -> None:
    """onnxruntime's own fusion of the original, on every sample: the floor of each output and, with
    per_layer, of each layer (onnxruntime fuses a Conv and its BN with the BN's output declared an
    output too). Not of layers where quantizers are fed: the baseline is not fed, so a step flipped
    by rounding would count as the floor there."""
    layers = not p.fed and bool(p.layers)
    model = p.reference if layers else p.original  # the reference: the original with the layers declared
    base = make_session(session_source(model, p.original_source, layers, stack), level="basic")
    channels = set(p.layers) if layers else set()
    for k in range(kept.count):
        feeds, ref_vals = kept.get(k)
        got = _run(base, feeds, "the original", functools.partial(_inputs_used, p, feeds))
        _floor(tally, ref_vals, got, k, channels)


def _candidate_phase(p: Prepared, tally: Tally, kept: _Kept, provider: str, stack: ExitStack) -> list[str]:
    """Run the candidate on ``provider`` on every sample, comparing; returns its output names."""
    o = p.options
    source = session_source(p.candidate, p.candidate_source, bool(p.layers or p.fed), stack)
    sess = make_session(source, provider, o.graph_optimization, o.allow_tf32)
    fed = set(p.fed)
    for k in range(kept.count):
        feeds, ref_vals = kept.get(k)
        cand_feeds = {**feeds, **{q: ref_vals[q] for q in p.fed}} if p.fed else feeds
        shown = {name: value for name, value in ref_vals.items() if name not in fed}
        _compare(
            p,
            tally,
            provider,
            shown,
            _run(sess, cand_feeds, "the candidate", functools.partial(_inputs_used, p, feeds)),
            k,
        )
    return [out.name for out in sess.get_outputs()]


def _floor(
    tally: Tally, ref_vals: dict[str, np.ndarray], base_vals: dict[str, np.ndarray], k: int, layers: set[str]
) -> None:
    for name, value in base_vals.items():
        if name in ref_vals:
            floor = tally.floors.setdefault(name, new_stats(name, ref_vals[name].dtype, "floor", None, None))
            accumulate(floor, ref_vals[name], value, k, channels=name in layers)


def _compare(
    p: Prepared, tally: Tally, provider: str, ref_vals: dict[str, np.ndarray], got: dict[str, np.ndarray], k: int
) -> None:
    o, layers = p.options, set(p.layers)
    tf32 = o.allow_tf32 and provider == "CUDAExecutionProvider"
    for name, value in ref_vals.items():
        key = (name, provider)
        if key not in tally.stats:
            tally.stats[key] = new_stats(name, value.dtype, _short(provider), o.rtol, o.atol, tf32)
        if name not in got:
            tally.stats[key].missing = True
            continue
        accumulate(tally.stats[key], value, got[name], k, channels=name in layers)
        if o.save_outputs:
            tally.outputs.setdefault(f"{_short(provider)}/{name}", []).append(got[name])


def _inputs_used(p: Prepared, feeds: Mapping[str, np.ndarray]) -> str:
    """What was fed, and how to change it, for an error onnxruntime raises on these inputs."""
    shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feeds.items())
    if p.options.inputs is not None:
        return f" (the inputs given: {shapes})"
    dynamic = sorted(
        {d for _, _, dims in input_specs(p.original) for d in dims if isinstance(d, str)} - set(p.options.dims)
    )
    defaulted = f"; dynamic dimensions left at 1: {', '.join(dynamic)}" if dynamic else ""
    return (
        f" (inputs synthesized with shapes {shapes}{defaulted}: set sizes with --dim NAME=SIZE or "
        "--input-shape NAME=D1,D2,..., or give real inputs with --inputs FILE.npz)"
    )


def _release_memory() -> None:
    """After each session, give the memory it freed back to the system before the next one loads:
    glibc keeps freed memory for the process otherwise, and the next session, whose weights are
    mapped from their file (:func:`.sessions.session_source`) rather than allocated, would add to it.
    On ResNet-50: 270-276 against 303-324 MiB at the peak, with no change of time above the noise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        pass


def run(p: Prepared, progress: Callable[[int], None] | None = None) -> Tally:
    """Run the reference on every sample (its values kept: :class:`_Kept`), then the baseline, then
    the candidate on each provider, comparing: one onnxruntime session alive at a time, so that
    memory holds one model, not three. ``progress`` is called with the samples the reference has
    run after each (the others follow from what it kept)."""
    tally = Tally()
    with ExitStack() as stack:
        kept = _Kept(stack)
        with ExitStack() as session:
            reference = _reference_phase(p, tally, kept, session)
        _release_memory()
        p.report.samples = kept.count
        if progress:
            for k in range(kept.count):
                progress(k + 1)
        if p.report.baseline:
            with ExitStack() as session:
                _baseline_phase(p, tally, kept, session)
            _release_memory()
        for provider in p.providers:
            with ExitStack() as session:
                names = _candidate_phase(p, tally, kept, provider, session)
            _release_memory()
            if not set(reference) & set(names) & set(p.outputs):
                raise BnfoldError(
                    "the two models have no output name in common: they are not two versions of one model"
                )
    return tally


# -- judge and save ------------------------------------------------------------------------------


def _nothing_compared(report: VerifyReport, held: set[str]) -> None:
    empty = [
        s.name
        for s in report.outputs + report.layers
        if not s.elements and not (s.missing or s.shape_mismatch) and not s.nonfinite_mismatches
    ]
    if not empty:
        return
    names = ", ".join(sorted(set(empty)))
    if all(name in held for name in empty):  # values, all inf or NaN, at the same places in both
        raise BnfoldError(
            f"nothing was compared for {names}: every value is inf or NaN in both models "
            "(an uncalibrated network, or inputs outside its range?)"
        )
    raise BnfoldError(f"nothing was compared for {names} (no elements): check the input shapes and dims (--dim)")


FIX = "give real inputs (--inputs FILE.npz) or other sizes (--dim, --input-shape)"


def _uninformative(p: Prepared, tally: Tally) -> None:
    """No vacuous pass: outputs whose reference is constant on these inputs prove nothing about the
    fold (a detection head's all-zero map, say). When every compared value is so, verification is
    refused (exit 2: a pass would say nothing); otherwise the report says which, and what to do.
    Reference values that are not finite are said too (compared where they are finite)."""
    compared = [n for n in p.outputs + p.layers if n in tally.spans]
    constant = [n for n in compared if tally.spans[n][0] >= tally.spans[n][1]]
    nonfinite = [n for n in p.outputs if n in tally.spans and tally.spans[n][2]]
    if compared and len(constant) == len(compared):
        values = ", ".join(f"{n} (all {_value(tally.spans[n][0])})" for n in constant[:3])
        raise BnfoldError(
            f"the original's outputs are constant on these inputs: {values}; a comparison would prove nothing: {FIX}"
        )
    if constant:
        p.report.notes.append(
            f"warning: constant in the original on these inputs, so proving nothing: {', '.join(constant)}; {FIX}"
        )
    if nonfinite:
        p.report.notes.append(
            f"warning: the original computes inf or NaN in {', '.join(nonfinite)} on these inputs; {FIX}"
        )


def _weak(report: VerifyReport, given: bool) -> None:
    """Never a weak check in silence: where rounding alone (onnxruntime's own fusion) moves an output
    so much that the bound that follows it is above the dtype's threshold, an error in one layer as
    small would pass. Seen where synthesized inputs drive a network far outside the range its
    statistics were calibrated on (squeeze-and-excitation networks: outputs up to 1.1e4, floors 7e-5
    to 6e-2, against 2e-6 to 4e-5 on images like the calibration's). ``given``: real
    inputs were given, so the advice is not to give them."""
    weak = [s for s in report.outputs if s.decided_by == "baseline" and s.bound > s.threshold]
    if not weak:
        return
    said = ", ".join(
        f"{s.name} (floor {s.baseline_error:.2g}, bound {s.bound:.2g}, max|ref| {s.ref_max:.3g})" for s in weak[:3]
    )
    advice = (
        "add --per-layer to compare every layer on its own"
        if given
        else "synthesized inputs can lie far outside the range the network was trained on: give real inputs "
        "(--inputs FILE.npz), and add --per-layer"
    )
    report.notes.append(
        f"warning: a weak check: rounding alone (onnxruntime's own fusion) moves {said} so much that the bound "
        f"is above the threshold ({weak[0].threshold:g}): an error as small in one layer would pass; {advice}"
    )


def _value(v: float) -> str:
    return "inf or NaN" if not np.isfinite(v) else f"{v:g}"


def judge(p: Prepared, tally: Tally) -> VerifyReport:
    """Apply the criteria (:mod:`.compare`) to what the runs gathered; the report says the verdict."""
    report, stats = p.report, tally.stats
    report.outputs = [stats[(n, q)] for n in p.outputs for q in p.providers if (n, q) in stats]
    report.layers = [stats[(n, q)] for n in p.layers for q in p.providers if (n, q) in stats]
    _nothing_compared(report, tally.held)
    _uninformative(p, tally)
    floors = [compare.scaled_error(tally.floors[s.name]) if s.name in tally.floors else None for s in report.outputs]
    judge_outputs(report.outputs, floors)
    _weak(report, p.options.inputs is not None)
    layer_floors = {n: compare.channel_error(tally.floors[n])[0] for n in p.layers if n in tally.floors}
    for provider in p.providers:
        judge_layers([s for s in report.layers if s.provider == _short(provider)], layer_floors)
    bad_layers = [s.name for s in report.layers if not s.passed]
    if p.options.per_layer and not bad_layers:  # a BN that writes an output is compared as the output
        bns = set(_bn_outputs(p.original))
        bad_layers = [s.name for s in report.outputs if not s.passed and s.name in bns]
    report.first_divergent_layer = bad_layers[0] if bad_layers else None
    report.passed = all(s.passed for s in report.outputs + report.layers)
    if not report.passed and report.layers and not bad_layers:
        report.notes.append(_suspect(report.layers))
    return report


def _suspect(layers: list[ErrorStats]) -> str:
    """Where an output fails and no layer crosses its bound (a wrong epsilon everywhere, say, whose
    error builds up): the layer whose error rose most over the layers before it."""
    best, ratio, worst_before = layers[0], 0.0, 0.0
    for s in layers:
        if np.isfinite(s.error) and worst_before > 0 and s.error / worst_before > ratio:
            best, ratio = s, s.error / worst_before
        if np.isfinite(s.error):
            worst_before = max(worst_before, s.error)
    rise = f", {ratio:.3g}x the layers before it" if ratio else ""
    return (
        f"no layer crosses its bound, but an output fails: the error rises most at {best.name} "
        f"(channel {best.worst_channel}: {best.error:.2g}{rise})"
    )


def save(p: Prepared, tally: Tally) -> None:
    """Write the inputs and outputs asked for (paths checked in :func:`prepare`), a leading axis of
    samples, as ``inputs`` reads them back; atomically."""
    o = p.options
    if o.save_inputs and tally.inputs:
        write_npz(o.save_inputs, {n: np.stack([f[n] for f in tally.inputs]) for n in tally.inputs[0]})
    if o.save_outputs and tally.outputs:
        write_npz(o.save_outputs, {n: np.stack(v) for n, v in tally.outputs.items()})
