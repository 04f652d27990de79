"""What every command returns, and how it is rendered as text or JSON."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

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

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: Dict[Code, str] = {
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
}

# Code -> description, in a stable order (for documentation and JSON consumers).
REASONS: Dict[str, str] = OrderedDict((c.value, c.description) for c in Code)


@dataclass(frozen=True)
class Reason:
    """Why one BN stays: a code and a sentence naming the tensor or node concerned."""

    code: Code
    message: str


@dataclass
class FoldedBN:
    name: str
    output: str
    into: str
    into_op: str
    direction: str = "forward"


@dataclass
class LeftBN:
    name: str
    output: str
    reason: str
    message: str


@dataclass
class ModelStats:
    batchnorms: int
    nodes: int
    initializers: int
    bytes: int


@dataclass
class FoldReport:
    before: ModelStats
    after: ModelStats
    folded: List[FoldedBN] = field(default_factory=list)
    left: List[LeftBN] = field(default_factory=list)
    absorbed: List[str] = field(default_factory=list)
    input: Optional[str] = None
    output: Optional[str] = None
    dry_run: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render_text(self) -> str:
        b, a = self.before, self.after
        lines = []
        head = f"{self.input or '<model>'}"
        if self.output:
            head += f" -> {self.output}"
        if self.dry_run:
            head += "  (dry run: nothing written)"
        lines.append(head)
        lines.append(f"  {'':14}{'before':>12}{'after':>12}")
        for label, x, y in (
            ("BatchNorm", b.batchnorms, a.batchnorms),
            ("nodes", b.nodes, a.nodes),
            ("initializers", b.initializers, a.initializers),
            ("bytes", b.bytes, a.bytes),
        ):
            lines.append(f"  {label:14}{x:>12,}{y:>12,}")
        if self.folded:
            lines.append(f"folded ({len(self.folded)}):")
            for f in self.folded:
                lines.append(f"  {f.name} -> {f.into_op} {f.into}" + ("" if f.direction == "forward" else f"  [{f.direction}]"))
        if self.absorbed:
            lines.append(f"also absorbed: {', '.join(self.absorbed)}")
        if self.left:
            lines.append(f"left alone ({len(self.left)}):")
            for group, items in _by_reason(self.left).items():
                lines.append(f"  {group} ({len(items)}): {Code(group).description}")
                for item in items:
                    lines.append(f"    {item.name}: {item.message}")
        return "\n".join(lines)


@dataclass
class BatchNormInfo:
    name: str
    output: str
    producer: Optional[str]
    consumers: List[str]
    foldable: bool
    reason: Optional[str]
    message: str
    into: Optional[str] = None
    direction: Optional[str] = None


@dataclass
class InspectReport:
    path: Optional[str]
    ir_version: int
    opsets: Dict[str, int]
    producer: str
    bytes: int
    external_data: List[str]
    nodes: int
    initializers: int
    batchnorms: List[BatchNormInfo] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render_text(self) -> str:
        foldable = sum(b.foldable for b in self.batchnorms)
        lines = [
            f"{self.path or '<model>'}: IR {self.ir_version}, opsets "
            + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in self.opsets.items())
            + (f", from {self.producer}" if self.producer else ""),
            f"  {self.bytes:,} bytes, {self.nodes} nodes, {self.initializers} initializers"
            + (f", external data: {', '.join(self.external_data)}" if self.external_data else ""),
            f"  BatchNormalization: {len(self.batchnorms)}, foldable {foldable}",
        ]
        if self.batchnorms:
            width = max(len(b.name) for b in self.batchnorms)
            for b in self.batchnorms:
                around = f"{b.producer or '(input)'} -> BN -> {', '.join(b.consumers) or '(output)'}"
                verdict = f"folds {b.direction} into {b.into}" if b.foldable else f"stays: {b.reason}: {b.message}"
                lines.append(f"  {b.name:{width}}  {around:34} {verdict}")
        return "\n".join(lines)


def _by_reason(left: List[LeftBN]) -> Dict[str, List[LeftBN]]:
    groups: Dict[str, List[LeftBN]] = OrderedDict()
    for item in left:
        groups.setdefault(item.reason, []).append(item)
    return groups
