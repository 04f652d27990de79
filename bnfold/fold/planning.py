"""What the fold families share while one graph is planned: :class:`Planning`, the state each
family's ``plan_step`` reads and extends, in the order of ``plan.FAMILIES``, and :class:`Notes`, the
report's lists. A family is a module with a ``plan_step(p: Planning)`` (its planning and its vetting)
and one entry in ``plan.FAMILIES``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..options import FoldOptions
from ..proto import node_label
from ..report import Code, FoldedBN, LeftBN, Reason
from .common import Scope
from .safety import Hazard


class Notes:
    """The report's lists, filled in graph order (bodies before the graph that holds them)."""

    def __init__(self) -> None:
        self.folded: list[FoldedBN] = []
        self.left: list[LeftBN] = []
        self.absorbed: list[str] = []
        self.affine: list[str] = []  # chains without a BN: affine ops folded on their own
        self.warnings: list[Hazard] = []

    def verdict(self, hazards: list[Hazard], strict: bool) -> Reason | None:
        """Hazards are warnings, or with ``strict`` the reason the BN stays."""
        if strict and hazards:
            h = hazards[0]
            return Reason(Code(h.code), f"{h.tensor + ': ' if h.tensor else ''}{h.message}")
        self.warnings.extend(hazards)
        return None


@dataclass
class Planning:
    """One graph's decisions so far. ``left`` holds every BN no family has taken yet, with the
    reason it stays; a family takes BNs out of it into its own list, or replaces their reason. The
    lists hold the families' own plan types (forward.Chain, concat.ConcatFold, backward.Backward,
    reparam.Reparam, lower.Lowering): this module imports no family, since every family imports it."""

    scope: Scope
    options: FoldOptions
    notes: Notes
    left: dict[int, Reason] = field(default_factory=dict)
    chains: list[Any] = field(default_factory=list)  # forward.Chain: forward folds (and affine chains)
    splits: list[Any] = field(default_factory=list)  # concat.ConcatFold: BNs split over a Concat
    backs: list[Any] = field(default_factory=list)  # backward.Backward: BNs folded into the layer after
    reparams: list[Any] = field(default_factory=list)  # reparam.Reparam: identity-branch BNs
    lowered: list[Any] = field(default_factory=list)  # lower.Lowering: BNs turned into Mul+Add

    @property
    def strict(self) -> bool:
        return self.options.strict

    def folded(self, bn: int, into: str, into_op: str, direction: str = "forward") -> None:
        """Note that BN node ``bn`` folds (into ``into``, an ``into_op``)."""
        node = self.scope.index.node(bn)
        self.notes.folded.append(FoldedBN(node_label(node), node.output[0], into, into_op, direction))
