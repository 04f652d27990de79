"""What every command returns, and how it is rendered: JSON for programs, and for people lines of
styled spans (``(text, style)``) that the CLI colours or prints plain."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # not imported at run time: the CLI imports this module at start-up
    import numpy as np

# Styles a renderer may give a span; the CLI maps them to colours (or none).
OK, WARN, FAIL, PLAIN = "ok", "warn", "fail", ""
Span = tuple[str, str]
Line = list[Span]


def plain(lines: list[Line]) -> str:
    """Lines of spans as plain text."""
    return "\n".join("".join(text for text, _ in line) for line in lines)


def shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters: the middle is replaced by an ellipsis."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep - keep // 2] + "\u2026" + name[len(name) - keep // 2 :]


def _json_floats(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


NOT_CHECKED = "not checked: "  # how a checker entry that could not be run begins


class Code(str, Enum):
    """Why a BatchNormalization stays: stable codes, part of the JSON."""

    TRAINING_MODE = "training_mode"
    STATISTICS_OUTPUTS = "statistics_outputs"
    NON_CONSTANT_PARAMETER = "non_constant_parameter"
    OVERRIDABLE_INITIALIZER = "overridable_initializer"
    PER_ACTIVATION_PARAMETERS = "per_activation_parameters"
    NO_PRODUCER = "no_producer"
    UNSUPPORTED_PRODUCER = "unsupported_producer"
    PRODUCER_WEIGHT_NOT_CONSTANT = "producer_weight_not_constant"
    SHARED_PRODUCER_OUTPUT = "shared_producer_output"
    PRODUCER_OUTPUT_IS_GRAPH_OUTPUT = "producer_output_is_graph_output"
    CHANNEL_MISMATCH = "channel_mismatch"
    AXIS_MISMATCH = "axis_mismatch"
    UNKNOWN_RANK = "unknown_rank"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    PADDED_CONSUMER = "padded_consumer"
    INVALID_NODE = "invalid_node"
    CONCAT_BRANCH = "concat_branch"
    NONPOSITIVE_SCALE_AFTER_POOL = "nonpositive_scale_after_pool"
    PADDED_POOL = "padded_pool"
    IDENTITY_BRANCH = "identity_branch"
    NONFINITE_PARAMETER = "nonfinite_parameter"
    NONPOSITIVE_VARIANCE = "nonpositive_variance"
    UNSAFE_FOLD = "unsafe_fold"
    EXTREME_SCALE = "extreme_scale"
    DEAD_CHANNEL = "dead_channel"
    RANGE_INFLATION = "range_inflation"
    PRECISION_LOSS = "precision_loss"
    QUANTIZED_WEIGHT_FORM = "quantized_weight_form"
    QUANTIZED_WEIGHT_AXIS = "quantized_weight_axis"
    QUANTIZED_WEIGHT_ZERO_SCALE = "quantized_weight_zero_scale"
    QUANTIZED_BIAS_ROUNDING = "quantized_bias_rounding"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[Code, str] = {
    Code.TRAINING_MODE: "runs in training mode (normalizes with batch statistics)",
    Code.STATISTICS_OUTPUTS: "its mean/var/saved statistics outputs are requested",
    Code.NON_CONSTANT_PARAMETER: "a scale/bias/mean/var input is computed at run time",
    Code.OVERRIDABLE_INITIALIZER: "a value it needs is an initializer that is also a graph input (IR >= 4): "
    "a caller may override it",
    Code.PER_ACTIVATION_PARAMETERS: "spatial=0 with parameters that vary along the spatial axes",
    Code.NO_PRODUCER: "its input is a graph input, not the output of a node",
    Code.UNSUPPORTED_PRODUCER: "the node before it cannot absorb a per-channel scale",
    Code.PRODUCER_WEIGHT_NOT_CONSTANT: "the weight or bias of the node before it is computed at run time",
    Code.SHARED_PRODUCER_OUTPUT: "the output of the node before it also feeds other nodes",
    Code.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT: "the output of the node before it is also a graph output",
    Code.CHANNEL_MISMATCH: "its channel count differs from the output channels of the node before it",
    Code.AXIS_MISMATCH: "its channel axis is not the output-channel axis of the node before it",
    Code.UNKNOWN_RANK: "the rank of the MatMul's input is unknown, so its channel axis cannot be checked",
    Code.UNSUPPORTED_DTYPE: "the weights are of a type that cannot be folded",
    Code.PADDED_CONSUMER: "nothing before it can absorb it, and the Conv after it pads its input: "
    "folding into that Conv would change the border",
    Code.INVALID_NODE: "it, or the node it would fold into, has inputs, shapes or attributes that make no sense",
    Code.CONCAT_BRANCH: "it follows a Concat, and one of the Concat's branches cannot take its channels",
    Code.NONPOSITIVE_SCALE_AFTER_POOL: "it would fold through a MaxPool, and one of its scale factors is <= 0: "
    "max does not commute with it",
    Code.PADDED_POOL: "it would fold through an AveragePool whose padding or rounding would change the average",
    Code.IDENTITY_BRANCH: "it is the identity branch of a block (RepVGG, MobileOne), and no sibling Conv can "
    "take it (stride, padding, channels or groups)",
    Code.NONFINITE_PARAMETER: "a scale/bias/mean/var value is NaN or Inf",
    Code.NONPOSITIVE_VARIANCE: "var + epsilon <= 0 for some channel: the normalization is undefined there",
    Code.UNSAFE_FOLD: "a folded value would overflow, turn NaN or be flushed below the dtype's normal range",
    Code.EXTREME_SCALE: "--strict: a scale factor above 1e3 or below 1e-3",
    Code.DEAD_CHANNEL: "--strict: a scale factor of 0 (a dead channel)",
    Code.RANGE_INFLATION: "--strict: the fold inflates the weight range that per-tensor int8 quantization sees",
    Code.PRECISION_LOSS: "--strict: the cast to a 16-bit type loses more than its own rounding",
    Code.QUANTIZED_WEIGHT_FORM: "the layer's weight comes through a DequantizeLinear in a form the quantized "
    "fold does not take (blocked, an integer type other than (u)int8/16, opset < 13, an identity branch)",
    Code.QUANTIZED_WEIGHT_AXIS: "the layer's weight is quantized along another axis than the one the fold scales",
    Code.QUANTIZED_WEIGHT_ZERO_SCALE: "a scale factor of 0 would give a channel of the quantized weight a zero scale",
    Code.QUANTIZED_BIAS_ROUNDING: "--strict: the layer's int32 bias is re-quantized at the new scale, rounded by up "
    "to half a step",
}

# Code -> description, in a stable order (for documentation and JSON consumers).
REASONS: dict[str, str] = OrderedDict((c.value, c.description) for c in Code)


@dataclass(frozen=True)
class Reason:
    """Why one BN stays: a code and a sentence naming the tensor or node concerned."""

    code: Code
    message: str


@dataclass
class FoldedBN:
    """A BN that folds: its node name and output, what it folds into (``into``, an ``into_op``), and
    how (``direction``: forward, backward, split over a Concat, identity branch, or lowered)."""

    name: str
    output: str
    into: str
    into_op: str
    direction: str = "forward"


@dataclass
class LeftBN:
    """A BN left in the model: its node name and output, a reason code (:class:`Code`) and a
    sentence that says why in the terms of this model."""

    name: str
    output: str
    reason: str
    message: str


@dataclass
class ModelStats:
    """Counts of a model: BatchNormalization nodes, nodes, initializers, and bytes (model and data
    files; 0 where not known)."""

    batchnorms: int
    nodes: int
    initializers: int
    bytes: int


@dataclass
class FoldReport:
    """What a fold did: the model's counts before and after, every BN folded (``folded``) or left
    (``left``, with reasons), the affine ops absorbed, the hazards of the folds made (``warnings``),
    the input and output paths, and with ``check`` what onnx's checker said of each."""

    before: ModelStats
    after: ModelStats
    folded: list[FoldedBN] = field(default_factory=list)
    left: list[LeftBN] = field(default_factory=list)
    absorbed: list[str] = field(default_factory=list)
    input: str | None = None
    output: str | None = None
    dry_run: bool = False
    warnings: list[dict[str, Any]] = field(default_factory=list)  # hazards of the folds made
    affine: list[str] = field(default_factory=list)  # per-channel affine chains folded without a BN
    # With check=True: onnx.checker (full_check) on "input" and "output": None passes, else its message.
    checker: dict[str, str | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The document as plain JSON-ready values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The document as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def _checker_failed(self, which: str) -> bool:
        problem = (self.checker or {}).get(which)
        return problem is not None and not problem.startswith(NOT_CHECKED)

    @property
    def checker_regressed(self) -> bool:
        """The output fails onnx.checker where the input passed: a bug of the fold."""
        c = self.checker or {}
        return "input" in c and c["input"] is None and self._checker_failed("output")

    def checker_summary(self) -> str:
        """The checker's verdicts in a few words, for one row of a table ("" when it did not run)."""
        if self.checker is None:
            return ""
        if self.checker_regressed:
            return "checker: the output FAILS"
        if self._checker_failed("input"):
            return "checker: the input fails"
        if any(p is not None for p in self.checker.values()):
            return "checker: not checked"
        return "checker passes"

    def _checker_lines(self) -> list[Line]:
        if self.checker is None:
            return []
        lines: list[Line] = []
        for which, problem in self.checker.items():
            if problem is None:
                lines.append([(f"onnx.checker (full_check): the {which} passes", OK)])
            elif problem.startswith(NOT_CHECKED):
                lines.append([(f"onnx.checker (full_check): the {which} was {problem}", PLAIN)])
            else:
                lines.append([(f"onnx.checker (full_check): the {which} FAILS: {problem}", WARN)])
        if self._checker_failed("input"):
            lines.append([("  the input failed the checker before any fold: no claim is made for the output", PLAIN)])
        return lines

    def render_lines(self) -> list[Line]:
        """The human-readable report, as lines of styled spans."""
        b, a = self.before, self.after
        head = f"{self.input or '<model>'}"
        if self.output:
            head += f" -> {self.output}"
        if self.dry_run:
            head += "  (dry run: nothing written)"
        lines: list[Line] = [[(head, PLAIN)], [(f"  {'':14}{'before':>12}{'after':>12}", PLAIN)]]
        for label, x, y in (
            ("BatchNorm", b.batchnorms, a.batchnorms),
            ("nodes", b.nodes, a.nodes),
            ("initializers", b.initializers, a.initializers),
            ("bytes", b.bytes, a.bytes),
        ):
            lines.append([(f"  {label:14}{x:>12,}{y:>12,}", PLAIN)])
        folded = [f for f in self.folded if f.direction != "lowered"]
        lowered = [f for f in self.folded if f.direction == "lowered"]
        if folded:
            lines.append([(f"folded ({len(folded)}):", OK)])
            for f in folded:
                suffix = "" if f.direction == "forward" else f"  [{f.direction}]"
                lines.append([(f"  {f.name} -> {f.into_op} {f.into}{suffix}", PLAIN)])
        if lowered:  # not folded: replaced by Mul and Add (--lower-standalone)
            lines.append([(f"lowered to Mul + Add by per-channel constants ({len(lowered)}):", OK)])
            lines.append([(f"  {', '.join(f.name for f in lowered)}", PLAIN)])
        if self.affine:
            lines.append([(f"affine ops folded without a BN ({len(self.affine)}):", OK)])
            lines.extend([(f"  {a}", PLAIN)] for a in self.affine)
        if self.absorbed:
            lines.append([(f"also absorbed: {', '.join(self.absorbed)}", PLAIN)])
        if self.warnings:
            lines.append(_warning_line(self.warnings))
        if self.left:
            lines.append([(f"left alone ({len(self.left)}):", WARN)])
            for group, items in _by_reason(self.left).items():
                lines.append([(f"  {group} ({len(items)}): {Code(group).description}", PLAIN)])
                for item in items:
                    lines.append([(f"    {item.name}: {item.message}", PLAIN)])
        return lines + self._checker_lines()

    def render_text(self) -> str:
        """The human-readable report as plain text."""
        return plain(self.render_lines())


@dataclass
class BatchNormInfo:
    """One BN as :func:`bnfold.inspect` sees it: its neighbours' op types, and whether it folds (into
    what, which way) or why not."""

    name: str
    output: str
    producer: str | None
    consumers: list[str]
    foldable: bool
    reason: str | None
    message: str
    into: str | None = None
    direction: str | None = None


@dataclass
class InspectReport:
    """Facts about a model (IR, opsets, producer, size, external data files, counts) and every BN in
    it (:class:`BatchNormInfo`), with the hazards of the folds that would be made."""

    path: str | None
    ir_version: int
    opsets: dict[str, int]
    producer: str
    bytes: int
    external_data: list[str]
    nodes: int
    initializers: int
    batchnorms: list[BatchNormInfo] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The document as plain JSON-ready values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The document as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def render_lines(self) -> list[Line]:
        """The human-readable report, as lines of styled spans."""
        foldable = sum(b.foldable for b in self.batchnorms)
        lines: list[Line] = [
            [
                (
                    f"{self.path or '<model>'}: IR {self.ir_version}, opsets "
                    + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in self.opsets.items())
                    + (f", from {self.producer}" if self.producer else ""),
                    PLAIN,
                )
            ],
            [
                (
                    f"  {self.bytes:,} bytes, {self.nodes} nodes, {self.initializers} initializers"
                    + (f", external data: {', '.join(self.external_data)}" if self.external_data else ""),
                    PLAIN,
                )
            ],
            [(f"  BatchNormalization: {len(self.batchnorms)}, foldable {foldable}", PLAIN)],
        ]
        if self.batchnorms:
            width = min(max(len(b.name) for b in self.batchnorms), 24)
            for b in self.batchnorms:
                around = f"{b.producer or '(input)'} -> BN -> {', '.join(b.consumers) or '(output)'}"
                verdict = f"folds {b.direction} into {b.into}" if b.foldable else f"stays: {b.reason}: {b.message}"
                lines.append(
                    [
                        (f"  {shorten(b.name, width):{width}}  {around:34} ", PLAIN),
                        (verdict, OK if b.foldable else WARN),
                    ]
                )
        if self.warnings:
            lines.append(_warning_line(self.warnings))
            lines.extend([(f"    {w['code']}: {w['bn']}: {w['message']}", PLAIN)] for w in self.warnings)
        return lines

    def render_text(self) -> str:
        """The human-readable report as plain text."""
        return plain(self.render_lines())


def _warning_line(warnings: list[dict[str, Any]]) -> Line:
    counts: dict[str, int] = OrderedDict()
    for w in warnings:
        counts[w["code"]] = counts.get(w["code"], 0) + 1
    summary = ", ".join(f"{code} {n}" for code, n in counts.items())
    return [(f"warnings ({len(warnings)}): {summary}", WARN), ("; --strict refuses them, --json lists them", PLAIN)]


def _by_reason(left: list[LeftBN]) -> dict[str, list[LeftBN]]:
    groups: dict[str, list[LeftBN]] = OrderedDict()
    for item in left:
        groups.setdefault(item.reason, []).append(item)
    return groups


SCALED_KEYS = frozenset(("bound", "threshold", "decided_by", "baseline_error"))
ELEMENTWISE_KEYS = frozenset(("rtol", "atol", "mismatches", "atol_needed", "rtol_needed"))


@dataclass
class ErrorStats:
    """Error of one output (or one layer) on one provider, over all samples."""

    name: str
    provider: str = ""
    criterion: str = "scaled"  # "scaled" (max|d| / max|ref|, by default) or "elementwise" (rtol/atol given)
    threshold: float = 0.0  # scaled: the dtype's threshold
    bound: float = 0.0  # scaled: the bound applied (threshold, or baseline / earlier layers raised it)
    decided_by: str = "threshold"  # what set the bound: threshold, baseline, jump (layers only)
    error: float = 0.0  # scaled error: max|d| / max|ref| (layers: the worst channel's)
    baseline_error: float | None = None  # onnxruntime's own fusion of the original, same measure
    worst_channel: int | None = None
    elements: int = 0
    ref_max: float = 0.0
    ref_sum: float = 0.0
    max_abs: float = 0.0
    max_index: list[int] | None = None  # [sample, i0, i1, ...] of the largest |d|
    percentiles: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # |d| at p50, p90, p99
    rtol: float = 0.0
    atol: float = 0.0
    mismatches: int = 0  # elementwise: elements outside both tolerances
    nonfinite_mismatches: int = 0  # places where NaN/Inf differ between the two models
    atol_needed: float = 0.0  # elementwise: the atol that would have passed with this rtol
    rtol_needed: float = 0.0  # elementwise: the rtol that would have passed with this atol
    missing: bool = False
    shape_mismatch: bool = False
    channel_diff: np.ndarray | None = field(default=None, repr=False)
    channel_ref: np.ndarray | None = field(default=None, repr=False)

    @property
    def ref_mean(self) -> float:
        return self.ref_sum / self.elements if self.elements else 0.0

    @property
    def passed(self) -> bool:
        if self.missing or self.shape_mismatch or self.nonfinite_mismatches:
            return False
        if self.criterion == "elementwise":
            return not self.mismatches
        return bool(self.error <= self.bound)

    def to_dict(self) -> dict[str, Any]:
        """The document as plain JSON-ready values."""
        keys = (
            "name",
            "provider",
            "passed",
            "criterion",
            "error",
            "bound",
            "threshold",
            "decided_by",
            "baseline_error",
            "worst_channel",
            "elements",
            "ref_max",
            "ref_mean",
            "max_abs",
            "max_index",
            "percentiles",
            "rtol",
            "atol",
            "mismatches",
            "nonfinite_mismatches",
            "atol_needed",
            "rtol_needed",
            "missing",
            "shape_mismatch",
        )
        # Each criterion's own numbers only: a field the criterion does not compute is absent, never 0.
        other = ELEMENTWISE_KEYS if self.criterion == "scaled" else SCALED_KEYS
        d = _json_floats({k: getattr(self, k) for k in keys if k not in other})
        d["percentiles"] = dict(zip(("p50", "p90", "p99"), self.percentiles, strict=False))
        return d

    def verdict(self) -> Span:
        """The verdict column: ok, or what failed."""
        if self.missing:
            return "missing from the candidate", FAIL
        if self.shape_mismatch:
            return "shapes differ", FAIL
        if self.nonfinite_mismatches:
            return f"FAIL: NaN/Inf differ at {self.nonfinite_mismatches} place(s)", FAIL
        if self.criterion == "elementwise":
            if self.mismatches:
                return (
                    f"FAIL: {self.mismatches} outside rtol/atol (needs atol {self.atol_needed:.2g} or rtol {self.rtol_needed:.2g})",
                    FAIL,
                )
            return "ok", OK
        return ("ok", OK) if self.passed else ("FAIL", FAIL)

    def detail(self) -> list[str]:
        """Where the largest error is, and how errors spread."""
        where = (
            ""
            if self.max_index is None
            else f"largest |d| {self.max_abs:.2g} at sample {self.max_index[0]} {self.max_index[1:]}"
        )
        channel = "" if self.worst_channel is None else f", channel {self.worst_channel}"
        spread = " ".join(f"p{q} {p:.1g}" for q, p in zip((50, 90, 99), self.percentiles, strict=False))
        return [where + channel, f"mean|ref| {self.ref_mean:.3g}; |d| {spread}"]


NAME_WIDTH = 24


@dataclass
class VerifyReport:
    """The outcome of comparing two models; true when they are equivalent."""

    passed: bool
    providers: list[str]
    samples: int
    seed: int
    rtol: float | None
    atol: float | None
    outputs: list[ErrorStats] = field(default_factory=list)
    layers: list[ErrorStats] = field(default_factory=list)
    first_divergent_layer: str | None = None
    graph_optimization: str = "disable"
    tf32: bool | None = None
    baseline: bool = True
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def criterion(self) -> str:
        return "elementwise" if self.rtol is not None or self.atol is not None else "scaled"

    def to_dict(self) -> dict[str, Any]:
        """The document as plain JSON-ready values."""
        return {
            "passed": self.passed,
            "criterion": self.criterion,
            "providers": self.providers,
            "samples": self.samples,
            "seed": self.seed,
            "rtol": self.rtol,
            "atol": self.atol,
            "baseline": self.baseline,
            "graph_optimization": self.graph_optimization,
            "tf32": self.tf32,
            "outputs": [o.to_dict() for o in self.outputs],
            "layers": [o.to_dict() for o in self.layers],
            "first_divergent_layer": self.first_divergent_layer,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        """The document as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def render_lines(self) -> list[Line]:
        """The human-readable report, as lines of styled spans."""
        verdict = ("verification PASSED", OK) if self.passed else ("verification FAILED", FAIL)
        providers = ", ".join(p.replace("ExecutionProvider", "") for p in self.providers)
        lines: list[Line] = [[verdict, (f": {self.samples} sample(s), seed {self.seed}, on {providers}", PLAIN)]]
        if self.criterion == "scaled":
            how = "max|d| / max|ref| <= bound = " + (
                "max(4 x floor, threshold / 100)" if self.baseline else "threshold"
            )
        else:
            how = f"elementwise: rtol {self.rtol or 0:g}, atol {self.atol or 0:g}"
        lines.append([(f"  criterion: {how}", PLAIN)])
        if self.criterion == "scaled" and self.baseline:
            lines.append([("  floor: the same error for onnxruntime's own BN fusion of the original", PLAIN)])
        lines.extend([(f"  note: {n}", PLAIN)] for n in self.notes)
        if self.outputs:
            lines.append(
                [
                    (
                        f"  {'output':{NAME_WIDTH}} {'prov':5}{'max|ref|':>9}{'error':>9}{'floor':>9}{'bound':>9}  verdict",
                        PLAIN,
                    )
                ]
            )
            lines.extend(line for o in self.outputs for line in _rows(o))
        if self.layers:
            lines.append(
                [
                    (
                        f"  {'layer (per channel)':{NAME_WIDTH}} {'prov':5}{'max|ref|':>9}{'error':>9}{'':>9}{'bound':>9}  verdict",
                        PLAIN,
                    )
                ]
            )
            lines.extend(line for o in self.layers for line in _rows(o, detail=not o.passed))
            lines.append(
                [(f"  first layer to diverge: {self.first_divergent_layer}", FAIL)]
                if self.first_divergent_layer
                else [("  no layer diverges", PLAIN)]
            )
        return lines

    def render_text(self) -> str:
        """The human-readable report as plain text."""
        return plain(self.render_lines())


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def _rows(o: ErrorStats, detail: bool = True) -> list[Line]:
    head = f"  {shorten(o.name, NAME_WIDTH):{NAME_WIDTH}} {o.provider:5}"
    if o.missing or o.shape_mismatch:
        return [[(head, PLAIN), o.verdict()]]
    if o.criterion == "elementwise":
        numbers = f"{o.ref_max:>9.2g}{_g(o.max_abs):>9}{'':>9}{'':>9}  "
    else:
        numbers = f"{o.ref_max:>9.2g}{_g(o.error):>9}{_g(o.baseline_error):>9}{_g(o.bound):>9}  "
    rows = [[(head + numbers, PLAIN), o.verdict()]]
    if detail:
        rows.extend([(f"      {text}", PLAIN)] for text in o.detail())
    return rows


@dataclass
class BatchEntry:
    """One model of a batch: its fold, its verification, or the error that stopped it."""

    input: str
    output: str
    fold: FoldReport | None = None
    verify: VerifyReport | None = None
    error: str | None = None
    exit_code: int = 0  # 0 done, 1 verification failed, 2 bad input, 3 internal error
    removed: bool = False  # the output failed verification and was removed

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.verify is not None:
            return "verified" if self.verify.passed else "verification failed"
        return "folded"

    def to_dict(self) -> dict[str, Any]:
        """The document as plain JSON-ready values."""
        d: dict[str, Any] = {
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "removed": self.removed,
        }
        if self.fold is not None:
            d["fold"] = self.fold.to_dict()
        if self.verify is not None:
            d["verify"] = self.verify.to_dict()
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass
class BatchReport:
    """Many models folded into one folder."""

    outdir: str
    entries: list[BatchEntry] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((e.exit_code for e in self.entries), default=0)

    def count(self, status: str) -> int:
        """How many models ended with ``status``."""
        return sum(e.status == status for e in self.entries)

    def summary(self) -> str:
        """One line: how many models folded, were verified, failed."""
        parts = [f"{len(self.entries) - self.count('error')} of {len(self.entries)} model(s) folded"]
        if any(e.verify is not None for e in self.entries):
            parts.append(f"{self.count('verified')} verified")
            parts.append(f"{self.count('verification failed')} failed verification")
        if self.count("error"):
            parts.append(f"{self.count('error')} could not be folded")
        return ", ".join(parts) + f" (into {self.outdir})"

    def to_dict(self) -> dict[str, Any]:
        """The document as plain JSON-ready values."""
        return {
            "models": [e.to_dict() for e in self.entries],
            "outdir": self.outdir,
            "folded": len(self.entries) - self.count("error"),
            "verified": self.count("verified"),
            "failed_verification": self.count("verification failed"),
            "errors": self.count("error"),
            "failed": sum(e.exit_code != 0 for e in self.entries),
        }

    def to_json(self) -> str:
        """The document as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def render_lines(self) -> list[Line]:
        """The human-readable report, as lines of styled spans."""
        width = max([5] + [len(Path(e.input).name) for e in self.entries])
        lines: list[Line] = [
            [(f"{'model':{width}} {'BN before':>9} {'BN after':>8} {'folded':>6} {'left':>5}  status", PLAIN)]
        ]
        for e in self.entries:
            name = Path(e.input).name
            if e.fold is not None and e.error is None:
                f = e.fold
                status = e.status + (" (output removed)" if e.removed else "")
                if f.checker is not None:
                    status += f"; {f.checker_summary()}"
                style = OK if e.exit_code == 0 else FAIL
                lines.append(
                    [
                        (
                            f"{name:{width}} {f.before.batchnorms:>9} {f.after.batchnorms:>8} "
                            f"{len(f.folded):>6} {len(f.left):>5}  ",
                            PLAIN,
                        ),
                        (status, style),
                    ]
                )
            else:
                lines.append(
                    [(f"{name:{width}} {'':>9} {'':>8} {'':>6} {'':>5}  ", PLAIN), ("error (see below)", FAIL)]
                )
        lines.append([(self.summary(), PLAIN)])
        return lines

    def render_text(self) -> str:
        """The human-readable report as plain text."""
        return plain(self.render_lines())
