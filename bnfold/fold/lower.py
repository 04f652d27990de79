"""Lowering: a BN that can fold nowhere becomes ``Mul`` and ``Add`` by per-channel constants, for
runtimes without a fast BatchNormalization (``--lower-standalone``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..proto import np_dtype
from ..report import Code, Reason
from .common import Affine, Scope, check_batchnorm
from .planning import Planning

# Reasons that say the BN is not a fixed affine map: those stay BatchNormalization.
INTRINSIC = {
    Code.TRAINING_MODE,
    Code.STATISTICS_OUTPUTS,
    Code.NON_CONSTANT_PARAMETER,
    Code.OVERRIDABLE_INITIALIZER,
    Code.PER_ACTIVATION_PARAMETERS,
}


@dataclass(frozen=True)
class Lowering:
    bn: int
    affine: Affine
    rank: int
    dtype: np.dtype


def plan(scope: Scope, left: dict[int, Reason]) -> tuple[list[Lowering], dict[int, Reason]]:
    """Lowerings for BNs that fold nowhere, and the reasons of those that still stay."""
    out, still = [], dict(left)
    for i, reason in sorted(left.items()):
        if reason.code in INTRINSIC:
            continue
        bn = scope.index.node(i)
        affine = check_batchnorm(scope, bn)
        if isinstance(affine, Reason):
            continue
        x = bn.input[0]
        rank = scope.rank(x)
        elem = scope.types.elem_type(x) if scope.types else 0
        if rank is None or rank < 2 or not elem:
            continue
        out.append(Lowering(i, affine, rank, np_dtype(elem)))
        del still[i]
    return out, still


def apply(scope: Scope, low: Lowering) -> list[str]:
    index = scope.index
    bn = index.node(low.bn)
    shape = (-1,) + (1,) * (low.rank - 2)
    base = bn.name or bn.output[0]
    s = index.add_initializer(low.affine.s.reshape(shape).astype(low.dtype), f"{base}_scale")
    t = index.add_initializer(low.affine.t.reshape(shape).astype(low.dtype), f"{base}_shift")
    scaled = index.fresh(f"{bn.output[0]}_scaled")
    mul = onnx.helper.make_node("Mul", [bn.input[0], s], [scaled], name=index.fresh(f"{base}_mul"))
    # The Add takes the BN's place: its node name and its output name.
    add = onnx.helper.make_node("Add", [scaled, t], [bn.output[0]], name=bn.name)
    index.remove_node(low.bn)
    index.insert_nodes(low.bn, [mul, add])
    return list(bn.input)


def plan_step(p: Planning) -> None:
    """BNs that fold nowhere, turned into Mul + Add by per-channel constants."""
    lowered, p.left = plan(p.scope, p.left)
    p.lowered.extend(lowered)
    for low in lowered:
        p.folded(low.bn, "Mul+Add", "Mul+Add", "lowered")
