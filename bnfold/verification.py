"""Numeric verification through onnxruntime.

The reference is always the original model on the CPU provider with every graph optimization off
(from the BASIC level on, onnxruntime fuses Conv+BN itself, so anything else would compare a fold
with a fold). Samples are generated, run and compared one at a time, so memory holds at most one
sample's activations per model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from .io.load import load
from .errors import BnfoldError
from .proto import external_location, is_batchnorm

ModelLike = Union[str, os.PathLike, onnx.ModelProto]
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPT_LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_DIM = 1
# (rtol, atol) by output dtype; an element fails only when it is outside both.
DEFAULT_TOLERANCES = {
    "float64": (1e-4, 1e-5),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 1e-2),
}
TF32_TOLERANCES = (5e-3, 5e-4)  # what TF32 (10-bit mantissa products) needs for float32 outputs


@dataclass
class ErrorStats:
    """Error of one output (or one layer) over all samples and providers."""

    name: str
    rtol: float
    atol: float
    elements: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    mismatches: int = 0
    atol_needed: float = 0.0  # the atol that would have passed with this rtol
    rtol_needed: float = 0.0  # the rtol that would have passed with this atol
    missing: bool = False
    shape_mismatch: bool = False
    provider: str = ""

    @property
    def passed(self) -> bool:
        return not (self.mismatches or self.missing or self.shape_mismatch)

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        if ref.shape != got.shape:
            self.shape_mismatch = True
            return
        ref64 = ref.astype(np.float64) if ref.dtype != np.bool_ else ref.astype(np.int64)
        got64 = got.astype(np.float64) if got.dtype != np.bool_ else got.astype(np.int64)
        finite = np.isfinite(ref64) & np.isfinite(got64)
        # NaN and Inf agree only where both sides hold the same value at the same place.
        same_special = (np.isnan(ref64) & np.isnan(got64)) | (ref64 == got64)
        self.mismatches += int(np.count_nonzero(~finite & ~same_special))
        diff = np.abs(ref64[finite] - got64[finite])
        mag = np.abs(ref64[finite])
        n = diff.size
        if n:
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(mag > 0, diff / mag, np.where(diff > 0, np.inf, 0.0))
            bad = (diff > self.atol) & (diff > self.rtol * mag)
            self.mismatches += int(np.count_nonzero(bad))
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            total = self.mean_abs * self.elements + float(diff.sum())
            self.elements += n
            self.mean_abs = total / self.elements
            over_r = diff > self.rtol * mag
            if over_r.any():
                self.atol_needed = max(self.atol_needed, float(diff[over_r].max()))
            over_a = diff > self.atol
            if over_a.any():
                self.rtol_needed = max(self.rtol_needed, float(rel[over_a].max()))

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "name", "provider", "passed", "elements", "mismatches", "max_abs", "max_rel", "mean_abs",
            "rtol", "atol", "atol_needed", "rtol_needed", "missing", "shape_mismatch")}
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


@dataclass
class VerifyReport:
    passed: bool
    providers: List[str]
    samples: int
    seed: int
    rtol: Optional[float]
    atol: Optional[float]
    outputs: List[ErrorStats] = field(default_factory=list)
    layers: List[ErrorStats] = field(default_factory=list)
    first_divergent_layer: Optional[str] = None
    graph_optimization: str = "disable"
    tf32: Optional[bool] = None
    notes: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "providers": self.providers,
            "samples": self.samples,
            "seed": self.seed,
            "rtol": self.rtol,
            "atol": self.atol,
            "graph_optimization": self.graph_optimization,
            "tf32": self.tf32,
            "outputs": [o.to_dict() for o in self.outputs],
            "layers": [o.to_dict() for o in self.layers],
            "first_divergent_layer": self.first_divergent_layer,
            "notes": self.notes,
        }

    def render_text(self) -> str:
        lines = [
            f"verification {'PASSED' if self.passed else 'FAILED'}: {self.samples} sample(s), seed {self.seed}, "
            f"providers {', '.join(self.providers)}, candidate optimization level '{self.graph_optimization}'"
        ]
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append(f"  {'output':28}{'provider':10}{'max abs':>11}{'max rel':>11}{'mean abs':>11}{'bad':>8}  tolerance")
        for o in self.outputs + self.layers:
            lines.append(_row(o))
        if self.layers:
            lines.append(
                f"  first layer to diverge: {self.first_divergent_layer}" if self.first_divergent_layer
                else "  no layer diverges"
            )
        return "\n".join(lines)


def _row(o: ErrorStats) -> str:
    if o.missing:
        return f"  {o.name:28}{o.provider:10}  missing from the candidate"
    if o.shape_mismatch:
        return f"  {o.name:28}{o.provider:10}  shapes differ"
    mark = "ok" if o.passed else f"FAIL (passes with atol {o.atol_needed:.3g} or rtol {o.rtol_needed:.3g})"
    return (f"  {o.name:28}{o.provider:10}{o.max_abs:>11.3g}{o.max_rel:>11.3g}{o.mean_abs:>11.3g}"
            f"{o.mismatches:>8}  rtol {o.rtol:g} atol {o.atol:g}  {mark}")


# -- onnxruntime --------------------------------------------------------------------------------

def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BnfoldError(
            "onnxruntime is not installed: pip install 'bnfold[cpu]' (or 'bnfold[gpu]' for CUDA; never both)"
        ) from None
    return onnxruntime


def check_providers(names: Sequence[str]) -> List[str]:
    """Map 'cpu'/'cuda' to onnxruntime providers; fail clearly when one is not available."""
    ort = _ort()
    available = ort.get_available_providers()
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


def make_session(source, provider: str = "CPUExecutionProvider", level: str = "disable", tf32: bool = False):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.log_severity_level = 3
    providers: List = [provider]
    if provider == "CUDAExecutionProvider":
        providers = [(provider, {"use_tf32": int(tf32)}), "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnfoldError(f"onnxruntime cannot load the model: {first}") from None
    if sess.get_providers()[0] != provider:
        raise BnfoldError(
            f"CUDA is not available: onnxruntime fell back to {sess.get_providers()[0]} "
            "(check the NVIDIA driver and the CUDA/cuDNN libraries onnxruntime-gpu needs)"
        )
    return sess


# -- inputs -------------------------------------------------------------------------------------

def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def input_specs(model: onnx.ModelProto) -> List[Tuple[str, np.dtype, List[Union[int, str, None]]]]:
    """(name, dtype, dims) of each graph input a caller must feed (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        specs.append((vi.name, _np_dtype(t.elem_type), dims))
    return specs


def resolve_shape(name: str, dims, dim_sizes: Mapping[str, int], shapes: Mapping[str, Sequence[int]]) -> Tuple[int, ...]:
    if name in shapes:
        return tuple(int(d) for d in shapes[name])
    out = []
    for d in dims:
        if isinstance(d, int) and d > 0:
            out.append(d)
        else:
            out.append(int(dim_sizes.get(d, DEFAULT_DIM)) if d else DEFAULT_DIM)
    return tuple(out)


def random_input(rng: np.random.Generator, dtype: np.dtype, shape: Tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison gives a numpy scalar otherwise
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)  # small values are valid indices, counts, axes
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)
    raise BnfoldError(f"cannot synthesize inputs of type {dtype}: pass them with --inputs FILE.npz")


def sample_feeds(
    model: onnx.ModelProto,
    samples: int,
    seed: int,
    dim_sizes: Mapping[str, int],
    shapes: Mapping[str, Sequence[int]],
    given: Optional[Mapping[str, np.ndarray]] = None,
) -> Iterator[Dict[str, np.ndarray]]:
    specs = input_specs(model)
    if given is not None:
        missing = [n for n, _, _ in specs if n not in given]
        if missing:
            raise BnfoldError(f"the inputs file lacks graph input(s) {', '.join(missing)}")
        yield {n: np.asarray(given[n]) for n, _, _ in specs}
        return
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield {n: random_input(rng, dt, resolve_shape(n, dims, dim_sizes, shapes)) for n, dt, dims in specs}


# -- models -------------------------------------------------------------------------------------

def _proto_and_path(model: ModelLike) -> Tuple[onnx.ModelProto, Optional[Path]]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    return load(model), Path(model)


def _has_external(model: onnx.ModelProto) -> bool:
    return any(external_location(t) is not None for t in model.graph.initializer)


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
    except Exception:
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.output) + list(g.input)}


def _session_source(model: onnx.ModelProto, path: Optional[Path], changed: bool, stack: ExitStack):
    """What onnxruntime loads: the file itself when untouched, else the bytes, or (with external data,
    or weights left in the input file) a temporary copy whose data files are linked beside it."""
    if path is not None and not changed:
        return str(path)
    if path is None or not _has_external(model):
        return model.SerializeToString()
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-")))
    for t in model.graph.initializer:
        loc = external_location(t)
        if loc is not None and not (tmp / loc["location"]).exists():
            target = tmp / loc["location"]
            target.parent.mkdir(parents=True, exist_ok=True)
            # onnxruntime refuses data paths that resolve outside the model's folder (symlinks too):
            # a hard link where the filesystem allows, else a copy.
            try:
                os.link((path.parent / loc["location"]).resolve(), target)
            except OSError:
                shutil.copyfile(path.parent / loc["location"], target)
    # The references stay as they are (the files they name are linked beside): the graph alone is written.
    (tmp / "model.onnx").write_bytes(model.SerializeToString())
    return str(tmp / "model.onnx")


def _tolerance(dtype: np.dtype, rtol: Optional[float], atol: Optional[float], tf32: bool) -> Tuple[float, float]:
    if dtype.kind in "iub":
        base = (0.0, 0.0)
    elif tf32 and dtype == np.float32:
        base = TF32_TOLERANCES
    else:
        base = DEFAULT_TOLERANCES.get(dtype.name, DEFAULT_TOLERANCES["float32"])
    return (base[0] if rtol is None else rtol, base[1] if atol is None else atol)


def verify(
    original: ModelLike,
    candidate: ModelLike,
    *,
    providers: Sequence[str] = ("cpu",),
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    samples: int = 1,
    seed: int = 0,
    dims: Optional[Mapping[str, int]] = None,
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    inputs: Optional[Union[str, os.PathLike, Mapping[str, np.ndarray]]] = None,
    per_layer: bool = False,
    graph_optimization: str = "disable",
    allow_tf32: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> VerifyReport:
    """Run ``original`` (CPU, optimizations off) and ``candidate`` (each provider) on the same inputs
    and compare every output by name. Returns a :class:`VerifyReport`, true when equivalent.

    ``rtol``/``atol`` default by output dtype (see ``DEFAULT_TOLERANCES``); an element fails only
    when its error is above both. ``per_layer`` also compares every BatchNormalization output of the
    original (names survive folding) and names the first that diverges. ``progress`` is called with
    the number of samples done after each one.
    """
    if graph_optimization not in OPT_LEVELS:
        raise BnfoldError(f"unknown optimization level '{graph_optimization}': choose from {', '.join(OPT_LEVELS)}")
    if samples < 1:
        raise BnfoldError("--samples must be at least 1")
    provider_names = check_providers(providers)
    ref_model, ref_path = _proto_and_path(original)
    cand_model, cand_path = _proto_and_path(candidate)
    given = _load_inputs(inputs)
    output_names = [o.name for o in ref_model.graph.output]
    layer_names: List[str] = []
    if per_layer:
        # A BN folded backward or lowered leaves no tensor of its own name: only names both have count.
        produced = {o for n in cand_model.graph.node for o in n.output}
        layer_names = [n for n in _bn_outputs(ref_model) if n in produced and n not in set(output_names)]
        types = _elem_types(ref_model)
        ref_model = _with_outputs(ref_model, layer_names, types)
        cand_model = _with_outputs(cand_model, layer_names, types)
    uses_cuda = "CUDAExecutionProvider" in provider_names
    report = VerifyReport(
        passed=False, providers=provider_names, samples=0, seed=seed, rtol=rtol, atol=atol,
        graph_optimization=graph_optimization, tf32=allow_tf32 if uses_cuda else None,
    )
    if uses_cuda:
        report.notes.append(
            "TF32 is allowed on CUDA: float32 tolerances widened to match" if allow_tf32
            else "TF32 is off on CUDA, so differences are the fold's, not the math mode's"
        )
    with ExitStack() as stack:
        ref = make_session(_session_source(ref_model, ref_path, per_layer, stack))
        cands = [
            (p, make_session(_session_source(cand_model, cand_path, per_layer, stack), p, graph_optimization, allow_tf32))
            for p in provider_names
        ]
        stats: Dict[Tuple[str, str], ErrorStats] = {}
        ref_outputs = [o.name for o in ref.get_outputs()]
        for k, feeds in enumerate(sample_feeds(ref_model, samples, seed, dims or {}, input_shapes or {}, given)):
            ref_vals = dict(zip(ref_outputs, ref.run(None, _cast_feeds(ref, feeds))))
            for provider, sess in cands:
                got_names = [o.name for o in sess.get_outputs()]
                got = dict(zip(got_names, sess.run(None, _cast_feeds(sess, feeds))))
                for name, value in ref_vals.items():
                    key = (name, provider)
                    if key not in stats:
                        r, a = _tolerance(value.dtype, rtol, atol, allow_tf32 and provider == "CUDAExecutionProvider")
                        stats[key] = ErrorStats(name, r, a, provider=_short(provider))
                    if name not in got:
                        stats[key].missing = True
                    else:
                        stats[key].add(value, got[name])
            report.samples = k + 1
            if progress:
                progress(k + 1)
    report.outputs = [stats[(n, p)] for n in output_names for p in provider_names]
    report.layers = [stats[(n, p)] for n in layer_names for p in provider_names if (n, p) in stats]
    bad_layers = [s.name for s in report.layers if not s.passed]
    report.first_divergent_layer = bad_layers[0] if bad_layers else None
    report.passed = all(s.passed for s in report.outputs)
    return report


def _short(provider: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


def _cast_feeds(sess, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _load_inputs(inputs) -> Optional[Mapping[str, np.ndarray]]:
    if inputs is None or isinstance(inputs, Mapping):
        return inputs
    path = Path(inputs)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BnfoldError(f"{path}: cannot read inputs ({exc})") from None
