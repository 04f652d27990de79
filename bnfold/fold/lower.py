"""Lowering: a BN that can fold nowhere becomes ``Mul`` and ``Add`` by per-channel constants, for
runtimes without a fast BatchNormalization (``--lower-standalone``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import onnx

from ..graph import GraphIndex
from ..report import Reason
from .common import Affine, check_batchnorm

# Reasons that say the BN is not a fixed affine map: those stay BatchNormalization.
INTRINSIC = {"training_mode", "statistics_outputs", "non_constant_parameter", "overridable_initializer", "per_activation_parameters"}


@dataclass
class Lowering:
    bn: int
    affine: Affine
    rank: int
    dtype: np.dtype


def plan(index: GraphIndex, left: Dict[int, Reason]) -> List[Lowering]:
    out = []
    for i, reason in sorted(left.items()):
        if reason.code in INTRINSIC:
            continue
        bn = index.nodes[i]
        affine = check_batchnorm(index, bn)
        if isinstance(affine, Reason):
            continue
        x = bn.input[0]
        rank = index.types.rank(x) if index.types else None
        elem = index.types.elem_type(x) if index.types else 0
        if rank is None or rank < 2 or not elem:
            continue
        out.append(Lowering(i, affine, rank, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))))
        del left[i]
    return out


def apply(index: GraphIndex, low: Lowering) -> List[str]:
    bn = index.nodes[low.bn]
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
