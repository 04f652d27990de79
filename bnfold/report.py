"""What every command returns, and how it is rendered as text or JSON."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Every BatchNormalization left in a model carries one of these codes (stable; part of the JSON).
REASONS: Dict[str, str] = OrderedDict(
    training_mode="runs in training mode (normalizes with batch statistics)",
    statistics_outputs="its mean/var/saved statistics outputs are requested",
    non_constant_parameter="a scale/bias/mean/var input is computed at run time",
    overridable_initializer="a value it needs is an initializer that is also a graph input (IR >= 4): a caller may override it",
    per_activation_parameters="spatial=0 with parameters that vary along the spatial axes",
    no_producer="its input is a graph input, not the output of a node",
    unsupported_producer="the node before it cannot absorb a per-channel scale",
    producer_weight_not_constant="the weight or bias of the node before it is computed at run time",
    shared_producer_output="the output of the node before it also feeds other nodes",
    producer_output_is_graph_output="the output of the node before it is also a graph output",
    channel_mismatch="its channel count differs from the output channels of the node before it",
    axis_mismatch="its channel axis is not the output-channel axis of the node before it",
    unknown_rank="the rank of the MatMul's input is unknown, so its channel axis cannot be checked",
    unsupported_dtype="the weights are of a type that cannot be folded",
    padded_consumer="nothing before it can absorb it, and the Conv after it pads its input: folding into that Conv would change the border",
)


@dataclass(frozen=True)
class Reason:
    code: str
    message: str

    def __post_init__(self) -> None:
        assert self.code in REASONS, self.code


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
                lines.append(f"  {group} ({len(items)}): {REASONS[group]}")
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
