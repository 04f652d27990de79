"""A BN after a Concat along the channel axis, split by channel ranges into every branch's layer.

MixNet writes ``Split -> depthwise Convs -> Concat -> BN``, Inception-style blocks ``Convs -> Concat
-> BN``. When each branch's output feeds only the Concat, ``BN(concat(y_1, ..., y_k))`` is
``concat(s_1 * y_1 + t_1, ...)``: each branch's layer absorbs its channel range of ``s`` and ``t``,
and the Concat writes the BN's output. Where any branch cannot take its part, the whole BN stays,
with a reason naming that branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..proto import ONNX_DOMAINS, attr, node_label
from ..report import Code, Reason
from . import backward, forward
from .common import Scope, check_batchnorm, left_for
from .planning import Planning

# Left-alone reasons about the producer side that a Concat producer explains.
PRODUCER_REASONS = {Code.UNSUPPORTED_PRODUCER}


@dataclass(frozen=True)
class ConcatFold:
    bn: int
    concat: int
    branches: tuple[forward.Chain, ...]  # one chain per Concat input: producer, target, its part of s, t


def _concat_axis(scope: Scope, node: onnx.NodeProto, rank: int | None) -> int | None:
    """The Concat's axis, made non-negative with ``rank`` (its inputs' rank); None when a negative
    axis meets an unknown rank, or the axis lies outside the rank."""
    axis = attr(node, "axis", 1)
    if not isinstance(axis, int):
        return None
    if rank is None:
        rank = scope.rank(node.output[0]) if node.output else None
    if rank is None:
        return axis if axis >= 0 else None
    if not -rank <= axis < rank:
        return None
    return axis + rank if axis < 0 else axis


def _branches(
    scope: Scope, concat: onnx.NodeProto, s_t: tuple[np.ndarray, np.ndarray]
) -> tuple[list[forward.Chain], str]:
    """One chain per input, or the reason a branch cannot take its part."""
    index = scope.index
    s, t = s_t
    chains, start = [], 0
    for k, name in enumerate(concat.input):
        where = f"branch {k} ('{name}')"
        p = index.producer.get(name)
        producer = index.nodes[p] if p is not None else None
        if (
            p is None
            or producer is None
            or producer.domain not in ONNX_DOMAINS
            or producer.op_type not in forward.TARGETS
        ):
            return [], f"{where} does not come from a Conv, ConvTranspose, Gemm or MatMul"
        if list(concat.input).count(name) != 1 or len(index.readers(name)) != 1 or name in index.graph_outputs:
            return [], f"{where} is also read elsewhere"
        target = forward.TARGETS[producer.op_type](scope, producer)
        if isinstance(target, Reason):
            return [], f"{where}: {target.message}"
        chain = forward.Chain.start(p, target, name)
        axis = _concat_axis(scope, concat, chain.current_rank)
        if axis != 1 or chain.axis != 1:
            joined = "an unknown axis" if axis is None else f"axis {axis}"
            return [], (
                f"{where}: its channels (the {target.op}'s outputs) are on axis {chain.axis} of its "
                f"rank-{chain.current_rank} output, and the Concat joins {joined}; the BN normalizes axis 1"
            )
        stop = start + target.channels
        if stop > s.shape[0]:
            return [], f"{where} has more channels than the BN"
        chains.append(forward.Chain(p, target, name, (), (), s[start:stop], t[start:stop]))
        start = stop
    if start != s.shape[0]:
        return [], f"its {s.shape[0]} channels differ from the Concat's {start}"
    return chains, ""


def plan(scope: Scope, left: dict[int, Reason]) -> tuple[list[ConcatFold], dict[int, Reason]]:
    """Splits for BNs the forward pass left because a Concat produces their input."""
    index = scope.index
    out, still = [], dict(left)
    for i, _, bn in left_for(scope, left, PRODUCER_REASONS):
        x = bn.input[0]
        p = index.producer.get(x)
        concat = index.nodes[p] if p is not None else None
        if concat is None or concat.op_type != "Concat" or concat.domain not in ONNX_DOMAINS:
            continue
        if len(index.readers(x)) != 1 or x in index.graph_outputs:
            what = (
                "a graph output"
                if x in index.graph_outputs
                else f"also read by {len(index.readers(x)) - 1} other node(s)"
            )
            still[i] = Reason(
                Code.SHARED_PRODUCER_OUTPUT, f"the output '{x}' of Concat '{node_label(concat)}' is {what}"
            )
            continue
        affine = check_batchnorm(scope, bn)
        if isinstance(affine, Reason):
            continue
        chains, problem = _branches(scope, concat, (affine.s, affine.t))
        if problem:
            still[i] = Reason(Code.CONCAT_BRANCH, f"Concat '{node_label(concat)}': {problem}")
            continue
        out.append(ConcatFold(i, p, tuple(chains)))  # type: ignore[arg-type]
        del still[i]
    return out, still


def apply(scope: Scope, fold: ConcatFold, before: dict[int, backward.Backward]) -> list[str]:
    """Rewrite the branches' layers; a layer in ``before`` (by node) also takes that backward fold,
    which is then done here and taken out of ``before``."""
    index = scope.index
    bn, concat = index.node(fold.bn), index.node(fold.concat)
    freed = list(bn.input[1:])
    for chain in fold.branches:
        also = before.pop(chain.producer, None)
        freed += forward.apply(scope, chain) if also is None else backward.apply_with(scope, also, chain)
    node = onnx.NodeProto()
    node.CopyFrom(concat)
    node.output[0] = bn.output[0]  # the Concat writes the BN's output
    index.remove_node(fold.bn)
    index.replace_node(fold.concat, node)
    return freed


def plan_step(p: Planning) -> None:
    """BNs after a Concat, split into the branches' layers when every branch's part is safe."""
    index = p.scope.index
    splits, p.left = plan(p.scope, p.left)
    for c in splits:
        reason = next((r for ch in c.branches if (r := forward.vet(p.scope, ch, p.strict, p.notes)) is not None), None)
        if reason is not None:
            p.left[c.bn] = reason
            continue
        p.splits.append(c)
        node = index.node(c.concat)
        into = f"{node_label(node)} ({', '.join(node_label(index.node(ch.producer)) for ch in c.branches)})"
        p.folded(c.bn, into, "Concat", "split")
